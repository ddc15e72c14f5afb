/**
 * What the request paths of one thread work with: the shared state, this thread's views of the
 * index, the segment table and the key log, its data head, and its devices.
 */
import { CacheFullError } from "../errors.ts";
import { KEY_F_EMPTY } from "../format/constants.ts";
import type { BackingDevice } from "../device/backing.ts";
import type { KeyIndex } from "../index/key_index.ts";
import type { KsetLog } from "../log/kset_log.ts";
import { waitChangeAsync } from "../sync/wait_word.ts";
import type { Media } from "./media.ts";
import type { SegmentTable } from "./segments.ts";
import { type SharedState, STAT_DEFERRED, WAIT_GC_KICK, WAIT_SEG_FREED } from "./shared_state.ts";

export interface Logger {
  error(msg: string): void;
  warn(msg: string): void;
  info(msg: string): void;
  debug(msg: string): void;
}

export const quietLogger: Logger = { error() {}, warn() {}, info() {}, debug() {} };

export interface EngineLimits {
  /** How long a request waits for cache space (segments, index nodes) before failing. */
  space_wait_ms: number;
}

export const DEFAULT_LIMITS: EngineLimits = { space_wait_ms: 30_000 };

export class EngineContext {
  /** Bound once so the index can call it on the hot path without allocating. */
  readonly isStale: (id: number) => boolean;

  constructor(
    readonly s: SharedState,
    readonly media: Media,
    readonly idx: KeyIndex,
    readonly segs: SegmentTable,
    readonly log: KsetLog,
    readonly backing: BackingDevice,
    /** This thread's data head and statistics slot. */
    readonly slot: number,
    readonly limits: EngineLimits,
    readonly logger: Logger,
  ) {
    this.isStale = (id: number) =>
      (idx.flags[id] & KEY_F_EMPTY) === 0 && idx.seg_gen[id] < segs.gen(idx.cache_seg_id[id]);
  }

  /**
   * Allocate index nodes, waiting on the pool's wait word (freed nodes signal it) and kicking GC,
   * which prunes stale keys. Fails with CacheFullError after the configured bound.
   */
  async waitForNodes<T>(ready: () => T | null): Promise<T> {
    const deadline = Date.now() + this.limits.space_wait_ms;
    for (;;) {
      const got = ready();
      if (got !== null) return got;
      this.s.signal(WAIT_GC_KICK);
      const left = deadline - Date.now();
      if (left <= 0) {
        throw new CacheFullError(`index full: no key index node became free within ${this.limits.space_wait_ms} ms`);
      }
      await this.idx.waitForNodesAsync(2, Math.min(left, 1000));
    }
  }

  /**
   * Wait until `ready()` returns a result (not null), sleeping on the segment-freed wait word and
   * kicking GC. Fails with CacheFullError after the configured bound.
   */
  async waitForSpace<T>(what: string, ready: () => T | null): Promise<T> {
    const deadline = Date.now() + this.limits.space_wait_ms;
    let counted = false;
    for (;;) {
      const seen = Atomics.load(this.s.waits, WAIT_SEG_FREED);
      const got = ready();
      if (got !== null) return got;
      if (!counted) {
        this.s.addStat(this.slot, STAT_DEFERRED, 1);
        counted = true;
      }
      this.s.signal(WAIT_GC_KICK);
      const left = deadline - Date.now();
      if (left <= 0) {
        throw new CacheFullError(`cache full: no ${what} became free within ${this.limits.space_wait_ms} ms (is writeback failing?)`);
      }
      await waitChangeAsync(this.s.waits, WAIT_SEG_FREED, seen, Math.min(left, 1000));
    }
  }
}
