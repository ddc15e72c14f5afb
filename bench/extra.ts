/**
 * The measurements beside the fio table: replay speed of a log holding many keys, writeback
 * throughput against fio's own random writes on the backing file (memory is in memory.ts).
 */
import { mkdirSync, readFileSync, rmSync, truncateSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { openCacheDevice } from "../core/device/cache_device.ts";
import { loadCache } from "../core/format/load_cache.ts";
import { runChild } from "./children.ts";
import { oneLine, parseFioJson } from "./fio.ts";
import { type PcacheOptions, pcacheSpec, type RunningServer, type ServerContext, startServer, stopServer } from "./servers.ts";

export interface ExtraOptions {
  pcache: PcacheOptions;
  cache_size_bytes: number;
  size_bytes: number;
  backing_dir: string;
  shm_dir: string;
  out_dir: string;
  log(msg: string): void;
}

export interface ReplayMeasure {
  keys: number;
  ksets: number;
  key_len_bytes: number;
  build_s: number;
  replay_ms: number;
  keys_per_s: number;
  /** Spawn to completed NBD handshake (process start + replay + listen). */
  startup_ms: number;
}

export interface WritebackMeasure {
  bytes: number;
  keys: number;
  /** Seconds from serve start (less replay) until dirty_tail reached key_head. */
  pcache_s: number;
  pcache_mib_s: number;
  fio_s: number;
  fio_mib_s: number;
  fio_args: string;
  ratio: number;
}

interface BuildOutput {
  keys: number;
  elapsed_ms: number;
  key_head: [number, number];
}

const REPLAY_LINE = /replayed (\d+) keys in (\d+) ksets in ([\d.]+) ms/;
const BUILD_TIMEOUT_MS = 900_000;
const WRITEBACK_TIMEOUT_MS = 900_000;
const POLL_MS = 100;

/** A fresh formatted cache on tmpfs and a fresh sparse backing file on disk. */
async function freshPair(o: ExtraOptions, name: string): Promise<ServerContext & { cache_path: string }> {
  const scratch_dir = join(o.shm_dir, name);
  mkdirSync(scratch_dir, { recursive: true });
  const ctx = {
    sock: join(o.backing_dir, `${name}.sock`),
    backing_path: join(o.backing_dir, `${name}.img`),
    scratch_dir,
    size_bytes: o.size_bytes,
    log_path: join(o.out_dir, `${name}-server.log`),
    cache_path: join(scratch_dir, "cache.img"),
  };
  writeFileSync(ctx.backing_path, "");
  truncateSync(ctx.backing_path, o.size_bytes);
  const r = await runChild([o.pcache.bin, "format", "--cache", ctx.cache_path, "--size", o.pcache.cache_size], 120_000);
  if (r.code !== 0) throw new Error(`pcache format: ${oneLine(r.stderr || r.stdout)}`);
  return ctx;
}

function cleanup(ctx: ServerContext & { cache_path: string }): void {
  rmSync(ctx.backing_path, { force: true });
  rmSync(ctx.sock, { force: true });
  rmSync(ctx.scratch_dir, { recursive: true, force: true });
}

async function buildLog(ctx: { cache_path: string; backing_path: string }, keys: number, len_bytes: number): Promise<BuildOutput> {
  const script = join(import.meta.dir, "build_log.ts");
  const argv = [process.execPath, script, "--cache", ctx.cache_path, "--backing", ctx.backing_path, "--keys", String(keys), "--len-bytes", String(len_bytes)];
  const r = await runChild(argv, BUILD_TIMEOUT_MS);
  if (r.code !== 0) throw new Error(`building the log failed: ${r.timed_out ? "timed out" : oneLine(r.stderr)}`);
  return JSON.parse(r.stdout.trim().split("\n").pop() ?? "") as BuildOutput;
}

/**
 * Start `pcache serve` on an existing cache (no format). Without `--prefault` when timing
 * writeback: mapping every page of the cache is start-up work (about 0.8 s per GiB) that the
 * stopwatch would otherwise charge to writeback.
 */
async function serveExisting(o: ExtraOptions, ctx: ServerContext & { cache_path: string }, opts: { prefault: boolean }): Promise<RunningServer> {
  const serve_args = opts.prefault ? o.pcache.serve_args : o.pcache.serve_args.filter((a) => a !== "--prefault");
  const spec = pcacheSpec({ ...o.pcache, serve_args, format: false, cache_path: ctx.cache_path });
  return startServer(spec, ctx);
}

function replayLine(log_path: string): { keys: number; ksets: number; ms: number } | null {
  const m = REPLAY_LINE.exec(readFileSync(log_path, "utf8"));
  return m ? { keys: Number(m[1]), ksets: Number(m[2]), ms: Number(m[3]) } : null;
}

/** Build a log of `keys` 512-byte keys offline, then time replay in `pcache serve`. */
export async function measureReplay(o: ExtraOptions, keys: number): Promise<ReplayMeasure> {
  const ctx = await freshPair(o, "replay");
  try {
    const key_len_bytes = 512; // small keys: 1 M of them fit a 4 GiB cache without GC
    o.log(`replay: building a log of ${keys} keys`);
    const built = await buildLog(ctx, keys, key_len_bytes);
    await runChild(["sync"], 300_000);
    const t0 = performance.now();
    const s = await serveExisting(o, ctx, { prefault: true });
    const startup_ms = performance.now() - t0;
    await stopServer(s);
    const line = replayLine(ctx.log_path);
    if (line === null) throw new Error(`no "replayed N keys" line in ${ctx.log_path}`);
    return {
      keys: line.keys,
      ksets: line.ksets,
      key_len_bytes,
      build_s: built.elapsed_ms / 1000,
      replay_ms: line.ms,
      keys_per_s: line.keys / Math.max(line.ms / 1000, 1e-9),
      startup_ms,
    };
  } finally {
    cleanup(ctx);
  }
}

/** fio's random 4 KiB writes straight to a fresh backing file, one flush per 128 writes like writeback's per-kset flush. */
async function fioBaseline(o: ExtraOptions, bytes: number): Promise<{ s: number; args: string }> {
  const file = join(o.backing_dir, "wb-baseline.img");
  let last = "";
  try {
    // io_uring first; libaio where the kernel or fio refuses it.
    for (const engine of ["io_uring", "libaio"]) {
      writeFileSync(file, "");
      truncateSync(file, o.size_bytes);
      await runChild(["sync"], 300_000);
      const args = ["--rw=randwrite", "--bs=4k", `--ioengine=${engine}`, "--iodepth=16", "--fdatasync=128", "--end_fsync=1", "--fallocate=none"];
      const json_path = join(o.out_dir, "writeback-baseline.json");
      const t0 = performance.now();
      const r = await runChild(
        ["fio", "--name=wb-baseline", `--filename=${file}`, `--size=${o.size_bytes}`, `--io_size=${bytes}`, "--output-format=json", `--output=${json_path}`, ...args],
        WRITEBACK_TIMEOUT_MS,
      );
      const s = (performance.now() - t0) / 1000;
      try {
        if (r.code !== 0) throw new Error(oneLine(r.stderr || r.stdout));
        parseFioJson(readFileSync(json_path, "utf8")); // throws on a job error
        return { s, args: args.join(" ") };
      } catch (err) {
        last = `${engine}: ${(err as Error).message}`;
      }
    }
    throw new Error(`fio on the backing file failed: ${last}`);
  } finally {
    rmSync(file, { force: true });
  }
}

/** Wait until the persisted dirty_tail equals key_head (everything written back). */
async function waitWritebackDone(cache_path: string, key_head: [number, number], timeout_ms: number, alive: () => boolean): Promise<void> {
  const dev = openCacheDevice(cache_path, { readOnly: true });
  try {
    const deadline = Date.now() + timeout_ms;
    for (;;) {
      const d = loadCache(dev.domain).dirty_tail;
      if (d.cache_seg_id === key_head[0] && d.seg_off === key_head[1]) return;
      if (!alive()) throw new Error("pcache exited before writeback finished");
      if (Date.now() > deadline) throw new Error(`writeback not done after ${timeout_ms / 1000} s (dirty_tail ${d.cache_seg_id}:${d.seg_off}, key_head ${key_head.join(":")})`);
      await Bun.sleep(POLL_MS);
    }
  } finally {
    dev.close();
  }
}

/** Dirty `bytes` of random 4 KiB writes offline, then time pcache writing them back. */
export async function measureWriteback(o: ExtraOptions, bytes: number): Promise<WritebackMeasure> {
  const keys = Math.floor(bytes / 4096);
  const base = await fioBaseline(o, keys * 4096);
  o.log(`writeback: fio on the backing file: ${((keys * 4096) / 2 ** 20 / base.s).toFixed(1)} MiB/s`);
  const ctx = await freshPair(o, "writeback");
  try {
    const built = await buildLog(ctx, keys, 4096);
    await runChild(["sync"], 300_000);
    const t0 = performance.now();
    const s = await serveExisting(o, ctx, { prefault: false });
    try {
      await waitWritebackDone(ctx.cache_path, built.key_head, WRITEBACK_TIMEOUT_MS, () => s.proc.exitCode === null);
    } finally {
      await stopServer(s);
    }
    const wall_s = (performance.now() - t0) / 1000;
    const replay_s = (replayLine(ctx.log_path)?.ms ?? 0) / 1000;
    const pcache_s = Math.max(wall_s - replay_s, 1e-9);
    const mib = (keys * 4096) / 2 ** 20;
    return {
      bytes: keys * 4096,
      keys,
      pcache_s,
      pcache_mib_s: mib / pcache_s,
      fio_s: base.s,
      fio_mib_s: mib / base.s,
      fio_args: base.args,
      ratio: base.s / pcache_s,
    };
  } finally {
    cleanup(ctx);
  }
}
