/**
 * pcache_cache_info (24 bytes) at 0x2000 / 0x3000 (reference §1.3):
 *   0 hdr  header (crc over [4, 24), seq)
 *   8 u32  seg_id    PHYSICAL id of the first cache segment
 *  12 u32  n_segs    segments in the cache
 *  16 u32  flags     bit0 DATA_CRC, bit1 INIT_DONE, bits 2-5 cache mode, bits 6-12 gc_percent
 *  20 u32  reserved  0
 */
import { assert } from "../assert.ts";
import { assertU32, dataView } from "./bytes.ts";
import {
  CACHE_INFO_F_DATA_CRC,
  CACHE_INFO_F_INIT_DONE,
  CACHE_INFO_GC_PERCENT_MASK,
  CACHE_INFO_GC_PERCENT_SHIFT,
  CACHE_INFO_MODE_MASK,
  CACHE_INFO_MODE_SHIFT,
  CACHE_INFO_SIZE,
  CACHE_MODE_WRITEBACK,
} from "./constants.ts";

export interface CacheInfo {
  seg_id: number;
  n_segs: number;
  /** Raw flags word; read the parts with cacheInfoFlags(), build it with makeCacheInfoFlags(). */
  flags: number;
}

export interface CacheInfoFlags {
  data_crc: boolean;
  init_done: boolean;
  /** 0 writeback, 1 writethrough, 2 writearound, 3 writeonly (only 0 is used). */
  cache_mode: number;
  /** 7-bit field; valid values 0..90. */
  gc_percent: number;
  /** Bits 13-31, never set by the kernel; kept so a rewrite preserves them. */
  other_bits: number;
}

/** Names of the cache modes the format defines (bits 2-5 of cache_info.flags). */
export const CACHE_MODE_NAMES: Readonly<Record<number, string>> = {
  0: "writeback",
  1: "writethrough",
  2: "writearound",
  3: "writeonly",
};

const KNOWN_BITS = CACHE_INFO_F_DATA_CRC | CACHE_INFO_F_INIT_DONE | CACHE_INFO_MODE_MASK | CACHE_INFO_GC_PERCENT_MASK;

export function cacheInfoFlags(flags: number): CacheInfoFlags {
  return {
    data_crc: (flags & CACHE_INFO_F_DATA_CRC) !== 0,
    init_done: (flags & CACHE_INFO_F_INIT_DONE) !== 0,
    cache_mode: (flags & CACHE_INFO_MODE_MASK) >>> CACHE_INFO_MODE_SHIFT,
    gc_percent: (flags & CACHE_INFO_GC_PERCENT_MASK) >>> CACHE_INFO_GC_PERCENT_SHIFT,
    other_bits: (flags & ~KNOWN_BITS) >>> 0,
  };
}

export function makeCacheInfoFlags(f: {
  data_crc: boolean;
  init_done: boolean;
  cache_mode?: number;
  gc_percent: number;
  other_bits?: number;
}): number {
  const mode = f.cache_mode ?? CACHE_MODE_WRITEBACK;
  const other = f.other_bits ?? 0;
  assert(Number.isInteger(mode) && mode >= 0 && mode <= 0xf, `cache mode ${mode} does not fit 4 bits`);
  assert(Number.isInteger(f.gc_percent) && f.gc_percent >= 0 && f.gc_percent <= 0x7f, `gc_percent ${f.gc_percent} does not fit 7 bits`);
  assert((other & KNOWN_BITS) === 0, "other_bits overlaps the defined cache_info flags");
  return (
    ((f.data_crc ? CACHE_INFO_F_DATA_CRC : 0) |
      (f.init_done ? CACHE_INFO_F_INIT_DONE : 0) |
      (mode << CACHE_INFO_MODE_SHIFT) |
      (f.gc_percent << CACHE_INFO_GC_PERCENT_SHIFT) |
      other) >>>
    0
  );
}

/** The same cache_info with another gc_percent (the `gc_percent` message). */
export function withGcPercent(info: CacheInfo, gc_percent: number): CacheInfo {
  const f = cacheInfoFlags(info.flags);
  return { ...info, flags: makeCacheInfoFlags({ ...f, gc_percent }) };
}

/** Encode the body (bytes 8..24) into a zeroed 24-byte record; the header is sealed by the caller. */
export function encodeCacheInfoBody(info: CacheInfo, rec: Uint8Array): void {
  assert(rec.length === CACHE_INFO_SIZE, "cache_info record is 24 bytes");
  assertU32(info.seg_id, "cache_info seg_id");
  assertU32(info.n_segs, "cache_info n_segs");
  assertU32(info.flags, "cache_info flags");
  const dv = dataView(rec);
  dv.setUint32(8, info.seg_id, true);
  dv.setUint32(12, info.n_segs, true);
  dv.setUint32(16, info.flags, true);
  dv.setUint32(20, 0, true);
}

/** Decode the fields (no validation: the loader judges them). The reserved word is ignored. */
export function decodeCacheInfo(rec: Uint8Array): CacheInfo {
  const dv = dataView(rec.subarray(0, CACHE_INFO_SIZE));
  return { seg_id: dv.getUint32(8, true), n_segs: dv.getUint32(12, true), flags: dv.getUint32(16, true) };
}
