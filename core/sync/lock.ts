/**
 * Mutual exclusion between worker threads on an Int32Array over a SharedArrayBuffer.
 *
 * Each lock is one Int32 word with three states (the classic futex mutex):
 *
 *   LOCK_FREE (0)       nobody holds it
 *   LOCK_HELD (1)       held, nobody is sleeping on it
 *   LOCK_CONTENDED (2)  held, and some thread may be sleeping in Atomics.wait on it
 *
 * The uncontended path is one compareExchange to lock and one exchange to unlock; unlock only
 * calls Atomics.notify when the word said 2, so a lock nobody waits for never enters the engine's
 * wait queue. A contender first spins a bounded number of loads (the holders are short: the
 * critical sections below never do I/O or wait on other threads), then marks the word 2 and
 * sleeps. Spinning is kept short because the machines this runs on may have only two cores
 * (bun-platform-notes §4: 1000 loads then wait cost 3.6 µs per round trip, pure spin burns both
 * cores).
 *
 * These locks are not re-entrant and carry no owner: locking twice from one thread deadlocks.
 * They block the calling thread, so they are only for critical sections that cannot await.
 *
 * Lock order (outer -> inner). A thread holding a lock may only take locks further down this list,
 * never one above it and never a second lock of the same level:
 *
 *   1. subtree        (key index, one per 4 MiB of the backing device)
 *   2. kset           (one per in-memory kset)
 *   3. key_head       (log append position)
 *   4. segment table  (seg_map, refcounts, generations)
 *
 * The key index's node-pool free-list lock (core/index/key_index.ts) is a leaf: it may be taken
 * under any of the above and nothing is taken under it.
 */
import { AssertionError } from "../assert.ts";
import { PcacheError } from "../errors.ts";

/** A failed internal check (an AssertionError); callers build the message only on failure. */
function broken(message: string): never {
  throw new AssertionError(`assertion failed: ${message}`);
}

export const LOCK_FREE = 0;
export const LOCK_HELD = 1;
export const LOCK_CONTENDED = 2;

/**
 * Loads before a contender goes to sleep. Each iteration is one Atomics.load (a few ns), so this
 * is well under a microsecond: enough to catch a holder that is about to release, short enough
 * not to matter when the holder was descheduled.
 */
export const LOCK_SPIN_MAX = 256;

/** A lock stayed held past this thread's bound (boundLockWaits): its holder likely died. */
export class LockWaitError extends PcacheError {
  override name = "LockWaitError";
}

/**
 * This thread's longest wait in lock() (Infinity: wait for ever). Module state is per thread:
 * each worker loads its own copy. The main thread sets a bound while serving, because a worker
 * that died holding a lock would otherwise freeze it, and with it the supervisor that has to
 * stop the server; the workers keep waiting for ever (the supervisor stops them instead).
 */
let thread_wait_bound_ms = Infinity;

export function boundLockWaits(ms: number): void {
  if (!(ms > 0)) broken(`lock wait bound ${ms} must be positive`);
  thread_wait_bound_ms = ms;
}

/** Acquire words[i], sleeping in Atomics.wait if it stays held after a short spin. */
export function lock(words: Int32Array, i: number): void {
  lockOrThrow(words, i, thread_wait_bound_ms);
}

/** Acquire words[i] within timeout_ms or throw a LockWaitError. */
export function lockOrThrow(words: Int32Array, i: number, timeout_ms: number): void {
  if (lockWithin(words, i, timeout_ms)) return;
  throw new LockWaitError(`a shared lock (word ${i}) stayed held for ${timeout_ms} ms; did a worker fail? Try again, or see the server's log`);
}

/** Acquire words[i] within timeout_ms (Infinity: wait for ever); false, not holding it, when it stayed held. */
export function lockWithin(words: Int32Array, i: number, timeout_ms: number): boolean {
  let state = Atomics.compareExchange(words, i, LOCK_FREE, LOCK_HELD);
  if (state === LOCK_FREE) return true;
  for (let spin = 0; spin < LOCK_SPIN_MAX; spin++) {
    // Load first: a compareExchange per iteration would keep stealing the line from the holder.
    if (Atomics.load(words, i) === LOCK_FREE) {
      state = Atomics.compareExchange(words, i, LOCK_FREE, LOCK_HELD);
      if (state === LOCK_FREE) return true;
    }
  }
  // Slow path. From here we always store 2, never 1: we cannot know whether other sleepers remain
  // behind us, so the next unlock must notify. One extra notify is the price of never losing one.
  // Giving up leaves 2 behind, which only costs the holder's unlock one notify.
  const deadline_ms = performance.now() + timeout_ms;
  if (state !== LOCK_CONTENDED) state = Atomics.exchange(words, i, LOCK_CONTENDED);
  while (state !== LOCK_FREE) {
    const left_ms = deadline_ms - performance.now();
    if (left_ms <= 0) return false;
    Atomics.wait(words, i, LOCK_CONTENDED, left_ms === Infinity ? undefined : left_ms);
    state = Atomics.exchange(words, i, LOCK_CONTENDED);
  }
  return true;
}

/** Acquire words[i] if it is free right now; never waits. */
export function tryLock(words: Int32Array, i: number): boolean {
  return Atomics.compareExchange(words, i, LOCK_FREE, LOCK_HELD) === LOCK_FREE;
}

/** Release words[i]. Asserts it was held: unlocking a free lock is a bug in the caller. */
export function unlock(words: Int32Array, i: number): void {
  const state = Atomics.exchange(words, i, LOCK_FREE);
  if (state === LOCK_CONTENDED) {
    Atomics.notify(words, i, 1);
    return;
  }
  if (state !== LOCK_HELD) broken(`unlock of a lock that was not held (word ${i}, state ${state})`);
}

/** Whether words[i] is held by someone (for assertions; the answer may be stale at once). */
export function isLocked(words: Int32Array, i: number): boolean {
  return Atomics.load(words, i) !== LOCK_FREE;
}
