/**
 * TEST-ONLY: write key logs into a formatted device, the way the kernel's close and roll do
 * (terminator + kset under one barrier; a LAST kset after zeroing the next segment's first
 * header), and craft broken ones. Unlike the real writer it encodes whatever it is given (zero
 * lengths, ids out of range, any key_num), so tests can build the images the loader must refuse.
 */
import { assert } from "../assert.ts";
import type { PersistDomain } from "../persist/domain.ts";
import { dataView } from "./bytes.ts";
import { KEY_SIZE, KSET_F_LAST, KSET_HEADER_SIZE, KSET_MAGIC, SEG_DATA_SIZE, ksetSize } from "./constants.ts";
import { crc32c } from "./crc.ts";
import type { CacheMeta } from "./load_cache.ts";
import { persistSegGen } from "./meta.ts";
import type { CachePos } from "./pos.ts";
import { dataDevOffset, devOffsetOf } from "../log/position.ts";

export interface BuilderKey {
  off: number;
  /** Defaults to data.length. */
  len?: number;
  cache_seg_id: number;
  cache_seg_off: number;
  /** Written to the data area first when given; data_crc defaults to its CRC. */
  data?: Uint8Array;
  flags?: number;
  /** Defaults to the segment's current generation. */
  seg_gen?: number;
  data_crc?: number;
}

export interface CraftOptions {
  /** Store a wrong CRC (the right one + 1). */
  bad_crc?: boolean;
  /** Store a wrong magic. */
  bad_magic?: boolean;
  /** Store this key_num instead of the number of keys (the CRC still covers the keys given). */
  key_num?: number;
  /** Do not write the 24-byte zero terminator after the kset. */
  no_terminator?: boolean;
}

export class LogBuilder {
  head: CachePos;

  constructor(
    readonly dom: PersistDomain,
    readonly meta: CacheMeta,
    head?: CachePos,
  ) {
    this.head = head ? { ...head } : { cache_seg_id: meta.key_tail.cache_seg_id, seg_off: meta.key_tail.seg_off };
  }

  /** Write bytes into a data area, durably. Returns their CRC-32C. */
  writeData(cache_seg_id: number, seg_off: number, bytes: Uint8Array): number {
    const at = dataDevOffset(this.meta, cache_seg_id, seg_off);
    this.dom.write(at, bytes);
    this.dom.flush(at, bytes.length);
    this.dom.fence();
    return crc32c(bytes);
  }

  /** Append a normal kset at head (terminator, kset, one barrier) and advance head. */
  appendKset(keys: readonly BuilderKey[], opts: CraftOptions = {}): CachePos {
    const body = new Uint8Array(ksetSize(keys.length));
    const dv = dataView(body);
    keys.forEach((k, i) => this.encodeKey(dv, KSET_HEADER_SIZE + i * KEY_SIZE, k));
    dv.setUint32(4, opts.key_num ?? keys.length, true);
    dv.setBigUint64(8, opts.bad_magic ? KSET_MAGIC ^ 1n : KSET_MAGIC, true);
    dv.setBigUint64(16, 0n, true);
    dv.setUint32(0, (crc32c(body.subarray(4)) + (opts.bad_crc ? 1 : 0)) >>> 0, true);
    const at = this.head;
    const dev = devOffsetOf(this.meta, at);
    const with_term = !opts.no_terminator && at.seg_off + body.length + KSET_HEADER_SIZE <= SEG_DATA_SIZE;
    if (with_term) this.dom.fill(dev + body.length, KSET_HEADER_SIZE, 0);
    this.dom.write(dev, body);
    this.dom.flush(dev, body.length + (with_term ? KSET_HEADER_SIZE : 0));
    this.dom.fence();
    this.head = { cache_seg_id: at.cache_seg_id, seg_off: at.seg_off + body.length };
    return at;
  }

  /**
   * Roll the log: zero the first header of next's data area, write a LAST kset at head naming
   * it, head = (next, 0).
   */
  appendLast(next_cache_seg_id: number, opts: { bad_crc?: boolean; zero_next?: boolean } = {}): CachePos {
    if ((opts.zero_next ?? true) && next_cache_seg_id < this.meta.n_segs) {
      const z = dataDevOffset(this.meta, next_cache_seg_id, 0);
      this.dom.fill(z, KSET_HEADER_SIZE, 0);
      this.dom.flush(z, KSET_HEADER_SIZE);
      this.dom.fence();
    }
    const at = this.head;
    this.writeHeader(at, { key_num_or_next: next_cache_seg_id, flags: KSET_F_LAST, bad_crc: opts.bad_crc });
    this.head = { cache_seg_id: next_cache_seg_id, seg_off: 0 };
    return at;
  }

  /**
   * Write a bare 24-byte kset header at pos; the CRC covers [4, 24) (right for LAST ksets and
   * for key_num 0), or is `crc` when given.
   */
  writeHeader(
    pos: CachePos,
    h: { key_num_or_next: number; flags?: bigint; magic?: bigint; crc?: number; bad_crc?: boolean },
  ): void {
    const b = new Uint8Array(KSET_HEADER_SIZE);
    const dv = dataView(b);
    dv.setUint32(4, h.key_num_or_next >>> 0, true);
    dv.setBigUint64(8, h.magic ?? KSET_MAGIC, true);
    dv.setBigUint64(16, h.flags ?? 0n, true);
    dv.setUint32(0, (h.crc ?? (crc32c(b.subarray(4)) + (h.bad_crc ? 1 : 0))) >>> 0, true);
    const dev = devOffsetOf(this.meta, pos);
    this.dom.write(dev, b);
    this.dom.flush(dev, b.length);
    this.dom.fence();
  }

  /** GC's invalidation of a segment: gen + 1, persisted with the replica rule. Returns the new gen. */
  bumpGen(cache_seg_id: number): number {
    const gen = this.meta.seg_gens[cache_seg_id] + 1;
    const phys = this.meta.seg_ids[cache_seg_id];
    this.meta.seg_gen_slots[cache_seg_id] = persistSegGen(this.dom, phys, gen, this.meta.seg_gen_slots[cache_seg_id]);
    this.meta.seg_gens[cache_seg_id] = gen;
    return gen;
  }

  /** Encode a key without the writer's invariants (tests craft invalid ones on purpose). */
  private encodeKey(dv: DataView, at: number, k: BuilderKey): void {
    const len = k.len ?? k.data?.length;
    assert(len !== undefined, "a builder key needs len or data");
    let data_crc = k.data_crc ?? 0;
    if (k.data) {
      const crc = this.writeData(k.cache_seg_id, k.cache_seg_off, k.data);
      if (k.data_crc === undefined) data_crc = crc;
    }
    const seg_gen = k.seg_gen ?? (k.cache_seg_id < this.meta.n_segs ? this.meta.seg_gens[k.cache_seg_id] : 0);
    dv.setBigUint64(at, BigInt(k.off), true);
    dv.setUint32(at + 8, len >>> 0, true);
    dv.setUint32(at + 12, (k.flags ?? 0) >>> 0, true);
    dv.setUint32(at + 16, k.cache_seg_id >>> 0, true);
    dv.setUint32(at + 20, k.cache_seg_off >>> 0, true);
    dv.setBigUint64(at + 24, BigInt(seg_gen), true);
    dv.setUint32(at + 32, data_crc >>> 0, true);
    dv.setUint32(at + 36, 0, true);
  }
}
