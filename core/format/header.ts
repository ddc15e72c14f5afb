/**
 * pcache_meta_header (8 bytes: crc u32, seq u8, version u8, res u16), the prefix of cache_info,
 * segment_info, seg_gen and the tail positions, and the CRC rule of every metadata record:
 * CRC-32C (seed 0x3B15A) of the record's bytes [4, sizeof(record)) (reference §1.1, §1.5).
 */
import { assert } from "../assert.ts";
import { META_HEADER_SIZE } from "./constants.ts";
import { crc32c } from "./crc.ts";
import { dataView } from "./bytes.ts";

export interface MetaHeader {
  crc: number;
  /** 8-bit wrapping sequence; compared with seqAfter(). */
  seq: number;
  /** Never set by the kernel (0); kept only to show it. */
  version: number;
  res: number;
}

export function decodeMetaHeader(rec: Uint8Array): MetaHeader {
  assert(rec.length >= META_HEADER_SIZE, "meta header needs 8 bytes");
  const dv = dataView(rec);
  return { crc: dv.getUint32(0, true), seq: rec[4], version: rec[5], res: dv.getUint16(6, true) };
}

/** CRC a record must carry: bytes [4, rec.length) — the whole struct minus its crc field. */
export function recordCrc(rec: Uint8Array): number {
  assert(rec.length > 4, "a CRC-protected record is longer than its crc field");
  return crc32c(rec.subarray(4));
}

/** The crc field as stored. */
export function storedCrc(rec: Uint8Array): number {
  return dataView(rec).getUint32(0, true);
}

/**
 * Set seq, version 0 and res 0, then compute and store the CRC. The body (bytes from 8) must be
 * encoded already.
 */
export function sealRecord(rec: Uint8Array, seq: number): void {
  assert(Number.isInteger(seq) && seq >= 0 && seq <= 0xff, `meta seq ${seq} is not a u8`);
  const dv = dataView(rec);
  rec[4] = seq;
  rec[5] = 0;
  dv.setUint16(6, 0, true);
  dv.setUint32(0, recordCrc(rec), true);
}

/**
 * a is later than b iff (int8)(a - b) > 0. The two replicas of a record always differ by one,
 * so the 128-wide window of this comparison is never exceeded.
 */
export function seqAfter(a: number, b: number): boolean {
  return ((((a - b) & 0xff) << 24) >> 24) > 0;
}

/** The sequence that follows seq (mod 256). */
export function seqNext(seq: number): number {
  return (seq + 1) & 0xff;
}
