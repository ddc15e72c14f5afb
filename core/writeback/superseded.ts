/**
 * Which parts of a dirty extent writeback must still write: all of it, except the parts where the
 * index already holds a later dirty key of the same flush epoch (core/log/flush_epochs.ts explains
 * why skipping those keeps the backing device crash-consistent). The later key is written (or
 * itself skipped for an even later one of the epoch) before writeback leaves the epoch.
 *
 * The later key must already be on media (its kset closed): otherwise a crash could lose it
 * while GC reclaims the earlier one, and the bytes would read back older than before the crash.
 * Writeback may close such a kset first when that saves enough (Writeback.closeForSkips).
 */
import { assert } from "../assert.ts";
import { KEY_F_CLEAN, KEY_F_EMPTY } from "../format/constants.ts";
import type { SegmentTable } from "../engine/segments.ts";
import type { KeyIndex } from "../index/key_index.ts";
import { NIL } from "../index/key_index.ts";
import { EPOCH_UNKNOWN } from "../log/flush_epochs.ts";
import type { KsetLog } from "../log/kset_log.ts";
import type { Extent } from "./dedupe.ts";

/** What the check reads of the log: which kset a key goes to and how often it was closed. */
type LogView = Pick<KsetLog, "ksetIdOf" | "closes">;

/** A range [off, off + len) of the backing device to write from the extent's cached data. */
export interface Run {
  off: number;
  len: number;
}

/** Bound on index keys visited for one extent (an extent spans at most 4 MiB of one subtree). */
const KEYS_PER_EXTENT_MAX = 1 << 14;

/**
 * The runs of e to write, in offset order. With `held_back`, also counts, per kset id, the bytes
 * of e that later keys still in an open kset would let writeback skip once that kset closed.
 */
export function liveRuns(
  idx: KeyIndex,
  e: Extent,
  epoch: number,
  log: LogView,
  segs: Pick<SegmentTable, "gen">,
  held_back?: Map<number, number>,
): Run[] {
  if (epoch === EPOCH_UNKNOWN) return [{ off: e.off, len: e.len }];
  const end = e.off + e.len;
  const s = idx.subtreeOf(e.off);
  assert(idx.subtreeOf(end - 1) === s, "dirty extent crosses a 4 MiB boundary");
  const runs: Run[] = [];
  let cursor = e.off; // everything before it is decided
  idx.lockSubtree(s);
  try {
    let n = idx.ceiling(s, e.off);
    for (let visited = 0; n !== NIL && idx.off[n] < end; visited++) {
      assert(visited < KEYS_PER_EXTENT_MAX, "index walk over one extent did not end");
      const verdict = overwrites(idx, n, e, epoch, log, segs);
      if (verdict === Overwrite.YES) {
        const from = Math.max(idx.off[n], e.off);
        if (from > cursor) runs.push({ off: cursor, len: from - cursor });
        cursor = Math.min(idx.off[n] + idx.len[n], end);
      } else if (verdict === Overwrite.ONCE_CLOSED && held_back !== undefined) {
        const bytes = Math.min(idx.off[n] + idx.len[n], end) - Math.max(idx.off[n], e.off);
        const kset_id = log.ksetIdOf(idx.off[n]);
        held_back.set(kset_id, (held_back.get(kset_id) ?? 0) + bytes);
      }
      n = idx.next(s, n);
    }
  } finally {
    idx.unlockSubtree(s);
  }
  if (cursor < end) runs.push({ off: cursor, len: end - cursor });
  return runs;
}

const enum Overwrite {
  NO,
  YES,
  /** It would, but its kset has not closed since it was appended. */
  ONCE_CLOSED,
}

/** Key n is a different, live, dirty key of e's flush epoch (so it is later than e in the log). */
function overwrites(idx: KeyIndex, n: number, e: Extent, epoch: number, log: LogView, segs: Pick<SegmentTable, "gen">): Overwrite {
  if ((idx.flags[n] & (KEY_F_CLEAN | KEY_F_EMPTY)) !== 0) return Overwrite.NO;
  if (idx.flush_epoch[n] !== epoch) return Overwrite.NO;
  const seg = idx.cache_seg_id[n];
  // A key over a reclaimed segment is no proof of anything.
  if (idx.seg_gen[n] !== segs.gen(seg)) return Overwrite.NO;
  // The same cached bytes (e itself, possibly trimmed by later keys) are not a later key.
  if (seg === e.cache_seg_id && idx.seg_gen[n] === e.seg_gen && idx.seg_off[n] - idx.off[n] === e.seg_off - e.off) return Overwrite.NO;
  if (log.closes(log.ksetIdOf(idx.off[n])) === idx.kset_closes[n]) return Overwrite.ONCE_CLOSED;
  return Overwrite.YES;
}
