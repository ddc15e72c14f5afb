/**
 * Damaged cache images (test/reliability/image_damage.ts): byte flips and crafted damage in
 * every metadata structure and in the ksets of a cache with a real log. loadCache, the log walk,
 * Engine.open and what runs after it (reads, writeback, GC) recover or refuse with a clear
 * one-line error, never an unhandled exception, and never write to a device they refuse; a
 * sample runs the binary (info, dump-ksets, serve).
 *
 * More: PCACHE_DAMAGE_CASES=5000 PCACHE_DAMAGE_SEED=7 bun test test/image_damage.test.ts
 */
import { afterAll, describe, expect, test } from "bun:test";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { MemoryBacking } from "../core/device/memory_backing.ts";
import { Engine } from "../core/engine/engine.ts";
import { loadCache, SEG_GEN_MAX } from "../core/format/load_cache.ts";
import { persistSegGen } from "../core/format/meta.ts";
import { expectInvalid, formatted } from "./fixtures/format_helpers.ts";
import { killAll, requireBinary } from "./helpers/serve_binary.ts";
import { runImageDamage } from "./reliability/image_damage.ts";

const CASES = Number(process.env.PCACHE_DAMAGE_CASES ?? 200);
const SEED = Number(process.env.PCACHE_DAMAGE_SEED ?? 1);
const BINARY_CASES = Number(process.env.PCACHE_DAMAGE_BINARY_CASES ?? 8);

// Image files on a disk file system: reading a hole through a shared mapping allocates a page on
// tmpfs, which would look like a write in the block count the checks compare.
const dir = mkdtempSync(join(tmpdir(), "pcache-damage-"));

afterAll(async () => {
  await killAll();
  rmSync(dir, { recursive: true, force: true });
});

describe("damaged cache images", () => {
  test(`${CASES} damaged images (seed ${SEED}) are recovered or refused cleanly; ${BINARY_CASES} also through the binary`, async () => {
    requireBinary();
    const r = await runImageDamage({ seed: SEED, cases: CASES, binary_cases: BINARY_CASES, dir });
    expect(r.failures.map((f) => f.message)).toEqual([]);
    expect(r.cases).toBe(CASES);
    expect(r.binary_runs).toBe(Math.min(BINARY_CASES, CASES));
    // Both outcomes must be common, or the damage is too weak or too blunt to test much.
    expect(r.refused).toBeGreaterThan(CASES / 10);
    expect(r.recovered).toBeGreaterThan(CASES / 10);
  }, 300_000);

  test("a damaged case replays alone with the same outcome", async () => {
    const outcomes: string[] = [];
    await runImageDamage({ seed: SEED, cases: 6, onCase: (_i, d, o) => outcomes.push(`${d.what} -> ${o}`) });
    const again: string[] = [];
    await runImageDamage({ seed: SEED, cases: 6, only: 4, onCase: (_i, d, o) => again.push(`${d.what} -> ${o}`) });
    expect(again).toEqual([outcomes[4]!]);
  }, 120_000);

  test("regression: a seg_gen too large to be bumped is refused at load, before anything is written", () => {
    // A crafted seg_gen of 2^53 - 1 used to load; GC freeing that segment then failed an
    // assertion bumping it past the safe integers, and the GC worker died.
    const { dom, meta } = formatted();
    const phys = meta.seg_ids[3]!;
    persistSegGen(dom, phys, Number.MAX_SAFE_INTEGER, meta.seg_gen_slots[3]!);
    expectInvalid(dom, () => loadCache(dom), `seg_gen of physical segment ${phys} (cache segment 3)`, `gen ${Number.MAX_SAFE_INTEGER} exceeds ${SEG_GEN_MAX}`);
    expectInvalid(dom, () => Engine.open(dom, new MemoryBacking(1024 * 1024)), "GC could not bump it");
    // The largest accepted generation still leaves room for more bumps than any cache makes.
    const ok = formatted();
    persistSegGen(ok.dom, ok.meta.seg_ids[3]!, SEG_GEN_MAX, ok.meta.seg_gen_slots[3]!);
    expect(loadCache(ok.dom).seg_gens[3]).toBe(SEG_GEN_MAX);
  });
});
