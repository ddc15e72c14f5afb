/**
 * The real-process crash soak, short: five rounds of `dist/pcache serve` killed with SIGKILL
 * (mid-burst, after a flushed burst while writeback trails it, while GC moves key_tail, after a
 * flushed fio run), each followed by a restart and a check of every block against the
 * durability contract. First, the model that judges those blocks, on hand-made cases, so the
 * soak's checks are known to fire. The long run is `bun scripts/kill_soak.ts`.
 * PCACHE_SOAK_SEED picks another seed.
 */
import { describe, expect, test } from "bun:test";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { runKillSoak } from "./reliability/kill_soak.ts";
import { BLOCK_BYTES, DurabilityModel } from "./reliability/soak_model.ts";

const SEED = Number(process.env.PCACHE_SOAK_SEED ?? 20260602);
const BIN = join(import.meta.dir, "..", "dist", "pcache");

describe("durability model", () => {
  const zeroes = new Uint8Array(BLOCK_BYTES);

  test("unflushed writes: the old value or any of them; nothing else", () => {
    const m = new DurabilityModel(8, 7);
    expect(m.check(3, zeroes)).toEqual({ kind: "ok", id: 0 });
    m.issue(1, 2, 3); // blocks 2..4
    m.issue(2, 3, 1);
    expect(m.check(3, zeroes)).toEqual({ kind: "ok", id: 0 });
    expect(m.check(3, m.data(1, 3, 1))).toEqual({ kind: "ok", id: 1 });
    expect(m.check(3, m.data(2, 3, 1))).toEqual({ kind: "ok", id: 2 });
    // Write 1's data for block 2 read at block 3: the right write, the wrong place.
    expect(m.check(3, m.data(1, 2, 1)).kind).toBe("bad");
    expect(m.check(5, m.data(1, 5, 1)).kind).toBe("bad");
    const garbage = new Uint8Array(BLOCK_BYTES).fill(0x5a);
    expect(m.check(3, garbage).kind).toBe("bad");
  });

  test("a flushed (or FUA) write must survive: the old value is no longer allowed", () => {
    const m = new DurabilityModel(8, 7);
    m.issue(1, 0, 4);
    m.promote(1, 0, 4);
    const v = m.check(1, zeroes);
    expect(v.kind).toBe("bad");
    if (v.kind === "bad") expect(v.why).toContain("allowed writes [1]");
    expect(m.check(1, m.data(1, 1, 1))).toEqual({ kind: "ok", id: 1 });
    // A later write may win, and the flushed one stays allowed until that one is flushed.
    m.issue(2, 1, 1);
    expect(m.check(1, m.data(2, 1, 1))).toEqual({ kind: "ok", id: 2 });
    expect(m.check(1, m.data(1, 1, 1))).toEqual({ kind: "ok", id: 1 });
    m.promote(2, 1, 1);
    expect(m.check(1, m.data(1, 1, 1)).kind).toBe("bad");
    // Promoting an older write after a newer one changes nothing.
    m.promote(1, 1, 1);
    expect(m.check(1, m.data(2, 1, 1))).toEqual({ kind: "ok", id: 2 });
  });

  test("a block mixing two allowed writes is torn (legal per byte); mixing in garbage is not", () => {
    const m = new DurabilityModel(4, 9);
    m.issue(1, 0, 1);
    m.issue(2, 0, 1);
    const mixed = m.data(1, 0, 1);
    mixed.set(m.data(2, 0, 1).subarray(2048), 2048);
    expect(m.check(0, mixed)).toEqual({ kind: "torn" });
    mixed[3000] = mixed[3000]! ^ 0xff;
    expect(m.check(0, mixed).kind).toBe("bad");
  });

  test("after a restart the value read is the new floor", () => {
    const m = new DurabilityModel(4, 9);
    m.issue(1, 0, 1);
    m.settle(0, 0);
    expect(m.check(0, m.data(1, 0, 1)).kind).toBe("bad");
    expect(m.check(0, zeroes)).toEqual({ kind: "ok", id: 0 });
  });
});

describe("kill soak", () => {
  test(
    "a failure to even start is reported with the seed",
    async () => {
      const r = await runKillSoak({ rounds: 1, seed: 5, binary: "/bin/false" });
      expect(r.kills).toBe(0);
      expect(r.failures.length).toBe(1);
      expect(r.failures[0]).toMatch(/^kill soak seed 5, setup: pcache format failed/);
    },
    30_000,
  );

  test(
    "5 rounds of SIGKILL + restart keep every flushed write (dist/pcache, GC threshold 20%)",
    async () => {
      if (!existsSync(BIN)) throw new Error(`${BIN} is missing: run "bun scripts/build.ts" first`);
      const r = await runKillSoak({ rounds: 5, seed: SEED, gc_percent: 20, binary: BIN });
      expect(r.failures).toEqual([]);
      expect(r.kills).toBe(5);
      // Enough volume that GC reclaimed while the rounds ran.
      expect(r.gc_rounds).toBeGreaterThan(0);
      expect(r.written_bytes).toBeGreaterThan(64 * 1024 * 1024);
      const have_fio = Bun.spawnSync(["sh", "-c", "command -v fio"]).exitCode === 0;
      expect(r.fio_rounds).toBe(have_fio ? 1 : 0);
    },
    120_000,
  );
});
