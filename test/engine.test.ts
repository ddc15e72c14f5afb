import { describe, expect, test } from "bun:test";
import { DataCrcError } from "../core/errors.ts";
import { MiB } from "../core/format/constants.ts";
import { KEY_F_CRC_VERIFIED } from "../core/index/key_index.ts";
import { drainWriteback, newHarness, openHarness, pattern } from "./helpers/engine_harness.ts";

async function readBack(h: ReturnType<typeof newHarness>, off: number, len: number): Promise<Uint8Array> {
  const dst = new Uint8Array(len);
  await h.engine.read(off, len, dst);
  return dst;
}

describe("engine paths", () => {
  test("write then read returns the bytes, across 4 MiB boundaries and unaligned", async () => {
    const h = newHarness();
    const data = pattern(5 * MiB + 123, 7);
    const off = 4 * MiB - 1000;
    await h.engine.write(off, data, false);
    expect(await readBack(h, off, data.length)).toEqual(data);
    // A read that mixes cached bytes and backing bytes.
    const around = await readBack(h, off - 500, 1000);
    expect(around.subarray(0, 500).every((b) => b === 0)).toBe(true);
    expect(around.subarray(500)).toEqual(data.subarray(0, 500));
  });

  test("a payload given as receive-chunk parts is written like the same bytes in one buffer (data CRC on)", async () => {
    const h = newHarness(64 * MiB, { data_crc: true });
    const data = pattern(4 * MiB + 5000, 11);
    // Parts of odd sizes, one of them straddling the 4 MiB boundary of the target range.
    const cuts = [0, 1, 777, 3000, 2 * MiB, 4 * MiB - 1500, data.length];
    const parts = cuts.slice(1).map((end, i) => data.subarray(cuts[i], end));
    const off = 4 * MiB - 2500;
    await h.engine.write(off, parts, false);
    await h.engine.write(16 * MiB, data, false);
    // Every key's CRC is checked on its first read: a CRC chained wrongly across parts fails here.
    expect(await readBack(h, off, data.length)).toEqual(data);
    expect(await readBack(h, 16 * MiB, data.length)).toEqual(data);
    await h.engine.flush();
    const again = openHarness(h.dom, h.backing, { data_crc: true });
    expect(await readBack(again, off, data.length)).toEqual(data);
  });

  test("overwrites win; misses are filled from the backing device", async () => {
    const h = newHarness();
    h.backing.bytes.set(pattern(1 * MiB, 3), 0);
    await h.engine.write(4096, pattern(8192, 1), false);
    await h.engine.write(6000, pattern(100, 2), false);
    const got = await readBack(h, 0, 1 * MiB);
    const want = pattern(1 * MiB, 3);
    want.set(pattern(8192, 1), 4096);
    want.set(pattern(100, 2), 6000);
    expect(got).toEqual(want);
    // Second read is served from the cache fill.
    expect(await readBack(h, 0, 1 * MiB)).toEqual(want);
  });

  test("flushed writes survive a restart (replay)", async () => {
    const h = newHarness();
    await h.engine.write(12345, pattern(70000, 9), false);
    await h.engine.writeZeroes(20000, 5000, { fua: false });
    await h.engine.flush();
    const want = await readBack(h, 0, 200000);
    const h2 = openHarness(h.dom, h.backing);
    expect(h2.engine.replay_result!.keys).toBeGreaterThan(0);
    expect(await readBack(h2, 0, 200000)).toEqual(want);
  });

  test("writeback makes the backing device equal the cached view", async () => {
    const h = newHarness();
    await h.engine.write(0, pattern(300000, 4), false);
    await h.engine.writeZeroes(1000, 2000, { fua: false });
    await h.engine.flush();
    await drainWriteback(h);
    expect(h.backing.bytes.subarray(0, 300000)).toEqual(await readBack(h, 0, 300000));
  });

  test("the request path finishes at once when it can: a write with room and a cached read return no promise", async () => {
    const h = newHarness();
    h.backing.bytes.set(pattern(8192, 6), 65536);
    expect(h.engine.writeNow(4096, pattern(4096, 1), false)).toBeUndefined();
    // Given as receive-chunk parts, across a 4 MiB boundary (two keys).
    expect(h.engine.writeNow(4 * MiB - 4096, [pattern(4096, 2), pattern(4096, 3)], false)).toBeUndefined();
    const hit = new Uint8Array(4096);
    expect(h.engine.readNow(4096, 4096, hit)).toBeUndefined();
    expect([...hit]).toEqual([...pattern(4096, 1)]);
    const across = new Uint8Array(8192);
    expect(h.engine.readNow(4 * MiB - 4096, 8192, across)).toBeUndefined();
    expect(across).toEqual(Uint8Array.from([...pattern(4096, 2), ...pattern(4096, 3)]));
    // A miss waits for the backing device; once filled, the same range is a hit.
    const miss = new Uint8Array(8192);
    const pending = h.engine.readNow(65536, 8192, miss);
    expect(pending).toBeInstanceOf(Promise);
    await pending;
    expect([...miss]).toEqual([...pattern(8192, 6)]);
    expect(h.engine.readNow(65536, 8192, new Uint8Array(8192))).toBeUndefined();
    // FUA waits for the flush-epoch boundary.
    const fua = h.engine.writeNow(8192, pattern(4096, 4), true);
    expect(fua).toBeInstanceOf(Promise);
    await fua;
    // Bad ranges throw at once, with the NBD errno.
    expect(() => h.engine.writeNow(64 * MiB - 10, new Uint8Array(20), false)).toThrow(expect.objectContaining({ errno: 28 }));
    expect(() => h.engine.readNow(64 * MiB - 10, 20, new Uint8Array(20))).toThrow(expect.objectContaining({ errno: 22 }));
    h.engine.ctx.log.stopTimers();
  });

  test("a write that finds the index pool empty waits for nodes, then logs its keys", async () => {
    const h = newHarness();
    const idx = h.engine.ctx.idx;
    const held: number[] = [];
    for (let id = idx.allocNode(); id >= 0; id = idx.allocNode()) held.push(id);
    // Two pieces (across a 4 MiB boundary): both wait, the data is already in the cache.
    const data = pattern(8192, 8);
    const pending = h.engine.writeNow(4 * MiB - 4096, data, false);
    expect(pending).toBeInstanceOf(Promise);
    let done = false;
    void pending!.then(() => (done = true));
    await Bun.sleep(20);
    expect(done).toBe(false);
    for (const id of held) idx.freeNode(id);
    await pending;
    expect(await readBack(h, 4 * MiB - 4096, 8192)).toEqual(data);
    h.engine.ctx.log.stopTimers();
  });

  test("range checks: past the end is refused with the NBD errno", async () => {
    const h = newHarness(1 * MiB);
    await expect(h.engine.write(MiB - 10, new Uint8Array(20), false)).rejects.toMatchObject({ errno: 28 });
    await expect(h.engine.read(MiB - 10, 20, new Uint8Array(20))).rejects.toMatchObject({ errno: 22 });
  });
});

describe("data CRC", () => {
  test("a cached extent damaged on the cache device reads as an error naming the key", async () => {
    const h = newHarness(64 * MiB, { data_crc: true });
    await h.engine.write(8192, pattern(4096, 5), false);
    expect(await readBack(h, 8192, 4096)).toEqual(pattern(4096, 5));
    const idx = h.engine.ctx.idx;
    const t = idx.ceiling(idx.subtreeOf(8192), 8192);
    // Damage the cached bytes and forget that they were verified: the next read must check.
    idx.flags[t] &= ~KEY_F_CRC_VERIFIED;
    const at = h.engine.ctx.media.dataOff(idx.cache_seg_id[t], idx.seg_off[t] + 100);
    h.dom.write(at, new Uint8Array([h.dom.view(at, 1)[0] ^ 0xff]));
    await expect(h.engine.read(8192, 4096, new Uint8Array(4096))).rejects.toBeInstanceOf(DataCrcError);
    h.engine.ctx.log.stopTimers();
  });

  test("replay refuses a cache whose logged data no longer matches its CRC", async () => {
    const h = newHarness(64 * MiB, { data_crc: true });
    await h.engine.write(0, pattern(4096, 6), false);
    await h.engine.flush();
    h.engine.ctx.log.stopTimers();
    const idx = h.engine.ctx.idx;
    const t = idx.ceiling(0, 0);
    const at = h.engine.ctx.media.dataOff(idx.cache_seg_id[t], idx.seg_off[t]);
    h.dom.write(at, new Uint8Array([h.dom.view(at, 1)[0] ^ 0xff]));
    expect(() => openHarness(h.dom, h.backing)).toThrow(/data CRC mismatch/);
  });
});
