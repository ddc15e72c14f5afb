import { describe, expect, test } from "bun:test";
import { KSET_KEYS_MAX, MiB, SEG_DATA_SIZE } from "../core/format/constants.ts";
import { loadCache } from "../core/format/load_cache.ts";
import { LogBuilder } from "../core/format/log_builder.ts";
import { persistTail } from "../core/format/meta.ts";
import { devOffsetOf, posToString } from "../core/log/position.ts";
import { type WalkedKset, walkLog } from "../core/log/walk.ts";
import { SimCrash, SimDomain } from "../core/persist/sim.ts";
import { formatCache } from "../core/format/format_cache.ts";
import { expectInvalid, expectUntouched, flipByte, formatted, SIZE_512M } from "./fixtures/format_helpers.ts";

const BACKING = 1024 * MiB;

function bytes(len: number, fill: number): Uint8Array {
  const b = new Uint8Array(len);
  for (let i = 0; i < len; i++) b[i] = (fill + i * 7) & 0xff;
  return b;
}

function collect(dom: SimDomain, meta: ReturnType<typeof loadCache>, opts = {}) {
  const seen: WalkedKset[] = [];
  const res = expectUntouched(dom, () =>
    walkLog(dom, meta, meta.key_tail, { backing_size_bytes: BACKING, ...opts }, (k) => {
      seen.push(k);
      return true;
    }),
  );
  return { res, seen };
}

describe("walkLog: well-formed logs", () => {
  test("the empty log of a fresh format ends at 0:0 on a zero header", () => {
    const { dom, meta } = formatted();
    const { res, seen } = collect(dom, meta);
    expect(seen).toEqual([]);
    expect(res).toEqual({
      end_pos: { cache_seg_id: 0, seg_off: 0 },
      end_kind: "zero_header",
      end_reason: "zero kset header at 0:0: end of the log",
      end_clean: true,
      ksets: 0,
      last_ksets: 0,
      keys: 0,
      stale_keys: 0,
      bad_crc_keys: 0,
      future_gen_keys: 0,
    });
  });

  test("several ksets, a LAST roll into another segment, one key stale by generation", () => {
    const { dom, meta } = formatted(SIZE_512M, { data_crc: true });
    const b = new LogBuilder(dom, meta);
    const a = b.appendKset([
      { off: 0, cache_seg_id: 1, cache_seg_off: 0, data: bytes(4096, 1) },
      { off: 65536, cache_seg_id: 2, cache_seg_off: 0, data: bytes(512, 2) }, // will be stale
    ]);
    const bb = b.appendKset([{ off: 8192, cache_seg_id: 1, cache_seg_off: 4096, data: bytes(8192, 3), flags: 2 }]);
    const c = b.appendKset([
      { off: 4 * MiB, cache_seg_id: 1, cache_seg_off: 12288, data: bytes(1024, 4) },
      { off: 4 * MiB + 1024, cache_seg_id: 1, cache_seg_off: 13312, data: bytes(1024, 5) },
      { off: 100 * MiB, cache_seg_id: 1, cache_seg_off: 14336, data: bytes(2048, 6) },
    ]);
    const last = b.appendLast(5);
    expect(b.bumpGen(2)).toBe(1); // segment 2 freed by GC: its old keys become stale
    const d = b.appendKset([
      { off: 65536, cache_seg_id: 2, cache_seg_off: 0, data: bytes(512, 7) }, // same place, new generation
      { off: 12 * MiB, cache_seg_id: 1, cache_seg_off: 16384, data: bytes(4096, 8) },
    ]);
    expect([a, bb, c, last, d].map(posToString)).toEqual(["0:0", "0:104", "0:168", "0:312", "5:0"]);

    const m = loadCache(dom, { backing_size_bytes: BACKING });
    expect(m.seg_gens[2]).toBe(1);
    const { res, seen } = collect(dom, m, { verify_data_crc: true });
    expect(seen.map((k) => [posToString(k.pos), k.size_bytes, k.last, k.next_cache_seg_id, k.keys.length])).toEqual([
      ["0:0", 104, false, undefined, 2],
      ["0:104", 64, false, undefined, 1],
      ["0:168", 144, false, undefined, 3],
      ["0:312", 24, true, 5, 0],
      ["5:0", 104, false, undefined, 2],
    ]);
    expect(seen[0].keys[1]).toEqual({
      off: 65536,
      len: 512,
      flags: 0,
      cache_seg_id: 2,
      cache_seg_off: 0,
      seg_gen: 0,
      data_crc: seen[0].keys[1].data_crc,
      index: 1,
      stale: true,
      crc_ok: null, // not checked: the segment's data now belongs to the new generation
    });
    expect(seen[1].keys[0]).toMatchObject({ off: 8192, len: 8192, flags: 2, cache_seg_off: 4096, stale: false, crc_ok: true });
    expect(seen[4].keys[0]).toMatchObject({ off: 65536, seg_gen: 1, stale: false, crc_ok: true });
    expect(seen.flatMap((k) => k.keys.map((x) => x.stale))).toEqual([false, true, false, false, false, false, false, false]);
    expect(res).toEqual({
      end_pos: { cache_seg_id: 5, seg_off: 104 },
      end_kind: "zero_header",
      end_reason: "zero kset header at 5:104: end of the log",
      end_clean: true,
      ksets: 5,
      last_ksets: 1,
      keys: 8,
      stale_keys: 1,
      bad_crc_keys: 0,
      future_gen_keys: 0,
    });

    // Walking from a mid-log position (dirty_tail after writeback of two ksets) sees the rest.
    persistTail(dom, "dirty_tail", { cache_seg_id: 0, seg_off: 168 }, m.dirty_tail);
    const m2 = loadCache(dom);
    const r2 = walkLog(dom, m2, m2.dirty_tail, {});
    expect([r2.ksets, r2.keys, posToString(r2.end_pos)]).toEqual([3, 5, "5:104"]);

    // Corrupt live data: reported as crc_ok false, the walk goes on (the caller decides).
    flipByte(dom, devOffsetOf(m, { cache_seg_id: 1, seg_off: 4096 + 100 }));
    const { res: r3, seen: s3 } = collect(dom, m, { verify_data_crc: true });
    expect(s3[1].keys[0].crc_ok).toBe(false);
    expect(r3.bad_crc_keys).toBe(1);
    expect(r3.ksets).toBe(5);
    // Without verification nothing is checked.
    const { seen: s4 } = collect(dom, m, { verify_data_crc: false });
    expect(s4.flatMap((k) => k.keys.map((x) => x.crc_ok)).every((x) => x === null)).toBe(true);
  });

  test("a kset with a bad CRC in the middle ends the log there", () => {
    const { dom, meta } = formatted();
    const b = new LogBuilder(dom, meta);
    b.appendKset([{ off: 0, len: 4096, cache_seg_id: 1, cache_seg_off: 0 }]);
    b.appendKset([{ off: 4096, len: 4096, cache_seg_id: 1, cache_seg_off: 4096 }], { bad_crc: true });
    b.appendKset([{ off: 8192, len: 4096, cache_seg_id: 1, cache_seg_off: 8192 }]);
    const { res, seen } = collect(dom, meta);
    expect(seen.length).toBe(1);
    expect(res.end_pos).toEqual({ cache_seg_id: 0, seg_off: 64 });
    expect(res.end_kind).toBe("bad_crc");
    expect(res.end_clean).toBe(false);
    expect(res.end_reason).toMatch(
      /^bad CRC at 0:64 \(normal kset, stored 0x\w{8}, computed 0x\w{8}\): a torn or corrupt kset; the log ends here and anything after it is ignored \(kernel rule\)$/,
    );
  });

  test("bad magic and a LAST kset with a bad CRC end the log", () => {
    const { dom, meta } = formatted();
    const b = new LogBuilder(dom, meta);
    b.appendKset([{ off: 0, len: 4096, cache_seg_id: 1, cache_seg_off: 0 }], { bad_magic: true });
    const r1 = collect(dom, meta).res;
    expect(r1.end_kind).toBe("bad_magic");
    expect(r1.end_reason).toBe("bad kset magic 0x676894a64e164f1b at 0:0: treated as the end of the log");

    const f = formatted();
    const b2 = new LogBuilder(f.dom, f.meta);
    b2.appendKset([{ off: 0, len: 4096, cache_seg_id: 1, cache_seg_off: 0 }]);
    b2.appendLast(3, { bad_crc: true });
    const r2 = collect(f.dom, f.meta).res;
    expect([r2.end_kind, posToString(r2.end_pos), r2.ksets]).toEqual(["bad_crc", "0:64", 1]);
    expect(r2.end_reason).toContain("bad CRC at 0:64 (LAST kset");
  });

  test("a CRC-valid normal kset with 0 keys is accepted as empty (24 bytes)", () => {
    const { dom, meta } = formatted();
    const b = new LogBuilder(dom, meta);
    b.appendKset([]);
    b.appendKset([{ off: 0, len: 512, cache_seg_id: 1, cache_seg_off: 0 }]);
    const { res, seen } = collect(dom, meta);
    expect(seen.map((k) => [posToString(k.pos), k.size_bytes, k.keys.length])).toEqual([["0:0", 24, 0], ["0:24", 64, 1]]);
    expect(posToString(res.end_pos)).toBe("0:88");
  });

  test("limit and a visitor that stops", () => {
    const { dom, meta } = formatted();
    const b = new LogBuilder(dom, meta);
    for (let i = 0; i < 4; i++) b.appendKset([{ off: i * 4096, len: 4096, cache_seg_id: 1, cache_seg_off: i * 4096 }]);
    const r1 = walkLog(dom, meta, meta.key_tail, { limit: 2 });
    expect([r1.end_kind, posToString(r1.end_pos), r1.ksets]).toEqual(["limit", "0:128", 2]);
    let n = 0;
    const r2 = walkLog(dom, meta, meta.key_tail, {}, () => ++n < 3);
    expect([r2.end_kind, posToString(r2.end_pos), r2.ksets, r2.end_reason]).toEqual([
      "visitor",
      "0:192",
      3,
      "walk stopped by the caller after the kset at 0:128",
    ]);
  });

  test("a full segment of 128-key ksets rolls into the next segment", () => {
    const { dom, meta } = formatted();
    const b = new LogBuilder(dom, meta);
    const keys = Array.from({ length: KSET_KEYS_MAX }, (_, i) => ({ off: i * 512, len: 512, cache_seg_id: 2, cache_seg_off: i * 512 }));
    let n = 0;
    // The writer's rule: a kset goes in only if it leaves room for a LAST kset.
    while (SEG_DATA_SIZE - b.head.seg_off >= 5144 + 24) {
      b.appendKset(keys);
      n++;
    }
    b.appendLast(1);
    b.appendKset(keys.slice(0, 1));
    const r = walkLog(dom, meta, meta.key_tail, { backing_size_bytes: BACKING });
    expect(n).toBe(3259);
    expect([r.ksets, r.last_ksets, r.keys, posToString(r.end_pos)]).toEqual([n + 2, 1, n * 128 + 1, "1:64"]);
  });

  test("a torn kset write ends the log cleanly, it never makes it invalid", () => {
    const outcomes = new Set<string>();
    for (let seed = 1; seed <= 12; seed++) {
      const dom = new SimDomain(SIZE_512M, { seed });
      const meta = formatCache(dom, { data_crc: false });
      const b = new LogBuilder(dom, meta);
      b.appendKset([{ off: 0, len: 512, cache_seg_id: 1, cache_seg_off: 0 }]);
      dom.crash_at_fence = dom.fence_count + 1;
      // A one-line kset sometimes survives whole; a 100-key one practically never does.
      const keys = Array.from({ length: seed % 2 === 1 ? 1 : 100 }, (_, i) => ({ off: i * 512, len: 512, cache_seg_id: 1, cache_seg_off: i * 512 }));
      expect(() => b.appendKset(keys)).toThrow(SimCrash);
      const after = dom.recover({ seed });
      const r = walkLog(after, loadCache(after), meta.key_tail, {});
      expect(["zero_header", "bad_crc", "bad_magic"]).toContain(r.end_kind);
      expect([1, 2]).toContain(r.ksets);
      outcomes.add(`${r.end_kind}/${r.ksets}`);
    }
    expect(outcomes.size).toBeGreaterThan(1);
  });
});

describe("walkLog: crafted logs are invalid devices", () => {
  test("key_num > 128", () => {
    const { dom, meta } = formatted();
    new LogBuilder(dom, meta).writeHeader({ cache_seg_id: 0, seg_off: 0 }, { key_num_or_next: 129 });
    expectInvalid(dom, () => walkLog(dom, meta, meta.key_tail, {}), "kset at 0:0: key_num 129 exceeds the maximum 128");
    new LogBuilder(dom, meta).writeHeader({ cache_seg_id: 0, seg_off: 0 }, { key_num_or_next: 0xffffffff });
    expectInvalid(dom, () => walkLog(dom, meta, meta.key_tail, {}), "key_num 4294967295 exceeds the maximum 128");
  });

  test("a kset overrunning its segment", () => {
    const { dom, meta } = formatted();
    const at = { cache_seg_id: 3, seg_off: SEG_DATA_SIZE - 104 };
    new LogBuilder(dom, meta).writeHeader(at, { key_num_or_next: 3 });
    persistTail(dom, "key_tail", at, meta.key_tail);
    const m = loadCache(dom);
    expectInvalid(
      dom,
      () => walkLog(dom, m, m.key_tail, {}),
      `kset at 3:${SEG_DATA_SIZE - 104} overruns its segment: 144 bytes (key_num 3) but 104 bytes left in the data area`,
    );
  });

  test("a walk start that leaves no room for a header", () => {
    const { dom, meta } = formatted();
    expectInvalid(
      dom,
      () => walkLog(dom, meta, { cache_seg_id: 0, seg_off: SEG_DATA_SIZE - 8 }, {}),
      `log walk start 0:${SEG_DATA_SIZE - 8}: seg_off ${SEG_DATA_SIZE - 8} leaves 8 bytes in the data area`,
    );
    expectInvalid(dom, () => walkLog(dom, meta, { cache_seg_id: 31, seg_off: 0 }, {}), "log walk start 31:0: cache_seg_id 31 >= n_segs 31");
  });

  test("a kset that ends too close to the segment end for the next header", () => {
    const { dom, meta } = formatted();
    const b = new LogBuilder(dom, meta, { cache_seg_id: 0, seg_off: SEG_DATA_SIZE - 64 - 16 });
    b.appendKset([{ off: 0, len: 512, cache_seg_id: 1, cache_seg_off: 0 }]);
    expectInvalid(
      dom,
      () => walkLog(dom, meta, { cache_seg_id: 0, seg_off: SEG_DATA_SIZE - 80 }, {}),
      `log position 0:${SEG_DATA_SIZE - 16}: only 16 bytes left in the data area, less than a 24-byte kset header`,
    );
  });

  test("segment ids out of range: key cache_seg_id, LAST next_cache_seg_id", () => {
    const f1 = formatted();
    new LogBuilder(f1.dom, f1.meta).appendKset([
      { off: 0, len: 512, cache_seg_id: 1, cache_seg_off: 0 },
      { off: 512, len: 512, cache_seg_id: 31, cache_seg_off: 0 },
    ]);
    expectInvalid(f1.dom, () => walkLog(f1.dom, f1.meta, f1.meta.key_tail, {}), "key 1 of kset at 0:0: cache_seg_id 31 >= n_segs 31");

    const f2 = formatted();
    const b2 = new LogBuilder(f2.dom, f2.meta);
    b2.appendKset([{ off: 0, len: 512, cache_seg_id: 1, cache_seg_off: 0 }]);
    b2.appendLast(4000);
    expectInvalid(f2.dom, () => walkLog(f2.dom, f2.meta, f2.meta.key_tail, {}), "LAST kset at 0:64: next_cache_seg_id 4000 >= n_segs 31");
  });

  test("a cycle in the LAST-kset chain", () => {
    const f1 = formatted();
    const b1 = new LogBuilder(f1.dom, f1.meta);
    b1.appendLast(1); // 0:0 -> 1
    b1.appendKset([{ off: 0, len: 512, cache_seg_id: 3, cache_seg_off: 0 }]);
    b1.appendLast(2); // 1:64 -> 2
    b1.appendLast(1, { zero_next: false }); // 2:0 -> 1 again
    expectInvalid(
      f1.dom,
      () => walkLog(f1.dom, f1.meta, f1.meta.key_tail, {}),
      "LAST kset at 2:0: next_cache_seg_id 1 was already visited by this walk: the LAST-kset chain has a cycle",
    );

    const f2 = formatted();
    const b2 = new LogBuilder(f2.dom, f2.meta);
    b2.appendKset([{ off: 0, len: 512, cache_seg_id: 3, cache_seg_off: 0 }]);
    b2.appendLast(0, { zero_next: false }); // back into the segment the walk started in
    expectInvalid(f2.dom, () => walkLog(f2.dom, f2.meta, f2.meta.key_tail, {}), "LAST kset at 0:64: next_cache_seg_id 0 was already visited");
  });

  test("key off + len past the backing size", () => {
    const { dom, meta } = formatted();
    new LogBuilder(dom, meta).appendKset([{ off: MiB - 512, len: 1024, cache_seg_id: 1, cache_seg_off: 0 }]);
    expectInvalid(
      dom,
      () => walkLog(dom, meta, meta.key_tail, { backing_size_bytes: MiB }),
      "key 0 of kset at 0:0: off 1048064 + len 1024 = 1049088 exceeds the backing device size 1048576",
    );
    // Unknown backing size: not checked.
    expect(expectUntouched(dom, () => walkLog(dom, meta, meta.key_tail, {})).keys).toBe(1);
  });

  test("a zero-length key", () => {
    const { dom, meta } = formatted();
    new LogBuilder(dom, meta).appendKset([
      { off: 0, len: 512, cache_seg_id: 1, cache_seg_off: 0 },
      { off: 4096, len: 512, cache_seg_id: 1, cache_seg_off: 512 },
      { off: 8192, len: 0, cache_seg_id: 1, cache_seg_off: 1024 },
    ]);
    expectInvalid(dom, () => walkLog(dom, meta, meta.key_tail, { backing_size_bytes: BACKING }), "key 2 of kset at 0:0: zero-length key (off 8192)");
  });

  test("a key past its segment's data area, across 4 MiB, or with an off above 2^53", () => {
    const f1 = formatted();
    new LogBuilder(f1.dom, f1.meta).appendKset([{ off: 0, len: 4096, cache_seg_id: 1, cache_seg_off: SEG_DATA_SIZE - 2048 }]);
    expectInvalid(
      f1.dom,
      () => walkLog(f1.dom, f1.meta, f1.meta.key_tail, {}),
      `key 0 of kset at 0:0: cache_seg_off ${SEG_DATA_SIZE - 2048} + len 4096 exceeds the segment data area (${SEG_DATA_SIZE} bytes)`,
    );

    const f2 = formatted();
    new LogBuilder(f2.dom, f2.meta).appendKset([{ off: 4 * MiB - 512, len: 1024, cache_seg_id: 1, cache_seg_off: 0 }]);
    expectInvalid(f2.dom, () => walkLog(f2.dom, f2.meta, f2.meta.key_tail, {}), "key 0 of kset at 0:0: [4193792, 4194816) crosses a 4 MiB boundary");

    const f3 = formatted();
    new LogBuilder(f3.dom, f3.meta).appendKset([{ off: 2 ** 53 + 2, len: 512, cache_seg_id: 1, cache_seg_off: 0 }]);
    expectInvalid(f3.dom, () => walkLog(f3.dom, f3.meta, f3.meta.key_tail, {}), "key 0 of kset at 0:0: off: value 0x0020000000000002 exceeds 2^53");
  });
});
