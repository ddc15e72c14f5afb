/**
 * Walk the key log exactly as replay does (reference §2.2), with every 2026 hardening check.
 *
 * At each position: read min(KSET_SIZE_MAX, bytes left in the data area). A wrong magic or CRC is
 * the END of the log (a clean end is the zero terminator every close writes). A LAST kset moves
 * to (next_cache_seg_id, 0). A normal kset is checked (key_num, size within the segment, CRC) and
 * each key is checked (length, backing bound, segment id, data-area bound) and classified: stale
 * by generation, data CRC ok/bad. A kset that fails its CRC in the middle of the log ends the log
 * there: that is the kernel's rule, and everything after it is not part of the log.
 *
 * What is invalid device data (InvalidDeviceError, never "end of log"): a CRC-valid kset whose
 * contents break a bound, a header whose key_num makes it unreadable, a LAST chain that leaves the
 * cache or comes back to a segment the walk already visited. A torn write cannot produce these:
 * the bytes a kset overwrites are the zero terminator, so a torn header reads as a zero magic or
 * a key_num of 0 with a failing CRC.
 *
 * Decisions where the kernel is silent:
 *  - A CRC-valid normal kset with key_num 0 (the kernel never writes one) is accepted as an empty
 *    kset, advancing 24 bytes, which is what the kernel's replay does with it.
 *  - A key whose [off, off+len) crosses a 4 MiB boundary is rejected: the kernel never writes
 *    one, and the index (one subtree per 4 MiB) relies on it.
 *  - Data CRCs are verified for live keys only. A stale key's data may legitimately have been
 *    overwritten after its segment was freed (crash between the gen bump and key_tail).
 *  - LAST cycle detection is exact: the walk remembers the segments it entered (the one it
 *    started in included); a legitimate log never re-enters one, since a key-log segment stays
 *    in use until key_tail moves past its LAST kset. This also bounds the hops by n_segs.
 */
import { assert } from "../assert.ts";
import { InvalidDeviceError } from "../errors.ts";
import { dataView, hex32, hex64, isAllZero } from "../format/bytes.ts";
import {
  KEY_SIZE,
  KSET_HEADER_SIZE,
  KSET_KEYS_MAX,
  KSET_MAGIC,
  KSET_SIZE_MAX,
  SEG_DATA_SIZE,
  SUBTREE_SPAN,
  ksetSize,
} from "../format/constants.ts";
import { crc32c } from "../format/crc.ts";
import { type DecodedKey, decodeKeyAt } from "../format/key.ts";
import { decodeKsetHeader, ksetCrc } from "../format/kset.ts";
import type { PersistDomain } from "../persist/domain.ts";
import { type CachePos, dataDevOffset, devOffsetOf, posProblem, posToString } from "./position.ts";

/** What the walk needs from the loaded metadata (CacheMeta satisfies it). */
export interface WalkMeta {
  readonly n_segs: number;
  readonly seg_ids: ArrayLike<number>;
  readonly seg_gens: ArrayLike<number>;
  readonly data_crc: boolean;
}

export interface WalkOptions {
  /** Keys must end within the backing device; unchecked when undefined. */
  backing_size_bytes?: number;
  /** Verify the data CRC of live keys (only when the cache has DATA_CRC). */
  verify_data_crc?: boolean;
  /** Visit at most this many ksets (normal and LAST). */
  limit?: number;
}

export interface WalkedKey extends DecodedKey {
  /** Index of the key in its kset. */
  index: number;
  /** key.seg_gen < the segment's current generation: the key's data is gone. */
  stale: boolean;
  /** Data CRC matches (true), does not (false), or was not checked (null). */
  crc_ok: boolean | null;
}

export interface WalkedKset {
  pos: CachePos;
  size_bytes: number;
  last: boolean;
  /** For a LAST kset: the logical segment the log continues in. */
  next_cache_seg_id?: number;
  keys: WalkedKey[];
}

export type WalkEndKind = "zero_header" | "bad_magic" | "bad_crc" | "visitor" | "limit";

export interface WalkResult {
  /** First position not part of the walk; key_head when walking from key_tail to the end. */
  end_pos: CachePos;
  end_kind: WalkEndKind;
  /** A sentence: "zero kset header at 0:10240: end of the log". */
  end_reason: string;
  /** The log ended at a zero kset header (the terminator every close writes). */
  end_clean: boolean;
  /** Ksets visited, LAST ksets included. */
  ksets: number;
  last_ksets: number;
  keys: number;
  stale_keys: number;
  /** Live keys whose data CRC did not match. */
  bad_crc_keys: number;
  /** Keys with a seg_gen newer than their segment's (only possible if seg_gen was lost). */
  future_gen_keys: number;
}

/** Ksets one segment can hold at most (all 24-byte headers), plus one. */
const KSETS_PER_SEG_BOUND = Math.floor(SEG_DATA_SIZE / KSET_HEADER_SIZE) + 1;

function fail(message: string): never {
  throw new InvalidDeviceError(message);
}

/** Check one decoded key of a CRC-valid kset; throws on data that no writer produces. */
function checkKey(k: DecodedKey, where: string, meta: WalkMeta, backing_size_bytes: number | undefined): void {
  if (k.len === 0) fail(`${where}: zero-length key (off ${k.off})`);
  if (backing_size_bytes !== undefined && k.off + k.len > backing_size_bytes) {
    fail(`${where}: off ${k.off} + len ${k.len} = ${k.off + k.len} exceeds the backing device size ${backing_size_bytes}`);
  }
  if (Math.floor(k.off / SUBTREE_SPAN) !== Math.floor((k.off + k.len - 1) / SUBTREE_SPAN)) {
    fail(`${where}: [${k.off}, ${k.off + k.len}) crosses a 4 MiB boundary, which no writer produces`);
  }
  if (k.cache_seg_id >= meta.n_segs) fail(`${where}: cache_seg_id ${k.cache_seg_id} >= n_segs ${meta.n_segs}`);
  if (k.cache_seg_off + k.len > SEG_DATA_SIZE) {
    fail(`${where}: cache_seg_off ${k.cache_seg_off} + len ${k.len} exceeds the segment data area (${SEG_DATA_SIZE} bytes)`);
  }
}

/**
 * Walk from `from` to the end of the log (or until the visitor returns false, or `limit`).
 * Never writes. Throws InvalidDeviceError for invalid log contents.
 */
export function walkLog(
  dom: PersistDomain,
  meta: WalkMeta,
  from: CachePos,
  opts: WalkOptions = {},
  visit?: (kset: WalkedKset) => boolean,
): WalkResult {
  assert(meta.seg_ids.length === meta.n_segs && meta.seg_gens.length === meta.n_segs, "walk meta is inconsistent");
  const start_problem = posProblem(from, meta.n_segs);
  if (start_problem !== null) fail(`log walk start ${posToString(from)}: ${start_problem}`);
  const verify_crc = opts.verify_data_crc === true && meta.data_crc;
  const limit = opts.limit ?? Number.POSITIVE_INFINITY;

  const res: WalkResult = {
    end_pos: from,
    end_kind: "zero_header",
    end_reason: "",
    end_clean: false,
    ksets: 0,
    last_ksets: 0,
    keys: 0,
    stale_keys: 0,
    bad_crc_keys: 0,
    future_gen_keys: 0,
  };
  const end = (pos: CachePos, kind: WalkEndKind, reason: string): WalkResult => {
    res.end_pos = { cache_seg_id: pos.cache_seg_id, seg_off: pos.seg_off };
    res.end_kind = kind;
    res.end_reason = reason;
    res.end_clean = kind === "zero_header";
    return res;
  };

  const entered = new Uint8Array(meta.n_segs);
  entered[from.cache_seg_id] = 1;
  const steps_max = meta.n_segs * KSETS_PER_SEG_BOUND;
  let pos: CachePos = { cache_seg_id: from.cache_seg_id, seg_off: from.seg_off };

  for (let step = 0; ; step++) {
    // Each step advances by >= 24 bytes or enters a segment not entered before.
    assert(step <= steps_max, `log walk exceeded its bound of ${steps_max} ksets`);
    const at = posToString(pos);
    if (res.ksets >= limit) return end(pos, "limit", `walk limit of ${limit} ksets reached at ${at}`);
    const left = SEG_DATA_SIZE - pos.seg_off;
    if (left < KSET_HEADER_SIZE) {
      fail(`log position ${at}: only ${left} bytes left in the data area, less than a ${KSET_HEADER_SIZE}-byte kset header`);
    }
    const b = dom.view(devOffsetOf(meta, pos), Math.min(KSET_SIZE_MAX, left));
    const h = decodeKsetHeader(b);

    if (h.magic !== KSET_MAGIC) {
      if (isAllZero(b.subarray(0, KSET_HEADER_SIZE))) return end(pos, "zero_header", `zero kset header at ${at}: end of the log`);
      return end(pos, "bad_magic", `bad kset magic ${hex64(h.magic)} at ${at}: treated as the end of the log`);
    }

    if (h.last) {
      const crc = ksetCrc(b, true, 0);
      if (crc !== h.crc_stored) return end(pos, "bad_crc", badCrcReason(at, "LAST", h.crc_stored, crc));
      const next = h.key_num_or_next;
      if (next >= meta.n_segs) fail(`LAST kset at ${at}: next_cache_seg_id ${next} >= n_segs ${meta.n_segs}`);
      if (entered[next] !== 0) {
        fail(`LAST kset at ${at}: next_cache_seg_id ${next} was already visited by this walk: the LAST-kset chain has a cycle`);
      }
      entered[next] = 1;
      res.ksets++;
      res.last_ksets++;
      const next_pos = { cache_seg_id: next, seg_off: 0 };
      if (visit && !visit({ pos, size_bytes: KSET_HEADER_SIZE, last: true, next_cache_seg_id: next, keys: [] })) {
        return end(next_pos, "visitor", `walk stopped by the caller after the LAST kset at ${at}`);
      }
      pos = next_pos;
      continue;
    }

    const key_num = h.key_num_or_next;
    if (key_num > KSET_KEYS_MAX) fail(`kset at ${at}: key_num ${key_num} exceeds the maximum ${KSET_KEYS_MAX}`);
    const size = ksetSize(key_num);
    if (size > left) {
      fail(`kset at ${at} overruns its segment: ${size} bytes (key_num ${key_num}) but ${left} bytes left in the data area`);
    }
    const crc = ksetCrc(b, false, key_num);
    if (crc !== h.crc_stored) return end(pos, "bad_crc", badCrcReason(at, "normal", h.crc_stored, crc));

    const dv = dataView(b);
    const keys: WalkedKey[] = [];
    for (let i = 0; i < key_num; i++) {
      const where = `key ${i} of kset at ${at}`;
      const k = decodeKeyAt(dv, KSET_HEADER_SIZE + i * KEY_SIZE, where);
      checkKey(k, where, meta, opts.backing_size_bytes);
      const seg_gen = meta.seg_gens[k.cache_seg_id];
      const stale = k.seg_gen < seg_gen;
      if (k.seg_gen > seg_gen) res.future_gen_keys++;
      let crc_ok: boolean | null = null;
      if (verify_crc && !stale) {
        crc_ok = crc32c(dom.view(dataDevOffset(meta, k.cache_seg_id, k.cache_seg_off), k.len)) === k.data_crc;
        if (!crc_ok) res.bad_crc_keys++;
      }
      if (stale) res.stale_keys++;
      keys.push({
        off: k.off,
        len: k.len,
        flags: k.flags,
        cache_seg_id: k.cache_seg_id,
        cache_seg_off: k.cache_seg_off,
        seg_gen: k.seg_gen,
        data_crc: k.data_crc,
        index: i,
        stale,
        crc_ok,
      });
    }
    res.ksets++;
    res.keys += key_num;
    const next_pos = { cache_seg_id: pos.cache_seg_id, seg_off: pos.seg_off + size };
    if (visit && !visit({ pos, size_bytes: size, last: false, keys })) {
      return end(next_pos, "visitor", `walk stopped by the caller after the kset at ${at}`);
    }
    pos = next_pos;
  }
}

function badCrcReason(at: string, kind: string, stored: number, computed: number): string {
  return (
    `bad CRC at ${at} (${kind} kset, stored ${hex32(stored)}, computed ${hex32(computed)}): a torn or corrupt kset; ` +
    `the log ends here and anything after it is ignored (kernel rule)`
  );
}
