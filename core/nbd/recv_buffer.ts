/**
 * Receive buffer for one connection: the chunks the socket delivered, read front to back
 * without copying where a frame lies inside one chunk. Bun hands every `data` callback a fresh
 * buffer (measured, bun-platform-notes §5), so keeping views into chunks is safe.
 */
import { assert } from "../assert.ts";

export class RecvBuffer {
  private chunks: Uint8Array[] = [];
  /** Index of the first live chunk in `chunks`, and the read position inside it. */
  private first = 0;
  private head = 0;
  private total = 0;

  get length(): number {
    return this.total;
  }

  push(chunk: Uint8Array): void {
    if (chunk.length === 0) return;
    this.chunks.push(chunk);
    this.total += chunk.length;
  }

  /**
   * The next `n` bytes as (bytes, at): bytes[at .. at+n). No copy when they sit in one chunk;
   * otherwise they are gathered into a new buffer. Does not consume. Requires length >= n.
   */
  peek(n: number): { bytes: Uint8Array; at: number } {
    assert(n <= this.total, "peek within buffered bytes");
    const c = this.chunks[this.first]!;
    if (c.length - this.head >= n) return { bytes: c, at: this.head };
    return { bytes: this.gather(n), at: 0 };
  }

  /**
   * Removes and returns the next `n` bytes: a view when they sit in one chunk, else a buffer
   * from `alloc` (default: a new one) that they are gathered into.
   */
  take(n: number, alloc?: (n: number) => Uint8Array): Uint8Array {
    assert(n <= this.total, "take within buffered bytes");
    if (n === 0) return new Uint8Array(0);
    const c = this.chunks[this.first]!;
    let out: Uint8Array;
    if (c.length - this.head >= n) out = c.subarray(this.head, this.head + n);
    else out = this.gather(n, alloc ? alloc(n) : undefined);
    this.consume(n);
    return out;
  }

  /** Drops up to `n` bytes; returns how many were dropped. */
  skip(n: number): number {
    const k = Math.min(n, this.total);
    this.consume(k);
    return k;
  }

  /** Drops everything. */
  clear(): void {
    this.chunks = [];
    this.first = 0;
    this.head = 0;
    this.total = 0;
  }

  private gather(n: number, into?: Uint8Array): Uint8Array {
    const out = into ?? new Uint8Array(n);
    assert(out.length === n, "gather target has the requested length");
    let at = 0;
    let i = this.first;
    let pos = this.head;
    while (at < n) {
      const c = this.chunks[i]!;
      const k = Math.min(c.length - pos, n - at);
      out.set(c.subarray(pos, pos + k), at);
      at += k;
      i++;
      pos = 0;
    }
    return out;
  }

  private consume(n: number): void {
    let left = n;
    this.total -= n;
    while (left > 0) {
      const c = this.chunks[this.first]!;
      const avail = c.length - this.head;
      if (left < avail) {
        this.head += left;
        left = 0;
      } else {
        left -= avail;
        this.first++;
        this.head = 0;
      }
    }
    // Compact now and then so the array of spent chunks does not grow without bound.
    if (this.first === this.chunks.length) {
      this.chunks = [];
      this.first = 0;
    } else if (this.first >= 64) {
      this.chunks = this.chunks.slice(this.first);
      this.first = 0;
    }
  }
}
