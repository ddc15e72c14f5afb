/**
 * The main thread's once-a-second look at the shared state: it logs state changes (one line when
 * a state begins, one when it ends, never one per request) and keeps the samples behind the
 * writeback rate.
 *
 * States watched here (writeback logs its own backing errors, GC its own stop):
 *  - cache full: CTL_CACHE_FULL set, i.e. a request found no free segment and waits for GC;
 *  - GC wedged: GC wants to run (used segments at gc_percent, or the cache full) but has
 *    reclaimed everything written back (key_tail == dirty_tail), while dirty data is waiting
 *    (dirty_tail != key_head) and dirty_tail has not moved for WEDGE_AFTER_MS: GC cannot free
 *    anything until writeback moves again.
 * A state that begins and ends between two looks is not seen; the counters still record it.
 */
import type { EngineContext } from "../engine/context.ts";
import {
  CTL_CACHE_FULL,
  CTL_GC_PERCENT,
  CTL_WRITEBACK_ERROR,
  CTL_WRITEBACK_PAUSED,
  STAT_WRITEBACK_BYTES,
  STAT_WRITEBACK_SKIPPED_BYTES,
} from "../engine/shared_state.ts";
import { type CachePos, posEqual, posToString } from "../log/position.ts";
import { errnoName } from "../../ffi/libc.ts";
import { logPositions } from "./dirty.ts";
import { atGcPercent } from "../gc/gc_percent.ts";

export const MONITOR_PERIOD_MS = 1_000;
/** The writeback rate is measured over this many periods. */
export const RATE_WINDOW_SAMPLES = 10;
/** dirty_tail standing still this long (with GC waiting on it) counts as wedged. */
export const WEDGE_AFTER_MS = 5_000;

interface Sample {
  t_ms: number;
  writeback_bytes: number;
}

export class StateMonitor {
  private readonly samples: Sample[] = [];
  private timer: ReturnType<typeof setInterval> | undefined;
  private cache_full_since_ms: number | null = null;
  private wedged = false;
  private dirty_tail: CachePos | null = null;
  private dirty_tail_moved_ms = 0;

  constructor(
    private readonly ctx: EngineContext,
    private readonly log: { info(m: string): void; warn(m: string): void },
  ) {}

  start(): void {
    this.tick(performance.now());
    this.timer = setInterval(() => this.tick(performance.now()), MONITOR_PERIOD_MS);
    this.timer.unref?.();
  }

  stop(): void {
    clearInterval(this.timer);
  }

  get gc_wedged(): boolean {
    return this.wedged;
  }

  /** Bytes written back per second over the last RATE_WINDOW_SAMPLES periods (0 until two samples). */
  writebackRate(): number {
    if (this.samples.length < 2) return 0;
    const a = this.samples[0];
    const b = this.samples[this.samples.length - 1];
    const dt_s = (b.t_ms - a.t_ms) / 1000;
    return dt_s > 0 ? (b.writeback_bytes - a.writeback_bytes) / dt_s : 0;
  }

  tick(now_ms: number): void {
    const s = this.ctx.s;
    // Skipped bytes leave the dirty log as surely as written ones: both count as progress.
    this.samples.push({ t_ms: now_ms, writeback_bytes: s.statTotal(STAT_WRITEBACK_BYTES) + s.statTotal(STAT_WRITEBACK_SKIPPED_BYTES) });
    if (this.samples.length > RATE_WINDOW_SAMPLES + 1) this.samples.shift();
    const full = Atomics.load(s.ctl, CTL_CACHE_FULL) !== 0;
    this.watchCacheFull(full, now_ms);
    try {
      this.watchWedge(full, now_ms);
    } catch {
      // A position lock stayed held (a failed worker): the supervisor handles that; look again next tick.
    }
  }

  private usage(): string {
    const segs = this.ctx.segs;
    return `${segs.used()} of ${segs.n_segs} segments used, gc_percent ${Atomics.load(this.ctx.s.ctl, CTL_GC_PERCENT)}`;
  }

  private watchCacheFull(full: boolean, now_ms: number): void {
    if (full && this.cache_full_since_ms === null) {
      this.cache_full_since_ms = now_ms;
      this.log.warn(`cache full began: requests wait for GC to free a segment (${this.usage()})`);
    } else if (!full && this.cache_full_since_ms !== null) {
      const s = ((now_ms - this.cache_full_since_ms) / 1000).toFixed(1);
      this.cache_full_since_ms = null;
      this.log.info(`cache full ended after about ${s} s`);
    }
  }

  private watchWedge(full: boolean, now_ms: number): void {
    const p = logPositions(this.ctx);
    // Stuck time counts from the last move, or from when there was nothing to write back.
    if (this.dirty_tail === null || !posEqual(this.dirty_tail, p.dirty_tail) || posEqual(p.dirty_tail, p.key_head)) {
      this.dirty_tail = p.dirty_tail;
      this.dirty_tail_moved_ms = now_ms;
    }
    const over = full || atGcPercent(this.ctx.s);
    const stuck = now_ms - this.dirty_tail_moved_ms >= WEDGE_AFTER_MS;
    const wedged = over && stuck && posEqual(p.key_tail, p.dirty_tail);
    if (wedged && !this.wedged) {
      this.log.warn(
        `GC wedged: ${this.usage()}, and everything written back is reclaimed; GC waits for writeback, stuck at dirty_tail ${posToString(p.dirty_tail)} (${this.writebackWhy()})`,
      );
    } else if (!wedged && this.wedged) {
      this.log.info("GC no longer wedged: writeback moved dirty_tail or the cache is below gc_percent");
    }
    this.wedged = wedged;
  }

  /** Why writeback is not moving, as far as the shared state tells. */
  writebackWhy(): string {
    const s = this.ctx.s;
    const errno = Atomics.load(s.ctl, CTL_WRITEBACK_ERROR);
    if (errno !== 0) return `backing write errors, errno ${errno} ${errnoName(errno)}`;
    if (Atomics.load(s.ctl, CTL_WRITEBACK_PAUSED) !== 0) return "writeback is paused";
    return "no error reported: a slow backing device?";
  }
}
