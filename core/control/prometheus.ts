/**
 * The status snapshot in the Prometheus text exposition format (version 0.0.4): for each metric
 * family a `# HELP` and a `# TYPE` line, then its samples. Counters end in `_total`, units are in
 * the names (`_bytes`, `_seconds`), and states are 0/1 gauges.
 */
import type { StatusSnapshot } from "./status.ts";

type Labels = Record<string, string>;

interface Family {
  name: string;
  type: "counter" | "gauge";
  help: string;
  samples: Array<{ labels?: Labels; value: number }>;
}

function escapeLabel(v: string): string {
  return v.replace(/\\/g, "\\\\").replace(/\n/g, "\\n").replace(/"/g, '\\"');
}

function formatValue(v: number): string {
  if (Number.isNaN(v)) return "NaN";
  if (v === Number.POSITIVE_INFINITY) return "+Inf";
  if (v === Number.NEGATIVE_INFINITY) return "-Inf";
  return String(v);
}

function renderFamily(f: Family): string {
  const lines = [`# HELP ${f.name} ${f.help.replace(/\\/g, "\\\\").replace(/\n/g, "\\n")}`, `# TYPE ${f.name} ${f.type}`];
  for (const s of f.samples) {
    const labels = s.labels ? Object.entries(s.labels).map(([k, v]) => `${k}="${escapeLabel(v)}"`) : [];
    lines.push(`${f.name}${labels.length > 0 ? `{${labels.join(",")}}` : ""} ${formatValue(s.value)}`);
  }
  return lines.join("\n");
}

const one = (value: number) => [{ value }];
const flag = (b: boolean) => one(b ? 1 : 0);

/** "seg:off" -> [seg, off] */
function splitPos(pos: string): [number, number] {
  const [seg, off] = pos.split(":").map(Number);
  return [seg ?? Number.NaN, off ?? Number.NaN];
}

function positions(st: StatusSnapshot): Family[] {
  const rows: Array<[string, string]> = [
    ["key_head", st.key_head],
    ["dirty_tail", st.dirty_tail],
    ["key_tail", st.key_tail],
  ];
  return [
    {
      name: "pcache_log_position_segment",
      type: "gauge",
      help: "Logical cache segment of a key log position (key_head, dirty_tail, key_tail).",
      samples: rows.map(([position, p]) => ({ labels: { position }, value: splitPos(p)[0] })),
    },
    {
      name: "pcache_log_position_offset_bytes",
      type: "gauge",
      help: "Offset in its segment's data area of a key log position.",
      samples: rows.map(([position, p]) => ({ labels: { position }, value: splitPos(p)[1] })),
    },
  ];
}

function families(st: StatusSnapshot): Family[] {
  const c = (name: string, help: string, value: number): Family => ({ name, type: "counter", help, samples: one(value) });
  const g = (name: string, help: string, value: number): Family => ({ name, type: "gauge", help, samples: one(value) });
  const list: Family[] = [
    {
      name: "pcache_info",
      type: "gauge",
      help: "Constant 1; labels describe the cache.",
      samples: [{ labels: { cache_mode: st.cache_mode, data_crc: String(st.data_crc), persistence_domain: st.persistence_domain }, value: 1 }],
    },
    g("pcache_uptime_seconds", "Seconds since the server process started.", st.uptime_seconds),
    g("pcache_superblock_flags", "Superblock flags word.", st.superblock_flags),
    g("pcache_cache_info_flags", "cache_info flags word (DATA_CRC, INIT_DONE, cache mode, gc_percent).", st.cache_info_flags),
    g("pcache_segments", "Segments on the cache device (seg_num).", st.seg_num),
    g("pcache_cache_segments", "Segments the cache uses (n_segs).", st.n_segs),
    g("pcache_cache_segments_used", "Cache segments in use (data and key log).", st.segments_used),
    g("pcache_gc_percent", "Used-segment percentage at which GC reclaims.", st.gc_percent),
    ...positions(st),
    ...(st.dirty_bytes === null ? [] : [g("pcache_dirty_bytes", "Bytes acknowledged and not yet written back (logged dirty keys; overwrites count each time).", st.dirty_bytes)]),
    c("pcache_read_hits_total", "Reads with at least one byte served from the cache.", st.read_hits),
    c("pcache_read_hit_bytes_total", "Bytes read from the cache.", st.read_hit_bytes),
    c("pcache_read_misses_total", "Reads with at least one byte read from the backing device.", st.read_misses),
    c("pcache_read_miss_bytes_total", "Bytes read from the backing device for reads.", st.read_miss_bytes),
    c("pcache_writes_total", "Write requests acknowledged.", st.writes),
    c("pcache_written_bytes_total", "Bytes written by clients.", st.written_bytes),
    c("pcache_zeroed_bytes_total", "Bytes of write-zeroes and trim requests.", st.zeroed_bytes),
    c("pcache_flushes_total", "Flush requests completed.", st.flushes),
    c("pcache_ksets_closed_total", "Ksets written to the key log.", st.ksets_closed),
    c("pcache_writeback_bytes_total", "Bytes written back to the backing device.", st.writeback_bytes),
    c("pcache_writeback_ksets_total", "Ksets written back.", st.writeback_ksets),
    c("pcache_writeback_skipped_bytes_total", "Dirty bytes not written back because a later write of the same flush epoch replaced them.", st.writeback_skipped_bytes),
    g("pcache_flush_epochs_tracked", "1 while flush epochs are tracked (writeback may skip overwritten versions), 0 after tracking stopped.", st.flush_epochs_tracked ? 1 : 0),
    g("pcache_writeback_rate_bytes_per_second", "Writeback rate over the last 10 seconds.", st.writeback_rate_bytes_per_second),
    g("pcache_writeback_error_errno", "errno of the failing backing write; 0 when writeback is healthy.", st.writeback_error_errno),
    g("pcache_writeback_paused", "1 while writeback is paused (test hook).", st.writeback_paused ? 1 : 0),
    g("pcache_writeback_deferred", "1 while writeback lets dirty data wait because clients keep requests in flight and the cache has room.", st.writeback_deferred ? 1 : 0),
    g("pcache_writeback_defer_seconds", "Longest wait of dirty data while clients keep requests in flight (--writeback-defer-ms); 0 when deferral is off.", st.writeback_defer_ms / 1000),
    c("pcache_gc_runs_total", "GC passes that reclaimed at least one kset.", st.gc_runs),
    c("pcache_gc_segments_freed_total", "Segments freed (by GC, or by a data head leaving them).", st.gc_segments_freed),
    { name: "pcache_gc_stopped", type: "gauge", help: "1 when GC stopped after an error (until restart).", samples: flag(st.gc_stopped) },
    { name: "pcache_gc_wedged", type: "gauge", help: "1 while GC needs space but waits for a stuck writeback.", samples: flag(st.gc_wedged) },
    { name: "pcache_cache_full", type: "gauge", help: "1 while requests wait for a free segment.", samples: flag(st.cache_full) },
    c("pcache_deferred_requests_total", "Requests that had to wait for cache space.", st.deferred_requests),
    c("pcache_busy_poll_spins_total", "Busy-polls for a quick client's next request after a reply.", st.busy_poll.spins),
    c("pcache_busy_poll_hits_total", "Busy-polls that found the next request within the budget.", st.busy_poll.hits),
    c("pcache_busy_poll_seconds_total", "CPU time spent busy-polling.", st.busy_poll.seconds),
    {
      name: "pcache_errors_total",
      type: "counter",
      help: "Errors by kind: backing_read (a miss read failed), backing_write (a writeback write failed), crc (data CRC mismatch).",
      samples: [
        { labels: { kind: "backing_read" }, value: st.errors.backing_read },
        { labels: { kind: "backing_write" }, value: st.errors.backing_write },
        { labels: { kind: "crc" }, value: st.errors.crc },
      ],
    },
    {
      name: "pcache_worker_state",
      type: "gauge",
      help: "1 for each worker thread in its current state.",
      samples: st.workers.map((w) => ({ labels: { worker: w.name, role: w.role, state: w.state }, value: 1 })),
    },
    g("pcache_connections", "Open NBD connections.", st.connections),
  ];
  return list.filter((f) => f.samples.length > 0);
}

export function toPrometheus(st: StatusSnapshot): string {
  return `${families(st).map(renderFamily).join("\n")}\n`;
}
