/**
 * Receive buffer for one connection: the chunks the socket delivered, read front to back
 * without copying where a frame lies inside one chunk. Bun hands every `data` callback a fresh
 * buffer (measured, bun-platform-notes §5), so keeping views into chunks is safe.
 *
 * With `release_chunks`, a chunk's memory is handed back to the allocator (its ArrayBuffer is
 * detached) as soon as nothing refers to it any more: not the unread bytes, not a payload part
 * given out by takeParts() and not yet given back with releaseParts(). Left to the collector, the
 * chunks of a 1 MiB-write stream piled up by hundreds of MiB between collections and every new
 * chunk was a page fault per 4 KiB (clear_page was half the server's CPU in a perf profile).
 * Only for chunks nobody else holds: the server's sockets, never a caller's own buffers.
 */
import { assert } from "../assert.ts";
import { type WriteData, writeDataParts } from "./export.ts";

export interface RecvBufferOptions {
  /** Detach each chunk's ArrayBuffer once it is consumed and no payload part refers to it. */
  release_chunks?: boolean;
}

export class RecvBuffer {
  /** References per chunk buffer (release_chunks only): 1 while unread bytes remain + parts out. */
  private readonly refs: Map<ArrayBufferLike, number> | null;
  private chunks: Uint8Array[] = [];
  /** Index of the first live chunk in `chunks`, and the read position inside it. */
  private first = 0;
  private head = 0;
  private total = 0;

  constructor(opts: RecvBufferOptions = {}) {
    this.refs = opts.release_chunks ? new Map() : null;
  }

  get length(): number {
    return this.total;
  }

  push(chunk: Uint8Array): void {
    if (chunk.length === 0) return;
    if (this.refs !== null) {
      const ab = chunk.buffer;
      const n = this.refs.get(ab);
      // A buffer already held (pushed again) gets one more reference; otherwise only a chunk that
      // is its whole buffer is ever detached.
      if (n !== undefined) this.refs.set(ab, n + 1);
      else if (chunk.byteOffset === 0 && chunk.byteLength === ab.byteLength) this.refs.set(ab, 1);
    }
    this.chunks.push(chunk);
    this.total += chunk.length;
  }

  /** Gives back the parts takeParts() returned; their chunks may be released now. */
  releaseParts(parts: WriteData): void {
    if (this.refs === null) return;
    for (const p of writeDataParts(parts)) this.unref(p.buffer);
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
    // A view would die with its chunk when chunks are released: copy then (handshake data only).
    // (Not slice(): on a Node Buffer, which is what Bun hands out, that is a view too.)
    if (c.length - this.head >= n) {
      const view = c.subarray(this.head, this.head + n);
      out = this.refs === null ? view : new Uint8Array(view);
    } else {
      out = this.gather(n, alloc ? alloc(n) : undefined);
    }
    this.consume(n);
    return out;
  }

  /**
   * Removes the next `n` bytes without copying: one view when they sit in one chunk, else views
   * of the consecutive chunks that hold them, in order.
   */
  takeParts(n: number): Uint8Array | Uint8Array[] {
    assert(n <= this.total, "takeParts within buffered bytes");
    if (n === 0) return new Uint8Array(0);
    const c = this.chunks[this.first]!;
    if (c.length - this.head >= n) {
      const out = c.subarray(this.head, this.head + n);
      this.ref(c.buffer);
      this.consume(n);
      return out;
    }
    const parts: Uint8Array[] = [];
    let left = n;
    let i = this.first;
    let pos = this.head;
    while (left > 0) {
      const chunk = this.chunks[i]!;
      const k = Math.min(chunk.length - pos, left);
      this.ref(chunk.buffer);
      parts.push(chunk.subarray(pos, pos + k));
      left -= k;
      i++;
      pos = 0;
    }
    this.consume(n);
    return parts;
  }

  /** Drops up to `n` bytes; returns how many were dropped. */
  skip(n: number): number {
    const k = Math.min(n, this.total);
    this.consume(k);
    return k;
  }

  /** Drops everything (payload parts still out stay valid until they are given back). */
  clear(): void {
    if (this.refs !== null) for (let i = this.first; i < this.chunks.length; i++) this.unref(this.chunks[i]!.buffer);
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
        if (this.refs !== null) this.unref(c.buffer);
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

  private ref(ab: ArrayBufferLike): void {
    const refs = this.refs;
    if (refs === null) return;
    const n = refs.get(ab);
    if (n !== undefined) refs.set(ab, n + 1);
  }

  private unref(ab: ArrayBufferLike): void {
    const refs = this.refs;
    if (refs === null) return;
    const n = refs.get(ab);
    if (n === undefined) return; // not ours to release
    assert(n > 0, "chunk reference count positive");
    if (n > 1) {
      refs.set(ab, n - 1);
      return;
    }
    refs.delete(ab);
    // transfer(0) moves the (empty) contents to a new buffer and detaches this one, which frees
    // its memory now instead of at the next collection.
    (ab as ArrayBuffer).transfer(0);
  }
}
