/**
 * Writeback deferral (core/writeback/defer.ts): while clients keep requests in flight (pipelined)
 * and GC can make room without writeback, dirty data waits; it goes to the backing device once no
 * request was pipelined for a while, once it has waited defer_ms, once GC waits for it (gc_percent
 * reached and the data already written back reclaimed, or a writer waiting for space), or when a
 * drain asks. First the gate's rules one by one, then when GC waits for writeback and the
 * writeback loop over a real engine (the NBD server's pipelined count is bumped by hand there;
 * test/control.test.ts drives the binary with fio).
 */
import { describe, expect, test } from "bun:test";
import { MemoryBacking } from "../core/device/memory_backing.ts";
import {
  CTL_CACHE_FULL,
  CTL_GC_PERCENT,
  CTL_SEGS_USED,
  CTL_WRITEBACK_DEFERRED,
  LOCK_DIRTY_TAIL,
  LOCK_KEY_TAIL,
  POS_DIRTY_TAIL,
  POS_KEY_TAIL,
  SharedState,
  STAT_PIPELINED_REQUESTS,
  STAT_WRITEBACK_BYTES,
  WAIT_CONTROL,
} from "../core/engine/shared_state.ts";
import { forceWriteback, PIPELINED_WINDOW_MS, setDeferMs, WritebackGate } from "../core/writeback/defer.ts";
import { atGcPercent } from "../core/gc/gc_percent.ts";
import { gcWaitsForWriteback } from "../core/gc/gc.ts";
import { posEqual } from "../core/log/position.ts";
import { readPos } from "../core/engine/tails.ts";
import { closeWithLoops, freshCache, openHarness, pattern, startLoops } from "./helpers/engine_harness.ts";

const N_SEGS = 100;

function state(defer_ms: number): SharedState {
  const s = SharedState.create({ n_segs: N_SEGS, n_ksets: 1, n_heads: 2, n_stat_slots: 5 });
  s.ctl[CTL_GC_PERCENT] = 70;
  setDeferMs(s, defer_ms);
  return s;
}

const NO_GC = { wanted: () => false, waitsForWriteback: () => false };

/** An engine whose writeback defers for up to a minute. */
function deferringHarness(): ReturnType<typeof openHarness> {
  return openHarness(freshCache(), new MemoryBacking(64 * 2 ** 20), { writeback_defer_ms: 60_000 });
}

/** Request worker `slot` publishes one more pipelined request. */
function request(s: SharedState, slot = 0): void {
  s.addStat(slot, STAT_PIPELINED_REQUESTS, 1);
}

describe("the writeback gate", () => {
  test("defer 0 is the kernel's behaviour: writeback runs whatever the clients do", () => {
    const s = state(0);
    const g = new WritebackGate(s, NO_GC);
    for (let t = 0; t < 1000; t += 10) {
      request(s);
      expect(g.check(t)).toBe("off");
    }
    expect(s.ctl[CTL_WRITEBACK_DEFERRED]).toBe(0);
  });

  test("runs at start; pipelined requests on any worker defer it; PIPELINED_WINDOW_MS without one ends the wait", () => {
    const s = state(30_000);
    const g = new WritebackGate(s, NO_GC);
    expect(g.check(0)).toBe("unqueued");
    request(s, 1);
    expect(g.check(10)).toBe("deferred");
    expect(s.ctl[CTL_WRITEBACK_DEFERRED]).toBe(1);
    request(s, 0);
    const last = 10 + PIPELINED_WINDOW_MS - 1;
    expect(g.check(last)).toBe("deferred");
    expect(g.check(last + PIPELINED_WINDOW_MS - 1)).toBe("deferred");
    expect(g.check(last + PIPELINED_WINDOW_MS)).toBe("unqueued");
    expect(s.ctl[CTL_WRITEBACK_DEFERRED]).toBe(0);
  });

  test("dirty data waits at most defer_ms, then writeback runs until it catches up; the next wait starts then", () => {
    const s = state(1_000);
    const g = new WritebackGate(s, NO_GC);
    g.check(0);
    let t = 0;
    for (; t < 1_000; t += 20) {
      request(s);
      expect(g.check(t)).toBe("deferred");
    }
    for (; t < 3_000; t += 20) {
      request(s);
      expect(g.check(t)).toBe("age"); // still busy, but the backlog is written out
    }
    g.caughtUp(g.drainsSeen());
    request(s);
    expect(g.check(t)).toBe("deferred");
    request(s);
    expect(g.check(t + 999)).toBe("deferred");
    request(s);
    expect(g.check(t + 1_000)).toBe("age");
  });

  test("GC wanting to reclaim: writeback runs once GC has nothing left without it, then until GC stops wanting", () => {
    const s = state(30_000);
    const gc = { wanted: false, waits: false };
    const g = new WritebackGate(s, { wanted: () => gc.wanted, waitsForWriteback: () => gc.waits });
    g.check(0);
    request(s);
    expect(g.check(1)).toBe("deferred");
    gc.wanted = true; // data already written back is left to reclaim: dirty data goes on waiting
    request(s);
    expect(g.check(2)).toBe("deferred");
    gc.waits = true;
    request(s);
    expect(g.check(3)).toBe("gc");
    gc.waits = false; // GC reclaims what writeback passed: writeback keeps going meanwhile
    request(s);
    expect(g.check(4)).toBe("gc");
    gc.wanted = false;
    request(s);
    expect(g.check(5)).toBe("deferred");
    gc.wanted = true; // a new round starts only once GC waits again
    request(s);
    expect(g.check(6)).toBe("deferred");
  });

  test("gc_percent uses the kernel's integer math, the same for GC, the wedge monitor and the gate; gc_percent 0 always holds", () => {
    const s = SharedState.create({ n_segs: 255, n_ksets: 1, n_heads: 1, n_stat_slots: 4 });
    s.ctl[CTL_GC_PERCENT] = 70; // 255 * 70 / 100 = 178.5: GC starts at 178 used
    s.ctl[CTL_SEGS_USED] = 177;
    expect(atGcPercent(s)).toBe(false);
    s.ctl[CTL_SEGS_USED] = 178;
    expect(atGcPercent(s)).toBe(true);
    s.ctl[CTL_GC_PERCENT] = 0;
    s.ctl[CTL_SEGS_USED] = 0;
    expect(atGcPercent(s)).toBe(true);
  });

  test("a drain forces writeback until it catches up; a drain counted after writeback's look stays forced", () => {
    const s = state(30_000);
    const g = new WritebackGate(s, NO_GC);
    g.check(0);
    request(s);
    expect(g.check(1)).toBe("deferred");
    forceWriteback(s);
    request(s);
    expect(g.check(2)).toBe("drain");
    // Writeback looks (sees one drain), a second drain closes more ksets and counts itself, then
    // writeback reports the look's result: the second drain must stay in force.
    const seen = g.drainsSeen();
    forceWriteback(s);
    g.caughtUp(seen);
    request(s);
    expect(g.check(3)).toBe("drain");
    g.caughtUp(g.drainsSeen());
    request(s);
    expect(g.check(4)).toBe("deferred");
  });
});

describe("when GC waits for writeback", () => {
  test("data already written back is reclaimed first; GC waits once key_tail reaches dirty_tail", async () => {
    const h = deferringHarness();
    const ctx = h.engine.ctx;
    const s = ctx.s;
    const tailsMeet = () => posEqual(readPos(s, LOCK_KEY_TAIL, POS_KEY_TAIL), readPos(s, LOCK_DIRTY_TAIL, POS_DIRTY_TAIL));
    try {
      await h.engine.write(0, pattern(256 * 1024, 1), false);
      await h.engine.flush();
      while ((await h.writeback.step()) === "progress");
      await h.engine.write(2 ** 20, pattern(256 * 1024, 2), false);
      await h.engine.flush();
      s.ctl[CTL_GC_PERCENT] = 1;
      expect(atGcPercent(s)).toBe(true);
      expect(tailsMeet()).toBe(false);
      expect(gcWaitsForWriteback(ctx)).toBe(false); // clean data left to reclaim
      expect(h.gc.collect()).toBeGreaterThan(0);
      expect(tailsMeet()).toBe(true);
      expect(gcWaitsForWriteback(ctx)).toBe(true);
      // Data written back again: GC has work without writeback, unless it cannot wait.
      while ((await h.writeback.step()) === "progress");
      expect(gcWaitsForWriteback(ctx)).toBe(false);
      s.ctl[CTL_GC_PERCENT] = 0;
      expect(gcWaitsForWriteback(ctx)).toBe(true);
      s.ctl[CTL_GC_PERCENT] = 70;
      s.ctl[CTL_CACHE_FULL] = 1;
      expect(gcWaitsForWriteback(ctx)).toBe(true);
      s.ctl[CTL_CACHE_FULL] = 0;
    } finally {
      ctx.log.stopTimers();
    }
  });
});

describe("the writeback loop with deferral", () => {
  const BLOCK = 4096;

  async function busyWrites(h: ReturnType<typeof openHarness>, ms: number, seed: number, during?: () => void): Promise<number> {
    const t0 = performance.now();
    let n = 0;
    while (performance.now() - t0 < ms) {
      // Whole ksets close (flushes), so there is always dirty data waiting in the log.
      await h.engine.write((n % 256) * BLOCK, pattern(BLOCK, seed + n), false);
      h.engine.ctx.s.addStat(0, STAT_PIPELINED_REQUESTS, 1); // what the NBD server publishes
      if (n % 16 === 15) await h.engine.flush();
      n++;
      during?.();
      await Bun.sleep(1);
    }
    await h.engine.flush();
    return n;
  }

  test("pipelined: nothing reaches the backing device and status says deferred; then it all goes", async () => {
    const h = deferringHarness();
    const s = h.engine.ctx.s;
    const loops = startLoops(h.writeback, h.gc);
    try {
      let deferred_seen = 0;
      const n = await busyWrites(h, 600, 1, () => (deferred_seen += s.ctl[CTL_WRITEBACK_DEFERRED]));
      expect(n).toBeGreaterThan(50);
      expect(deferred_seen).toBeGreaterThan(0);
      expect(s.statTotal(STAT_WRITEBACK_BYTES)).toBe(0);
      expect(h.backing.bytes.subarray(0, 256 * BLOCK).every((b) => b === 0)).toBe(true);
      // No more pipelined requests: soon the backing device holds the last version of every block.
      const deadline = performance.now() + 20 * PIPELINED_WINDOW_MS;
      const last = (i: number) => pattern(BLOCK, 1 + i + 256 * Math.floor((n - 1 - i) / 256));
      while (performance.now() < deadline && !h.backing.bytes.subarray(0, BLOCK).every((b, j) => b === last(0)[j])) await Bun.sleep(10);
      for (let i = 0; i < Math.min(n, 256); i++) expect(h.backing.bytes.subarray(i * BLOCK, (i + 1) * BLOCK)).toEqual(last(i));
      expect(s.ctl[CTL_WRITEBACK_DEFERRED]).toBe(0);
    } finally {
      await closeWithLoops(h.engine, loops);
    }
  });

  test("a drain writes back while the clients stay busy", async () => {
    const h = deferringHarness();
    const s = h.engine.ctx.s;
    const loops = startLoops(h.writeback, h.gc);
    try {
      await busyWrites(h, 300, 7);
      expect(s.statTotal(STAT_WRITEBACK_BYTES)).toBe(0);
      forceWriteback(s);
      s.signal(WAIT_CONTROL);
      let written = 0;
      await busyWrites(h, 600, 9, () => (written = s.statTotal(STAT_WRITEBACK_BYTES)));
      expect(written).toBeGreaterThan(0);
    } finally {
      await closeWithLoops(h.engine, loops);
    }
  });
});
