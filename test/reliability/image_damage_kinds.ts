/**
 * The damage the image-damage runner applies: byte flips (what media errors and torn writes
 * do) and crafted contents behind valid CRCs (what a buggy writer or a hostile image does), in
 * the superblock, both cache_info slots, segment_info and seg_gen slots of chain segments, both
 * tail slots, kset headers, keys and CRCs, and LAST ksets.
 */
import { dataView } from "../../core/format/bytes.ts";
import { CACHE_SEGS_MAX, KEY_SIZE, KSET_HEADER_SIZE, SB_OFF, SB_SIZE, SEG_DATA_OFF, SEG_DATA_SIZE, SEGMENTS_OFF, segmentOffset } from "../../core/format/constants.ts";
import { ksetCrc } from "../../core/format/kset.ts";
import type { CacheMeta } from "../../core/format/load_cache.ts";
import {
  CACHE_INFO_RECORD,
  DIRTY_TAIL_RECORD,
  KEY_TAIL_RECORD,
  readReplicas,
  type RecordKind,
  SEG_GEN_RECORD,
  SEGMENT_INFO_RECORD,
  type Slot,
  writeReplica,
} from "../../core/format/meta.ts";
import { encodeSuperblock } from "../../core/format/superblock.ts";
import { type CachePos, devOffsetOf, posToString } from "../../core/log/position.ts";
import { walkLog } from "../../core/log/walk.ts";
import type { PersistDomain } from "../../core/persist/domain.ts";

export interface Damage {
  what: string;
}

interface RecordTarget {
  name: string;
  kind: RecordKind<unknown>;
  /** Physical segment id for segment records, 0 otherwise. */
  index: number;
}

interface KsetTarget {
  pos: CachePos;
  dev_off: number;
  size: number;
  last: boolean;
  key_num: number;
}

export interface Targets {
  records: RecordTarget[];
  ksets: KsetTarget[];
  key_head: CachePos;
  seg_num: number;
  n_segs: number;
}

/** Every record and every kset of the log (key_tail to key_head) of the base image. */
export function damageTargets(dom: PersistDomain, meta: CacheMeta): Targets {
  const records: RecordTarget[] = [
    { name: "cache_info", kind: CACHE_INFO_RECORD, index: 0 },
    { name: "key_tail", kind: KEY_TAIL_RECORD, index: 0 },
    { name: "dirty_tail", kind: DIRTY_TAIL_RECORD, index: 0 },
  ];
  for (const phys of meta.seg_ids) {
    records.push({ name: `segment_info of segment ${phys}`, kind: SEGMENT_INFO_RECORD, index: phys });
    records.push({ name: `seg_gen of segment ${phys}`, kind: SEG_GEN_RECORD, index: phys });
  }
  const ksets: KsetTarget[] = [];
  const walk = walkLog(dom, meta, meta.key_tail, {}, (k) => {
    ksets.push({ pos: k.pos, dev_off: devOffsetOf(meta, k.pos), size: k.size_bytes, last: k.last, key_num: k.keys.length });
    return true;
  });
  return { records, ksets, key_head: walk.end_pos, seg_num: meta.sb.seg_num, n_segs: meta.n_segs };
}

type Rng = () => number;
const pick = <T>(rng: Rng, xs: readonly T[]): T => xs[Math.floor(rng() * xs.length)];
const below = (rng: Rng, n: number) => Math.floor(rng() * n);

function flipBytes(rng: Rng, dom: PersistDomain, off: number, len: number, count: number): string {
  const at: number[] = [];
  for (let i = 0; i < count; i++) {
    const o = off + below(rng, len);
    dom.write(o, new Uint8Array([dom.view(o, 1)[0] ^ (1 + below(rng, 255))]));
    at.push(o);
  }
  return `flipped byte(s) at ${at.join(", ")}`;
}

/** Flip bytes of one slot of a record, or of both slots. */
function flipRecord(rng: Rng, dom: PersistDomain, t: Targets): string {
  const r = pick(rng, t.records);
  const slots: Slot[] = rng() < 0.3 ? [0, 1] : [pick(rng, [0, 1] as const)];
  const parts = slots.map((slot) => `slot ${slot}: ${flipBytes(rng, dom, r.kind.offsetOf(r.index, slot), r.kind.size, 1 + below(rng, 3))}`);
  return `${r.name} ${parts.join("; ")}`;
}

/** A newer, CRC-valid copy of a record with a crafted value (the replica rule will pick it). */
function craftRecord(rng: Rng, dom: PersistDomain, t: Targets, meta: CacheMeta): string {
  const r = pick(rng, t.records);
  const latest = readReplicas(dom, r.kind, r.index).latest;
  const value = craftedValue(rng, r, latest?.value, t, meta);
  writeReplica(dom, r.kind, r.index, value, latest === null ? null : { slot: latest.slot, seq: latest.seq });
  return `${r.name}: newer replica ${JSON.stringify(value)}`;
}

const U32_MAX = 0xffff_ffff;

function craftedValue(rng: Rng, r: RecordTarget, cur: unknown, t: Targets, meta: CacheMeta): unknown {
  const seg = () => pick(rng, [t.n_segs, t.seg_num, U32_MAX, below(rng, t.n_segs), 0]);
  if (r.kind === CACHE_INFO_RECORD) {
    const ci = cur as { seg_id: number; n_segs: number; flags: number };
    const flag_bits = [1, 2, 1 << 2, 3 << 2, 0x7f << 6, 91 << 6, 1 << 20];
    return pick(rng, [
      { ...ci, n_segs: pick(rng, [0, t.seg_num + 1, t.n_segs - 1, U32_MAX]) },
      { ...ci, seg_id: pick(rng, [t.seg_num, U32_MAX, 1 + below(rng, t.n_segs - 1)]) },
      { ...ci, flags: (ci.flags ^ pick(rng, flag_bits)) >>> 0 },
    ]);
  }
  if (r.kind === SEGMENT_INFO_RECORD) {
    const si = cur as { flags: number; next_seg: number };
    return pick(rng, [
      { ...si, next_seg: pick(rng, [meta.seg_ids[0], r.index, t.seg_num, U32_MAX, below(rng, t.seg_num)]) },
      { ...si, flags: (si.flags ^ pick(rng, [1, 1 << 1, 3 << 1, 1 << 9])) >>> 0 },
    ]);
  }
  if (r.kind === SEG_GEN_RECORD) {
    const g = (cur as { gen: number } | undefined)?.gen ?? 0;
    return { gen: pick(rng, [g + 1, Math.max(0, g - 1), 0, 2 ** 40, Number.MAX_SAFE_INTEGER]) };
  }
  // key_tail / dirty_tail: another kset's position, key_head, or a position that is nowhere.
  const k = t.ksets.length > 0 ? pick(rng, t.ksets).pos : t.key_head;
  return pick(rng, [
    k,
    t.key_head,
    { cache_seg_id: k.cache_seg_id, seg_off: k.seg_off + 1 + below(rng, 40) },
    { cache_seg_id: seg(), seg_off: below(rng, SEG_DATA_SIZE) },
    { cache_seg_id: k.cache_seg_id, seg_off: SEG_DATA_SIZE - below(rng, 30) },
  ]);
}

/** A CRC-valid superblock with a crafted seg_num or flags. */
function craftSuperblock(rng: Rng, dom: PersistDomain, t: Targets): string {
  const sb = pick(rng, [
    { flags: 0, seg_num: pick(rng, [0, t.seg_num + 1, t.seg_num - 1, CACHE_SEGS_MAX + 1, U32_MAX]) },
    { flags: pick(rng, [1, 2, 0x8000_0000]), seg_num: t.seg_num },
  ]);
  dom.write(SB_OFF, encodeSuperblock(sb));
  return `superblock rewritten (valid CRC) as ${JSON.stringify(sb)}`;
}

/** Flip bytes in a kset's header, keys or CRC word (the CRC catches it: the log ends there). */
function flipKset(rng: Rng, dom: PersistDomain, t: Targets): string {
  const k = pick(rng, t.ksets);
  const where = pick(rng, ["header", "keys", "crc"] as const);
  const [off, len] = where === "crc" ? [0, 4] : where === "header" || k.size <= KSET_HEADER_SIZE ? [0, KSET_HEADER_SIZE] : [KSET_HEADER_SIZE, k.size - KSET_HEADER_SIZE];
  return `kset at ${posToString(k.pos)} ${where}: ${flipBytes(rng, dom, k.dev_off + off, len, 1 + below(rng, 3))}`;
}

/** Change one field of a key (or the header) of a kset and store a valid CRC for the result. */
function craftKset(rng: Rng, dom: PersistDomain, t: Targets, backing_bytes: number): string {
  const k = pick(rng, t.ksets);
  const b = dom.view(k.dev_off, Math.min(SEG_DATA_SIZE - k.pos.seg_off, 5144)).slice();
  const dv = dataView(b);
  let what: string;
  if (k.last || rng() < 0.25) {
    const choice = below(rng, 3);
    if (choice === 0) dv.setUint32(4, pick(rng, [0, 129, U32_MAX, k.key_num + 1]), true);
    if (choice === 1) dv.setBigUint64(16, k.last ? 0n : 1n, true);
    if (choice === 2 || k.last) dv.setUint32(4, pick(rng, [t.n_segs, U32_MAX, k.pos.cache_seg_id, t.ksets[0]!.pos.cache_seg_id, below(rng, t.n_segs)]), true);
    what = `header: key_num/next ${dv.getUint32(4, true)} flags ${dv.getBigUint64(16, true)}`;
  } else {
    const key_at = KSET_HEADER_SIZE + below(rng, k.key_num) * KEY_SIZE;
    const field = pick(rng, ["off", "off_huge", "len", "cross", "seg", "seg_off", "gen", "gen_huge", "crc"] as const);
    if (field === "off") dv.setUint32(key_at, backing_bytes - below(rng, 3), true);
    if (field === "off_huge") dv.setUint32(key_at + 4, pick(rng, [0x20_0000, U32_MAX]), true);
    if (field === "len") dv.setUint32(key_at + 8, pick(rng, [0, U32_MAX, backing_bytes]), true);
    if (field === "cross") {
      dv.setUint32(key_at, 4 * 1024 * 1024 - 100, true);
      dv.setUint32(key_at + 8, 200, true);
    }
    if (field === "seg") dv.setUint32(key_at + 16, pick(rng, [t.n_segs, U32_MAX]), true);
    if (field === "seg_off") dv.setUint32(key_at + 20, pick(rng, [SEG_DATA_SIZE, SEG_DATA_SIZE - 1, U32_MAX]), true);
    if (field === "gen") dv.setUint32(key_at + 24, dv.getUint32(key_at + 24, true) + pick(rng, [1, 2, 1000]), true);
    if (field === "gen_huge") dv.setUint32(key_at + 28, pick(rng, [0x20_0000, U32_MAX]), true);
    if (field === "crc") dv.setUint32(key_at + 32, dv.getUint32(key_at + 32, true) ^ 0x5a5a, true);
    what = `key ${(key_at - KSET_HEADER_SIZE) / KEY_SIZE} field ${field}`;
  }
  const last = (dv.getBigUint64(16, true) & 1n) !== 0n;
  const key_num = dv.getUint32(4, true);
  const size = last ? KSET_HEADER_SIZE : KSET_HEADER_SIZE + key_num * KEY_SIZE;
  if (last || size <= b.length) dv.setUint32(0, ksetCrc(b, last, last ? 0 : key_num), true);
  dom.write(k.dev_off, b.subarray(0, Math.max(k.size, KSET_HEADER_SIZE)));
  return `kset at ${posToString(k.pos)} crafted (valid CRC): ${what}`;
}

/** Random flips anywhere in the metadata area or in a chain segment's header area. */
function flipAnywhere(rng: Rng, dom: PersistDomain, meta: CacheMeta): string {
  if (rng() < 0.5) return `metadata area: ${flipBytes(rng, dom, 0, SEGMENTS_OFF, 1 + below(rng, 8))}`;
  const phys = pick(rng, meta.seg_ids);
  return `segment ${phys} header area: ${flipBytes(rng, dom, segmentOffset(phys), SEG_DATA_OFF, 1 + below(rng, 8))}`;
}

/** Apply one damage chosen by rng; returns what it did. */
export function pickDamage(rng: Rng, t: Targets, dom: PersistDomain, meta: CacheMeta, backing_bytes: number): Damage {
  const r = rng();
  if (r < 0.2) return { what: flipRecord(rng, dom, t) };
  if (r < 0.4) return { what: craftRecord(rng, dom, t, meta) };
  if (r < 0.45) return { what: craftSuperblock(rng, dom, t) };
  if (r < 0.5) return { what: `superblock: ${flipBytes(rng, dom, SB_OFF, SB_SIZE, 1 + below(rng, 2))}` };
  if (r < 0.65 && t.ksets.length > 0) return { what: flipKset(rng, dom, t) };
  if (r < 0.9 && t.ksets.length > 0) return { what: craftKset(rng, dom, t, backing_bytes) };
  return { what: flipAnywhere(rng, dom, meta) };
}
