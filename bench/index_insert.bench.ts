/**
 * Rough cost of the key index's hot path (a benchmark, not part of the test run):
 *   ./node_modules/.bin/bun test ./bench/index_insert.bench.ts
 * One op = lock subtree, alloc key + spare, insert with fixup, free what was not used, unlock:
 * what the write path does per key.
 */
import { test } from "bun:test";
import { SUBTREE_SPAN } from "../core/format/constants.ts";
import { makeRng as rng } from "../core/persist/sim.ts";
import { createKeyIndexShared, INSERT_NEED_SPARE, INSERT_OK_SPARE_USED, KeyIndex, NIL } from "../core/index/key_index.ts";


interface Case {
  name: string;
  n_subtrees: number;
  nodes_max: number;
  /** Offset and length of the next write. */
  next: (r: () => number) => [number, number];
  ops: number;
}

const gens = new Float64Array(1);

function runCase(c: Case): { ns_per_op: number; keys: number } {
  const idx = new KeyIndex(createKeyIndexShared(c.n_subtrees, c.nodes_max, 7));
  const isStale = (id: number): boolean => idx.seg_gen[id] < gens[0];
  const r = rng(12345);
  let seg_off = 0;
  const one = (): void => {
    const [off, len] = c.next(r);
    const s = c.n_subtrees === 1 ? 0 : Math.floor(off / SUBTREE_SPAN);
    const k = idx.allocNode();
    const spare = idx.allocNode();
    if (k === NIL) throw new Error("pool too small for the benchmark");
    idx.setKey(k, off, len, 0, seg_off, 0, 0);
    seg_off = (seg_off + len) % (1 << 24);
    idx.lockSubtree(s);
    const res = idx.insert(s, k, spare, isStale);
    idx.unlockSubtree(s);
    if (res === INSERT_NEED_SPARE) throw new Error("spare was passed");
    if (res !== INSERT_OK_SPARE_USED && spare !== NIL) idx.freeNode(spare);
  };
  for (let i = 0; i < c.ops / 4; i++) one(); // warm up and fill
  const t0 = performance.now();
  for (let i = 0; i < c.ops; i++) one();
  const ns_per_op = ((performance.now() - t0) * 1e6) / c.ops;
  let keys = 0;
  for (let s = 0; s < c.n_subtrees; s++) keys += idx.count(s);
  return { ns_per_op, keys };
}

const K4 = 4096;
const cases: Case[] = [
  {
    name: "4 KiB random writes, one 4 MiB subtree (~1k keys)",
    n_subtrees: 1,
    nodes_max: 4096,
    next: (r) => [Math.floor(r() * 1024) * K4, K4],
    ops: 100_000,
  },
  {
    name: "4 KiB random writes over 1 GiB (256 subtrees)",
    n_subtrees: 256,
    nodes_max: 300_000,
    next: (r) => [Math.floor(r() * 262_144) * K4, K4],
    ops: 100_000,
  },
  {
    name: "512 B..64 KiB unaligned random writes, one subtree",
    n_subtrees: 1,
    nodes_max: 16_384,
    next: (r) => {
      const len = 512 + Math.floor(r() * 65_024);
      return [Math.floor(r() * (SUBTREE_SPAN - len)), len];
    },
    ops: 100_000,
  },
  {
    name: "4 KiB random writes, single private tree of ~100k keys",
    n_subtrees: 1,
    nodes_max: 200_000,
    next: (r) => {
      // Offsets from many 4 MiB regions, never crossing a boundary (private trees accept them).
      return [Math.floor(r() * 131_072) * K4, K4];
    },
    ops: 200_000,
  },
];

test("insert cost (rough)", () => {
  const lines: string[] = [];
  for (const c of cases) {
    const { ns_per_op, keys } = runCase(c);
    lines.push(`${c.name}: ${ns_per_op.toFixed(0)} ns/insert, ${keys} keys at the end`);

  }
  console.log(lines.join("\n"));
}, 60_000);
