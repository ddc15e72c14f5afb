/**
 * Wait words: how a thread sleeps until another thread frees something, without polling.
 *
 * A wait word is one Int32 sequence counter in a SharedArrayBuffer. The side that frees a
 * resource (index nodes, cache segments, log room) first makes the freed state visible, then
 * calls signal(), which bumps the counter and wakes every sleeper. A waiter follows the
 * check-then-sleep protocol that makes lost wake-ups impossible:
 *
 *   1. seen = readWord(words, i)       read the counter FIRST
 *   2. if (condition holds) proceed    re-check the real condition
 *   3. waitChange(words, i, seen, ..)  sleep only while the counter still equals `seen`
 *   4. go to 1
 *
 * A signal that lands between 1 and 3 changed the counter, so step 3 returns at once. waitUntil()
 * and waitUntilAsync() run that loop for a predicate.
 *
 * Two forms of sleep:
 * * waitChange(): Atomics.wait, blocks the thread. For threads with nothing else to do
 *   (writeback, GC) and for the main thread in tests (Bun allows Atomics.wait there).
 * * waitChangeAsync(): Atomics.waitAsync, for request workers that also serve sockets and must
 *   keep their event loop running. Bun has Atomics.waitAsync (bun-platform-notes §4, checked on
 *   Bun 1.4.5). Only where it is missing do we fall back to re-reading the counter on a short
 *   setTimeout (WAIT_POLL_MS), which costs latency but stays correct because the caller
 *   re-checks its condition anyway.
 *
 * Waits only work on a real SharedArrayBuffer (not on mmap'ed memory: Bun throws there), so wait
 * words live in small SABs even when the data they guard does not.
 */

/** Re-check interval of the fallback used only when Atomics.waitAsync does not exist. */
export const WAIT_POLL_MS = 1;

/** Whether this runtime has Atomics.waitAsync (Bun does). */
export const HAS_WAIT_ASYNC: boolean = typeof (Atomics as { waitAsync?: unknown }).waitAsync === "function";

/** Current value of the wait word, to pass to a later waitChange as `seen`. */
export function readWord(words: Int32Array, i: number): number {
  return Atomics.load(words, i);
}

/** Bump the counter and wake every thread sleeping on it. Call after the freed state is visible. */
export function signal(words: Int32Array, i: number): void {
  Atomics.add(words, i, 1);
  Atomics.notify(words, i);
}

/**
 * Block until words[i] differs from `seen` or a signal arrives, at most timeout_ms (Infinity for
 * no bound). Returns false only on timeout. A true result says "look again", not that the
 * caller's condition now holds.
 */
export function waitChange(words: Int32Array, i: number, seen: number, timeout_ms: number): boolean {
  return Atomics.wait(words, i, seen, timeout_ms) !== "timed-out";
}

/** waitChange without blocking the event loop. Resolves false only on timeout. */
export function waitChangeAsync(words: Int32Array, i: number, seen: number, timeout_ms: number): Promise<boolean> {
  if (HAS_WAIT_ASYNC) {
    const r = Atomics.waitAsync(words, i, seen, timeout_ms);
    if (!r.async) return Promise.resolve(r.value !== "timed-out");
    return r.value.then((v) => v !== "timed-out");
  }
  return pollChange(words, i, seen, timeout_ms);
}

/** Fallback for runtimes without Atomics.waitAsync: re-read the word every WAIT_POLL_MS. */
function pollChange(words: Int32Array, i: number, seen: number, timeout_ms: number): Promise<boolean> {
  const deadline = performance.now() + timeout_ms;
  return new Promise((resolve) => {
    const tick = (): void => {
      if (Atomics.load(words, i) !== seen) return resolve(true);
      const left = deadline - performance.now();
      if (left <= 0) return resolve(false);
      setTimeout(tick, Math.min(WAIT_POLL_MS, left));
    };
    tick();
  });
}

/**
 * Block until ready() returns true, sleeping on words[i] between checks; at most timeout_ms.
 * Returns whether ready() held. ready() is evaluated in this thread after each wake-up.
 */
export function waitUntil(words: Int32Array, i: number, ready: () => boolean, timeout_ms: number): boolean {
  const deadline = performance.now() + timeout_ms;
  for (;;) {
    const seen = Atomics.load(words, i);
    if (ready()) return true;
    const left = deadline - performance.now();
    if (left <= 0) return false;
    waitChange(words, i, seen, left);
  }
}

/** waitUntil without blocking the event loop. */
export async function waitUntilAsync(
  words: Int32Array,
  i: number,
  ready: () => boolean,
  timeout_ms: number,
): Promise<boolean> {
  const deadline = performance.now() + timeout_ms;
  for (;;) {
    const seen = Atomics.load(words, i);
    if (ready()) return true;
    const left = deadline - performance.now();
    if (left <= 0) return false;
    await waitChangeAsync(words, i, seen, left);
  }
}
