/**
 * Request worker: serves NBD connections (accepted on the listening socket shared by every
 * request worker, or the one stdin-mode client) against the shared engine.
 */
import { EngineExport } from "../core/engine/nbd_export.ts";
import {
  CTL_CONNECTIONS,
  STAT_BUSY_POLL_HITS,
  STAT_BUSY_POLL_SPINS,
  STAT_BUSY_POLL_US,
  STAT_PIPELINED_REQUESTS,
  STAT_READ_HIT_BYTES,
  STAT_READ_HIT_COUNT,
  STAT_READ_MISS_BYTES,
  STAT_READ_MISS_COUNT,
  STAT_WRITE_BYTES,
  STAT_WRITE_COUNT,
} from "../core/engine/shared_state.ts";
import { NbdServer, type ConnectionGate } from "../core/nbd/server.ts";
import { collectPeriodically } from "../core/threads/collect.ts";
import { attachEngine, runWorker } from "../core/threads/worker_runtime.ts";

/** How often the worker looks at its counters to decide on a collection. */
const GC_CHECK_MS = 25;
/** A collection once this many requests were served since the last one... */
const GC_EVERY_REQUESTS = 20_000;
/** ...or this many payload bytes moved (each received chunk is a fresh buffer)... */
const GC_EVERY_BYTES = 64 * 1024 * 1024;
/** ...or once a second while any were. */
const GC_INTERVAL_MS = 1000;
/** How often the server's counters (busy-poll, pipelined requests) are copied to shared memory. */
const COUNTERS_PUBLISH_MS = 100;

runWorker(async (start, { log, post, fatal }) => {
  const opts = start.request;
  if (!opts) throw new Error("request worker started without request options");
  const engine = attachEngine(start, log);
  const ctl = engine.ctx.s.ctl;
  // One cap for the whole server, counted in shared memory.
  const gate: ConnectionGate = {
    max: opts.max_connections,
    tryAcquire() {
      if (Atomics.add(ctl, CTL_CONNECTIONS, 1) < opts.max_connections) return true;
      Atomics.sub(ctl, CTL_CONNECTIONS, 1);
      return false;
    },
    release() {
      Atomics.sub(ctl, CTL_CONNECTIONS, 1);
    },
  };
  const server = new NbdServer({
    export: new EngineExport(engine, opts.read_only),
    export_name: opts.export_name,
    description: opts.description,
    max_connections: opts.max_connections,
    busy_poll: { budget_us: opts.busy_poll_us },
    gate,
    log: (level, msg) => log[level](msg),
  });
  const { s: st, slot } = engine.ctx;
  // These counters live in the server; status and the writeback gate read them from shared memory.
  const publishCounters = () => {
    const bp = server.busy_poll_stats;
    st.setStat(slot, STAT_BUSY_POLL_SPINS, bp.spins);
    st.setStat(slot, STAT_BUSY_POLL_HITS, bp.hits);
    st.setStat(slot, STAT_BUSY_POLL_US, Math.round(bp.spin_ms * 1000));
    st.setStat(slot, STAT_PIPELINED_REQUESTS, server.pipelined_requests);
  };
  const publish_timer = setInterval(publishCounters, COUNTERS_PUBLISH_MS);
  publish_timer.unref();
  // Garbage from each request (promises, views, replies) is small, but at 150 000 requests a
  // second it piled up by hundreds of MiB between the collector's own collections; so did the
  // received chunks of 1 MiB writes at 1.6 GiB/s. A collection every 20 000 requests or 64 MiB
  // of payload (or every second while serving) keeps resident memory near the README's bound
  // for about 1 ms each; a worker that served nothing since skips it.
  const gc_timer = collectPeriodically({
    counters: [
      { read: () => st.statOf(slot, STAT_WRITE_COUNT) + st.statOf(slot, STAT_READ_HIT_COUNT) + st.statOf(slot, STAT_READ_MISS_COUNT), every: GC_EVERY_REQUESTS },
      { read: () => st.statOf(slot, STAT_WRITE_BYTES) + st.statOf(slot, STAT_READ_HIT_BYTES) + st.statOf(slot, STAT_READ_MISS_BYTES), every: GC_EVERY_BYTES },
    ],
    check_ms: GC_CHECK_MS,
    period_ms: GC_INTERVAL_MS,
    full: false,
  });
  if (opts.listen.kind === "fd") {
    await server.listen({ kind: "fd", fd: opts.listen.fd });
  } else if (opts.listen.kind === "connected") {
    server.serveFd(opts.listen.fd).then(() => post({ type: "client_gone" }), fatal);
  }
  return {
    async stop(timeout_ms: number) {
      clearInterval(gc_timer);
      clearInterval(publish_timer);
      await server.stop({ timeout_ms });
      // This thread's ksets timers go with it; closing every kset makes its writes durable.
      engine.ctx.log.stopTimers();
      await engine.ctx.log.closeAll(engine.ctx.limits.space_wait_ms);
    },
  };
});
