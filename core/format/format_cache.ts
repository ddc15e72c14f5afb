/**
 * First start of a blank cache device: what the kernel writes, in its order (reference §2.1,
 * §2.12 items 1-2).
 *
 *   1. zero the 12 KiB at 0x2000..0x4FFF (both cache_info slots and cache_ctrl)   → barrier
 *   2. superblock: seg_num from the size, flags 0, magic, CRC                      → barrier
 *   3. segment chain, for each of n_segs = seg_num segments, lowest free physical segment first:
 *        link it from the previous segment's segment_info (HAS_NEXT + next_seg, rewritten)
 *        zero its first 12 KiB; seg_gen gen 0; segment_info type 1; zero kset header at its
 *        data start (so no stale log can be replayed)                            → barriers
 *   4. dirty_tail = (0, 0), then key_tail = (0, 0)                                → barriers
 *   5. cache_info (seg_id, n_segs, gc_percent, writeback, DATA_CRC, INIT_DONE)  → barrier, LAST
 * A crash anywhere before step 5 leaves INIT_DONE clear, which the loader reports as "not
 * initialised" and the kernel re-initialises.
 *
 * Replica state produced (kernel post-fix semantics; see meta.ts): every record starts from the
 * zeroed in-memory state {slot 0, seq 0}, so its first write goes to slot 1 with seq 1. A
 * segment that gets a successor has its segment_info written twice: slot 1 seq 1 (type only),
 * then slot 0 seq 2 (HAS_NEXT + next_seg) when the next segment is linked. The last segment keeps
 * only slot 1 seq 1. seg_gen, both tails and cache_info end in slot 1 with seq 1.
 * Ordering choice: the kernel records the link in the previous segment before initialising the
 * new one (reference §2.1 step 3); we do the same, so the rewrite of segment i-1 precedes the
 * writes of segment i.
 */
import { PcacheError } from "../errors.ts";
import type { PersistDomain } from "../persist/domain.ts";
import { makeCacheInfoFlags } from "./cache_info.ts";
import {
  CACHE_DEV_SIZE_MIN,
  CACHE_INFO_OFF,
  CACHE_MODE_WRITEBACK,
  CACHE_SEGS_MAX,
  GC_PERCENT_DEFAULT,
  GC_PERCENT_MAX,
  GC_PERCENT_MIN,
  KSET_HEADER_SIZE,
  SB_OFF,
  SEG_DATA_OFF,
  SEGMENTS_OFF,
  segNumForSize,
  segmentOffset,
} from "./constants.ts";
import { type CacheMeta, loadCache } from "./load_cache.ts";
import { type ReplicaSlot, persistCacheInfo, persistSegGen, persistSegmentInfo, persistTail } from "./meta.ts";
import { makeSegmentInfo } from "./segment.ts";
import { encodeSuperblock } from "./superblock.ts";

export interface FormatOptions {
  data_crc: boolean;
  /** 0..90, default 70. */
  gc_percent?: number;
  /** Passed to the final loadCache. */
  backing_size_bytes?: number;
}

/** Zero the region 0x2000..0x4FFF: both cache_info slots and cache_ctrl (the tails). */
const META_ZERO_OFF = CACHE_INFO_OFF;
const META_ZERO_LEN = SEGMENTS_OFF - CACHE_INFO_OFF;

/** Segment metadata zeroed before a segment joins the cache: both segment_info slots and seg ctrl. */
const SEG_META_LEN = SEG_DATA_OFF;

/** Physical segments the format uses on a device of size_bytes (capped at CACHE_SEGS_MAX). */
export function formatSegNum(size_bytes: number): number {
  return Math.min(segNumForSize(size_bytes), CACHE_SEGS_MAX);
}

/**
 * Lowest clear bit of a physical-segment bitmap at or after `from`, or -1. The kernel takes
 * the lowest free physical segment each time; on a fresh device that is the identity.
 */
function lowestFree(used: Uint8Array, from: number): number {
  for (let i = from; i < used.length; i++) if (used[i] === 0) return i;
  return -1;
}

function zeroDurably(dom: PersistDomain, off: number, len: number): void {
  dom.fill(off, len, 0);
  dom.flush(off, len);
  dom.fence();
}

/**
 * Format the whole device as one new cache and return its metadata as the loader reads it back.
 * Does not look at what is there: refusing a non-blank device is the caller's job
 * (inspectSuperblockArea).
 */
export function formatCache(dom: PersistDomain, opts: FormatOptions): CacheMeta {
  const gc_percent = opts.gc_percent ?? GC_PERCENT_DEFAULT;
  if (!Number.isInteger(gc_percent) || gc_percent < GC_PERCENT_MIN || gc_percent > GC_PERCENT_MAX) {
    throw new PcacheError(`gc_percent ${gc_percent} is outside ${GC_PERCENT_MIN}..${GC_PERCENT_MAX}`);
  }
  if (dom.size_bytes < CACHE_DEV_SIZE_MIN) {
    throw new PcacheError(
      `cache device of ${dom.size_bytes} bytes is smaller than the minimum ${CACHE_DEV_SIZE_MIN} bytes (512 MiB)`,
    );
  }
  const seg_num = formatSegNum(dom.size_bytes);

  // 1-2. cache_dev: metadata area zeroed before the superblock makes the device "pcache".
  zeroDurably(dom, META_ZERO_OFF, META_ZERO_LEN);
  const sb = encodeSuperblock({ flags: 0, seg_num });
  dom.write(SB_OFF, sb);
  dom.flush(SB_OFF, sb.length);
  dom.fence();

  // 3. The chain. n_segs = seg_num: the whole device is one cache.
  const n_segs = seg_num;
  const used = new Uint8Array(seg_num);
  let first = -1;
  let prev_seg = -1;
  let prev_info_slot: ReplicaSlot | null = null;
  let scan_from = 0;
  for (let i = 0; i < n_segs; i++) {
    const phys = lowestFree(used, scan_from);
    if (phys < 0) throw new PcacheError(`no free physical segment for cache segment ${i} of ${n_segs}`);
    used[phys] = 1;
    scan_from = phys + 1;
    if (i === 0) first = phys;
    else prev_info_slot = persistSegmentInfo(dom, prev_seg, makeSegmentInfo(phys), prev_info_slot);

    const base = segmentOffset(phys);
    zeroDurably(dom, base, SEG_META_LEN);
    persistSegGen(dom, phys, 0, null);
    prev_info_slot = persistSegmentInfo(dom, phys, makeSegmentInfo(), null);
    zeroDurably(dom, base + SEG_DATA_OFF, KSET_HEADER_SIZE);
    prev_seg = phys;
  }

  // 4. Tails: dirty_tail first, then key_tail (the kernel's order).
  const origin = { cache_seg_id: 0, seg_off: 0 };
  persistTail(dom, "dirty_tail", origin, null);
  persistTail(dom, "key_tail", origin, null);

  // 5. cache_info with INIT_DONE, last: until it is durable the cache does not exist.
  const flags = makeCacheInfoFlags({
    data_crc: opts.data_crc,
    init_done: true,
    cache_mode: CACHE_MODE_WRITEBACK,
    gc_percent,
  });
  persistCacheInfo(dom, { seg_id: first, n_segs, flags }, null);

  return loadCache(dom, { backing_size_bytes: opts.backing_size_bytes });
}
