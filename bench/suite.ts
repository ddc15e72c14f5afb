/**
 * One server through every workload: fresh backing file, start, prefill the read region, then
 * each workload after an untimed flush and (with settle) the server's backlog drained and a
 * `sync` (so none starts with the previous one's dirty data), with the server's CPU and (for
 * pcache) memory sampled around it.
 */
import { existsSync, mkdirSync, readFileSync, rmSync, statSync, truncateSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { haveCommand, runChild } from "./children.ts";
import { type FioNumbers, oneLine, runFio, type Workload } from "./fio.ts";
import { cpuDelta, cpuSnapshot, type MemStatus, processMemory } from "./proc.ts";
import { type RunningServer, type ServerContext, type ServerSpec, serverAlive, startServer, stopServer } from "./servers.ts";

export interface SuiteOptions {
  runtime_s: number;
  ramp_s: number;
  /** Export size (backing file size). */
  size_bytes: number;
  /** Bytes at the start of the export that are written first and then read (cached data). */
  read_region_bytes: number;
  workloads: Workload[];
  backing_dir: string;
  shm_dir: string;
  /** Raw fio JSON and server logs go here (kept after the run). */
  out_dir: string;
  /** Before each workload, wait for the server's background work and `sync` (untimed). */
  settle: boolean;
}

export interface WorkloadResult {
  numbers: FioNumbers | null;
  error: string | null;
  server_cpu_s: number | null;
  wall_s: number;
  other_cpu_pct: number;
  steal_pct: number;
  /**
   * Seconds the untimed flush before the workload took, plus (with settle) the wait for the
   * server's backlog and a `sync`: the earlier workloads' write-back.
   */
  settle_s: number | null;
  /**
   * pcache logged "cache full" during the workload: writes waited for writeback and GC, so the
   * figure measures the backing device more than the cache.
   */
  cache_full: boolean;
}

export interface MemorySample {
  after: string;
  mem: MemStatus;
}

export interface ServerResult {
  name: string;
  description: string;
  status: "ok" | "not installed" | "failed";
  note: string | null;
  workloads: Record<string, WorkloadResult>;
  prefill_mib_s: number | null;
  memory: MemorySample[];
  log_path: string | null;
}

function slug(name: string): string {
  return name.replace(/[^a-z0-9]+/gi, "-").toLowerCase();
}

/** One NBD flush outside any measurement; seconds it took, or null if it failed. */
export async function nbdFlush(uri: string): Promise<number | null> {
  const t0 = performance.now();
  // nbdsh is a wrapper around python3; the Debian python has the nbd module.
  const env = { ...process.env, PATH: `/usr/bin:${process.env.PATH ?? ""}` };
  const argv = haveCommand("nbdsh")
    ? ["nbdsh", "-u", uri, "-c", "if h.can_flush(): h.flush()"]
    : ["qemu-io", "-f", "raw", "-c", "flush", uri];
  const r = await runChild(argv, 300_000, env);
  return r.code === 0 ? (performance.now() - t0) / 1000 : null;
}

function blankResult(error: string): WorkloadResult {
  return { numbers: null, error, server_cpu_s: null, wall_s: 0, other_cpu_pct: 0, steal_pct: 0, settle_s: null, cache_full: false };
}

/** Cached-read workloads first, right after the prefill, so later writes cannot evict that data. */
export function executionOrder(workloads: Workload[]): Workload[] {
  return [...workloads.filter((w) => w.cached_read), ...workloads.filter((w) => !w.cached_read)];
}

/** Length of the server's log so far (0 when there is none yet). */
function logLength(log_path: string | null): number {
  return log_path !== null && existsSync(log_path) ? statSync(log_path).size : 0;
}

/** Whether the log, from byte `from` on, says the cache filled up. */
function cacheFullSince(log_path: string | null, from: number): boolean {
  if (log_path === null || !existsSync(log_path)) return false;
  return readFileSync(log_path).subarray(from).toString("utf8").includes("cache full began");
}

async function measureWorkload(s: RunningServer, ctx: ServerContext, w: Workload, o: SuiteOptions, dir: string): Promise<WorkloadResult> {
  if (!serverAlive(s)) return blankResult("server exited");
  const log_path = ctx.log_path;
  const t0 = performance.now();
  const flushed = await nbdFlush(s.uri);
  if (o.settle) {
    // Each workload starts from a quiet server and disk: no earlier workload's backlog in it.
    if (s.spec.settle) await s.spec.settle(ctx);
    await runChild(["sync"], 300_000);
  }
  const settle_s = flushed === null ? null : (performance.now() - t0) / 1000;
  const log_from = logLength(log_path);
  const a = cpuSnapshot(s.pid);
  let numbers: FioNumbers | null = null;
  let error: string | null = null;
  try {
    numbers = await runFio({
      name: w.id,
      uri: s.uri,
      region_bytes: w.cached_read ? o.read_region_bytes : o.size_bytes,
      args: ["--time_based", `--runtime=${o.runtime_s}`, `--ramp_time=${o.ramp_s}`, ...w.args],
      json_path: join(dir, `${w.id}.json`),
      timeout_ms: (o.ramp_s + o.runtime_s + 120) * 1000,
    });
  } catch (err) {
    error = (err as Error).message;
  }
  const d = cpuDelta(a, cpuSnapshot(s.pid));
  const cache_full = cacheFullSince(log_path, log_from);
  return { numbers, error, server_cpu_s: d.server_cpu_s, wall_s: d.wall_s, other_cpu_pct: d.other_cpu_pct, steal_pct: d.steal_pct, settle_s, cache_full };
}

async function prefill(s: RunningServer, o: SuiteOptions, dir: string): Promise<number> {
  const n = await runFio({
    name: "prefill",
    uri: s.uri,
    region_bytes: o.read_region_bytes,
    args: ["--rw=write", "--bs=1M", "--iodepth=8", "--end_fsync=1"],
    json_path: join(dir, "prefill.json"),
    timeout_ms: 900_000,
  });
  return n.mib_s;
}

export interface SuiteHooks {
  /** Called with the running server between workloads (progress lines). */
  log(msg: string): void;
  /** Extra work while the server is still up (pcache's soak). */
  beforeStop?(s: RunningServer, r: ServerResult): Promise<void>;
}

export async function runSuite(spec: ServerSpec, o: SuiteOptions, hooks: SuiteHooks): Promise<ServerResult> {
  const r: ServerResult = { name: spec.name, description: spec.description, status: "ok", note: null, workloads: {}, prefill_mib_s: null, memory: [], log_path: null };
  const missing = spec.missing();
  if (missing !== null) {
    r.status = "not installed";
    r.note = missing;
    return r;
  }
  const dir = join(o.out_dir, slug(spec.name));
  mkdirSync(dir, { recursive: true });
  const ctx: ServerContext = {
    sock: join(o.backing_dir, `${slug(spec.name)}.sock`),
    backing_path: join(o.backing_dir, `${slug(spec.name)}.img`),
    scratch_dir: join(o.shm_dir, slug(spec.name)),
    size_bytes: o.size_bytes,
    log_path: join(dir, "server.log"),
  };
  r.log_path = ctx.log_path;
  mkdirSync(ctx.scratch_dir, { recursive: true });
  writeFileSync(ctx.backing_path, "");
  truncateSync(ctx.backing_path, o.size_bytes); // sparse
  // Start from a quiet disk: the previous server's dirty page cache must not be written back now.
  await runChild(["sync"], 300_000);
  let s: RunningServer | null = null;
  try {
    s = await startServer(spec, ctx);
    hooks.log(`${spec.name}: ready (pid ${s.pid})`);
    sampleMemory(r, s, "start");
    await runWorkloads(s, ctx, r, o, dir, hooks);
    if (hooks.beforeStop) await hooks.beforeStop(s, r);
  } catch (err) {
    r.status = "failed";
    r.note = oneLine((err as Error).message);
    hooks.log(`${spec.name}: ${r.note}`);
  } finally {
    if (s !== null) {
      const t0 = performance.now();
      const code = await stopServer(s);
      const stop_s = (performance.now() - t0) / 1000;
      hooks.log(`${spec.name}: stopped in ${stop_s.toFixed(1)} s (exit status ${code})`);
      if (code !== 0 && r.note === null) r.note = `exit status ${code} after SIGTERM (${stop_s.toFixed(1)} s)`;
    }
    rmSync(ctx.backing_path, { force: true });
    rmSync(ctx.sock, { force: true });
    rmSync(ctx.scratch_dir, { recursive: true, force: true });
  }
  return r;
}

async function runWorkloads(s: RunningServer, ctx: ServerContext, r: ServerResult, o: SuiteOptions, dir: string, hooks: SuiteHooks): Promise<void> {
  const order = executionOrder(o.workloads);
  if (order.some((w) => w.cached_read)) {
    try {
      r.prefill_mib_s = await prefill(s, o, dir);
    } catch (err) {
      r.note = `prefill failed: ${oneLine((err as Error).message)}`;
    }
  }
  for (const w of order) {
    const res = await measureWorkload(s, ctx, w, o, dir);
    r.workloads[w.id] = res;
    sampleMemory(r, s, w.id);
    const n = res.numbers;
    const what = n === null ? `FAILED: ${res.error}` : w.metric === "iops" ? `${n.iops.toFixed(0)} IOPS, p99 ${n.lat_p99_us.toFixed(0)} us` : `${n.mib_s.toFixed(0)} MiB/s, p99 ${n.lat_p99_us.toFixed(0)} us`;
    hooks.log(`${s.spec.name}: ${w.id}: ${what}`);
  }
}

export function sampleMemory(r: ServerResult, s: RunningServer, after: string): void {
  const mem = processMemory(s.pid);
  if (mem !== null && r.memory.length < 10_000) r.memory.push({ after, mem });
}
