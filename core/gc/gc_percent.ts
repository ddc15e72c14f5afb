/**
 * Changing gc_percent while serving (the kernel's `gc_percent <0..90>` message, reference §4):
 * the new value is persisted in cache_info with the replica rules (the copy that is not the
 * latest is overwritten, so a torn write keeps the old value), then published, and GC is woken so
 * it judges the new threshold at once rather than at its next period.
 */
import { PcacheError } from "../errors.ts";
import { GC_PERCENT_MAX, GC_PERCENT_MIN } from "../format/constants.ts";
import { lock, unlock } from "../sync/lock.ts";
import type { EngineContext } from "../engine/context.ts";
import { CTL_GC_PERCENT, CTL_SEGS_USED, LOCK_CACHE_INFO, type SharedState, WAIT_CONTROL, WAIT_GC_KICK } from "../engine/shared_state.ts";

/** The one-line reason a gc_percent is refused, or null when it is valid. */
export function gcPercentProblem(gc_percent: unknown): string | null {
  if (typeof gc_percent === "number" && Number.isInteger(gc_percent) && gc_percent >= GC_PERCENT_MIN && gc_percent <= GC_PERCENT_MAX) {
    return null;
  }
  const shown = typeof gc_percent === "number" ? String(gc_percent) : JSON.stringify(gc_percent) ?? String(gc_percent);
  return `gc_percent must be a whole number from ${GC_PERCENT_MIN} to ${GC_PERCENT_MAX}, not ${shown}`;
}

/** Used segments at or over gc_percent of the cache, in the kernel's integer math (reference §2.10). */
export function atGcPercent(s: SharedState): boolean {
  const n_segs = s.layout.n_segs;
  return Atomics.load(s.ctl, CTL_SEGS_USED) >= Math.floor((n_segs * Atomics.load(s.ctl, CTL_GC_PERCENT)) / 100);
}

export function setGcPercent(ctx: EngineContext, gc_percent: number): void {
  const problem = gcPercentProblem(gc_percent);
  if (problem !== null) throw new PcacheError(problem);
  const s = ctx.s;
  lock(s.locks, LOCK_CACHE_INFO);
  try {
    // Persists cache_info first, then stores CTL_GC_PERCENT: nothing acts on an unsaved value.
    ctx.media.persistGcPercent(gc_percent);
  } finally {
    unlock(s.locks, LOCK_CACHE_INFO);
  }
  s.signal(WAIT_CONTROL);
  s.signal(WAIT_GC_KICK);
}
