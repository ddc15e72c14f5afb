/**
 * Flush epochs (core/log/flush_epochs.ts) and the writeback skip they allow: a dirty version is
 * left out only when a later key of the same flush epoch, already on media, overwrote it. A
 * FLUSH, a FUA write or a restart ends the epoch; an overwrite still in an open kset proves
 * nothing. The randomized prefix test in writeback_gc.test.ts checks the backing device against
 * the log at every step; these pin each rule down with one block.
 */
import { describe, expect, test } from "bun:test";
import { MemoryBacking } from "../core/device/memory_backing.ts";
import { KSET_KEYS_MAX } from "../core/format/constants.ts";
import {
  CTL_EPOCH_RING_HEAD,
  CTL_EPOCH_RING_OFF,
  CTL_EPOCH_RING_TAIL,
  EPOCH_RING_ENTRIES,
  EPOCH_RING_ENTRY_WORDS,
  LOCK_KEY_HEAD,
  POS_KEY_HEAD,
  STAT_WRITEBACK_SKIPPED_BYTES,
} from "../core/engine/shared_state.ts";
import { EPOCH_UNKNOWN, EpochCursor } from "../core/log/flush_epochs.ts";
import { CLOSE_FOR_SKIP_MIN_BYTES } from "../core/writeback/writeback.ts";
import { lock, unlock } from "../core/sync/lock.ts";
import { freshCache, type Harness, newHarness, openHarness, pattern } from "./helpers/engine_harness.ts";

const BLOCK = 4096;
/** The block every test overwrites; the fillers sit after it in the same 4 MiB region (kset 0). */
const X = 0;

async function write(h: Harness, off: number, data: Uint8Array, fua = false): Promise<void> {
  await h.engine.write(off, data, fua);
}

/** Write X = data, then fillers until X's kset is full and closes (on media, no flush). */
async function writeXAndCloseKset(h: Harness, data: Uint8Array, filler_seed: number): Promise<void> {
  await write(h, X, data);
  // Fillers of each call sit in their own blocks (filler_seed / 1000 picks them), never overwritten.
  const first = (filler_seed / 1000) * KSET_KEYS_MAX;
  for (let i = 1; i < KSET_KEYS_MAX; i++) await write(h, X + (first + i) * BLOCK, pattern(BLOCK, filler_seed + i));
}

function backingAt(h: Harness, off: number): Uint8Array {
  return h.backing.bytes.subarray(off, off + BLOCK);
}

function skippedBytes(h: Harness): number {
  return h.engine.ctx.s.statTotal(STAT_WRITEBACK_SKIPPED_BYTES);
}

/** Writeback of the first kset wrote X's first version (v1) and left nothing out. */
async function expectFirstKsetWrittenWhole(h: Harness): Promise<void> {
  expect(await h.writeback.step()).toBe("progress");
  expect(backingAt(h, X)).toEqual(v1);
  expect(skippedBytes(h)).toBe(0);
}

const v1 = pattern(BLOCK, 101);
const v2 = pattern(BLOCK, 202);
const zeroes = new Uint8Array(BLOCK);

describe("writeback within a flush epoch", () => {
  test("a version overwritten by a later key of the same epoch, already on media, is not written", async () => {
    const h = newHarness();
    await writeXAndCloseKset(h, v1, 1000);
    await writeXAndCloseKset(h, v2, 2000);
    expect(await h.writeback.step()).toBe("progress");
    expect(backingAt(h, X)).toEqual(zeroes); // v1 skipped: the backing keeps the epoch's start
    expect(backingAt(h, X + (KSET_KEYS_MAX + 1) * BLOCK)).toEqual(pattern(BLOCK, 1001)); // the rest of the kset went
    expect(skippedBytes(h)).toBe(BLOCK);
    expect(await h.writeback.step()).toBe("progress");
    expect(backingAt(h, X)).toEqual(v2);
    h.engine.ctx.log.stopTimers();
  });

  test("an overwrite still in an open kset proves nothing: the earlier version is written", async () => {
    const h = newHarness();
    await writeXAndCloseKset(h, v1, 1000);
    // Kset open: lost in a crash, so it cannot stand in for v1; too small to close it early for.
    await write(h, X, v2);
    await expectFirstKsetWrittenWhole(h);
    h.engine.ctx.log.stopTimers();
  });

  test("a large overwrite in an open kset: writeback closes that kset, then leaves the earlier version out", async () => {
    const h = newHarness();
    const big_off = 2 * 1024 * 1024; // same 4 MiB region (kset 0), clear of the fillers
    const big_v1 = pattern(CLOSE_FOR_SKIP_MIN_BYTES, 303);
    const big_v2 = pattern(CLOSE_FOR_SKIP_MIN_BYTES, 404);
    await write(h, big_off, big_v1);
    for (let i = 1; i < KSET_KEYS_MAX; i++) await write(h, i * BLOCK, pattern(BLOCK, 500 + i));
    await write(h, big_off, big_v2); // open kset: writeback may close it to use it
    const log = h.engine.ctx.log;
    const closes_before = log.closes(0);
    expect(await h.writeback.step()).toBe("progress");
    expect(log.closes(0)).toBe(closes_before + 1);
    expect(h.backing.bytes.subarray(big_off, big_off + CLOSE_FOR_SKIP_MIN_BYTES).every((b) => b === 0)).toBe(true);
    expect(backingAt(h, BLOCK)).toEqual(pattern(BLOCK, 501)); // the rest of the kset went
    expect(skippedBytes(h)).toBe(CLOSE_FOR_SKIP_MIN_BYTES);
    expect(await h.writeback.step()).toBe("progress");
    expect(h.backing.bytes.subarray(big_off, big_off + CLOSE_FOR_SKIP_MIN_BYTES)).toEqual(big_v2);
    log.stopTimers();
  });

  test("a FLUSH between the versions ends the epoch: the earlier version is written", async () => {
    const h = newHarness();
    await writeXAndCloseKset(h, v1, 1000);
    await h.engine.flush();
    await writeXAndCloseKset(h, v2, 2000);
    await expectFirstKsetWrittenWhole(h);
    h.engine.ctx.log.stopTimers();
  });

  test("a FUA write between the versions ends the epoch too", async () => {
    const h = newHarness();
    await writeXAndCloseKset(h, v1, 1000);
    await write(h, 8 * 1024 * 1024, pattern(BLOCK, 7), true); // another region, another kset
    await writeXAndCloseKset(h, v2, 2000);
    await expectFirstKsetWrittenWhole(h);
    h.engine.ctx.log.stopTimers();
  });

  test("after a restart the replayed keys carry no epoch: nothing of theirs is skipped", async () => {
    const backing = new MemoryBacking(64 * 1024 * 1024);
    const first = openHarness(freshCache(), backing);
    await writeXAndCloseKset(first, v1, 1000);
    await writeXAndCloseKset(first, v2, 2000);
    first.engine.ctx.log.stopTimers(); // a crash: open ksets are lost, closed ones replay
    const h = openHarness(first.dom, backing);
    await expectFirstKsetWrittenWhole(h);
    // New keys after the restart are in a known epoch again.
    await writeXAndCloseKset(h, v1, 3000);
    await writeXAndCloseKset(h, v2, 4000);
    for (let i = 0; i < 3; i++) await h.writeback.step();
    expect(backingAt(h, X)).toEqual(v2);
    expect(skippedBytes(h)).toBe(BLOCK);
    h.engine.ctx.log.stopTimers();
  });

  test("a version partly overwritten is written in the parts that are still its own", async () => {
    const h = newHarness();
    const big = pattern(4 * BLOCK, 303);
    await write(h, X, big);
    for (let i = 1; i < KSET_KEYS_MAX; i++) await write(h, 1024 * 1024 + i * BLOCK, pattern(BLOCK, 1000 + i));
    // Later keys of the epoch over blocks 1 and 3 of the four.
    await write(h, X + BLOCK, v2);
    await write(h, X + 3 * BLOCK, v1);
    for (let i = 3; i <= KSET_KEYS_MAX; i++) await write(h, 2 * 1024 * 1024 + i * BLOCK, pattern(BLOCK, 2000 + i));
    expect(await h.writeback.step()).toBe("progress");
    expect(backingAt(h, X)).toEqual(big.subarray(0, BLOCK));
    expect(backingAt(h, X + BLOCK)).toEqual(zeroes);
    expect(backingAt(h, X + 2 * BLOCK)).toEqual(big.subarray(2 * BLOCK, 3 * BLOCK));
    expect(backingAt(h, X + 3 * BLOCK)).toEqual(zeroes);
    expect(skippedBytes(h)).toBe(2 * BLOCK);
    h.engine.ctx.log.stopTimers();
  });
});

describe("flush epoch boundaries", () => {
  function ring(h: Harness): Array<[number, number, number]> {
    const s = h.engine.ctx.s;
    const out: Array<[number, number, number]> = [];
    for (let i = s.ctl[CTL_EPOCH_RING_TAIL]; i < s.ctl[CTL_EPOCH_RING_HEAD]; i++) {
      const at = (i % EPOCH_RING_ENTRIES) * EPOCH_RING_ENTRY_WORDS;
      out.push([s.epoch_ring[at], s.epoch_ring[at + 1], s.epoch_ring[at + 2]]);
    }
    return out;
  }

  test("boundaries are recorded in ticket order even when a later one finishes first", async () => {
    const h = newHarness();
    const epochs = h.engine.ctx.log.epochs;
    const start = ring(h);
    expect(start.length).toBe(1);
    expect(start[0][2]).toBe(1);
    const a = epochs.begin();
    const b = epochs.begin();
    expect(b).toBe(a + 1);
    expect(epochs.current()).toBe(b);
    let b_done = false;
    const pb = epochs.finish(b, true, 5_000).then(() => (b_done = true));
    await new Promise((r) => setTimeout(r, 20));
    expect(b_done).toBe(false); // waits for a
    await epochs.finish(a, true, 5_000);
    await pb;
    expect(ring(h).map((e) => e[2])).toEqual([1, a, b]);
    // The cursor meets them at key_head, where they were recorded.
    const s = h.engine.ctx.s;
    const cursor = new EpochCursor(s);
    expect(cursor.at(s.pos[POS_KEY_HEAD], s.pos[POS_KEY_HEAD + 1])).toBe(b);
    h.engine.ctx.log.stopTimers();
  });

  test("a failed close still hands the turn on, without recording a boundary", async () => {
    const h = newHarness();
    const epochs = h.engine.ctx.log.epochs;
    const a = epochs.begin();
    const b = epochs.begin();
    await epochs.finish(a, false, 5_000);
    await epochs.finish(b, true, 5_000);
    expect(ring(h).map((e) => e[2])).toEqual([1, b]);
    h.engine.ctx.log.stopTimers();
  });

  test("a ticket whose predecessor never finishes stops recording for good, and nothing hangs", async () => {
    const h = newHarness();
    const epochs = h.engine.ctx.log.epochs;
    epochs.begin(); // its thread "died"
    const b = epochs.begin();
    await epochs.finish(b, true, 50);
    expect(h.engine.ctx.s.ctl[CTL_EPOCH_RING_OFF]).toBe(1);
    await h.engine.flush(); // returns at once
    expect(ring(h).length).toBe(1);
    h.engine.ctx.log.stopTimers();
  });

  test("a full ring drops new boundaries; the cursor then keeps an older epoch (fewer skips only)", async () => {
    const h = newHarness();
    const s = h.engine.ctx.s;
    for (let i = 0; i < EPOCH_RING_ENTRIES + 10; i++) await h.engine.flush();
    expect(s.ctl[CTL_EPOCH_RING_HEAD] - s.ctl[CTL_EPOCH_RING_TAIL]).toBe(EPOCH_RING_ENTRIES);
    const cursor = new EpochCursor(s);
    lock(s.locks, LOCK_KEY_HEAD);
    const head = [s.pos[POS_KEY_HEAD], s.pos[POS_KEY_HEAD + 1]];
    unlock(s.locks, LOCK_KEY_HEAD);
    // All at the same key_head (no keys): the cursor takes every recorded one.
    const e = cursor.at(head[0], head[1]);
    expect(e).toBe(EPOCH_RING_ENTRIES); // epochs 1..4096 recorded, 4097..4106 dropped
    expect(e).toBeLessThan(h.engine.ctx.log.epochs.current());
    expect(new EpochCursor(s).at(head[0], head[1])).toBe(EPOCH_UNKNOWN);
    h.engine.ctx.log.stopTimers();
  });
});
