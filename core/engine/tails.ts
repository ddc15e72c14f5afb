/**
 * Moving key_tail (GC) or dirty_tail (writeback): persist the new position with the replica rules
 * under the tail's lock, then publish it in shared memory and wake whoever waits on it.
 */
import { lock, unlock } from "../sync/lock.ts";
import type { EngineContext } from "./context.ts";
import type { LogPos } from "./media.ts";
import { LOCK_DIRTY_TAIL, LOCK_KEY_TAIL, POS_DIRTY_TAIL, POS_KEY_TAIL, WAIT_DIRTY_TAIL, WAIT_KEY_TAIL } from "./shared_state.ts";

export function advanceTail(ctx: EngineContext, which: "key_tail" | "dirty_tail", pos: LogPos): void {
  const s = ctx.s;
  const lock_word = which === "key_tail" ? LOCK_KEY_TAIL : LOCK_DIRTY_TAIL;
  const at = which === "key_tail" ? POS_KEY_TAIL : POS_DIRTY_TAIL;
  lock(s.locks, lock_word);
  try {
    ctx.media.persistTail(which, pos);
    s.pos[at] = pos.cache_seg_id;
    s.pos[at + 1] = pos.seg_off;
  } finally {
    unlock(s.locks, lock_word);
  }
  s.signal(which === "key_tail" ? WAIT_KEY_TAIL : WAIT_DIRTY_TAIL);
}
