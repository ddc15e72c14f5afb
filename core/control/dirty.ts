/**
 * How much is dirty, read from the log itself rather than kept in a counter.
 *
 * dirty bytes = the summed lengths of the live keys not marked CLEAN in
 *   (a) the closed ksets from dirty_tail to key_head (what writeback has yet to write back), and
 *   (b) the in-memory ksets not closed yet.
 * That is the bytes of writes, write-zeroes and trims acknowledged and not yet written back,
 * counting a range written twice twice (writeback merges overlaps within one kset, so it may
 * write fewer bytes than this). Replay needs nothing: the count comes from the log. The log is
 * walked before the open ksets are read, so a kset closed in between is missed by that one count
 * (never counted twice); with no writes in flight the count is exact.
 *
 * The walk runs on the main thread while the other threads move the log. A log segment after
 * dirty_tail can only be freed once GC moves key_tail past it, so a walk during which key_tail
 * did not move read only live ksets; a walk that raced (key_tail moved, or the walk did not end
 * at the key_head it started from) is retried, and after SCAN_ATTEMPTS_MAX the answer is null.
 */
import { KEY_SIZE, KEY_F_CLEAN, KSET_HEADER_SIZE, KSET_SIZE_MAX } from "../format/constants.ts";
import { decodeKeyAt } from "../format/key.ts";
import type { EngineContext } from "../engine/context.ts";
import {
  KSET_KEY_NUM,
  KSET_META_WORDS,
  LOCK_DIRTY_TAIL,
  LOCK_KEY_HEAD,
  LOCK_KEY_TAIL,
  LOCK_KSET_BASE,
  POS_DIRTY_TAIL,
  POS_KEY_HEAD,
  POS_KEY_TAIL,
} from "../engine/shared_state.ts";
import { type CachePos, posEqual } from "../log/position.ts";
import { walkLog, type WalkMeta } from "../log/walk.ts";
import { lockOrThrow, unlock } from "../sync/lock.ts";
import { DecodeCollector } from "../threads/collect.ts";

export const SCAN_ATTEMPTS_MAX = 4;

/**
 * The walk makes a few objects per kset and per key; over a long dirty log (170 000 one-key
 * ksets after a write+flush burst, or 300 000 keys after a random-write burst) one scan left
 * hundreds of MiB for the collector, and `drain` scans four times a second. A collection every
 * this many ksets and keys walked (over all scans of this thread) keeps that garbage small.
 */
const scan_collector = new DecodeCollector(131_072);
/**
 * Status reads wait at most this long for a shared lock, less than the main thread's general
 * bound (boundLockWaits in serve): a status should answer quickly or say why. Holders keep these
 * locks for microseconds, so this bound is only reached when a worker died holding one.
 */
export const MAIN_LOCK_WAIT_MS = 1_000;

/** Take words[i] within MAIN_LOCK_WAIT_MS or throw a LockWaitError. */
export function lockBounded(words: Int32Array, i: number): void {
  lockOrThrow(words, i, MAIN_LOCK_WAIT_MS);
}

export interface LogPositions {
  key_head: CachePos;
  dirty_tail: CachePos;
  key_tail: CachePos;
}

export interface DirtyScan extends LogPositions {
  /** Dirty bytes in closed ksets from dirty_tail to key_head. */
  logged_dirty_bytes: number;
  /** When a target was given: dirty_tail has reached (or passed) it. */
  target_reached: boolean;
  /** Dirty bytes in the ksets before the target (0 once reached). */
  before_target_bytes: number;
}

function readPos(pos: Int32Array, at: number): CachePos {
  return { cache_seg_id: pos[at], seg_off: pos[at + 1] };
}

/** One position, read under its lock so seg and offset belong together. */
function lockedPos(ctx: EngineContext, lock_word: number, at: number): CachePos {
  lockBounded(ctx.s.locks, lock_word);
  try {
    return readPos(ctx.s.pos, at);
  } finally {
    unlock(ctx.s.locks, lock_word);
  }
}

/** key_head, dirty_tail and key_tail, each consistent in itself (not a snapshot of all three). Throws after MAIN_LOCK_WAIT_MS. */
export function logPositions(ctx: EngineContext): LogPositions {
  // Tails first: read after them, key_head can only be further along the log.
  const key_tail = lockedPos(ctx, LOCK_KEY_TAIL, POS_KEY_TAIL);
  const dirty_tail = lockedPos(ctx, LOCK_DIRTY_TAIL, POS_DIRTY_TAIL);
  const key_head = lockedPos(ctx, LOCK_KEY_HEAD, POS_KEY_HEAD);
  return { key_head, dirty_tail, key_tail };
}

/** Walk from dirty_tail to key_head; null when the log kept moving under every attempt. */
export function scanDirty(ctx: EngineContext, walk_meta: WalkMeta, target?: CachePos): DirtyScan | null {
  for (let attempt = 0; attempt < SCAN_ATTEMPTS_MAX; attempt++) {
    const p = logPositions(ctx);
    const scan = scanOnce(ctx, walk_meta, p, target);
    if (scan !== null && posEqual(lockedPos(ctx, LOCK_KEY_TAIL, POS_KEY_TAIL), p.key_tail)) return scan;
  }
  return null;
}

function scanOnce(ctx: EngineContext, walk_meta: WalkMeta, p: LogPositions, target: CachePos | undefined): DirtyScan | null {
  let total = 0;
  let before = 0;
  // The target is still ahead when it shows up after dirty_tail, key_head included.
  let seen_target = false;
  try {
    const r = walkLog(ctx.media.dom, walk_meta, p.dirty_tail, { backing_size_bytes: ctx.media.backing_size_bytes }, (k) => {
      if (target !== undefined && !posEqual(k.pos, p.dirty_tail) && posEqual(k.pos, target)) seen_target = true;
      if (posEqual(k.pos, p.key_head)) return false;
      let bytes = 0;
      scan_collector.add(k.keys.length);
      for (const key of k.keys) if (!key.stale && (key.flags & KEY_F_CLEAN) === 0) bytes += key.len;
      total += bytes;
      if (!seen_target) before += bytes;
      return true;
    });
    const at_head = r.end_kind === "visitor" || (r.end_kind === "zero_header" && posEqual(r.end_pos, p.key_head));
    if (!at_head) return null;
  } catch {
    // A segment was recycled under the walk: its bytes are no longer a log. Try again.
    return null;
  }
  const ahead = target !== undefined && !posEqual(p.dirty_tail, target) && (seen_target || posEqual(p.key_head, target));
  return { ...p, logged_dirty_bytes: total, target_reached: target !== undefined && !ahead, before_target_bytes: ahead ? before : 0 };
}

/** Dirty bytes in the ksets still being filled (each read under its kset lock). */
export function openKsetDirtyBytes(ctx: EngineContext): number {
  const s = ctx.s;
  const dv = new DataView(s.buffers.kset_bufs);
  let total = 0;
  for (let id = 0; id < s.layout.n_ksets; id++) {
    lockBounded(s.locks, LOCK_KSET_BASE + id);
    try {
      const n = Math.min(s.kset_meta[id * KSET_META_WORDS + KSET_KEY_NUM], (KSET_SIZE_MAX - KSET_HEADER_SIZE) / KEY_SIZE);
      for (let i = 0; i < n; i++) {
        const k = decodeKeyAt(dv, id * KSET_SIZE_MAX + KSET_HEADER_SIZE + i * KEY_SIZE, `open kset ${id} key ${i}`);
        if ((k.flags & KEY_F_CLEAN) === 0) total += k.len;
      }
    } finally {
      unlock(s.locks, LOCK_KSET_BASE + id);
    }
  }
  return total;
}
