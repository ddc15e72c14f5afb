/**
 * pcache_cache_pos_onmedia (16 bytes), the persisted key_tail and dirty_tail (reference §1.3):
 *   0 hdr  header (crc over [4, 16), seq)
 *   8 u32  cache_seg_id  logical segment
 *  12 u32  seg_off       offset inside that segment's data area
 */
import { assert } from "../assert.ts";
import { assertU32, dataView } from "./bytes.ts";
import { POS_SIZE } from "./constants.ts";

export interface CachePos {
  cache_seg_id: number;
  seg_off: number;
}

export function encodePosBody(pos: CachePos, rec: Uint8Array): void {
  assert(rec.length === POS_SIZE, "pos record is 16 bytes");
  assertU32(pos.cache_seg_id, "pos cache_seg_id");
  assertU32(pos.seg_off, "pos seg_off");
  const dv = dataView(rec);
  dv.setUint32(8, pos.cache_seg_id, true);
  dv.setUint32(12, pos.seg_off, true);
}

export function decodePos(rec: Uint8Array): CachePos {
  const dv = dataView(rec.subarray(0, POS_SIZE));
  return { cache_seg_id: dv.getUint32(8, true), seg_off: dv.getUint32(12, true) };
}
