/**
 * The `pmem` persistence domain: the cache device is mapped with MAP_SYNC (fs-dax) or is a
 * device-dax character device, so a store is durable once its cache line is written back and
 * a store fence has run; no system call is involved.
 *
 * write: non-temporal copy (whole lines bypass the cache; the partial head and tail lines are
 *        copied and flushed), so after fence() the range is durable even before flush().
 * flush: clwb (or clflushopt, or clflush) per 64-byte line.
 * fence: sfence.
 * The engine flushes every range it wrote; after a non-temporal write that flush would only
 * clwb lines that are not in the cache (measured: 64 KiB write+flush+fence 9.5 µs against
 * 5.5 µs without the flush), so a flush inside the last non-temporal write of this domain
 * object is skipped. fill() uses ordinary stores and clears that memo.
 * Without the native helpers (not built, or PCACHE_NO_NATIVE=1) write is a plain copy and flush
 * is msync of the covering pages, which on fs-dax writes the CPU caches back too.
 */
import { native as default_native, type Native } from "../../ffi/native.ts";
import { MappedDomain, type MappedDomainOptions } from "./msync.ts";

export interface PmemDomainOptions extends MappedDomainOptions {
  /** Persistence helpers to use (tests pass the fallback); default: the loaded native helpers. */
  helpers?: Native;
}

export class PmemDomain extends MappedDomain {
  readonly name = "pmem" as const;
  private readonly helpers: Native;
  /** [start, end) of the last write made with non-temporal stores; end 0 = none. */
  private nt_start = 0;
  private nt_end = 0;

  constructor(opts: PmemDomainOptions) {
    super(opts);
    this.helpers = opts.helpers ?? default_native;
  }

  write(dev_off: number, src: Uint8Array): void {
    this.checkWritable();
    if (this.helpers.available) {
      this.locate(dev_off, src.length);
      this.helpers.memcpyNt(this.base + dev_off, src, src.length);
      this.nt_start = dev_off;
      this.nt_end = dev_off + src.length;
    } else {
      // The flush the contract requires after every write makes this durable (msync).
      this.view(dev_off, src.length).set(src);
    }
  }

  override fill(dev_off: number, len: number, byte: number): void {
    this.nt_end = 0;
    super.fill(dev_off, len, byte);
  }

  flush(dev_off: number, len: number): void {
    this.checkWritable();
    this.locate(dev_off, len);
    // Already on its way to media: NT stores for whole lines, head and tail flushed in C.
    if (dev_off >= this.nt_start && dev_off + len <= this.nt_end) return;
    this.helpers.flushRange(this.base + dev_off, len);
  }

  fence(): void {
    this.helpers.sfence();
  }

  describe(): string {
    const how = this.note || "MAP_SYNC";
    if (!this.helpers.available) return `pmem: ${how}, plain copies + msync (native helpers unavailable: ${this.helpers.reason})`;
    const f = this.helpers.features;
    const flush = f.clwb ? "clwb" : f.clflushopt ? "clflushopt" : "clflush";
    return `pmem: ${how}, non-temporal copies, ${flush}+sfence`;
  }
}
