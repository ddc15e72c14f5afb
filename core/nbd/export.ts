/**
 * The one interface between the NBD protocol code and whatever serves the bytes (the cache
 * engine, or memory_export.ts in tests). The NBD layer validates every request before it calls
 * in here: offsets and lengths are exact integers, `off + len <= size_bytes`, lengths are at
 * most 32 MiB for read/write, and nothing that writes is called on a read-only export.
 *
 * Errors: throw anything carrying a numeric `errno` (core/errors.ts SysError and
 * BackingIoError do). EIO 5, ENOSPC 28, EPERM 1, ENOTSUP 95 (only meaningful for a FAST_ZERO
 * write-zeroes) and the other protocol errnos go to the client as they are; EDQUOT and EFBIG
 * become ENOSPC, EROFS becomes EPERM, anything else (and errors without errno) becomes EIO.
 */
export interface NbdExport {
  readonly size_bytes: number;
  readonly read_only: boolean;
  /**
   * Fills `dst` (exactly `len` bytes) with the contents at `off`. May finish synchronously:
   * returning undefined means done, and a synchronous throw is a failed request like a rejection.
   */
  read(off: number, len: number, dst: Uint8Array): Promise<void> | undefined;
  /**
   * `data` is the payload: one buffer, or the receive chunks it arrived in, in order (a large
   * WRITE is not gathered into one buffer first). Views into receive chunks: copy what must
   * outlive the call. May finish synchronously, as read may.
   */
  write(off: number, data: WriteData, fua: boolean): Promise<void> | undefined;
  /** Every write completed (replied to) before this call, on ANY connection, becomes durable. */
  flush(): Promise<void>;
  /** A hint: discard all, part or none of the range. */
  trim(off: number, len: number, fua: boolean): Promise<void>;
  /** Range must read back as zeroes. fast_zero: fail at once with ENOTSUP unless cheaper than a write. */
  writeZeroes(off: number, len: number, opts: { fua: boolean; no_hole: boolean; fast_zero: boolean }): Promise<void>;
  /** Prefetch hint; may resolve before the data is cached. */
  cache(off: number, len: number): Promise<void>;
  /**
   * base:allocation extents, contiguous from `off`, each with length > 0 and flags a mix of
   * STATE_HOLE (1) and STATE_ZERO (2). May cover less than `len` (the client asks again) or
   * more (the NBD layer clips).
   */
  blockStatus(off: number, len: number): Promise<Array<{ length: number; flags: number }>>;
}

/** A WRITE payload: one buffer, or consecutive parts of it. */
export type WriteData = Uint8Array | readonly Uint8Array[];

/** The parts of a WRITE payload, in order (one buffer is one part). */
export function writeDataParts(data: WriteData): readonly Uint8Array[] {
  return data instanceof Uint8Array ? [data] : data;
}

/** Bytes in a WRITE payload. */
export function writeDataLength(data: WriteData): number {
  if (data instanceof Uint8Array) return data.length;
  let n = 0;
  for (const part of data) n += part.length;
  return n;
}

/** Errno values an export may throw (Linux numbering). */
export const ERRNO = {
  EPERM: 1,
  EIO: 5,
  ENOMEM: 12,
  EINVAL: 22,
  EFBIG: 27,
  ENOSPC: 28,
  EROFS: 30,
  EOVERFLOW: 75,
  ENOTSUP: 95,
  ESHUTDOWN: 108,
  EDQUOT: 122,
} as const;

/** A plain error with an errno, for exports that have nothing more specific to throw. */
export class NbdExportError extends Error {
  override name = "NbdExportError";
  constructor(readonly errno: number, message: string) {
    super(message);
  }
}
