/**
 * Open an existing cache read-only: superblock, cache_info, segment chain, generations, tails
 * (reference §2.1 steps 2-4 for an existing cache, with every 2026 hardening check of §5.1).
 *
 * Each check that fails throws InvalidDeviceError (exit 2) naming the structure and where it
 * is. A record with one corrupt replica is read from the other one silently: that is the
 * expected result of a torn write. This module never writes to the device; the log itself is
 * checked by core/log/walk.ts.
 */
import { InvalidDeviceError } from "../errors.ts";
import type { PersistDomain } from "../persist/domain.ts";
import { hex32, hex64, hexOff, isAllZero } from "./bytes.ts";
import { CACHE_MODE_NAMES, type CacheInfo, cacheInfoFlags } from "./cache_info.ts";
import {
  CACHE_DEV_SIZE_MIN,
  CACHE_MODE_WRITEBACK,
  CACHE_SEGS_MAX,
  GC_PERCENT_MAX,
  SB_F_BIGENDIAN,
  SB_MAGIC,
  SB_OFF,
  SEG_SIZE,
  SEG_TYPE_CACHE_DATA,
  SEGMENTS_OFF,
  segNumForSize,
} from "./constants.ts";
import {
  CACHE_INFO_RECORD,
  type Replica,
  type ReplicaSlot,
  SEG_GEN_RECORD,
  SEGMENT_INFO_RECORD,
  type TailName,
  describeNoValidReplica,
  readReplicas,
  tailRecordOf,
} from "./meta.ts";
import type { CachePos } from "./pos.ts";
import { type SegmentInfo, segInfoHasNext, segInfoType } from "./segment.ts";
import { decodeSuperblock, readSuperblockBytes } from "./superblock.ts";
import { posProblem } from "../log/position.ts";

/**
 * The superblock is valid but the cache was never completely initialised (no cache_info, or
 * INIT_DONE clear): the kernel would initialise it as a new cache. Still exit 2; the CLI may
 * offer to format.
 */
export class CacheNotInitialisedError extends InvalidDeviceError {
  override name = "CacheNotInitialisedError";
}

/** A persisted tail with the replica state its next write needs. */
export interface TailState extends CachePos, ReplicaSlot {}

export interface CacheMeta {
  sb: { flags: number; seg_num: number };
  /** Latest cache_info copy (value, slot, seq). */
  cache_info: Replica<CacheInfo>;
  n_segs: number;
  /** Physical segment id of each logical segment (index = cache_seg_id). */
  seg_ids: number[];
  /** Current generation of each logical segment (0 when no seg_gen copy is valid). */
  seg_gens: number[];
  /** Latest seg_gen replica of each logical segment; null when neither slot is valid. */
  seg_gen_slots: (ReplicaSlot | null)[];
  /** Latest segment_info replica of each logical segment. */
  segment_info: Replica<SegmentInfo>[];
  key_tail: TailState;
  dirty_tail: TailState;
  data_crc: boolean;
  gc_percent: number;
  cache_mode: number;
  /** As given by the caller, for the log walk's key bound. */
  backing_size_bytes?: number;
}

export interface LoadOptions {
  backing_size_bytes?: number;
}

const SB_AT = `superblock at ${hexOff(SB_OFF)}`;

/**
 * Largest segment generation accepted. Each free bumps it by one, so 2^52 is out of reach of any
 * real cache, while a crafted value near 2^53 would make GC's next bump leave the safe integers.
 */
export const SEG_GEN_MAX = 2 ** 52;

function fail(message: string): never {
  throw new InvalidDeviceError(message);
}

function checkSuperblock(dom: PersistDomain): { flags: number; seg_num: number } {
  if (dom.size_bytes < SEGMENTS_OFF) {
    fail(`cache device of ${dom.size_bytes} bytes is too small for the pcache metadata area (${SEGMENTS_OFF} bytes)`);
  }
  const bytes = readSuperblockBytes(dom);
  const sb = decodeSuperblock(bytes);
  if (sb.magic !== SB_MAGIC) {
    if (isAllZero(bytes)) {
      const small = dom.size_bytes < CACHE_DEV_SIZE_MIN ? `; at ${dom.size_bytes} bytes it is also below the 512 MiB minimum` : "";
      fail(`${SB_AT}: all zero: the device is not formatted (run pcache format)${small}`);
    }
    fail(`${SB_AT}: bad magic ${hex64(sb.magic)} (expected ${hex64(SB_MAGIC)}): not a pcache cache device`);
  }
  if (sb.crc_stored !== sb.crc_computed) {
    fail(`${SB_AT}: bad CRC (stored ${hex32(sb.crc_stored)}, computed ${hex32(sb.crc_computed)})`);
  }
  if ((sb.flags & SB_F_BIGENDIAN) !== 0) {
    fail(`${SB_AT}: flags ${hex32(sb.flags)}: formatted on a big-endian host; only little-endian images are supported`);
  }
  const fits = segNumForSize(dom.size_bytes);
  if (sb.seg_num === 0) fail(`${SB_AT}: seg_num is 0`);
  if (sb.seg_num > CACHE_SEGS_MAX) fail(`${SB_AT}: seg_num ${sb.seg_num} exceeds the maximum ${CACHE_SEGS_MAX}`);
  if (sb.seg_num > fits) {
    fail(
      `${SB_AT}: seg_num ${sb.seg_num} needs ${SEGMENTS_OFF + sb.seg_num * SEG_SIZE} bytes but the device has ` +
        `${dom.size_bytes} (room for ${fits} segments)`,
    );
  }
  return { flags: sb.flags, seg_num: sb.seg_num };
}

function checkCacheInfo(dom: PersistDomain, seg_num: number): Replica<CacheInfo> {
  const read = readReplicas(dom, CACHE_INFO_RECORD);
  const ci = read.latest;
  if (ci === null) {
    const msg = describeNoValidReplica("cache_info", read.slots);
    if (read.slots.every((s) => s.state === "zero")) {
      throw new CacheNotInitialisedError(`no valid cache_info: ${msg}: the cache was never initialised; format it`);
    }
    fail(`no valid cache_info: ${msg}`);
  }
  const at = `cache_info (slot ${ci.slot} at ${hexOff(CACHE_INFO_RECORD.offsetOf(0, ci.slot))}, seq ${ci.seq})`;
  const f = cacheInfoFlags(ci.value.flags);
  if (!f.init_done) {
    throw new CacheNotInitialisedError(
      `${at}: INIT_DONE is clear: the cache was never completely initialised (first start interrupted); format it again`,
    );
  }
  const { n_segs, seg_id } = ci.value;
  if (n_segs === 0) fail(`${at}: n_segs is 0`);
  if (n_segs > seg_num) fail(`${at}: n_segs ${n_segs} exceeds seg_num ${seg_num}`);
  if (seg_id >= seg_num) fail(`${at}: seg_id ${seg_id} >= seg_num ${seg_num}`);
  if (f.gc_percent > GC_PERCENT_MAX) fail(`${at}: gc_percent ${f.gc_percent} exceeds ${GC_PERCENT_MAX}`);
  if (f.cache_mode !== CACHE_MODE_WRITEBACK) {
    const name = CACHE_MODE_NAMES[f.cache_mode];
    fail(`${at}: cache mode ${f.cache_mode} (${name ?? "unknown"}) is not supported; only writeback is`);
  }
  return ci;
}

interface Chain {
  seg_ids: number[];
  segment_info: Replica<SegmentInfo>[];
  seg_gens: number[];
  seg_gen_slots: (ReplicaSlot | null)[];
}

/** Follow cache_info.seg_id then next_seg for n_segs segments (bounded by n_segs). */
function walkChain(dom: PersistDomain, first: number, n_segs: number, seg_num: number): Chain {
  const chain: Chain = { seg_ids: [], segment_info: [], seg_gens: [], seg_gen_slots: [] };
  // cache_seg_id that first visited each physical segment, -1 if none.
  const visited_by = new Int32Array(seg_num).fill(-1);
  let phys = first;
  for (let i = 0; i < n_segs; i++) {
    const seg = `physical segment ${phys} (cache segment ${i})`;
    if (visited_by[phys] >= 0) {
      fail(`segment chain: ${seg} was already visited as cache segment ${visited_by[phys]}: the chain has a cycle`);
    }
    visited_by[phys] = i;
    const read = readReplicas(dom, SEGMENT_INFO_RECORD, phys);
    const info = read.latest;
    if (info === null) fail(`${describeNoValidReplica(`segment_info of ${seg}`, read.slots)}`);
    const at = `segment_info of ${seg} (slot ${info.slot}, seq ${info.seq})`;
    const type = segInfoType(info.value);
    if (type !== SEG_TYPE_CACHE_DATA) fail(`${at}: segment type ${type}, expected ${SEG_TYPE_CACHE_DATA} (CACHE_DATA)`);
    const gen = readReplicas(dom, SEG_GEN_RECORD, phys).latest;
    if (gen !== null && gen.value.gen > SEG_GEN_MAX) {
      fail(`seg_gen of ${seg} (slot ${gen.slot}, seq ${gen.seq}): gen ${gen.value.gen} exceeds ${SEG_GEN_MAX}, which no cache reaches (GC could not bump it)`);
    }
    chain.seg_ids.push(phys);
    chain.segment_info.push(info);
    chain.seg_gens.push(gen === null ? 0 : gen.value.gen);
    chain.seg_gen_slots.push(gen === null ? null : { slot: gen.slot, seq: gen.seq });
    if (i === n_segs - 1) break; // the last segment's link, if any, is not followed
    if (!segInfoHasNext(info.value)) {
      fail(`${at}: no HAS_NEXT flag, but cache_info.n_segs is ${n_segs} (the chain ends after ${i + 1} segments)`);
    }
    if (info.value.next_seg >= seg_num) fail(`${at}: next_seg ${info.value.next_seg} >= seg_num ${seg_num}`);
    phys = info.value.next_seg;
  }
  return chain;
}

function checkTail(dom: PersistDomain, which: TailName, n_segs: number): TailState {
  const kind = tailRecordOf(which);
  const read = readReplicas(dom, kind);
  const t = read.latest;
  if (t === null) fail(`Corrupted key tail or dirty tail: ${describeNoValidReplica(which, read.slots)}`);
  const problem = posProblem(t.value, n_segs);
  if (problem !== null) {
    fail(`${which} (slot ${t.slot} at ${hexOff(kind.offsetOf(0, t.slot))}, seq ${t.seq}): ${problem}`);
  }
  return { cache_seg_id: t.value.cache_seg_id, seg_off: t.value.seg_off, slot: t.slot, seq: t.seq };
}

/** Load and validate an existing cache's metadata. Read-only. */
export function loadCache(dom: PersistDomain, opts: LoadOptions = {}): CacheMeta {
  const sb = checkSuperblock(dom);
  const ci = checkCacheInfo(dom, sb.seg_num);
  const chain = walkChain(dom, ci.value.seg_id, ci.value.n_segs, sb.seg_num);
  // dirty_tail first, as the kernel persists it first; both must be valid.
  const dirty_tail = checkTail(dom, "dirty_tail", ci.value.n_segs);
  const key_tail = checkTail(dom, "key_tail", ci.value.n_segs);
  const f = cacheInfoFlags(ci.value.flags);
  return {
    sb,
    cache_info: ci,
    n_segs: ci.value.n_segs,
    seg_ids: chain.seg_ids,
    seg_gens: chain.seg_gens,
    seg_gen_slots: chain.seg_gen_slots,
    segment_info: chain.segment_info,
    key_tail,
    dirty_tail,
    data_crc: f.data_crc,
    gc_percent: f.gc_percent,
    cache_mode: f.cache_mode,
    backing_size_bytes: opts.backing_size_bytes,
  };
}
