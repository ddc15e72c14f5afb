/**
 * pcache against its peers over NBD, written to bench/RESULTS.md:
 *
 *   ./node_modules/.bin/bun bench/run.ts [--quick] [--runtime S] [--only WORKLOAD] [--serve-arg ARG]...
 *
 * Builds dist/pcache, runs every workload against each server in turn (one at a time), then the
 * replay and writeback measurements. An interrupt stops whatever it started and removes its files.
 */
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { join, resolve } from "node:path";
import { ArgError, type BenchArgs, parseArgs, selection, USAGE } from "./args.ts";
import { haveCommand, runChild, stopAllChildren } from "./children.ts";
import { machineInfo } from "./env.ts";
import { type ExtraOptions, measureReplay, measureWriteback } from "./extra.ts";
import { WORKLOADS } from "./fio.ts";
import { memoryMeasure, requestWorkers, runSoak, type SoakMeasure } from "./memory.ts";
import { loadAverage1 } from "./proc.ts";
import { renderReport, type RunReport } from "./report.ts";
import { peerSpecs, pcacheSpec, probeNbdkit, type PcacheOptions, type ServerSpec } from "./servers.ts";
import { runSuite, type ServerResult, type SuiteOptions } from "./suite.ts";

const ROOT = resolve(import.meta.dir, "..");
const PCACHE_BIN = join(ROOT, "dist", "pcache");

function log(msg: string): void {
  const t = new Date().toISOString().slice(11, 19);
  process.stderr.write(`[bench ${t}] ${msg}\n`);
}

/** Temporary directories removed on any exit; the raw-output directory is kept. */
const temp_dirs: string[] = [];

function removeTemp(): void {
  for (const d of temp_dirs.splice(0)) rmSync(d, { recursive: true, force: true });
}

let interrupted = false;
async function onSignal(sig: string): Promise<void> {
  if (interrupted) process.exit(130);
  interrupted = true;
  log(`${sig}: stopping the processes this run started`);
  await stopAllChildren(3_000);
  removeTemp();
  process.exit(130);
}

async function build(a: BenchArgs): Promise<void> {
  if (!a.build) return;
  log("building dist/pcache");
  const r = await runChild([process.execPath, join(ROOT, "scripts", "build.ts")], 600_000);
  if (r.code !== 0) throw new Error(`build failed: ${(r.stderr || r.stdout).trim().split("\n").slice(-3).join(" | ")}`);
}

/** `--workers N` only when this build's serve knows it (default: one per core). */
async function serveArgs(a: BenchArgs): Promise<string[]> {
  const help = await runChild([PCACHE_BIN, "serve", "--help"], 30_000);
  const knows = `${help.stdout}${help.stderr}`.includes("--workers");
  const out: string[] = [];
  if (knows) out.push("--workers", String(a.workers ?? navigator.hardwareConcurrency ?? 1));
  else if (a.workers !== null) log("this pcache serve has no --workers option; ignoring --workers");
  return [...out, ...a.serve_args];
}

function checkTools(): void {
  if (!haveCommand("fio")) throw new Error("fio is not installed (apt-get install fio)");
}

function chosenServers(a: BenchArgs, p: PcacheOptions): ServerSpec[] {
  const all = [pcacheSpec(p), ...peerSpecs()];
  return a.servers.length === 0 ? all : all.filter((s) => a.servers.includes(s.id));
}

async function runServers(a: BenchArgs, specs: ServerSpec[], o: SuiteOptions): Promise<{ servers: ServerResult[]; soak: SoakMeasure | null }> {
  const servers: ServerResult[] = [];
  let soak: SoakMeasure | null = null;
  for (const spec of specs) {
    log(`${spec.name}: ${spec.description}`);
    const r = await runSuite(spec, o, {
      log,
      beforeStop:
        spec.id === "pcache" && a.soak_min > 0
          ? async (s) => {
              soak = await runSoak(s, a.soak_min, o.size_bytes, o.out_dir, log);
            }
          : undefined,
    });
    if (r.status !== "ok") log(`${spec.name}: ${r.status}${r.note ? ` (${r.note})` : ""}`);
    servers.push(r);
  }
  return { servers, soak };
}

async function main(): Promise<number> {
  const a = parseArgs(process.argv.slice(2));
  if (a.help) {
    process.stdout.write(`${USAGE}\n`);
    return 0;
  }
  checkTools();
  process.on("SIGINT", () => void onSignal("SIGINT"));
  process.on("SIGTERM", () => void onSignal("SIGTERM"));
  await build(a);
  const sel = selection(a);
  const stamp = new Date().toISOString().replace(/[:.]/g, "-").slice(0, 19);
  const out_dir = join(a.backing_dir, `pcache-bench-${stamp}`);
  mkdirSync(out_dir, { recursive: true });
  const backing_dir = mkdtempSync(join(a.backing_dir, "pcache-bench-work-"));
  temp_dirs.push(backing_dir);
  const shm_dir = mkdtempSync(join(a.shm_dir, "pcache-bench-"));
  temp_dirs.push(shm_dir);
  const machine = await machineInfo(backing_dir, shm_dir);
  if (machine.load_start > 0.5 * machine.nproc) log(`load average is ${machine.load_start}: numbers will be noisy`);
  const serve_args = await serveArgs(a);
  const pcache: PcacheOptions = { bin: PCACHE_BIN, cache_size: a.cache_size, serve_args };
  await probeNbdkit();
  const workloads = WORKLOADS.filter((w) => sel.workload_ids.includes(w.id));
  const suite: SuiteOptions = { runtime_s: a.runtime_s, ramp_s: a.ramp_s, size_bytes: a.size_bytes, read_region_bytes: a.read_region_bytes, workloads, backing_dir, shm_dir, out_dir, settle: a.settle };
  const { servers, soak } = workloads.length > 0 ? await runServers(a, chosenServers(a, pcache), suite) : { servers: [], soak: null };
  const extra: ExtraOptions = { pcache, cache_size_bytes: a.cache_size_bytes, size_bytes: a.size_bytes, backing_dir, shm_dir, out_dir, log };
  const report: RunReport = {
    machine,
    load_end: 0,
    command: ["./node_modules/.bin/bun", "bench/run.ts", ...process.argv.slice(2)].join(" "),
    settings: { quick: a.quick, runtime_s: a.runtime_s, ramp_s: a.ramp_s, size_bytes: a.size_bytes, cache_size_bytes: a.cache_size_bytes, read_region_bytes: a.read_region_bytes, serve_args },
    out_dir,
    workloads,
    servers,
    replay: null,
    replay_error: sel.replay ? null : "not selected (--only)",
    writeback: null,
    writeback_error: sel.writeback ? null : "not selected (--only)",
    memory: null,
    soak,
  };
  const pc = servers.find((s) => s.name === "pcache");
  if (pc?.status === "ok" && pc.log_path !== null) report.memory = memoryMeasure(pc.memory, a.cache_size_bytes, requestWorkers(pc.log_path));
  if (sel.replay) {
    try {
      report.replay = await measureReplay(extra, a.replay_keys);
      log(`replay: ${(report.replay.keys_per_s / 1e6).toFixed(2)} M keys/s`);
    } catch (err) {
      report.replay_error = `failed: ${(err as Error).message}`;
      log(`replay ${report.replay_error}`);
    }
  }
  if (sel.writeback) {
    try {
      report.writeback = await measureWriteback(extra, a.writeback_bytes);
      log(`writeback: ${report.writeback.pcache_mib_s.toFixed(1)} MiB/s (${report.writeback.ratio.toFixed(2)}× fio)`);
    } catch (err) {
      report.writeback_error = `failed: ${(err as Error).message}`;
      log(`writeback ${report.writeback_error}`);
    }
  }
  report.load_end = loadAverage1();
  const out = a.out ?? join(ROOT, "bench", "RESULTS.md");
  writeFileSync(out, renderReport(report));
  writeFileSync(join(out_dir, "results.json"), `${JSON.stringify(report, null, 1)}\n`);
  log(`wrote ${out} (raw output in ${out_dir})`);
  return 0;
}

let code = 1;
try {
  code = await main();
} catch (err) {
  process.stderr.write(`bench: ${err instanceof ArgError ? "" : "error: "}${(err as Error).message}\n`);
  code = err instanceof ArgError ? 2 : 1;
} finally {
  await stopAllChildren(3_000);
  removeTemp();
}
process.exit(code);
