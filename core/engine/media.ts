/**
 * The engine's narrow view of the cache device's metadata: where a log position or data extent
 * lives on the device, and how each mutable record is persisted with the replica rules. The
 * replica state (latest slot and sequence of each record) lives in shared memory so that any
 * thread can write the next copy; callers hold the record's lock.
 */
import type { PersistDomain } from "../persist/domain.ts";

export interface LogPos {
  cache_seg_id: number;
  seg_off: number;
}

export interface Media {
  readonly dom: PersistDomain;
  readonly n_segs: number;
  readonly data_crc: boolean;
  readonly backing_size_bytes: number;
  /** Device offset of byte seg_off of logical segment cache_seg_id's data area. */
  dataOff(cache_seg_id: number, seg_off: number): number;
  /** Persist a new generation of a segment (caller holds the segment table lock). */
  persistSegGen(cache_seg_id: number, gen: number): void;
  /** Persist key_tail or dirty_tail (caller holds that tail's lock). */
  persistTail(which: "key_tail" | "dirty_tail", pos: LogPos): void;
  /** Persist cache_info with a new gc_percent (caller holds the cache_info lock). */
  persistGcPercent(gc_percent: number): void;
}
