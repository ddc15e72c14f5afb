/**
 * Corrupted cache images: random byte flips and crafted damage (valid CRCs around invalid
 * contents) in every metadata structure and in the ksets of a cache with a real log, then what
 * `info`, `dump-ksets` and `serve` do with it.
 *
 * Allowed outcomes: recover (the replica and end-of-log rules) or refuse with a clear one-line
 * error (a PcacheError; exit 1 or 2 from the binary). Never an unhandled exception, never a hang,
 * never a write to a device that was refused. Most cases run in process (loadCache, walkLog,
 * Engine.open, then writeback, GC and reads on what was accepted); a sample also runs the binary
 * on an image file (info --json, dump-ksets, and for some serve + a client read + SIGTERM).
 *
 * The image is built once per seed; each case applies its damage, checks, and undoes every byte
 * written since (the damage and whatever an accepting open wrote).
 */
import { closeSync, openSync, writeSync } from "node:fs";
import { join } from "node:path";
import { MemoryBacking } from "../../core/device/memory_backing.ts";
import { Engine } from "../../core/engine/engine.ts";
import { PcacheError } from "../../core/errors.ts";
import { MiB, SEG_DATA_SIZE } from "../../core/format/constants.ts";
import { formatCache } from "../../core/format/format_cache.ts";
import { type CacheMeta, loadCache } from "../../core/format/load_cache.ts";
import { persistTail } from "../../core/format/meta.ts";
import { walkLog } from "../../core/log/walk.ts";
import { makeRng, SimDomain } from "../../core/persist/sim.ts";
import { Gc } from "../../core/gc/gc.ts";
import { Writeback } from "../../core/writeback/writeback.ts";
import { pattern } from "../helpers/engine_harness.ts";
import { damageTargets, type Damage, pickDamage } from "./image_damage_kinds.ts";
import { runBinaryChecks } from "./image_damage_binary.ts";

const CACHE_BYTES = 512 * MiB;
export const DAMAGE_BACKING_BYTES = 8 * MiB;
const CHUNK_BYTES = MiB;
const ENGINE_OPTS = { n_ksets: 2, nodes_max: 65_536, limits: { space_wait_ms: 1000 } };
/** Writeback steps after an accepting open (more than the base image's log holds). */
const WRITEBACK_STEPS_MAX = 10_000;

/** A plain sim domain that keeps what each store overwrote, so a case can be undone. */
export class UndoSim extends SimDomain {
  readonly undo: Array<{ off: number; old: Uint8Array }> = [];
  readonly touched = new Uint8Array(CACHE_BYTES / CHUNK_BYTES);

  constructor(memory: ArrayBuffer) {
    super(CACHE_BYTES, { memory, track: false });
  }

  private remember(off: number, len: number): void {
    this.undo.push({ off, old: this.view(off, len).slice() });
    for (let c = Math.floor(off / CHUNK_BYTES); c <= Math.floor((off + Math.max(len, 1) - 1) / CHUNK_BYTES); c++) this.touched[c] = 1;
  }

  override write(dev_off: number, src: Uint8Array): void {
    this.remember(dev_off, src.length);
    super.write(dev_off, src);
  }

  override fill(dev_off: number, len: number, byte: number): void {
    this.remember(dev_off, len);
    super.fill(dev_off, len, byte);
  }

  /** Undo every store after mark, newest first. */
  rollback(mark: number): void {
    for (let i = this.undo.length - 1; i >= mark; i--) {
      const u = this.undo[i];
      new Uint8Array(this.memory, u.off, u.old.length).set(u.old);
    }
    this.undo.length = mark;
  }

  /** Ranges stored to after mark (for writing a damaged copy of an image file). */
  rangesSince(mark: number): Array<{ off: number; len: number }> {
    return this.undo.slice(mark).map((u) => ({ off: u.off, len: u.old.length }));
  }
}

export interface BaseImage {
  dom: UndoSim;
  meta: CacheMeta;
  data_crc: boolean;
  backing: Uint8Array;
}

/**
 * A cache with a real log, in three sessions (clean restarts between them):
 *   A: writes and zeroes, closed without writeback: its data segments lose their data head;
 *   B: A written back and collected, so A's segments are freed (generation bumps); more writes
 *      and a read miss (CLEAN keys);
 *   C: GC, then many one-key ksets (the log, started 8 KiB before the end of segment 0, rolls
 *      through a LAST kset), then a few writeback steps.
 * So key_tail < dirty_tail < key_head, with normal, LAST, stale and CLEAN keys in the log.
 */
export async function buildBaseImage(seed: number): Promise<BaseImage> {
  const rng = makeRng(seed);
  const dom = new UndoSim(new ArrayBuffer(CACHE_BYTES));
  const data_crc = seed % 2 === 1;
  const meta0 = formatCache(dom, { data_crc, gc_percent: 0 });
  const start = { cache_seg_id: 0, seg_off: SEG_DATA_SIZE - 8 * 1024 };
  persistTail(dom, "dirty_tail", start, meta0.dirty_tail);
  persistTail(dom, "key_tail", start, meta0.key_tail);
  const backing = new MemoryBacking(DAMAGE_BACKING_BYTES, { bytes: pattern(DAMAGE_BACKING_BYTES, seed) });
  const writes = async (engine: Engine, n: number, flush_each: boolean) => {
    for (let i = 0; i < n; i++) {
      const len = 1 + Math.floor(rng() * (rng() < 0.2 ? 256 * 1024 : 8192));
      const off = Math.floor(rng() * (DAMAGE_BACKING_BYTES - len));
      if (rng() < 0.15) await engine.writeZeroes(off, len, { fua: false });
      else await engine.write(off, pattern(len, seed * 1000 + i), false);
      if (flush_each) await engine.flush();
    }
    await engine.flush();
  };
  const session = async (body: (e: Engine, wb: Writeback, gc: Gc) => Promise<void>) => {
    const engine = Engine.open(dom, backing, ENGINE_OPTS);
    await body(engine, new Writeback(engine.ctx, engine.meta), new Gc(engine.ctx, engine.meta));
    await engine.close();
  };
  const steps = async (wb: Writeback, n: number) => {
    for (let i = 0; i < n; i++) if ((await wb.step()) !== "progress") return;
  };
  await session((e) => writes(e, 30, false));
  await session(async (e, wb, gc) => {
    await steps(wb, 1_000);
    gc.collect();
    await writes(e, 20, false);
    await e.read(0, 64 * 1024, new Uint8Array(64 * 1024));
  });
  await session(async (e, wb, gc) => {
    gc.collect();
    await writes(e, 200, true);
    await steps(wb, 8);
  });
  return { dom, meta: loadCache(dom, { backing_size_bytes: DAMAGE_BACKING_BYTES }), data_crc, backing: backing.bytes };
}

export type Outcome = "recovered" | "refused";

/** What one tool did with the damaged image, or a failure message. */
interface ToolResult {
  outcome?: Outcome;
  failure?: string;
}

/** Run fn; a PcacheError is a refusal, anything else a failure; a refusal must not write. */
function guarded(dom: UndoSim, tool: string, fn: () => void): ToolResult {
  const writes = dom.write_count;
  const fences = dom.fence_count;
  try {
    fn();
    return { outcome: "recovered" };
  } catch (err) {
    if (!(err instanceof PcacheError)) return { failure: `${tool}: unhandled ${(err as Error)?.name}: ${(err as Error)?.message}` };
    if (err.message.includes("\n")) return { failure: `${tool}: refusal is not one line: ${JSON.stringify(err.message)}` };
    if (dom.write_count !== writes || dom.fence_count !== fences) return { failure: `${tool}: refused (${err.message}) after writing to the device` };
    return { outcome: "refused" };
  }
}

/** What `info` and `dump-ksets` do: load, walk from both tails. Never writes. */
function readOnlyTools(dom: UndoSim): ToolResult {
  const writes = dom.write_count;
  const r = guarded(dom, "info/dump-ksets", () => {
    const meta = loadCache(dom);
    walkLog(dom, meta, meta.key_tail, {});
    walkLog(dom, meta, meta.dirty_tail, { verify_data_crc: true });
  });
  if (r.failure === undefined && dom.write_count !== writes) return { failure: "info/dump-ksets wrote to the device" };
  return r;
}

/** What `serve` does: open (replay), then reads, writeback and GC over what was accepted. */
async function serveTools(dom: UndoSim, base: BaseImage): Promise<ToolResult> {
  const backing = new MemoryBacking(DAMAGE_BACKING_BYTES, { bytes: base.backing.slice() });
  let engine: Engine | null = null;
  const opened = guarded(dom, "serve (open)", () => {
    engine = Engine.open(dom, backing, ENGINE_OPTS);
  });
  if (engine === null) return opened;
  const e = engine as Engine;
  try {
    const buf = new Uint8Array(DAMAGE_BACKING_BYTES);
    await e.read(0, buf.length, buf).catch((err) => {
      if (!(err instanceof PcacheError)) throw err; // a data CRC error is the client's EIO
    });
    const wb = new Writeback(e.ctx, e.meta);
    for (let i = 0; i < WRITEBACK_STEPS_MAX; i++) if ((await wb.step()) !== "progress") break;
    new Gc(e.ctx, e.meta).collect();
    await e.close();
    return { outcome: "recovered" };
  } catch (err) {
    e.ctx.log.stopTimers();
    return { failure: `serve (after an accepting open): unhandled ${(err as Error)?.name}: ${(err as Error)?.message}` };
  }
}

export interface ImageDamageOptions {
  seed: number;
  cases: number;
  /** Run only this case (replay). */
  only?: number;
  /** Cases that also run the binary (info, dump-ksets); 0 for none. Default 0. With `only`, any
   *  positive number runs the binary (and serve) on that case. */
  binary_cases?: number;
  /** Of those, how many also run serve. Default binary_cases / 2. */
  serve_cases?: number;
  /** Folder for image files (binary runs). */
  dir?: string;
  onCase?: (i: number, damage: Damage, outcome: string) => void;
}

export interface ImageDamageResult {
  cases: number;
  refused: number;
  recovered: number;
  binary_runs: number;
  failures: Array<{ case: number; damage: string; message: string }>;
}

export async function runImageDamage(opts: ImageDamageOptions): Promise<ImageDamageResult> {
  const base = await buildBaseImage(opts.seed);
  const targets = damageTargets(base.dom, base.meta);
  const out: ImageDamageResult = { cases: 0, refused: 0, recovered: 0, binary_runs: 0, failures: [] };
  const binary_cases = opts.binary_cases ?? 0;
  const binary_every = binary_cases > 0 ? Math.max(1, Math.floor(opts.cases / binary_cases)) : 0;
  const serve_cases = opts.serve_cases ?? Math.floor(binary_cases / 2);
  let base_file: string | null = null;
  for (let i = opts.only ?? 0; i < (opts.only !== undefined ? opts.only + 1 : opts.cases); i++) {
    const mark = base.dom.undo.length;
    const damage = pickDamage(makeRng(opts.seed * 1_000_003 + i), targets, base.dom, base.meta, DAMAGE_BACKING_BYTES);
    const replaying = opts.only !== undefined;
    const binary = opts.dir !== undefined && out.binary_runs < binary_cases && (replaying || i % binary_every === 0);
    const replay = `bun scripts/reliability.ts --only image --image-seed ${opts.seed} --image-case ${i}${binary ? " --image-binary 1" : ""}`;
    const fail = (message: string) => out.failures.push({ case: i, damage: damage.what, message: `seed ${opts.seed} case ${i} (${damage.what}): ${message}\n  replay: ${replay}` });
    try {
      if (binary) {
        base_file ??= writeImageFile(base.dom, join(opts.dir!, `base-${opts.seed}.img`), null);
        const file = writeImageFile(base.dom, join(opts.dir!, `damaged-${opts.seed}.img`), { base_file, mark });
        const chunks = [...base.dom.touched.keys()].filter((c) => base.dom.touched[c] !== 0);
        const serve = replaying || out.binary_runs < serve_cases;
        const problem = await runBinaryChecks(file, { data_crc: base.data_crc, serve, dir: opts.dir!, chunks });
        out.binary_runs++;
        if (problem !== null) fail(`binary: ${problem}`);
      }
      const ro = readOnlyTools(base.dom);
      if (ro.failure !== undefined) fail(ro.failure);
      const sv = await serveTools(base.dom, base);
      if (sv.failure !== undefined) fail(sv.failure);
      if (sv.outcome === "refused") out.refused++;
      if (sv.outcome === "recovered") out.recovered++;
      opts.onCase?.(i, damage, sv.outcome ?? "failed");
    } catch (err) {
      fail(`harness error: ${(err as Error)?.stack ?? err}`);
    } finally {
      base.dom.rollback(mark);
      out.cases++;
    }
  }
  return out;
}

/**
 * Write the image to a sparse file: the whole base (only the MiB chunks ever written), or a copy
 * of base_file with the ranges changed since mark.
 */
function writeImageFile(dom: UndoSim, path: string, from: { base_file: string; mark: number } | null): string {
  if (from !== null) {
    const cp = Bun.spawnSync(["cp", "--sparse=always", from.base_file, path]);
    if (cp.exitCode !== 0) throw new Error(`cp failed: ${cp.stderr.toString()}`);
  }
  const fd = openSync(path, from === null ? "w" : "r+");
  try {
    const bytes = new Uint8Array(dom.memory as ArrayBuffer);
    if (from === null) {
      for (let c = 0; c < dom.touched.length; c++) {
        if (dom.touched[c] !== 0) writeSync(fd, bytes, c * CHUNK_BYTES, CHUNK_BYTES, c * CHUNK_BYTES);
      }
      Bun.spawnSync(["truncate", "-s", String(CACHE_BYTES), path]);
    } else {
      for (const r of dom.rangesSince(from.mark)) writeSync(fd, bytes, r.off, r.len, r.off);
    }
  } finally {
    closeSync(fd);
  }
  return path;
}
