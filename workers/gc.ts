/**
 * GC worker: reclaims segments from key_tail up to dirty_tail and prunes stale index entries
 * (core/gc/gc.ts) until the engine stops.
 */
import { Gc } from "../core/gc/gc.ts";
import { STAT_GC_RUNS, STAT_GC_SEGS_FREED } from "../core/engine/shared_state.ts";
import { collectWhileBusy } from "../core/threads/collect.ts";
import { attachEngine, runWorker } from "../core/threads/worker_runtime.ts";

runWorker(async (start, { log, fatal }) => {
  const engine = attachEngine(start, log);
  const done = new Gc(engine.ctx, engine.meta).run();
  done.catch(fatal);
  const { s, slot } = engine.ctx;
  const gc_timer = collectWhileBusy(() => s.statOf(slot, STAT_GC_RUNS) + s.statOf(slot, STAT_GC_SEGS_FREED));
  return {
    stop: async () => {
      await done;
      clearInterval(gc_timer);
    },
  };
});
