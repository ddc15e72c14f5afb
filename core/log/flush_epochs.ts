/**
 * Flush epochs: where FLUSH (and FUA) requests put ordering boundaries in the key log, so that
 * writeback may leave out a dirty key that a later key of the SAME epoch overwrote.
 *
 * Why that keeps the backing device crash-consistent: a file system relies on order only across
 * a completed FLUSH (or an acknowledged FUA write). Between two boundaries, a disk with a volatile
 * write cache may keep any subset of the writes, each byte at any version written in the epoch.
 * Writeback still walks the log in order and flushes the backing device after every kset; it
 * only drops versions that a later key of the same epoch replaces, and that later key (or one
 * after it, still in the epoch) is written before writeback leaves the epoch. So at every moment
 * the backing device holds every earlier epoch whole and a subset of the current one.
 *
 * How an epoch is known:
 * * begin() takes a ticket (the new epoch number) BEFORE the flush closes any kset; a key is
 *   stamped, under its kset lock, with the number current when it is appended. A key appended
 *   before a boundary's ticket is closed by that boundary's closeAll, so it lies before the
 *   boundary: a key's stamp is never below the epoch its position is in.
 * * finish() records (key_head, ticket) in ticket order, so recorded epochs grow along the log.
 *   Writeback follows the ring as it walks ksets and knows the epoch of the kset at dirty_tail
 *   exactly, or a lower number when boundaries were dropped (ring full) or unknown (before the
 *   boundary recorded at start, since replayed keys carry no stamp).
 * * Writeback skips a part of key K only when the index holds there a different dirty key N with
 *   stamp(N) == epoch(K) != EPOCH_UNKNOWN. As epoch(K) <= epoch(N) <= stamp(N), that forces N
 *   into K's epoch. Dropped or unknown boundaries therefore only cost skips, never safety.
 */
import {
  CTL_EPOCH_RING_HEAD,
  CTL_EPOCH_RING_OFF,
  CTL_EPOCH_RING_TAIL,
  CTL_FLUSH_EPOCH,
  CTL_FLUSH_RECORDED,
  EPOCH_RING_ENTRIES,
  EPOCH_RING_ENTRY_WORDS,
  LOCK_KEY_HEAD,
  POS_KEY_HEAD,
  type SharedState,
  WAIT_FLUSH_TURN,
} from "../engine/shared_state.ts";
import { lock, unlock } from "../sync/lock.ts";
import { waitChangeAsync } from "../sync/wait_word.ts";

/** The stamp of replayed keys and the epoch writeback knows before its first boundary. */
export const EPOCH_UNKNOWN = 0;

/** First word of ring entry number `n` (a counter; entries wrap around the ring). */
function entryWord(n: number): number {
  return (n % EPOCH_RING_ENTRIES) * EPOCH_RING_ENTRY_WORDS;
}

/** Next epoch number; 0 is reserved for "unknown" (skipped when the counter wraps). */
function after(epoch: number): number {
  const next = (epoch + 1) | 0;
  return next === EPOCH_UNKNOWN ? 1 : next;
}

export class FlushEpochs {
  constructor(private readonly s: SharedState) {}

  /**
   * Main thread, after replay and before any worker runs: epoch 1 starts at key_head. Every key
   * replay indexed lies before it and carries EPOCH_UNKNOWN.
   */
  start(): void {
    const c = this.s.ctl;
    c[CTL_FLUSH_EPOCH] = 1;
    c[CTL_FLUSH_RECORDED] = 1;
    c[CTL_EPOCH_RING_HEAD] = 0;
    c[CTL_EPOCH_RING_TAIL] = 0;
    c[CTL_EPOCH_RING_OFF] = 0;
    this.push(this.s.pos[POS_KEY_HEAD], this.s.pos[POS_KEY_HEAD + 1], 1);
  }

  /** The stamp for a key appended now (read under the key's kset lock). */
  current(): number {
    return Atomics.load(this.s.ctl, CTL_FLUSH_EPOCH);
  }

  /** A boundary begins: its ticket, taken before the flush closes any kset. */
  begin(): number {
    const c = this.s.ctl;
    for (;;) {
      const cur = Atomics.load(c, CTL_FLUSH_EPOCH);
      const next = after(cur);
      if (Atomics.compareExchange(c, CTL_FLUSH_EPOCH, cur, next) === cur) return next;
    }
  }

  /**
   * The boundary's ksets are closed (ok) or closing them failed: record it at key_head once
   * every earlier ticket has, then let the next ticket go. A ticket that waits longer than
   * wait_ms (its predecessor's thread is gone) stops recording for good.
   */
  async finish(ticket: number, ok: boolean, wait_ms: number): Promise<void> {
    const c = this.s.ctl;
    const prev = ticket === 1 ? -1 : (ticket - 1) | 0;
    const deadline = Date.now() + wait_ms;
    for (;;) {
      if (Atomics.load(c, CTL_EPOCH_RING_OFF) !== 0) return;
      const seen = Atomics.load(this.s.waits, WAIT_FLUSH_TURN);
      const recorded = Atomics.load(c, CTL_FLUSH_RECORDED);
      if (recorded === prev) break;
      const left = deadline - Date.now();
      if (left <= 0) {
        Atomics.store(c, CTL_EPOCH_RING_OFF, 1);
        this.s.signal(WAIT_FLUSH_TURN);
        return;
      }
      await waitChangeAsync(this.s.waits, WAIT_FLUSH_TURN, seen, Math.min(left, 1000));
    }
    lock(this.s.locks, LOCK_KEY_HEAD);
    try {
      if (ok) this.push(this.s.pos[POS_KEY_HEAD], this.s.pos[POS_KEY_HEAD + 1], ticket);
      Atomics.store(c, CTL_FLUSH_RECORDED, ticket);
    } finally {
      unlock(this.s.locks, LOCK_KEY_HEAD);
    }
    this.s.signal(WAIT_FLUSH_TURN);
  }

  /** Append a boundary (key_head lock held, or before workers run); dropped when the ring is full. */
  private push(cache_seg_id: number, seg_off: number, epoch: number): void {
    const c = this.s.ctl;
    const head = Atomics.load(c, CTL_EPOCH_RING_HEAD);
    if (head - Atomics.load(c, CTL_EPOCH_RING_TAIL) >= EPOCH_RING_ENTRIES) return;
    const at = entryWord(head);
    const ring = this.s.epoch_ring;
    ring[at] = cache_seg_id;
    ring[at + 1] = seg_off;
    ring[at + 2] = epoch;
    Atomics.store(c, CTL_EPOCH_RING_HEAD, head + 1);
  }
}

/**
 * Writeback's side of the ring (its only consumer): the epoch of the kset at a log position.
 * Boundaries are key_head positions, and writeback visits every kset position between
 * dirty_tail and key_head, so each is met exactly where it was recorded.
 */
export class EpochCursor {
  private epoch = EPOCH_UNKNOWN;

  constructor(private readonly s: SharedState) {}

  /** The epoch of the kset that starts at (cache_seg_id, seg_off). */
  at(cache_seg_id: number, seg_off: number): number {
    const c = this.s.ctl;
    const ring = this.s.epoch_ring;
    for (;;) {
      const tail = Atomics.load(c, CTL_EPOCH_RING_TAIL);
      if (tail === Atomics.load(c, CTL_EPOCH_RING_HEAD)) break;
      const at = entryWord(tail);
      if (ring[at] !== cache_seg_id || ring[at + 1] !== seg_off) break;
      this.epoch = ring[at + 2];
      Atomics.store(c, CTL_EPOCH_RING_TAIL, tail + 1);
    }
    return this.epoch;
  }

  /**
   * Writeback caught up with key_head at this position: a boundary recorded anywhere else can
   * no longer be met in order, so it is dropped (which only costs skips).
   */
  caughtUp(cache_seg_id: number, seg_off: number): void {
    this.at(cache_seg_id, seg_off);
    const c = this.s.ctl;
    const ring = this.s.epoch_ring;
    for (let n = 0; n < EPOCH_RING_ENTRIES; n++) {
      const tail = Atomics.load(c, CTL_EPOCH_RING_TAIL);
      if (tail === Atomics.load(c, CTL_EPOCH_RING_HEAD)) return;
      const at = entryWord(tail);
      if (ring[at] === cache_seg_id && ring[at + 1] === seg_off) return;
      Atomics.store(c, CTL_EPOCH_RING_TAIL, tail + 1);
    }
  }
}
