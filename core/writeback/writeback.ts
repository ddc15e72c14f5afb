/**
 * Writeback (reference §2.9): from dirty_tail, one kset at a time in log order. The dirty extents
 * of a kset (deduplicated, later keys win) go to the backing device with several writes in
 * flight; then the backing device is flushed; only then is the new dirty_tail persisted.
 *
 * Within one flush epoch, the parts of a key that a later key of the same epoch (already on
 * media) overwrote are left out. So whatever happens to the cache device, the backing device
 * holds the initial image with every earlier epoch of the log applied and a subset of the
 * current one, and at each flush boundary exactly the prefix of the log up to it
 * (core/log/flush_epochs.ts shows why that is crash-consistent).
 *
 * When it starts on a kset is up to the deferral policy (./defer.ts): by default `serve` lets
 * dirty data wait while clients keep requests in flight and the cache has room.
 *
 * Failures never move dirty_tail: the same kset is retried with a growing delay, and the state is
 * logged once when it begins and once when it ends.
 */
import { fail } from "../assert.ts";
import { KEY_F_CLEAN } from "../format/constants.ts";
import { isAllZero } from "../format/bytes.ts";
import type { CacheMeta } from "../format/load_cache.ts";
import type { WalkMeta } from "../log/walk.ts";
import { readKsetAt, type DecodedKset } from "../log/read_kset.ts";
import { lock, unlock } from "../sync/lock.ts";
import { waitChangeAsync } from "../sync/wait_word.ts";
import type { EngineContext } from "../engine/context.ts";
import { advanceTail } from "../engine/tails.ts";
import {
  CTL_STOPPING,
  CTL_WRITEBACK_DEFERRED,
  CTL_WRITEBACK_ERROR,
  CTL_WRITEBACK_PAUSED,
  LOCK_KEY_HEAD,
  POS_DIRTY_TAIL,
  POS_KEY_HEAD,
  STAT_ERR_BACKING_WRITE,
  STAT_WRITEBACK_BYTES,
  STAT_WRITEBACK_KSETS,
  STAT_WRITEBACK_SKIPPED_BYTES,
  type SharedState,
  WAIT_CONTROL,
  WAIT_LOG_APPENDED,
} from "../engine/shared_state.ts";
import { dedupeKset, type Extent } from "./dedupe.ts";
import { EpochCursor } from "../log/flush_epochs.ts";
import { liveRuns } from "./superseded.ts";
import { DEFER_POLL_MS, WritebackGate } from "./defer.ts";
import { gcWaitsForWriteback, gcWanted } from "../gc/gc.ts";

/** Backing writes in flight for one kset. */
export const WRITEBACK_QD = 16;
/** Retry delays after a backing error: from the first to the cap, doubling. */
export const RETRY_DELAY_MS_MIN = 100;
export const RETRY_DELAY_MS_MAX = 10_000;
/** Idle wait when there is nothing to write back (a new kset wakes us sooner). */
export const IDLE_WAIT_MS = 5_000;
/** Skippable bytes that justify closing an open kset early (Writeback.closeForSkips). */
export const CLOSE_FOR_SKIP_MIN_BYTES = 1024 * 1024;

interface PlannedWrite {
  e: Extent;
  off: number;
  len: number;
}

/**
 * Pause or resume writeback (test hook, and the `drain` control later). While paused, dirty data
 * stays in the cache, so GC finds nothing to reclaim and writers wait once the cache is full.
 */
export function setWritebackPaused(s: SharedState, paused: boolean): void {
  Atomics.store(s.ctl, CTL_WRITEBACK_PAUSED, paused ? 1 : 0);
  s.signal(WAIT_CONTROL);
}

export class Writeback {
  private retry_delay_ms = RETRY_DELAY_MS_MIN;
  private failing = false;
  private corrupt_reported = false;
  retries = 0;
  /** Open ksets this writeback closed early to leave out what their keys overwrote. */
  early_closes = 0;

  constructor(
    private readonly ctx: EngineContext,
    meta: CacheMeta,
  ) {
    // Generations change while we run: stale-ness is judged against the shared table.
    this.walk_meta = { n_segs: meta.n_segs, seg_ids: meta.seg_ids, seg_gens: ctx.s.seg_gens, data_crc: meta.data_crc };
    this.epochs = new EpochCursor(ctx.s);
    this.gate = new WritebackGate(ctx.s, { wanted: () => gcWanted(ctx), waitsForWriteback: () => gcWaitsForWriteback(ctx) });
  }

  private readonly walk_meta: WalkMeta;
  private readonly epochs: EpochCursor;
  private readonly gate: WritebackGate;

  /** Run until the engine stops. */
  async run(): Promise<void> {
    const s = this.ctx.s;
    while (Atomics.load(s.ctl, CTL_STOPPING) === 0) {
      if (Atomics.load(s.ctl, CTL_WRITEBACK_PAUSED) !== 0) {
        Atomics.store(s.ctl, CTL_WRITEBACK_DEFERRED, 0); // paused says more than deferred
        const seen = Atomics.load(s.waits, WAIT_CONTROL);
        if (Atomics.load(s.ctl, CTL_WRITEBACK_PAUSED) !== 0) await waitChangeAsync(s.waits, WAIT_CONTROL, seen, IDLE_WAIT_MS);
        continue;
      }
      const seen = Atomics.load(s.waits, WAIT_LOG_APPENDED);
      const seen_control = Atomics.load(s.waits, WAIT_CONTROL);
      const drains_seen = this.gate.drainsSeen();
      const at_head = this.atKeyHead();
      if (!at_head && this.gate.check(performance.now()) === "deferred") {
        await waitChangeAsync(s.waits, WAIT_CONTROL, seen_control, DEFER_POLL_MS);
        continue;
      }
      const outcome = at_head ? this.caughtUp() : await this.writeNext();
      if (outcome === "progress") continue;
      if (outcome === "error") {
        await waitChangeAsync(s.waits, WAIT_CONTROL, Atomics.load(s.waits, WAIT_CONTROL), this.retry_delay_ms);
        this.retry_delay_ms = Math.min(this.retry_delay_ms * 2, RETRY_DELAY_MS_MAX);
        continue;
      }
      this.gate.caughtUp(drains_seen);
      await waitChangeAsync(s.waits, WAIT_LOG_APPENDED, seen, IDLE_WAIT_MS);
    }
    Atomics.store(s.ctl, CTL_WRITEBACK_DEFERRED, 0);
  }

  /** Whether dirty_tail has caught up with key_head (nothing to write back). */
  private atKeyHead(): boolean {
    const s = this.ctx.s;
    lock(s.locks, LOCK_KEY_HEAD);
    const at_head = s.pos[POS_KEY_HEAD] === s.pos[POS_DIRTY_TAIL] && s.pos[POS_KEY_HEAD + 1] === s.pos[POS_DIRTY_TAIL + 1];
    unlock(s.locks, LOCK_KEY_HEAD);
    return at_head;
  }

  /** Write back one kset (or follow one LAST kset); "idle" when there is nothing to write back. */
  async step(): Promise<"progress" | "idle" | "error"> {
    return this.atKeyHead() ? this.caughtUp() : this.writeNext();
  }

  /** dirty_tail is at key_head: boundaries recorded elsewhere can no longer be met in order. */
  private caughtUp(): "idle" {
    const s = this.ctx.s;
    this.epochs.caughtUp(s.pos[POS_DIRTY_TAIL], s.pos[POS_DIRTY_TAIL + 1]);
    return "idle";
  }

  /** Write back the kset at dirty_tail, which is not at key_head. */
  private async writeNext(): Promise<"progress" | "error"> {
    const { s, media } = this.ctx;
    const dirty = { cache_seg_id: s.pos[POS_DIRTY_TAIL], seg_off: s.pos[POS_DIRTY_TAIL + 1] };
    const epoch = this.epochs.at(dirty.cache_seg_id, dirty.seg_off);
    const kset = readKsetAt(media.dom, this.walk_meta, dirty, { backing_size_bytes: media.backing_size_bytes, verify_data_crc: media.data_crc });
    if (kset.kind === "end") {
      // A closed kset between dirty_tail and key_head that does not parse: the log is damaged.
      if (!this.corrupt_reported) this.ctx.logger.error(`writeback stopped: ${kset.reason} at dirty_tail ${dirty.cache_seg_id}:${dirty.seg_off}`);
      this.corrupt_reported = true;
      Atomics.store(s.ctl, CTL_WRITEBACK_ERROR, 5);
      return "error";
    }
    if (kset.kind === "last") {
      this.advance({ cache_seg_id: kset.next_cache_seg_id, seg_off: 0 });
      return "progress";
    }
    try {
      const { written, skipped } = await this.writeExtents(kset, epoch);
      await this.ctx.backing.flush();
      s.addStat(this.ctx.slot, STAT_WRITEBACK_BYTES, written);
      s.addStat(this.ctx.slot, STAT_WRITEBACK_SKIPPED_BYTES, skipped);
    } catch (err) {
      this.noteFailure(err as Error);
      return "error";
    }
    this.noteRecovery();
    this.advance({ cache_seg_id: dirty.cache_seg_id, seg_off: dirty.seg_off + kset.size_bytes });
    s.addStat(this.ctx.slot, STAT_WRITEBACK_KSETS, 1);
    return "progress";
  }

  private async writeExtents(kset: DecodedKset & { kind: "normal" }, epoch: number): Promise<{ written: number; skipped: number }> {
    const bad = kset.keys.find((k) => k.crc_ok === false);
    if (bad !== undefined) throw new Error(`data CRC mismatch in dirty key off=${bad.off} len=${bad.len} (segment ${bad.cache_seg_id})`);
    const { segs } = this.ctx;
    const extents: Extent[] = [];
    for (const e of dedupeKset(kset.keys)) {
      if ((e.flags & KEY_F_CLEAN) !== 0) continue;
      // Dirty data cannot be reclaimed before writeback passes it: its generation must be current.
      if (e.seg_gen !== segs.gen(e.cache_seg_id)) fail(`dirty key off=${e.off} names a stale segment generation`);
      extents.push(e);
    }
    const held_back = new Map<number, number>();
    let plan = this.plan(extents, epoch, held_back);
    if (this.closeForSkips(held_back)) plan = this.plan(extents, epoch);
    const { writes, skipped } = plan;
    let written = 0;
    let next = 0;
    const worker = async () => {
      while (next < writes.length) {
        const w = writes[next++];
        await this.writeRun(w.e, w.off, w.len);
        written += w.len;
      }
    };
    await Promise.all(Array.from({ length: Math.min(WRITEBACK_QD, writes.length) }, worker));
    return { written, skipped };
  }

  /** The backing writes for a kset's dirty extents (sorted by offset, so they go out in backing order). */
  private plan(extents: Extent[], epoch: number, held_back?: Map<number, number>): { writes: PlannedWrite[]; skipped: number } {
    const { idx, segs, log } = this.ctx;
    const writes: PlannedWrite[] = [];
    let skipped = 0;
    for (const e of extents) {
      let live = 0;
      for (const r of liveRuns(idx, e, epoch, log, segs, held_back)) {
        writes.push({ e, off: r.off, len: r.len });
        live += r.len;
      }
      skipped += e.len - live;
    }
    return { writes, skipped };
  }

  /**
   * Close the open ksets whose later keys would let writeback skip at least
   * CLOSE_FOR_SKIP_MIN_BYTES of the kset it writes: on media, those keys stand in for the earlier
   * versions. A streaming writer's overwrites are often that recent when GC needs room (measured,
   * 9 s of 1 MiB writes: 1.8-2.6 GiB written back with this, 3.8-4.5 GiB without it). Small
   * savings do not pay for a kset closed early: more, smaller ksets, each a backing flush. A close
   * that finds no free segment just leaves the kset open. True when any kset closed.
   */
  private closeForSkips(held_back: Map<number, number>): boolean {
    const { log } = this.ctx;
    let closed = false;
    for (const [kset_id, bytes] of held_back) {
      if (bytes < CLOSE_FOR_SKIP_MIN_BYTES) continue;
      const before = log.closes(kset_id);
      log.tryClose(kset_id);
      if (log.closes(kset_id) !== before) {
        closed = true;
        this.early_closes++;
      }
    }
    return closed;
  }

  /** Write [off, off + len) of extent e from its cached data. */
  private async writeRun(e: Extent, off: number, len: number): Promise<void> {
    const { media, backing } = this.ctx;
    const data = media.dom.view(media.dataOff(e.cache_seg_id, e.seg_off + (off - e.off)), len);
    if (isAllZero(data)) await backing.writeZeroes(off, len);
    else await backing.write(off, data);
  }

  private advance(pos: { cache_seg_id: number; seg_off: number }): void {
    advanceTail(this.ctx, "dirty_tail", pos);
  }


  private noteFailure(err: Error): void {
    const s = this.ctx.s;
    this.retries++;
    s.addStat(this.ctx.slot, STAT_ERR_BACKING_WRITE, 1);
    Atomics.store(s.ctl, CTL_WRITEBACK_ERROR, (err as { errno?: number }).errno ?? 5);
    if (!this.failing) this.ctx.logger.error(`writeback: backing device errors began (${err.message}); dirty_tail stays, retrying`);
    this.failing = true;
  }

  private noteRecovery(): void {
    this.retry_delay_ms = RETRY_DELAY_MS_MIN;
    if (!this.failing) return;
    this.failing = false;
    Atomics.store(this.ctx.s.ctl, CTL_WRITEBACK_ERROR, 0);
    this.ctx.logger.info(`writeback: backing device errors ended after ${this.retries} retries`);
  }
}
