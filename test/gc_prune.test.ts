/**
 * GC's prune sweeps: they run only after segments were freed and while the index node pool is
 * more than half used, and then they give nodes of stale keys back to the pool.
 */
import { expect, test } from "bun:test";
import { MemoryBacking } from "../core/device/memory_backing.ts";
import { MiB } from "../core/format/constants.ts";
import { PRUNE_BELOW_FREE_FRACTION } from "../core/gc/gc.ts";
import { drainWriteback, freshCache, openHarness, pattern } from "./helpers/engine_harness.ts";

const BACKING = 256 * MiB;

test("stale keys are pruned once segments were freed and the node pool is busy", async () => {
  const nodes_max = 24_000;
  const h = openHarness(freshCache({ gc_percent: 0 }), new MemoryBacking(BACKING), { nodes_max });
  // 20 000 separate 4 KiB keys (every other block, so none merge).
  for (let i = 0; i < 20_000; i++) await h.engine.write(i * 8192, pattern(4096, i), false);
  await h.engine.flush();
  const free_before = h.engine.ctx.idx.nodesFree();
  expect(free_before).toBeLessThan(nodes_max * PRUNE_BELOW_FREE_FRACTION);
  // Nothing freed yet: no sweep, however busy the pool.
  expect(h.gc.prune()).toBe(0);
  await drainWriteback(h);
  h.gc.collect(); // gc_percent 0: reclaims every written-back kset and frees their segments
  let removed = 0;
  for (let pass = 0; pass < 1000; pass++) {
    const r = h.gc.prune();
    removed += r;
    if (r === 0 && pass > 0) break;
  }
  // Sweeps go on until at least half the pool is free again, and no further.
  expect(h.engine.ctx.idx.nodesFree()).toBeGreaterThanOrEqual(nodes_max * PRUNE_BELOW_FREE_FRACTION);
  expect(h.engine.ctx.idx.nodesFree()).toBe(free_before + removed);
  expect(removed).toBeLessThan(20_000);
  // The data is still right: stale keys are gone, reads go to the backing device.
  const got = new Uint8Array(4096);
  await h.engine.read(5 * 8192, 4096, got);
  expect(Buffer.compare(got, pattern(4096, 5))).toBe(0);
  h.engine.ctx.log.stopTimers();
}, 60_000);

test("with a mostly free pool, prune leaves stale keys for lookups to drop", async () => {
  const h = openHarness(freshCache({ gc_percent: 0 }), new MemoryBacking(BACKING));
  for (let i = 0; i < 2_000; i++) await h.engine.write(i * 8192, pattern(4096, i), false);
  await h.engine.flush();
  await drainWriteback(h);
  h.gc.collect();
  expect(h.gc.prune()).toBe(0);
  const got = new Uint8Array(4096);
  await h.engine.read(7 * 8192, 4096, got);
  expect(Buffer.compare(got, pattern(4096, 7))).toBe(0);
  h.engine.ctx.log.stopTimers();
}, 60_000);
