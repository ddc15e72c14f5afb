/**
 * Several request workers (real Bun Workers, each attached to the engine opened here, each with
 * its own data head) write, trim and read overlapping ranges at once while this thread runs the
 * writeback and GC loops over a real cache file on /dev/shm and a backing file.
 *
 * Checks: (a) in its private range every read of a worker equals its own last write; (b) in the
 * shared window every byte read, during the run and at the end, comes from a write the reader may
 * legally see (test/helpers/engine_worker.ts, SharedView); (c) after close every subtree of the key
 * index is sorted and non-overlapping and no index node leaked; (d) after a restart (replay) the
 * same bytes read back, and after writeback the backing file holds them too.
 */
import { afterEach, describe, expect, test } from "bun:test";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { type CacheDevice, openCacheDevice } from "../core/device/cache_device.ts";
import { type FileBacking, openBackingFile } from "../core/device/file_backing.ts";
import { Engine } from "../core/engine/engine.ts";
import { CTL_STOPPING, STAT_GC_SEGS_FREED, STAT_WRITEBACK_KSETS, WAIT_WORDS } from "../core/engine/shared_state.ts";
import { MiB } from "../core/format/constants.ts";
import { formatCache } from "../core/format/format_cache.ts";
import { Gc } from "../core/gc/gc.ts";
import { Writeback } from "../core/writeback/writeback.ts";
import {
  BACKING_BYTES,
  initialByte,
  makeScript,
  type Op,
  opKey,
  OPS_MAX,
  PRIVATE_BYTES,
  privateOff,
  SHARED_BYTES,
  SHARED_OFF,
  SharedView,
  type StartJob,
  tagByte,
  type WorkerReply,
  WORKERS_MAX,
} from "./helpers/engine_worker.ts";

const WORKER_URL = new URL("./helpers/engine_worker.ts", import.meta.url);
const CACHE_BYTES = 512 * MiB;
const N_WORKERS = 3;
const OPS_DEFAULT = 2500;
/** Ops per worker; PCACHE_CONCURRENCY_OPS runs a longer soak. */
const N_OPS = opsFromEnv(OPS_DEFAULT);
/** The workers' run must end within this (a broken index can loop forever). */
const RUN_TIMEOUT_MS = 120_000 + N_OPS * 40;
const SEED = 7;

function opsFromEnv(fallback: number): number {
  const raw = process.env.PCACHE_CONCURRENCY_OPS;
  if (raw === undefined || raw === "") return fallback;
  const n = Number(raw);
  if (!Number.isSafeInteger(n) || n < 1 || n > OPS_MAX) throw new Error(`PCACHE_CONCURRENCY_OPS must be an integer from 1 to ${OPS_MAX}, got "${raw}"`);
  return n;
}

const live: Worker[] = [];
let dir: string | null = null;

afterEach(() => {
  for (const w of live.splice(0)) w.terminate();
  if (dir !== null) rmSync(dir, { recursive: true, force: true });
  dir = null;
});

interface Devices {
  dev: CacheDevice;
  backing: FileBacking;
  engine: Engine;
}

function openAll(cache_path: string, backing_path: string): Devices {
  const dev = openCacheDevice(cache_path, { create_size_bytes: CACHE_BYTES });
  const backing = openBackingFile(backing_path);
  const engine = Engine.open(dev.domain, backing, {
    n_heads: N_WORKERS,
    n_stat_slots: N_WORKERS + 3,
    n_ksets: 2,
    limits: { space_wait_ms: 60_000 },
  });
  return { dev, backing, engine };
}

/** Initial image: tagged bytes in the shared window and the private ranges, zeroes elsewhere. */
function initialImage(): Uint8Array {
  const img = new Uint8Array(BACKING_BYTES);
  const fill = (off: number, len: number) => {
    for (let x = off; x < off + len; x++) img[x] = initialByte(x);
  };
  fill(SHARED_OFF, SHARED_BYTES);
  for (let w = 0; w < N_WORKERS; w++) fill(privateOff(w), PRIVATE_BYTES);
  return img;
}

/** Next message from a worker; a worker error or an error reply rejects. */
function nextReply(w: Worker): Promise<WorkerReply> {
  return new Promise((resolve, reject) => {
    w.onmessage = (ev: MessageEvent<WorkerReply>) => (ev.data.type === "error" ? reject(new Error(ev.data.error)) : resolve(ev.data));
    w.onerror = (ev) => reject(new Error(`worker error: ${ev.message}`));
  });
}

/** Start every worker, let them go at once, and collect their private models. */
async function runWorkers(d: Devices, order: SharedArrayBuffer): Promise<Array<WorkerReply & { type: "done" }>> {
  const progress = new SharedArrayBuffer(4 * 2 * N_WORKERS);
  const workers = Array.from({ length: N_WORKERS }, () => new Worker(WORKER_URL));
  live.push(...workers);
  const ready = workers.map(nextReply);
  workers.forEach((worker, w) => {
    const job: StartJob = {
      type: "start",
      shared: d.engine.shared,
      cache: d.dev.attach,
      backing: d.backing.attach,
      w,
      n_workers: N_WORKERS,
      seed: SEED,
      n_ops: N_OPS,
      progress,
      order,
    };
    worker.postMessage(job);
  });
  await Promise.all(ready);
  const done = workers.map(nextReply);
  for (const worker of workers) worker.postMessage({ type: "go" });
  let timer: ReturnType<typeof setTimeout> | undefined;
  const deadline = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`workers still running after ${RUN_TIMEOUT_MS} ms`)), RUN_TIMEOUT_MS);
  });
  const replies = await Promise.race([Promise.all(done), deadline]).finally(() => clearTimeout(timer));
  for (const worker of workers) worker.terminate();
  return replies as Array<WorkerReply & { type: "done" }>;
}

/** Throw naming the first differing byte unless got equals want. */
function expectSame(got: Uint8Array, want: Uint8Array, what: string): void {
  if (Buffer.from(got.buffer, got.byteOffset, got.length).equals(want)) return;
  let k = 0;
  while (k < got.length && got[k] === want[k]) k++;
  throw new Error(`${what}: byte ${k} is ${got[k]}, expected ${want[k]}`);
}

async function readAll(engine: Engine): Promise<Uint8Array> {
  const img = new Uint8Array(BACKING_BYTES);
  const chunk = 8 * MiB;
  for (let off = 0; off < BACKING_BYTES; off += chunk) await engine.read(off, chunk, img.subarray(off, off + chunk));
  return img;
}

/** The final image against every worker's script and private model. */
function checkImage(img: Uint8Array, models: Uint8Array[], order: Int32Array): void {
  const view = new SharedView(
    Array.from({ length: N_WORKERS }, (_, w) => makeScript(SEED, w, N_OPS)),
    order,
  );
  for (let w = 0; w < N_WORKERS; w++) view.advance(w, N_OPS);
  const bad = view.check(img.subarray(SHARED_OFF, SHARED_OFF + SHARED_BYTES), SHARED_OFF, []);
  if (bad !== null) throw new Error(`final shared window: ${bad}`);
  const want = initialImage();
  for (let w = 0; w < N_WORKERS; w++) want.set(models[w], privateOff(w));
  want.set(img.subarray(SHARED_OFF, SHARED_OFF + SHARED_BYTES), SHARED_OFF); // checked above
  expectSame(img, want, "final image (private ranges and untouched bytes)");
}

/** (c) Every subtree sorted and non-overlapping; every node linked or free. */
function checkIndex(engine: Engine): void {
  const idx = engine.ctx.idx;
  let linked = 0;
  for (let s = 0; s < idx.n_subtrees; s++) {
    idx.lockSubtree(s);
    try {
      linked += idx.checkInvariants(s);
    } finally {
      idx.unlockSubtree(s);
    }
  }
  expect(linked + idx.checkPool()).toBe(idx.nodes_max);
}

async function drainWriteback(engine: Engine): Promise<void> {
  const wb = new Writeback(engine.ctx, engine.meta);
  for (let i = 0; i < 1_000_000; i++) {
    const r = await wb.step();
    if (r === "idle") return;
    if (r === "error") throw new Error("writeback step failed");
  }
  throw new Error("writeback did not finish");
}

/** What engine.close() does to the loops, without taking any lock. */
function stopLoops(engine: Engine): void {
  const s = engine.ctx.s;
  engine.ctx.log.stopTimers();
  Atomics.store(s.ctl, CTL_STOPPING, 1);
  for (let word = 0; word < WAIT_WORDS; word++) s.signal(word);
}

function closeAll(d: Devices): void {
  d.backing.close();
  d.dev.close();
}

/** Workers plus this thread's writeback and GC loops; checks (a) to (c). Returns the image read at the end. */
async function runAndCheck(d: Devices): Promise<Uint8Array> {
  const { engine } = d;
  // Writeback and GC as their own workers would run them, on their own slots.
  const wb = Engine.attach(engine.shared, d.dev.domain, d.backing, N_WORKERS);
  const gc = Engine.attach(engine.shared, d.dev.domain, d.backing, N_WORKERS + 1);
  const loops = Promise.all([new Writeback(wb.ctx, wb.meta).run(), new Gc(gc.ctx, gc.meta).run()]);
  const order = new SharedArrayBuffer(4 * N_WORKERS * N_OPS * N_WORKERS);
  let replies: Array<WorkerReply & { type: "done" }>;
  try {
    replies = await runWorkers(d, order);
  } catch (err) {
    // No engine.close(): a worker that failed may still hold a kset lock.
    stopLoops(engine);
    await loops;
    throw err;
  }
  let image: Uint8Array;
  try {
    expect(replies.every((r) => r.shared_reads > 0 && r.private_reads > 0)).toBe(true);
    if (N_OPS >= OPS_DEFAULT) {
      // The workers really overlapped: some reads met another worker's write in flight.
      expect(replies.reduce((n, r) => n + r.concurrent_reads, 0)).toBeGreaterThan(0);
      // GC reclaimed segments while the workers wrote.
      expect(engine.ctx.s.statTotal(STAT_GC_SEGS_FREED)).toBeGreaterThan(0);
      expect(engine.ctx.s.statTotal(STAT_WRITEBACK_KSETS)).toBeGreaterThan(0);
    }
    image = await readAll(engine);
    checkImage(
      image,
      replies.map((r) => r.private_model),
      new Int32Array(order),
    );
  } finally {
    await engine.close();
    await loops;
  }
  checkIndex(engine);
  return image;
}

/** (d) Restart: replay gives the same bytes; after writeback the backing file holds them. */
async function restartAndDrain(cache_path: string, backing_path: string, image: Uint8Array): Promise<void> {
  const d = openAll(cache_path, backing_path);
  try {
    expectSame(await readAll(d.engine), image, "after restart");
    await d.engine.flush();
    await drainWriteback(d.engine);
    await d.engine.close();
  } finally {
    d.engine.ctx.log.stopTimers();
    closeAll(d);
  }
  expectSame(readFileSync(backing_path), image, "backing file after writeback");
}

/** Bytes [from, to) of the window as op q of worker w leaves them. */
function tagged(img: Uint8Array, w: number, q: number, from: number, to: number): void {
  for (let x = from; x < to; x++) img[x - SHARED_OFF] = tagByte(opKey(w, q), x);
}

describe("engine under concurrent workers", () => {
  test("the shared-window check refuses overwritten, older and never-written bytes", () => {
    const S = SHARED_OFF;
    const write = (off: number, len: number): Op => ({ kind: "write", shared: true, off, len, fua: false, pool_at: 0 });
    const read: Op = { kind: "read", shared: true, off: S, len: 1, fua: false, pool_at: 0 };
    // Worker 0 writes [S, S+100) twice; worker 1 writes [S+50, S+150) once, after worker 0's
    // first write finished and concurrently with its second.
    const scripts = [[write(S, 100), write(S, 100)], [write(S + 50, 100), read]];
    const order = new Int32Array(2 * 2 * 2);
    order[(1 * 2 + 0) * 2 + 0] = 1;
    const view = (o: Int32Array) => {
      const v = new SharedView(scripts, o);
      v.advance(0, 2);
      v.advance(1, 2);
      return v;
    };
    const good = new Uint8Array(200);
    for (let x = S + 150; x < S + 200; x++) good[x - S] = initialByte(x);
    tagged(good, 0, 1, S, S + 100);
    tagged(good, 1, 0, S + 100, S + 150);
    expect(view(order).check(good, S, [])).toBeNull();
    const both = good.slice();
    tagged(both, 1, 0, S + 50, S + 100); // concurrent writes: either may win
    expect(view(order).check(both, S, [])).toBeNull();
    const older = good.slice();
    tagged(older, 0, 0, S + 10, S + 20);
    expect(view(order).check(older, S, [])).toMatch(/^byte \d+ is \d+: no allowed op/);
    // Had worker 0's second write started after worker 1's finished, worker 1's bytes are gone.
    const later = order.slice();
    later[(0 * 2 + 1) * 2 + 1] = 1;
    expect(view(later).check(both, S, [])).toMatch(/no allowed op/);
    const never = good.slice();
    never[120] = initialByte(S + 120);
    expect(view(order).check(never, S, [])).toMatch(/no allowed op/);
  });

  test(
    `${N_WORKERS} workers x ${N_OPS} ops on overlapping ranges, writeback and GC running`,
    async () => {
      expect(N_WORKERS).toBeLessThanOrEqual(WORKERS_MAX);
      dir = mkdtempSync("/dev/shm/pcache-concurrency-");
      const cache_path = `${dir}/cache.img`;
      const backing_path = `${dir}/backing.img`;
      writeFileSync(backing_path, initialImage());
      const fresh = openCacheDevice(cache_path, { create_size_bytes: CACHE_BYTES });
      formatCache(fresh.domain, { data_crc: false, gc_percent: 10 });
      fresh.close();
      const d = openAll(cache_path, backing_path);
      const image = await runAndCheck(d);
      closeAll(d);
      await restartAndDrain(cache_path, backing_path, image);
    },
    RUN_TIMEOUT_MS + 60_000,
  );
});
