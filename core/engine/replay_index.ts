/**
 * The index half of replay. Keys arrive in log order; inserting each one (overlap fixup, then a
 * link) walks its subtree twice from the root, a chain of cache misses that bounded replay at
 * about 0.5 M keys/s. Subtrees are independent, so replay collects every live key first, then
 * handles one subtree at a time: its keys sorted by offset (log position breaking ties), and if
 * no two overlap the treap is built from them in O(n) (KeyIndex.buildSorted). A subtree whose
 * keys overlap is replayed key by key in log order through insert(), exactly as before, so later
 * keys still win.
 */
import { PcacheError } from "../errors.ts";
import { SUBTREE_SPAN } from "../format/constants.ts";
import { INSERT_OK_SPARE_USED, type KeyIndex, type SortedKeys } from "../index/key_index.ts";

/** Log positions within a subtree take the low 31 bits of the sort key; offsets the 22 above. */
const LOG_INDEX_SPAN = 2 ** 31;
const INITIAL_CAPACITY = 65_536;

/** Keys grouped by subtree (each group in log order): node ids with their offsets and lengths. */
interface Run {
  nodes: Int32Array;
  offs: Float64Array;
  lens: Uint32Array;
}

export class ReplayIndexBuilder {
  private nodes: Int32Array;
  /** Offsets and lengths kept beside the node ids: reading them back from the scattered nodes missed the cache. */
  private offs: Float64Array;
  private lens: Uint32Array;
  private n = 0;

  constructor(private readonly idx: KeyIndex) {
    const cap = Math.min(INITIAL_CAPACITY, Math.max(1, idx.nodes_max));
    this.nodes = new Int32Array(cap);
    this.offs = new Float64Array(cap);
    this.lens = new Uint32Array(cap);
  }

  /** A live key (private node with its fields set to off and len), in log order. */
  add(node: number, off: number, len: number): void {
    if (this.n === this.nodes.length) this.grow();
    this.nodes[this.n] = node;
    this.offs[this.n] = off;
    this.lens[this.n] = len;
    this.n++;
  }

  /** Link every collected key. Throws PcacheError if the pool has no spare node for a split. */
  finish(): { built_subtrees: number; inserted_subtrees: number } {
    const { idx, n } = this;
    // Counting sort by subtree; stable, so each subtree's keys stay in log order.
    const start = new Int32Array(idx.n_subtrees + 1);
    for (let i = 0; i < n; i++) start[idx.subtreeOf(this.offs[i]) + 1]++;
    let longest = 0;
    for (let s = 0; s < idx.n_subtrees; s++) {
      longest = Math.max(longest, start[s + 1]);
      start[s + 1] += start[s];
    }
    const order: Run = { nodes: new Int32Array(n), offs: new Float64Array(n), lens: new Uint32Array(n) };
    const cursor = start.slice(0, idx.n_subtrees);
    for (let i = 0; i < n; i++) {
      const at = cursor[idx.subtreeOf(this.offs[i])]++;
      order.nodes[at] = this.nodes[i];
      order.offs[at] = this.offs[i];
      order.lens[at] = this.lens[i];
    }
    const sort_keys = new Float64Array(longest);
    const sorted: SortedKeys = { ids: new Int32Array(longest), offs: new Float64Array(longest), lens: new Uint32Array(longest) };
    const stack = new Int32Array(longest);
    const stack_prio = new Uint32Array(longest);
    let built_subtrees = 0;
    let inserted_subtrees = 0;
    for (let s = 0; s < idx.n_subtrees; s++) {
      const a = start[s];
      const m = start[s + 1] - a;
      if (m === 0) continue;
      if (this.sortedWithoutOverlap(s, order, a, m, sort_keys, sorted)) {
        idx.buildSorted(s, sorted, m, stack, stack_prio);
        built_subtrees++;
      } else {
        this.insertInLogOrder(s, order, a, m);
        inserted_subtrees++;
      }
    }
    return { built_subtrees, inserted_subtrees };
  }

  /** Fills sorted.ids/offs/lens[0..m) with subtree s's keys by offset; false if two of them overlap. */
  private sortedWithoutOverlap(
    s: number,
    order: Run,
    a: number,
    m: number,
    sort_keys: Float64Array,
    sorted: SortedKeys,
  ): boolean {
    const { nodes, offs, lens } = order;
    const base = s * SUBTREE_SPAN;
    for (let j = 0; j < m; j++) sort_keys[j] = (offs[a + j] - base) * LOG_INDEX_SPAN + j;
    const keys = sort_keys.subarray(0, m);
    keys.sort();
    let prev_end = -1;
    for (let j = 0; j < m; j++) {
      const at = a + (keys[j] % LOG_INDEX_SPAN);
      if (offs[at] < prev_end) return false;
      prev_end = offs[at] + lens[at];
      sorted.ids[j] = nodes[at];
      sorted.offs[j] = offs[at];
      sorted.lens[j] = lens[at];
    }
    return true;
  }

  private insertInLogOrder(s: number, order: Run, a: number, m: number): void {
    const idx = this.idx;
    let spare = -1;
    for (let j = 0; j < m; j++) {
      if (spare < 0) spare = idx.allocNode();
      if (spare < 0) {
        throw new PcacheError(`index pool exhausted during replay (${idx.nodes_max} nodes); start with a larger --index-nodes`);
      }
      if (idx.insert(s, order.nodes[a + j], spare, null) === INSERT_OK_SPARE_USED) spare = -1;
    }
    if (spare >= 0) idx.freeNode(spare);
  }

  private grow(): void {
    const cap = Math.min(this.nodes.length * 2, this.idx.nodes_max);
    if (cap <= this.nodes.length) throw new PcacheError(`replay: more live keys than index nodes (${this.idx.nodes_max})`);
    const nodes = new Int32Array(cap);
    const offs = new Float64Array(cap);
    const lens = new Uint32Array(cap);
    nodes.set(this.nodes);
    offs.set(this.offs);
    lens.set(this.lens);
    this.nodes = nodes;
    this.offs = offs;
    this.lens = lens;
  }
}
