/**
 * Crash states of the engine on the `sim` persistence domain: a random workload (writes of mixed
 * sizes, FUA writes, zeroes, flushes, writeback and GC steps) is stopped at a random persist
 * barrier; every unpersisted 64-byte line is kept or dropped at random, unflushed backing writes
 * likewise; then the cache is reopened (replay) and every byte is checked against the durability
 * contract:
 *   - a byte covered by a write acknowledged before the last completed FLUSH, or by an
 *     acknowledged FUA write, reads that write's value or a later write's;
 *   - any other byte reads its value at that point or one of the values written since;
 *   - never anything else.
 * Seeded: a failure names the seed; PCACHE_CRASH_CASES=N runs more cases.
 */
import { describe, expect, test } from "bun:test";
import { MemoryBacking } from "../core/device/memory_backing.ts";
import { MiB } from "../core/format/constants.ts";
import { makeRng, SimCrash } from "../core/persist/sim.ts";
import { freshCache, openHarness, pattern, type Harness } from "./helpers/engine_harness.ts";

const BACKING = 8 * MiB;
const CASES = Number(process.env.PCACHE_CRASH_CASES ?? 40);

interface Op {
  off: number;
  data: Uint8Array;
}

/** Per byte: the oldest value still allowed (floor) and the first op index whose values also count. */
class Contract {
  readonly floor_val = new Uint8Array(BACKING);
  readonly floor_op = new Int32Array(BACKING);
  readonly model = new Uint8Array(BACKING);
  readonly ops: Op[] = [];

  /** A write was issued (it may or may not be acknowledged before the crash). */
  issue(off: number, data: Uint8Array): number {
    this.ops.push({ off, data });
    return this.ops.length - 1;
  }

  /** The write was acknowledged. */
  acked(i: number, fua: boolean): void {
    const { off, data } = this.ops[i];
    this.model.set(data, off);
    if (!fua) return;
    this.floor_val.set(data, off);
    this.floor_op.fill(i + 1, off, off + data.length);
  }

  /** A FLUSH completed: everything acknowledged is the new floor. */
  flushed(): void {
    this.floor_val.set(this.model);
    this.floor_op.fill(this.ops.length);
  }

  /** First byte that breaks the contract, or null. */
  check(got: Uint8Array): string | null {
    for (let b = 0; b < BACKING; b++) {
      const v = got[b];
      if (v === this.floor_val[b]) continue;
      let ok = false;
      for (let i = this.floor_op[b]; i < this.ops.length && !ok; i++) {
        const op = this.ops[i];
        if (b >= op.off && b < op.off + op.data.length && op.data[b - op.off] === v) ok = true;
      }
      if (!ok) return `byte ${b}: read ${v}, allowed ${this.floor_val[b]} or a value written by op >= ${this.floor_op[b]}`;
    }
    return null;
  }
}

async function runCase(seed: number): Promise<string | null | "no-crash"> {
  const rng = makeRng(seed);
  const backing = new MemoryBacking(BACKING);
  // Format without tracking (fast), then track durability from a clean state.
  const base = freshCache({ seed, track: true, gc_percent: 0 });
  const dom = base.recover({ keep_all: true });
  const h: Harness = openHarness(dom, backing);
  const c = new Contract();
  const ops = 20 + Math.floor(rng() * 60);
  dom.crash_at_fence = dom.fence_count + 1 + Math.floor(rng() * ops * 3);
  try {
    for (let n = 0; n < ops; n++) {
      const r = rng();
      const len = 1 + Math.floor(rng() * (rng() < 0.2 ? 300 * 1024 : 9000));
      const off = Math.floor(rng() * (BACKING - len));
      if (r < 0.6) {
        const fua = rng() < 0.2;
        const data = pattern(len, seed * 1000 + n);
        const i = c.issue(off, data);
        await h.engine.write(off, data, fua);
        c.acked(i, fua);
      } else if (r < 0.7) {
        const i = c.issue(off, new Uint8Array(len));
        await h.engine.writeZeroes(off, len, { fua: false });
        c.acked(i, false);
      } else if (r < 0.85) {
        await h.engine.flush();
        c.flushed();
      } else {
        for (let k = 0; k < 4; k++) if ((await h.writeback.step()) !== "progress") break;
        h.gc.collect();
      }
    }
    return "no-crash"; // the crash point was never reached: nothing to check
  } catch (err) {
    if (!(err instanceof SimCrash)) throw err;
  } finally {
    h.engine.ctx.log.stopTimers();
  }
  const after = dom.recover({ seed: seed ^ 0x5a5a });
  backing.crash(seed);
  const h2 = openHarness(after, backing);
  const got = new Uint8Array(BACKING);
  await h2.engine.read(0, BACKING, got);
  h2.engine.ctx.log.stopTimers();
  const problem = c.check(got);
  return problem === null ? null : `seed ${seed}: ${problem}`;
}

describe("crash states (sim domain)", () => {
  test(`${CASES} random crash points keep the durability contract`, async () => {
    const failures: string[] = [];
    let crashed = 0;
    for (let seed = 1; seed <= CASES; seed++) {
      const problem = await runCase(seed);
      if (problem === "no-crash") continue;
      crashed++;
      if (problem !== null) failures.push(problem);
    }
    expect(failures).toEqual([]);
    // Most cases must really crash, or the test checks little.
    expect(crashed).toBeGreaterThan(CASES / 2);
  }, 300_000);
});
