import { makeRng } from "../core/persist/sim.ts";
import { describe, expect, test } from "bun:test";
import { AssertionError } from "../core/assert.ts";
import { MiB, SEG_DATA_SIZE, SUBTREE_SPAN } from "../core/format/constants.ts";
import {
  createKeyIndexShared,
  INSERT_NEED_SPARE,
  INSERT_OK,
  INSERT_OK_SPARE_USED,
  KEY_F_CLEAN,
  KEY_F_CRC_VALID,
  KEY_F_EMPTY,
  KeyIndex,
  keyIndexBytes,
  NIL,
  NODE_BYTES,
  subtreeOf,
  subtreesForBacking,
} from "../core/index/key_index.ts";
import { IndexModel, type ModelWindow } from "./helpers/index_model.ts";

const never = (): boolean => false;

function makeIndex(n_subtrees: number, nodes_max: number, seed = 1): KeyIndex {
  return new KeyIndex(createKeyIndexShared(n_subtrees, nodes_max, seed), { debug: true });
}

/** Allocate and fill a key; EMPTY keys get segment 0. */
function key(idx: KeyIndex, off: number, len: number, seg_off = 0, flags = 0, seg = 0, gen = 0): number {
  const id = idx.allocNode();
  expect(id).not.toBe(NIL);
  idx.setKey(id, off, len, seg, seg_off, gen, flags);
  return id;
}

/** Keys of subtree s as [off, len, seg_off] triples. */
function dump(idx: KeyIndex, s: number): number[][] {
  const out: number[][] = [];
  for (let id = idx.first(s); id !== NIL; id = idx.next(s, id)) out.push([idx.off[id], idx.len[id], idx.seg_off[id]]);
  idx.checkInvariants(s);
  return out;
}

describe("key index: geometry and memory", () => {
  test("subtree count and subtree of an offset", () => {
    expect(subtreesForBacking(0)).toBe(1);
    expect(subtreesForBacking(1)).toBe(1);
    expect(subtreesForBacking(4 * MiB)).toBe(1);
    expect(subtreesForBacking(4 * MiB + 1)).toBe(2);
    expect(subtreesForBacking(1024 * 1024 * MiB)).toBe(262_144);
    expect(subtreeOf(0)).toBe(0);
    expect(subtreeOf(SUBTREE_SPAN - 1)).toBe(0);
    expect(subtreeOf(SUBTREE_SPAN)).toBe(1);
    expect(subtreeOf(2 ** 50 + 5)).toBe(2 ** 28);
  });

  test("keyIndexBytes matches what createKeyIndexShared allocates", () => {
    for (const [ns, nm] of [
      [1, 1],
      [3, 100],
      [1000, 12345],
    ]) {
      const sh = createKeyIndexShared(ns, nm);
      let total = 0;
      for (const v of Object.values(sh)) if (v instanceof SharedArrayBuffer) total += v.byteLength;
      expect(total).toBe(keyIndexBytes(ns, nm));
    }
    expect(NODE_BYTES).toBe(76);
  });

  test("the shared object survives structured clone (postMessage)", () => {
    const sh = createKeyIndexShared(2, 10);
    const copy = structuredClone(sh);
    const a = new KeyIndex(sh);
    const b = new KeyIndex(copy);
    const id = a.allocNode();
    a.setKey(id, 4096, 512, 3, 8192, 7, KEY_F_CLEAN);
    a.insert(0, id, NIL, null);
    expect(b.first(0)).toBe(id);
    expect(b.off[id]).toBe(4096);
    expect(b.nodesFree()).toBe(9);
  });
});

describe("key index: overlap fixup, one row at a time", () => {
  test("adjacent keys do not overlap", () => {
    const idx = makeIndex(1, 16);
    idx.insert(0, key(idx, 1000, 100, 0), NIL, never);
    idx.insert(0, key(idx, 1100, 100, 500), NIL, never);
    idx.insert(0, key(idx, 900, 100, 900), NIL, never);
    expect(dump(idx, 0)).toEqual([
      [900, 100, 900],
      [1000, 100, 0],
      [1100, 100, 500],
    ]);
    expect(idx.ceiling(0, 999)).toBe(idx.first(0));
    expect(idx.off[idx.ceiling(0, 1000)]).toBe(1000);
    expect(idx.off[idx.ceiling(0, 1199)]).toBe(1100);
    expect(idx.ceiling(0, 1200)).toBe(NIL);
  });

  test("K equal to T replaces it", () => {
    const idx = makeIndex(1, 16);
    const t = key(idx, 1000, 100, 0);
    idx.insert(0, t, NIL, never);
    const ver = idx.ver[t];
    const k = key(idx, 1000, 100, 7);
    expect(idx.insert(0, k, NIL, never)).toBe(INSERT_OK);
    expect(dump(idx, 0)).toEqual([[1000, 100, 7]]);
    expect(idx.ver[t]).toBe(ver + 1);
    expect(idx.isFree(t)).toBe(true);
  });

  test("tail: T's front is cut and its seg_off advances; CRC fields keep the original extent", () => {
    const idx = makeIndex(1, 16);
    const t = key(idx, 1000, 100, 5000);
    idx.setCrc(t, 0xdeadbeef, 5000, 100);
    idx.insert(0, t, NIL, never);
    idx.insert(0, key(idx, 950, 80, 0), NIL, never);
    expect(dump(idx, 0)).toEqual([
      [950, 80, 0],
      [1030, 70, 5030],
    ]);
    expect([idx.data_crc[t], idx.crc_seg_off[t], idx.crc_len[t]]).toEqual([0xdeadbeef, 5000, 100]);
    expect(idx.flags[t] & KEY_F_CRC_VALID).toBe(KEY_F_CRC_VALID);
  });

  test("tail with an EMPTY T deletes the whole placeholder", () => {
    const idx = makeIndex(1, 16);
    idx.insert(0, key(idx, 1000, 100, 0, KEY_F_EMPTY), NIL, never);
    idx.insert(0, key(idx, 1000, 10, 0), NIL, never);
    expect(dump(idx, 0)).toEqual([[1000, 10, 0]]);
  });

  test("contain: every key inside K is deleted, neighbours are cut", () => {
    const idx = makeIndex(1, 32);
    for (let i = 0; i < 10; i++) idx.insert(0, key(idx, i * 100, 100, i * 100), NIL, never);
    idx.insert(0, key(idx, 150, 700, 9999), NIL, never);
    expect(dump(idx, 0)).toEqual([
      [0, 100, 0],
      [100, 50, 100],
      [150, 700, 9999],
      [850, 50, 850],
      [900, 100, 900],
    ]);
    expect(idx.nodesFree()).toBe(32 - 5);
  });

  test("contained: T is split with the spare; without a spare nothing changes", () => {
    const idx = makeIndex(1, 16);
    const t = key(idx, 1000, 1000, 40000);
    idx.setCrc(t, 0x1234, 40000, 1000);
    idx.insert(0, t, NIL, never);
    const k = key(idx, 1200, 100, 0);
    expect(idx.insert(0, k, NIL, never)).toBe(INSERT_NEED_SPARE);
    expect(dump(idx, 0)).toEqual([[1000, 1000, 40000]]);
    const spare = idx.allocNode();
    expect(idx.insert(0, k, spare, never)).toBe(INSERT_OK_SPARE_USED);
    expect(dump(idx, 0)).toEqual([
      [1000, 200, 40000],
      [1200, 100, 0],
      [1300, 700, 40300],
    ]);
    expect([idx.data_crc[spare], idx.crc_seg_off[spare], idx.crc_len[spare]]).toEqual([0x1234, 40000, 1000]);
  });

  test("contained with an EMPTY T: T keeps only its head, the spare is not used", () => {
    const idx = makeIndex(1, 16);
    idx.insert(0, key(idx, 1000, 1000, 0, KEY_F_EMPTY), NIL, never);
    const spare = idx.allocNode();
    expect(idx.insert(0, key(idx, 1200, 100, 77), spare, never)).toBe(INSERT_OK);
    expect(dump(idx, 0)).toEqual([
      [1000, 200, 0],
      [1200, 100, 77],
    ]);
    expect(idx.isFree(spare)).toBe(false);
  });

  test("head: T's back is cut, seg_off unchanged", () => {
    const idx = makeIndex(1, 16);
    idx.insert(0, key(idx, 1000, 100, 300), NIL, never);
    idx.insert(0, key(idx, 1050, 100, 0), NIL, never);
    expect(dump(idx, 0)).toEqual([
      [1000, 50, 300],
      [1050, 100, 0],
    ]);
  });

  test("a full 4 MiB key replaces everything in its subtree and nothing next door", () => {
    const idx = makeIndex(3, 64);
    for (let s = 0; s < 3; s++) {
      for (let i = 0; i < 8; i++) idx.insert(s, key(idx, s * SUBTREE_SPAN + i * 4096 * 100, 4096, 0), NIL, never);
    }
    idx.insert(1, key(idx, SUBTREE_SPAN, SUBTREE_SPAN, 0), NIL, never);
    expect(dump(idx, 1)).toEqual([[SUBTREE_SPAN, SUBTREE_SPAN, 0]]);
    expect(idx.count(0)).toBe(8);
    expect(idx.count(2)).toBe(8);
  });

  test("keys may not cross a 4 MiB boundary or sit in the wrong subtree", () => {
    const idx = makeIndex(3, 16);
    const a = key(idx, SUBTREE_SPAN - 512, 1024);
    expect(() => idx.insert(0, a, NIL, never)).toThrow(AssertionError);
    const b = key(idx, SUBTREE_SPAN, 512);
    expect(() => idx.insert(0, b, NIL, never)).toThrow(AssertionError);
    expect(() => idx.insert(1, key(idx, 10, 0), NIL, never)).toThrow(AssertionError);
    idx.insert(1, b, NIL, never);
    expect(idx.count(1)).toBe(1);
    // A single-subtree index (a private writeback tree) takes keys from anywhere.
    const one = makeIndex(1, 4);
    one.insert(0, key(one, 5 * SUBTREE_SPAN + 7, 100), NIL, never);
    expect(() => one.insert(0, key(one, 2 * SUBTREE_SPAN - 1, 2), NIL, never)).toThrow(AssertionError);
  });

  test("removeRange cuts, splits with the spare, and deletes", () => {
    const idx = makeIndex(1, 16);
    idx.insert(0, key(idx, 0, 100, 0), NIL, never);
    idx.insert(0, key(idx, 100, 100, 1000), NIL, never);
    idx.insert(0, key(idx, 200, 100, 2000), NIL, never);
    expect(idx.removeRange(0, 50, 250, NIL, never)).toBe(INSERT_OK);
    expect(dump(idx, 0)).toEqual([
      [0, 50, 0],
      [250, 50, 2050],
    ]);
    expect(idx.removeRange(0, 260, 270, NIL, never)).toBe(INSERT_NEED_SPARE);
    const spare = idx.allocNode();
    expect(idx.removeRange(0, 260, 270, spare, never)).toBe(INSERT_OK_SPARE_USED);
    expect(dump(idx, 0)).toEqual([
      [0, 50, 0],
      [250, 10, 2050],
      [270, 30, 2070],
    ]);
    expect(idx.removeRange(0, 0, 4096, NIL, never)).toBe(INSERT_OK);
    expect(idx.count(0)).toBe(0);
    expect(idx.nodesFree()).toBe(16);
  });

  test("a stale key that insert meets is purged; purgeStale respects its budget", () => {
    const idx = makeIndex(1, 64);
    const gens = new Float64Array(4);
    const isStale = (id: number): boolean => idx.seg_gen[id] < gens[idx.cache_seg_id[id]];
    for (let i = 0; i < 40; i++) idx.insert(0, key(idx, i * 10, 10, 0, 0, i % 4, 0), NIL, isStale);
    idx.insert(0, key(idx, 1000, 10, 0, KEY_F_EMPTY, 1, 0), NIL, isStale);
    gens[1] = 1; // keys of segment 1 are now stale: 10 of them (the EMPTY one is not)
    expect(idx.purgeStale(0, isStale, 3)).toBe(3);
    expect(idx.count(0)).toBe(38);
    // purgeStale went in order: keys at 10, 50 and 90 are gone, the one at 130 is still there.
    expect(idx.off[idx.ceiling(0, 10)]).toBe(20);
    const stale_t = idx.ceiling(0, 131);
    expect(idx.off[stale_t]).toBe(130);
    expect(isStale(stale_t)).toBe(true);
    // A stale T containing K is dropped rather than split: no spare needed.
    expect(idx.insert(0, key(idx, 132, 2, 0, 0, 0, 0), NIL, isStale)).toBe(INSERT_OK);
    expect(idx.isFree(stale_t)).toBe(true);
    expect(idx.purgeStale(0, isStale, 100)).toBeLessThanOrEqual(6);
    for (let id = idx.first(0); id !== NIL; id = idx.next(0, id)) {
      expect(isStale(id)).toBe(idx.off[id] === 1000); // only the EMPTY placeholder, never purged
    }
    idx.checkInvariants(0);
  });

  test("remove, ver and the miss-completion check", () => {
    const idx = makeIndex(1, 8);
    const p = key(idx, 0, 4096, 0, KEY_F_EMPTY);
    idx.insert(0, p, NIL, never);
    const ver = idx.ver[p];
    // An overlapping write deletes the placeholder; the node is reused for another key.
    idx.insert(0, key(idx, 0, 4096, 100), NIL, never);
    expect(idx.ver[p]).toBe(ver + 1);
    expect(idx.flags[p]).toBe(0);
    const again = idx.allocNode();
    expect(again).toBe(p); // LIFO reuse
    expect(idx.ver[again]).not.toBe(ver);
    idx.freeNode(again);
    expect(() => idx.freeNode(again)).toThrow(AssertionError);
    const q = key(idx, 8192, 512);
    idx.insert(0, q, NIL, never);
    idx.remove(0, q);
    expect(idx.count(0)).toBe(1);
    expect(() => idx.remove(0, q)).toThrow(AssertionError);
  });

  test("insertNoFixup, unlink and ceilingPurge", () => {
    const idx = makeIndex(1, 16);
    const gens = new Float64Array(2);
    const isStale = (id: number): boolean => idx.seg_gen[id] < gens[idx.cache_seg_id[id]];
    const a = key(idx, 0, 100, 0, 0, 0, 0);
    const b = key(idx, 100, 100, 0, 0, 1, 0);
    const c = key(idx, 200, 100, 0, 0, 0, 0);
    idx.insertNoFixup(0, b);
    idx.insertNoFixup(0, a);
    idx.insertNoFixup(0, c);
    expect(() => idx.insertNoFixup(0, key(idx, 150, 100))).toThrow(AssertionError);
    expect(dump(idx, 0).map((k) => k[0])).toEqual([0, 100, 200]);
    // unlink keeps the node: it can be edited privately and linked again.
    idx.unlink(0, c);
    expect(idx.isFree(c)).toBe(false);
    idx.off[c] = 300;
    idx.insert(0, c, NIL, isStale);
    expect(dump(idx, 0).map((k) => k[0])).toEqual([0, 100, 300]);
    gens[1] = 1; // b is stale now
    expect(idx.ceiling(0, 150)).toBe(b);
    expect(idx.ceilingPurge(0, 150, isStale)).toBe(c);
    expect(idx.isFree(b)).toBe(true);
    expect(dump(idx, 0).map((k) => k[0])).toEqual([0, 300]);
  });

  test("pool exhaustion returns NIL and corrupts nothing", () => {
    const N = 20;
    const idx = makeIndex(2, N);
    const ids: number[] = [];
    for (let i = 0; i < N; i++) ids.push(idx.allocNode());
    expect(new Set(ids).size).toBe(N);
    expect(idx.allocNode()).toBe(NIL);
    expect(idx.allocNode()).toBe(NIL);
    expect(idx.nodesFree()).toBe(0);
    for (let i = 0; i < N; i++) {
      idx.setKey(ids[i], (i % 2) * SUBTREE_SPAN + i * 100, 100, 0, i, 0, 0);
      expect(idx.insert(i % 2, ids[i], NIL, never)).toBe(INSERT_OK);
    }
    expect(idx.allocNode()).toBe(NIL);
    expect(idx.checkInvariants(0) + idx.checkInvariants(1)).toBe(N);
    expect(idx.checkPool()).toBe(0);
    idx.remove(1, ids[1]);
    expect(idx.checkPool()).toBe(1);
    expect(idx.allocNode()).toBe(ids[1]);
    expect(idx.allocNode()).toBe(NIL);
  });

  test("waitForNodes: times out on an empty pool, returns at once when nodes are free", () => {
    const idx = makeIndex(1, 2);
    expect(idx.waitForNodes(1, 0)).toBe(true);
    const a = idx.allocNode();
    const b = idx.allocNode();
    const t0 = performance.now();
    expect(idx.waitForNodes(1, 20)).toBe(false);
    expect(performance.now() - t0).toBeGreaterThanOrEqual(15);
    idx.freeNode(a);
    idx.freeNode(b);
    expect(idx.waitForNodes(2, 1000)).toBe(true);
  });
});

// ------------------------------------------------------------------ model-based random test

interface Rng {
  (): number;
  int(n: number): number;
}

function rng(seed: number): Rng {
  const f = makeRng(seed) as Rng;
  f.int = (n: number) => Math.floor(f() * n);
  return f;
}

interface Config {
  name: string;
  n_subtrees: number;
  windows: ModelWindow[];
  U: number;
  W: number;
  nodes_max: number;
  ops: number;
  seeds: number;
}

const N_SEGS = 4;

/** Runs one seed; returns the number of operations done. Throws with the step on mismatch. */
function runModel(cfg: Config, seed: number): number {
  const r = rng(seed * 7919 + cfg.nodes_max);
  const idx = new KeyIndex(createKeyIndexShared(cfg.n_subtrees, cfg.nodes_max, seed));
  const gens = new Float64Array(N_SEGS);
  const model = new IndexModel(idx, cfg.windows, cfg.U, cfg.W, gens);
  const isStale = (id: number): boolean => model.isStale(id);
  const pending: { id: number; ver: number; w: number }[] = [];
  const U = cfg.U;
  const W = cfg.W;
  let exhausted = 0;

  const randomKeyIn = (s: number): number => {
    const n = idx.count(s);
    if (n === 0) return NIL;
    let id = idx.first(s);
    for (let i = r.int(n); i > 0; i--) id = idx.next(s, id);
    return id;
  };

  /** A random range [start, end) in units of window w, biased towards interesting relations. */
  const randomRange = (w: number): [number, number] => {
    const s = cfg.windows[w].s;
    const p = r();
    if (p < 0.15) {
      const t = randomKeyIn(s);
      if (t !== NIL) {
        const a = model.unit(w, idx.off[t]) - w * W;
        const b = a + idx.len[t] / U;
        const q = r();
        if (q < 0.5) return [a, b]; // exactly T
        if (q < 0.75 && b < W) return [b, b + 1 + r.int(W - b)]; // adjacent after
        if (a > 0) return [r.int(a), a]; // adjacent before
        return [a, b];
      }
    }
    let len: number;
    const q = r();
    if (q < 0.45) len = 1 + r.int(Math.min(8, W));
    else if (q < 0.8) len = 1 + r.int(Math.max(1, W >> 4));
    else if (q < 0.97) len = 1 + r.int(W);
    else len = W;
    const a = r.int(W - len + 1);
    return [a, a + len];
  };

  const fail = (step: number, what: string): never => {
    throw new Error(`${cfg.name} seed ${seed} step ${step}: ${what}`);
  };

  const takeSpare = (): number => (r() < 0.85 ? idx.allocNode() : NIL);

  for (let step = 0; step < cfg.ops; step++) {
    const w = r.int(cfg.windows.length);
    const s = cfg.windows[w].s;
    const base = cfg.windows[w].base;
    const op = r();
    if (op < 0.62) {
      // insert
      const k = idx.allocNode();
      if (k === NIL) {
        if (idx.nodesFree() !== 0) fail(step, "allocNode returned NIL with free nodes");
        exhausted++;
        // Make room the way GC would: drop a random key.
        const t = randomKeyIn(s);
        if (t !== NIL) {
          model.drop(t);
          idx.remove(s, t);
        }
      } else {
        const [a, b] = randomRange(w);
        const empty = r() < 0.2;
        const seg = r.int(N_SEGS);
        const seg_off = r.int((SEG_DATA_SIZE - (b - a) * U) / U) * U;
        idx.setKey(k, base + a * U, (b - a) * U, empty ? 0 : seg, empty ? 0 : seg_off, empty ? 0 : gens[seg], empty ? KEY_F_EMPTY : 0);
        if (!empty && r() < 0.5) idx.setCrc(k, r.int(0x1_0000_0000), seg_off, (b - a) * U);
        model.adopt(k);
        const spare = takeSpare();
        const want = model.fixup(w, base + a * U, base + b * U, spare, NIL);
        const got = idx.insert(s, k, spare, isStale);
        if (got !== want) fail(step, `insert [${a}, ${b}) returned ${got}, model ${want}`);
        if (got === INSERT_NEED_SPARE) {
          idx.freeNode(k);
        } else {
          model.fixup(w, base + a * U, base + b * U, NIL, k); // links k; nothing overlaps now
          if (empty) pending.push({ id: k, ver: idx.ver[k], w });
        }
        if (spare !== NIL && got !== INSERT_OK_SPARE_USED) idx.freeNode(spare);
      }
    } else if (op < 0.72) {
      const [a, b] = randomRange(w);
      const spare = takeSpare();
      const want = model.fixup(w, base + a * U, base + b * U, spare, NIL);
      const got = idx.removeRange(s, base + a * U, base + b * U, spare, isStale);
      if (got !== want) fail(step, `removeRange [${a}, ${b}) returned ${got}, model ${want}`);
      if (spare !== NIL && got !== INSERT_OK_SPARE_USED) idx.freeNode(spare);
    } else if (op < 0.8) {
      // miss completion of a placeholder
      if (pending.length > 0) {
        const i = r.int(pending.length);
        const p = pending[i];
        pending[i] = pending[pending.length - 1];
        pending.pop();
        const ps = cfg.windows[p.w].s;
        const alive = idx.ver[p.id] === p.ver;
        if (alive !== model.placeholderAlive(p.id, p.ver)) fail(step, `placeholder ${p.id}: index alive ${alive}, model disagrees`);
        if (alive) {
          if ((idx.flags[p.id] & KEY_F_EMPTY) === 0) fail(step, `live placeholder ${p.id} lost EMPTY`);
          if (r() < 0.25) {
            model.drop(p.id); // backing read failed
            idx.remove(ps, p.id);
            if (idx.ver[p.id] !== ((p.ver + 1) >>> 0)) fail(step, "ver not bumped by remove");
          } else {
            const seg = r.int(N_SEGS);
            idx.cache_seg_id[p.id] = seg;
            idx.seg_off[p.id] = r.int((SEG_DATA_SIZE - idx.len[p.id]) / U) * U;
            idx.seg_gen[p.id] = gens[seg];
            idx.flags[p.id] = KEY_F_CLEAN;
            model.fill(p.id, p.w);
          }
        }
      }
    } else if (op < 0.86) {
      const t = randomKeyIn(s);
      if (t !== NIL) {
        const ver = idx.ver[t];
        model.drop(t);
        idx.remove(s, t);
        if (idx.ver[t] !== ((ver + 1) >>> 0)) fail(step, "ver not bumped by remove");
      }
    } else if (op < 0.93) {
      let stale_before = 0;
      for (let id = idx.first(s); id !== NIL; id = idx.next(s, id)) if ((idx.flags[id] & KEY_F_EMPTY) === 0 && isStale(id)) stale_before++;
      const budget = 1 + r.int(6);
      const n = idx.purgeStale(s, isStale, budget);
      if (n !== Math.min(budget, stale_before)) fail(step, `purgeStale removed ${n} of ${stale_before} (budget ${budget})`);
    } else {
      const seg = r.int(N_SEGS);
      gens[seg]++;
      model.invalidateSegment(seg);
    }
    const err = model.compare();
    if (err !== null) fail(step, err);
    let linked = 0;
    for (let t = 0; t < cfg.n_subtrees; t++) linked += idx.count(t);
    if (linked + idx.nodesFree() !== cfg.nodes_max) fail(step, `node accounting: ${linked} linked + ${idx.nodesFree()} free != ${cfg.nodes_max}`);
  }
  idx.checkPool();
  if (cfg.nodes_max < 64 && exhausted === 0) throw new Error(`${cfg.name} seed ${seed}: the pool never ran out`);
  return cfg.ops;
}

const S = SUBTREE_SPAN;
const configs: Config[] = [
  {
    name: "bytes, 3 windows (subtree start, end, middle)",
    n_subtrees: 4,
    windows: [
      { s: 0, base: 0 },
      { s: 1, base: 2 * S - 2048 },
      { s: 3, base: 3 * S + 1_000_000 },
    ],
    U: 1,
    W: 2048,
    nodes_max: 4096,
    ops: 2500,
    seeds: 20,
  },
  {
    name: "4 KiB units over whole subtrees (keys up to 4 MiB)",
    n_subtrees: 2,
    windows: [
      { s: 0, base: 0 },
      { s: 1, base: S },
    ],
    U: 4096,
    W: 1024,
    nodes_max: 4096,
    ops: 2500,
    seeds: 12,
  },
  {
    name: "sectors over a whole single-subtree device",
    n_subtrees: 1,
    windows: [{ s: 0, base: 0 }],
    U: 512,
    W: 8192,
    nodes_max: 8192,
    ops: 2000,
    seeds: 5,
  },
  {
    name: "tiny pool (exhaustion)",
    n_subtrees: 2,
    windows: [
      { s: 0, base: 0 },
      { s: 1, base: S + 4096 },
    ],
    U: 1,
    W: 512,
    nodes_max: 24,
    ops: 2000,
    seeds: 12,
  },
];

describe("key index: model-based random test", () => {
  test("the configurations add up to at least 100k checked operations", () => {
    expect(configs.reduce((a, c) => a + c.seeds * c.ops, 0)).toBeGreaterThanOrEqual(100_000);
  });
  for (const cfg of configs) {
    test(`${cfg.name}: ${cfg.seeds} seeds x ${cfg.ops} ops`, () => {
      let done = 0;
      for (let seed = 1; seed <= cfg.seeds; seed++) done += runModel(cfg, seed);
      expect(done).toBe(cfg.seeds * cfg.ops);
    }, 60_000);
  }
});
