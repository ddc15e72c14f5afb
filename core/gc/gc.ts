/**
 * Garbage collection (reference §2.10): when used segments reach gc_percent of the cache (or a
 * request waits for space), walk the log from key_tail, never past dirty_tail, dropping one
 * reference per key; a data segment whose count reaches zero is freed by a persisted generation
 * bump (core/engine/segments.ts). key_tail is persisted after each kset; a key-log segment is
 * freed only once key_tail is persisted past its LAST kset. Reclaim is strictly FIFO by log order.
 * Then stale index entries are pruned in small batches.
 */
import type { CacheMeta } from "../format/load_cache.ts";
import type { WalkMeta } from "../log/walk.ts";
import { readKsetAt } from "../log/read_kset.ts";
import { lock, unlock } from "../sync/lock.ts";
import { waitChangeAsync } from "../sync/wait_word.ts";
import type { EngineContext } from "../engine/context.ts";
import { advanceTail, readPos } from "../engine/tails.ts";
import {
  CTL_CACHE_FULL,
  CTL_GC_ERROR,
  CTL_GC_PERCENT,
  CTL_STOPPING,
  LOCK_DIRTY_TAIL,
  LOCK_KEY_TAIL,
  POS_DIRTY_TAIL,
  POS_KEY_TAIL,
  STAT_GC_RUNS,
  STAT_GC_SEGS_FREED,
  WAIT_DIRTY_TAIL,
  WAIT_GC_KICK,
  WAIT_SEG_FREED,
} from "../engine/shared_state.ts";
import { DecodeCollector } from "../threads/collect.ts";
import { atGcPercent } from "./gc_percent.ts";
import { posEqual } from "../log/position.ts";

/** GC re-checks at least this often even without a signal. */
export const GC_PERIOD_MS = 5_000;
/** Stale index entries pruned per subtree visit. */
export const PRUNE_BATCH = 10;
/** Subtrees visited per prune pass (bounds the time a pass takes). */
export const PRUNE_SUBTREES_PER_PASS = 4096;
/** Prune sweeps run only while fewer than this fraction of index nodes are free. */
export const PRUNE_BELOW_FREE_FRACTION = 0.5;
/** Below this fraction of free index nodes, GC runs as if the cache were full. */
export const NODES_LOW_FRACTION = 0.1;

/** Ksets and keys GC decodes between collections (collect() reclaims a whole log without yielding). */
const GC_COLLECT_EVERY_ITEMS = 131_072;

/**
 * Whether GC wants to reclaim: gc_percent of the segments used, a request waiting for a segment,
 * or index nodes running low. GC frees only what writeback has passed; gcWaitsForWriteback says when
 * that holds it up.
 */
export function gcWanted(ctx: EngineContext): boolean {
  return atGcPercent(ctx.s) || spaceShort(ctx);
}

/** A request waits for a segment, or index nodes run low: GC must reclaim now, whatever it takes. */
function spaceShort(ctx: EngineContext): boolean {
  const { s, idx } = ctx;
  return Atomics.load(s.ctl, CTL_CACHE_FULL) !== 0 || idx.nodesFree() < idx.nodes_max * NODES_LOW_FRACTION;
}

/**
 * Whether GC has nothing left to reclaim without writeback: everything writeback passed is
 * reclaimed (key_tail at dirty_tail), or GC cannot wait for that (a request waits for a segment,
 * index nodes run low, gc_percent 0). While data already written back is left, GC makes room
 * without writeback: a cache a drain left clean (the bench's settle step) is reclaimed first,
 * and dirty data goes on waiting (core/writeback/defer.ts).
 */
export function gcWaitsForWriteback(ctx: EngineContext): boolean {
  const { s } = ctx;
  if (spaceShort(ctx) || Atomics.load(s.ctl, CTL_GC_PERCENT) === 0) return true;
  return posEqual(readPos(s, LOCK_KEY_TAIL, POS_KEY_TAIL), readPos(s, LOCK_DIRTY_TAIL, POS_DIRTY_TAIL));
}

export class Gc {
  private prune_cursor = 0;
  private readonly collector = new DecodeCollector(GC_COLLECT_EVERY_ITEMS);
  /** Subtrees left in the current prune sweep (0: no sweep running). */
  private sweep_left = 0;
  /** STAT_GC_SEGS_FREED when the last sweep started. */
  private freed_at_sweep = 0;
  private sweep_again = false;
  private stopped_reason: string | null = null;

  constructor(
    private readonly ctx: EngineContext,
    meta: CacheMeta,
  ) {
    // Generations change while we run: stale-ness is judged against the shared table.
    this.walk_meta = { n_segs: meta.n_segs, seg_ids: meta.seg_ids, seg_gens: ctx.s.seg_gens, data_crc: meta.data_crc };
  }

  private readonly walk_meta: WalkMeta;

  async run(): Promise<void> {
    const s = this.ctx.s;
    while (Atomics.load(s.ctl, CTL_STOPPING) === 0) {
      const seen_kick = Atomics.load(s.waits, WAIT_GC_KICK);
      const seen_dirty = Atomics.load(s.waits, WAIT_DIRTY_TAIL);
      if (this.stopped_reason === null) this.collect();
      this.prune();
      // Sleep until writeback moves dirty_tail, someone asks for space, or the period ends.
      await Promise.race([
        waitChangeAsync(s.waits, WAIT_GC_KICK, seen_kick, GC_PERIOD_MS),
        waitChangeAsync(s.waits, WAIT_DIRTY_TAIL, seen_dirty, GC_PERIOD_MS),
      ]);
    }
  }

  /** Reclaim ksets from key_tail while needed; returns the ksets reclaimed. */
  collect(): number {
    const { s } = this.ctx;
    let done = 0;
    // Bounded: at most the whole log once per call.
    const bound = this.ctx.segs.n_segs * 4096;
    while (done < bound && gcWanted(this.ctx)) {
      const outcome = this.step();
      if (outcome !== "progress") break;
      done++;
    }
    if (done > 0) s.addStat(this.ctx.slot, STAT_GC_RUNS, 1);
    return done;
  }

  /** Reclaim one kset at key_tail. */
  step(): "progress" | "caught_up" | "stopped" {
    const { s, media, segs } = this.ctx;
    const tail = { cache_seg_id: s.pos[POS_KEY_TAIL], seg_off: s.pos[POS_KEY_TAIL + 1] };
    lock(s.locks, LOCK_DIRTY_TAIL);
    const dirty = { cache_seg_id: s.pos[POS_DIRTY_TAIL], seg_off: s.pos[POS_DIRTY_TAIL + 1] };
    unlock(s.locks, LOCK_DIRTY_TAIL);
    if (tail.cache_seg_id === dirty.cache_seg_id && tail.seg_off === dirty.seg_off) return "caught_up";
    const kset = readKsetAt(media.dom, this.walk_meta, tail, { backing_size_bytes: media.backing_size_bytes, verify_data_crc: media.data_crc });
    this.collector.add(kset.kind === "normal" ? kset.keys.length : 0);
    if (kset.kind === "end") return this.stop(`${kset.reason} at key_tail ${tail.cache_seg_id}:${tail.seg_off}`);
    if (kset.kind === "last") {
      if (dirty.cache_seg_id === tail.cache_seg_id) return "caught_up";
      this.advance({ cache_seg_id: kset.next_cache_seg_id, seg_off: 0 });
      segs.freeLogSegment(tail.cache_seg_id);
      return "progress";
    }
    const bad = kset.keys.find((k) => k.crc_ok === false);
    if (bad !== undefined) return this.stop(`data CRC mismatch in key off=${bad.off} of kset at ${tail.cache_seg_id}:${tail.seg_off}`);
    for (const k of kset.keys) segs.put(k.cache_seg_id);
    this.advance({ cache_seg_id: tail.cache_seg_id, seg_off: tail.seg_off + kset.size_bytes });
    return "progress";
  }

  private advance(pos: { cache_seg_id: number; seg_off: number }): void {
    advanceTail(this.ctx, "key_tail", pos);
  }


  /** GC is disabled until restart after an error (as in the kernel), and says so once. */
  private stop(reason: string): "stopped" {
    this.stopped_reason = reason;
    Atomics.store(this.ctx.s.ctl, CTL_GC_ERROR, 5);
    this.ctx.logger.error(`GC stopped until restart: ${reason}`);
    return "stopped";
  }

  /**
   * Remove index entries whose segment generation moved on. Stale entries are harmless to
   * lookups (they are skipped and dropped when met), so a sweep over the index runs only once
   * segments were freed since the last one AND the node pool is getting full; each pass visits a
   * bounded number of subtrees and removes a few entries from each.
   */
  prune(): number {
    const { idx, s } = this.ctx;
    const n = idx.n_subtrees;
    if (this.sweep_left === 0) {
      const freed = s.statTotal(STAT_GC_SEGS_FREED);
      const pool_busy = idx.nodesFree() < idx.nodes_max * PRUNE_BELOW_FREE_FRACTION;
      if (!(pool_busy && (freed !== this.freed_at_sweep || this.sweep_again))) return 0;
      this.freed_at_sweep = freed;
      this.sweep_again = false;
      this.sweep_left = n;
    }
    let removed = 0;
    const visits = Math.min(this.sweep_left, PRUNE_SUBTREES_PER_PASS);
    for (let i = 0; i < visits; i++) {
      const sub = this.prune_cursor;
      this.prune_cursor = (this.prune_cursor + 1) % n;
      if (idx.count(sub) === 0) continue;
      idx.lockSubtree(sub);
      try {
        const r = idx.purgeStale(sub, this.ctx.isStale, PRUNE_BATCH);
        // A full batch may have left more behind: sweep again after this one.
        if (r === PRUNE_BATCH) this.sweep_again = true;
        removed += r;
      } finally {
        idx.unlockSubtree(sub);
      }
    }
    this.sweep_left -= visits;
    if (removed > 0) s.signal(WAIT_SEG_FREED);
    return removed;
  }
}
