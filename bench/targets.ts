/**
 * Issue 8's targets, judged from one run's numbers: pcache against a named peer in the same run,
 * plus the absolute ones (replay speed, writeback ratio, memory).
 */
import type { ReplayMeasure, WritebackMeasure } from "./extra.ts";
import { type MemoryMeasure, SOAK_GROWTH_BYTES_MAX, type SoakMeasure } from "./memory.ts";
import type { Workload } from "./fio.ts";
import type { ServerResult } from "./suite.ts";

export type TargetStatus = "met" | "missed" | "not measured";

export interface TargetRow {
  target: string;
  measured: string;
  status: TargetStatus;
}

export interface TargetInputs {
  workloads: Workload[];
  servers: ServerResult[];
  replay: ReplayMeasure | null;
  writeback: WritebackMeasure | null;
  memory: MemoryMeasure | null;
  soak: SoakMeasure | null;
}

/** Throughput ratio floors: workload, peer, minimum pcache / peer. */
const THROUGHPUT_TARGETS: Array<[string, string, number]> = [
  ["rw4k-qd1", "nbdkit memory", 1.0],
  ["rw4k-qd32", "nbdkit memory", 1.0],
  ["rw4k-qd1-flush", "nbdkit file", 3.5],
  ["rw4k-qd1-flush", "nbdkit null", 0.8],
  ["rr4k-qd1", "nbdkit memory", 1.0],
  ["rr4k-qd32", "nbdkit memory", 1.0],
  ["sw1m-qd8", "nbdkit memory", 1.0],
];
const P99_PEER = "nbdkit memory";
const P99_RATIO_MAX = 1.5;
const REPLAY_KEYS_PER_S_MIN = 1_000_000;
const WRITEBACK_RATIO_MIN = 0.7;

/** The workload's headline number for a server, or null when it did not run. */
export function throughput(servers: ServerResult[], server: string, w: Workload): number | null {
  const n = servers.find((s) => s.name === server)?.workloads[w.id]?.numbers;
  if (!n) return null;
  return w.metric === "iops" ? n.iops : n.mib_s;
}

export function p99(servers: ServerResult[], server: string, w: Workload): number | null {
  const n = servers.find((s) => s.name === server)?.workloads[w.id]?.numbers;
  return n && Number.isFinite(n.lat_p99_us) ? n.lat_p99_us : null;
}

/** pcache / peer, or null when either number is missing (or the peer's is zero). */
export function ratio(servers: ServerResult[], peer: string, w: Workload, get = throughput): number | null {
  const a = get(servers, "pcache", w);
  const b = get(servers, peer, w);
  return a === null || b === null || b === 0 ? null : a / b;
}

function judge(value: number | null, ok: (v: number) => boolean): TargetStatus {
  return value === null ? "not measured" : ok(value) ? "met" : "missed";
}

const x = (v: number | null): string => (v === null ? "-" : `${v.toFixed(2)}×`);

export function evaluateTargets(t: TargetInputs): TargetRow[] {
  const rows: TargetRow[] = [];
  for (const [id, peer, min] of THROUGHPUT_TARGETS) {
    const w = t.workloads.find((v) => v.id === id);
    if (!w) continue;
    const r = ratio(t.servers, peer, w);
    const unit = w.flush_each ? "pairs/s" : w.metric === "iops" ? "IOPS" : "MiB/s";
    rows.push({ target: `${w.title}: ≥ ${min.toFixed(1)}× ${peer} ${unit}`, measured: x(r), status: judge(r, (v) => v >= min) });
  }
  for (const w of t.workloads) {
    const r = ratio(t.servers, P99_PEER, w, p99);
    rows.push({ target: `${w.title}: p99 ≤ ${P99_RATIO_MAX}× ${P99_PEER}'s`, measured: x(r), status: judge(r, (v) => v <= P99_RATIO_MAX) });
  }
  if (t.replay !== null || t.writeback !== null || t.memory !== null) pushAbsolute(rows, t);
  return rows;
}

function pushAbsolute(rows: TargetRow[], t: TargetInputs): void {
  const kps = t.replay?.keys_per_s ?? null;
  rows.push({
    target: `replay ≥ ${REPLAY_KEYS_PER_S_MIN / 1e6} M keys/s`,
    measured: kps === null ? "-" : `${(kps / 1e6).toFixed(2)} M keys/s (${t.replay!.keys} keys)`,
    status: judge(kps, (v) => v >= REPLAY_KEYS_PER_S_MIN),
  });
  const wb = t.writeback?.ratio ?? null;
  rows.push({ target: `writeback ≥ ${WRITEBACK_RATIO_MIN}× fio random write on the backing file`, measured: x(wb), status: judge(wb, (v) => v >= WRITEBACK_RATIO_MIN) });
  const m = t.memory;
  rows.push({
    target: "resident memory within the bound (index pool + buffer pools + start)",
    measured: m === null ? "-" : `RssAnon ${mib(m.final.rss_anon_bytes)} of ${mib(m.bound_bytes)} MiB`,
    status: m === null ? "not measured" : m.within_bound ? "met" : "missed",
  });
  const s = t.soak;
  rows.push({
    target: `no memory growth over a ${s?.minutes ?? 10}-minute run`,
    measured: s === null ? "not run (--soak-min 10)" : s.error !== null ? `failed: ${s.error}` : `${mib(s.growth_bytes)} MiB`,
    status: s === null || s.error !== null ? "not measured" : s.growth_bytes <= SOAK_GROWTH_BYTES_MAX ? "met" : "missed",
  });
}

export function mib(bytes: number): string {
  return (bytes / 2 ** 20).toFixed(1);
}
