import { describe, expect, test } from "bun:test";
import { makeCacheInfoFlags, withGcPercent } from "../core/format/cache_info.ts";
import {
  CACHE_INFO_OFF,
  CACHE_INFO_STRIDE,
  CACHE_SEGS_MAX,
  DIRTY_TAIL_POS_OFF,
  KEY_TAIL_POS_OFF,
  SB_OFF,
  SEG_DATA_SIZE,
  SEG_GEN_OFF,
  SEG_INFO_STRIDE,
  segmentOffset,
} from "../core/format/constants.ts";
import { CacheNotInitialisedError, loadCache } from "../core/format/load_cache.ts";
import {
  SEG_GEN_RECORD,
  encodeRecord,
  persistCacheInfo,
  persistSegGen,
  persistSegmentInfo,
  persistTail,
} from "../core/format/meta.ts";
import { sealRecord } from "../core/format/header.ts";
import { makeSegmentInfo } from "../core/format/segment.ts";
import { encodeSuperblock } from "../core/format/superblock.ts";
import { SimDomain } from "../core/persist/sim.ts";
import { expectInvalid, expectUntouched, flipByte, formatted, SIZE_512M } from "./fixtures/format_helpers.ts";

/** Rewrite cache_info with other fields, properly (replica rule, valid CRC). */
function rewriteCacheInfo(dom: SimDomain, meta: ReturnType<typeof formatted>["meta"], patch: { seg_id?: number; n_segs?: number; flags?: number }) {
  persistCacheInfo(dom, { ...meta.cache_info.value, ...patch }, meta.cache_info);
}

describe("loadCache: superblock", () => {
  test("a blank device is reported as not formatted", () => {
    const dom = new SimDomain(SIZE_512M, { seed: 1, track: false });
    expectInvalid(dom, () => loadCache(dom), "superblock at 0x1000: all zero: the device is not formatted (run pcache format)");
  });

  test("bad magic", () => {
    const { dom } = formatted();
    flipByte(dom, SB_OFF + 8);
    expectInvalid(dom, () => loadCache(dom), "superblock at 0x1000: bad magic 0x65b05efa96c596b5", "not a pcache cache device");
  });

  test("bad CRC (a flipped padding byte: the CRC covers the padding)", () => {
    const { dom } = formatted();
    flipByte(dom, SB_OFF + 21);
    expectInvalid(dom, () => loadCache(dom), /^superblock at 0x1000: bad CRC \(stored 0x[0-9a-f]{8}, computed 0x[0-9a-f]{8}\)$/);
  });

  test("big-endian flag", () => {
    const { dom } = formatted();
    dom.write(SB_OFF, encodeSuperblock({ flags: 1, seg_num: 31 }));
    expectInvalid(dom, () => loadCache(dom), "superblock at 0x1000: flags 0x00000001: formatted on a big-endian host");
  });

  test("seg_num larger than the device, zero, or above CACHE_SEGS_MAX", () => {
    const { dom } = formatted();
    dom.write(SB_OFF, encodeSuperblock({ flags: 0, seg_num: 32 }));
    expectInvalid(dom, () => loadCache(dom), "superblock at 0x1000: seg_num 32 needs 536891392 bytes but the device has 536870912 (room for 31 segments)");
    dom.write(SB_OFF, encodeSuperblock({ flags: 0, seg_num: 0 }));
    expectInvalid(dom, () => loadCache(dom), "superblock at 0x1000: seg_num is 0");
    dom.write(SB_OFF, encodeSuperblock({ flags: 0, seg_num: CACHE_SEGS_MAX + 1 }));
    expectInvalid(dom, () => loadCache(dom), `seg_num ${CACHE_SEGS_MAX + 1} exceeds the maximum ${CACHE_SEGS_MAX}`);
  });
});

describe("loadCache: cache_info", () => {
  test("both replicas corrupt", () => {
    const { dom } = formatted();
    rewriteCacheInfo(dom, loadCache(dom), {}); // both slots valid now
    flipByte(dom, CACHE_INFO_OFF + 9);
    flipByte(dom, CACHE_INFO_OFF + CACHE_INFO_STRIDE + 9);
    expectInvalid(
      dom,
      () => loadCache(dom),
      /^no valid cache_info: cache_info \(both replicas\): bad CRC \[slot 0 at 0x2000: bad CRC \(stored 0x\w+, computed 0x\w+\); slot 1 at 0x3000: bad CRC/,
    );
  });

  test("only one replica corrupt: the other is used silently", () => {
    const { dom, meta } = formatted();
    rewriteCacheInfo(dom, meta, { flags: withGcPercent(meta.cache_info.value, 33).flags }); // slot 0, seq 2
    expect(expectUntouched(dom, () => loadCache(dom)).gc_percent).toBe(33);
    flipByte(dom, CACHE_INFO_OFF + 20); // the newer copy (slot 0) breaks
    const m = expectUntouched(dom, () => loadCache(dom));
    expect(m.gc_percent).toBe(70);
    expect(m.cache_info).toMatchObject({ slot: 1, seq: 1 });
  });

  test("never-written cache_info and INIT_DONE clear are 'not initialised'", () => {
    const { dom, meta } = formatted();
    rewriteCacheInfo(dom, meta, { flags: makeCacheInfoFlags({ data_crc: false, init_done: false, gc_percent: 70 }) });
    const e = expectInvalid(dom, () => loadCache(dom), "cache_info (slot 0 at 0x2000, seq 2): INIT_DONE is clear");
    expect(e).toBeInstanceOf(CacheNotInitialisedError);
    dom.fill(CACHE_INFO_OFF, 0x2000, 0);
    const e2 = expectInvalid(dom, () => loadCache(dom), "no valid cache_info", "never written (all zero)", "never initialised");
    expect(e2).toBeInstanceOf(CacheNotInitialisedError);
  });

  test("n_segs 0 or beyond seg_num; seg_id beyond seg_num", () => {
    for (const [patch, msg] of [
      [{ n_segs: 0 }, "cache_info (slot 0 at 0x2000, seq 2): n_segs is 0"],
      [{ n_segs: 900 }, "cache_info (slot 0 at 0x2000, seq 2): n_segs 900 exceeds seg_num 31"],
      [{ seg_id: 31 }, "cache_info (slot 0 at 0x2000, seq 2): seg_id 31 >= seg_num 31"],
    ] as const) {
      const { dom, meta } = formatted();
      rewriteCacheInfo(dom, meta, patch);
      expectInvalid(dom, () => loadCache(dom), msg);
    }
  });

  test("gc_percent above 90 and unknown or unsupported modes", () => {
    for (const [flags, msg] of [
      [makeCacheInfoFlags({ data_crc: false, init_done: true, gc_percent: 91 }), "gc_percent 91 exceeds 90"],
      [makeCacheInfoFlags({ data_crc: false, init_done: true, gc_percent: 127 }), "gc_percent 127 exceeds 90"],
      [makeCacheInfoFlags({ data_crc: false, init_done: true, gc_percent: 70, cache_mode: 1 }), "cache mode 1 (writethrough) is not supported"],
      [makeCacheInfoFlags({ data_crc: false, init_done: true, gc_percent: 70, cache_mode: 9 }), "cache mode 9 (unknown) is not supported"],
    ] as const) {
      const { dom, meta } = formatted();
      rewriteCacheInfo(dom, meta, { flags });
      expectInvalid(dom, () => loadCache(dom), `cache_info (slot 0 at 0x2000, seq 2): ${msg}`);
    }
  });
});

describe("loadCache: segment chain", () => {
  test("missing HAS_NEXT before n_segs", () => {
    const { dom, meta } = formatted();
    persistSegmentInfo(dom, 3, makeSegmentInfo(), meta.segment_info[3]);
    expectInvalid(
      dom,
      () => loadCache(dom),
      "segment_info of physical segment 3 (cache segment 3) (slot 1, seq 3): no HAS_NEXT flag, but cache_info.n_segs is 31 (the chain ends after 4 segments)",
    );
  });

  test("next_seg beyond seg_num", () => {
    const { dom, meta } = formatted();
    persistSegmentInfo(dom, 5, makeSegmentInfo(31), meta.segment_info[5]);
    expectInvalid(dom, () => loadCache(dom), "segment_info of physical segment 5 (cache segment 5) (slot 1, seq 3): next_seg 31 >= seg_num 31");
  });

  test("a physical segment visited twice (cycle)", () => {
    const { dom, meta } = formatted();
    persistSegmentInfo(dom, 5, makeSegmentInfo(2), meta.segment_info[5]);
    expectInvalid(
      dom,
      () => loadCache(dom),
      "segment chain: physical segment 2 (cache segment 6) was already visited as cache segment 2: the chain has a cycle",
    );
  });

  test("segment_info with no valid replica", () => {
    const { dom } = formatted();
    flipByte(dom, segmentOffset(7) + 8);
    flipByte(dom, segmentOffset(7) + SEG_INFO_STRIDE + 8);
    expectInvalid(
      dom,
      () => loadCache(dom),
      /^segment_info of physical segment 7 \(cache segment 7\) \(both replicas\): bad CRC \[slot 0 at 0x7005000: bad CRC .*; slot 1 at 0x7006000: bad CRC/,
    );
  });

  test("segment_info: the older replica corrupt is harmless; a wrong type is refused", () => {
    const { dom, meta } = formatted();
    flipByte(dom, segmentOffset(7) + SEG_INFO_STRIDE + 8); // slot 1 (seq 1) of a linked segment
    expect(expectUntouched(dom, () => loadCache(dom)).seg_ids).toEqual(meta.seg_ids);
    persistSegmentInfo(dom, 9, { flags: 1 | (2 << 1), next_seg: 10 }, meta.segment_info[9]);
    expectInvalid(dom, () => loadCache(dom), "segment_info of physical segment 9 (cache segment 9) (slot 1, seq 3): segment type 2, expected 1 (CACHE_DATA)");
  });

  test("a chain that is not the identity is followed by physical id", () => {
    const { dom, meta } = formatted();
    // cache segments: 0 -> 2 -> 1 -> 3 -> ... (swap physical 1 and 2)
    persistSegmentInfo(dom, 0, makeSegmentInfo(2), meta.segment_info[0]);
    persistSegmentInfo(dom, 2, makeSegmentInfo(1), meta.segment_info[2]);
    persistSegmentInfo(dom, 1, makeSegmentInfo(3), meta.segment_info[1]);
    persistSegGen(dom, 2, 5, meta.seg_gen_slots[2]);
    const m = expectUntouched(dom, () => loadCache(dom));
    expect(m.seg_ids.slice(0, 5)).toEqual([0, 2, 1, 3, 4]);
    expect(m.seg_gens.slice(0, 3)).toEqual([0, 5, 0]);
    expect(m.seg_gen_slots[1]).toEqual({ slot: 0, seq: 2 });
  });

  test("seg_gen with no valid copy is generation 0, not an error; above 2^53 is", () => {
    const { dom, meta } = formatted();
    persistSegGen(dom, 4, 7, meta.seg_gen_slots[4]);
    expect(expectUntouched(dom, () => loadCache(dom)).seg_gens[4]).toBe(7);
    flipByte(dom, segmentOffset(4) + SEG_GEN_OFF + 8);
    flipByte(dom, segmentOffset(4) + SEG_GEN_OFF + 16 + 8);
    const m = expectUntouched(dom, () => loadCache(dom));
    expect(m.seg_gens[4]).toBe(0);
    expect(m.seg_gen_slots[4]).toBe(null);
    // A CRC-valid seg_gen whose gen does not fit a number (crafted): high word 0x400000.
    const huge = encodeRecord(SEG_GEN_RECORD, { gen: 1 }, 9);
    new DataView(huge.buffer).setUint32(12, 0x0040_0000, true);
    sealRecord(huge, 9);
    dom.write(segmentOffset(4) + SEG_GEN_OFF, huge);
    expectInvalid(dom, () => loadCache(dom), "seg_gen of physical segment 4 (slot 0 at 0x4007000): gen: value 0x0040000000000001 exceeds 2^53");
  });
});

describe("loadCache: tails", () => {
  test("no valid key_tail / dirty_tail", () => {
    for (const [off, name] of [[KEY_TAIL_POS_OFF, "key_tail"], [DIRTY_TAIL_POS_OFF, "dirty_tail"]] as const) {
      const { dom } = formatted();
      flipByte(dom, off + 16 + 8); // slot 1 is the only written one
      expectInvalid(
        dom,
        () => loadCache(dom),
        `Corrupted key tail or dirty tail: ${name} (both replicas): bad CRC [slot 0 at 0x${off.toString(16)}: all zero (never written); slot 1 at 0x${(off + 16).toString(16)}: bad CRC`,
      );
    }
  });

  test("one replica corrupt: the other is used", () => {
    const { dom, meta } = formatted();
    persistTail(dom, "key_tail", { cache_seg_id: 0, seg_off: 4096 }, meta.key_tail);
    expect(expectUntouched(dom, () => loadCache(dom)).key_tail).toEqual({ cache_seg_id: 0, seg_off: 4096, slot: 0, seq: 2 });
    flipByte(dom, KEY_TAIL_POS_OFF + 12);
    expect(expectUntouched(dom, () => loadCache(dom)).key_tail).toEqual({ cache_seg_id: 0, seg_off: 0, slot: 1, seq: 1 });
  });

  test("cache_seg_id beyond n_segs, offsets past the data area or leaving no room", () => {
    for (const [which, pos, msg] of [
      ["key_tail", { cache_seg_id: 31, seg_off: 0 }, "key_tail (slot 0 at 0x4000, seq 2): cache_seg_id 31 >= n_segs 31"],
      ["dirty_tail", { cache_seg_id: 2, seg_off: SEG_DATA_SIZE }, `dirty_tail (slot 0 at 0x4020, seq 2): seg_off ${SEG_DATA_SIZE} >= data area size ${SEG_DATA_SIZE}`],
      ["dirty_tail", { cache_seg_id: 2, seg_off: 0xffff_fff0 }, "dirty_tail (slot 0 at 0x4020, seq 2): seg_off 4294967280 >= data area size"],
      ["key_tail", { cache_seg_id: 2, seg_off: SEG_DATA_SIZE - 16 }, "key_tail (slot 0 at 0x4000, seq 2): seg_off 16764912 leaves 16 bytes in the data area, less than a 24-byte kset header"],
    ] as const) {
      const { dom, meta } = formatted();
      persistTail(dom, which, pos, meta[which]);
      expectInvalid(dom, () => loadCache(dom), msg);
    }
  });

  test("a tail exactly 24 bytes before the end of the data area is accepted", () => {
    const { dom, meta } = formatted();
    persistTail(dom, "key_tail", { cache_seg_id: 1, seg_off: SEG_DATA_SIZE - 24 }, meta.key_tail);
    expect(expectUntouched(dom, () => loadCache(dom)).key_tail.seg_off).toBe(SEG_DATA_SIZE - 24);
  });
});

describe("loadCache never writes", () => {
  test("a successful load leaves every byte and counter as it was", () => {
    const { dom } = formatted(SIZE_512M, { data_crc: true });
    const m = expectUntouched(dom, () => loadCache(dom, { backing_size_bytes: 1 << 30 }));
    expect(m.backing_size_bytes).toBe(1 << 30);
    expect(m.data_crc).toBe(true);
  });
});
