/**
 * Everything the request, writeback and GC workers share, in SharedArrayBuffers sized once at
 * start (ARCHITECTURE §3). The object is plain data so it can be posted to a worker; each thread
 * wraps it in its own views.
 *
 * Lock order (outer -> inner): subtree, kset, key_head, segment table. A holder never waits on
 * I/O or on another thread's progress.
 */
import { KSET_SIZE_MAX } from "../format/constants.ts";
import { signal } from "../sync/wait_word.ts";

/** Lock words (Int32 indexes into `locks`). Kset locks follow at LOCK_KSET_BASE + kset_id. */
export const LOCK_SEG_TABLE = 0;
export const LOCK_KEY_HEAD = 1;
export const LOCK_KEY_TAIL = 2;
export const LOCK_DIRTY_TAIL = 3;
export const LOCK_CACHE_INFO = 4;
export const LOCK_KSET_BASE = 8;

/** Wait words: counters bumped (and notified) by the side that makes progress. */
export const WAIT_SEG_FREED = 0; // a segment became free (cache-full waiters)
export const WAIT_LOG_APPENDED = 1; // a kset was closed (writeback has work)
export const WAIT_DIRTY_TAIL = 2; // dirty_tail moved (GC has work, drain progress)
export const WAIT_GC_KICK = 3; // someone wants GC to run now
export const WAIT_KEY_TAIL = 4; // key_tail moved
export const WAIT_CONTROL = 5; // gc_percent / pause flags changed
export const WAIT_FLUSH_TURN = 6; // a flush recorded its boundary (core/log/flush_epochs.ts)
export const WAIT_WORDS = 8;

/** Positions (Int32 indexes into `pos`): cache_seg_id, seg_off pairs plus replica state. */
export const POS_KEY_HEAD = 0; // [seg, off]
export const POS_DIRTY_TAIL = 2; // [seg, off, slot, seq]
export const POS_KEY_TAIL = 6; // [seg, off, slot, seq]
export const POS_WORDS = 10;

/** Control and state words (Int32 indexes into `ctl`). */
export const CTL_GC_PERCENT = 0;
export const CTL_CACHE_INFO_SLOT = 1; // slot of the latest cache_info copy, -1 none
export const CTL_CACHE_INFO_SEQ = 2;
export const CTL_CACHE_INFO_FLAGS = 3;
export const CTL_SEGS_USED = 4;
export const CTL_CACHE_FULL = 5; // 1 while some request waits for a segment
export const CTL_STOPPING = 6;
export const CTL_WRITEBACK_PAUSED = 7; // test hook and `drain` control
export const CTL_SEG_HINT = 8; // rotating allocation hint
export const CTL_ZERO_SEG = 9; // zero extent (at seg_off 0 of this segment) or -1
export const CTL_WRITEBACK_ERROR = 11; // errno of the last failed backing write, 0 when healthy
export const CTL_GC_ERROR = 12;
export const CTL_CONNECTIONS = 13; // open NBD connections over every request worker
/** Flush epochs (core/log/flush_epochs.ts): the last epoch begun, the last one recorded. */
export const CTL_FLUSH_EPOCH = 16;
export const CTL_FLUSH_RECORDED = 17;
/** Boundary ring: entries pushed and taken (counters), and 1 once recording stopped for good. */
export const CTL_EPOCH_RING_HEAD = 18;
export const CTL_EPOCH_RING_TAIL = 19;
export const CTL_EPOCH_RING_OFF = 20;
/** Writeback deferral (core/writeback/defer.ts): longest wait, drains asked for, 1 while deferring. */
export const CTL_WRITEBACK_DEFER_MS = 21;
export const CTL_WRITEBACK_FORCE = 22;
export const CTL_WRITEBACK_DEFERRED = 23;
export const CTL_WORDS = 28;

/** Flush boundaries the ring holds before new ones are dropped (dropping only costs skips). */
export const EPOCH_RING_ENTRIES = 4096;
export const EPOCH_RING_ENTRY_WORDS = 3;
const EPOCH_RING_WORDS = EPOCH_RING_ENTRIES * EPOCH_RING_ENTRY_WORDS;

/** Per-kset words (Int32 indexes into `kset_meta`, KSET_META_WORDS per kset). */
export const KSET_KEY_NUM = 0;
export const KSET_CLOSES = 1; // bumped by every close (a key appended at count c is on media once it differs)
export const KSET_TIMER_ARMED = 2;
export const KSET_META_WORDS = 4;

/** Per data head: cache_seg_id (-1 = no segment) and seg_off. One head per request worker slot. */
export const HEAD_SEG = 0;
export const HEAD_OFF = 1;
export const HEAD_WORDS = 2;

/** Statistics (Float64 per worker slot, written only by that slot's thread; summed by readers). */
export const STAT_READ_HIT_COUNT = 0;
export const STAT_READ_HIT_BYTES = 1;
export const STAT_READ_MISS_COUNT = 2;
export const STAT_READ_MISS_BYTES = 3;
export const STAT_WRITE_COUNT = 4;
export const STAT_WRITE_BYTES = 5;
export const STAT_WRITEBACK_BYTES = 6;
export const STAT_WRITEBACK_KSETS = 7;
export const STAT_GC_RUNS = 8;
export const STAT_GC_SEGS_FREED = 9;
export const STAT_DEFERRED = 10;
export const STAT_ERR_BACKING_READ = 11;
export const STAT_ERR_BACKING_WRITE = 12;
export const STAT_ERR_CRC = 13;
export const STAT_KSETS_CLOSED = 14;
export const STAT_FLUSHES = 15;
export const STAT_ZERO_BYTES = 16;
/** Busy-polls after a reply (core/nbd/busy_poll.ts), those that found the next request, µs spent. */
export const STAT_BUSY_POLL_SPINS = 17;
export const STAT_BUSY_POLL_HITS = 18;
export const STAT_BUSY_POLL_US = 19;
/** Dirty bytes writeback left out because a later key of the same flush epoch overwrote them. */
export const STAT_WRITEBACK_SKIPPED_BYTES = 20;
/** Requests that began pipelined on the request worker (core/nbd/connection.ts ServerLoad; published every 100 ms). */
export const STAT_PIPELINED_REQUESTS = 21;
export const STAT_WORDS = 24;

export interface SharedStateLayout {
  n_segs: number;
  n_ksets: number;
  n_heads: number;
  /** Worker slots for statistics: heads + writeback + GC + main. */
  n_stat_slots: number;
}

/** Plain object of SharedArrayBuffers; postMessage-able. */
export interface SharedStateBuffers extends SharedStateLayout {
  locks: SharedArrayBuffer;
  waits: SharedArrayBuffer;
  pos: SharedArrayBuffer;
  ctl: SharedArrayBuffer;
  seg_map: SharedArrayBuffer; // one Int32 per logical segment: 1 used, 0 free
  seg_refs: SharedArrayBuffer; // Int32 refcount per logical segment
  seg_gens: SharedArrayBuffer; // Float64 generation per logical segment (written under LOCK_SEG_TABLE)
  seg_gen_seq: SharedArrayBuffer; // Int32 bumped with every gen change (seqlock for cache reads)
  seg_gen_slots: SharedArrayBuffer; // Int32 [slot, seq] of the latest seg_gen replica per segment
  kset_meta: SharedArrayBuffer;
  kset_bufs: SharedArrayBuffer; // n_ksets * KSET_SIZE_MAX bytes: ksets being filled
  heads: SharedArrayBuffer;
  stats: SharedArrayBuffer;
  epoch_ring: SharedArrayBuffer; // Int32 [cache_seg_id, seg_off, epoch] per flush boundary
}

/** Views of the shared buffers for one thread. */
export class SharedState {
  readonly layout: SharedStateLayout;
  readonly locks: Int32Array;
  readonly waits: Int32Array;
  readonly pos: Int32Array;
  readonly ctl: Int32Array;
  readonly seg_map: Int32Array;
  readonly seg_refs: Int32Array;
  readonly seg_gens: Float64Array;
  readonly seg_gen_seq: Int32Array;
  readonly seg_gen_slots: Int32Array;
  readonly kset_meta: Int32Array;
  readonly kset_bufs: Uint8Array;
  readonly heads: Int32Array;
  readonly stats: Float64Array;
  readonly epoch_ring: Int32Array;

  constructor(readonly buffers: SharedStateBuffers) {
    this.layout = { n_segs: buffers.n_segs, n_ksets: buffers.n_ksets, n_heads: buffers.n_heads, n_stat_slots: buffers.n_stat_slots };
    this.locks = new Int32Array(buffers.locks);
    this.waits = new Int32Array(buffers.waits);
    this.pos = new Int32Array(buffers.pos);
    this.ctl = new Int32Array(buffers.ctl);
    this.seg_map = new Int32Array(buffers.seg_map);
    this.seg_refs = new Int32Array(buffers.seg_refs);
    this.seg_gens = new Float64Array(buffers.seg_gens);
    this.seg_gen_seq = new Int32Array(buffers.seg_gen_seq);
    this.seg_gen_slots = new Int32Array(buffers.seg_gen_slots);
    this.kset_meta = new Int32Array(buffers.kset_meta);
    this.kset_bufs = new Uint8Array(buffers.kset_bufs);
    this.heads = new Int32Array(buffers.heads);
    this.stats = new Float64Array(buffers.stats);
    this.epoch_ring = new Int32Array(buffers.epoch_ring);
  }

  static create(layout: SharedStateLayout): SharedState {
    const sab = (bytes: number) => new SharedArrayBuffer(Math.max(8, bytes));
    const b: SharedStateBuffers = {
      ...layout,
      locks: sab(4 * (LOCK_KSET_BASE + layout.n_ksets)),
      waits: sab(4 * WAIT_WORDS),
      pos: sab(4 * POS_WORDS),
      ctl: sab(4 * CTL_WORDS),
      seg_map: sab(4 * layout.n_segs),
      seg_refs: sab(4 * layout.n_segs),
      seg_gens: sab(8 * layout.n_segs),
      seg_gen_seq: sab(4 * layout.n_segs),
      seg_gen_slots: sab(8 * layout.n_segs),
      kset_meta: sab(4 * KSET_META_WORDS * layout.n_ksets),
      kset_bufs: sab(KSET_SIZE_MAX * layout.n_ksets),
      heads: sab(4 * HEAD_WORDS * layout.n_heads),
      stats: sab(8 * STAT_WORDS * layout.n_stat_slots),
      epoch_ring: sab(4 * EPOCH_RING_WORDS),
    };
    const s = new SharedState(b);
    for (let h = 0; h < layout.n_heads; h++) s.heads[h * HEAD_WORDS + HEAD_SEG] = -1;
    s.ctl[CTL_CACHE_INFO_SLOT] = -1;
    s.ctl[CTL_ZERO_SEG] = -1;
    return s;
  }

  /** Bytes of shared memory besides the key index. */
  static bytesFor(layout: SharedStateLayout): number {
    const fixed = 4 * (WAIT_WORDS + POS_WORDS + CTL_WORDS + EPOCH_RING_WORDS);
    return layout.n_segs * 28 + layout.n_ksets * (KSET_SIZE_MAX + 16 + 4) + layout.n_heads * 8 + layout.n_stat_slots * STAT_WORDS * 8 + fixed;
  }

  addStat(slot: number, stat: number, amount: number): void {
    this.stats[slot * STAT_WORDS + stat] += amount;
  }

  /** Sets one slot's statistic (for counters a thread keeps itself and publishes). */
  setStat(slot: number, stat: number, value: number): void {
    this.stats[slot * STAT_WORDS + stat] = value;
  }

  /** One slot's (one thread's) value of a statistic. */
  statOf(slot: number, stat: number): number {
    return this.stats[slot * STAT_WORDS + stat];
  }

  /** Sum of one statistic over every slot (racy read, fine for reporting). */
  statTotal(stat: number): number {
    let total = 0;
    for (let slot = 0; slot < this.layout.n_stat_slots; slot++) total += this.stats[slot * STAT_WORDS + stat];
    return total;
  }

  /** Bump a wait word and wake everyone waiting on it. */
  signal(word: number): void {
    signal(this.waits, word);
  }
}
