/**
 * bench/RESULTS.md: machine and tools, the targets, one table per workload (pcache's ratio to
 * each peer), the extra measurements, and how each number was taken.
 */
import { NODE_BYTES } from "../core/index/key_index.ts";
import type { MachineInfo } from "./env.ts";
import type { ReplayMeasure, WritebackMeasure } from "./extra.ts";
import type { MemoryMeasure, SoakMeasure } from "./memory.ts";
import type { Workload } from "./fio.ts";
import type { ServerResult } from "./suite.ts";
import { evaluateTargets, mib, p99, ratio, throughput } from "./targets.ts";

export interface RunSettings {
  quick: boolean;
  runtime_s: number;
  ramp_s: number;
  size_bytes: number;
  cache_size_bytes: number;
  read_region_bytes: number;
  serve_args: string[];
}

export interface RunReport {
  machine: MachineInfo;
  load_end: number;
  command: string;
  settings: RunSettings;
  out_dir: string;
  workloads: Workload[];
  servers: ServerResult[];
  replay: ReplayMeasure | null;
  replay_error: string | null;
  writeback: WritebackMeasure | null;
  writeback_error: string | null;
  memory: MemoryMeasure | null;
  soak: SoakMeasure | null;
}

/** Load above this fraction of the cores means someone else was using the machine. */
const BUSY_LOAD_PER_CORE = 0.5;
/** Other CPU above this (% of one core) during a workload is flagged as noise. */
const NOISY_OTHER_CPU_PCT = 20;

export function fmt(v: number | null | undefined): string {
  if (v === null || v === undefined || !Number.isFinite(v)) return "-";
  if (Math.abs(v) >= 100) return v.toFixed(0);
  if (Math.abs(v) >= 10) return v.toFixed(1);
  return v.toFixed(2);
}

/** A Markdown table; columns listed in `left` are left-aligned, the rest (numbers) right-aligned. */
export function mdTable(header: string[], rows: string[][], left: number[] = [0]): string {
  const esc = (c: string): string => c.replace(/\|/g, "\\|");
  const lines = [`| ${header.map(esc).join(" | ")} |`, `|${header.map((_, i) => (left.includes(i) ? " --- " : " ---: ")).join("|")}|`];
  for (const r of rows) lines.push(`| ${r.map(esc).join(" | ")} |`);
  return lines.join("\n");
}

const gib = (b: number): string => `${(b / 2 ** 30).toFixed(b % 2 ** 30 === 0 ? 0 : 2)} GiB`;

function header(r: RunReport): string[] {
  const m = r.machine;
  const s = r.settings;
  const out = [
    "# pcache benchmark results",
    "",
    `- date: ${m.date}`,
    `- machine: ${m.host}, Linux ${m.kernel}, ${m.cpu_model}, ${m.nproc} CPUs, ${gib(m.mem_total_bytes)} RAM`,
    `- tools: ${Object.entries(m.versions).map(([k, v]) => `${k}: ${v}`).join("; ")}`,
    `- pcache: git ${m.git}; serve arguments: ${s.serve_args.length ? `\`${s.serve_args.join(" ")}\`` : "(none)"}`,
    `- cache file on ${m.shm_fs}; backing files on ${m.backing_fs}`,
    `- export ${gib(s.size_bytes)}, pcache cache ${gib(s.cache_size_bytes)}, cached-read region ${gib(s.read_region_bytes)}; fio ramp ${s.ramp_s} s + ${s.runtime_s} s per workload${s.quick ? " (--quick)" : ""}`,
    `- load average (1 min): ${m.load_start.toFixed(2)} at start, ${r.load_end.toFixed(2)} at end`,
    `- command: \`${r.command}\``,
    `- raw fio JSON and server logs: \`${r.out_dir}\``,
  ];
  const load = Math.max(m.load_start, r.load_end);
  const other = Math.max(0, ...r.servers.flatMap((sv) => Object.values(sv.workloads).map((w) => w.other_cpu_pct)));
  const why: string[] = [];
  if (load > BUSY_LOAD_PER_CORE * m.nproc) why.push(`load average up to ${load.toFixed(2)} on ${m.nproc} CPUs`);
  if (other > NOISY_OTHER_CPU_PCT) why.push(`up to ${other.toFixed(0)}% of a core used outside the server and fio during a workload`);
  if (why.length > 0) out.push("", `**Noisy run:** other processes used the machine (${why.join("; ")}). Do not compare these numbers with a quiet run's.`);
  return out;
}

function targetsSection(r: RunReport): string[] {
  const rows = evaluateTargets(r);
  const met = rows.filter((t) => t.status === "met").length;
  const missed = rows.filter((t) => t.status === "missed").length;
  return [
    "## Targets",
    "",
    `${met} met, ${missed} missed, ${rows.length - met - missed} not measured (ratios are pcache ÷ peer in this run).`,
    "",
    mdTable(["target", "measured", "status"], rows.map((t) => [t.target, t.measured, t.status === "met" ? "met" : t.status === "missed" ? "**missed**" : t.status]), [0, 2]),
  ];
}

/** One workload's table (and its "cache full" note when pcache filled up during it). */
export function workloadSection(r: Pick<RunReport, "servers">, w: Workload): string[] {
  const unit = w.flush_each ? "pairs/s" : w.metric === "iops" ? "IOPS" : "MiB/s";
  const head = ["server", unit, "mean µs", "p99 µs"];
  if (w.flush_each) head.push("flush mean µs", "flush p99 µs");
  head.push("server CPU (% of a core)", "other CPU %", `pcache ÷ server (${unit})`, "pcache ÷ server (p99)");
  const rows: string[][] = [];
  for (const s of r.servers) {
    const res = s.workloads[w.id];
    if (s.status !== "ok" || !res || res.numbers === null) {
      const why = s.status !== "ok" ? `${s.status}${s.note ? ` (${s.note})` : ""}` : `failed: ${res?.error ?? "not run"}`;
      rows.push([s.name, why, ...head.slice(2).map(() => "")]);
      continue;
    }
    const n = res.numbers;
    const name = res.cache_full ? `${s.name} (cache full)` : s.name;
    const row = [name, fmt(throughput(r.servers, s.name, w)), fmt(n.lat_mean_us), fmt(n.lat_p99_us)];
    if (w.flush_each) row.push(fmt(n.flush_mean_us), fmt(n.flush_p99_us));
    const cpu = res.server_cpu_s === null ? null : (100 * res.server_cpu_s) / res.wall_s;
    const rt = s.name === "pcache" ? null : ratio(r.servers, s.name, w);
    const rp = s.name === "pcache" ? null : ratio(r.servers, s.name, w, p99);
    row.push(fmt(cpu), fmt(res.other_cpu_pct), rt === null ? "-" : `${rt.toFixed(2)}×`, rp === null ? "-" : `${rp.toFixed(2)}×`);
    rows.push(row);
  }
  const out = [`### ${w.title}`, "", `fio \`${w.args.join(" ")}\`${w.cached_read ? ", over the region written just before" : ""}`, "", mdTable(head, rows)];
  if (r.servers.some((s) => s.workloads[w.id]?.cache_full)) {
    out.push("", "(cache full): the cache filled up during this workload (the server logged it), so writes waited for writeback to the backing disk and GC; the figure measures the backing device more than the cache.");
  }
  return out;
}

function extraSection(r: RunReport): string[] {
  const out = ["## Replay, writeback, memory", ""];
  const rp = r.replay;
  if (rp !== null) {
    out.push(
      `- **Replay**: ${rp.keys} keys (${rp.key_len_bytes}-byte writes, distinct offsets) in ${rp.ksets} ksets, built offline in ${rp.build_s.toFixed(1)} s with the engine; \`pcache serve\` logged replay in ${rp.replay_ms.toFixed(0)} ms = **${(rp.keys_per_s / 1e6).toFixed(2)} M keys/s**; spawn to first NBD handshake ${rp.startup_ms.toFixed(0)} ms.`,
    );
  } else out.push(`- **Replay**: ${r.replay_error ?? "not run"}`);
  const wb = r.writeback;
  if (wb !== null) {
    out.push(
      `- **Writeback**: ${mib(wb.bytes)} MiB of random 4 KiB writes (${wb.keys} keys, distinct offsets) dirty in a fresh cache; pcache (started without \`--prefault\`, replay time subtracted) wrote them back (dirty_tail reached key_head) in ${wb.pcache_s.toFixed(2)} s = **${fmt(wb.pcache_mib_s)} MiB/s**; fio wrote the same amount to a fresh backing file (\`${wb.fio_args}\`) in ${wb.fio_s.toFixed(2)} s = ${fmt(wb.fio_mib_s)} MiB/s; ratio **${wb.ratio.toFixed(2)}×**.`,
    );
  } else out.push(`- **Writeback**: ${r.writeback_error ?? "not run"}`);
  const m = r.memory;
  if (m !== null) {
    out.push(
      `- **Memory** (pcache, ${gib(r.settings.cache_size_bytes)} cache, after the run): VmRSS ${mib(m.final.vm_rss_bytes)} MiB (of which RssShmem ${mib(m.final.rss_shmem_bytes)} MiB is the mapped cache file, RssFile ${mib(m.final.rss_file_bytes)} MiB), VmHWM ${mib(m.final.vm_hwm_bytes)} MiB, **RssAnon ${mib(m.final.rss_anon_bytes)} MiB**. Bound: RssAnon at start ${mib(m.start_anon_bytes)} MiB + index pool ${mib(m.index_bytes)} MiB (README formula, ${NODE_BYTES} B per node) + READ buffer pools ${mib(m.pool_bytes)} MiB (32 MiB × ${m.workers} request workers) = ${mib(m.bound_bytes)} MiB: ${m.within_bound ? "within" : "**exceeded**"}. RssAnon change from the first to the last workload: ${mib(m.growth_bytes)} MiB.`,
    );
  } else out.push("- **Memory**: not measured (pcache did not run)");
  out.push(soakLine(r.soak));
  return out;
}

function soakLine(s: SoakMeasure | null): string {
  if (s === null) return "- **Soak**: not run (`--soak-min 10` runs random 4 KiB reads+writes for 10 minutes and samples RssAnon every minute).";
  const samples = s.samples_anon_bytes.map((b) => mib(b)).join(", ");
  return `- **Soak** (${s.minutes} min of 4k random 50/50 read/write QD16): RssAnon per minute ${samples} MiB; growth past the first half's peak ${mib(s.growth_bytes)} MiB${s.error ? `; stopped: ${s.error}` : ""}.`;
}

const METHOD = [
  "## How it was measured",
  "",
  "- One server at a time, each on its own unix socket with a fresh sparse backing file; `sync` before each start. fio's nbd engine, one job (one NBD connection), fixed random seed, `--norandommap`, time-based with a ramp.",
  "- mean and p99 are fio's total latency (submission to completion). For the mixed workload p99 is the larger of the read and write p99. For the flush workload the IOPS are write+flush pairs/s; mean/p99 are the writes', the flush columns the flushes'.",
  "- Cached-read workloads (and the mixed one) run first, right after a 1 MiB QD8 sequential write of the read region and a flush, so the reads hit data the server just took in. Before every workload, untimed: an NBD flush, then the server's write-back backlog is waited for (pcache: `pcache drain`, until dirty_tail reaches key_head) and `sync` empties the page cache's, so each workload starts from a quiet server and disk and measures itself, not the ones before it (the per-workload settle seconds are in the raw results; `--no-settle` runs them back to back instead). Writeback still runs during each workload, at whatever pace the workload's own writes set.",
  "- Server CPU: utime + stime of the server process (all threads) over the fio run, in % of one core. Other CPU: machine busy time minus the server, fio and this script — work by anything else (including kernel writeback threads); high values mean a noisy run.",
];

function workloadsSection(r: RunReport): string[] {
  if (r.workloads.length === 0) return ["## Workloads", "", "None selected (--only)."];
  const out = ["## Workloads", "", ...r.workloads.flatMap((w) => [...workloadSection(r, w), ""])];
  const notes = r.servers.filter((s) => s.status === "ok" && s.note !== null);
  if (notes.length > 0) out.push("Server notes:", "", ...notes.map((s) => `- ${s.name}: ${s.note}`));
  return out;
}

export function renderReport(r: RunReport): string {
  const parts = [header(r).join("\n"), targetsSection(r).join("\n"), workloadsSection(r).join("\n").trimEnd()];
  parts.push(extraSection(r).join("\n"), METHOD.join("\n"));
  return `${parts.join("\n\n")}\n`;
}
