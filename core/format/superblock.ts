/**
 * pcache_sb, the 24-byte superblock at 0x1000 (reference §1.2, §1.3):
 *   0 le32 crc      CRC of [4, 24), the 4 tail padding bytes included
 *   4 le32 flags    bit 0 BIGENDIAN
 *   8 le64 magic    SB_MAGIC; 0 = unformatted
 *  16 le32 seg_num  physical 16 MiB segments
 *  20 pad  (4 bytes, written 0, covered by the CRC)
 * The superblock has no meta header and no replica.
 */
import { assertU32, dataView, isAllZero } from "./bytes.ts";
import { SB_MAGIC, SB_OFF, SB_SIZE } from "./constants.ts";
import { recordCrc, storedCrc } from "./header.ts";
import type { PersistDomain } from "../persist/domain.ts";

export interface Superblock {
  flags: number;
  seg_num: number;
}

/** Everything read from the superblock bytes, unvalidated (the loader judges it). */
export interface RawSuperblock extends Superblock {
  magic: bigint;
  crc_stored: number;
  crc_computed: number;
  /** The 4 padding bytes as a u32 (0 when written by us or the kernel). */
  pad: number;
}

/** Encode a superblock with SB_MAGIC, zero padding and its CRC. */
export function encodeSuperblock(sb: Superblock): Uint8Array {
  assertU32(sb.flags, "superblock flags");
  assertU32(sb.seg_num, "superblock seg_num");
  const rec = new Uint8Array(SB_SIZE);
  const dv = dataView(rec);
  dv.setUint32(4, sb.flags, true);
  dv.setBigUint64(8, SB_MAGIC, true);
  dv.setUint32(16, sb.seg_num, true);
  dv.setUint32(0, recordCrc(rec), true);
  return rec;
}

export function decodeSuperblock(rec: Uint8Array): RawSuperblock {
  const dv = dataView(rec.subarray(0, SB_SIZE));
  return {
    crc_stored: storedCrc(rec),
    crc_computed: recordCrc(rec.subarray(0, SB_SIZE)),
    flags: dv.getUint32(4, true),
    magic: dv.getBigUint64(8, true),
    seg_num: dv.getUint32(16, true),
    pad: dv.getUint32(20, true),
  };
}

/** The superblock bytes of a device (a view; decode before writing anything). */
export function readSuperblockBytes(dom: PersistDomain): Uint8Array {
  return dom.view(SB_OFF, SB_SIZE);
}

export type SuperblockArea = "blank" | "pcache" | "foreign";

/**
 * What the superblock area holds, to decide whether formatting is safe:
 *  blank   all 24 bytes at 0x1000 are zero (never formatted);
 *  pcache  the magic is pcache's (the image may still fail other checks);
 *  foreign anything else.
 * The kernel formats whenever the magic alone is 0; we call that case foreign unless the whole
 * superblock is zero, so garbage is never overwritten without the user saying so.
 */
export function inspectSuperblockArea(dom: PersistDomain): SuperblockArea {
  if (dom.size_bytes < SB_OFF + SB_SIZE) return "foreign";
  const rec = readSuperblockBytes(dom);
  if (isAllZero(rec)) return "blank";
  return dataView(rec).getBigUint64(8, true) === SB_MAGIC ? "pcache" : "foreign";
}
