/**
 * Segment table: which logical segments are in use, how many log keys (plus data heads) reference
 * each one, and each segment's generation (reference §2.11).
 *
 * A segment is freed when its reference count reaches zero: its generation is bumped and that
 * bump is PERSISTED before the segment is marked free, so every key that still names the old
 * generation is recognised as stale everywhere (read, replay, writeback) once the segment is
 * reused. Key-log segments hold no data keys and are freed without a generation bump.
 */
import { assert, fail } from "../assert.ts";
import { SEG_DATA_SIZE } from "../format/constants.ts";
import { lock, unlock } from "../sync/lock.ts";
import type { Media } from "./media.ts";
import {
  CTL_CACHE_FULL,
  CTL_SEG_HINT,
  CTL_SEGS_USED,
  HEAD_OFF,
  HEAD_SEG,
  HEAD_WORDS,
  LOCK_SEG_TABLE,
  type SharedState,
  STAT_GC_SEGS_FREED,
  WAIT_SEG_FREED,
} from "./shared_state.ts";

/**
 * Free segments kept back from data allocation so the key log can always roll into a new
 * segment: writes wait for space instead of leaving the log with nowhere to go.
 */
export const LOG_RESERVE_SEGS = 2;

/** Where a piece of data went in the cache. */
export interface DataAlloc {
  cache_seg_id: number;
  seg_off: number;
  len: number;
  seg_gen: number;
}

export class SegmentTable {
  constructor(
    private readonly s: SharedState,
    private readonly media: Media,
    /** Statistics slot of the calling thread. */
    private readonly stat_slot: number,
  ) {}

  get n_segs(): number {
    return this.s.layout.n_segs;
  }

  used(): number {
    return Atomics.load(this.s.ctl, CTL_SEGS_USED);
  }

  gen(cache_seg_id: number): number {
    return this.s.seg_gens[cache_seg_id];
  }

  /** Changes whenever the segment's generation changes (seqlock for lock-free cache reads). */
  genSeq(cache_seg_id: number): number {
    return Atomics.load(this.s.seg_gen_seq, cache_seg_id);
  }

  isUsed(cache_seg_id: number): boolean {
    return Atomics.load(this.s.seg_map, cache_seg_id) !== 0;
  }

  /**
   * Take a free segment. Data allocations leave LOG_RESERVE_SEGS free for the key log.
   * Returns -1 when none is available (and flags cache_full so the freeing side wakes waiters).
   */
  allocSegment(for_log: boolean): number {
    const s = this.s;
    lock(s.locks, LOCK_SEG_TABLE);
    try {
      const n = this.n_segs;
      const free = n - s.ctl[CTL_SEGS_USED];
      if (free <= 0 || (!for_log && free <= LOG_RESERVE_SEGS)) {
        Atomics.store(s.ctl, CTL_CACHE_FULL, 1);
        return -1;
      }
      const hint = s.ctl[CTL_SEG_HINT];
      for (let i = 0; i < n; i++) {
        const seg = (hint + i) % n;
        if (s.seg_map[seg] !== 0) continue;
        s.seg_map[seg] = 1;
        s.ctl[CTL_SEGS_USED]++;
        s.ctl[CTL_SEG_HINT] = (seg + 1) % n;
        assert(s.seg_refs[seg] === 0, `free segment ${seg} has references`);
        return seg;
      }
      assert(false, "segment map and used count disagree");
    } finally {
      unlock(s.locks, LOCK_SEG_TABLE);
    }
  }

  /** Mark a segment used during replay (single-threaded, before workers start). */
  markUsed(cache_seg_id: number): void {
    if (!(cache_seg_id >= 0 && cache_seg_id < this.n_segs)) fail(`segment ${cache_seg_id} out of range`);
    if (this.s.seg_map[cache_seg_id] !== 0) return;
    this.s.seg_map[cache_seg_id] = 1;
    this.s.ctl[CTL_SEGS_USED]++;
  }

  get(cache_seg_id: number): void {
    Atomics.add(this.s.seg_refs, cache_seg_id, 1);
  }

  /** Drop one reference; the last one frees (invalidates) the segment. */
  put(cache_seg_id: number): void {
    const before = Atomics.sub(this.s.seg_refs, cache_seg_id, 1);
    if (!(before > 0)) fail(`segment ${cache_seg_id} reference count underflow`);
    if (before === 1) this.invalidate(cache_seg_id);
  }

  refs(cache_seg_id: number): number {
    return Atomics.load(this.s.seg_refs, cache_seg_id);
  }

  /** Free a key-log segment (no data keys point into it, so no generation bump is needed). */
  freeLogSegment(cache_seg_id: number): void {
    this.release(cache_seg_id, false);
  }

  private invalidate(cache_seg_id: number): void {
    this.release(cache_seg_id, true);
  }

  private release(cache_seg_id: number, bump_gen: boolean): void {
    const s = this.s;
    lock(s.locks, LOCK_SEG_TABLE);
    try {
      assert(s.seg_map[cache_seg_id] !== 0, `freeing free segment ${cache_seg_id}`);
      assert(s.seg_refs[cache_seg_id] === 0, `freeing segment ${cache_seg_id} with references`);
      if (bump_gen) {
        const gen = s.seg_gens[cache_seg_id] + 1;
        // Durable before the segment can be handed out again: old keys must read as stale.
        this.media.persistSegGen(cache_seg_id, gen);
        s.seg_gens[cache_seg_id] = gen;
        Atomics.add(s.seg_gen_seq, cache_seg_id, 1);
      }
      s.seg_map[cache_seg_id] = 0;
      s.ctl[CTL_SEGS_USED]--;
      Atomics.store(s.ctl, CTL_CACHE_FULL, 0);
    } finally {
      unlock(s.locks, LOCK_SEG_TABLE);
    }
    s.addStat(this.stat_slot, STAT_GC_SEGS_FREED, 1);
    s.signal(WAIT_SEG_FREED);
  }

  /**
   * Allocate up to len bytes from data head `head` (owned by the calling thread). The result may
   * be shorter (end of the head's segment); the caller loops. Takes one reference for the key.
   * Returns null when no segment is free.
   */
  allocData(head: number, len: number): DataAlloc | null {
    if (!(len > 0 && len <= SEG_DATA_SIZE)) fail(`data allocation of ${len} bytes`);
    const h = this.s.heads;
    const base = head * HEAD_WORDS;
    if (h[base + HEAD_SEG] < 0) {
      const seg = this.allocSegment(false);
      if (seg < 0) return null;
      Atomics.store(this.s.seg_refs, seg, 1); // the head's own reference
      h[base + HEAD_SEG] = seg;
      h[base + HEAD_OFF] = 0;
    }
    const seg = h[base + HEAD_SEG];
    const seg_off = h[base + HEAD_OFF];
    const remaining = SEG_DATA_SIZE - seg_off;
    const alloc: DataAlloc = { cache_seg_id: seg, seg_off, len: Math.min(len, remaining), seg_gen: this.gen(seg) };
    this.get(seg);
    if (remaining > len) {
      h[base + HEAD_OFF] = seg_off + len;
    } else {
      h[base + HEAD_SEG] = -1;
      h[base + HEAD_OFF] = 0;
      this.put(seg); // the head leaves the segment
    }
    return alloc;
  }

  /** Give back the unused tail of an allocation that was just made from `head`. */
  releaseHead(head: number): void {
    const h = this.s.heads;
    const base = head * HEAD_WORDS;
    const seg = h[base + HEAD_SEG];
    if (seg < 0) return;
    h[base + HEAD_SEG] = -1;
    h[base + HEAD_OFF] = 0;
    this.put(seg);
  }

  /** Wait word value to pass to waitForFree. */
  freedSeq(): number {
    return Atomics.load(this.s.waits, WAIT_SEG_FREED);
  }
}
