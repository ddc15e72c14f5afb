/**
 * pcache_cache_key_onmedia (40 bytes) (reference §1.3):
 *   0 u64 off            logical byte offset on the backing device
 *   8 u32 len            bytes
 *  12 u32 flags          bit0 EMPTY (never persisted), bit1 CLEAN; 0 = dirty
 *  16 u32 cache_seg_id   logical data segment
 *  20 u32 cache_seg_off  offset in that segment's data area
 *  24 u64 seg_gen        generation of the data segment when the space was allocated
 *  32 u32 data_crc       CRC-32C of the cached bytes (meaningful only with DATA_CRC)
 *  36 u32 reserved       the kernel leaves stale bytes here; written 0, ignored on read
 */
import { assert, fail } from "../assert.ts";
import { assertU32, readU64Number, writeU64Number } from "./bytes.ts";
import { KEY_SIZE } from "./constants.ts";

export interface KeyFields {
  off: number;
  len: number;
  flags: number;
  cache_seg_id: number;
  cache_seg_off: number;
  seg_gen: number;
  data_crc: number;
}

/** A key as read from media (same fields; bounds are judged by the log walk). */
export type DecodedKey = KeyFields;

/**
 * Encode a key at byte `at` of dv. Asserts the writer's invariants (a key we write is never
 * empty and never ends past 2^53): a violation is a bug in pcache, not bad input.
 */
export function encodeKeyInto(dv: DataView, at: number, key: KeyFields): void {
  if (!(Number.isSafeInteger(key.off) && key.off >= 0)) fail(`key off ${key.off} is not a non-negative safe integer`);
  assert(key.len > 0, "a key is never empty");
  assert(Number.isSafeInteger(key.off + key.len), "key end does not fit 2^53");
  assertU32(key.len, "key len");
  assertU32(key.flags, "key flags");
  assertU32(key.cache_seg_id, "key cache_seg_id");
  assertU32(key.cache_seg_off, "key cache_seg_off");
  assertU32(key.data_crc >>> 0, "key data_crc");
  if (!(at >= 0 && at + KEY_SIZE <= dv.byteLength)) fail(`key slot at ${at} outside the buffer`);
  writeU64Number(dv, at, key.off);
  dv.setUint32(at + 8, key.len, true);
  dv.setUint32(at + 12, key.flags, true);
  dv.setUint32(at + 16, key.cache_seg_id, true);
  dv.setUint32(at + 20, key.cache_seg_off, true);
  writeU64Number(dv, at + 24, key.seg_gen);
  dv.setUint32(at + 32, key.data_crc >>> 0, true);
  dv.setUint32(at + 36, 0, true);
}

/**
 * Decode the key at byte `at` of dv. `where` names it in errors ("key 3 of kset at 0:5144");
 * an off or seg_gen that does not fit a JS number is invalid device data.
 */
export function decodeKeyAt(dv: DataView, at: number, where: string): DecodedKey {
  return {
    off: readU64Number(dv, at, `${where}: off`),
    len: dv.getUint32(at + 8, true),
    flags: dv.getUint32(at + 12, true),
    cache_seg_id: dv.getUint32(at + 16, true),
    cache_seg_off: dv.getUint32(at + 20, true),
    seg_gen: readU64Number(dv, at + 24, `${where}: seg_gen`),
    data_crc: dv.getUint32(at + 32, true),
  };
}
