/**
 * GC worker: reclaims segments from key_tail up to dirty_tail and prunes stale index entries
 * (core/gc/gc.ts) until the engine stops.
 */
import { Gc } from "../core/gc/gc.ts";
import { attachEngine, runWorker } from "../core/threads/worker_runtime.ts";

runWorker(async (start, { log, fatal }) => {
  const engine = attachEngine(start, log);
  const done = new Gc(engine.ctx, engine.meta).run();
  done.catch(fatal);
  // GC collects its own garbage as it decodes (core/gc/gc.ts).
  return { stop: () => done };
});
