/**
 * An in-memory backing device for tests and the crash explorer. It remembers which writes were
 * not yet flushed, so a simulated crash can drop some of them (like a disk's volatile cache), and
 * it can fail reads or writes on command (fault injection).
 */
import { assert } from "../assert.ts";
import { BackingIoError } from "../errors.ts";
import { makeRng } from "../persist/sim.ts";
import type { BackingDevice } from "./backing.ts";

interface PendingWrite {
  off: number;
  old: Uint8Array;
}

export class MemoryBacking implements BackingDevice {
  readonly name: string;
  readonly bytes: Uint8Array;
  /** Writes since the last flush, oldest first, with the bytes they replaced. */
  private pending: PendingWrite[] = [];
  /** Fault injection: fail every read / write / flush while set. */
  fail_reads = false;
  fail_writes = false;
  fail_flushes = false;
  reads = 0;
  writes = 0;
  flushes = 0;

  constructor(
    readonly size_bytes: number,
    opts: { name?: string; bytes?: Uint8Array } = {},
  ) {
    this.name = opts.name ?? "memory";
    this.bytes = opts.bytes ?? new Uint8Array(size_bytes);
    assert(this.bytes.length === size_bytes, "backing bytes must match its size");
  }

  private check(off: number, len: number): void {
    if (!Number.isSafeInteger(off) || !Number.isSafeInteger(len) || off < 0 || len < 0 || off + len > this.size_bytes) {
      throw new BackingIoError(`${this.name}: range ${off}+${len} outside the device (${this.size_bytes} bytes)`, 22);
    }
  }

  async read(off: number, dst: Uint8Array): Promise<void> {
    this.check(off, dst.length);
    await Promise.resolve();
    if (this.fail_reads) throw new BackingIoError(`${this.name}: injected read error at ${off}`, 5);
    this.reads++;
    dst.set(this.bytes.subarray(off, off + dst.length));
  }

  private store(off: number, len: number, fill: (at: number) => void): void {
    this.pending.push({ off, old: this.bytes.slice(off, off + len) });
    fill(off);
  }

  async write(off: number, src: Uint8Array): Promise<void> {
    this.check(off, src.length);
    await Promise.resolve();
    if (this.fail_writes) throw new BackingIoError(`${this.name}: injected write error at ${off}`, 5);
    this.writes++;
    this.store(off, src.length, (at) => this.bytes.set(src, at));
  }

  async writeZeroes(off: number, len: number): Promise<void> {
    this.check(off, len);
    await Promise.resolve();
    if (this.fail_writes) throw new BackingIoError(`${this.name}: injected write error at ${off}`, 5);
    this.writes++;
    this.store(off, len, (at) => this.bytes.fill(0, at, at + len));
  }

  async discard(off: number, len: number): Promise<void> {
    await this.writeZeroes(off, len);
  }

  async flush(): Promise<void> {
    await Promise.resolve();
    if (this.fail_flushes) throw new BackingIoError(`${this.name}: injected flush error`, 5);
    this.flushes++;
    this.pending = [];
  }

  /** Power loss: each unflushed write survives or not at random (undone newest first). */
  crash(seed: number): void {
    const rng = makeRng(seed);
    for (let i = this.pending.length - 1; i >= 0; i--) {
      const w = this.pending[i];
      if (rng() < 0.5) this.bytes.set(w.old, w.off);
    }
    this.pending = [];
  }

  close(): void {}
}
