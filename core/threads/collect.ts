/**
 * Explicit garbage collections for threads whose garbage comes faster than the collector's own
 * pace: request workers (per-request objects, received chunks), writeback, and the loops that
 * decode keys by the million (GC reclaiming the log of a random-write burst, `drain` walking a
 * long dirty log). Left alone, that garbage reached hundreds of MiB (RssAnon 875–960 MiB at the
 * end of full bench runs, peaks 650 MiB above the bound).
 */

/** A count of work done; a collection is due once it moved by `every` since the last one. */
export interface WorkCounter {
  read(): number;
  every: number;
}

export interface CollectPolicy {
  /** counters[0] is the thread's progress: nothing moved there, no collection. */
  counters: WorkCounter[];
  /** How often the counters are looked at. */
  check_ms: number;
  /** While there is progress, a collection at least this often. */
  period_ms: number;
  /** Full and synchronous (a thread that serves no client), or the collector's quicker kind. */
  full: boolean;
}

/** Collect whenever the policy says so; returns the timer, already unref'd. */
export function collectPeriodically(policy: CollectPolicy): ReturnType<typeof setInterval> {
  const { counters, check_ms, period_ms, full } = policy;
  const at_last = counters.map((c) => c.read());
  let last_ms = performance.now();
  const t = setInterval(() => {
    const now_ms = performance.now();
    const values = counters.map((c) => c.read());
    if (values[0] === at_last[0]) return;
    const due = now_ms - last_ms >= period_ms || values.some((v, i) => v - at_last[i] >= counters[i].every);
    if (!due) return;
    for (let i = 0; i < values.length; i++) at_last[i] = values[i];
    last_ms = now_ms;
    Bun.gc(full);
  }, check_ms);
  t.unref();
  return t;
}

/** Writeback: a full collection once a second while `progress` moves. */
export function collectWhileBusy(progress: () => number): ReturnType<typeof setInterval> {
  return collectPeriodically({ counters: [{ read: progress, every: Number.POSITIVE_INFINITY }], check_ms: 1_000, period_ms: 1_000, full: true });
}

/**
 * For synchronous loops that decode many ksets and keys without yielding (GC reclaiming a whole
 * log in one pass, the dirty-log walk behind `status` and `drain`): a timer cannot fire there,
 * so the loop counts what it decoded and collects every `every` items.
 */
export class DecodeCollector {
  private items = 0;

  constructor(private readonly every: number) {}

  /** A kset and its keys were decoded. */
  add(keys: number): void {
    this.items += 1 + keys;
    if (this.items < this.every) return;
    this.items = 0;
    Bun.gc(false);
  }
}
