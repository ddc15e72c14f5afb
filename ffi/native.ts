/**
 * Native persistence helpers (ffi/native/pmhelpers.c, built by scripts/build.ts) with a portable
 * fallback.
 *
 * The .so is pulled in with a file import: under `bun test`/`bun run` that yields its path in the
 * source tree; inside a `bun build --compile` binary the file is embedded and Bun extracts it
 * for dlopen. The import is dynamic so a missing .so (not built yet) is a fallback, not a crash.
 * PCACHE_NO_NATIVE=1 forces the fallback.
 *
 * Fallback: flushRange and memcpyNt use plain copies plus msync of the covering pages (durable
 * when they return, so sfence is a no-op), crc32cRaw uses crc-32's table implementation.
 */
import { dlopen, toArrayBuffer, type Pointer } from "bun:ffi";
import CRC32C from "crc-32/crc32c";
import { msyncRange } from "./libc.ts";

const F_CLWB = 1 << 0;
const F_CLFLUSHOPT = 1 << 1;
const F_SSE42 = 1 << 2;

export interface NativeFeatures {
  clwb: boolean;
  clflushopt: boolean;
  sse42: boolean;
}

export interface Native {
  available: boolean;
  /** Why the native helpers are not in use ("" when they are). */
  reason: string;
  features: NativeFeatures;
  /** Write back the cache lines covering [addr, addr + len); durable after sfence(). */
  flushRange(addr: number, len: number): void;
  /** Store fence: orders and completes earlier flushes and non-temporal stores. */
  sfence(): void;
  /** Copy len bytes of src to addr so that the range is durable after sfence(). */
  memcpyNt(dst_addr: number, src: Uint8Array, len: number): void;
  /** CRC32C, raw form: seed is the initial register, no inversion on entry or exit. */
  crc32cRaw(seed: number, buf: Uint8Array): number;
}

const SYMBOLS = {
  pm_features: { args: [], returns: "i32" },
  pm_flush_range: { args: ["ptr", "u64"], returns: "void" },
  pm_sfence: { args: [], returns: "void" },
  pm_memcpy_nt: { args: ["ptr", "ptr", "u64"], returns: "void" },
  pm_copy: { args: ["ptr", "ptr", "u64"], returns: "void" },
  pm_crc32c_raw: { args: ["u32", "ptr", "u64"], returns: "u32" },
} as const;

/** crc-32's crc32c is the standard (inverted) form: raw(seed) = ~std(buf, ~seed). */
export function crc32cRawJs(seed: number, buf: Uint8Array): number {
  return ~CRC32C.buf(buf, ~seed) >>> 0;
}

function checkSourceLength(src: Uint8Array, len: number): void {
  if (len > src.length) throw new RangeError(`memcpyNt: length ${len} exceeds the source (${src.length} bytes)`);
}

/** The portable implementation; exported so tests can compare it with the native one. */
export function makeFallbackNative(reason: string): Native {
  return {
    available: false,
    reason,
    features: { clwb: false, clflushopt: false, sse42: false },
    flushRange(addr, len) {
      msyncRange(addr, 0, len);
    },
    sfence() {},
    memcpyNt(dst_addr, src, len) {
      if (len <= 0) return;
      checkSourceLength(src, len);
      new Uint8Array(toArrayBuffer(dst_addr as Pointer, 0, len)).set(src.subarray(0, len));
      msyncRange(dst_addr, 0, len);
    },
    crc32cRaw: crc32cRawJs,
  };
}

/** dlopen the helpers at so_path; throws if that fails. */
export function makeNativeFromLibrary(so_path: string): Native {
  const lib = dlopen(so_path, SYMBOLS).symbols;
  const bits = lib.pm_features();
  const features = { clwb: (bits & F_CLWB) !== 0, clflushopt: (bits & F_CLFLUSHOPT) !== 0, sse42: (bits & F_SSE42) !== 0 };
  return {
    available: true,
    reason: "",
    features,
    flushRange(addr, len) {
      lib.pm_flush_range(addr as Pointer, len);
    },
    sfence() {
      lib.pm_sfence();
    },
    memcpyNt(dst_addr, src, len) {
      if (len <= 0) return;
      checkSourceLength(src, len);
      lib.pm_memcpy_nt(dst_addr as Pointer, src, len);
    },
    // Without SSE4.2 the C side would use a byte-wise table: the JS library is faster than that.
    crc32cRaw: features.sse42 ? (seed, buf) => lib.pm_crc32c_raw(seed >>> 0, buf, buf.length) : crc32cRawJs,
  };
}

async function loadNative(): Promise<Native> {
  if (process.env.PCACHE_NO_NATIVE === "1") return makeFallbackNative("disabled by PCACHE_NO_NATIVE=1");
  if (process.arch !== "x64") return makeFallbackNative(`not built for ${process.arch}`);
  let so_path: string;
  try {
    // @ts-ignore -- a .so has no type declarations; the "file" import yields its path (a string).
    so_path = (await import("./native/libpmhelpers.so", { with: { type: "file" } })).default as string;
  } catch {
    return makeFallbackNative("ffi/native/libpmhelpers.so not built (run: bun scripts/build.ts --native-only)");
  }
  try {
    return makeNativeFromLibrary(so_path);
  } catch (e) {
    return makeFallbackNative(`dlopen ${so_path} failed: ${(e as Error).message}`);
  }
}

export const native: Native = await loadNative();

/** One line for `pcache info`. */
export function describeNative(n: Native = native): string {
  if (!n.available) return `native helpers unavailable (${n.reason}): plain copies, msync, JS crc32c`;
  const flush = n.features.clwb ? "clwb" : n.features.clflushopt ? "clflushopt" : "clflush";
  const crc = n.features.sse42 ? "sse4.2 crc32c" : "JS crc32c";
  const present = [n.features.clwb && "clwb", n.features.clflushopt && "clflushopt"].filter(Boolean).join(", ");
  return `native helpers: ${present || "no clwb/clflushopt"}, ${crc} (flush with ${flush}, non-temporal copies)`;
}
