/**
 * Little-endian field access shared by the on-media codecs. Every structure is written
 * little-endian (reference §1.1); u64 fields that hold offsets or generations become JS numbers,
 * and a value that a number cannot hold exactly is invalid device data, not a bug.
 */
import { assert, fail } from "../assert.ts";
import { InvalidDeviceError } from "../errors.ts";

/** A DataView over exactly the bytes of b (works for subarrays and shared memory). */
export function dataView(b: Uint8Array): DataView {
  return new DataView(b.buffer, b.byteOffset, b.byteLength);
}

/** Largest u64 we accept as a number: 2^53 - 1 (high word <= 0x1FFFFF). */
const U64_SAFE_HIGH_MAX = 0x1f_ffff;

/**
 * Read a little-endian u64 that must fit a JS number. `what` names the field and its position
 * for the error message ("key 3 of kset at 0:5144: off").
 */
export function readU64Number(dv: DataView, off: number, what: string): number {
  const lo = dv.getUint32(off, true);
  const hi = dv.getUint32(off + 4, true);
  if (hi > U64_SAFE_HIGH_MAX) {
    throw new InvalidDeviceError(`${what}: value ${hex64(hi, lo)} exceeds 2^53 and cannot be a valid offset or generation`);
  }
  return hi * 0x1_0000_0000 + lo;
}

/** Write a non-negative safe integer as a little-endian u64. */
export function writeU64Number(dv: DataView, off: number, value: number): void {
  if (!(Number.isSafeInteger(value) && value >= 0)) fail(`u64 field value ${value} is not a non-negative safe integer`);
  dv.setUint32(off, value % 0x1_0000_0000, true);
  dv.setUint32(off + 4, Math.floor(value / 0x1_0000_0000), true);
}

/** Read a little-endian u64 as a bigint (magics, flag words). */
export function readU64Big(dv: DataView, off: number): bigint {
  return dv.getBigUint64(off, true);
}

/** "0x0000abcd" style, for CRCs and u32 fields in messages. */
export function hex32(v: number): string {
  return `0x${(v >>> 0).toString(16).padStart(8, "0")}`;
}

/** "0x..." for a u64 given as bigint or as two words. */
export function hex64(hi_or_big: number | bigint, lo?: number): string {
  if (typeof hi_or_big === "bigint") return `0x${hi_or_big.toString(16).padStart(16, "0")}`;
  return `0x${(hi_or_big >>> 0).toString(16).padStart(8, "0")}${((lo ?? 0) >>> 0).toString(16).padStart(8, "0")}`;
}

/** "0x1000" style device offset. */
export function hexOff(v: number): string {
  return `0x${v.toString(16)}`;
}

/** True when every byte of b is zero. */
export function isAllZero(b: Uint8Array): boolean {
  // 4 bytes at a time where alignment allows it (writeback checks whole extents, zeroRange whole
  // segments). Uint32 words, not BigUint64: BigInt compares are several times slower.
  if (b.byteOffset % 4 === 0 && b.length % 4 === 0) {
    const words = new Uint32Array(b.buffer, b.byteOffset, b.length / 4);
    for (let i = 0; i < words.length; i++) if (words[i] !== 0) return false;
    return true;
  }
  for (let i = 0; i < b.length; i++) if (b[i] !== 0) return false;
  return true;
}

/** Check that v is an integer in [0, 2^32), for encoders of u32 fields. */
export function assertU32(v: number, name: string): void {
  if (!(Number.isInteger(v) && v >= 0 && v <= 0xffff_ffff)) fail(`${name} ${v} does not fit a u32`);
}
