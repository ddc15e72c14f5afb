/**
 * Reference model of the key index for tests: a per-unit owner array (a unit is U bytes; U = 1
 * gives the per-byte model) over a window of each subtree, plus per-key metadata keyed by node id.
 *
 * The model knows nothing about trees. It applies reference §2.4's table at key level by finding
 * each key's extent as a run of equal owners, and it treats stale keys as gone the moment their
 * segment's generation is bumped (a stale key is invisible to every reader, so "visible mapping"
 * is what index and model must agree on). The comparison, compare(), is exact: every unit mapped
 * by the same node id at the same cache position, every gap a gap, stale index keys only over
 * gaps.
 */
import {
  INSERT_NEED_SPARE,
  INSERT_OK,
  INSERT_OK_SPARE_USED,
  KEY_F_EMPTY,
  KeyIndex,
  NIL,
  type InsertResult,
} from "../../core/index/key_index.ts";

export interface ModelWindow {
  /** Subtree number. */
  s: number;
  /** Byte offset of unit 0. */
  base: number;
}

export class IndexModel {
  /** Owner node id per unit, NIL for a gap; windows one after the other. */
  readonly owner: Int32Array;
  /** seg_off (bytes) of each owned non-EMPTY unit's first byte. */
  readonly pos: Float64Array;
  /** Units owned per node id. */
  readonly units_of: Int32Array;
  // Per node id metadata of the model's live key with that id.
  readonly seg: Int32Array;
  readonly gen: Float64Array;
  readonly empty: Uint8Array;
  readonly crc: Uint32Array;
  readonly crc_seg_off: Uint32Array;
  readonly crc_len: Uint32Array;
  readonly crc_valid: Uint8Array;
  /** idx.ver[id] when the model's key with this id was created. */
  readonly inc: Uint32Array;
  owned_units = 0;

  constructor(
    readonly idx: KeyIndex,
    readonly windows: ModelWindow[],
    /** Bytes per unit. */
    readonly U: number,
    /** Units per window. */
    readonly W: number,
    /** Current generation per segment (shared with the test's isStale). */
    readonly gens: Float64Array,
  ) {
    const n = windows.length * W;
    this.owner = new Int32Array(n).fill(NIL);
    this.pos = new Float64Array(n);
    const m = idx.nodes_max;
    this.units_of = new Int32Array(m);
    this.seg = new Int32Array(m);
    this.gen = new Float64Array(m);
    this.empty = new Uint8Array(m);
    this.crc = new Uint32Array(m);
    this.crc_seg_off = new Uint32Array(m);
    this.crc_len = new Uint32Array(m);
    this.crc_valid = new Uint8Array(m);
    this.inc = new Uint32Array(m);
  }

  /** Global unit index of byte `off` in window w. */
  unit(w: number, off: number): number {
    return w * this.W + (off - this.windows[w].base) / this.U;
  }

  private clear(g0: number, g1: number): void {
    for (let g = g0; g < g1; g++) {
      const o = this.owner[g];
      if (o !== NIL) {
        this.units_of[o]--;
        this.owned_units--;
        this.owner[g] = NIL;
      }
    }
  }

  private assign(g0: number, g1: number, id: number, pos0: number | null): void {
    for (let g = g0; g < g1; g++) {
      const o = this.owner[g];
      if (o !== NIL) this.units_of[o]--;
      else this.owned_units++;
      this.owner[g] = id;
      this.units_of[id]++;
      if (pos0 !== null) this.pos[g] = pos0 + (g - g0) * this.U;
    }
  }

  /** Record the key metadata of a node the test just filled in (before insert). */
  adopt(id: number): void {
    const idx = this.idx;
    this.seg[id] = idx.cache_seg_id[id];
    this.gen[id] = idx.seg_gen[id];
    this.empty[id] = (idx.flags[id] & KEY_F_EMPTY) !== 0 ? 1 : 0;
    this.crc[id] = idx.data_crc[id];
    this.crc_seg_off[id] = idx.crc_seg_off[id];
    this.crc_len[id] = idx.crc_len[id];
    this.crc_valid[id] = idx.crc_len[id] > 0 ? 1 : 0;
    this.inc[id] = idx.ver[id];
  }

  private cloneMeta(dst: number, src: number): void {
    this.seg[dst] = this.seg[src];
    this.gen[dst] = this.gen[src];
    this.empty[dst] = this.empty[src];
    this.crc[dst] = this.crc[src];
    this.crc_seg_off[dst] = this.crc_seg_off[src];
    this.crc_len[dst] = this.crc_len[src];
    this.crc_valid[dst] = this.crc_valid[src];
    this.inc[dst] = this.idx.ver[dst];
  }

  /**
   * Apply the §2.4 table for K = [ks, ke) (bytes) in window w; link key k over it if k !== NIL
   * (k's metadata must have been adopted). Returns what the index must return.
   */
  fixup(w: number, ks: number, ke: number, spare: number, k: number): InsertResult {
    const g_lo = w * this.W;
    const g_hi = g_lo + this.W;
    const gs = this.unit(w, ks);
    const ge = this.unit(w, ke);
    // Keys overlapping K, in order, with their full extents.
    const ts: number[] = [];
    const te: number[] = [];
    const ids: number[] = [];
    for (let g = gs; g < ge; g++) {
      const o = this.owner[g];
      if (o === NIL) continue;
      let a = g;
      while (a > g_lo && this.owner[a - 1] === o) a--;
      let b = g + 1;
      while (b < g_hi && this.owner[b] === o) b++;
      ids.push(o);
      ts.push(a);
      te.push(b);
      g = b - 1;
    }
    let result: InsertResult = INSERT_OK;
    if (ids.length === 1 && ts[0] < gs && te[0] > ge && this.empty[ids[0]] === 0) {
      if (spare === NIL) return INSERT_NEED_SPARE;
      result = INSERT_OK_SPARE_USED;
    }
    for (let i = 0; i < ids.length; i++) {
      const id = ids[i];
      const a = ts[i];
      const b = te[i];
      const empty = this.empty[id] === 1;
      if (a >= gs) {
        if (b >= ge) {
          if (empty || b === ge) this.clear(a, b);
          else this.clear(a, ge);
        } else {
          this.clear(a, b);
        }
      } else if (b > ge) {
        if (empty) {
          this.clear(gs, b);
        } else {
          this.cloneMeta(spare, id);
          for (let g = ge; g < b; g++) {
            this.units_of[id]--;
            this.units_of[spare]++;
            this.owner[g] = spare;
          }
          this.clear(gs, ge);
        }
      } else {
        this.clear(gs, b);
      }
    }
    if (k !== NIL) this.assign(gs, ge, k, this.empty[k] === 1 ? null : this.idx.seg_off[k]);
    return result;
  }

  /** Key id deleted outright (remove, failed miss). */
  drop(id: number): void {
    for (let g = 0; g < this.owner.length; g++) if (this.owner[g] === id) this.clear(g, g + 1);
  }

  /** A placeholder became a real key: the test already set its fields in the index. */
  fill(id: number, w: number): void {
    const idx = this.idx;
    this.seg[id] = idx.cache_seg_id[id];
    this.gen[id] = idx.seg_gen[id];
    this.empty[id] = 0;
    const g0 = this.unit(w, idx.off[id]);
    const g1 = g0 + idx.len[id] / this.U;
    for (let g = g0; g < g1; g++) this.pos[g] = idx.seg_off[id] + (g - g0) * this.U;
  }

  /** Segment seg's generation was bumped: its keys became invisible. */
  invalidateSegment(seg: number): void {
    for (let g = 0; g < this.owner.length; g++) {
      const o = this.owner[g];
      if (o !== NIL && this.empty[o] === 0 && this.seg[o] === seg) this.clear(g, g + 1);
    }
  }

  /** Whether the model's placeholder created with (id, ver) is still alive. */
  placeholderAlive(id: number, ver: number): boolean {
    return this.units_of[id] > 0 && this.inc[id] === ver && this.empty[id] === 1;
  }

  isStale(id: number): boolean {
    return this.idx.seg_gen[id] < this.gens[this.idx.cache_seg_id[id]];
  }

  /**
   * Compare the index with the model; returns an error description or null. Also runs the
   * index's own invariant check on every window's subtree.
   */
  compare(): string | null {
    const idx = this.idx;
    let visible_units = 0;
    for (let w = 0; w < this.windows.length; w++) {
      const s = this.windows[w].s;
      idx.checkInvariants(s);
      const base = this.windows[w].base;
      const end = base + this.W * this.U;
      for (let id = idx.first(s); id !== NIL; id = idx.next(s, id)) {
        const off = idx.off[id];
        const len = idx.len[id];
        if (off < base || off + len > end) return `key ${id} [${off}, ${off + len}) outside window ${w}`;
        if (off % this.U !== 0 || len % this.U !== 0) return `key ${id} not unit aligned`;
        const g0 = this.unit(w, off);
        const g1 = g0 + len / this.U;
        const empty = (idx.flags[id] & KEY_F_EMPTY) !== 0;
        if (!empty && this.isStale(id)) {
          for (let g = g0; g < g1; g++) {
            if (this.owner[g] !== NIL) return `stale key ${id} [${off}, ${off + len}) over live unit ${g} (owner ${this.owner[g]})`;
          }
          continue;
        }
        visible_units += g1 - g0;
        if (this.units_of[id] !== g1 - g0) return `key ${id} [${off}, ${off + len}): model has ${this.units_of[id]} units for it, index ${g1 - g0}`;
        if ((this.empty[id] === 1) !== empty) return `key ${id}: EMPTY mismatch`;
        if (!empty) {
          if (idx.cache_seg_id[id] !== this.seg[id] || idx.seg_gen[id] !== this.gen[id]) return `key ${id}: segment mismatch`;
        }
        if (idx.crc_len[id] !== this.crc_len[id] || idx.crc_seg_off[id] !== this.crc_seg_off[id] || idx.data_crc[id] !== this.crc[id]) {
          return `key ${id}: crc fields changed`;
        }
        for (let g = g0; g < g1; g++) {
          if (this.owner[g] !== id) return `unit ${g} (byte ${base + (g - w * this.W) * this.U}): index says key ${id}, model says ${this.owner[g]}`;
          if (!empty) {
            const p = idx.seg_off[id] + (g - g0) * this.U;
            if (p !== this.pos[g]) return `unit ${g}: key ${id} maps it to seg_off ${p}, model ${this.pos[g]}`;
          }
        }
      }
    }
    if (visible_units !== this.owned_units) return `index maps ${visible_units} units, model ${this.owned_units}`;
    return null;
  }
}
