/**
 * Moving key_tail (GC) or dirty_tail (writeback): check that the move keeps
 * key_tail <= dirty_tail <= key_head in log order, persist the new position with the replica
 * rules under the tail's lock, then publish it in shared memory and wake whoever waits on it.
 *
 * Log order cannot be read off raw positions: the log hops from segment to segment through LAST
 * ksets, in whatever order segments were allocated. So each move is checked against the log
 * itself: a tail steps over exactly the kset it stands on (to the end of a normal kset, or into
 * the segment a LAST kset names), and never passes the position ahead of it (dirty_tail for
 * key_tail, key_head for dirty_tail). Replay starts from a log where the order holds (it finds
 * dirty_tail between key_tail and key_head) and key_head only grows, so checking every move
 * keeps the order for good.
 */
import { assert } from "../assert.ts";
import { KSET_HEADER_SIZE, KSET_MAGIC, SEG_DATA_SIZE, ksetSize } from "../format/constants.ts";
import { decodeKsetHeader } from "../format/kset.ts";
import { type CachePos, posToString } from "../log/position.ts";
import { lock, unlock } from "../sync/lock.ts";
import type { EngineContext } from "./context.ts";
import type { LogPos, Media } from "./media.ts";
import {
  LOCK_DIRTY_TAIL,
  LOCK_KEY_HEAD,
  LOCK_KEY_TAIL,
  POS_DIRTY_TAIL,
  POS_KEY_HEAD,
  POS_KEY_TAIL,
  type SharedState,
  WAIT_DIRTY_TAIL,
  WAIT_KEY_TAIL,
} from "./shared_state.ts";

export type TailName = "key_tail" | "dirty_tail";

/** What a tail stands on: a normal kset (its size), a LAST kset (the segment it names), or neither. */
export type KsetAtTail = { kind: "normal"; size_bytes: number } | { kind: "last"; next_cache_seg_id: number } | { kind: "none" };

/**
 * Why moving a tail from `from` to `to` breaks log order, or null when it does not. `at_from`
 * is the kset the tail stands on; `ahead` the position it may not pass. Pure, so the rule is
 * testable on its own.
 */
export function tailMoveProblem(from: CachePos, to: CachePos, at_from: KsetAtTail, ahead: CachePos): string | null {
  if (at_from.kind === "none") return `no kset at ${posToString(from)}`;
  if (at_from.kind === "last") {
    if (to.cache_seg_id !== at_from.next_cache_seg_id || to.seg_off !== 0) return `the LAST kset there leads to ${at_from.next_cache_seg_id}:0`;
    // The LAST kset ends its segment: a position ahead in that segment would be left behind.
    if (ahead.cache_seg_id === from.cache_seg_id) return `it passes ${posToString(ahead)}`;
    return null;
  }
  if (to.cache_seg_id !== from.cache_seg_id || to.seg_off !== from.seg_off + at_from.size_bytes) {
    return `the kset there is ${at_from.size_bytes} bytes long`;
  }
  if (ahead.cache_seg_id === from.cache_seg_id && to.seg_off > ahead.seg_off) return `it passes ${posToString(ahead)}`;
  return null;
}

/**
 * The kset at pos, from its header alone: the mover has just read and checked the whole kset;
 * this only re-checks where the mover says it leads.
 */
function ksetAtTail(media: Media, pos: CachePos): KsetAtTail {
  if (pos.seg_off + KSET_HEADER_SIZE > SEG_DATA_SIZE) return { kind: "none" };
  const h = decodeKsetHeader(media.dom.view(media.dataOff(pos.cache_seg_id, pos.seg_off), KSET_HEADER_SIZE));
  if (h.magic !== KSET_MAGIC) return { kind: "none" };
  if (h.last) return { kind: "last", next_cache_seg_id: h.key_num_or_next };
  return { kind: "normal", size_bytes: ksetSize(h.key_num_or_next) };
}

/** A position from shared memory, read under its lock so the pair is consistent. */
export function readPos(s: SharedState, lock_word: number, at: number): CachePos {
  lock(s.locks, lock_word);
  const pos = { cache_seg_id: s.pos[at], seg_off: s.pos[at + 1] };
  unlock(s.locks, lock_word);
  return pos;
}

export function advanceTail(ctx: EngineContext, which: TailName, pos: LogPos): void {
  const s = ctx.s;
  const lock_word = which === "key_tail" ? LOCK_KEY_TAIL : LOCK_DIRTY_TAIL;
  const at = which === "key_tail" ? POS_KEY_TAIL : POS_DIRTY_TAIL;
  // Read before taking our lock (no nesting); what is ahead only moves on, so this is safe.
  const ahead = which === "key_tail" ? readPos(s, LOCK_DIRTY_TAIL, POS_DIRTY_TAIL) : readPos(s, LOCK_KEY_HEAD, POS_KEY_HEAD);
  lock(s.locks, lock_word);
  try {
    const from = { cache_seg_id: s.pos[at], seg_off: s.pos[at + 1] };
    const problem = tailMoveProblem(from, pos, ksetAtTail(ctx.media, from), ahead);
    if (problem !== null) assert(false, `${which} ${posToString(from)} -> ${posToString(pos)} breaks key_tail <= dirty_tail <= key_head: ${problem}`);
    ctx.media.persistTail(which, pos);
    s.pos[at] = pos.cache_seg_id;
    s.pos[at + 1] = pos.seg_off;
  } finally {
    unlock(s.locks, lock_word);
  }
  s.signal(which === "key_tail" ? WAIT_KEY_TAIL : WAIT_DIRTY_TAIL);
}
