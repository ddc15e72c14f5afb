/**
 * pcache_cache_kset_onmedia (reference §1.3, §1.5): a 24-byte header, then key_num keys.
 *   0 u32 crc                          normal: CRC of [4, 24 + 40*key_num); LAST: of [4, 24)
 *   4 u32 key_num | next_cache_seg_id  union: key count, or the next key-log segment (LAST)
 *   8 u64 magic                        KSET_MAGIC
 *  16 u64 flags                        bit0 LAST; other bits are ignored, as the kernel does
 *  24 key[key_num]
 */
import { assert } from "../assert.ts";
import { assertU32, dataView } from "./bytes.ts";
import { KEY_SIZE, KSET_F_LAST, KSET_HEADER_SIZE, KSET_KEYS_MAX, KSET_MAGIC, ksetSize } from "./constants.ts";
import { crc32c } from "./crc.ts";
import { encodeKeyInto, type KeyFields } from "./key.ts";

export { decodeKeyAt, encodeKeyInto, type DecodedKey, type KeyFields } from "./key.ts";

export interface KsetHeader {
  crc_stored: number;
  /** The union word: key_num of a normal kset, next_cache_seg_id of a LAST kset. */
  key_num_or_next: number;
  magic: bigint;
  flags: bigint;
  last: boolean;
}

export function decodeKsetHeader(b: Uint8Array): KsetHeader {
  assert(b.length >= KSET_HEADER_SIZE, "kset header needs 24 bytes");
  const dv = dataView(b);
  const flags = dv.getBigUint64(16, true);
  return {
    crc_stored: dv.getUint32(0, true),
    key_num_or_next: dv.getUint32(4, true),
    magic: dv.getBigUint64(8, true),
    flags,
    last: (flags & KSET_F_LAST) !== 0n,
  };
}

/**
 * The CRC a kset at the start of b must carry: over [4, 24) for a LAST kset, over
 * [4, 24 + 40*key_num) for a normal one. b must hold the whole kset.
 */
export function ksetCrc(b: Uint8Array, last: boolean, key_num: number): number {
  const size = last ? KSET_HEADER_SIZE : ksetSize(key_num);
  assert(b.length >= size, `kset CRC needs ${size} bytes, have ${b.length}`);
  return crc32c(b.subarray(4, size));
}

/**
 * Fill the header of the normal kset at byte `at` of dv whose keys are already encoded behind
 * it: key_num, magic, flags 0, then the CRC over header tail and keys.
 */
export function encodeKsetHeader(dv: DataView, at: number, key_num: number): void {
  assert(Number.isInteger(key_num) && key_num >= 1 && key_num <= KSET_KEYS_MAX, `kset key_num ${key_num} outside 1..${KSET_KEYS_MAX}`);
  const size = ksetSize(key_num);
  assert(at >= 0 && at + size <= dv.byteLength, `kset at ${at} (${size} bytes) outside the buffer`);
  dv.setUint32(at + 4, key_num, true);
  dv.setBigUint64(at + 8, KSET_MAGIC, true);
  dv.setBigUint64(at + 16, 0n, true);
  const bytes = new Uint8Array(dv.buffer, dv.byteOffset + at, size);
  dv.setUint32(at, crc32c(bytes.subarray(4)), true);
}

/** A complete normal kset holding keys (1..128). */
export function encodeKset(keys: readonly KeyFields[]): Uint8Array {
  const b = new Uint8Array(ksetSize(keys.length));
  const dv = dataView(b);
  keys.forEach((k, i) => encodeKeyInto(dv, KSET_HEADER_SIZE + i * KEY_SIZE, k));
  encodeKsetHeader(dv, 0, keys.length);
  return b;
}

/** A LAST kset: header only, naming the next key-log segment (logical id). */
export function encodeLastKset(next_cache_seg_id: number): Uint8Array {
  assertU32(next_cache_seg_id, "LAST kset next_cache_seg_id");
  const b = new Uint8Array(KSET_HEADER_SIZE);
  const dv = dataView(b);
  dv.setUint32(4, next_cache_seg_id, true);
  dv.setBigUint64(8, KSET_MAGIC, true);
  dv.setBigUint64(16, KSET_F_LAST, true);
  dv.setUint32(0, crc32c(b.subarray(4)), true);
  return b;
}
