/**
 * The cache engine of one thread: the request paths (read, write, flush, trim, write-zeroes,
 * prefetch) behind the interface the NBD server uses, over state shared with the other threads.
 *
 * Engine.open() is the main thread's start: validate the device, build the shared state and
 * replay the log. Engine.attach() builds another thread's engine over the same shared state.
 */
import { assert } from "../assert.ts";
import { PcacheError } from "../errors.ts";
import { SEG_DATA_SIZE } from "../format/constants.ts";
import { type CacheMeta, loadCache } from "../format/load_cache.ts";
import type { BackingDevice } from "../device/backing.ts";
import type { WriteData } from "../nbd/export.ts";
import { PayloadCursor } from "../paths/payload.ts";
import { createKeyIndexShared, KeyIndex, type KeyIndexShared, subtreesForBacking } from "../index/key_index.ts";
import { KsetLog } from "../log/kset_log.ts";
import { setGcPercent } from "../gc/gc_percent.ts";
import { setDeferMs } from "../writeback/defer.ts";
import type { PersistDomain } from "../persist/domain.ts";
import { readPath } from "../paths/read.ts";
import { writePath, zeroPath } from "../paths/write.ts";
import { DEFAULT_LIMITS, EngineContext, type EngineLimits, type Logger, quietLogger } from "./context.ts";
import { MetaMedia } from "./meta_media.ts";
import { replay, type ReplayResult } from "./replay.ts";
import { SegmentTable } from "./segments.ts";
import {
  CTL_CACHE_INFO_FLAGS,
  CTL_GC_PERCENT,
  CTL_STOPPING,
  SharedState,
  type SharedStateBuffers,
  STAT_FLUSHES,
  WAIT_WORDS,
} from "./shared_state.ts";

/** Errors the NBD layer maps to protocol error codes. */
export class EngineRangeError extends PcacheError {
  constructor(
    message: string,
    readonly errno: number,
  ) {
    super(message);
  }
}

/** Index nodes for a cache: two per 4 KiB of cache data, clamped (README documents it). */
export function nodesMaxFor(n_segs: number): number {
  const per_data = Math.floor((n_segs * SEG_DATA_SIZE) / 4096) * 2;
  return Math.min(Math.max(per_data, 65_536), 16 * 1024 * 1024);
}

export interface EngineOpenOptions {
  /** Refuse unless the cache's DATA_CRC flag equals this (when given). */
  data_crc?: boolean;
  /** In-memory ksets (the kernel uses one per CPU). */
  n_ksets?: number;
  /** Data heads: one per thread that writes (request workers). */
  n_heads?: number;
  /** Statistics slots: heads + writeback + GC + main. */
  n_stat_slots?: number;
  nodes_max?: number;
  limits?: Partial<EngineLimits>;
  logger?: Logger;
  /** Longest wait of dirty data while clients keep requests in flight (core/writeback/defer.ts); default 0: never, as the kernel. */
  writeback_defer_ms?: number;
}

/** What another thread needs to attach to a running engine (postMessage-able). */
export interface EngineShared {
  state: SharedStateBuffers;
  index: KeyIndexShared;
  meta: CacheMeta;
  backing_size_bytes: number;
  limits: EngineLimits;
}

export class Engine {
  readonly ctx: EngineContext;

  private constructor(
    readonly shared: EngineShared,
    ctx: EngineContext,
    readonly replay_result: ReplayResult | null,
  ) {
    this.ctx = ctx;
  }

  /** Main thread: validate the cache, build the shared state, replay the log. */
  static open(dom: PersistDomain, backing: BackingDevice, opts: EngineOpenOptions = {}): Engine {
    const meta = loadCache(dom, { backing_size_bytes: backing.size_bytes });
    if (opts.data_crc !== undefined && opts.data_crc !== meta.data_crc) {
      throw new PcacheError(
        `the cache was formatted with data_crc ${meta.data_crc ? "on" : "off"}; ${opts.data_crc ? "--data-crc" : "omitting --data-crc"} does not match (reformat to change it)`,
      );
    }
    const n_heads = opts.n_heads ?? 1;
    const state = SharedState.create({
      n_segs: meta.n_segs,
      n_ksets: Math.max(1, opts.n_ksets ?? navigator.hardwareConcurrency ?? 1),
      n_heads,
      n_stat_slots: opts.n_stat_slots ?? n_heads + 3,
    });
    const index = createKeyIndexShared(subtreesForBacking(backing.size_bytes), opts.nodes_max ?? nodesMaxFor(meta.n_segs));
    for (let seg = 0; seg < meta.n_segs; seg++) state.seg_gens[seg] = meta.seg_gens[seg];
    MetaMedia.initSharedReplicaState(state, meta);
    state.ctl[CTL_GC_PERCENT] = meta.gc_percent;
    state.ctl[CTL_CACHE_INFO_FLAGS] = meta.cache_info.value.flags;
    setDeferMs(state, opts.writeback_defer_ms ?? 0);
    const shared: EngineShared = {
      state: state.buffers,
      index,
      meta,
      backing_size_bytes: backing.size_bytes,
      limits: { ...DEFAULT_LIMITS, ...opts.limits },
    };
    const ctx = Engine.context(shared, dom, backing, 0, opts.logger ?? quietLogger, state);
    const result = replay(ctx, meta);
    ctx.log.epochs.start();
    return new Engine(shared, ctx, result);
  }

  /** Another thread: the same engine over the shared state, with its own slot (data head). */
  static attach(shared: EngineShared, dom: PersistDomain, backing: BackingDevice, slot: number, logger: Logger = quietLogger): Engine {
    return new Engine(shared, Engine.context(shared, dom, backing, slot, logger), null);
  }

  private static context(
    shared: EngineShared,
    dom: PersistDomain,
    backing: BackingDevice,
    slot: number,
    logger: Logger,
    state = new SharedState(shared.state),
  ): EngineContext {
    assert(slot >= 0 && slot < state.layout.n_stat_slots, `slot ${slot} out of range`);
    const media = new MetaMedia(dom, shared.meta, state, shared.backing_size_bytes);
    const idx = new KeyIndex(shared.index);
    const segs = new SegmentTable(state, media, slot);
    const log = new KsetLog(state, media, segs, slot, (err) => logger.error(`kset flush failed: ${err.message}`));
    // Threads without a data head (writeback, GC, main) never allocate data.
    const head = Math.min(slot, state.layout.n_heads - 1);
    return new EngineContext(state, media, idx, segs, log, backing, head, shared.limits, logger);
  }

  get size_bytes(): number {
    return this.shared.backing_size_bytes;
  }

  get meta(): CacheMeta {
    return this.shared.meta;
  }

  private check(off: number, len: number, errno_past_end: number): void {
    if (!Number.isSafeInteger(off) || !Number.isSafeInteger(len) || off < 0 || len < 0) {
      throw new EngineRangeError(`bad range ${off}+${len}`, 22);
    }
    if (off + len > this.size_bytes) throw new EngineRangeError(`range ${off}+${len} is past the end (${this.size_bytes})`, errno_past_end);
  }

  async read(off: number, len: number, dst: Uint8Array): Promise<void> {
    await this.readNow(off, len, dst);
  }

  async write(off: number, data: WriteData, fua: boolean): Promise<void> {
    await this.writeNow(off, data, fua);
  }

  /**
   * read() for the request path: undefined when it finished at once (every byte cached), else
   * the promise of the backing reads. Throws bad ranges and cache errors synchronously.
   */
  readNow(off: number, len: number, dst: Uint8Array): Promise<void> | undefined {
    this.check(off, len, 22);
    assert(dst.length >= len, "read buffer too small");
    return readPath(this.ctx, off, dst.length === len ? dst : dst.subarray(0, len));
  }

  /** write() for the request path: undefined when it finished at once, else the promise of the rest. */
  writeNow(off: number, data: WriteData, fua: boolean): Promise<void> | undefined {
    const payload = new PayloadCursor(data);
    this.check(off, payload.length, 28);
    return writePath(this.ctx, off, payload, fua);
  }

  /** Every completed write (of any thread) durable: close every kset, as a flush-epoch boundary. */
  async flush(): Promise<void> {
    await this.ctx.log.closeAllAsBoundary(this.ctx.limits.space_wait_ms);
    this.ctx.s.addStat(this.ctx.slot, STAT_FLUSHES, 1);
  }

  async writeZeroes(off: number, len: number, opts: { fua: boolean }): Promise<void> {
    this.check(off, len, 28);
    await zeroPath(this.ctx, off, len, opts.fua);
  }

  /** Trim is logged as zeroes: stale cached bytes can never come back, before or after restart. */
  async trim(off: number, len: number, fua: boolean): Promise<void> {
    this.check(off, len, 22);
    await zeroPath(this.ctx, off, len, fua);
  }

  /** Prefetch into the cache: a read whose data is dropped. */
  async cache(off: number, len: number): Promise<void> {
    this.check(off, len, 22);
    const chunk = 1024 * 1024;
    const buf = new Uint8Array(Math.min(chunk, Math.max(len, 1)));
    for (let done = 0; done < len; done += chunk) {
      const n = Math.min(chunk, len - done);
      await readPath(this.ctx, off + done, buf.subarray(0, n));
    }
  }

  /** base:allocation: everything reads as allocated data (status 0 is always correct). */
  async blockStatus(off: number, len: number): Promise<Array<{ length: number; flags: number }>> {
    this.check(off, len, 22);
    return [{ length: len, flags: 0 }];
  }

  /**
   * Change gc_percent while serving (0..90): persisted in cache_info with the replica rules, and
   * GC re-evaluates at once. Throws PcacheError for a value outside the range.
   */
  setGcPercent(gc_percent: number): void {
    setGcPercent(this.ctx, gc_percent);
  }

  /** Stop this thread's timers and close every kset (shutdown). */
  async close(): Promise<void> {
    this.ctx.log.stopTimers();
    await this.ctx.log.closeAll(this.ctx.limits.space_wait_ms);
    this.stopBackground();
  }

  /**
   * Tell writeback and GC to stop (CTL_STOPPING) and wake them so they see it now rather than
   * after their idle wait. Without close() first, open ksets stay open (failure path only: the
   * caller stops this thread's kset timers itself).
   */
  stopBackground(): void {
    Atomics.store(this.ctx.s.ctl, CTL_STOPPING, 1);
    for (let w = 0; w < WAIT_WORDS; w++) this.ctx.s.signal(w);
  }
}
