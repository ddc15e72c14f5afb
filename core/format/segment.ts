/**
 * Per-segment metadata (reference §1.2, §1.3).
 *
 * pcache_segment_info (16 bytes) at segment +0x0000 / +0x1000:
 *   0 hdr  header (crc over [4, 16), seq)
 *   8 u32  flags     bit0 HAS_NEXT, bits 1-4 segment type (1 = CACHE_DATA)
 *  12 u32  next_seg  PHYSICAL id of the next segment of the chain (valid if HAS_NEXT)
 *
 * pcache_cache_seg_gen (16 bytes) at segment +0x2000 / +0x2010:
 *   0 hdr  header (crc over [4, 16), seq)
 *   8 u64  gen       generation, bumped each time GC frees the segment
 */
import { assert } from "../assert.ts";
import { assertU32, dataView, readU64Number, writeU64Number } from "./bytes.ts";
import {
  SEG_GEN_SIZE,
  SEG_INFO_F_HAS_NEXT,
  SEG_INFO_SIZE,
  SEG_INFO_TYPE_MASK,
  SEG_INFO_TYPE_SHIFT,
  SEG_TYPE_CACHE_DATA,
} from "./constants.ts";

export interface SegmentInfo {
  /** Raw flags word (HAS_NEXT, type, and any unknown bits as found). */
  flags: number;
  next_seg: number;
}

export function segInfoHasNext(info: SegmentInfo): boolean {
  return (info.flags & SEG_INFO_F_HAS_NEXT) !== 0;
}

export function segInfoType(info: SegmentInfo): number {
  return (info.flags & SEG_INFO_TYPE_MASK) >>> SEG_INFO_TYPE_SHIFT;
}

/** segment_info of a cache segment: type CACHE_DATA, linked to next_seg when it is given. */
export function makeSegmentInfo(next_seg?: number): SegmentInfo {
  const type = SEG_TYPE_CACHE_DATA << SEG_INFO_TYPE_SHIFT;
  if (next_seg === undefined) return { flags: type, next_seg: 0 };
  return { flags: type | SEG_INFO_F_HAS_NEXT, next_seg };
}

export function encodeSegmentInfoBody(info: SegmentInfo, rec: Uint8Array): void {
  assert(rec.length === SEG_INFO_SIZE, "segment_info record is 16 bytes");
  assertU32(info.flags, "segment_info flags");
  assertU32(info.next_seg, "segment_info next_seg");
  const dv = dataView(rec);
  dv.setUint32(8, info.flags, true);
  dv.setUint32(12, info.next_seg, true);
}

export function decodeSegmentInfo(rec: Uint8Array): SegmentInfo {
  const dv = dataView(rec.subarray(0, SEG_INFO_SIZE));
  return { flags: dv.getUint32(8, true), next_seg: dv.getUint32(12, true) };
}

export interface SegGen {
  gen: number;
}

export function encodeSegGenBody(g: SegGen, rec: Uint8Array): void {
  assert(rec.length === SEG_GEN_SIZE, "seg_gen record is 16 bytes");
  writeU64Number(dataView(rec), 8, g.gen);
}

/** `where` names the record for the error when gen does not fit a number. */
export function decodeSegGen(rec: Uint8Array, where: string): SegGen {
  return { gen: readU64Number(dataView(rec.subarray(0, SEG_GEN_SIZE)), 8, `${where}: gen`) };
}
