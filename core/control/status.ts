/**
 * The status snapshot of a running server: dm-pcache's status fields (superblock flags, seg_num,
 * n_segs, segments used, gc_percent, cache_info flags, key_head, dirty_tail, key_tail) and what
 * an operator needs besides (dirty bytes, hit/miss counters, writeback and GC progress, errors,
 * worker states, connections). Counters are sums over every thread's statistics slot, read
 * without locks: each is exact on its own, but they are not one atomic snapshot.
 */
import type { EngineContext } from "../engine/context.ts";
import type { CacheMeta } from "../format/load_cache.ts";
import { CACHE_MODE_NAMES } from "../format/cache_info.ts";
import {
  CTL_CACHE_FULL,
  CTL_CACHE_INFO_FLAGS,
  CTL_CONNECTIONS,
  CTL_GC_ERROR,
  CTL_GC_PERCENT,
  CTL_WRITEBACK_ERROR,
  CTL_WRITEBACK_DEFER_MS,
  CTL_WRITEBACK_DEFERRED,
  CTL_WRITEBACK_PAUSED,
  CTL_EPOCH_RING_OFF,
  STAT_BUSY_POLL_HITS,
  STAT_BUSY_POLL_SPINS,
  STAT_BUSY_POLL_US,
  STAT_DEFERRED,
  STAT_ERR_BACKING_READ,
  STAT_ERR_BACKING_WRITE,
  STAT_ERR_CRC,
  STAT_FLUSHES,
  STAT_GC_RUNS,
  STAT_GC_SEGS_FREED,
  STAT_KSETS_CLOSED,
  STAT_READ_HIT_BYTES,
  STAT_READ_HIT_COUNT,
  STAT_READ_MISS_BYTES,
  STAT_READ_MISS_COUNT,
  STAT_WRITE_BYTES,
  STAT_WRITE_COUNT,
  STAT_WRITEBACK_BYTES,
  STAT_WRITEBACK_SKIPPED_BYTES,
  STAT_WRITEBACK_KSETS,
  STAT_ZERO_BYTES,
} from "../engine/shared_state.ts";
import { posToString } from "../log/position.ts";
import type { WalkMeta } from "../log/walk.ts";
import { logPositions, openKsetDirtyBytes, scanDirty } from "./dirty.ts";
import type { StateMonitor } from "./monitor.ts";

export interface WorkerRow {
  name: string;
  role: string;
  state: string;
}

export interface StatusSources {
  ctx: EngineContext;
  meta: CacheMeta;
  walk_meta: WalkMeta;
  monitor: StateMonitor;
  workers(): WorkerRow[];
  /** Domain name (pmem, msync) and how it persists. */
  persistence_domain: string;
  persistence_detail: string;
  read_only: boolean;
}

export interface StatusSnapshot {
  pid: number;
  uptime_seconds: number;
  /** dm-pcache's own status line (the kernel target's INFO status), fields in its order. */
  dm_status: string;
  superblock_flags: number;
  seg_num: number;
  n_segs: number;
  segments_used: number;
  gc_percent: number;
  cache_info_flags: number;
  key_head: string;
  dirty_tail: string;
  key_tail: string;
  cache_mode: string;
  data_crc: boolean;
  persistence_domain: string;
  persistence_detail: string;
  read_only: boolean;
  /** See core/control/dirty.ts; null when the log moved too fast to count. */
  dirty_bytes: number | null;
  read_hits: number;
  read_hit_bytes: number;
  read_misses: number;
  read_miss_bytes: number;
  writes: number;
  written_bytes: number;
  zeroed_bytes: number;
  flushes: number;
  ksets_closed: number;
  writeback_bytes: number;
  writeback_ksets: number;
  /** Dirty bytes left out: a later key of the same flush epoch overwrote them. */
  writeback_skipped_bytes: number;
  /**
   * False once a flush waited too long for an earlier one to record its boundary (its thread
   * gone): writeback then stops skipping for good, until a restart (core/log/flush_epochs.ts).
   */
  flush_epochs_tracked: boolean;
  writeback_rate_bytes_per_second: number;
  writeback_error_errno: number;
  writeback_paused: boolean;
  /** While writeback lets dirty data wait (clients keep requests in flight and the cache has room). */
  writeback_deferred: boolean;
  /** Longest wait of dirty data while clients keep requests in flight (core/writeback/defer.ts); 0: deferral off. */
  writeback_defer_ms: number;
  gc_runs: number;
  gc_segments_freed: number;
  gc_stopped: boolean;
  gc_wedged: boolean;
  cache_full: boolean;
  deferred_requests: number;
  busy_poll: { spins: number; hits: number; seconds: number };
  errors: { backing_read: number; backing_write: number; crc: number };
  workers: WorkerRow[];
  connections: number;
}

const hex = (n: number) => `0x${(n >>> 0).toString(16)}`;

export function collectStatus(src: StatusSources): StatusSnapshot {
  const { ctx, meta } = src;
  const s = ctx.s;
  const ctl = (i: number) => Atomics.load(s.ctl, i);
  const stat = (i: number) => s.statTotal(i);
  const scan = scanDirty(ctx, src.walk_meta);
  const pos = scan ?? logPositions(ctx);
  const dirty_bytes = scan === null ? null : scan.logged_dirty_bytes + openKsetDirtyBytes(ctx);
  const snap: Omit<StatusSnapshot, "dm_status"> = {
    pid: process.pid,
    uptime_seconds: Math.round(process.uptime() * 1000) / 1000,
    superblock_flags: meta.sb.flags,
    seg_num: meta.sb.seg_num,
    n_segs: meta.n_segs,
    segments_used: ctx.segs.used(),
    gc_percent: ctl(CTL_GC_PERCENT),
    cache_info_flags: ctl(CTL_CACHE_INFO_FLAGS) >>> 0,
    key_head: posToString(pos.key_head),
    dirty_tail: posToString(pos.dirty_tail),
    key_tail: posToString(pos.key_tail),
    cache_mode: CACHE_MODE_NAMES[meta.cache_mode] ?? String(meta.cache_mode),
    data_crc: meta.data_crc,
    persistence_domain: src.persistence_domain,
    persistence_detail: src.persistence_detail,
    read_only: src.read_only,
    dirty_bytes,
    read_hits: stat(STAT_READ_HIT_COUNT),
    read_hit_bytes: stat(STAT_READ_HIT_BYTES),
    read_misses: stat(STAT_READ_MISS_COUNT),
    read_miss_bytes: stat(STAT_READ_MISS_BYTES),
    writes: stat(STAT_WRITE_COUNT),
    written_bytes: stat(STAT_WRITE_BYTES),
    zeroed_bytes: stat(STAT_ZERO_BYTES),
    flushes: stat(STAT_FLUSHES),
    ksets_closed: stat(STAT_KSETS_CLOSED),
    writeback_bytes: stat(STAT_WRITEBACK_BYTES),
    writeback_ksets: stat(STAT_WRITEBACK_KSETS),
    writeback_skipped_bytes: stat(STAT_WRITEBACK_SKIPPED_BYTES),
    flush_epochs_tracked: ctl(CTL_EPOCH_RING_OFF) === 0,
    writeback_rate_bytes_per_second: Math.round(src.monitor.writebackRate()),
    writeback_error_errno: ctl(CTL_WRITEBACK_ERROR),
    writeback_paused: ctl(CTL_WRITEBACK_PAUSED) !== 0,
    writeback_deferred: ctl(CTL_WRITEBACK_DEFERRED) !== 0,
    writeback_defer_ms: ctl(CTL_WRITEBACK_DEFER_MS),
    gc_runs: stat(STAT_GC_RUNS),
    gc_segments_freed: stat(STAT_GC_SEGS_FREED),
    gc_stopped: ctl(CTL_GC_ERROR) !== 0,
    gc_wedged: src.monitor.gc_wedged,
    cache_full: ctl(CTL_CACHE_FULL) !== 0,
    deferred_requests: stat(STAT_DEFERRED),
    busy_poll: { spins: stat(STAT_BUSY_POLL_SPINS), hits: stat(STAT_BUSY_POLL_HITS), seconds: stat(STAT_BUSY_POLL_US) / 1e6 },
    errors: { backing_read: stat(STAT_ERR_BACKING_READ), backing_write: stat(STAT_ERR_BACKING_WRITE), crc: stat(STAT_ERR_CRC) },
    workers: src.workers(),
    connections: ctl(CTL_CONNECTIONS),
  };
  return { ...snap, dm_status: dmStatusLine(snap) };
}

/** `<sb_flags> <seg_num> <n_segs> <segs_used> <gc_percent> <cache_info flags> <key_head> <dirty_tail> <key_tail>` */
export function dmStatusLine(st: Omit<StatusSnapshot, "dm_status">): string {
  return [
    hex(st.superblock_flags),
    st.seg_num,
    st.n_segs,
    st.segments_used,
    st.gc_percent,
    hex(st.cache_info_flags),
    st.key_head,
    st.dirty_tail,
    st.key_tail,
  ].join(" ");
}
