/**
 * Media over the format module: device offsets through the segment chain (logical cache_seg_id
 * to physical segment), and replicated metadata writes whose replica state (latest slot and
 * sequence) lives in shared memory, so whichever thread writes next never overwrites the latest
 * valid copy.
 */
import { SEG_DATA_OFF, segmentOffset } from "../format/constants.ts";
import { withGcPercent } from "../format/cache_info.ts";
import type { CacheMeta } from "../format/load_cache.ts";
import { persistCacheInfo, persistSegGen, persistTail, type ReplicaSlot, type Slot } from "../format/meta.ts";
import type { PersistDomain } from "../persist/domain.ts";
import type { LogPos, Media } from "./media.ts";
import {
  CTL_CACHE_INFO_FLAGS,
  CTL_CACHE_INFO_SEQ,
  CTL_CACHE_INFO_SLOT,
  CTL_GC_PERCENT,
  POS_DIRTY_TAIL,
  POS_KEY_TAIL,
  type SharedState,
} from "./shared_state.ts";

function slotOf(words: Int32Array, at: number): ReplicaSlot | null {
  const slot = words[at];
  return slot < 0 ? null : { slot: slot as Slot, seq: words[at + 1] };
}

function setSlot(words: Int32Array, at: number, r: ReplicaSlot): void {
  words[at] = r.slot;
  words[at + 1] = r.seq;
}

export class MetaMedia implements Media {
  readonly n_segs: number;
  readonly data_crc: boolean;
  private readonly data_base: Float64Array;

  constructor(
    readonly dom: PersistDomain,
    private readonly meta: CacheMeta,
    private readonly s: SharedState,
    readonly backing_size_bytes: number,
  ) {
    this.n_segs = meta.n_segs;
    this.data_crc = meta.data_crc;
    this.data_base = new Float64Array(meta.n_segs);
    for (let i = 0; i < meta.n_segs; i++) this.data_base[i] = segmentOffset(meta.seg_ids[i]) + SEG_DATA_OFF;
  }

  /** Copy the loader's replica state into shared memory (main thread, before replay). */
  static initSharedReplicaState(s: SharedState, meta: CacheMeta): void {
    for (let i = 0; i < meta.n_segs; i++) {
      const r = meta.seg_gen_slots[i];
      s.seg_gen_slots[2 * i] = r === null ? -1 : r.slot;
      s.seg_gen_slots[2 * i + 1] = r === null ? 0 : r.seq;
    }
    s.pos[POS_DIRTY_TAIL + 2] = meta.dirty_tail.slot;
    s.pos[POS_DIRTY_TAIL + 3] = meta.dirty_tail.seq;
    s.pos[POS_KEY_TAIL + 2] = meta.key_tail.slot;
    s.pos[POS_KEY_TAIL + 3] = meta.key_tail.seq;
    s.ctl[CTL_CACHE_INFO_SLOT] = meta.cache_info.slot;
    s.ctl[CTL_CACHE_INFO_SEQ] = meta.cache_info.seq;
  }

  dataOff(cache_seg_id: number, seg_off: number): number {
    return this.data_base[cache_seg_id] + seg_off;
  }

  persistSegGen(cache_seg_id: number, gen: number): void {
    const prev = slotOf(this.s.seg_gen_slots, 2 * cache_seg_id);
    const next = persistSegGen(this.dom, this.meta.seg_ids[cache_seg_id], gen, prev);
    setSlot(this.s.seg_gen_slots, 2 * cache_seg_id, next);
  }

  persistTail(which: "key_tail" | "dirty_tail", pos: LogPos): void {
    const at = (which === "key_tail" ? POS_KEY_TAIL : POS_DIRTY_TAIL) + 2;
    const next = persistTail(this.dom, which, pos, slotOf(this.s.pos, at));
    setSlot(this.s.pos, at, next);
  }

  persistGcPercent(gc_percent: number): void {
    const info = withGcPercent({ ...this.meta.cache_info.value, flags: this.s.ctl[CTL_CACHE_INFO_FLAGS] }, gc_percent);
    const next = persistCacheInfo(this.dom, info, slotOf(this.s.ctl, CTL_CACHE_INFO_SLOT));
    setSlot(this.s.ctl, CTL_CACHE_INFO_SLOT, next);
    this.s.ctl[CTL_CACHE_INFO_FLAGS] = info.flags;
    Atomics.store(this.s.ctl, CTL_GC_PERCENT, gc_percent);
  }
}
