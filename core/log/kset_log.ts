/**
 * The key log: n_ksets in-memory ksets being filled, and their close into the on-media log at
 * key_head (reference §2.5).
 *
 * Every byte of the backing device maps to one kset (kset_id = (off >> 22) mod n_ksets), so the
 * keys of one byte reach the log in write order and replay's "later wins" is correct.
 *
 * Durability ordering of a close: the kset and the 24-byte zero terminator after it share one
 * barrier. A log segment is zeroed (durably) before the LAST kset that leads into it, so nothing
 * stale past key_head can ever be mistaken for a kset, even if a crash keeps the kset and drops
 * its terminator.
 */
import { assert, fail } from "../assert.ts";
import { CacheFullError } from "../errors.ts";
import {
  KEY_SIZE,
  KSET_HEADER_SIZE,
  KSET_KEYS_MAX,
  KSET_SIZE_MAX,
  SEG_DATA_SIZE,
  SUBTREE_SPAN,
  ksetSize,
} from "../format/constants.ts";
import { encodeKeyInto, encodeKsetHeader, encodeLastKset, type KeyFields } from "../format/kset.ts";
import type { LogPos, Media } from "../engine/media.ts";
import type { SegmentTable } from "../engine/segments.ts";
import {
  KSET_CLOSES,
  KSET_KEY_NUM,
  KSET_META_WORDS,
  KSET_TIMER_ARMED,
  LOCK_KEY_HEAD,
  LOCK_KSET_BASE,
  POS_KEY_HEAD,
  type SharedState,
  STAT_KSETS_CLOSED,
  WAIT_LOG_APPENDED,
  WAIT_SEG_FREED,
} from "../engine/shared_state.ts";
import { lock, unlock } from "../sync/lock.ts";
import { zeroRange } from "../persist/zero.ts";
import { FlushEpochs } from "./flush_epochs.ts";
import { waitChangeAsync } from "../sync/wait_word.ts";

/** A kset is closed no later than this after its first key. */
export const KSET_FLUSH_DELAY_MS = 1000;

/** How much longer than its own close a boundary waits for an earlier one to be recorded. */
const BOUNDARY_TURN_MARGIN_MS = 5_000;

const TERMINATOR = new Uint8Array(KSET_HEADER_SIZE);

export class KsetLog {
  private readonly encode_view: DataView;
  private readonly timers: Array<ReturnType<typeof setTimeout> | undefined>;
  readonly epochs: FlushEpochs;

  constructor(
    private readonly s: SharedState,
    private readonly media: Media,
    private readonly segs: SegmentTable,
    private readonly stat_slot: number,
    /** Called when a timer-driven close fails for good (no space within the wait bound). */
    private readonly onCloseError: (err: Error) => void = () => {},
  ) {
    this.encode_view = new DataView(s.buffers.kset_bufs);
    this.timers = new Array(s.layout.n_ksets).fill(undefined);
    this.epochs = new FlushEpochs(s);
  }

  get n_ksets(): number {
    return this.s.layout.n_ksets;
  }

  ksetIdOf(off: number): number {
    return Math.floor(off / SUBTREE_SPAN) % this.n_ksets;
  }

  lock(kset_id: number): void {
    lock(this.s.locks, LOCK_KSET_BASE + kset_id);
  }

  unlock(kset_id: number): void {
    unlock(this.s.locks, LOCK_KSET_BASE + kset_id);
  }

  keyNum(kset_id: number): number {
    return this.s.kset_meta[kset_id * KSET_META_WORDS + KSET_KEY_NUM];
  }

  /** How many times the kset was closed; a key appended at count c is on media once it differs. */
  closes(kset_id: number): number {
    return Atomics.load(this.s.kset_meta, kset_id * KSET_META_WORDS + KSET_CLOSES);
  }

  isFull(kset_id: number): boolean {
    return this.keyNum(kset_id) >= KSET_KEYS_MAX;
  }

  /** Append a key (caller holds the kset lock and made sure it is not full). */
  append(kset_id: number, key: KeyFields): number {
    const meta = kset_id * KSET_META_WORDS;
    const n = this.s.kset_meta[meta + KSET_KEY_NUM];
    if (n >= KSET_KEYS_MAX) fail(`append to full kset ${kset_id}`);
    encodeKeyInto(this.encode_view, kset_id * KSET_SIZE_MAX + KSET_HEADER_SIZE + n * KEY_SIZE, key);
    this.s.kset_meta[meta + KSET_KEY_NUM] = n + 1;
    if (n === 0) this.armTimer(kset_id);
    return n + 1;
  }

  /**
   * Write the kset to the log at key_head (caller holds the kset lock). Returns false, with
   * nothing written, when the log needed a new segment and none was free.
   */
  close(kset_id: number): boolean {
    const meta = kset_id * KSET_META_WORDS;
    const key_num = this.s.kset_meta[meta + KSET_KEY_NUM];
    if (key_num === 0) return true;
    const size = ksetSize(key_num);
    const buf_off = kset_id * KSET_SIZE_MAX;
    encodeKsetHeader(this.encode_view, buf_off, key_num);
    const kset = this.s.kset_bufs.subarray(buf_off, buf_off + size);
    const dom = this.media.dom;
    const p = this.s.pos;
    lock(this.s.locks, LOCK_KEY_HEAD);
    try {
      // Always keep room for a LAST kset behind the last normal one.
      if (SEG_DATA_SIZE - p[POS_KEY_HEAD + 1] < size + KSET_HEADER_SIZE) {
        if (!this.roll()) return false;
      }
      const head: LogPos = { cache_seg_id: p[POS_KEY_HEAD], seg_off: p[POS_KEY_HEAD + 1] };
      const at = this.media.dataOff(head.cache_seg_id, head.seg_off);
      dom.write(at + size, TERMINATOR);
      dom.write(at, kset);
      dom.flush(at, size + KSET_HEADER_SIZE);
      dom.fence();
      p[POS_KEY_HEAD + 1] = head.seg_off + size;
    } finally {
      unlock(this.s.locks, LOCK_KEY_HEAD);
    }
    this.s.kset_meta[meta + KSET_KEY_NUM] = 0;
    Atomics.add(this.s.kset_meta, meta + KSET_CLOSES, 1);
    this.s.addStat(this.stat_slot, STAT_KSETS_CLOSED, 1);
    this.s.signal(WAIT_LOG_APPENDED);
    return true;
  }

  /** Move key_head into a fresh, zeroed log segment behind a LAST kset (key_head lock held). */
  private roll(): boolean {
    const p = this.s.pos;
    const next = this.segs.allocSegment(true);
    if (next < 0) return false;
    const dom = this.media.dom;
    // The new segment must read as an empty log before anything can lead into it.
    zeroRange(dom, this.media.dataOff(next, 0), SEG_DATA_SIZE);
    dom.fence();
    const at = this.media.dataOff(p[POS_KEY_HEAD], p[POS_KEY_HEAD + 1]);
    dom.write(at, encodeLastKset(next));
    dom.flush(at, KSET_HEADER_SIZE);
    dom.fence();
    p[POS_KEY_HEAD] = next;
    p[POS_KEY_HEAD + 1] = 0;
    return true;
  }

  /** close() under the kset's lock: false when the log needed a segment and none was free. */
  tryClose(kset_id: number): boolean {
    this.lock(kset_id);
    try {
      return this.close(kset_id);
    } finally {
      this.unlock(kset_id);
    }
  }

  /**
   * Close a kset, waiting (without polling) for a free segment when the log must roll. Fails
   * with CacheFullError after wait_ms.
   */
  async closeWaiting(kset_id: number, wait_ms: number): Promise<void> {
    const deadline = Date.now() + wait_ms;
    for (;;) {
      const seen = Atomics.load(this.s.waits, WAIT_SEG_FREED);
      if (this.tryClose(kset_id)) return;
      const left = deadline - Date.now();
      if (left <= 0) throw new CacheFullError("cache full: no free segment for the key log (writeback or GC is not keeping up)");
      await waitChangeAsync(this.s.waits, WAIT_SEG_FREED, seen, Math.min(left, 1000));
    }
  }

  /** Close every kset (FLUSH), in id order. */
  async closeAll(wait_ms: number): Promise<void> {
    for (let id = 0; id < this.n_ksets; id++) {
      if (this.keyNum(id) === 0) continue;
      await this.closeWaiting(id, wait_ms);
    }
  }

  /**
   * A flush boundary (FLUSH, FUA): close every kset under a new flush epoch and record where the
   * epoch begins (core/log/flush_epochs.ts). The boundary is recorded even when the caller gets
   * an error, as long as the ksets closed; the record waits for earlier boundaries at most
   * wait_ms plus a margin.
   */
  async closeAllAsBoundary(wait_ms: number): Promise<void> {
    const ticket = this.epochs.begin();
    let ok = false;
    try {
      await this.closeAll(wait_ms);
      ok = true;
    } finally {
      await this.epochs.finish(ticket, ok, wait_ms + BOUNDARY_TURN_MARGIN_MS);
    }
  }

  /** Make sure a kset with keys is closed within KSET_FLUSH_DELAY_MS. */
  private armTimer(kset_id: number): void {
    const word = kset_id * KSET_META_WORDS + KSET_TIMER_ARMED;
    if (Atomics.compareExchange(this.s.kset_meta, word, 0, 1) !== 0) return;
    const t = setTimeout(() => this.timerFired(kset_id), KSET_FLUSH_DELAY_MS);
    this.timers[kset_id] = t;
  }

  private timerFired(kset_id: number): void {
    this.timers[kset_id] = undefined;
    Atomics.store(this.s.kset_meta, kset_id * KSET_META_WORDS + KSET_TIMER_ARMED, 0);
    this.closeWaiting(kset_id, KSET_FLUSH_DELAY_MS * 60).catch((err) => this.onCloseError(err));
    // Keys appended while the close was in progress re-arm through append().
    if (this.keyNum(kset_id) > 0) this.armTimer(kset_id);
  }

  /** Cancel this thread's timers (shutdown; the caller closes every kset itself). */
  stopTimers(): void {
    for (let id = 0; id < this.timers.length; id++) {
      const t = this.timers[id];
      if (t === undefined) continue;
      clearTimeout(t);
      this.timers[id] = undefined;
      Atomics.store(this.s.kset_meta, id * KSET_META_WORDS + KSET_TIMER_ARMED, 0);
    }
  }
}
