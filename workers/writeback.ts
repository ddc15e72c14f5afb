/**
 * Writeback worker: writes dirty ksets back to the backing device in log order
 * (core/writeback/writeback.ts) until the engine stops.
 */
import { STAT_WRITEBACK_KSETS } from "../core/engine/shared_state.ts";
import { collectWhileBusy } from "../core/threads/collect.ts";
import { attachEngine, runWorker } from "../core/threads/worker_runtime.ts";
import { Writeback } from "../core/writeback/writeback.ts";

runWorker(async (start, { log, fatal }) => {
  const engine = attachEngine(start, log, { sync_writes: true });
  const done = new Writeback(engine.ctx, engine.meta).run();
  done.catch(fatal);
  const { s, slot } = engine.ctx;
  const gc_timer = collectWhileBusy(() => s.statOf(slot, STAT_WRITEBACK_KSETS));
  // Ends once the main thread sets CTL_STOPPING (after every request worker closed its ksets).
  return {
    stop: async () => {
      await done;
      clearInterval(gc_timer);
    },
  };
});
