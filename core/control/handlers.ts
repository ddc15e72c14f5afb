/**
 * What the control requests do, on the main thread's own engine (its own statistics slot; it
 * never writes data, it only closes ksets, reads positions and the log, and sets control words).
 *
 * Drain: drain_start closes every kset (so every acknowledged write is in the log) and wakes
 * writeback (a kset close already does; the WAIT_CONTROL kick also cuts short a retry delay
 * after a backing error). Its target is the key_head right after that close: a drain waits for
 * dirty_tail to reach that position, not for writes that arrive during the drain.
 * Writeback has no other delay before writing a kset back.
 */
import type { Engine } from "../engine/engine.ts";
import type { Logger } from "../engine/context.ts";
import { PcacheError } from "../errors.ts";
import {
  CTL_GC_PERCENT,
  CTL_WRITEBACK_ERROR,
  CTL_WRITEBACK_PAUSED,
  LOCK_KEY_HEAD,
  POS_KEY_HEAD,
  WAIT_CONTROL,
  WAIT_LOG_APPENDED,
} from "../engine/shared_state.ts";
import { type CachePos, posToString } from "../log/position.ts";
import type { WalkMeta } from "../log/walk.ts";
import { unlock } from "../sync/lock.ts";
import { lockBounded, scanDirty } from "./dirty.ts";
import type { StateMonitor } from "./monitor.ts";
import type { ControlRequest, DrainProgress, DrainStartResult } from "./protocol.ts";
import type { ControlHandler } from "./server.ts";
import { collectStatus, type StatusSources, type WorkerRow } from "./status.ts";
import { forceWriteback } from "../writeback/defer.ts";

export interface ControlServiceOptions {
  /** The main thread's engine. */
  engine: Engine;
  monitor: StateMonitor;
  workers(): WorkerRow[];
  persistence_domain: string;
  persistence_detail: string;
  read_only: boolean;
  log: Logger;
}

export function controlHandler(opts: ControlServiceOptions): ControlHandler {
  const { engine, log } = opts;
  const ctx = engine.ctx;
  const meta = engine.meta;
  // Generations change while we run: stale-ness is judged against the shared table.
  const walk_meta: WalkMeta = { n_segs: meta.n_segs, seg_ids: meta.seg_ids, seg_gens: ctx.s.seg_gens, data_crc: meta.data_crc };
  const sources: StatusSources = { ctx, meta, walk_meta, ...opts };
  const writebackState = () => opts.workers().find((w) => w.role === "writeback")?.state ?? "not started";

  const ops: { [K in ControlRequest["op"]]: (req: Extract<ControlRequest, { op: K }>) => Promise<unknown> } = {
    status: async () => collectStatus(sources),
    gc_percent: async (req) => {
      const previous = Atomics.load(ctx.s.ctl, CTL_GC_PERCENT);
      engine.setGcPercent(req.value);
      log.info(`gc_percent changed from ${previous} to ${req.value} (persisted in cache_info)`);
      return { gc_percent: req.value, previous };
    },
    drain_start: async (): Promise<DrainStartResult> => {
      if (opts.read_only) throw new PcacheError("this server runs --read-only: writeback is off, so dirty data stays in the cache (restart it without --read-only to drain)");
      const state = writebackState();
      if (state !== "running") throw new PcacheError(`writeback is ${state}, so nothing can be drained (see the server's log)`);
      // Closing ksets waits for their locks; a failed worker may hold one forever.
      const failed = opts.workers().find((w) => w.state === "failed");
      if (failed !== undefined) throw new PcacheError(`${failed.name} failed; the server is stopping (see its log)`);
      await engine.flush();
      forceWriteback(ctx.s); // after the close: writeback counts it done only once it passes these ksets
      ctx.s.signal(WAIT_LOG_APPENDED);
      ctx.s.signal(WAIT_CONTROL);
      const target = keyHead(engine);
      const scan = scanDirty(ctx, walk_meta, target);
      log.info(`drain requested: writing back up to key_head ${posToString(target)}`);
      return { target, left_bytes: scan?.before_target_bytes ?? null };
    },
    drain_progress: async (req): Promise<DrainProgress> => {
      const t0 = performance.now();
      const scan = scanDirty(ctx, walk_meta, req.target);
      return {
        reached: scan?.target_reached ?? false,
        left_bytes: scan?.before_target_bytes ?? null,
        dirty_tail: scan ? posToString(scan.dirty_tail) : "?",
        key_head: scan ? posToString(scan.key_head) : "?",
        writeback_error: Atomics.load(ctx.s.ctl, CTL_WRITEBACK_ERROR),
        writeback_paused: Atomics.load(ctx.s.ctl, CTL_WRITEBACK_PAUSED) !== 0,
        writeback_state: writebackState(),
        scan_ms: performance.now() - t0,
      };
    },
    writeback_pause: async (req) => {
      Atomics.store(ctx.s.ctl, CTL_WRITEBACK_PAUSED, req.paused ? 1 : 0);
      ctx.s.signal(WAIT_CONTROL);
      if (req.paused) log.warn("writeback paused through the control socket (test hook)");
      else log.info("writeback resumed");
      return { paused: req.paused };
    },
  };
  return (req) => (ops[req.op] as (r: ControlRequest) => Promise<unknown>)(req);
}

function keyHead(engine: Engine): CachePos {
  const s = engine.ctx.s;
  lockBounded(s.locks, LOCK_KEY_HEAD);
  try {
    return { cache_seg_id: s.pos[POS_KEY_HEAD], seg_off: s.pos[POS_KEY_HEAD + 1] };
  } finally {
    unlock(s.locks, LOCK_KEY_HEAD);
  }
}
