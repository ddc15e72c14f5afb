/**
 * An in-memory NbdExport for tests and demos: sparse by fixed chunks (64 KiB by default), so a
 * large export costs memory only where it was written. Knobs let tests delay operations (to
 * force out-of-order replies), hold them at a gate, and inject errors.
 */
import { assert } from "../assert.ts";
import { ERRNO, NbdExportError, type NbdExport, type WriteData, writeDataLength, writeDataParts } from "./export.ts";
import { STATE_HOLE, STATE_ZERO } from "./wire.ts";

export type MemoryOp = "read" | "write" | "flush" | "trim" | "zero" | "cache" | "block_status";

export interface MemoryExportOptions {
  size_bytes: number;
  read_only?: boolean;
  /** Allocation unit; a power of two. Default 64 KiB. */
  chunk_bytes?: number;
  /** Fixed delay per operation, or a function of the operation (for out-of-order completions). */
  delay_ms?: number | ((op: MemoryOp, off: number, len: number) => number);
  /** Adds a uniformly random delay in [0, jitter_ms) to every operation. */
  jitter_ms?: number;
  /** Awaited before the operation runs: a test can hold requests in flight and release them. */
  gate?: (op: MemoryOp, off: number, len: number) => Promise<void> | void;
  /** Return an errno (or an Error to throw as is) to make this operation fail. */
  fail?: (op: MemoryOp, off: number, len: number) => number | Error | undefined;
  /** When false, write-zeroes with fast_zero fails with ENOTSUP. Default true (zeroing is cheap here). */
  fast_zero?: boolean;
  /**
   * Read and write finish within the call and return undefined, as the engine does for cached
   * data (failures throw at once). Not with delay_ms, jitter_ms or gate.
   */
  synchronous?: boolean;
}

export class MemoryExport implements NbdExport {
  readonly size_bytes: number;
  readonly read_only: boolean;
  readonly chunk_bytes: number;
  /** Allocated chunks by index; absent = a hole that reads as zeroes. */
  private readonly chunks = new Map<number, Uint8Array>();
  /** Operation counters, for tests. */
  readonly stats = { read: 0, write: 0, flush: 0, trim: 0, zero: 0, cache: 0, block_status: 0, fua: 0 };
  inflight_now = 0;
  inflight_max = 0;

  constructor(private readonly opts: MemoryExportOptions) {
    assert(Number.isSafeInteger(opts.size_bytes) && opts.size_bytes >= 0, "size_bytes is a safe integer");
    const chunk_bytes = opts.chunk_bytes ?? 65536;
    assert(chunk_bytes > 0 && (chunk_bytes & (chunk_bytes - 1)) === 0, "chunk_bytes is a power of two");
    this.size_bytes = opts.size_bytes;
    this.read_only = opts.read_only ?? false;
    this.chunk_bytes = chunk_bytes;
    const waits = opts.delay_ms !== undefined || opts.jitter_ms !== undefined || opts.gate !== undefined;
    assert(!(opts.synchronous && waits), "a synchronous export has no delay, jitter or gate");
  }

  /** Bytes held in allocated chunks. */
  get allocated_bytes(): number {
    return this.chunks.size * this.chunk_bytes;
  }

  read(off: number, len: number, dst: Uint8Array): Promise<void> | undefined {
    if (!this.opts.synchronous) return this.readLater(off, len, dst);
    this.injectFailure("read", off, len);
    this.stats.read++;
    this.copyOut(off, len, dst);
    return undefined;
  }

  write(off: number, data: WriteData, fua: boolean): Promise<void> | undefined {
    if (!this.opts.synchronous) return this.writeLater(off, data, fua);
    this.injectFailure("write", off, writeDataLength(data));
    this.writeNow(off, data, fua);
    return undefined;
  }

  private async readLater(off: number, len: number, dst: Uint8Array): Promise<void> {
    await this.enter("read", off, len);
    try {
      this.stats.read++;
      this.copyOut(off, len, dst);
    } finally {
      this.leave();
    }
  }

  private async writeLater(off: number, data: WriteData, fua: boolean): Promise<void> {
    await this.enter("write", off, writeDataLength(data));
    try {
      this.writeNow(off, data, fua);
    } finally {
      this.leave();
    }
  }

  private writeNow(off: number, data: WriteData, fua: boolean): void {
    this.stats.write++;
    if (fua) this.stats.fua++;
    let at = off;
    for (const part of writeDataParts(data)) {
      this.copyIn(at, part);
      at += part.length;
    }
  }

  async flush(): Promise<void> {
    await this.enter("flush", 0, 0);
    this.stats.flush++;
    this.leave();
  }

  async trim(off: number, len: number, fua: boolean): Promise<void> {
    await this.enter("trim", off, len);
    this.stats.trim++;
    if (fua) this.stats.fua++;
    this.punch(off, len);
    this.leave();
  }

  async writeZeroes(off: number, len: number, opts: { fua: boolean; no_hole: boolean; fast_zero: boolean }): Promise<void> {
    if (opts.fast_zero && this.opts.fast_zero === false) {
      throw new NbdExportError(ERRNO.ENOTSUP, "fast zero not supported");
    }
    await this.enter("zero", off, len);
    try {
      this.stats.zero++;
      if (opts.fua) this.stats.fua++;
      if (opts.no_hole) this.zeroFill(off, len);
      else this.punch(off, len);
    } finally {
      this.leave();
    }
  }

  async cache(off: number, len: number): Promise<void> {
    await this.enter("cache", off, len);
    this.stats.cache++;
    this.leave();
  }

  async blockStatus(off: number, len: number): Promise<Array<{ length: number; flags: number }>> {
    await this.enter("block_status", off, len);
    this.stats.block_status++;
    const extents: Array<{ length: number; flags: number }> = [];
    const end = Math.min(off + len, this.size_bytes);
    let pos = off;
    while (pos < end) {
      const idx = Math.floor(pos / this.chunk_bytes);
      const chunk_end = Math.min((idx + 1) * this.chunk_bytes, end);
      const flags = this.chunks.has(idx) ? 0 : STATE_HOLE | STATE_ZERO;
      const last = extents[extents.length - 1];
      if (last && last.flags === flags) last.length += chunk_end - pos;
      else extents.push({ length: chunk_end - pos, flags });
      pos = chunk_end;
    }
    this.leave();
    return extents;
  }

  /** Synchronous view of the contents, for test assertions. */
  peek(off: number, len: number): Uint8Array {
    const dst = new Uint8Array(len);
    this.copyOut(off, len, dst);
    return dst;
  }

  /** Synchronous write, for test setup. */
  poke(off: number, data: Uint8Array): void {
    this.copyIn(off, data);
  }

  private async enter(op: MemoryOp, off: number, len: number): Promise<void> {
    this.inflight_now++;
    if (this.inflight_now > this.inflight_max) this.inflight_max = this.inflight_now;
    try {
      const d = this.opts.delay_ms;
      let ms = typeof d === "function" ? d(op, off, len) : (d ?? 0);
      if (this.opts.jitter_ms) ms += Math.random() * this.opts.jitter_ms;
      if (ms > 0) await Bun.sleep(ms);
      if (this.opts.gate) await this.opts.gate(op, off, len);
      this.injectFailure(op, off, len);
    } catch (e) {
      this.inflight_now--;
      throw e;
    }
  }

  /** Throws what the `fail` knob asks for this operation, if anything. */
  private injectFailure(op: MemoryOp, off: number, len: number): void {
    const f = this.opts.fail?.(op, off, len);
    if (f instanceof Error) throw f;
    if (typeof f === "number" && f !== 0) throw new NbdExportError(f, `injected ${op} failure`);
  }

  private leave(): void {
    this.inflight_now--;
  }

  private copyOut(off: number, len: number, dst: Uint8Array): void {
    assert(off + len <= this.size_bytes && dst.length >= len, "read within export and buffer");
    let pos = off;
    let at = 0;
    while (at < len) {
      const idx = Math.floor(pos / this.chunk_bytes);
      const in_chunk = pos - idx * this.chunk_bytes;
      const n = Math.min(this.chunk_bytes - in_chunk, len - at);
      const chunk = this.chunks.get(idx);
      if (chunk) dst.set(chunk.subarray(in_chunk, in_chunk + n), at);
      else dst.fill(0, at, at + n);
      pos += n;
      at += n;
    }
  }

  private copyIn(off: number, data: Uint8Array): void {
    assert(off + data.length <= this.size_bytes, "write within export");
    let pos = off;
    let at = 0;
    while (at < data.length) {
      const idx = Math.floor(pos / this.chunk_bytes);
      const in_chunk = pos - idx * this.chunk_bytes;
      const n = Math.min(this.chunk_bytes - in_chunk, data.length - at);
      let chunk = this.chunks.get(idx);
      if (!chunk) {
        chunk = new Uint8Array(this.chunk_bytes);
        this.chunks.set(idx, chunk);
      }
      chunk.set(data.subarray(at, at + n), in_chunk);
      pos += n;
      at += n;
    }
  }

  /** Zero the range keeping it allocated. */
  private zeroFill(off: number, len: number): void {
    let pos = off;
    const end = off + len;
    while (pos < end) {
      const idx = Math.floor(pos / this.chunk_bytes);
      const in_chunk = pos - idx * this.chunk_bytes;
      const n = Math.min(this.chunk_bytes - in_chunk, end - pos);
      let chunk = this.chunks.get(idx);
      if (!chunk) {
        chunk = new Uint8Array(this.chunk_bytes);
        this.chunks.set(idx, chunk);
      } else {
        chunk.fill(0, in_chunk, in_chunk + n);
      }
      pos += n;
    }
  }

  /** Drop whole chunks in the range, zero the partial ends (so reads stay deterministic). */
  private punch(off: number, len: number): void {
    let pos = off;
    const end = off + len;
    while (pos < end) {
      const idx = Math.floor(pos / this.chunk_bytes);
      const in_chunk = pos - idx * this.chunk_bytes;
      const n = Math.min(this.chunk_bytes - in_chunk, end - pos);
      if (n === this.chunk_bytes) this.chunks.delete(idx);
      else this.chunks.get(idx)?.fill(0, in_chunk, in_chunk + n);
      pos += n;
    }
  }
}
