import { afterAll, describe, expect, test } from "bun:test";
import { AssertionError } from "../core/assert.ts";
import { createKeyIndexShared, KeyIndex, NIL } from "../core/index/key_index.ts";
import {
  boundLockWaits,
  isLocked,
  LOCK_CONTENDED,
  LOCK_FREE,
  LOCK_HELD,
  lock,
  LockWaitError,
  lockWithin,
  tryLock,
  unlock,
} from "../core/sync/lock.ts";
import { PcacheError } from "../core/errors.ts";
import {
  HAS_WAIT_ASYNC,
  readWord,
  signal,
  waitChange,
  waitChangeAsync,
  waitUntil,
  waitUntilAsync,
} from "../core/sync/wait_word.ts";
import type { IndexWorkerJob, IndexWorkerReply } from "./helpers/index_worker.ts";

const WORKER_URL = new URL("./helpers/index_worker.ts", import.meta.url);
const live: Worker[] = [];

function spawn(): Worker {
  const w = new Worker(WORKER_URL);
  live.push(w);
  return w;
}

/** Run one job on a worker; resolves with its reply, rejects on a worker error. */
function runJob(w: Worker, job: IndexWorkerJob): Promise<IndexWorkerReply & { ok: true }> {
  return new Promise((resolve, reject) => {
    w.onmessage = (ev: MessageEvent<IndexWorkerReply>) => {
      const reply = ev.data;
      if (reply.ok) resolve(reply);
      else reject(new Error(`worker: ${reply.error}`));
    };
    w.onerror = (ev) => reject(new Error(`worker error: ${ev.message}`));
    w.postMessage(job);
  });
}

afterAll(() => {
  for (const w of live) w.terminate();
});

describe("lock (single thread)", () => {
  test("state machine", () => {
    const words = new Int32Array(new SharedArrayBuffer(8));
    expect(tryLock(words, 1)).toBe(true);
    expect(words[1]).toBe(LOCK_HELD);
    expect(tryLock(words, 1)).toBe(false);
    expect(isLocked(words, 1)).toBe(true);
    unlock(words, 1);
    expect(words[1]).toBe(LOCK_FREE);
    lock(words, 1);
    expect(words[1]).toBe(LOCK_HELD);
    unlock(words, 1);
    // A contended word notifies on unlock and goes back to free.
    words[1] = LOCK_CONTENDED;
    unlock(words, 1);
    expect(words[1]).toBe(LOCK_FREE);
    expect(() => unlock(words, 1)).toThrow(AssertionError);
    expect(words[0]).toBe(0);
  });
});

describe("bounded lock waits (the main thread while serving)", () => {
  test("lockWithin gives up on a lock whose holder never comes back, and takes it once released", () => {
    const words = new Int32Array(new SharedArrayBuffer(8));
    expect(lockWithin(words, 1, 50)).toBe(true);
    unlock(words, 1);
    words[1] = LOCK_HELD; // held by a thread that died
    const t0 = performance.now();
    expect(lockWithin(words, 1, 50)).toBe(false);
    expect(performance.now() - t0).toBeGreaterThanOrEqual(49);
    // Still held, now marked contended: the holder's unlock would notify.
    expect(words[1]).toBe(LOCK_CONTENDED);
    unlock(words, 1);
    expect(lockWithin(words, 1, 50)).toBe(true);
    expect(words[1]).toBe(LOCK_HELD);
    unlock(words, 1);
    expect(words[1]).toBe(LOCK_FREE);
  });

  test("with a bound, lock() throws a LockWaitError (a user-facing error) instead of hanging", () => {
    const words = new Int32Array(new SharedArrayBuffer(8));
    words[0] = LOCK_HELD;
    boundLockWaits(30);
    try {
      let err: unknown = null;
      try {
        lock(words, 0);
      } catch (e) {
        err = e;
      }
      expect(err).toBeInstanceOf(LockWaitError);
      expect(err).toBeInstanceOf(PcacheError);
      expect((err as Error).message).toMatch(/a shared lock \(word 0\) stayed held for 30 ms; did a worker fail\?/);
      words[0] = LOCK_FREE;
      lock(words, 0);
      expect(words[0]).toBe(LOCK_HELD);
      unlock(words, 0);
    } finally {
      boundLockWaits(Infinity);
    }
    expect(() => boundLockWaits(0)).toThrow(AssertionError);
  });
});

describe("lock across workers", () => {
  test("4 workers x 20k cycles on 3 locks: non-atomic counters stay exact", async () => {
    const N_LOCKS = 3;
    const locks = new SharedArrayBuffer(N_LOCKS * 4);
    const counters = new SharedArrayBuffer((N_LOCKS + 1) * 4);
    const workers = [spawn(), spawn(), spawn(), spawn()];
    const CYCLES = 20_000;
    const replies = await Promise.all(
      workers.map((w, i) => runJob(w, { kind: "locks", locks, counters, n_locks: N_LOCKS, cycles: CYCLES, seed: i + 1 })),
    );
    const c = new Int32Array(counters);
    let sum = 0;
    for (let j = 0; j < N_LOCKS; j++) sum += c[j];
    expect(sum).toBe(4 * CYCLES);
    expect(Array.from(new Int32Array(locks))).toEqual([0, 0, 0]);
    expect(replies.every((r) => r.stats!.try_ok > 0)).toBe(true);
  });

  // A roomy pool (deeper trees) and a tiny one (allocNode runs dry all the time).
  for (const NODES of [3000, 48]) {
  test(`4 workers x 20k cycles on the same subtrees of one shared index, ${NODES} nodes`, async () => {
    const N_SUBTREES = 4; // workers use the first 3; the 4th must stay empty
    const shared = createKeyIndexShared(N_SUBTREES, NODES, 42);
    const counters = new SharedArrayBuffer(N_SUBTREES * 4);
    const gens = new SharedArrayBuffer(4 * 8);
    const gen_lock = new SharedArrayBuffer(4);
    const workers = [spawn(), spawn(), spawn(), spawn()];
    const CYCLES = 20_000;
    const replies = await Promise.all(
      workers.map((w, i) =>
        runJob(w, {
          kind: "index",
          shared,
          counters,
          gens,
          gen_lock,
          n_subtrees_used: 3,
          window_bytes: 256 * 1024,
          cycles: CYCLES,
          seed: 100 + i,
        }),
      ),
    );
    const idx = new KeyIndex(shared);
    const c = new Int32Array(counters);
    expect(c[0] + c[1] + c[2]).toBe(4 * CYCLES);
    expect(c[3]).toBe(0);
    let linked = 0;
    for (let s = 0; s < N_SUBTREES; s++) {
      expect(idx.tryLockSubtree(s)).toBe(true); // every lock was released
      linked += idx.checkInvariants(s);
      idx.unlockSubtree(s);
    }
    expect(idx.count(3)).toBe(0);
    expect(idx.checkPool()).toBe(idx.nodesFree());
    expect(linked + idx.nodesFree()).toBe(NODES);
    const total = (name: string): number => replies.reduce((a, r) => a + r.stats![name], 0);
    if (process.env.PCACHE_TEST_VERBOSE) console.log(replies.map((r) => r.stats), linked);
    // The mix really exercised splits, placeholders and completion races.
    expect(total("inserts")).toBeGreaterThan(30_000);
    expect(total("spare_used")).toBeGreaterThan(0);
    expect(total("fills")).toBeGreaterThan(0);
    expect(total("lost")).toBeGreaterThan(0);
    if (NODES < 100) expect(total("exhausted")).toBeGreaterThan(0);
  }, 60_000);
  }
});

describe("wait words", () => {
  test("Atomics.waitAsync is present (no polling fallback in use)", () => {
    expect(HAS_WAIT_ASYNC).toBe(true);
  });

  test("a blocking waiter is woken by a signal from another worker", async () => {
    const sab = new SharedArrayBuffer(16);
    const words = new Int32Array(sab);
    const seen = readWord(words, 2);
    const signaller = spawn();
    const done = runJob(signaller, { kind: "signal", words: sab, i: 2, delay_ms: 30 });
    const t0 = performance.now();
    // Blocks the main thread; the worker's signal is the only thing that can end it early.
    expect(waitChange(words, 2, seen, 5000)).toBe(true);
    const waited = performance.now() - t0;
    expect(waited).toBeGreaterThanOrEqual(10);
    expect(waited).toBeLessThan(4000);
    expect(readWord(words, 2)).toBe(seen + 1);
    await done;
  });

  test("a worker waiting (blocking and async) is woken by a signal from this thread", async () => {
    for (const async of [false, true]) {
      const sab = new SharedArrayBuffer(8);
      const words = new Int32Array(sab);
      const w = spawn();
      const reply = runJob(w, { kind: "wait", words: sab, i: 1, seen: 0, timeout_ms: 10_000, async });
      await Bun.sleep(30);
      signal(words, 1);
      const r = await reply;
      expect(r.woken).toBe(true);
      expect(r.stats!.seq).toBe(1);
      expect(r.elapsed_ms).toBeLessThan(5000);
    }
  });

  test("timeouts, and a stale `seen` returns at once", async () => {
    const words = new Int32Array(new SharedArrayBuffer(8));
    let t0 = performance.now();
    expect(waitChange(words, 0, 0, 25)).toBe(false);
    expect(performance.now() - t0).toBeGreaterThanOrEqual(20);
    t0 = performance.now();
    expect(await waitChangeAsync(words, 0, 0, 25)).toBe(false);
    expect(performance.now() - t0).toBeGreaterThanOrEqual(20);
    signal(words, 0);
    expect(waitChange(words, 0, 0, 5000)).toBe(true);
    expect(await waitChangeAsync(words, 0, 0, 5000)).toBe(true);
    expect(waitUntil(words, 0, () => false, 15)).toBe(false);
    expect(await waitUntilAsync(words, 0, () => false, 15)).toBe(false);
  });

  test("the async wait leaves the event loop running", async () => {
    const sab = new SharedArrayBuffer(8);
    const words = new Int32Array(sab);
    let ticks = 0;
    const timer = setInterval(() => ticks++, 2);
    const signaller = spawn();
    const done = runJob(signaller, { kind: "signal", words: sab, i: 0, delay_ms: 60 });
    expect(await waitChangeAsync(words, 0, 0, 5000)).toBe(true);
    clearInterval(timer);
    expect(ticks).toBeGreaterThan(3);
    await done;
  });

  test("waitForNodes is woken when another worker frees nodes", async () => {
    const shared = createKeyIndexShared(1, 4);
    const idx = new KeyIndex(shared);
    const ids = [idx.allocNode(), idx.allocNode(), idx.allocNode(), idx.allocNode()];
    expect(idx.allocNode()).toBe(NIL);
    const w = spawn();
    const done = runJob(w, { kind: "free_nodes", shared, ids: ids.slice(0, 2), delay_ms: 30 });
    expect(await idx.waitForNodesAsync(2, 5000)).toBe(true);
    await done;
    expect(idx.nodesFree()).toBe(2);
    const w2 = spawn();
    const done2 = runJob(w2, { kind: "free_nodes", shared, ids: ids.slice(2), delay_ms: 30 });
    const t0 = performance.now();
    expect(idx.waitForNodes(4, 5000)).toBe(true); // blocking form, main thread
    expect(performance.now() - t0).toBeLessThan(4000);
    await done2;
    expect(idx.checkPool()).toBe(4);
  });

  test("a custom wait on the pool's wait word, registered with poolWaiterEnter", async () => {
    const shared = createKeyIndexShared(1, 1);
    const idx = new KeyIndex(shared);
    const id = idx.allocNode();
    const w = spawn();
    const done = runJob(w, { kind: "free_nodes", shared, ids: [id], delay_ms: 30 });
    idx.poolWaiterEnter();
    try {
      const ok = await waitUntilAsync(idx.pool_wait_words, idx.pool_wait_index, () => idx.nodesFree() > 0, 5000);
      expect(ok).toBe(true);
    } finally {
      idx.poolWaiterLeave();
    }
    await done;
  });
});
