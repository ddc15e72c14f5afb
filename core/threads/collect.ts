/**
 * Explicit garbage collections for threads whose garbage comes in bursts.
 */
/** How often a thread looks at its progress counter to decide on a collection. */
const COLLECT_PERIOD_MS = 1_000;

/**
 * Writeback, GC and status decode keys into short-lived objects (a million keys in a few seconds
 * while GC reclaims the log of a random-write burst, or while `drain` polls the dirty count of a
 * long log); the collector's own pace let that garbage reach hundreds of MiB (RssAnon 960 MiB in
 * a full bench run). One collection per second while `progress()` moves keeps it small (a thread
 * that did nothing skips it). Returns the timer, already unref'd.
 */
export function collectWhileBusy(progress: () => number): ReturnType<typeof setInterval> {
  let seen = progress();
  const t = setInterval(() => {
    const now = progress();
    if (now === seen) return;
    seen = now;
    // A full, synchronous collection: these threads serve no client, a pause costs nothing.
    Bun.gc(true);
  }, COLLECT_PERIOD_MS);
  t.unref();
  return t;
}
