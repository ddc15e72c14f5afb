/**
 * When writeback may start the next kset. The kernel writes back as soon as a kset closes. On a
 * machine with few cores that takes CPU and disk time from clients that keep queues of requests
 * in flight, the ones whose speed is the server's CPU; so by default `serve` lets dirty data
 * wait while such clients are busy and the cache has room, as dm-writecache waits for its high
 * watermark and the page cache for dirty_expire.
 *
 * Writeback runs when any of these holds:
 *   - deferral is off (defer_ms 0: the kernel's behaviour, and the engine's default);
 *   - a drain asked for it (`pcache drain`); it stays on until writeback catches up;
 *   - GC wants to reclaim (gc_percent of the cache used, a writer waiting for a segment, or index
 *     nodes running low) and has nothing left to reclaim without writeback (data already written
 *     back goes first: core/gc/gc.ts gcWaitsForWriteback); from then on, while GC wants to
 *     reclaim, writeback runs as the kernel's does (starting and stopping at each kset would
 *     leave writeback idle while GC catches up, and a long burst filled the cache: measured);
 *   - no request began pipelined (while another was in flight on its request worker, or with the
 *     client's next request already received) for PIPELINED_WINDOW_MS.
 *     A client that sends one request at a time waits for each reply, so the CPU has room for
 *     writeback between its requests (and on a VM, writeback keeping the CPUs awake makes those
 *     round trips faster: measured, write+flush pairs at QD1 ran at half speed when deferred);
 *   - dirty data has waited defer_ms since writeback last caught up with key_head.
 *
 * Deferral changes only when the backing device is written, never what: dirty data is already
 * persistent in the cache, and writeback still goes in log order with the same guarantees. Data
 * that waits is more likely to be overwritten within its flush epoch and never written back at
 * all (./superseded.ts). Once dirty data has waited defer_ms, writeback runs until it catches
 * up, so nothing waits much longer than that plus the time to write the backlog.
 */
import {
  CTL_WRITEBACK_DEFER_MS,
  CTL_WRITEBACK_DEFERRED,
  CTL_WRITEBACK_FORCE,
  type SharedState,
  STAT_PIPELINED_REQUESTS,
} from "../engine/shared_state.ts";
import { assert } from "../assert.ts";

/**
 * No pipelined request for this long ends the wait. Request workers publish their count every
 * 100 ms, so this spans a few publications.
 */
export const PIPELINED_WINDOW_MS = 300;
/** How often a deferring writeback looks again (a drain wakes it at once). */
export const DEFER_POLL_MS = 20;
/** `serve`'s default (the page cache's dirty_expire) and the bound of --writeback-defer-ms. */
export const DEFER_MS_DEFAULT = 30_000;
export const DEFER_MS_MAX = 3_600_000;

/** Publish the longest wait (main thread, before the writeback worker starts); 0 turns deferral off. */
export function setDeferMs(s: SharedState, defer_ms: number): void {
  assert(Number.isInteger(defer_ms) && defer_ms >= 0 && defer_ms <= DEFER_MS_MAX, `writeback defer ${defer_ms} ms out of range`);
  Atomics.store(s.ctl, CTL_WRITEBACK_DEFER_MS, defer_ms);
}

/** Why writeback runs now, or "deferred". */
export type GateVerdict = "off" | "drain" | "gc" | "unqueued" | "age" | "deferred";

/** What the gate asks of GC (core/gc/gc.ts). */
export interface GcView {
  /** GC wants to reclaim (gcWanted). */
  wanted(): boolean;
  /** GC has nothing left to reclaim without writeback, or cannot wait (gcWaitsForWriteback). */
  waitsForWriteback(): boolean;
}

export class WritebackGate {
  /** Pipelined requests at the last look; a change since then counts as one at this look. */
  private pipelined: number;
  /** When a pipelined request was last seen; start-up counts as long ago. */
  private pipelined_ms = -Infinity;
  /** Since when dirty data has waited (null: writeback is caught up). */
  private dirty_since_ms: number | null = null;
  /** Writeback runs for GC, until GC no longer wants to reclaim. */
  private for_gc = false;

  constructor(
    private readonly s: SharedState,
    private readonly gc: GcView,
  ) {
    this.pipelined = this.pipelinedRequests();
  }

  /** Call with dirty data at dirty_tail; says whether writeback may start on it now. */
  check(now_ms: number): GateVerdict {
    this.notePipelined(now_ms);
    if (this.dirty_since_ms === null) this.dirty_since_ms = now_ms;
    const verdict = this.verdict(now_ms, this.dirty_since_ms);
    Atomics.store(this.s.ctl, CTL_WRITEBACK_DEFERRED, verdict === "deferred" ? 1 : 0);
    return verdict;
  }

  /** Drains asked for so far; read before looking at key_head, pass to caughtUp(). */
  drainsSeen(): number {
    return Atomics.load(this.s.ctl, CTL_WRITEBACK_FORCE);
  }

  /**
   * Writeback found dirty_tail at key_head: the next dirty data starts a new wait, and the
   * drains seen before that look are done. A drain counted after it closed its ksets, so one
   * counted after our look may have data still dirty: the exchange fails and writeback stays
   * forced until it catches up again.
   */
  caughtUp(drains_seen: number): void {
    this.dirty_since_ms = null;
    Atomics.compareExchange(this.s.ctl, CTL_WRITEBACK_FORCE, drains_seen, 0);
    Atomics.store(this.s.ctl, CTL_WRITEBACK_DEFERRED, 0);
  }

  private verdict(now_ms: number, dirty_since_ms: number): GateVerdict {
    const s = this.s;
    const defer_ms = Atomics.load(s.ctl, CTL_WRITEBACK_DEFER_MS);
    if (defer_ms === 0) return "off";
    if (Atomics.load(s.ctl, CTL_WRITEBACK_FORCE) !== 0) return "drain";
    if (!this.gc.wanted()) this.for_gc = false;
    else if (this.for_gc || this.gc.waitsForWriteback()) {
      this.for_gc = true;
      return "gc";
    }
    if (now_ms - this.pipelined_ms >= PIPELINED_WINDOW_MS) return "unqueued";
    if (now_ms - dirty_since_ms >= defer_ms) return "age";
    return "deferred";
  }

  private notePipelined(now_ms: number): void {
    const total = this.pipelinedRequests();
    if (total !== this.pipelined) this.pipelined_ms = now_ms;
    this.pipelined = total;
  }

  /** Over the request workers' slots (each written only by its own thread). */
  private pipelinedRequests(): number {
    let total = 0;
    for (let slot = 0; slot < this.s.layout.n_heads; slot++) total += this.s.statOf(slot, STAT_PIPELINED_REQUESTS);
    return total;
  }
}

/**
 * Ask writeback to run now regardless of deferral, until it catches up (drain). Call after the
 * ksets to drain are closed, then signal WAIT_CONTROL to wake a deferring writeback.
 */
export function forceWriteback(s: SharedState): void {
  Atomics.add(s.ctl, CTL_WRITEBACK_FORCE, 1);
}
