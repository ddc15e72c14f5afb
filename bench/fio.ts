/**
 * The workloads and how fio runs them: fio's nbd engine (one NBD connection per job, iodepth
 * requests in flight), JSON output, total latency (submission to completion) percentiles.
 */
import { readFileSync } from "node:fs";
import { runChild } from "./children.ts";

export type Metric = "iops" | "mib_s";

export interface Workload {
  id: string;
  title: string;
  /** fio arguments that define it. */
  args: string[];
  metric: Metric;
  /** Reads hit data written just before (the prefilled region). */
  cached_read: boolean;
  /** An NBD flush follows every write (fio fsync=1): IOPS are write+flush pairs. */
  flush_each: boolean;
}

export const WORKLOADS: Workload[] = [
  { id: "rw4k-qd1", title: "4k random write, QD1", args: ["--rw=randwrite", "--bs=4k", "--iodepth=1"], metric: "iops", cached_read: false, flush_each: false },
  { id: "rw4k-qd32", title: "4k random write, QD32", args: ["--rw=randwrite", "--bs=4k", "--iodepth=32"], metric: "iops", cached_read: false, flush_each: false },
  {
    id: "rw4k-qd1-flush",
    title: "4k random write + flush after every write, QD1",
    args: ["--rw=randwrite", "--bs=4k", "--iodepth=1", "--fsync=1"],
    metric: "iops",
    cached_read: false,
    flush_each: true,
  },
  { id: "rr4k-qd1", title: "4k random read of cached data, QD1", args: ["--rw=randread", "--bs=4k", "--iodepth=1"], metric: "iops", cached_read: true, flush_each: false },
  { id: "rr4k-qd32", title: "4k random read of cached data, QD32", args: ["--rw=randread", "--bs=4k", "--iodepth=32"], metric: "iops", cached_read: true, flush_each: false },
  { id: "sw1m-qd8", title: "1 MiB sequential write, QD8", args: ["--rw=write", "--bs=1M", "--iodepth=8"], metric: "mib_s", cached_read: false, flush_each: false },
  {
    id: "mix4k-qd16",
    title: "4k random 70% read / 30% write (cached data), QD16",
    args: ["--rw=randrw", "--rwmixread=70", "--bs=4k", "--iodepth=16"],
    metric: "iops",
    cached_read: true,
    flush_each: false,
  },
];

export function workloadById(id: string): Workload | undefined {
  return WORKLOADS.find((w) => w.id === id);
}

export interface FioNumbers {
  iops: number;
  mib_s: number;
  lat_mean_us: number;
  /** For mixed workloads the larger of the read and write p99. */
  lat_p99_us: number;
  flush_mean_us: number | null;
  flush_p99_us: number | null;
  ios: number;
}

interface FioDir {
  iops: number;
  bw_bytes: number;
  total_ios: number;
  lat_ns: { mean: number; N?: number; percentile?: Record<string, number> };
}

interface FioJob {
  error: number;
  read: FioDir;
  write: FioDir;
  sync?: { total_ios: number; lat_ns: { mean: number; percentile?: Record<string, number> } };
}

const P99 = "99.000000";

/** fio may print engine messages before the JSON document. */
export function parseFioJson(text: string): FioJob {
  const start = text.indexOf("{");
  if (start < 0) throw new Error("fio output holds no JSON");
  const doc = JSON.parse(text.slice(start)) as { jobs?: FioJob[] };
  const job = doc.jobs?.[0];
  if (!job || !job.read || !job.write) throw new Error("fio JSON has no job with read/write sections");
  if (job.error) throw new Error(`fio job error ${job.error}`);
  return job;
}

/** The numbers the report uses, over both directions (a direction with no I/O counts for nothing). */
export function fioNumbers(job: FioJob): FioNumbers {
  const dirs = [job.read, job.write].filter((d) => d.total_ios > 0);
  if (dirs.length === 0) throw new Error("fio did no I/O");
  const ios = dirs.reduce((a, d) => a + d.total_ios, 0);
  const lat_mean_ns = dirs.reduce((a, d) => a + d.lat_ns.mean * d.total_ios, 0) / ios;
  const p99_ns = Math.max(...dirs.map((d) => d.lat_ns.percentile?.[P99] ?? Number.NaN));
  const sync = job.sync && job.sync.total_ios > 0 ? job.sync : null;
  return {
    iops: dirs.reduce((a, d) => a + d.iops, 0),
    mib_s: dirs.reduce((a, d) => a + d.bw_bytes, 0) / 2 ** 20,
    lat_mean_us: lat_mean_ns / 1000,
    lat_p99_us: p99_ns / 1000,
    flush_mean_us: sync ? sync.lat_ns.mean / 1000 : null,
    flush_p99_us: sync ? (sync.lat_ns.percentile?.[P99] ?? Number.NaN) / 1000 : null,
    ios,
  };
}

export interface FioRun {
  name: string;
  uri: string;
  /** Bytes of the export the job touches (from offset 0). */
  region_bytes: number;
  args: string[];
  json_path: string;
  timeout_ms: number;
}

/** Common options: JSON out, total-latency percentiles, no random map (cheap and steady). */
export function fioArgv(r: FioRun): string[] {
  return [
    "fio",
    `--name=${r.name}`,
    "--ioengine=nbd",
    `--uri=${r.uri}`,
    `--size=${r.region_bytes}`,
    "--lat_percentiles=1",
    "--percentile_list=50:99:99.9",
    "--norandommap",
    "--output-format=json",
    `--output=${r.json_path}`,
    ...r.args,
  ];
}

/** Run fio; returns its numbers or throws with fio's own error text. */
export async function runFio(r: FioRun): Promise<FioNumbers> {
  const res = await runChild(fioArgv(r), r.timeout_ms);
  if (res.timed_out) throw new Error(`fio did not finish within ${r.timeout_ms / 1000} s`);
  if (res.code !== 0) throw new Error(`fio exit ${res.code}: ${oneLine(res.stderr || res.stdout)}`);
  return fioNumbers(parseFioJson(readFileSync(r.json_path, "utf8")));
}

export function oneLine(s: string): string {
  const t = s.trim().split("\n").filter(Boolean);
  return (t.slice(-2).join(" | ") || "(no output)").slice(0, 300);
}
