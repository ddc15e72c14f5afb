/**
 * CRC-32C as the kernel uses it (reference §1.1): Castagnoli, reflected polynomial 0x82F63B78,
 * in RAW form: `seed` is the initial register and there is no final inversion. Seed 0x3B15A for
 * every CRC of the format.
 *
 * The hardware path (ffi/native.ts, SSE4.2) is used when the native helpers loaded; otherwise
 * the table implementation of crc-32. `crc32cJs` stays exported as the oracle: the native path
 * is checked against it once at load, because a wrong CRC would make every image look corrupt.
 */
import CRC32C from "crc-32/crc32c";
import { native } from "../../ffi/native.ts";
import { AssertionError } from "../assert.ts";
import { CRC_SEED } from "./constants.ts";

/**
 * Raw CRC-32C in JS. crc-32's `buf(data, prev)` inverts on entry and on exit (standard form),
 * so raw(seed, data) = ~std(data, ~seed).
 */
export function crc32cJs(buf: Uint8Array, seed: number = CRC_SEED): number {
  return ~CRC32C.buf(buf, ~seed) >>> 0;
}

/** Known answers (reference §1.1). */
const VECTORS: ReadonlyArray<{ seed: number; data: Uint8Array; crc: number }> = [
  { seed: 0xffff_ffff, data: new TextEncoder().encode("123456789"), crc: 0x1cf96d7c },
  { seed: CRC_SEED, data: new TextEncoder().encode("123456789"), crc: 0xe5868ab2 },
  { seed: CRC_SEED, data: new Uint8Array(20), crc: 0xb9b69066 },
];

function checkImpl(name: string, impl: (seed: number, buf: Uint8Array) => number): void {
  for (const v of VECTORS) {
    const got = impl(v.seed, v.data) >>> 0;
    if (got !== v.crc) {
      throw new AssertionError(
        `assertion failed: ${name} crc32c gives 0x${got.toString(16)} for a known vector (expected 0x${v.crc.toString(16)})`,
      );
    }
  }
  // Unaligned lengths and offsets, compared with the oracle.
  const sample = new Uint8Array(1031);
  for (let i = 0; i < sample.length; i++) sample[i] = (i * 131 + 7) & 0xff;
  for (const [start, end] of [[0, 1031], [3, 1000], [1, 2], [5, 69]] as const) {
    const part = sample.subarray(start, end);
    const got = impl(CRC_SEED, part) >>> 0;
    const want = crc32cJs(part, CRC_SEED);
    if (got !== want) throw new AssertionError(`assertion failed: ${name} crc32c disagrees with the JS oracle`);
  }
}

checkImpl("JS", (seed, buf) => crc32cJs(buf, seed));

const use_native = native.available;
if (use_native) checkImpl("native", native.crc32cRaw);

const rawImpl: (seed: number, buf: Uint8Array) => number = use_native ? native.crc32cRaw : (seed, buf) => crc32cJs(buf, seed);

/** Which implementation crc32c() runs, for `info`/`status`. */
export const crc32cImpl: "native" | "js" = use_native ? "native" : "js";

/** Raw CRC-32C of buf with the given initial register (default: the format's seed). */
export function crc32c(buf: Uint8Array, seed: number = CRC_SEED): number {
  return rawImpl(seed >>> 0, buf) >>> 0;
}
