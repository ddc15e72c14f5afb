/** The status snapshot for a terminal: one labelled line per topic. */
import { errnoName } from "../../ffi/libc.ts";
import type { StatusSnapshot } from "./status.ts";

const UNITS = ["bytes", "KiB", "MiB", "GiB", "TiB"] as const;

/** 12582912 -> "12.0 MiB"; below 1 KiB: "512 bytes". */
export function formatBytes(n: number): string {
  let v = n;
  let u = 0;
  while (Math.abs(v) >= 1024 && u < UNITS.length - 1) {
    v /= 1024;
    u++;
  }
  return u === 0 ? `${n} bytes` : `${v.toFixed(1)} ${UNITS[u]}`;
}

export function formatErrno(errno: number): string {
  const name = errnoName(errno);
  return name.startsWith("errno") ? name : `${name} (errno ${errno})`;
}

function formatUptime(s: number): string {
  if (s < 120) return `${s.toFixed(1)} s`;
  const d = Math.floor(s / 86400);
  const h = Math.floor((s % 86400) / 3600);
  const m = Math.floor((s % 3600) / 60);
  return d > 0 ? `${d} d ${h} h ${m} min` : h > 0 ? `${h} h ${m} min` : `${m} min ${Math.floor(s % 60)} s`;
}

function writebackState(st: StatusSnapshot): string {
  if (st.read_only) return "off (read-only server)";
  if (st.writeback_paused) return "PAUSED (test hook)";
  if (st.writeback_error_errno !== 0) return `FAILING: backing write errors, ${formatErrno(st.writeback_error_errno)}; retrying`;
  if (st.writeback_deferred) return `ok, deferred while clients keep requests in flight (up to ${formatDeferMs(st.writeback_defer_ms)}, or until GC needs the room)`;
  return st.writeback_defer_ms === 0 ? "ok, deferral off" : "ok";
}

function formatDeferMs(ms: number): string {
  return ms % 1000 === 0 ? `${ms / 1000} s` : `${ms} ms`;
}

function gcState(st: StatusSnapshot): string {
  if (st.gc_stopped) return "STOPPED after an error until restart (see the server's log)";
  if (st.gc_wedged) return "WEDGED: over gc_percent and waiting for writeback";
  return "ok";
}

export function formatStatusText(st: StatusSnapshot): string {
  const lines: Array<[string, string]> = [
    ["dm-pcache status", st.dm_status],
    ["cache", `mode ${st.cache_mode}, data_crc ${st.data_crc ? "on" : "off"}, gc_percent ${st.gc_percent}, cache_info flags 0x${st.cache_info_flags.toString(16)}${st.read_only ? ", read-only" : ""}`],
    ["segments", `${st.segments_used} used of ${st.n_segs} (seg_num ${st.seg_num}, superblock flags 0x${st.superblock_flags.toString(16)})`],
    ["key_head", st.key_head],
    ["dirty_tail", st.dirty_tail],
    ["key_tail", st.key_tail],
    ["dirty", st.dirty_bytes === null ? "unknown (the log moved too fast to count; ask again)" : st.dirty_bytes < 1024 ? formatBytes(st.dirty_bytes) : `${formatBytes(st.dirty_bytes)} (${st.dirty_bytes} bytes)`],
    ["reads", `hits ${st.read_hits} (${formatBytes(st.read_hit_bytes)}), misses ${st.read_misses} (${formatBytes(st.read_miss_bytes)})`],
    ["writes", `${st.writes} (${formatBytes(st.written_bytes)}), zeroed ${formatBytes(st.zeroed_bytes)}, flushes ${st.flushes}, ksets closed ${st.ksets_closed}`],
    ["writeback", `${formatBytes(st.writeback_bytes)} in ${st.writeback_ksets} ksets, ${formatBytes(st.writeback_rate_bytes_per_second)}/s; ${writebackState(st)}`],
    [
      "overwritten",
      `${formatBytes(st.writeback_skipped_bytes)} of dirty data replaced within its flush epoch, never written back` +
        (st.flush_epochs_tracked ? "" : "; epoch tracking stopped (a flush never recorded its boundary): every version is written back until a restart"),
    ],
    ["gc", `${st.gc_runs} runs, ${st.gc_segments_freed} segments freed; ${gcState(st)}`],
    ["cache full", st.cache_full ? "YES: requests wait for a free segment" : "no"],
    ["deferred", `${st.deferred_requests} requests waited for space`],
    ["busy-poll", `${st.busy_poll.spins} spins, ${st.busy_poll.hits} found the next request, ${st.busy_poll.seconds.toFixed(3)} s of CPU`],
    ["errors", `backing read ${st.errors.backing_read}, backing write ${st.errors.backing_write}, crc ${st.errors.crc}`],
    ["workers", st.workers.map((w) => `${w.name} ${w.state}`).join(", ")],
    ["connections", String(st.connections)],
    ["uptime", `${formatUptime(st.uptime_seconds)} (pid ${st.pid})`],
    ["persistence", st.persistence_detail],
  ];
  return `${lines.map(([k, v]) => `${k.padEnd(18)}${v}`).join("\n")}\n`;
}
