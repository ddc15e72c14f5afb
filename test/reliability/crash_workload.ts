/**
 * The crash explorer's workload and its model.
 *
 * planWorkload() turns a seed into a list of operations up front, so the workload never depends
 * on what the engine did: rerunning a seed with another crash point replays the same operations.
 *
 * Contract is the durability contract as a per-byte model:
 *   - a byte covered by a write acknowledged before the last completed FLUSH, or by an
 *     acknowledged FUA write, reads that write's value or a later write's;
 *   - any other byte reads its value at that point or one of the values written since;
 *   - never anything else.
 *
 * BackingOracle is the backing prefix invariant: the backing device holds the initial image with
 * the ksets written back so far applied, in log order; only the kset at dirty_tail may be partly
 * there, and once dirty_tail is persisted past a kset all of it must be.
 */
import { POS_DIRTY_TAIL, POS_KEY_HEAD, POS_KEY_TAIL } from "../../core/engine/shared_state.ts";
import { KEY_F_CLEAN, SUBTREE_SPAN } from "../../core/format/constants.ts";
import { type CachePos, posEqual, posToString } from "../../core/log/position.ts";
import { readKsetAt } from "../../core/log/read_kset.ts";
import { walkLog } from "../../core/log/walk.ts";
import { makeRng } from "../../core/persist/sim.ts";
import type { Harness } from "../helpers/engine_harness.ts";

export type Op =
  | { kind: "write" | "zero" | "trim"; off: number; len: number; fua: boolean }
  | { kind: "read"; off: number; len: number }
  /** n 4 KiB writes (no FUA) over 32 blocks at off: ksets close inside one flush epoch. */
  | { kind: "burst"; off: number; n: number }
  | { kind: "writeback"; steps: number }
  | { kind: "flush" | "gc" | "restart" };

/** Cumulative weights of the operations (out of 100). */
const MIX: Array<[Op["kind"], number]> = [
  ["write", 31],
  ["burst", 34],
  ["zero", 39],
  ["trim", 44],
  ["flush", 54],
  ["read", 66],
  ["writeback", 84],
  ["gc", 96],
  ["restart", 100],
];

/** Blocks a burst writes over (each several times). */
export const BURST_BLOCKS = 32;

/** A length: mostly small and unaligned, some 4 KiB multiples, a few large (crossing 4 MiB). */
function pickRange(rng: () => number, device_bytes: number): { off: number; len: number } {
  const r = rng();
  let len: number;
  if (r < 0.55) len = 1 + Math.floor(rng() * 8192);
  else if (r < 0.92) len = 4096 * (1 + Math.floor(rng() * 32));
  else len = 4096 * (1 + Math.floor(rng() * 256));
  len = Math.min(len, device_bytes);
  let off = Math.floor(rng() * (device_bytes - len + 1));
  if (rng() < 0.5) off -= off % 4096;
  // Now and then start just before a 4 MiB boundary, where requests are cut into two keys.
  if (rng() < 0.1 && device_bytes > SUBTREE_SPAN && len < SUBTREE_SPAN) off = Math.max(0, SUBTREE_SPAN - Math.floor(len / 2));
  return { off, len };
}

export function planWorkload(seed: number, ops: number, device_bytes: number): Op[] {
  const rng = makeRng(seed);
  const plan: Op[] = [];
  for (let i = 0; i < ops; i++) {
    const r = rng() * 100;
    const kind = MIX.find(([, w]) => r < w)![0];
    if (kind === "write" || kind === "zero" || kind === "trim") {
      plan.push({ kind, ...pickRange(rng, device_bytes), fua: rng() < 0.25 });
    } else if (kind === "burst") {
      // 32 blocks inside one 4 MiB region, so every write goes to the same kset.
      const span = BURST_BLOCKS * 4096;
      const region = Math.floor(rng() * Math.max(1, Math.floor(device_bytes / SUBTREE_SPAN))) * SUBTREE_SPAN;
      const room = Math.min(SUBTREE_SPAN, device_bytes - region) - span;
      plan.push({ kind, off: region + 4096 * Math.floor((rng() * Math.max(0, room)) / 4096), n: 140 + Math.floor(rng() * 120) });
    } else if (kind === "read") {
      plan.push({ kind, ...pickRange(rng, device_bytes) });
    } else if (kind === "writeback") {
      plan.push({ kind, steps: 1 + Math.floor(rng() * 6) });
    } else {
      plan.push({ kind });
    }
  }
  return plan;
}

export function describeOp(op: Op): string {
  switch (op.kind) {
    case "write":
    case "zero":
    case "trim":
      return `${op.kind} ${op.off}+${op.len}${op.fua ? " fua" : ""}`;
    case "read":
      return `read ${op.off}+${op.len}`;
    case "burst":
      return `burst of ${op.n} 4 KiB writes over ${op.off}+${BURST_BLOCKS * 4096}`;
    case "writeback":
      return `writeback ${op.steps} step(s)`;
    default:
      return op.kind;
  }
}

/**
 * Per byte: the oldest value still allowed (floor_val) and the first write whose values also
 * count: the later of the last FLUSH (flush_op, one number) and the byte's last FUA write (fua_op).
 */
export class Contract {
  readonly floor_val: Uint8Array;
  /** Per byte: 1 + index of the last acknowledged FUA write covering it (0: none). */
  readonly fua_op: Int32Array;
  flush_op = 0;
  /** What a read returns now (every acknowledged write applied). */
  readonly model: Uint8Array;
  readonly ops: Array<{ off: number; data: Uint8Array }> = [];

  constructor(initial: Uint8Array) {
    this.floor_val = initial.slice();
    this.model = initial.slice();
    this.fua_op = new Int32Array(initial.length);
  }

  /** A write was issued (it may or may not be acknowledged before the crash). */
  issue(off: number, data: Uint8Array): number {
    this.ops.push({ off, data });
    return this.ops.length - 1;
  }

  /** The write was acknowledged; with FUA its bytes are durable from now on. */
  acked(i: number, fua: boolean): void {
    const { off, data } = this.ops[i];
    this.model.set(data, off);
    if (!fua) return;
    this.floor_val.set(data, off);
    this.fua_op.fill(i + 1, off, off + data.length);
  }

  /** A FLUSH (or a clean shutdown) completed: everything acknowledged is the new floor. */
  flushed(): void {
    this.floor_val.set(this.model);
    this.flush_op = this.ops.length;
  }

  /** First byte that breaks the contract, or null. Blocks equal to the floor are skipped fast. */
  check(got: Uint8Array): string | null {
    const block = 4096;
    for (let at = 0; at < got.length; at += block) {
      const end = Math.min(at + block, got.length);
      if (bytesEqual(got.subarray(at, end), this.floor_val.subarray(at, end))) continue;
      for (let b = at; b < end; b++) {
        const problem = this.checkByte(b, got[b]);
        if (problem !== null) return problem;
      }
    }
    return null;
  }

  private checkByte(b: number, v: number): string | null {
    if (v === this.floor_val[b]) return null;
    const first = Math.max(this.flush_op, this.fua_op[b]);
    for (let i = first; i < this.ops.length; i++) {
      const op = this.ops[i];
      if (b >= op.off && b < op.off + op.data.length && op.data[b - op.off] === v) return null;
    }
    return `byte ${b}: read ${v}, allowed ${this.floor_val[b]} or a value written by write #${first} or later`;
  }
}

export function bytesEqual(a: Uint8Array, b: Uint8Array): boolean {
  return Buffer.from(a.buffer, a.byteOffset, a.length).equals(Buffer.from(b.buffer, b.byteOffset, b.length));
}

/** First differing byte of two images, described, or null when equal. */
export function firstDiff(got: Uint8Array, want: Uint8Array, what: string): string | null {
  if (got.length !== want.length) return `${what}: ${got.length} bytes, expected ${want.length}`;
  if (bytesEqual(got, want)) return null;
  for (let b = 0; b < got.length; b++) if (got[b] !== want[b]) return `${what}: byte ${b} is ${got[b]}, expected ${want[b]}`;
  return null;
}

/** A kset writeback took from dirty_tail: where it was, where it ended, and its dirty bytes. */
interface WrittenKset {
  pos: CachePos;
  end: CachePos;
  writes: Array<{ off: number; data: Uint8Array }>;
}

/**
 * What the backing device must hold: every completed kset applied, and the one in flight, except
 * that inside a flush epoch a byte may still hold an earlier value of that epoch (writeback
 * skips versions a later key of the epoch overwrote; core/log/flush_epochs.ts).
 */
export class BackingOracle {
  readonly done: Uint8Array;
  in_flight: WrittenKset | null = null;
  tail: CachePos;
  ksets = 0;
  log_rolls = 0;
  /** Flush boundaries (key_head after a FLUSH, a FUA write or a start) writeback has not reached. */
  private readonly boundaries = new Set<string>();
  /** The image when writeback entered the current epoch, and the ksets it completed since. */
  private epoch_base: Uint8Array;
  private epoch_writes: Array<{ off: number; data: Uint8Array }> = [];

  constructor(initial: Uint8Array, dirty_tail: CachePos) {
    this.done = initial.slice();
    this.tail = dirty_tail;
    this.epoch_base = initial.slice();
  }

  /** A boundary was recorded at key_head (call right after the flush, FUA write or start). */
  boundaryAt(h: Harness): void {
    const s = h.engine.ctx.s;
    this.boundaries.add(posToString({ cache_seg_id: s.pos[POS_KEY_HEAD], seg_off: s.pos[POS_KEY_HEAD + 1] }));
  }

  /** Writeback is at pos: a boundary there starts a new epoch. */
  private enter(pos: CachePos): void {
    if (!this.boundaries.delete(posToString(pos))) return;
    this.epoch_base = this.done.slice();
    this.epoch_writes = [];
  }

  /** Byte b may hold v: its value when the epoch began, or one written in the epoch so far. */
  private allowed(b: number, v: number, extra: WrittenKset | null): boolean {
    if (this.epoch_base[b] === v) return true;
    const lists = extra === null ? [this.epoch_writes] : [this.epoch_writes, extra.writes];
    for (const list of lists) for (const w of list) if (b >= w.off && b < w.off + w.data.length && w.data[b - w.off] === v) return true;
    return false;
  }

  /** First byte of backing that is neither as `want` nor allowed by the epoch, described. */
  private epochDiff(backing: Uint8Array, want: Uint8Array, what: string, extra: WrittenKset | null): string | null {
    if (firstDiff(backing, want, what) === null) return null;
    for (let b = 0; b < backing.length; b++) {
      if (backing[b] !== want[b] && !this.allowed(b, backing[b], extra)) return `${what}: byte ${b} is ${backing[b]}, expected ${want[b]} or a value of its flush epoch`;
    }
    return null;
  }

  /** Before a writeback step: note the kset at dirty_tail as the one being written back. */
  peek(h: Harness): void {
    const { s, media } = h.engine.ctx;
    const pos = { cache_seg_id: s.pos[POS_DIRTY_TAIL], seg_off: s.pos[POS_DIRTY_TAIL + 1] };
    this.enter(pos);
    const walk_meta = { n_segs: h.engine.meta.n_segs, seg_ids: h.engine.meta.seg_ids, seg_gens: s.seg_gens, data_crc: false };
    const k = readKsetAt(media.dom, walk_meta, pos, { backing_size_bytes: h.engine.size_bytes });
    if (k.kind === "end") {
      this.in_flight = null;
      return;
    }
    const end = k.kind === "last" ? { cache_seg_id: k.next_cache_seg_id, seg_off: 0 } : { cache_seg_id: pos.cache_seg_id, seg_off: pos.seg_off + k.size_bytes };
    const writes = k.kind === "last" ? [] : k.keys.filter((key) => (key.flags & KEY_F_CLEAN) === 0).map((key) => ({ off: key.off, data: media.dom.view(media.dataOff(key.cache_seg_id, key.cache_seg_off), key.len).slice() }));
    this.in_flight = { pos, end, writes };
  }

  /** The step moved dirty_tail: its kset is on the backing device for good. */
  completed(h: Harness): string | null {
    const k = this.in_flight;
    const s = h.engine.ctx.s;
    const now = { cache_seg_id: s.pos[POS_DIRTY_TAIL], seg_off: s.pos[POS_DIRTY_TAIL + 1] };
    if (k === null) return `writeback made progress with no kset at dirty_tail ${posToString(this.tail)}`;
    if (!posEqual(now, k.end)) return `writeback moved dirty_tail to ${posToString(now)}, expected ${posToString(k.end)}`;
    for (const w of k.writes) this.done.set(w.data, w.off);
    this.epoch_writes.push(...k.writes);
    if (k.writes.length === 0) this.log_rolls++;
    else this.ksets++;
    this.tail = k.end;
    this.in_flight = null;
    return null;
  }

  /** Check the backing image after the crash against the persisted dirty_tail. */
  check(backing: Uint8Array, dirty_tail: CachePos): string | null {
    const k = this.in_flight;
    if (posEqual(dirty_tail, this.tail)) {
      // At a boundary the epoch before is whole: nothing of it may be missing.
      if (k === null) this.enter(this.tail);
      // Nothing past dirty_tail may be complete, but the kset at it may be partly written.
      if (k === null || !posEqual(k.pos, this.tail)) return this.epochDiff(backing, this.done, "backing vs written-back prefix", null);
      const after = this.done.slice();
      for (const w of k.writes) after.set(w.data, w.off);
      if (firstDiff(backing, this.done, "") === null || firstDiff(backing, after, "") === null) return null;
      for (let b = 0; b < backing.length; b++) {
        if (backing[b] !== this.done[b] && backing[b] !== after[b] && !this.allowed(b, backing[b], k)) {
          return `backing byte ${b} is ${backing[b]}: neither before (${this.done[b]}) nor after (${after[b]}) the kset at dirty_tail, nor a value of its flush epoch`;
        }
      }
      return null;
    }
    if (k !== null && posEqual(dirty_tail, k.end)) {
      // dirty_tail was persisted past the kset: all of it must be on the backing device.
      const after = this.done.slice();
      for (const w of k.writes) after.set(w.data, w.off);
      const what = "backing vs prefix including the kset before dirty_tail";
      // Right at a boundary the epoch is whole; inside one, earlier values of it are allowed.
      return this.boundaries.has(posToString(k.end)) ? firstDiff(backing, after, what) : this.epochDiff(backing, after, what, k);
    }
    return `persisted dirty_tail ${posToString(dirty_tail)} is neither ${posToString(this.tail)} nor the end of the kset in flight${k ? ` (${posToString(k.end)})` : ""}`;
  }
}

/** key_tail <= dirty_tail <= key_head, in log order (walk from key_tail). */
export function tailOrderProblem(h: Harness): string | null {
  const s = h.engine.ctx.s;
  const at = (i: number) => ({ cache_seg_id: s.pos[i], seg_off: s.pos[i + 1] });
  const key_tail = at(POS_KEY_TAIL);
  const dirty_tail = at(POS_DIRTY_TAIL);
  const key_head = at(POS_KEY_HEAD);
  let seen_dirty = posEqual(key_tail, dirty_tail);
  const walk = walkLog(h.dom, h.engine.meta, key_tail, { backing_size_bytes: h.engine.size_bytes }, (k) => {
    if (posEqual(k.pos, dirty_tail)) seen_dirty = true;
    return true;
  });
  if (!posEqual(walk.end_pos, key_head)) return `key_head ${posToString(key_head)} is not the end of the log (${posToString(walk.end_pos)})`;
  if (!seen_dirty && !posEqual(dirty_tail, key_head)) return `dirty_tail ${posToString(dirty_tail)} is not between key_tail ${posToString(key_tail)} and key_head ${posToString(key_head)}`;
  return null;
}
