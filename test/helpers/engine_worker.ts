/**
 * Worker for test/concurrency.test.ts: one "NBD connection" that attaches to the engine opened
 * on the main thread and runs a seeded script of writes (some FUA), trims, write-zeroes,
 * flushes and reads, awaiting each of its own operations in order.
 *
 * Every byte says where it came from. A write to the shared window fills byte x with
 * tagByte(opKey(w, q), x), a keyed hash of (worker, op, offset); trims and write-zeroes leave 0;
 * the initial image holds tagByte(INITIAL_KEY, x). Every thread can rebuild every worker's
 * script from its seed, and shared counters say which ops each worker has started and finished,
 * so a reader knows for each byte which writes it may see (SharedView.check). In its private
 * range a worker is alone: every read there must equal its own model exactly.
 *
 * Also imported by the test on the main thread, for the layout, the scripts and the check.
 */
import { attachCacheDevice, type AttachOptions } from "../../core/device/cache_device.ts";
import { attachBackingFile, type BackingAttach } from "../../core/device/file_backing.ts";
import { Engine, type EngineShared } from "../../core/engine/engine.ts";
import { KiB, MiB } from "../../core/format/constants.ts";
import { makeRng } from "../../core/persist/sim.ts";

export const BACKING_BYTES = 64 * MiB;
/** Written and read by every worker; straddles the 4 MiB boundary (two subtrees, two ksets). */
export const SHARED_OFF = 4 * MiB - 64 * KiB;
export const SHARED_BYTES = 128 * KiB;
export const PRIVATE_BYTES = 8 * MiB;
/** Private ranges of this many workers fit in the backing device. */
export const WORKERS_MAX = 4;
/** Op indexes are kept in Int16Arrays. */
export const OPS_MAX = 32_767;
const POOL_BYTES = 4 * MiB;
const INITIAL_KEY = 0x5eed_1e55;

/** Worker w's private range: unaligned, across two 4 MiB boundaries. */
export function privateOff(w: number): number {
  return 8 * MiB + w * 12 * MiB + 12_345;
}

export type OpKind = "write" | "zero" | "trim" | "read" | "flush";

export interface Op {
  kind: OpKind;
  shared: boolean;
  off: number;
  len: number;
  fua: boolean;
  /** Private writes: where in the worker's pool the payload starts. */
  pool_at: number;
}

/** Tag key of op q of worker w; never 0 (0 marks ops that leave zeroes). */
export function opKey(w: number, q: number): number {
  return (Math.imul(w + 1, 0x9e3779b1) ^ Math.imul(q + 1, 0x85ebca6b)) | 1;
}

/** The byte a tagged write with this key leaves at device offset x. */
export function tagByte(key: number, x: number): number {
  return Math.imul(key ^ x, 0x9e3779b1) >>> 24;
}

export function initialByte(x: number): number {
  return tagByte(INITIAL_KEY, x);
}

function fillTagged(dst: Uint8Array, key: number, off: number): void {
  for (let i = 0; i < dst.length; i++) dst[i] = tagByte(key, off + i);
}

function mutates(op: Op): boolean {
  return op.kind === "write" || op.kind === "zero" || op.kind === "trim";
}

function pickLen(rng: () => number, shared: boolean): number {
  const u = rng();
  if (shared) {
    if (u < 0.6) return 1 + Math.floor(rng() * 2 * KiB);
    if (u < 0.9) return 2 * KiB + Math.floor(rng() * 14 * KiB);
    return 16 * KiB + Math.floor(rng() * 48 * KiB);
  }
  if (u < 0.5) return 1 + Math.floor(rng() * 8 * KiB);
  if (u < 0.9) return 8 * KiB + Math.floor(rng() * 120 * KiB);
  return 128 * KiB + Math.floor(rng() * 1408 * KiB);
}

/** Worker w's script: the same on every thread for the same seed. */
export function makeScript(seed: number, w: number, n_ops: number): Op[] {
  const rng = makeRng(seed * 1000 + w + 1);
  const ops: Op[] = [];
  for (let q = 0; q < n_ops; q++) {
    const r = rng();
    const kind: OpKind = r < 0.38 ? "write" : r < 0.43 ? "zero" : r < 0.48 ? "trim" : r < 0.94 ? "read" : "flush";
    const shared = rng() < 0.8;
    // Shared reads cover much of the window, so they often meet another worker's write in flight.
    const len = shared && kind === "read" ? 1 + Math.floor(rng() * SHARED_BYTES) : pickLen(rng, shared);
    const base = shared ? SHARED_OFF : privateOff(w);
    const size = shared ? SHARED_BYTES : PRIVATE_BYTES;
    const off = base + Math.floor(rng() * (size - len + 1));
    ops.push({ kind, shared, off, len, fua: rng() < 0.15, pool_at: Math.floor(rng() * (POOL_BYTES - len)) });
  }
  return ops;
}

/**
 * What each worker's completed shared-window ops left behind: last[w][i] is the index of w's
 * last op (among its first applied[w]) that wrote, trimmed or zeroed byte SHARED_OFF + i.
 *
 * `order` says which ops came strictly before which: order[(w * n_ops + q) * n_workers + v] is
 * how many ops worker v had finished when worker w started op q. An op that finished before
 * another began is overwritten by it wherever both land, so its bytes may not show there.
 */
export class SharedView {
  private readonly last: Int16Array[];
  private readonly applied: number[];
  /** Per worker and op: the tag key of a write, or 0 for an op that leaves zeroes. */
  private readonly keys: Int32Array[];
  private readonly n_ops: number;

  constructor(
    readonly scripts: Op[][],
    private readonly order: Int32Array,
  ) {
    this.last = scripts.map(() => new Int16Array(SHARED_BYTES).fill(-1));
    this.applied = scripts.map(() => 0);
    this.n_ops = scripts[0].length;
    this.keys = scripts.map((ops, w) => Int32Array.from(ops, (op, q) => (op.kind === "write" ? opKey(w, q) : 0)));
  }

  /** Take in worker w's ops up to (not including) `upto`. */
  advance(w: number, upto: number): void {
    const script = this.scripts[w];
    for (let q = this.applied[w]; q < upto; q++) {
      const op = script[q];
      if (op.shared && mutates(op)) this.last[w].fill(q, op.off - SHARED_OFF, op.off - SHARED_OFF + op.len);
    }
    this.applied[w] = Math.max(this.applied[w], upto);
  }

  /**
   * Check bytes read at [off, off + got.length) of the shared window. Allowed for byte x: what
   * a worker's last applied op on x left there, unless another worker's last applied op on x
   * started after it finished; the initial byte if no applied op touched x; or what an op in
   * `concurrent` (ops not finished when the read began) left there. Returns a description of the
   * first bad byte, or null.
   */
  check(got: Uint8Array, off: number, concurrent: Array<[number, number]>): string | null {
    const ok = new Uint8Array(got.length);
    const touched = new Uint8Array(got.length);
    for (let w = 0; w < this.scripts.length; w++) this.markLast(w, got, off, ok, touched);
    for (let i = 0; i < got.length; i++) if (touched[i] === 0 && initialByte(off + i) === got[i]) ok[i] = 1;
    for (const [w, q] of concurrent) this.markOp(w, q, got, off, ok);
    const i = ok.indexOf(0);
    if (i < 0) return null;
    const x = off + i;
    const was = this.last.map((last) => last[x - SHARED_OFF]).join(",");
    return `byte ${x} is ${got[i]}: no allowed op left it (last ops per worker ${was}; ${concurrent.length} concurrent)`;
  }

  /** Mark the bytes that hold what worker w's last applied op on them left. */
  private markLast(w: number, got: Uint8Array, off: number, ok: Uint8Array, touched: Uint8Array): void {
    const last = this.last[w];
    const keys = this.keys[w];
    const at = off - SHARED_OFF;
    for (let i = 0; i < got.length; i++) {
      const q = last[at + i];
      if (q < 0) continue;
      touched[i] = 1;
      const key = keys[q];
      if ((key === 0 ? 0 : tagByte(key, off + i)) === got[i] && !this.superseded(w, q, at + i)) ok[i] = 1;
    }
  }

  /** Whether another worker's last applied op on window byte j started after w's op q finished. */
  private superseded(w: number, q: number, j: number): boolean {
    const n = this.scripts.length;
    for (let v = 0; v < n; v++) {
      const p = v === w ? -1 : this.last[v][j];
      if (p >= 0 && this.order[(v * this.n_ops + p) * n + w] > q) return true;
    }
    return false;
  }

  /** Mark the bytes that hold what op q of worker w leaves. */
  private markOp(w: number, q: number, got: Uint8Array, off: number, ok: Uint8Array): void {
    const op = this.scripts[w][q];
    const key = this.keys[w][q];
    const from = Math.max(op.off, off);
    const to = Math.min(op.off + op.len, off + got.length);
    for (let x = from; x < to; x++) if ((key === 0 ? 0 : tagByte(key, x)) === got[x - off]) ok[x - off] = 1;
  }
}

// ---------------------------------------------------------------- worker side

export interface StartJob {
  type: "start";
  shared: EngineShared;
  cache: AttachOptions;
  backing: BackingAttach;
  /** This worker's number and engine slot (data head). */
  w: number;
  n_workers: number;
  seed: number;
  n_ops: number;
  /** Int32 started[w] then finished[w] for every worker: ops begun / completed so far. */
  progress: SharedArrayBuffer;
  /** Int32 per (worker, op, worker): SharedView's `order`, filled as each op starts. */
  order: SharedArrayBuffer;
}

export type WorkerReply =
  | { type: "ready" }
  | {
      type: "done";
      private_model: Uint8Array;
      shared_reads: number;
      /** Shared reads that overlapped another worker's write, trim or zero still in flight. */
      concurrent_reads: number;
      private_reads: number;
    }
  | { type: "error"; error: string };

declare const self: Worker;

class Connection {
  private readonly engine: Engine;
  private readonly scripts: Op[][];
  private readonly view: SharedView;
  private readonly model = new Uint8Array(PRIVATE_BYTES);
  private readonly pool = new Uint8Array(POOL_BYTES);
  private readonly progress: Int32Array;
  private readonly order: Int32Array;
  private readonly base: number;
  shared_reads = 0;
  concurrent_reads = 0;
  private_reads = 0;

  constructor(private readonly job: StartJob) {
    this.engine = Engine.attach(job.shared, attachCacheDevice(job.cache), attachBackingFile(job.backing), job.w);
    this.scripts = Array.from({ length: job.n_workers }, (_, w) => makeScript(job.seed, w, job.n_ops));
    this.order = new Int32Array(job.order);
    this.view = new SharedView(this.scripts, this.order);
    this.progress = new Int32Array(job.progress);
    this.base = privateOff(job.w);
    for (let i = 0; i < PRIVATE_BYTES; i++) this.model[i] = initialByte(this.base + i);
    const rng = makeRng(job.seed ^ (0x900d + job.w));
    for (let i = 0; i < POOL_BYTES; i++) this.pool[i] = Math.floor(rng() * 256);
  }

  async run(): Promise<Uint8Array<ArrayBuffer>> {
    const { w, n_ops } = this.job;
    const script = this.scripts[w];
    const n = this.job.n_workers;
    for (let q = 0; q < n_ops; q++) {
      // Which ops of every worker were finished before this one starts.
      for (let v = 0; v < n; v++) this.order[(w * n_ops + q) * n + v] = Atomics.load(this.progress, n + v);
      Atomics.store(this.progress, w, q + 1);
      try {
        await this.one(script[q], q);
      } catch (err) {
        const op = script[q];
        throw new Error(`worker ${w} op ${q} (${op.kind} ${op.off}+${op.len}${op.shared ? " shared" : ""}): ${(err as Error).message}`);
      }
      Atomics.store(this.progress, n + w, q + 1);
    }
    await this.engine.flush();
    this.engine.ctx.log.stopTimers();
    return this.model;
  }

  private async one(op: Op, q: number): Promise<void> {
    const e = this.engine;
    if (op.kind === "flush") return e.flush();
    if (op.kind === "read") return this.read(op);
    if (op.kind === "write") {
      const data = op.shared ? new Uint8Array(op.len) : this.pool.subarray(op.pool_at, op.pool_at + op.len);
      if (op.shared) fillTagged(data, opKey(this.job.w, q), op.off);
      await e.write(op.off, data, op.fua);
      if (!op.shared) this.model.set(data, op.off - this.base);
      return;
    }
    if (op.kind === "zero") await e.writeZeroes(op.off, op.len, { fua: op.fua });
    else await e.trim(op.off, op.len, op.fua);
    if (!op.shared) this.model.fill(0, op.off - this.base, op.off - this.base + op.len);
  }

  private async read(op: Op): Promise<void> {
    const n = this.job.n_workers;
    const finished_before = Array.from({ length: n }, (_, w) => Atomics.load(this.progress, n + w));
    const got = new Uint8Array(op.len).fill(0xa5);
    await this.engine.read(op.off, op.len, got);
    if (!op.shared) {
      this.private_reads++;
      const want = this.model.subarray(op.off - this.base, op.off - this.base + op.len);
      if (Buffer.from(got.buffer).equals(want)) return;
      let k = 0;
      while (got[k] === want[k]) k++;
      throw new Error(`private read differs at byte ${op.off + k}: got ${got[k]}, own last write left ${want[k]}`);
    }
    this.shared_reads++;
    const concurrent: Array<[number, number]> = [];
    for (let w = 0; w < n; w++) {
      const started = Atomics.load(this.progress, w);
      for (let q = finished_before[w]; q < started; q++) {
        const c = this.scripts[w][q];
        if (c.shared && mutates(c) && c.off < op.off + op.len && op.off < c.off + c.len) concurrent.push([w, q]);
      }
      this.view.advance(w, finished_before[w]);
    }
    if (concurrent.some(([w]) => w !== this.job.w)) this.concurrent_reads++;
    const bad = this.view.check(got, op.off, concurrent);
    if (bad !== null) throw new Error(`shared read: ${bad}`);
  }
}

if (!Bun.isMainThread) {
  let conn: Connection | null = null;
  const reply = (msg: WorkerReply, transfer: ArrayBuffer[] = []) => self.postMessage(msg, transfer);
  self.onmessage = (ev: MessageEvent<StartJob | { type: "go" }>) => {
    try {
      if (ev.data.type === "start") {
        conn = new Connection(ev.data);
        return reply({ type: "ready" });
      }
      if (conn === null) throw new Error("go before start");
      const c = conn;
      c.run().then(
        (model) => {
          const counts = { shared_reads: c.shared_reads, concurrent_reads: c.concurrent_reads, private_reads: c.private_reads };
          reply({ type: "done", private_model: model, ...counts }, [model.buffer]);
        },
        (err) => reply({ type: "error", error: (err as Error).message }),
      );
    } catch (err) {
      reply({ type: "error", error: (err as Error).message });
    }
  };
}
