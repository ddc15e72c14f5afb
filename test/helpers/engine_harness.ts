/**
 * Drives the engine without threads: a formatted sim cache device, a memory backing device, and
 * writeback/GC stepped by hand, so tests control exactly when they run.
 */
import { MemoryBacking } from "../../core/device/memory_backing.ts";
import { Engine, type EngineOpenOptions } from "../../core/engine/engine.ts";
import { Gc } from "../../core/gc/gc.ts";
import { formatCache } from "../../core/format/format_cache.ts";
import { MiB } from "../../core/format/constants.ts";
import { SimDomain } from "../../core/persist/sim.ts";
import { Writeback } from "../../core/writeback/writeback.ts";
import { POS_DIRTY_TAIL, POS_KEY_HEAD, WAIT_DIRTY_TAIL } from "../../core/engine/shared_state.ts";
import { waitUntilAsync } from "../../core/sync/wait_word.ts";

/** Smallest cache the format accepts: 512 MiB, 31 segments. */
export const CACHE_BYTES = 512 * MiB;

export interface Harness {
  dom: SimDomain;
  backing: MemoryBacking;
  engine: Engine;
  writeback: Writeback;
  gc: Gc;
}

export function freshCache(opts: { seed?: number; data_crc?: boolean; gc_percent?: number; track?: boolean } = {}): SimDomain {
  const dom = new SimDomain(CACHE_BYTES, { seed: opts.seed ?? 1, track: opts.track ?? false });
  formatCache(dom, { data_crc: opts.data_crc ?? false, gc_percent: opts.gc_percent ?? 70 });
  return dom;
}

export function openHarness(dom: SimDomain, backing: MemoryBacking, opts: EngineOpenOptions = {}): Harness {
  const engine = Engine.open(dom, backing, { n_ksets: 2, limits: { space_wait_ms: 2000 }, ...opts });
  return { dom, backing, engine, writeback: new Writeback(engine.ctx, engine.meta), gc: new Gc(engine.ctx, engine.meta) };
}

export function newHarness(backing_bytes = 64 * MiB, opts: { seed?: number; data_crc?: boolean; gc_percent?: number; track?: boolean } = {}): Harness {
  return openHarness(freshCache(opts), new MemoryBacking(backing_bytes));
}

/** Write back everything that is closed in the log. */
export async function drainWriteback(h: Harness, max_steps = 1_000_000): Promise<void> {
  for (let i = 0; i < max_steps; i++) {
    const r = await h.writeback.step();
    if (r === "idle") return;
    if (r === "error") throw new Error("writeback step failed");
  }
  throw new Error("writeback did not finish");
}

/** Deterministic pattern bytes for (seed, offset). */
export function pattern(len: number, seed: number): Uint8Array {
  const b = new Uint8Array(len);
  let x = (seed * 2654435761) >>> 0 || 1;
  for (let i = 0; i < len; i++) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    b[i] = x & 0xff;
  }
  return b;
}

/** Writeback and GC running as async loops in this thread (what their workers do). */
export interface Loops {
  /** Settles when both loops have returned (after the engine stops). */
  done: Promise<void>;
}

export function startLoops(writeback: Writeback, gc: Gc): Loops {
  return { done: Promise.all([writeback.run(), gc.run()]).then(() => undefined) };
}

/** Stop the loops (the engine's close sets the stopping flag and wakes them) and wait for them. */
export async function closeWithLoops(engine: Engine, loops: Loops): Promise<void> {
  await engine.close();
  await loops.done;
}

/** p's outcome, unless a loop fails (an assertion, say) or stops first: then that, at once. */
export function withLoops<T>(loops: Loops, p: Promise<T>): Promise<T> {
  const stopped = loops.done.then((): never => {
    throw new Error("writeback and GC loops stopped");
  });
  return Promise.race([p, stopped]);
}

/** Close every kset, then wait (on the dirty_tail wait word) until writeback reaches key_head. */
export async function drainWithLoops(engine: Engine, loops: Loops, timeout_ms: number): Promise<boolean> {
  await withLoops(loops, engine.flush());
  const s = engine.ctx.s;
  const drained = () => s.pos[POS_DIRTY_TAIL] === s.pos[POS_KEY_HEAD] && s.pos[POS_DIRTY_TAIL + 1] === s.pos[POS_KEY_HEAD + 1];
  return withLoops(loops, waitUntilAsync(s.waits, WAIT_DIRTY_TAIL, drained, timeout_ms));
}
