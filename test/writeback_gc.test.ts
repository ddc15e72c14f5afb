/**
 * Writeback and GC (issue 4), at engine level in one thread:
 *   - the backing device always equals the initial image with a prefix of the log applied, at
 *     kset granularity, except that inside the current flush epoch a block may still hold an
 *     earlier version of that epoch (writeback skips versions a later key of the epoch
 *     overwrote); at every flush boundary it is the prefix exactly; also across
 *     backing-device power cuts that drop unflushed writes;
 *   - key_tail <= dirty_tail <= key_head in log order, checked by every tail move;
 *   - gc_percent changes while serving, persisted with the replica rules;
 *   - with writeback paused a full cache makes writes wait (without spinning) until it resumes;
 *   - 8x the cache size of random writes completes and reads back, before and after a restart;
 *   - `pcache dump-ksets --from dirty-tail` after a clean drain shows an empty dirty log.
 *
 * Data is written in 4 KiB blocks that name the write they came from (write id and block number,
 * then pseudo-random words), so any block read back from the cache, the backing device or the log
 * says which write it holds, and a torn or misplaced block is caught.
 */
import { afterAll, describe, expect, test } from "bun:test";
import { closeSync, existsSync, ftruncateSync, mkdirSync, openSync, readFileSync, readSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { AssertionError } from "../core/assert.ts";
import { openCacheDevice } from "../core/device/cache_device.ts";
import { openBackingFile } from "../core/device/file_backing.ts";
import { MemoryBacking } from "../core/device/memory_backing.ts";
import { Engine } from "../core/engine/engine.ts";
import type { EngineContext } from "../core/engine/context.ts";
import {
  CTL_CACHE_FULL,
  CTL_GC_PERCENT,
  LOCK_CACHE_INFO,
  POS_DIRTY_TAIL,
  POS_KEY_HEAD,
  POS_KEY_TAIL,
  STAT_DEFERRED,
  STAT_GC_SEGS_FREED,
  WAIT_CONTROL,
  WAIT_GC_KICK,
  WAIT_KEY_TAIL,
  WAIT_SEG_FREED,
} from "../core/engine/shared_state.ts";
import { advanceTail, tailMoveProblem } from "../core/engine/tails.ts";
import { BackingIoError, PcacheError } from "../core/errors.ts";
import { cacheInfoFlags } from "../core/format/cache_info.ts";
import { CACHE_INFO_OFF, CACHE_INFO_STRIDE, KEY_F_CLEAN, KiB, MiB, GiB, SEG_DATA_SIZE } from "../core/format/constants.ts";
import { formatCache } from "../core/format/format_cache.ts";
import { loadCache } from "../core/format/load_cache.ts";
import { LogBuilder } from "../core/format/log_builder.ts";
import { persistTail } from "../core/format/meta.ts";
import { Gc } from "../core/gc/gc.ts";
import { type CachePos, posEqual } from "../core/log/position.ts";
import { walkLog } from "../core/log/walk.ts";
import type { PersistDomain } from "../core/persist/domain.ts";
import { makeRng } from "../core/persist/sim.ts";
import { boundLockWaits, LOCK_HELD, unlock } from "../core/sync/lock.ts";
import { waitUntilAsync } from "../core/sync/wait_word.ts";
import { dedupeKset } from "../core/writeback/dedupe.ts";
import { CLOSE_FOR_SKIP_MIN_BYTES, setWritebackPaused, Writeback } from "../core/writeback/writeback.ts";
import {
  closeWithLoops,
  drainWithLoops,
  drainWriteback,
  freshCache,
  type Harness,
  openHarness,
  startLoops,
  withLoops,
} from "./helpers/engine_harness.ts";

const BIN = join(import.meta.dir, "..", "dist", "pcache");
// tmpfs when there is one: the 8x workload writes 4 GiB through these files.
const dir = join(existsSync("/dev/shm") ? "/dev/shm" : tmpdir(), `pcache-wbgc-${process.pid}`);
mkdirSync(dir, { recursive: true });
afterAll(() => rmSync(dir, { recursive: true, force: true }));

// ---- self-describing blocks ----

const BLOCK_BYTES = 4096;
const BLOCK_WORDS = BLOCK_BYTES / 4;
/** Block ids: >= 1 a write, 0 the initial image, ZERO_ID all zeroes, GARBAGE_ID anything else. */
const ZERO_ID = -1;
const GARBAGE_ID = -2;

/** Block `block` as write `id` leaves it: the id and block number, then pseudo-random words. */
function fillBlock(dst: Uint32Array, at: number, id: number, block: number): void {
  dst[at] = id;
  dst[at + 1] = block;
  let x = (Math.imul(id + 0x3c6ef372, 0x9e3779b1) ^ Math.imul(block + 1, 0x85ebca6b)) | 0 || 1;
  for (let i = 2; i < BLOCK_WORDS; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    dst[at + i] = x;
  }
}

function blocksOf(id: number, first_block: number, n_blocks: number): Uint8Array {
  const words = new Uint32Array(n_blocks * BLOCK_WORDS);
  for (let b = 0; b < n_blocks; b++) fillBlock(words, b * BLOCK_WORDS, id, first_block + b);
  return new Uint8Array(words.buffer);
}

const scratch = new Uint32Array(BLOCK_WORDS);

/** Which write block `block` holds, judged from all of its bytes. */
function blockIdAt(words: Uint32Array, at: number, block: number): number {
  let zero = true;
  for (let i = 0; i < BLOCK_WORDS && zero; i++) zero = words[at + i] === 0;
  if (zero) return ZERO_ID;
  fillBlock(scratch, 0, words[at], block);
  for (let i = 0; i < BLOCK_WORDS; i++) if (words[at + i] !== scratch[i]) return GARBAGE_ID;
  return words[at];
}

/** Block ids of bytes that start at block first_block (a whole number of blocks). */
function blockIds(bytes: Uint8Array, first_block: number): Int32Array {
  const words = new Uint32Array(bytes.buffer, bytes.byteOffset, bytes.length / 4);
  const ids = new Int32Array(bytes.length / BLOCK_BYTES);
  for (let b = 0; b < ids.length; b++) ids[b] = blockIdAt(words, b * BLOCK_WORDS, first_block + b);
  return ids;
}

/** First block where got and want differ, as a message, or null. */
function idsDiffer(got: Int32Array, want: Int32Array, first_block = 0): string | null {
  for (let b = 0; b < want.length; b++) {
    if (got[b] !== want[b]) return `block ${first_block + b}: holds ${got[b]}, expected ${want[b]}`;
  }
  return null;
}

/** The bytes of an image given as block ids, kept up to date block by block. */
class ExpectedBytes {
  readonly bytes: Uint8Array;
  private readonly words: Uint32Array;
  private readonly ids: Int32Array;

  constructor(ids: Int32Array) {
    this.ids = ids.slice();
    this.bytes = new Uint8Array(ids.length * BLOCK_BYTES);
    this.words = new Uint32Array(this.bytes.buffer);
    for (let b = 0; b < ids.length; b++) this.put(b, ids[b]);
  }

  /** Same bytes as `got` once moved to image `ids` (a memcmp, so every byte is checked). */
  equals(got: Uint8Array, ids: Int32Array): boolean {
    for (let b = 0; b < ids.length; b++) if (ids[b] !== this.ids[b]) this.put(b, ids[b]);
    return Buffer.from(got.buffer, got.byteOffset, got.length).equals(Buffer.from(this.bytes.buffer));
  }

  private put(b: number, id: number): void {
    this.ids[b] = id;
    if (id === ZERO_ID) this.words.fill(0, b * BLOCK_WORDS, (b + 1) * BLOCK_WORDS);
    else fillBlock(this.words, b * BLOCK_WORDS, id, b);
  }
}

function tails(ctx: EngineContext): { key_tail: CachePos; dirty_tail: CachePos; key_head: CachePos } {
  const p = ctx.s.pos;
  return {
    key_tail: { cache_seg_id: p[POS_KEY_TAIL], seg_off: p[POS_KEY_TAIL + 1] },
    dirty_tail: { cache_seg_id: p[POS_DIRTY_TAIL], seg_off: p[POS_DIRTY_TAIL + 1] },
    key_head: { cache_seg_id: p[POS_KEY_HEAD], seg_off: p[POS_KEY_HEAD + 1] },
  };
}

/** key_tail <= dirty_tail <= key_head, judged by walking the log (its LAST chain) from key_tail. */
function expectTailsOrdered(engine: Engine): void {
  const t = tails(engine.ctx);
  let dirty_seen = false;
  const meta = { ...engine.meta, seg_gens: engine.ctx.s.seg_gens };
  const walk = walkLog(engine.ctx.media.dom, meta, t.key_tail, {}, (k) => {
    if (posEqual(k.pos, t.dirty_tail)) dirty_seen = true;
    return true;
  });
  expect(walk.end_pos).toEqual(t.key_head);
  expect(dirty_seen || posEqual(t.dirty_tail, t.key_head)).toBe(true);
}

// ---- backing device = initial image + a prefix of the log ----

/** What the workload wrote: the range of every write id, and the current image (ids per block). */
class Model {
  readonly first: number[] = [0];
  readonly count: number[] = [0];
  constructor(readonly image: Int32Array) {}

  write(first_block: number, n_blocks: number): number {
    this.first.push(first_block);
    this.count.push(n_blocks);
    this.image.fill(this.first.length - 1, first_block, first_block + n_blocks);
    return this.first.length - 1;
  }

  covers(id: number, block: number): boolean {
    return id >= 1 && id < this.first.length && block >= this.first[id] && block < this.first[id] + this.count[id];
  }
}

/**
 * The log as the test sees it: every kset from the first dirty_tail on, taken in (sync) before
 * writeback or GC can pass it, and the image each prefix of ksets gives the backing device.
 */
class LogPrefixes {
  /** images[i]: the initial image with the first i normal ksets applied. */
  readonly images: Int32Array[];
  /** Extents writeback sends for each normal kset. */
  readonly extents: number[] = [];
  private readonly before = new Map<string, number>();
  private cursor: CachePos;

  constructor(
    private readonly dom: PersistDomain,
    start: CachePos,
    initial: Int32Array,
    private readonly model: Model,
  ) {
    this.cursor = start;
    this.images = [initial.slice()];
  }

  get ksets(): number {
    return this.images.length - 1;
  }

  sync(engine: Engine): void {
    const meta = { ...engine.meta, seg_gens: engine.ctx.s.seg_gens };
    const walk = walkLog(this.dom, meta, this.cursor, {}, (k) => {
      this.before.set(`${k.pos.cache_seg_id}:${k.pos.seg_off}`, this.ksets);
      if (!k.last) this.apply(engine, k.keys);
      return true;
    });
    expect(walk.end_pos).toEqual(tails(engine.ctx).key_head);
    this.cursor = walk.end_pos;
  }

  /** Normal ksets before pos (a kset position or the end of the log). */
  indexOf(pos: CachePos): number {
    if (posEqual(pos, this.cursor)) return this.ksets;
    const i = this.before.get(`${pos.cache_seg_id}:${pos.seg_off}`);
    if (i === undefined) throw new Error(`position ${pos.cache_seg_id}:${pos.seg_off} is not a kset of the log`);
    return i;
  }

  private apply(engine: Engine, keys: Parameters<typeof dedupeKset>[0]): void {
    const img = this.images[this.ksets].slice();
    for (const k of keys) {
      expect(k.off % BLOCK_BYTES === 0 && k.len % BLOCK_BYTES === 0 && k.cache_seg_off % BLOCK_BYTES === 0).toBe(true);
      // Writeback skips CLEAN keys: they hold what the backing device had.
      if ((k.flags & KEY_F_CLEAN) !== 0) continue;
      const ids = blockIds(this.dom.view(engine.ctx.media.dataOff(k.cache_seg_id, k.cache_seg_off), k.len), k.off / BLOCK_BYTES);
      for (let i = 0; i < ids.length; i++) {
        const block = k.off / BLOCK_BYTES + i;
        // A dirty key holds zeroes or a write that covered this block, nothing else.
        if (ids[i] !== ZERO_ID && !this.model.covers(ids[i], block)) throw new Error(`log key at block ${block} holds ${ids[i]}`);
        img[block] = ids[i];
      }
    }
    this.images.push(img);
    this.extents.push(dedupeKset(keys).filter((e) => (e.flags & KEY_F_CLEAN) === 0).length);
  }
}

/** A memory backing device whose power can be cut after a number of writes and flushes. */
class PowerCutBacking extends MemoryBacking {
  ops_left = Number.POSITIVE_INFINITY;

  private tick(): void {
    if (this.ops_left <= 0) throw new BackingIoError("backing device: power cut", 5);
    this.ops_left--;
  }

  override async write(off: number, src: Uint8Array): Promise<void> {
    this.tick();
    await super.write(off, src);
  }

  override async writeZeroes(off: number, len: number): Promise<void> {
    this.tick();
    await super.writeZeroes(off, len);
  }

  override async flush(): Promise<void> {
    this.tick();
    await super.flush();
  }
}

const settle = () => new Promise<void>((resolve) => setImmediate(resolve));

describe("backing device = initial image + a prefix of the log", () => {
  const BACKING = 16 * MiB;
  const N_BLOCKS = BACKING / BLOCK_BYTES;

  async function runSeed(seed: number): Promise<{ snapshots: number; cuts: number; skipped_seen: boolean; early_closes: number }> {
    const rng = makeRng(seed);
    const initial = new Int32Array(N_BLOCKS);
    const backing = new PowerCutBacking(BACKING, { bytes: blocksOf(0, 0, N_BLOCKS) });
    let h: Harness = openHarness(freshCache({ seed, gc_percent: 0 }), backing);
    const model = new Model(initial.slice());
    const log = new LogPrefixes(h.dom, tails(h.engine.ctx).dirty_tail, initial, model);
    let floor = 0; // prefixes seen so far never go back
    let snapshots = 0;
    let cuts = 0;
    let skipped_seen = false;
    let early_closes = 0; // of the harnesses replaced by restarts
    /** Flush boundaries as kset counts (prefix indexes), ascending. */
    const boundaries: number[] = [0];
    const boundary = () => {
      const head = tails(h.engine.ctx).key_head; // before any timer can close another kset
      log.sync(h.engine);
      const i = log.indexOf(head);
      if (i > boundaries[boundaries.length - 1]) boundaries.push(i);
    };
    const flush = async () => {
      await h.engine.flush();
      boundary();
    };
    /** Prefix index where the flush epoch holding prefix d's last kset began. */
    const epochStart = (d: number) => {
      let e = 0;
      for (const b of boundaries) if (b <= d) e = b;
      return e;
    };

    const expected = new ExpectedBytes(initial);
    /** Every block as some prefix in [lo, hi] left it. */
    const blocksWithin = (lo: number, hi: number, what: string) => {
      const got = blockIds(backing.bytes, 0);
      for (let b = 0; b < N_BLOCKS; b++) {
        let ok = false;
        for (let j = lo; j <= hi && !ok; j++) ok = got[b] === log.images[j][b];
        if (!ok) {
          const where = log.images.map((img, j) => (img[b] === got[b] ? j : -1)).filter((j) => j >= 0);
          throw new Error(`seed ${seed}: ${what}: block ${b} holds ${got[b]}, not as any prefix ${lo}..${hi} left it (prefixes with it: ${where.slice(0, 5)}; boundaries ${boundaries.slice(-6)}; ${[lo - 1, lo, hi].map((j) => log.images[j]?.[b])})`);
        }
      }
    };
    const snapshot = () => {
      log.sync(h.engine); // ksets writeback closed early (closeForSkips)
      const d = log.indexOf(tails(h.engine.ctx).dirty_tail);
      expect(d).toBeGreaterThanOrEqual(floor);
      if (!expected.equals(backing.bytes, log.images[d])) {
        // Allowed only inside a flush epoch, and never at its boundary.
        const e = epochStart(d);
        if (e === d) {
          const problem = idsDiffer(blockIds(backing.bytes, 0), log.images[d]) ?? "torn bytes";
          throw new Error(`seed ${seed}: backing is not prefix ${d} of ${log.ksets} at a flush boundary: ${problem}`);
        }
        blocksWithin(e, d, `prefix ${d}, epoch from ${e}`);
        skipped_seen = true;
      }
      floor = d;
      snapshots++;
      expectTailsOrdered(h.engine);
    };

    const restart = () => {
      early_closes += h.writeback.early_closes;
      h.engine.ctx.log.stopTimers();
      h = openHarness(h.dom, backing);
      boundary(); // the engine starts a new epoch at key_head
    };

    /** Cut power between two ksets of writeback: nothing is unflushed, the prefix stays whole. */
    const powerCutBetween = async () => {
      await flush();
      backing.crash(seed * 31 + cuts);
      cuts++;
      restart();
      snapshot();
    };

    /** Cut power in the middle of writing back a kset, drop unflushed writes, restart. */
    const powerCut = async () => {
      await flush();
      const d = log.indexOf(tails(h.engine.ctx).dirty_tail);
      if (d === log.ksets) return powerCutBetween();
      backing.ops_left = Math.floor(rng() * (log.extents[d] + 1)); // a write, or the flush after them
      // Skipped versions need no write, so the cut may come in a later kset than d.
      let r = "progress";
      for (let i = 0; i < log.ksets - d + 4 && r === "progress"; i++) r = await h.writeback.step();
      await settle();
      backing.crash(seed * 31 + cuts);
      cuts++;
      backing.ops_left = Number.POSITIVE_INFINITY;
      if (r === "idle") return snapshot(); // every op the cut allowed was enough
      expect(r).toBe("error");
      const cut = log.indexOf(loadCache(h.dom).dirty_tail);
      expect(cut).toBeGreaterThanOrEqual(d);
      // Torn inside kset `cut` at most: every block is as a prefix of its flush epoch up to cut + 1 left it.
      blocksWithin(epochStart(cut), cut + 1, "after a power cut");
      restart();
      // The restarted writeback writes kset `cut` again, whole.
      for (let i = 0; i < 4 && log.indexOf(tails(h.engine.ctx).dirty_tail) === cut; i++) expect(await h.writeback.step()).toBe("progress");
      snapshot();
      expect(floor).toBe(cut + 1);
    };

    for (let op = 0; op < 400; op++) {
      const r = rng();
      const n_blocks = 1 + Math.floor(rng() * (rng() < 0.1 ? 256 : 24));
      const first = Math.floor(rng() * (N_BLOCKS - n_blocks));
      if (r < 0.03) {
        // A burst of small overwrites in one 4 MiB region: its kset fills and closes inside the
        // flush epoch, so later ksets of the epoch overwrite keys of earlier ones.
        const base = Math.floor(first / 1024) * 1024;
        for (let i = 0; i < 160; i++) {
          const block = base + Math.floor(rng() * 24);
          const id = model.write(block, 1);
          await h.engine.write(block * BLOCK_BYTES, blocksOf(id, block, 1), false);
        }
      } else if (r < 0.06) {
        // 1 MiB written twice, its kset closed in between as its timer would (no boundary): the
        // second copy sits in an open kset, which writeback may close early to leave the first
        // out (Writeback.closeForSkips).
        const big = CLOSE_FOR_SKIP_MIN_BYTES / BLOCK_BYTES;
        const at = Math.floor(first / big) * big;
        for (let i = 0; i < 2; i++) {
          const id = model.write(at, big);
          await h.engine.write(at * BLOCK_BYTES, blocksOf(id, at, big), false);
          if (i === 0) await h.engine.ctx.log.closeWaiting(h.engine.ctx.log.ksetIdOf(at * BLOCK_BYTES), 1000);
        }
      } else if (r < 0.5) {
        const id = model.write(first, n_blocks);
        const fua = rng() < 0.1;
        await h.engine.write(first * BLOCK_BYTES, blocksOf(id, first, n_blocks), fua);
        if (fua) boundary();
      } else if (r < 0.57) {
        await h.engine.writeZeroes(first * BLOCK_BYTES, n_blocks * BLOCK_BYTES, { fua: false });
        model.image.fill(ZERO_ID, first, first + n_blocks);
      } else if (r < 0.7) {
        const got = new Uint8Array(n_blocks * BLOCK_BYTES);
        await h.engine.read(first * BLOCK_BYTES, got.length, got);
        const problem = idsDiffer(blockIds(got, first), model.image.subarray(first, first + n_blocks), first);
        if (problem !== null) throw new Error(`seed ${seed} op ${op}: read ${problem}`);
      } else if (r < 0.77) {
        await flush();
      } else if (r < 0.97) {
        log.sync(h.engine);
        const steps = 1 + Math.floor(rng() * 4);
        for (let i = 0; i < steps; i++) {
          if ((await h.writeback.step()) !== "progress") break;
          snapshot();
        }
        if (rng() < 0.5) h.gc.collect();
      } else if (rng() < 0.3) {
        await powerCutBetween();
      } else {
        await powerCut();
      }
    }
    await flush();
    // The whole log gives the model's image; writing it all back gets the backing device there.
    expect(idsDiffer(log.images[log.ksets], model.image)).toBe(null);
    await drainWriteback(h);
    snapshot();
    expect(floor).toBe(log.ksets);
    h.gc.collect();
    expectTailsOrdered(h.engine);
    h.engine.ctx.log.stopTimers();
    return { snapshots, cuts, skipped_seen, early_closes: early_closes + h.writeback.early_closes };
  }

  test("every snapshot after a writeback step is the prefix up to dirty_tail, never going back; power cuts tear at most one kset", async () => {
    let snapshots = 0;
    let cuts = 0;
    let skipped_seen = 0;
    let early_closes = 0;
    for (const seed of [1, 2, 3]) {
      const r = await runSeed(seed);
      snapshots += r.snapshots;
      cuts += r.cuts;
      if (r.skipped_seen) skipped_seen++;
      early_closes += r.early_closes;
    }
    // The checks above ran often enough to mean something, skipped versions included.
    expect(snapshots).toBeGreaterThan(100);
    expect(cuts).toBeGreaterThan(3);
    expect(skipped_seen).toBeGreaterThan(0);
    expect(early_closes).toBeGreaterThan(0);
  }, 120_000);
});

// ---- key_tail <= dirty_tail <= key_head ----

describe("tail order", () => {
  const pos = (cache_seg_id: number, seg_off: number): CachePos => ({ cache_seg_id, seg_off });

  test("the move rule: one kset at a time, through LAST ksets, never past what is ahead", () => {
    const normal = { kind: "normal", size_bytes: 104 } as const;
    const last = { kind: "last", next_cache_seg_id: 2 } as const;
    // Within a segment: exactly the kset's size, and not past what is ahead there.
    expect(tailMoveProblem(pos(5, 0), pos(5, 104), normal, pos(5, 104))).toBe(null);
    expect(tailMoveProblem(pos(5, 0), pos(5, 104), normal, pos(2, 0))).toBe(null);
    expect(tailMoveProblem(pos(5, 0), pos(5, 104), normal, pos(5, 64))).toMatch(/passes 5:64/);
    expect(tailMoveProblem(pos(5, 0), pos(5, 208), normal, pos(2, 0))).toMatch(/104 bytes long/);
    expect(tailMoveProblem(pos(5, 104), pos(5, 0), normal, pos(2, 0))).toMatch(/104 bytes long/);
    // Across segments: only where the LAST kset leads, even to a lower segment id.
    expect(tailMoveProblem(pos(5, 4096), pos(2, 0), last, pos(2, 4096))).toBe(null);
    expect(tailMoveProblem(pos(5, 4096), pos(3, 0), last, pos(3, 0))).toMatch(/leads to 2:0/);
    expect(tailMoveProblem(pos(5, 4096), pos(2, 64), last, pos(2, 4096))).toMatch(/leads to 2:0/);
    expect(tailMoveProblem(pos(5, 4096), pos(2, 0), last, pos(5, 4096))).toMatch(/passes 5:4096/);
    expect(tailMoveProblem(pos(5, 4096), pos(5, 4200), { kind: "none" }, pos(2, 0))).toMatch(/no kset at 5:4096/);
  });

  test("advanceTail refuses moves that break the order and persists nothing", async () => {
    // Log: segment 0 -> LAST -> 7 -> LAST -> 3 (ids go down), data in segment 10.
    const dom = freshCache({ gc_percent: 0 });
    const meta = loadCache(dom);
    const b = new LogBuilder(dom, meta);
    const data = blocksOf(1, 0, 1);
    const a = b.appendKset([{ off: 0, cache_seg_id: 10, cache_seg_off: 0, data }]);
    b.appendLast(7);
    const c = b.appendKset([{ off: 0, cache_seg_id: 10, cache_seg_off: 0, data }]);
    b.appendLast(3);
    b.appendKset([{ off: 0, cache_seg_id: 10, cache_seg_off: 0, data }]);
    const h = openHarness(dom, new MemoryBacking(16 * MiB));
    const ctx = h.engine.ctx;
    const refused = (which: "key_tail" | "dirty_tail", to: CachePos) => {
      const before = loadCache(h.dom);
      expect(() => advanceTail(ctx, which, to)).toThrow(AssertionError);
      expect(loadCache(h.dom)[which]).toEqual(before[which]);
    };
    refused("key_tail", pos(0, 64)); // past dirty_tail (both at 0:0)
    refused("dirty_tail", pos(0, 32)); // not the size of the kset it stands on
    expect(await h.writeback.step()).toBe("progress"); // dirty_tail 0:64, the LAST kset
    refused("dirty_tail", pos(3, 0)); // that LAST kset leads to 7, not 3
    expect(await h.writeback.step()).toBe("progress");
    expect(tails(ctx).dirty_tail).toEqual(pos(7, 0));
    expect(h.gc.step()).toBe("progress");
    expect(h.gc.step()).toBe("progress"); // through the LAST kset: key_tail 7:0 = dirty_tail
    expect(tails(ctx).key_tail).toEqual(pos(7, 0));
    refused("key_tail", pos(7, 64)); // past dirty_tail (both at 7:0)
    await drainWriteback(h);
    expect(tails(ctx).dirty_tail).toEqual(pos(3, 64));
    refused("dirty_tail", pos(3, 128)); // at key_head: no kset to step over
    for (let i = 0; i < 8 && h.gc.step() === "progress"; i++);
    expect(tails(ctx).key_tail).toEqual(tails(ctx).key_head);
    expect(a).toEqual(pos(0, 0));
    expect(c).toEqual(pos(7, 0));
    expectTailsOrdered(h.engine);
    h.engine.ctx.log.stopTimers();
  });
});

describe("tail order with a real log roll", () => {
  test("writeback and GC loops follow the log into a lower-numbered segment and free the old one", async () => {
    // An empty log near the end of segment 5: what GC leaves once it reclaimed everything before.
    const dom = freshCache({ gc_percent: 0 });
    const meta = loadCache(dom);
    const start = { cache_seg_id: 5, seg_off: SEG_DATA_SIZE - 48 * KiB };
    persistTail(dom, "dirty_tail", start, meta.dirty_tail);
    persistTail(dom, "key_tail", start, meta.key_tail);
    const BACKING = 32 * MiB;
    const N_BLOCKS = BACKING / BLOCK_BYTES;
    const backing = new MemoryBacking(BACKING);
    let h = openHarness(dom, backing, { limits: { space_wait_ms: 30_000 } });
    expect(tails(h.engine.ctx).key_head).toEqual(start);
    let loops = startLoops(h.writeback, h.gc);
    const model = new Model(new Int32Array(N_BLOCKS).fill(ZERO_ID));
    const rng = makeRng(5);
    // 48 KiB of log is about ten full ksets; write until the log has rolled and moved on a bit.
    let rolled_at = -1;
    for (let i = 0; i < 20_000 && (rolled_at < 0 || i < rolled_at + 300); i++) {
      const first = Math.floor(rng() * N_BLOCKS);
      const id = model.write(first, 1);
      await withLoops(loops, h.engine.write(first * BLOCK_BYTES, blocksOf(id, first, 1), false));
      if (rolled_at < 0 && tails(h.engine.ctx).key_head.cache_seg_id !== 5) rolled_at = i;
      if (i % 64 === 0) await settle(); // let the loops run, as worker threads would
      if (i === 600 || (rolled_at > 0 && i === rolled_at + 100)) {
        // Restarts before and after the roll: replay walks the same chain.
        await closeWithLoops(h.engine, loops);
        h = openHarness(dom, backing, { limits: { space_wait_ms: 30_000 } });
        loops = startLoops(h.writeback, h.gc);
        expectTailsOrdered(h.engine);
      }
    }
    expect(rolled_at).toBeGreaterThan(0);
    const ctx = h.engine.ctx;
    expect(await drainWithLoops(h.engine, loops, 30_000)).toBe(true);
    // gc_percent 0: GC follows writeback through the LAST kset and frees segment 5.
    const head = () => tails(ctx).key_head;
    const reclaimed = () => posEqual(tails(ctx).key_tail, head());
    expect(await withLoops(loops, waitUntilAsync(ctx.s.waits, WAIT_KEY_TAIL, reclaimed, 30_000))).toBe(true);
    expect(head().cache_seg_id).toBeLessThan(5);
    expect(ctx.segs.isUsed(5)).toBe(false);
    expectTailsOrdered(h.engine);
    const got = new Uint8Array(BACKING);
    await h.engine.read(0, BACKING, got);
    expect(idsDiffer(blockIds(got, 0), model.image)).toBe(null);
    expect(idsDiffer(blockIds(backing.bytes, 0), model.image)).toBe(null);
    await closeWithLoops(h.engine, loops);
  }, 60_000);
});

// ---- gc_percent ----

describe("gc_percent while serving", () => {
  test("persisted in cache_info with the replica rules, kept over a restart; a torn newest copy falls back", () => {
    const dom = freshCache({ data_crc: true });
    const backing = new MemoryBacking(16 * MiB);
    const h = openHarness(dom, backing, { nodes_max: 65_536 });
    const m0 = loadCache(dom);
    expect(m0.cache_info).toMatchObject({ slot: 1, seq: 1 });
    expect(m0.gc_percent).toBe(70);
    const kicks = Atomics.load(h.engine.ctx.s.waits, WAIT_GC_KICK);
    const controls = Atomics.load(h.engine.ctx.s.waits, WAIT_CONTROL);
    h.engine.setGcPercent(33);
    // GC and the control waiters are woken.
    expect(Atomics.load(h.engine.ctx.s.waits, WAIT_GC_KICK)).toBe(kicks + 1);
    expect(Atomics.load(h.engine.ctx.s.waits, WAIT_CONTROL)).toBe(controls + 1);
    expect(h.engine.ctx.s.ctl[CTL_GC_PERCENT]).toBe(33);
    const m1 = loadCache(dom);
    // Written to the slot that did not hold the latest copy, with seq + 1; the old copy stays.
    expect(m1.cache_info).toMatchObject({ slot: 0, seq: 2 });
    expect(m1.gc_percent).toBe(33);
    const slot1 = dom.view(CACHE_INFO_OFF + CACHE_INFO_STRIDE, 24);
    expect(cacheInfoFlags(new DataView(slot1.buffer, slot1.byteOffset, 24).getUint32(16, true)).gc_percent).toBe(70);
    // Everything else in cache_info is kept.
    expect({ ...m1.cache_info.value, flags: 0 }).toEqual({ ...m0.cache_info.value, flags: 0 });
    expect({ ...cacheInfoFlags(m1.cache_info.value.flags), gc_percent: 0 }).toEqual({ ...cacheInfoFlags(m0.cache_info.value.flags), gc_percent: 0 });
    expect(m1.data_crc).toBe(true);
    h.engine.setGcPercent(44);
    expect(loadCache(dom).cache_info).toMatchObject({ slot: 1, seq: 3 });
    h.engine.ctx.log.stopTimers();

    const h2 = openHarness(dom, backing, { nodes_max: 65_536 });
    expect(h2.engine.meta.gc_percent).toBe(44);
    expect(h2.engine.ctx.s.ctl[CTL_GC_PERCENT]).toBe(44);
    // The restarted engine continues the replica sequence from what it loaded.
    h2.engine.setGcPercent(55);
    expect(loadCache(dom)).toMatchObject({ gc_percent: 55, cache_info: { slot: 0, seq: 4 } });
    // A torn write of the newest copy (slot 0): the previous value comes back.
    const at = CACHE_INFO_OFF + 20;
    dom.write(at, new Uint8Array([dom.view(at, 1)[0] ^ 0xff]));
    expect(loadCache(dom)).toMatchObject({ gc_percent: 44, cache_info: { slot: 1, seq: 3 } });
    h2.engine.ctx.log.stopTimers();
  });

  test("a cache_info lock held by a dead worker: a bounded caller gets a clear error, nothing changes, and it works once freed", () => {
    const dom = freshCache();
    const h = openHarness(dom, new MemoryBacking(16 * MiB), { nodes_max: 65_536 });
    const locks = h.engine.ctx.s.locks;
    locks[LOCK_CACHE_INFO] = LOCK_HELD;
    boundLockWaits(30);
    try {
      expect(() => h.engine.setGcPercent(20)).toThrow(/stayed held for 30 ms; did a worker fail\?/);
      expect(h.engine.ctx.s.ctl[CTL_GC_PERCENT]).toBe(70);
      expect(loadCache(dom).gc_percent).toBe(70);
      unlock(locks, LOCK_CACHE_INFO);
      h.engine.setGcPercent(20);
      expect(loadCache(dom).gc_percent).toBe(20);
    } finally {
      boundLockWaits(Infinity);
      h.engine.ctx.log.stopTimers();
    }
  });

  test("values outside 0..90 are refused with one line and change nothing", () => {
    const h = openHarness(freshCache({ gc_percent: 70 }), new MemoryBacking(16 * MiB), { nodes_max: 65_536 });
    const before = loadCache(h.dom).cache_info;
    for (const bad of [-1, 91, 127, 128, 50.5, Number.NaN, Number.POSITIVE_INFINITY]) {
      let err: unknown;
      try {
        h.engine.setGcPercent(bad);
      } catch (e) {
        err = e;
      }
      expect(err).toBeInstanceOf(PcacheError);
      expect((err as Error).message).toBe(`gc_percent must be a whole number from 0 to 90, not ${bad}`);
    }
    expect(loadCache(h.dom).cache_info).toEqual(before);
    expect(h.engine.ctx.s.ctl[CTL_GC_PERCENT]).toBe(70);
    for (const ok of [0, 90]) h.engine.setGcPercent(ok);
    expect(loadCache(h.dom).gc_percent).toBe(90);
    h.engine.ctx.log.stopTimers();
  });

  test("lowering gc_percent to 0 makes the GC loop free segments it left alone at 90", async () => {
    const BACKING = 256 * MiB;
    const backing = new MemoryBacking(BACKING);
    const h = openHarness(freshCache({ gc_percent: 90 }), backing, { nodes_max: 65_536 });
    const ctx = h.engine.ctx;
    for (let off = 0; off < 192 * MiB; off += 4 * MiB) {
      await h.engine.write(off, blocksOf(off / MiB + 1, off / BLOCK_BYTES, 4 * MiB / BLOCK_BYTES), false);
    }
    await h.engine.flush();
    await drainWriteback(h);
    // 12+ of 31 segments used, under 90%: nothing to collect although everything is written back.
    const used = ctx.segs.used();
    expect(used).toBeGreaterThan(12);
    expect(h.gc.collect()).toBe(0);
    expect(ctx.segs.used()).toBe(used);
    const loops = startLoops(h.writeback, h.gc);
    await settle();
    expect(ctx.segs.used()).toBe(used);
    h.engine.setGcPercent(0);
    const freed = await withLoops(loops, waitUntilAsync(ctx.s.waits, WAIT_SEG_FREED, () => ctx.segs.used() <= 3, 30_000));
    expect(freed).toBe(true);
    expect(ctx.s.statTotal(STAT_GC_SEGS_FREED)).toBeGreaterThanOrEqual(used - 3);
    // Reads now come from the backing device, and still return the data.
    const got = new Uint8Array(4 * MiB);
    await h.engine.read(100 * MiB, got.length, got);
    expect(idsDiffer(blockIds(got, (100 * MiB) / BLOCK_BYTES), new Int32Array(1024).fill(101))).toBe(null);
    await closeWithLoops(h.engine, loops);
  }, 60_000);
});

// ---- cache full ----

/** CPU time of the calling thread (user + system) in ms, from /proc (10 ms ticks). */
function threadCpuMs(): number {
  const stat = readFileSync("/proc/thread-self/stat", "utf8");
  // Fields after the ")" that closes the command name: state is field 3, utime 14, stime 15.
  const f = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return (Number(f[11]) + Number(f[12])) * 10;
}

describe("cache full", () => {
  test("with writeback paused, writes wait without spinning and all complete once it resumes", async () => {
    const BACKING = 576 * MiB; // more than the cache holds
    const N_BLOCKS = BACKING / BLOCK_BYTES;
    const CHUNK_BLOCKS = 256;
    const backing = new MemoryBacking(BACKING);
    const h = openHarness(freshCache(), backing, { nodes_max: 65_536, limits: { space_wait_ms: 120_000 } });
    const s = h.engine.ctx.s;
    const loops = startLoops(h.writeback, h.gc);
    setWritebackPaused(s, true);
    let acked_blocks = 0;
    const errors: unknown[] = [];
    const writer = async (w: number) => {
      const per = N_BLOCKS / 4;
      for (let b = w * per; b < (w + 1) * per; b += CHUNK_BLOCKS) {
        await h.engine.write(b * BLOCK_BYTES, blocksOf(b + 1, b, CHUNK_BLOCKS), false);
        acked_blocks += CHUNK_BLOCKS;
      }
    };
    const writers = withLoops(loops, Promise.all([0, 1, 2, 3].map((w) => writer(w).catch((e) => errors.push(e)))));
    // Wait until the writers are stuck on a full cache.
    let last = -1;
    for (let i = 0; i < 600 && !(Atomics.load(s.ctl, CTL_CACHE_FULL) === 1 && acked_blocks === last); i++) {
      last = acked_blocks;
      await Bun.sleep(100);
    }
    expect(Atomics.load(s.ctl, CTL_CACHE_FULL)).toBe(1);
    expect(acked_blocks).toBeLessThan(N_BLOCKS);
    Bun.gc(true); // the writes left garbage; collecting it is not waiting
    // This thread's CPU only (the waiting writers run here): the process total also counts the
    // runtime's own threads and whatever earlier test files left running.
    const cpu0_ms = threadCpuMs();
    const t0 = performance.now();
    await Bun.sleep(2000);
    const cpu_ms = threadCpuMs() - cpu0_ms;
    const wall_ms = performance.now() - t0;
    // Nothing completes or fails while paused, and waiting costs next to no CPU.
    expect(acked_blocks).toBe(last);
    expect(errors).toEqual([]);
    expect(cpu_ms / wall_ms).toBeLessThan(0.05);
    setWritebackPaused(s, false);
    await writers;
    expect(errors).toEqual([]);
    expect(acked_blocks).toBe(N_BLOCKS);
    expect(s.statTotal(STAT_DEFERRED)).toBeGreaterThan(0);
    const want = new Int32Array(N_BLOCKS);
    for (let b = 0; b < N_BLOCKS; b++) want[b] = b - (b % CHUNK_BLOCKS) + 1;
    const got = new Uint8Array(64 * MiB);
    for (let off = 0; off < BACKING; off += got.length) {
      await h.engine.read(off, got.length, got);
      const first = off / BLOCK_BYTES;
      expect(idsDiffer(blockIds(got, first), want.subarray(first, first + got.length / BLOCK_BYTES), first)).toBe(null);
    }
    expect(await drainWithLoops(h.engine, loops, 60_000)).toBe(true);
    expect(idsDiffer(blockIds(backing.bytes, 0), want)).toBe(null);
    await closeWithLoops(h.engine, loops);
  }, 180_000);
});

// ---- 8x the cache size ----

describe("8x the cache size of random writes", () => {
  const CACHE = 512 * MiB;
  const BACKING = 2 * GiB;
  const N_BLOCKS = BACKING / BLOCK_BYTES;
  /** The last part of the workload is written with writeback paused, so the restart has dirty data to replay. */
  const PAUSED_BYTES = 192 * MiB;
  const opts = { n_ksets: 2, limits: { space_wait_ms: 120_000 } };

  function openFiles(cache_path: string, backing_path: string) {
    const dev = openCacheDevice(cache_path);
    const backing = openBackingFile(backing_path);
    const engine = Engine.open(dev.domain, backing, opts);
    const loops = startLoops(new Writeback(engine.ctx, engine.meta), new Gc(engine.ctx, engine.meta));
    const close = async () => {
      await closeWithLoops(engine, loops);
      backing.close();
      dev.close();
    };
    return { engine, loops, close };
  }

  async function expectReadsBack(engine: Engine, model: Int32Array, what: string): Promise<void> {
    const buf = new Uint8Array(4 * MiB);
    for (let off = 0; off < BACKING; off += buf.length) {
      await engine.read(off, buf.length, buf);
      const first = off / BLOCK_BYTES;
      const problem = idsDiffer(blockIds(buf, first), model.subarray(first, first + buf.length / BLOCK_BYTES), first);
      if (problem !== null) throw new Error(`${what}: ${problem}`);
    }
  }

  test("4 GiB through a 512 MiB cache completes and reads back before and after a restart, then drains to the backing file", async () => {
    const cache_path = join(dir, "cache8x.img");
    const backing_path = join(dir, "backing8x.img");
    const fd = openSync(backing_path, "w");
    ftruncateSync(fd, BACKING); // sparse: reads as zeroes
    closeSync(fd);
    const dev0 = openCacheDevice(cache_path, { create_size_bytes: CACHE });
    formatCache(dev0.domain, { data_crc: false });
    dev0.close();

    let o = openFiles(cache_path, backing_path);
    const model = new Int32Array(N_BLOCKS).fill(ZERO_ID);
    const rng = makeRng(8);
    let written = 0;
    let id = 0;
    let paused = false;
    while (written < 8 * CACHE) {
      if (!paused && written >= 8 * CACHE - PAUSED_BYTES) {
        // Let GC take everything written back, then keep the rest dirty in the cache.
        o.engine.setGcPercent(0);
        expect(await drainWithLoops(o.engine, o.loops, 60_000)).toBe(true);
        const s = o.engine.ctx.s;
        const clean = () => posEqual(tails(o.engine.ctx).key_tail, tails(o.engine.ctx).dirty_tail);
        expect(await withLoops(o.loops, waitUntilAsync(s.waits, WAIT_KEY_TAIL, clean, 60_000))).toBe(true);
        setWritebackPaused(s, true);
        paused = true;
      }
      const n_blocks = 256 + Math.floor(rng() * 769); // 1 MiB .. 4 MiB
      const first = Math.floor(rng() * (N_BLOCKS - n_blocks));
      id++;
      await withLoops(o.loops, o.engine.write(first * BLOCK_BYTES, blocksOf(id, first, n_blocks), false));
      model.fill(id, first, first + n_blocks);
      written += n_blocks * BLOCK_BYTES;
      if (id % 32 === 0) await withLoops(o.loops, o.engine.flush());
    }
    await withLoops(o.loops, o.engine.flush());
    await expectReadsBack(o.engine, model, "before the restart");
    expect(posEqual(tails(o.engine.ctx).dirty_tail, tails(o.engine.ctx).key_head)).toBe(false);
    expectTailsOrdered(o.engine);
    await o.close();

    o = openFiles(cache_path, backing_path);
    expect(o.engine.meta.gc_percent).toBe(0);
    expect(o.engine.replay_result!.keys).toBeGreaterThan(PAUSED_BYTES / (4 * MiB));
    await expectReadsBack(o.engine, model, "after the restart");
    expect(await drainWithLoops(o.engine, o.loops, 120_000)).toBe(true);
    expectTailsOrdered(o.engine);
    await o.close();

    const bfd = openSync(backing_path, "r");
    try {
      const buf = new Uint8Array(4 * MiB);
      for (let off = 0; off < BACKING; off += buf.length) {
        expect(readSync(bfd, buf, 0, buf.length, off)).toBe(buf.length);
        const first = off / BLOCK_BYTES;
        const problem = idsDiffer(blockIds(buf, first), model.subarray(first, first + buf.length / BLOCK_BYTES), first);
        if (problem !== null) throw new Error(`backing file after the drain: ${problem}`);
      }
    } finally {
      closeSync(bfd);
      rmSync(cache_path, { force: true });
      rmSync(backing_path, { force: true });
    }
  }, 300_000);
});

// ---- dump-ksets after a clean drain ----

test("dump-ksets --from dirty-tail shows an empty dirty log after a clean drain", async () => {
  const path = join(dir, "drained.img");
  const dev = openCacheDevice(path, { create_size_bytes: 512 * MiB });
  const backing = new MemoryBacking(16 * MiB);
  try {
    formatCache(dev.domain, { data_crc: false });
    const engine = Engine.open(dev.domain, backing, { n_ksets: 2, nodes_max: 65_536 });
    const writeback = new Writeback(engine.ctx, engine.meta);
    for (let b = 0; b < 64; b++) await engine.write(b * 3 * BLOCK_BYTES, blocksOf(b + 1, b * 3, 2), false);
    await engine.writeZeroes(5 * MiB, MiB, { fua: false });
    await engine.flush();
    for (let i = 0; i < 100 && (await writeback.step()) === "progress"; i++);
    await engine.close();
  } finally {
    dev.close();
  }
  const run = (from: string) => {
    const r = Bun.spawnSync([BIN, "dump-ksets", "--cache", path, "--from", from, "--json"]);
    expect(r.stderr.toString()).toBe("");
    expect(r.exitCode).toBe(0);
    return JSON.parse(r.stdout.toString()) as { start: string; ksets: unknown[]; end_pos: string; end_reason: string; keys: number };
  };
  const dirty = run("dirty-tail");
  expect(dirty.ksets).toEqual([]);
  expect(dirty.keys).toBe(0);
  expect(dirty.end_pos).toBe(dirty.start);
  expect(dirty.end_reason).toBe(`zero kset header at ${dirty.start}: end of the log`);
  // Not an empty cache: the log from key_tail still holds the written-back ksets (GC never ran).
  const all = run("key-tail");
  expect(all.keys).toBe(65);
  expect(all.end_pos).toBe(dirty.start);
  // The text form says the same.
  const text = Bun.spawnSync([BIN, "dump-ksets", "--cache", path, "--from", "dirty-tail"]).stdout.toString();
  expect(text).toBe(`log from dirty-tail ${dirty.start}\nlog ends at ${dirty.start}: zero kset header at ${dirty.start}: end of the log\n0 ksets, 0 keys (0 stale)\n`);
  const blocks = blockIds(backing.bytes.subarray(0, 64 * 3 * BLOCK_BYTES), 0);
  for (let b = 0; b < 64; b++) expect([blocks[b * 3], blocks[b * 3 + 1], blocks[b * 3 + 2]]).toEqual([b + 1, b + 1, ZERO_ID]);
  expect(blockIds(backing.bytes.subarray(5 * MiB, 6 * MiB), (5 * MiB) / BLOCK_BYTES).every((x) => x === ZERO_ID)).toBe(true);
}, 60_000);
