/**
 * dedupeKset: a kset's keys as non-overlapping extents, later keys winning. Checked per byte
 * against applying the keys in log order, for ksets with and without overlaps.
 */
import { describe, expect, test } from "bun:test";
import { dedupeKset, type KsetKey } from "../core/writeback/dedupe.ts";
import { xorshift as rng } from "./helpers/rng.ts";

/** n keys inside `span` bytes; key i's data is at seg_off i * 65536 of segment i. */
function keys(seed: number, n: number, span: number): KsetKey[] {
  const r = rng(seed);
  return Array.from({ length: n }, (_, i) => {
    const off = Math.floor(r() * (span - 1));
    const len = 1 + Math.floor(r() * Math.min(8192, span - off - 1));
    return { off, len, flags: i % 3 === 0 ? 1 : 0, cache_seg_id: i, cache_seg_off: i * 65536, seg_gen: i };
  });
}

/** For each byte: "segment:position" of the key that wrote it last, or "" if none. */
function byLogOrder(ks: KsetKey[], span: number): string[] {
  const owner = new Array<string>(span).fill("");
  for (const k of ks) for (let b = k.off; b < k.off + k.len; b++) owner[b] = `${k.cache_seg_id}:${k.cache_seg_off + (b - k.off)}:${k.flags}:${k.seg_gen}`;
  return owner;
}

function byExtents(ks: KsetKey[], span: number): string[] {
  const owner = new Array<string>(span).fill("");
  const extents = dedupeKset(ks);
  let overlaps = 0;
  expect(extents.every((e, i) => i === 0 || extents[i - 1].off < e.off)).toBe(true); // sorted by offset
  for (const e of extents) {
    expect(e.len).toBeGreaterThan(0);
    for (let b = e.off; b < e.off + e.len; b++) {
      if (owner[b] !== "") overlaps++;
      owner[b] = `${e.cache_seg_id}:${e.seg_off + (b - e.off)}:${e.flags}:${e.seg_gen}`;
    }
  }
  expect(overlaps).toBe(0); // extents never overlap
  return owner;
}

describe("dedupeKset", () => {
  test("overlapping keys: later keys win, byte for byte, sorted by offset (30 seeds)", () => {
    for (let seed = 1; seed <= 30; seed++) {
      const ks = keys(seed, 128, 32 * 1024);
      expect(byExtents(ks, 32 * 1024).join("|")).toBe(byLogOrder(ks, 32 * 1024).join("|"));
    }
  });

  test("keys that do not overlap come back whole, sorted by offset", () => {
    const ks: KsetKey[] = [4, 0, 2, 9].map((blk, i) => ({ off: blk * 4096, len: 4096, flags: 0, cache_seg_id: i, cache_seg_off: 0, seg_gen: 7 }));
    expect(dedupeKset(ks).map((e) => [e.off, e.cache_seg_id])).toEqual([
      [0, 1],
      [8192, 2],
      [16384, 0],
      [36864, 3],
    ]);
    const span = 40 * 1024;
    expect(byExtents(ks, span)).toEqual(byLogOrder(ks, span));
  });

  test("adjacent keys are not an overlap; one shared byte is", () => {
    const a = { off: 0, len: 100, flags: 0, cache_seg_id: 1, cache_seg_off: 0, seg_gen: 1 };
    expect(dedupeKset([a, { ...a, off: 100, cache_seg_id: 2 }])).toHaveLength(2);
    const cut = dedupeKset([a, { ...a, off: 99, cache_seg_id: 2 }]);
    expect(cut.map((e) => [e.off, e.len, e.cache_seg_id])).toEqual([
      [0, 99, 1],
      [99, 100, 2],
    ]);
  });
});
