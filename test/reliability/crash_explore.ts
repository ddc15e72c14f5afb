/**
 * Crash-state explorer for the engine on the `sim` persistence domain.
 *
 * One case: a seeded workload (writes of mixed sizes, FUA, zeroes, trims, flushes, reads checked
 * against a model, writeback and GC steps, clean restarts) runs until a chosen crash point: the
 * Kth persist barrier, the Kth cache-device store, or the Kth backing write or flush. Every
 * unpersisted 64-byte line is then kept or dropped at random, and so is every unflushed backing
 * write. The cache is reopened (replay) and checked:
 *   - the durability contract, byte by byte (Contract in crash_workload.ts);
 *   - the backing prefix invariant (BackingOracle in crash_workload.ts);
 *   - key_tail <= dirty_tail <= key_head in log order;
 *   - after a full drain, the backing device equals what the cache reads back.
 *
 * The log starts a few KiB before the end of its segment (a state GC reaches on a real cache),
 * so it rolls through LAST ksets early; clean restarts drop the data head, so GC frees and reuses
 * segments (generation bumps) without writing 16 MiB per segment.
 *
 * Everything is a function of (seed, crash point, ops): a failure names the replay command.
 */
import { MemoryBacking } from "../../core/device/memory_backing.ts";
import type { Engine } from "../../core/engine/engine.ts";
import { STAT_GC_SEGS_FREED } from "../../core/engine/shared_state.ts";
import { MiB, SEG_DATA_SIZE } from "../../core/format/constants.ts";
import { formatCache } from "../../core/format/format_cache.ts";
import { loadCache } from "../../core/format/load_cache.ts";
import { persistTail } from "../../core/format/meta.ts";
import { type CachePos, posToString } from "../../core/log/position.ts";
import { makeRng, SimDomain } from "../../core/persist/sim.ts";
import { type Harness, openHarness, pattern } from "../helpers/engine_harness.ts";
import { CacheMemory, CrashBacking, RecordingSim, tiled } from "./crash_devices.ts";
import { BackingOracle, BURST_BLOCKS, Contract, describeOp, firstDiff, type Op, planWorkload, tailOrderProblem } from "./crash_workload.ts";

export const BACKING_BYTES = 8 * MiB;
/** Bounds on the post-crash drain (a kset per step; far more than any workload closes). */
const DRAIN_STEPS_MAX = 100_000;

export interface CrashCaseOptions {
  /** Crash at the Kth persist barrier (fence) of the workload, 1-based. */
  barrier?: number;
  /** Crash at the Kth store (write or fill) to the cache device. */
  write?: number;
  /** Crash at the Kth write or flush of the backing device, before it takes effect. */
  backing_io?: number;
  /** Run the whole workload, then crash (nothing in flight). */
  end?: boolean;
  /** Workload length; default from the seed. */
  ops?: number;
  /** Receives a line per event (the replay script prints them). */
  trace?: (line: string) => void;
}

export interface CrashCaseResult {
  ok: boolean;
  failure?: string;
  /** Workload op at which the crash (or the failure) happened. */
  step?: number;
  /** Persist barriers the workload passed before the crash. */
  barriers: number;
  /** Stores to the cache device, and writes and flushes of the backing device, before the crash. */
  cache_stores: number;
  backing_ios: number;
  /** Where it crashed: "barrier 12", "write 40", "backing io 3", "end". */
  crash: string;
  /** Command that replays exactly this case. */
  replay: string;
  segs_freed: number;
  /** Segments in use again with a bumped generation (freed by GC, then reallocated). */
  segs_reused: number;
  log_rolls: number;
  ksets_written_back: number;
}

interface Setup {
  dom: RecordingSim;
  backing: CrashBacking;
  initial: Uint8Array;
  start: CachePos;
}

/** A formatted cache whose log starts `room` bytes before the end of segment 0 (or at 0:0). */
function setUp(seed: number): Setup {
  const rng = makeRng(seed ^ 0x51ed);
  const mem = CacheMemory.take();
  const plain = new RecordingSim(mem, { seed, track: false });
  const meta = formatCache(plain, { data_crc: false, gc_percent: 0 });
  let start = { cache_seg_id: 0, seg_off: 0 };
  if (rng() < 0.75) {
    start = { cache_seg_id: 0, seg_off: SEG_DATA_SIZE - 1024 * (2 + Math.floor(rng() * 30)) };
    persistTail(plain, "dirty_tail", start, meta.dirty_tail);
    persistTail(plain, "key_tail", start, meta.key_tail);
  }
  // From here on durability is tracked; everything written so far is durable.
  const dom = new RecordingSim(mem, { seed, track: true });
  const initial = tiled(BACKING_BYTES, seed ^ 0x1ba5e);
  return { dom, backing: new CrashBacking(dom, initial), initial, start };
}

const ENGINE_OPTS = { n_ksets: 2, nodes_max: 65_536, limits: { space_wait_ms: 2000 } };

function open(dom: SimDomain, backing: MemoryBacking): Harness {
  return openHarness(dom, backing, ENGINE_OPTS);
}

function segsFreed(engine: Engine): number {
  return engine.ctx.s.statTotal(STAT_GC_SEGS_FREED);
}

function segsReused(engine: Engine): number {
  const s = engine.ctx.s;
  let n = 0;
  for (let seg = 0; seg < s.layout.n_segs; seg++) if (s.seg_map[seg] !== 0 && s.seg_gens[seg] > 0) n++;
  return n;
}

export function replayCommand(seed: number, opts: CrashCaseOptions): string {
  const parts = [`bun scripts/crash_replay.ts --seed ${seed}`];
  if (opts.barrier !== undefined) parts.push(`--barrier ${opts.barrier}`);
  if (opts.write !== undefined) parts.push(`--write ${opts.write}`);
  if (opts.backing_io !== undefined) parts.push(`--backing-io ${opts.backing_io}`);
  if (opts.end) parts.push("--end");
  if (opts.ops !== undefined) parts.push(`--ops ${opts.ops}`);
  return parts.join(" ");
}

/** With no crash point given, pick one from the seed (its own generator, so the workload is the same). */
export function pickCrashPoint(seed: number, ops: number): CrashCaseOptions {
  const rng = makeRng(seed ^ 0xc4a5);
  const r = rng();
  // Ranges from measured workloads: about 1.2 barriers, 1.5 cache stores and 0.6 backing writes or
  // flushes per op. A point past the end of the workload crashes at the end instead.
  if (r < 0.55) return { barrier: 1 + Math.floor(rng() * ops * 1.3) };
  if (r < 0.8) return { write: 1 + Math.floor(rng() * ops * 1.5) };
  if (r < 0.95) return { backing_io: 1 + Math.floor(rng() * ops * 0.6) };
  return { end: true };
}

export function defaultOps(seed: number): number {
  return 20 + Math.floor(makeRng(seed ^ 0x0f5)() * 50);
}

function chosenPoint(opts: CrashCaseOptions): boolean {
  return opts.barrier !== undefined || opts.write !== undefined || opts.backing_io !== undefined || opts.end === true;
}

/** Run one crash case. Never throws for a contract violation: it is reported in the result. */
export async function runCrashCase(seed: number, opts: CrashCaseOptions = {}): Promise<CrashCaseResult> {
  const ops_n = opts.ops ?? defaultOps(seed);
  const point = chosenPoint(opts) ? opts : { ...pickCrashPoint(seed, ops_n), ops: opts.ops, trace: opts.trace };
  const replay = replayCommand(seed, { ...point, ops: opts.ops });
  const trace = opts.trace ?? (() => {});
  const run = new CaseRun(seed, point, trace);
  const result: CrashCaseResult = { ok: true, barriers: 0, cache_stores: 0, backing_ios: 0, crash: "end", replay, segs_freed: 0, segs_reused: 0, log_rolls: 0, ksets_written_back: 0 };
  try {
    const problem = await run.go(planWorkload(seed, ops_n, BACKING_BYTES));
    if (problem !== null) Object.assign(result, { ok: false, failure: problem });
  } catch (err) {
    Object.assign(result, { ok: false, failure: `unexpected ${(err as Error)?.stack ?? String(err)}` });
  } finally {
    if (run.mem !== null) run.mem.busy = false;
  }
  Object.assign(result, { barriers: run.barriers, cache_stores: run.cache_stores, backing_ios: run.backing_ios, crash: run.crash_desc, step: run.step, segs_freed: run.segs_freed, segs_reused: run.segs_reused });
  result.log_rolls = run.oracle?.log_rolls ?? 0;
  result.ksets_written_back = run.oracle?.ksets ?? 0;
  if (!result.ok) result.failure = `seed ${seed}, ${run.crash_desc}, step ${run.step}: ${result.failure}\n  replay: ${replay}`;
  return result;
}

/** One case's state: the harness, the contract, the backing oracle and counters. */
class CaseRun {
  barriers = 0;
  cache_stores = 0;
  backing_ios = 0;
  crash_desc = "end";
  step = 0;
  segs_freed = 0;
  segs_reused = 0;
  oracle: BackingOracle | null = null;
  mem: CacheMemory | null = null;

  constructor(
    private readonly seed: number,
    private readonly point: CrashCaseOptions,
    private readonly trace: (line: string) => void,
  ) {}

  async go(plan: Op[]): Promise<string | null> {
    const { dom, backing, initial, start } = setUp(this.seed);
    this.mem = dom.mem;
    this.crash_desc = `before ${describePoint(this.point)}`;
    const c = new Contract(initial);
    this.oracle = new BackingOracle(initial, start);
    this.trace(`log starts at ${posToString(start)}; ${plan.length} ops; crash point: ${describePoint(this.point)}`);
    let h = open(dom, backing);
    this.oracle.boundaryAt(h); // the engine starts epoch 1 at key_head
    const fence0 = dom.fence_count;
    const write0 = dom.write_count;
    if (this.point.barrier !== undefined) dom.crash_at_fence = fence0 + this.point.barrier;
    if (this.point.write !== undefined) dom.crash_at_write = write0 + this.point.write;
    if (this.point.backing_io !== undefined) backing.crash_at_io = this.point.backing_io;
    for (this.step = 0; this.step < plan.length && !dom.isCrashed; this.step++) {
      const op = plan[this.step];
      this.trace(`op ${this.step}: ${describeOp(op)}`);
      try {
        const next = await this.apply(h, op, c, this.step);
        if (typeof next === "string") return next;
        if (next !== h) this.segs_freed += segsFreed(h.engine); // a restart: count the old engine's
        h = next;
      } catch (err) {
        if (!dom.isCrashed) return `op ${this.step} (${describeOp(op)}) failed without a crash: ${(err as Error)?.message ?? err}`;
      } finally {
        h.engine.ctx.log.stopTimers(); // kset timers must not fire between ops: runs stay reproducible
      }
    }
    this.segs_freed += segsFreed(h.engine);
    this.segs_reused = segsReused(h.engine);
    this.barriers = dom.fence_count - fence0;
    this.cache_stores = dom.write_count - write0;
    this.backing_ios = backing.io_no;
    if (dom.isCrashed) {
      this.step--;
      this.crash_desc = describePoint(this.point);
    } else {
      const order = tailOrderProblem(h);
      if (order !== null) return `at the end of the workload: ${order}`;
      this.crash_desc = this.point.end ? "end" : `end (${describePoint(this.point)} not reached)`;
    }
    // Let backing writes still in flight settle before the power is cut for good.
    await new Promise((r) => setImmediate(r));
    this.trace(`crashed at ${this.crash_desc} after ${this.barriers} barriers (op ${this.step})`);
    return this.afterCrash(dom, backing, c);
  }

  /** One op; returns the harness to continue with (a new one after a restart) or a failure. */
  private async apply(h: Harness, op: Op, c: Contract, n: number): Promise<Harness | string> {
    const e = h.engine;
    switch (op.kind) {
      case "write": {
        const data = pattern(op.len, this.seed * 7919 + n + 1);
        const i = c.issue(op.off, data);
        await e.write(op.off, data, op.fua);
        c.acked(i, op.fua);
        if (op.fua) this.oracle!.boundaryAt(h);
        return h;
      }
      case "burst": {
        for (let w = 0; w < op.n; w++) {
          const off = op.off + 4096 * ((w * 7 + n) % BURST_BLOCKS);
          const data = pattern(4096, this.seed * 7919 + n * 1000 + w + 1);
          const i = c.issue(off, data);
          await e.write(off, data, false);
          c.acked(i, false);
        }
        return h;
      }
      case "zero":
      case "trim": {
        const i = c.issue(op.off, new Uint8Array(op.len));
        if (op.kind === "zero") await e.writeZeroes(op.off, op.len, { fua: op.fua });
        else await e.trim(op.off, op.len, op.fua);
        c.acked(i, op.fua);
        if (op.fua) this.oracle!.boundaryAt(h);
        return h;
      }
      case "flush":
        await e.flush();
        c.flushed();
        this.oracle!.boundaryAt(h);
        return h;
      case "read": {
        const got = new Uint8Array(op.len);
        await e.read(op.off, op.len, got);
        const diff = firstDiff(got, c.model.subarray(op.off, op.off + op.len), `read ${op.off}+${op.len} vs model`);
        return diff ?? h;
      }
      case "writeback":
        for (let k = 0; k < op.steps; k++) {
          this.oracle!.peek(h);
          const r = await h.writeback.step();
          if (r === "error" && !h.dom.isCrashed) return "writeback failed on a healthy backing device";
          if (r !== "progress") break;
          const problem = this.oracle!.completed(h);
          if (problem !== null) return problem;
        }
        return h;
      case "gc":
        h.gc.collect();
        h.gc.prune();
        return h;
      case "restart": {
        await e.close();
        c.flushed(); // a clean shutdown closes every kset
        const next = open(h.dom, h.backing);
        this.oracle!.boundaryAt(next); // the engine starts a new epoch at key_head
        return next;
      }
    }
  }

  /** Power loss, reopen, and every check. */
  private async afterCrash(dom: RecordingSim, backing: CrashBacking, c: Contract): Promise<string | null> {
    dom.recover({ seed: this.seed ^ 0x5a5a }); // applies the power loss to the shared memory
    backing.crash(this.seed ^ 0xbac);
    // No more crashes after this one: a plain domain over the same memory is much cheaper.
    const after = new RecordingSim(dom.mem, { seed: this.seed, track: false });
    const meta = loadCache(after, { backing_size_bytes: BACKING_BYTES });
    this.trace(`recovered: key_tail ${posToString(meta.key_tail)}, dirty_tail ${posToString(meta.dirty_tail)}`);
    const prefix = this.oracle!.check(backing.bytes, meta.dirty_tail);
    if (prefix !== null) return `backing prefix invariant: ${prefix}`;
    const fresh = new MemoryBacking(BACKING_BYTES, { bytes: backing.bytes, name: "after-crash" });
    const h = open(after, fresh);
    try {
      const order = tailOrderProblem(h);
      if (order !== null) return `after reopen: ${order}`;
      const got = new Uint8Array(BACKING_BYTES);
      await h.engine.read(0, BACKING_BYTES, got);
      const problem = c.check(got);
      if (problem !== null) return `durability contract: ${problem}`;
      this.trace("reopened: tails in order, every byte keeps the durability contract");
      return await this.drainAndCompare(h, got);
    } finally {
      h.engine.ctx.log.stopTimers();
    }
  }

  /** Write back everything; the backing device must then equal what the cache reads. */
  private async drainAndCompare(h: Harness, before: Uint8Array): Promise<string | null> {
    await h.engine.flush();
    for (let i = 0; ; i++) {
      if (i >= DRAIN_STEPS_MAX) return "drain did not finish";
      const r = await h.writeback.step();
      if (r === "idle") break;
      if (r === "error") return "writeback failed during the drain";
    }
    h.gc.collect();
    const order = tailOrderProblem(h);
    if (order !== null) return `after the drain: ${order}`;
    this.trace("drained: dirty_tail reached key_head");
    const got = new Uint8Array(BACKING_BYTES);
    await h.engine.read(0, BACKING_BYTES, got);
    return firstDiff(got, before, "read after the drain vs before") ?? firstDiff(h.backing.bytes, got, "backing after the drain vs cache");
  }
}

function describePoint(p: CrashCaseOptions): string {
  if (p.barrier !== undefined) return `barrier ${p.barrier}`;
  if (p.write !== undefined) return `write ${p.write}`;
  if (p.backing_io !== undefined) return `backing io ${p.backing_io}`;
  return "end";
}

export interface ExploreOptions {
  seeds: number[] | { from: number; count: number };
  /** For each seed, crash at every barrier and every backing write or flush of its workload. */
  exhaustive_barriers?: boolean;
  /** Workload length (default from the seed; keep it short with exhaustive_barriers). */
  ops?: number;
  /** Called after each case (progress output). */
  onCase?: (seed: number, r: CrashCaseResult) => void;
}

export interface ExploreResult {
  cases: number;
  failures: Array<{ seed: number; step: number; message: string }>;
  segs_freed: number;
  /** Segments in use again with a bumped generation (freed by GC, then reallocated). */
  segs_reused: number;
  log_rolls: number;
  ksets_written_back: number;
}

function seedList(s: ExploreOptions["seeds"]): number[] {
  if (Array.isArray(s)) return s;
  return Array.from({ length: s.count }, (_, i) => s.from + i);
}

export async function runCrashExplore(opts: ExploreOptions): Promise<ExploreResult> {
  const out: ExploreResult = { cases: 0, failures: [], segs_freed: 0, segs_reused: 0, log_rolls: 0, ksets_written_back: 0 };
  const note = (seed: number, r: CrashCaseResult) => {
    out.cases++;
    out.segs_freed += r.segs_freed;
    out.segs_reused += r.segs_reused;
    out.log_rolls += r.log_rolls;
    out.ksets_written_back += r.ksets_written_back;
    if (!r.ok) out.failures.push({ seed, step: r.step ?? -1, message: r.failure ?? "failed" });
    opts.onCase?.(seed, r);
  };
  for (const seed of seedList(opts.seeds)) {
    if (!opts.exhaustive_barriers) {
      note(seed, await runCrashCase(seed, { ops: opts.ops }));
      continue;
    }
    // The uncrashed run counts the barriers and backing I/Os; then one case per each of them.
    const whole = await runCrashCase(seed, { ops: opts.ops, end: true });
    note(seed, whole);
    for (let k = 1; k <= whole.barriers; k++) note(seed, await runCrashCase(seed, { ops: opts.ops, barrier: k }));
    for (let k = 1; k <= whole.backing_ios; k++) note(seed, await runCrashCase(seed, { ops: opts.ops, backing_io: k }));
  }
  CacheMemory.release();
  return out;
}
