/**
 * PersistDomain answers one question: after which call is a byte range of the cache device
 * durable? (ARCHITECTURE §4.) The engine writes only through this interface and never calls
 * msync or a flush helper itself, so the same code runs on pmem, on a page-cache file and in the
 * crash simulator.
 *
 * Contract, the same for every domain (domains may be stronger, never weaker):
 *   write(...) / fill(...)   store bytes; NOT durable yet
 *   flush(off, len)          start write-back of the lines/pages covering the range
 *   fence()                  barrier: every range flushed before this call is durable when it returns
 * Ordering between two durable states is expressed only by fence(). Bytes that were written but
 * not flushed+fenced may or may not survive a crash, line by line (64 bytes).
 */

export type PersistDomainName = "pmem" | "msync" | "sim";

/** Cache-line size used for persistence granularity. */
export const CACHE_LINE_BYTES = 64;

export interface PersistDomain {
  readonly name: PersistDomainName;
  /** Size of the cache device in bytes. */
  readonly size_bytes: number;
  /**
   * Zero-copy view of [dev_off, dev_off + len) for reading. The range must lie inside the
   * metadata area [0, SEGMENTS_OFF) or inside one segment: views never cross a segment boundary
   * (so devices larger than 4 GiB work with one ArrayBuffer per segment). Do not write through it.
   */
  view(dev_off: number, len: number): Uint8Array;
  /** Copy src to the device at dev_off (same range rule as view). */
  write(dev_off: number, src: Uint8Array): void;
  /** Set [dev_off, dev_off + len) to byte (same range rule as view). */
  fill(dev_off: number, len: number, byte: number): void;
  /** Start making [dev_off, dev_off + len) durable. */
  flush(dev_off: number, len: number): void;
  /** Durability barrier for everything flushed before it. */
  fence(): void;
  /** One line for `info` / `status`: domain and mechanism (e.g. "pmem: MAP_SYNC, clwb+sfence"). */
  describe(): string;
  /** Release the mapping. Views handed out before are invalid afterwards. */
  close(): void;
}

/** write + flush + fence in one call, for metadata records. */
export function writeDurable(dom: PersistDomain, dev_off: number, src: Uint8Array): void {
  dom.write(dev_off, src);
  dom.flush(dev_off, src.length);
  dom.fence();
}
