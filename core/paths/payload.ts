/**
 * Reads a WRITE payload front to back, whether it is one buffer or the receive chunks it arrived
 * in, and copies it to the cache device piece by piece. Large writes skip a gathering copy: each
 * part goes straight from the socket's chunk to the cache.
 */
import { assert } from "../assert.ts";
import { crc32c } from "../format/crc.ts";
import { type WriteData, writeDataLength, writeDataParts } from "../nbd/export.ts";
import type { PersistDomain } from "../persist/domain.ts";

export class PayloadCursor {
  readonly length: number;
  private readonly parts: readonly Uint8Array[];
  private part = 0;
  private pos = 0;
  private done = 0;

  constructor(data: WriteData) {
    this.parts = writeDataParts(data);
    this.length = writeDataLength(data);
  }

  get consumed(): number {
    return this.done;
  }

  /**
   * Copies the next `len` bytes to the domain at dev_off (one write per part they span) and
   * returns their raw CRC-32C when `want_crc`, else 0. Not durable until the caller flushes.
   */
  copyTo(dom: PersistDomain, dev_off: number, len: number, want_crc: boolean): number {
    assert(len > 0 && this.done + len <= this.length, "payload copy within the payload");
    let crc: number | undefined;
    let at = dev_off;
    let left = len;
    while (left > 0) {
      const p = this.parts[this.part]!;
      const k = Math.min(p.length - this.pos, left);
      const src = p.subarray(this.pos, this.pos + k);
      dom.write(at, src);
      if (want_crc) crc = crc === undefined ? crc32c(src) : crc32c(src, crc);
      at += k;
      left -= k;
      this.pos += k;
      if (this.pos === p.length) {
        this.part++;
        this.pos = 0;
      }
    }
    this.done += len;
    return crc ?? 0;
  }
}
