/**
 * Crash states of the engine on the `sim` persistence domain (test/reliability/crash_explore.ts):
 * seeded workloads stopped at a persist barrier, a cache store or a backing write/flush, then
 * reopened and checked against the durability contract, the backing prefix invariant and the
 * order of the tails.
 *
 * CI runs a bounded number of cases. More:
 *   PCACHE_CRASH_CASES=5000 [PCACHE_CRASH_SEED=1] bun test test/crash.test.ts
 *   PCACHE_CRASH_EXHAUSTIVE_SEEDS=20 bun test test/crash.test.ts
 * A failure prints the command that replays it: bun scripts/crash_replay.ts --seed S --barrier K
 */
import { describe, expect, test } from "bun:test";
import { type CrashCaseResult, replayCommand, runCrashCase, runCrashExplore } from "./reliability/crash_explore.ts";
import { Contract } from "./reliability/crash_workload.ts";

const CASES = Number(process.env.PCACHE_CRASH_CASES ?? 40);
const FIRST_SEED = Number(process.env.PCACHE_CRASH_SEED ?? 1);
const EXHAUSTIVE_SEEDS = Number(process.env.PCACHE_CRASH_EXHAUSTIVE_SEEDS ?? 2);
/** Short workloads for the exhaustive runs: every barrier is a rerun of the workload. */
const EXHAUSTIVE_OPS = 14;

function messages(r: { failures: Array<{ message: string }> }): string[] {
  return r.failures.map((f) => f.message);
}

describe("crash states (sim domain)", () => {
  test(`${CASES} random crash points keep the contract, the backing prefix and the tail order`, async () => {
    let crashed = 0;
    const r = await runCrashExplore({
      seeds: { from: FIRST_SEED, count: CASES },
      onCase: (_seed, c) => {
        if (!c.crash.startsWith("end") && !c.crash.startsWith("before")) crashed++;
      },
    });
    expect(messages(r)).toEqual([]);
    expect(r.cases).toBe(CASES);
    // Most cases must really crash mid-workload, or the test checks little.
    expect(crashed).toBeGreaterThan(CASES / 2);
    // The workloads must exercise what they claim: GC freeing segments that are then reused,
    // the log rolling through LAST ksets, writeback moving dirty_tail.
    expect(r.segs_freed).toBeGreaterThan(0);
    expect(r.segs_reused).toBeGreaterThan(0);
    expect(r.log_rolls).toBeGreaterThan(0);
    expect(r.ksets_written_back).toBeGreaterThan(CASES);
  }, 600_000);

  test(`every barrier and backing write/flush of ${EXHAUSTIVE_SEEDS} short workloads`, async () => {
    const seeds = Array.from({ length: EXHAUSTIVE_SEEDS }, (_, i) => 1000 + FIRST_SEED + i);
    const barriers_by_seed = new Map<number, number>();
    const r = await runCrashExplore({
      seeds,
      exhaustive_barriers: true,
      ops: EXHAUSTIVE_OPS,
      onCase: (seed, c) => {
        if (c.crash === "end") barriers_by_seed.set(seed, c.barriers + c.backing_ios);
      },
    });
    expect(messages(r)).toEqual([]);
    // One uncrashed run per seed plus one case per barrier and per backing write or flush.
    const expected = seeds.reduce((n, seed) => n + 1 + barriers_by_seed.get(seed)!, 0);
    expect(r.cases).toBe(expected);
    expect(r.cases).toBeGreaterThan(EXHAUSTIVE_SEEDS * 10);
  }, 600_000);

  test("a case replays exactly: same seed and crash point, same run", async () => {
    const trace = async (): Promise<{ lines: string[]; r: CrashCaseResult }> => {
      const lines: string[] = [];
      const r = await runCrashCase(7, { barrier: 20, trace: (l) => lines.push(l) });
      return { lines, r };
    };
    const a = await trace();
    const b = await trace();
    expect(a.r.ok).toBe(true);
    expect(a.r.crash).toBe("barrier 20");
    expect(a.r.barriers).toBe(20);
    expect(b.lines).toEqual(a.lines);
    expect(b.r).toEqual(a.r);
    expect(a.r.replay).toBe("bun scripts/crash_replay.ts --seed 7 --barrier 20");
    expect(replayCommand(9, { backing_io: 3, ops: 12 })).toBe("bun scripts/crash_replay.ts --seed 9 --backing-io 3 --ops 12");
  }, 120_000);
});

describe("the contract checker itself", () => {
  const initial = new Uint8Array(64).fill(7);

  test("accepts what the contract allows", () => {
    const c = new Contract(initial);
    const w0 = c.issue(0, new Uint8Array(8).fill(1));
    c.acked(w0, false);
    c.flushed();
    const w1 = c.issue(4, new Uint8Array(8).fill(2)); // acknowledged, not flushed
    c.acked(w1, false);
    c.issue(16, new Uint8Array(4).fill(3)); // in flight at the crash
    const got = initial.slice();
    got.fill(1, 0, 4);
    got.fill(2, 4, 6); // part of an unflushed write survived
    got.fill(1, 6, 8);
    got.fill(3, 17, 18);
    expect(c.check(got)).toBeNull();
  });

  test("refuses a lost flushed write, a lost FUA write and bytes never written", () => {
    const c = new Contract(initial);
    const w0 = c.issue(0, new Uint8Array(8).fill(1));
    c.acked(w0, false);
    c.flushed();
    const w1 = c.issue(32, new Uint8Array(4).fill(5));
    c.acked(w1, true);
    expect(c.check(initial)).toMatch(/^byte 0: read 7, allowed 1/);
    const lost_fua = initial.slice();
    lost_fua.fill(1, 0, 8);
    expect(c.check(lost_fua)).toMatch(/^byte 32: read 7, allowed 5/);
    const garbage = lost_fua.slice();
    garbage.fill(5, 32, 36);
    garbage[50] = 9;
    expect(c.check(garbage)).toMatch(/^byte 50: read 9, allowed 7/);
  });
});
