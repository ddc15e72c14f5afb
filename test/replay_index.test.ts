/**
 * Replay's index builder: subtrees whose keys do not overlap are built in O(n) from sorted keys,
 * the others are inserted in log order. Either way the index must hold exactly what inserting
 * every key in log order holds, and pass the full invariant check.
 */
import { describe, expect, test } from "bun:test";
import { AssertionError } from "../core/assert.ts";
import { ReplayIndexBuilder } from "../core/engine/replay_index.ts";
import { SUBTREE_SPAN } from "../core/format/constants.ts";
import { createKeyIndexShared, INSERT_OK_SPARE_USED, KeyIndex } from "../core/index/key_index.ts";
import { xorshift as rng } from "./helpers/rng.ts";

const N_SUBTREES = 8;

interface Key {
  off: number;
  len: number;
  seg: number;
}

/**
 * Keys in log order. Even subtrees get distinct 4 KiB blocks (no overlaps, shuffled); odd ones
 * get random unaligned keys that overlap.
 */
function logKeys(seed: number, per_subtree: number): Key[] {
  const r = rng(seed);
  const keys: Key[] = [];
  for (let s = 0; s < N_SUBTREES; s++) {
    if (s % 2 === 0) {
      const blocks = Array.from({ length: SUBTREE_SPAN / 4096 }, (_, i) => i);
      for (let i = blocks.length - 1; i > 0; i--) {
        const j = Math.floor(r() * (i + 1));
        [blocks[i], blocks[j]] = [blocks[j], blocks[i]];
      }
      for (let i = 0; i < per_subtree; i++) keys.push({ off: s * SUBTREE_SPAN + blocks[i] * 4096, len: 512 + Math.floor(r() * 3584), seg: 0 });
    } else {
      for (let i = 0; i < per_subtree; i++) {
        const rel = Math.floor(r() * (SUBTREE_SPAN - 70_000));
        keys.push({ off: s * SUBTREE_SPAN + rel, len: 1 + Math.floor(r() * 65_536), seg: 0 });
      }
    }
  }
  // Interleave subtrees the way a log does.
  for (let i = keys.length - 1; i > 0; i--) {
    const j = Math.floor(r() * (i + 1));
    [keys[i], keys[j]] = [keys[j], keys[i]];
  }
  keys.forEach((k, i) => (k.seg = i));
  return keys;
}

function node(idx: KeyIndex, k: Key): number {
  const id = idx.allocNode();
  expect(id).toBeGreaterThanOrEqual(0);
  idx.setKey(id, k.off, k.len, k.seg, 0, 1, 0);
  return id;
}

/** Every subtree's keys in order: [off, len, cache_seg_id, seg_off]. */
function contents(idx: KeyIndex): number[][] {
  const out: number[][] = [];
  for (let s = 0; s < idx.n_subtrees; s++) {
    expect(idx.checkInvariants(s)).toBe(idx.count(s));
    for (let t = idx.first(s); t >= 0; t = idx.next(s, t)) out.push([idx.off[t], idx.len[t], idx.cache_seg_id[t], idx.seg_off[t]]);
  }
  return out;
}

describe("replay index builder", () => {
  test("built and inserted subtrees hold what inserting every key in log order holds (10 seeds)", () => {
    for (let seed = 1; seed <= 10; seed++) {
      const keys = logKeys(seed, 300);
      const one_by_one = new KeyIndex(createKeyIndexShared(N_SUBTREES, 8192, seed));
      let spare = -1;
      for (const k of keys) {
        if (spare < 0) spare = one_by_one.allocNode();
        const s = one_by_one.subtreeOf(k.off);
        if (one_by_one.insert(s, node(one_by_one, k), spare, null) === INSERT_OK_SPARE_USED) spare = -1;
      }
      const bulk = new KeyIndex(createKeyIndexShared(N_SUBTREES, 8192, seed + 100));
      const builder = new ReplayIndexBuilder(bulk);
      for (const k of keys) builder.add(node(bulk, k), k.off, k.len);
      expect(builder.finish()).toEqual({ built_subtrees: N_SUBTREES / 2, inserted_subtrees: N_SUBTREES / 2 });
      expect(contents(bulk)).toEqual(contents(one_by_one));
      for (let s = 0; s < N_SUBTREES; s += 2) expect(bulk.count(s)).toBe(300);
    }
  });

  test("buildSorted refuses keys out of order and a subtree that is not empty", () => {
    const idx = new KeyIndex(createKeyIndexShared(2, 16));
    const a = node(idx, { off: 8192, len: 4096, seg: 1 });
    const b = node(idx, { off: 0, len: 4096, seg: 2 });
    const stack = new Int32Array(4);
    const stack_prio = new Uint32Array(4);
    const keys = (ids: number[], offs: number[]) => ({ ids: Int32Array.from(ids), offs: Float64Array.from(offs), lens: Uint32Array.of(4096, 4096) });
    expect(() => idx.buildSorted(0, keys([a, b], [8192, 0]), 2, stack, stack_prio)).toThrow(AssertionError);
    idx.buildSorted(0, keys([b, a], [0, 8192]), 2, stack, stack_prio);
    expect(contents(idx).slice(0, 2)).toEqual([
      [0, 4096, 2, 0],
      [8192, 4096, 1, 0],
    ]);
    idx.checkInvariants(0);
    const c = node(idx, { off: 20000, len: 1, seg: 3 });
    expect(() => idx.buildSorted(0, { ids: Int32Array.of(c), offs: Float64Array.of(20000), lens: Uint32Array.of(1) }, 1, stack, stack_prio)).toThrow(/not empty/);
  });
});
