/**
 * Model-based random test of the engine at scale: per seed, tens of thousands of random writes
 * (unaligned, 1 B to 1.5 MiB, some across 4 MiB boundaries; segment ends come with the volume),
 * reads, flushes, FUA writes, trims, write-zeroes, writeback and GC steps and restarts (replay),
 * every read checked byte for byte against a plain in-memory copy of the device.
 *
 * The cache is the smallest the format allows (512 MiB) and about 2 GiB are written per seed, so
 * the log wraps, GC frees segments and writes wait for space. Writeback runs only when the test
 * says so, and is sometimes held back for a while: a write that then finds the cache full waits,
 * and drive() runs writeback and GC (as the writeback and GC workers would) until it completes.
 * The end of each seed asserts from the engine's statistics that those paths were taken.
 *
 * Longer soaks: PCACHE_MODEL_OPS=N (operations per seed, default 25 000) and
 * PCACHE_MODEL_SEEDS=N (seeds 1..N, default 4).
 */
import { describe, expect, test } from "bun:test";
import { MemoryBacking } from "../core/device/memory_backing.ts";
import { BackingIoError } from "../core/errors.ts";
import type { EngineOpenOptions } from "../core/engine/engine.ts";
import { STAT_DEFERRED, STAT_GC_SEGS_FREED, STAT_WRITEBACK_KSETS } from "../core/engine/shared_state.ts";
import { KiB, MiB, SEG_DATA_SIZE, SUBTREE_SPAN } from "../core/format/constants.ts";
import { makeRng } from "../core/persist/sim.ts";
import { drainWriteback, freshCache, type Harness, openHarness } from "./helpers/engine_harness.ts";

const OPS_DEFAULT = 25_000;
const SEEDS_DEFAULT = 4;

function envCount(name: string, fallback: number, max: number): number {
  const raw = process.env[name];
  if (raw === undefined || raw === "") return fallback;
  const n = Number(raw);
  if (!Number.isSafeInteger(n) || n < 1 || n > max) throw new Error(`${name} must be an integer from 1 to ${max}, got "${raw}"`);
  return n;
}

const OPS_PER_SEED = envCount("PCACHE_MODEL_OPS", OPS_DEFAULT, 100_000_000);
const SEEDS = envCount("PCACHE_MODEL_SEEDS", SEEDS_DEFAULT, 10_000);

const BACKING_BYTES = 128 * MiB;
/** Random bytes that write payloads are cut from (at random offsets, so every write differs). */
const POOL_BYTES = 16 * MiB;
/** Bound on drive()'s rounds of writeback + GC for one operation. */
const DRIVE_ROUNDS_MAX = 1_000_000;
/** Statistics summed over every engine of a seed (each restart starts from zero). */
const TOTALS = [STAT_GC_SEGS_FREED, STAT_DEFERRED, STAT_WRITEBACK_KSETS] as const;

function randomPool(seed: number): Uint8Array {
  const rng = makeRng(seed ^ 0x51ed);
  const words = new Uint32Array(POOL_BYTES / 4);
  for (let i = 0; i < words.length; i++) words[i] = Math.floor(rng() * 0x1_0000_0000);
  return new Uint8Array(words.buffer);
}

/**
 * MemoryBacking without its crash bookkeeping (a copy of every range a write replaces), which
 * this test never uses and which would cost a third of its time.
 */
class PlainBacking extends MemoryBacking {
  private checkRange(off: number, len: number): void {
    if (!Number.isSafeInteger(off) || !Number.isSafeInteger(len) || off < 0 || len < 0 || off + len > this.size_bytes) {
      throw new BackingIoError(`${this.name}: range ${off}+${len} outside the device (${this.size_bytes} bytes)`, 22);
    }
  }

  override async write(off: number, src: Uint8Array): Promise<void> {
    this.checkRange(off, src.length);
    await Promise.resolve();
    this.bytes.set(src, off);
  }

  override async writeZeroes(off: number, len: number): Promise<void> {
    this.checkRange(off, len);
    await Promise.resolve();
    this.bytes.fill(0, off, off + len);
  }
}

/** Resolves after one macrotask turn: whatever can finish without waiting has finished. */
function turn(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}

class ModelRun {
  private readonly rng: () => number;
  /** drive()'s own choices, so the op sequence of a seed does not depend on timing. */
  private readonly drive_rng: () => number;
  private readonly model = new Uint8Array(BACKING_BYTES);
  private readonly backing = new PlainBacking(BACKING_BYTES);
  private readonly pool: Uint8Array;
  private readonly scratch = new Uint8Array(16 * MiB);
  private readonly open_opts: EngineOpenOptions;
  private readonly cache_data_bytes: number;
  readonly n_segs: number;
  private h: Harness;
  private op = 0;
  private ops = 0;
  /** While > 0, the test's own writeback steps are skipped (drive() still runs writeback). */
  private hold_writeback_bytes = 0;
  readonly totals = new Map<number, number>(TOTALS.map((s) => [s, 0]));
  restarts = 0;
  drive_rounds = 0;

  constructor(readonly seed: number) {
    this.rng = makeRng(seed);
    this.drive_rng = makeRng(seed ^ 0xd71e);
    this.pool = randomPool(seed);
    const gc_percent = [10, 35, 70, 20][(seed - 1) % 4];
    this.open_opts = { n_ksets: 1 + (seed % 3), limits: { space_wait_ms: 120_000 } };
    this.h = openHarness(freshCache({ seed, gc_percent, data_crc: seed % 4 === 3 }), this.backing, this.open_opts);
    this.n_segs = this.h.engine.meta.n_segs;
    this.cache_data_bytes = this.n_segs * SEG_DATA_SIZE;
  }

  private where(): string {
    return `seed ${this.seed} ${this.op < this.ops ? `op ${this.op}` : "final checks"}`;
  }

  fail(what: string, cause?: unknown): never {
    throw new Error(`${this.where()}: ${what}`, { cause });
  }

  async run(ops: number): Promise<void> {
    this.ops = ops;
    try {
      for (this.op = 0; this.op < ops; this.op++) await this.step();
      await this.finish();
    } catch (err) {
      const msg = (err as Error).message;
      if (msg.startsWith(`seed ${this.seed} `)) throw err;
      this.fail(`${(err as Error).name}: ${msg}`, err);
    } finally {
      this.h.engine.ctx.log.stopTimers();
    }
  }

  private async step(): Promise<void> {
    const r = this.rng();
    if (r < 0.4) return this.write();
    if (r < 0.44) return this.zero("write-zeroes");
    if (r < 0.47) return this.zero("trim");
    if (r < 0.8) return this.read();
    if (r < 0.83) return this.drive(this.h.engine.flush());
    if (r < 0.93) return this.writebackSteps();
    if (r < 0.9996) return this.gcSteps();
    return this.restart();
  }

  /** A random extent: mostly small, some large; 15% straddle a 4 MiB boundary. */
  private extent(big_bytes_max: number): [number, number] {
    const u = this.rng();
    let len: number;
    if (u < 0.5) len = 1 + Math.floor(this.rng() * 8 * KiB);
    else if (u < 0.8) len = 8 * KiB + Math.floor(this.rng() * 248 * KiB);
    else if (u < 0.95) len = 256 * KiB + Math.floor(this.rng() * (1280 * KiB));
    else len = 1 + Math.floor(this.rng() * big_bytes_max);
    if (this.rng() < 0.15) {
      const boundary = SUBTREE_SPAN * (1 + Math.floor(this.rng() * (BACKING_BYTES / SUBTREE_SPAN - 1)));
      const before = Math.min(boundary, 1 + Math.floor(this.rng() * Math.max(1, len - 1)));
      return [boundary - before, Math.min(len, BACKING_BYTES - (boundary - before))];
    }
    return [Math.floor(this.rng() * (BACKING_BYTES - len + 1)), len];
  }

  private async write(): Promise<void> {
    const [off, len] = this.extent(1536 * KiB);
    const at = Math.floor(this.rng() * (POOL_BYTES - len));
    const data = this.pool.subarray(at, at + len);
    await this.drive(this.h.engine.write(off, data, this.rng() < 0.1));
    this.model.set(data, off);
    this.hold_writeback_bytes -= len;
  }

  private async zero(kind: "write-zeroes" | "trim"): Promise<void> {
    const [off, len] = this.extent(9 * MiB);
    const fua = this.rng() < 0.2;
    const e = this.h.engine;
    await this.drive(kind === "trim" ? e.trim(off, len, fua) : e.writeZeroes(off, len, { fua }));
    this.model.fill(0, off, off + len);
  }

  private async read(): Promise<void> {
    const [off, len] = this.extent(9 * MiB);
    await this.check(off, len);
  }

  /** Read [off, off + len) through the engine and compare with the model. */
  private async check(off: number, len: number): Promise<void> {
    const dst = this.scratch.subarray(0, len);
    // Not a value the model is likely to hold: a byte the read path forgot to fill shows up.
    dst.fill(0xa5);
    await this.drive(this.h.engine.read(off, len, dst));
    const want = this.model.subarray(off, off + len);
    if (Buffer.from(dst.buffer, dst.byteOffset, len).equals(want)) return;
    let k = 0;
    while (dst[k] === want[k]) k++;
    this.fail(`read ${off}+${len} differs from the model at byte ${off + k}: got ${dst[k]}, want ${want[k]}`);
  }

  private async writebackSteps(): Promise<void> {
    if (this.hold_writeback_bytes > 0) return;
    // Now and then hold writeback back for a while, so writes fill the cache and must wait.
    if (this.rng() < 0.02) {
      this.hold_writeback_bytes = Math.floor(this.cache_data_bytes * (0.5 + this.rng()));
      return;
    }
    if (this.rng() < 0.1) return drainWriteback(this.h);
    const steps = 1 + Math.floor(this.rng() * 64);
    for (let i = 0; i < steps; i++) if ((await this.writebackStep()) === "idle") return;
  }

  private async writebackStep(): Promise<"progress" | "idle"> {
    const r = await this.h.writeback.step();
    if (r === "error") this.fail("writeback step failed");
    return r;
  }

  private gcSteps(): void {
    const { gc } = this.h;
    const u = this.rng();
    if (u < 0.5) gc.collect();
    else if (u < 0.8) for (let i = Math.floor(this.rng() * 16); i >= 0 && gc.step() === "progress"; i--);
    gc.prune();
  }

  /**
   * Await an engine operation. If it has not finished after a macrotask turn it is waiting for
   * space: run writeback and GC a step at a time (and close ksets early, as their 1 s timer
   * would) until it finishes.
   */
  private async drive(p: Promise<void>): Promise<void> {
    let settled = false;
    const done = p.finally(() => {
      settled = true;
    });
    done.catch(() => {});
    for (let round = 0; round < DRIVE_ROUNDS_MAX; round++) {
      await turn();
      if (settled) return done;
      this.drive_rounds++;
      // Once the cache has been found full, let writeback catch up again soon.
      this.hold_writeback_bytes = Math.min(this.hold_writeback_bytes, Math.floor(this.drive_rng() * 64 * MiB));
      const wb = await this.writebackStep();
      const reclaimed = this.h.gc.collect();
      this.h.gc.prune();
      if (wb === "idle" && reclaimed === 0) this.closeKsetsNow();
    }
    this.fail(`operation still waiting after ${DRIVE_ROUNDS_MAX} rounds of writeback and GC`);
  }

  private closeKsetsNow(): void {
    const log = this.h.engine.ctx.log;
    for (let id = 0; id < log.n_ksets; id++) {
      log.lock(id);
      try {
        log.close(id);
      } finally {
        log.unlock(id);
      }
    }
  }

  private addTotals(): void {
    const s = this.h.engine.ctx.s;
    for (const stat of TOTALS) this.totals.set(stat, this.totals.get(stat)! + s.statTotal(stat));
  }

  /** Flush (or close, as shutdown does), drop the engine, open the cache again: replay. */
  private async restart(): Promise<void> {
    const e = this.h.engine;
    await this.drive(this.rng() < 0.5 ? e.close() : e.flush());
    e.ctx.log.stopTimers();
    this.addTotals();
    this.h = openHarness(this.h.dom, this.backing, this.open_opts);
    this.restarts++;
    const r = this.h.engine.replay_result!;
    if (r.ended_dirty) this.fail(`replay after a clean restart ended dirty: ${r.end_reason}`);
  }

  private async checkAll(): Promise<void> {
    for (let off = 0; off < BACKING_BYTES; off += 8 * MiB) await this.check(off, 8 * MiB);
  }

  /** Index: every subtree sorted and non-overlapping; every node either linked or free. */
  private checkIndex(): void {
    const idx = this.h.engine.ctx.idx;
    let linked = 0;
    for (let s = 0; s < idx.n_subtrees; s++) {
      idx.lockSubtree(s);
      try {
        linked += idx.checkInvariants(s);
      } finally {
        idx.unlockSubtree(s);
      }
    }
    const free = idx.checkPool();
    if (linked + free !== idx.nodes_max) this.fail(`index nodes leaked: ${linked} linked + ${free} free != ${idx.nodes_max}`);
  }

  /** Everything reads back; after writeback the backing device equals the model; and again after replay. */
  private async finish(): Promise<void> {
    await this.drive(this.h.engine.flush());
    await this.checkAll();
    this.checkIndex();
    await drainWriteback(this.h);
    if (!Buffer.from(this.backing.bytes.buffer).equals(this.model)) this.fail("backing device differs from the model after writeback");
    await this.restart();
    await this.checkAll();
    this.checkIndex();
    this.addTotals();
  }
}

describe("engine model test", () => {
  for (let seed = 1; seed <= SEEDS; seed++) {
    test(
      `seed ${seed}: ${OPS_PER_SEED} random operations match a plain model`,
      async () => {
        const run = new ModelRun(seed);
        await run.run(OPS_PER_SEED);
        if (OPS_PER_SEED < OPS_DEFAULT) return; // too short to promise every path below
        // The whole cache was recycled at least once: the log wrapped and GC freed segments.
        expect(run.totals.get(STAT_GC_SEGS_FREED)!).toBeGreaterThanOrEqual(run.n_segs);
        // Some write found the cache full and waited for GC.
        expect(run.totals.get(STAT_DEFERRED)!).toBeGreaterThan(0);
        expect(run.totals.get(STAT_WRITEBACK_KSETS)!).toBeGreaterThan(0);
        expect(run.restarts).toBeGreaterThan(1);
      },
      Math.max(240_000, OPS_PER_SEED * 10),
    );
  }
});
