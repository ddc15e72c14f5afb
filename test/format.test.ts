import { describe, expect, test } from "bun:test";
import { dataView } from "../core/format/bytes.ts";
import { cacheInfoFlags, decodeCacheInfo, encodeCacheInfoBody, makeCacheInfoFlags, withGcPercent } from "../core/format/cache_info.ts";
import {
  CACHE_INFO_OFF,
  CACHE_INFO_STRIDE,
  CRC_SEED,
  DIRTY_TAIL_POS_OFF,
  KEY_TAIL_POS_OFF,
  KSET_HEADER_SIZE,
  SB_OFF,
  SEG_DATA_OFF,
  SEG_GEN_OFF,
  SEG_INFO_STRIDE,
  SEGMENTS_OFF,
  SEG_SIZE,
  segmentOffset,
} from "../core/format/constants.ts";
import { crc32c, crc32cImpl, crc32cJs } from "../core/format/crc.ts";
import { formatCache } from "../core/format/format_cache.ts";
import { decodeMetaHeader, seqAfter } from "../core/format/header.ts";
import { decodeKeyAt, encodeKeyInto, type KeyFields } from "../core/format/key.ts";
import { decodeKsetHeader, encodeKset, encodeKsetHeader, encodeLastKset, ksetCrc } from "../core/format/kset.ts";
import { CacheNotInitialisedError, loadCache } from "../core/format/load_cache.ts";
import {
  CACHE_INFO_RECORD,
  KEY_TAIL_RECORD,
  SEG_GEN_RECORD,
  SEGMENT_INFO_RECORD,
  encodeRecord,
  loadCacheInfo,
  loadSegGen,
  loadSegmentInfo,
  loadTail,
  persistCacheInfo,
  persistSegGen,
  persistTail,
  pickLatest,
  readReplicas,
} from "../core/format/meta.ts";
import { decodePos } from "../core/format/pos.ts";
import { decodeSegGen, decodeSegmentInfo, makeSegmentInfo, segInfoHasNext, segInfoType } from "../core/format/segment.ts";
import { decodeSuperblock, encodeSuperblock, inspectSuperblockArea } from "../core/format/superblock.ts";
import { InvalidDeviceError, PcacheError } from "../core/errors.ts";
import { SimCrash, SimDomain } from "../core/persist/sim.ts";
import { crcBitwise, formatted, hex, SIZE_1G, SIZE_512M } from "./fixtures/format_helpers.ts";

const ascii = (s: string) => new TextEncoder().encode(s);

describe("crc32c (raw form, seed 0x3B15A)", () => {
  test("reference vectors", () => {
    for (const f of [crc32c, crc32cJs]) {
      expect(f(ascii("123456789"), 0xffffffff)).toBe(0x1cf96d7c);
      expect(f(ascii("123456789"), 0x3b15a)).toBe(0xe5868ab2);
      expect(f(new Uint8Array(20), 0x3b15a)).toBe(0xb9b69066);
      expect(f(ascii("123456789"))).toBe(0xe5868ab2); // default seed
    }
    expect(CRC_SEED).toBe(0x3b15a);
  });

  test("agrees with a bitwise oracle on odd lengths and subarrays", () => {
    const b = new Uint8Array(4099);
    for (let i = 0; i < b.length; i++) b[i] = (i * 197 + 11) & 0xff;
    for (const [s, e] of [[0, 0], [0, 1], [1, 8], [3, 4099], [7, 70], [100, 5244]] as const) {
      const part = b.subarray(s, Math.min(e, b.length));
      expect(crc32c(part)).toBe(crcBitwise(CRC_SEED, part));
      expect(crc32cJs(part)).toBe(crcBitwise(CRC_SEED, part));
    }
    expect(crc32c(new Uint8Array(0), 0x1234)).toBe(0x1234); // raw: no inversion
    expect(["native", "js"]).toContain(crc32cImpl);
  });
});

describe("encoders and decoders, byte-exact", () => {
  test("superblock: 24 bytes, CRC over [4, 24) including the padding", () => {
    const b = encodeSuperblock({ flags: 0, seg_num: 63 });
    expect(b.length).toBe(24);
    expect(hex(b.subarray(4))).toBe("00000000" + "ef96c596fa5eb065" + "3f000000" + "00000000");
    expect(dataView(b).getUint32(0, true)).toBe(crcBitwise(CRC_SEED, b.subarray(4, 24)));
    const d = decodeSuperblock(b);
    expect(d).toEqual({ crc_stored: d.crc_computed, crc_computed: d.crc_computed, flags: 0, magic: 0x65b05efa96c596efn, seg_num: 63, pad: 0 });
    b[22] = 1; // padding is covered
    expect(decodeSuperblock(b).crc_computed).not.toBe(decodeSuperblock(b).crc_stored);
  });

  test("cache_info: offsets, flag bits, CRC over [4, 24)", () => {
    const flags = makeCacheInfoFlags({ data_crc: true, init_done: true, gc_percent: 70 });
    expect(flags).toBe(0x1183); // 1 | 2 | 70 << 6
    const rec = encodeRecord(CACHE_INFO_RECORD, { seg_id: 2, n_segs: 63, flags }, 7);
    expect(rec.length).toBe(24);
    expect(hex(rec.subarray(4))).toBe("07" + "00" + "0000" + "02000000" + "3f000000" + "83110000" + "00000000");
    expect(dataView(rec).getUint32(0, true)).toBe(crcBitwise(CRC_SEED, rec.subarray(4)));
    expect(decodeCacheInfo(rec)).toEqual({ seg_id: 2, n_segs: 63, flags: 0x1183 });
    expect(decodeMetaHeader(rec)).toEqual({ crc: dataView(rec).getUint32(0, true), seq: 7, version: 0, res: 0 });
    expect(cacheInfoFlags(0x1183)).toEqual({ data_crc: true, init_done: true, cache_mode: 0, gc_percent: 70, other_bits: 0 });
    expect(cacheInfoFlags((3 << 2) | (90 << 6) | (1 << 20))).toEqual({
      data_crc: false,
      init_done: false,
      cache_mode: 3,
      gc_percent: 90,
      other_bits: 1 << 20,
    });
    const w = withGcPercent({ seg_id: 0, n_segs: 1, flags: 0x1183 }, 10);
    expect(cacheInfoFlags(w.flags)).toMatchObject({ data_crc: true, init_done: true, gc_percent: 10 });
    // The encoder writes the reserved word as 0.
    const body = new Uint8Array(24).fill(0xee);
    encodeCacheInfoBody({ seg_id: 1, n_segs: 2, flags: 3 }, body);
    expect(hex(body.subarray(8))).toBe("01000000" + "02000000" + "03000000" + "00000000");
  });

  test("pos, segment_info, seg_gen: 16 bytes each, CRC over [4, 16)", () => {
    const pos = encodeRecord(KEY_TAIL_RECORD, { cache_seg_id: 3, seg_off: 4096 }, 1);
    expect(hex(pos.subarray(4))).toBe("01000000" + "03000000" + "00100000");
    expect(dataView(pos).getUint32(0, true)).toBe(crcBitwise(CRC_SEED, pos.subarray(4, 16)));
    expect(decodePos(pos)).toEqual({ cache_seg_id: 3, seg_off: 4096 });

    const si = encodeRecord(SEGMENT_INFO_RECORD, makeSegmentInfo(5), 2);
    expect(hex(si.subarray(4))).toBe("02000000" + "03000000" + "05000000");
    expect(dataView(si).getUint32(0, true)).toBe(crcBitwise(CRC_SEED, si.subarray(4, 16)));
    const d = decodeSegmentInfo(si);
    expect(segInfoHasNext(d)).toBe(true);
    expect(segInfoType(d)).toBe(1);
    expect(d.next_seg).toBe(5);
    const tail_seg = encodeRecord(SEGMENT_INFO_RECORD, makeSegmentInfo(), 1);
    expect(hex(tail_seg.subarray(8))).toBe("02000000" + "00000000");

    const gen = encodeRecord(SEG_GEN_RECORD, { gen: 0x1_0000_0002 }, 9);
    expect(hex(gen.subarray(4))).toBe("09000000" + "02000000" + "01000000");
    expect(dataView(gen).getUint32(0, true)).toBe(crcBitwise(CRC_SEED, gen.subarray(4, 16)));
    expect(decodeSegGen(gen, "x")).toEqual({ gen: 0x1_0000_0002 });
  });

  test("seg_gen above 2^53 is invalid device data", () => {
    const gen = encodeRecord(SEG_GEN_RECORD, { gen: 1 }, 1);
    dataView(gen).setUint32(12, 0x0020_0000, true); // gen = 2^53 + 1
    expect(() => decodeSegGen(gen, "seg_gen of physical segment 4")).toThrow(/seg_gen of physical segment 4: gen: value 0x0020000000000001 exceeds 2\^53/);
    dataView(gen).setUint32(12, 0x001f_ffff, true);
    dataView(gen).setUint32(8, 0xffff_ffff, true);
    expect(decodeSegGen(gen, "x").gen).toBe(Number.MAX_SAFE_INTEGER);
  });

  test("key: 40 bytes at the documented offsets; reserved ignored on read", () => {
    const k: KeyFields = {
      off: 0x12_3456_789a,
      len: 4096,
      flags: 2,
      cache_seg_id: 7,
      cache_seg_off: 0x2000,
      seg_gen: 3,
      data_crc: 0xdeadbeef,
    };
    const b = new Uint8Array(48).fill(0xcc);
    const dv = dataView(b);
    encodeKeyInto(dv, 8, k);
    expect(hex(b.subarray(8, 48))).toBe(
      "9a78563412000000" + "00100000" + "02000000" + "07000000" + "00200000" + "0300000000000000" + "efbeadde" + "00000000",
    );
    expect(hex(b.subarray(0, 8))).toBe("cccccccccccccccc");
    b.fill(0x77, 44, 48); // stale reserved bytes, as the kernel may leave them
    expect(decodeKeyAt(dv, 8, "k")).toEqual(k);
    dv.setUint32(12, 0x0020_0000, true); // off high word: 2^53
    expect(() => decodeKeyAt(dv, 8, "key 0 of kset at 0:0")).toThrow(/key 0 of kset at 0:0: off: value .* exceeds 2\^53/);
  });

  test("normal kset: header offsets and CRC over [4, 24 + 40*key_num)", () => {
    const keys: KeyFields[] = [
      { off: 0, len: 512, flags: 0, cache_seg_id: 0, cache_seg_off: 0, seg_gen: 0, data_crc: 0 },
      { off: 8192, len: 4096, flags: 2, cache_seg_id: 1, cache_seg_off: 512, seg_gen: 0, data_crc: 0 },
    ];
    const b = encodeKset(keys);
    expect(b.length).toBe(24 + 80);
    expect(hex(b.subarray(4, 24))).toBe("02000000" + "1a4f164ea6946867" + "0000000000000000");
    expect(dataView(b).getUint32(0, true)).toBe(crcBitwise(CRC_SEED, b.subarray(4, 104)));
    expect(ksetCrc(b, false, 2)).toBe(dataView(b).getUint32(0, true));
    const h = decodeKsetHeader(b);
    expect(h).toEqual({ crc_stored: h.crc_stored, key_num_or_next: 2, magic: 0x676894a64e164f1an, flags: 0n, last: false });
    expect(decodeKeyAt(dataView(b), 64, "k")).toEqual(keys[1]);

    // The in-place header encoder (used by the kset log on a shared buffer) gives the same bytes.
    const big = new Uint8Array(5144 * 2);
    big.set(b.subarray(24), 5144 + 24);
    encodeKsetHeader(new DataView(big.buffer), 5144, 2);
    expect(hex(big.subarray(5144, 5144 + 104))).toBe(hex(b));
  });

  test("LAST kset: header only, CRC over [4, 24)", () => {
    const b = encodeLastKset(5);
    expect(b.length).toBe(KSET_HEADER_SIZE);
    expect(hex(b.subarray(4))).toBe("05000000" + "1a4f164ea6946867" + "0100000000000000");
    expect(dataView(b).getUint32(0, true)).toBe(crcBitwise(CRC_SEED, b.subarray(4, 24)));
    expect(decodeKsetHeader(b)).toMatchObject({ key_num_or_next: 5, last: true, flags: 1n });
  });

  test("encoders refuse what no writer may produce", () => {
    const k: KeyFields = { off: 0, len: 0, flags: 0, cache_seg_id: 0, cache_seg_off: 0, seg_gen: 0, data_crc: 0 };
    expect(() => encodeKeyInto(new DataView(new ArrayBuffer(40)), 0, k)).toThrow(/never empty/);
    expect(() => encodeKset([])).toThrow(/key_num 0/);
    expect(() => encodeKset(new Array(129).fill({ ...k, len: 1 }))).toThrow(/key_num 129/);
  });
});

describe("replicated metadata", () => {
  const SMALL = SEGMENTS_OFF + 2 * SEG_SIZE;

  function putCacheInfo(dom: SimDomain, slot: 0 | 1, seq: number, seg_id: number): void {
    dom.write(CACHE_INFO_OFF + slot * CACHE_INFO_STRIDE, encodeRecord(CACHE_INFO_RECORD, { seg_id, n_segs: 1, flags: 0 }, seq));
  }

  test("the sequence rule: (int8)(a - b) > 0", () => {
    expect(seqAfter(2, 1)).toBe(true);
    expect(seqAfter(1, 2)).toBe(false);
    expect(seqAfter(0, 255)).toBe(true);
    expect(seqAfter(255, 0)).toBe(false);
    expect(seqAfter(5, 5)).toBe(false);
    expect(pickLatest(true, 3, true, 3)).toBe(0);
    expect(pickLatest(true, 255, true, 0)).toBe(1);
    expect(pickLatest(false, 9, true, 1)).toBe(1);
    expect(pickLatest(true, 9, false, 10)).toBe(0);
    expect(pickLatest(false, 0, false, 0)).toBe(null);
  });

  test("newest wins, across the 255 -> 0 wrap; a tie goes to slot 0", () => {
    const dom = new SimDomain(SMALL, { seed: 1, track: false });
    putCacheInfo(dom, 0, 4, 100);
    putCacheInfo(dom, 1, 5, 101);
    expect(loadCacheInfo(dom)).toMatchObject({ slot: 1, seq: 5, value: { seg_id: 101 } });
    putCacheInfo(dom, 0, 255, 100);
    putCacheInfo(dom, 1, 0, 101);
    expect(loadCacheInfo(dom)).toMatchObject({ slot: 1, seq: 0, value: { seg_id: 101 } });
    putCacheInfo(dom, 0, 0, 100);
    putCacheInfo(dom, 1, 255, 101);
    expect(loadCacheInfo(dom)).toMatchObject({ slot: 0, seq: 0, value: { seg_id: 100 } });
    putCacheInfo(dom, 0, 17, 100);
    putCacheInfo(dom, 1, 17, 101);
    expect(loadCacheInfo(dom)).toMatchObject({ slot: 0, seq: 17, value: { seg_id: 100 } });
  });

  test("one corrupt replica: the other is used silently; both corrupt: null with reasons", () => {
    const dom = new SimDomain(SMALL, { seed: 1, track: false });
    putCacheInfo(dom, 0, 4, 100);
    putCacheInfo(dom, 1, 5, 101);
    dom.write(CACHE_INFO_OFF + CACHE_INFO_STRIDE + 12, new Uint8Array([9])); // newest is now corrupt
    expect(loadCacheInfo(dom)).toMatchObject({ slot: 0, seq: 4, value: { seg_id: 100 } });
    dom.write(CACHE_INFO_OFF + 12, new Uint8Array([9]));
    const r = readReplicas(dom, CACHE_INFO_RECORD);
    expect(r.latest).toBe(null);
    expect(r.slots.map((s) => s.state)).toEqual(["bad_crc", "bad_crc"]);
    expect(r.slots.map((s) => s.dev_off)).toEqual([0x2000, 0x3000]);
  });

  test("writes alternate slots with seq + 1 and never touch the latest copy", () => {
    const dom = new SimDomain(SMALL, { seed: 1, track: false });
    expect(loadTail(dom, "key_tail")).toBe(null);
    let st = persistTail(dom, "key_tail", { cache_seg_id: 0, seg_off: 24 }, null);
    expect(st).toEqual({ slot: 1, seq: 1 }); // from the zero state {slot 0, seq 0}
    const first = dom.view(KEY_TAIL_POS_OFF + 16, 16).slice();
    st = persistTail(dom, "key_tail", { cache_seg_id: 0, seg_off: 48 }, st);
    expect(st).toEqual({ slot: 0, seq: 2 });
    expect(hex(dom.view(KEY_TAIL_POS_OFF + 16, 16))).toBe(hex(first)); // the previous latest is intact
    expect(loadTail(dom, "key_tail")).toEqual({ slot: 0, seq: 2, value: { cache_seg_id: 0, seg_off: 48 } });
    // dirty_tail has its own slots at 0x4020 / 0x4030.
    persistTail(dom, "dirty_tail", { cache_seg_id: 0, seg_off: 0 }, null);
    expect(decodePos(dom.view(DIRTY_TAIL_POS_OFF + 16, 16))).toEqual({ cache_seg_id: 0, seg_off: 0 });
    expect(loadTail(dom, "key_tail")?.value.seg_off).toBe(48);

    // Wrap: latest in slot 0 with seq 255 -> next write goes to slot 1 with seq 0 and wins.
    let gst = persistSegGen(dom, 1, 10, { slot: 1, seq: 254 }); // lands in slot 0, seq 255
    expect(gst).toEqual({ slot: 0, seq: 255 });
    gst = persistSegGen(dom, 1, 11, gst);
    expect(gst).toEqual({ slot: 1, seq: 0 });
    expect(loadSegGen(dom, 1)).toEqual({ slot: 1, seq: 0, value: { gen: 11 } });
    expect(SEG_GEN_RECORD.offsetOf(1, 1)).toBe(segmentOffset(1) + SEG_GEN_OFF + 16);
    expect(SEGMENT_INFO_RECORD.offsetOf(1, 1)).toBe(segmentOffset(1) + SEG_INFO_STRIDE);
  });

  test("a crash during a replica write keeps the previous copy or the new one, never neither", () => {
    for (let seed = 1; seed <= 30; seed++) {
      const dom = new SimDomain(SMALL, { seed });
      let st = persistCacheInfo(dom, { seg_id: 0, n_segs: 1, flags: 1 }, null);
      st = persistCacheInfo(dom, { seg_id: 0, n_segs: 2, flags: 1 }, st);
      dom.crash_at_fence = dom.fence_count + 1; // the fence of the next write
      expect(() => persistCacheInfo(dom, { seg_id: 0, n_segs: 3, flags: 1 }, st)).toThrow(SimCrash);
      const after = dom.recover({ seed });
      const got = loadCacheInfo(after);
      expect(got).not.toBe(null);
      expect([2, 3]).toContain(got!.value.n_segs);
    }
  });
});

describe("format", () => {
  test("1 GiB: seg_num 63, n_segs 63, gc 70, tails 0:0, INIT_DONE; kernel replica layout", () => {
    const dom = new SimDomain(SIZE_1G, { seed: 1, track: false });
    expect(inspectSuperblockArea(dom)).toBe("blank");
    const meta = formatCache(dom, { data_crc: true });
    expect(inspectSuperblockArea(dom)).toBe("pcache");
    const again = loadCache(dom);
    expect(again).toEqual(meta);
    expect(meta.sb).toEqual({ flags: 0, seg_num: 63 });
    expect(meta.n_segs).toBe(63);
    expect(meta.gc_percent).toBe(70);
    expect(meta.data_crc).toBe(true);
    expect(meta.cache_mode).toBe(0);
    expect(cacheInfoFlags(meta.cache_info.value.flags)).toMatchObject({ init_done: true, data_crc: true, gc_percent: 70 });
    expect(meta.cache_info).toMatchObject({ slot: 1, seq: 1, value: { seg_id: 0, n_segs: 63, flags: 0x1183 } });
    expect(meta.key_tail).toEqual({ cache_seg_id: 0, seg_off: 0, slot: 1, seq: 1 });
    expect(meta.dirty_tail).toEqual({ cache_seg_id: 0, seg_off: 0, slot: 1, seq: 1 });
    expect(meta.seg_ids).toEqual(Array.from({ length: 63 }, (_, i) => i));
    expect(meta.seg_gens).toEqual(new Array(63).fill(0));
    expect(meta.seg_gen_slots.every((s) => s?.slot === 1 && s.seq === 1)).toBe(true);

    // Superblock bytes.
    expect(hex(dom.view(SB_OFF + 4, 20))).toBe("00000000" + "ef96c596fa5eb065" + "3f000000" + "00000000");
    // cache_info slot 0 and the unused tail slots stay zero.
    expect(dom.view(CACHE_INFO_OFF, 24).every((b) => b === 0)).toBe(true);
    expect(dom.view(KEY_TAIL_POS_OFF, 16).every((b) => b === 0)).toBe(true);
    expect(dom.view(DIRTY_TAIL_POS_OFF, 16).every((b) => b === 0)).toBe(true);
    for (let seg = 0; seg < 63; seg++) {
      const info = readReplicas(dom, SEGMENT_INFO_RECORD, seg);
      const s1 = decodeSegmentInfo(dom.view(SEGMENT_INFO_RECORD.offsetOf(seg, 1), 16));
      expect(info.slots[1]).toMatchObject({ state: "valid", seq: 1 });
      expect(s1).toEqual({ flags: 2, next_seg: 0 }); // first write: type only
      if (seg < 62) {
        // Rewritten when the next segment was linked: slot 0, seq 2, HAS_NEXT.
        expect(info.latest).toEqual({ slot: 0, seq: 2, value: { flags: 3, next_seg: seg + 1 } });
      } else {
        expect(info.latest).toEqual({ slot: 1, seq: 1, value: { flags: 2, next_seg: 0 } });
        expect(info.slots[0].state).toBe("zero");
      }
      expect(meta.segment_info[seg]).toEqual(info.latest!);
      expect(loadSegGen(dom, seg)).toEqual({ slot: 1, seq: 1, value: { gen: 0 } });
      expect(dom.view(segmentOffset(seg) + SEG_GEN_OFF, 16).every((b) => b === 0)).toBe(true);
      expect(dom.view(segmentOffset(seg) + SEG_DATA_OFF, 24).every((b) => b === 0)).toBe(true);
    }
    expect(loadSegmentInfo(dom, 0)?.value.next_seg).toBe(1);
  });

  test("format zeroes stale metadata and kset headers left on the device", () => {
    const dom = new SimDomain(SIZE_512M, { seed: 1, track: false });
    dom.fill(0x2000, 0x3000, 0xab);
    dom.fill(segmentOffset(4), SEG_DATA_OFF + 24, 0xcd);
    const meta = formatCache(dom, { data_crc: false, gc_percent: 0 });
    expect(meta.gc_percent).toBe(0);
    expect(meta.data_crc).toBe(false);
    expect(meta.n_segs).toBe(31);
    expect(dom.view(0x2000, 24).every((b) => b === 0)).toBe(true);
    expect(dom.view(segmentOffset(4) + SEG_DATA_OFF, 24).every((b) => b === 0)).toBe(true);
    expect(dom.view(segmentOffset(4) + 0x2100, 16).every((b) => b === 0)).toBe(true);
  });

  test("format refuses bad options and devices below 512 MiB", () => {
    expect(() => formatted(SIZE_512M, { gc_percent: 91 })).toThrow(PcacheError);
    expect(() => formatted(SIZE_512M - 1)).toThrow(/smaller than the minimum/);
  });

  test("inspectSuperblockArea: blank, pcache, foreign", () => {
    const dom = new SimDomain(SEGMENTS_OFF + SEG_SIZE, { seed: 1, track: false });
    expect(inspectSuperblockArea(dom)).toBe("blank");
    dom.write(0x1000 + 20, new Uint8Array([1])); // magic 0 but garbage elsewhere: not blank
    expect(inspectSuperblockArea(dom)).toBe("foreign");
    dom.write(0x1000, encodeSuperblock({ flags: 0, seg_num: 1 }));
    expect(inspectSuperblockArea(dom)).toBe("pcache");
    dom.write(0x1008, new Uint8Array([0x12]));
    expect(inspectSuperblockArea(dom)).toBe("foreign");
  });

  test("a crash at any barrier of format never yields a half-initialised cache", () => {
    // Count the fences of a full format once, then crash at a spread of them.
    const probe = new SimDomain(SIZE_512M, { seed: 1, track: false });
    formatCache(probe, { data_crc: false });
    const fences = probe.fence_count;
    const points = new Set<number>([1, 2, 3, 4, 5, fences - 3, fences - 2, fences - 1, fences]);
    for (let f = 7; f < fences; f += 23) points.add(f);
    for (const at of points) {
      const dom = new SimDomain(SIZE_512M, { seed: at });
      dom.crash_at_fence = at;
      expect(() => formatCache(dom, { data_crc: false })).toThrow(SimCrash);
      const after = dom.recover({ seed: at });
      let meta;
      try {
        meta = loadCache(after);
      } catch (e) {
        expect(e).toBeInstanceOf(InvalidDeviceError);
        // Before the superblock: unformatted; after it: not initialised.
        if (at > 2) expect(e).toBeInstanceOf(CacheNotInitialisedError);
        continue;
      }
      // Only the final barrier (cache_info) may have made it through.
      expect(at).toBe(fences);
      expect(meta.n_segs).toBe(31);
    }
  });
});
