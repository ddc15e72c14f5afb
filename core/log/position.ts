/**
 * Log positions (reference §0 "pos"): (cache_seg_id, seg_off), seg_off relative to the start of
 * the segment's DATA AREA (segment base + 12 KiB). cache_seg_id is LOGICAL; the chain
 * (seg_ids[cache_seg_id] = physical id) turns it into a device offset.
 *
 * Two positions can only be ordered in log order by walking the LAST chain; within one segment
 * the log grows upwards, which is all the walker itself needs.
 */
import { assert } from "../assert.ts";
import { KSET_HEADER_SIZE, SEG_DATA_OFF, SEG_DATA_SIZE, segmentOffset } from "../format/constants.ts";
import type { CachePos } from "../format/pos.ts";

export type { CachePos } from "../format/pos.ts";

/** The part of CacheMeta position math needs: physical id of each logical segment. */
export interface SegmentChain {
  readonly seg_ids: ArrayLike<number>;
}

/** "3:4096" — the notation of the kernel's status line. */
export function posToString(pos: CachePos): string {
  return `${pos.cache_seg_id}:${pos.seg_off}`;
}

export function posEqual(a: CachePos, b: CachePos): boolean {
  return a.cache_seg_id === b.cache_seg_id && a.seg_off === b.seg_off;
}

/** Device offset of byte seg_off of logical segment cache_seg_id's data area. */
export function dataDevOffset(chain: SegmentChain, cache_seg_id: number, seg_off: number): number {
  assert(cache_seg_id >= 0 && cache_seg_id < chain.seg_ids.length, `cache_seg_id ${cache_seg_id} outside the chain`);
  assert(seg_off >= 0 && seg_off <= SEG_DATA_SIZE, `seg_off ${seg_off} outside the data area`);
  return segmentOffset(chain.seg_ids[cache_seg_id]) + SEG_DATA_OFF + seg_off;
}

/** Device offset of a log position. */
export function devOffsetOf(chain: SegmentChain, pos: CachePos): number {
  return dataDevOffset(chain, pos.cache_seg_id, pos.seg_off);
}

/** Bytes from pos to the end of its segment's data area. */
export function bytesLeftInSegment(pos: CachePos): number {
  return SEG_DATA_SIZE - pos.seg_off;
}

/** The position size bytes further in the same segment (asserts it stays inside). */
export function posAdvance(pos: CachePos, size: number): CachePos {
  const seg_off = pos.seg_off + size;
  assert(size >= 0 && seg_off <= SEG_DATA_SIZE, `advancing ${posToString(pos)} by ${size} leaves the segment`);
  return { cache_seg_id: pos.cache_seg_id, seg_off };
}

/**
 * Why a persisted position is not usable as the start of a log walk, or null when it is:
 * a segment outside the cache, or an offset that leaves no room for a kset header.
 */
export function posProblem(pos: CachePos, n_segs: number): string | null {
  if (pos.cache_seg_id >= n_segs) return `cache_seg_id ${pos.cache_seg_id} >= n_segs ${n_segs}`;
  if (pos.seg_off >= SEG_DATA_SIZE) return `seg_off ${pos.seg_off} >= data area size ${SEG_DATA_SIZE}`;
  if (pos.seg_off > SEG_DATA_SIZE - KSET_HEADER_SIZE) {
    return `seg_off ${pos.seg_off} leaves ${SEG_DATA_SIZE - pos.seg_off} bytes in the data area, less than a ${KSET_HEADER_SIZE}-byte kset header`;
  }
  return null;
}
