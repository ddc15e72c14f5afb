/**
 * Replicated metadata records (reference §1.1 "Replicas", §2.12 item 8, §5.1 fixes ebbb90344a7d,
 * ed79b300272a, 13ea55ea2017).
 *
 * Every mutable record exists in two slots. Read: take both, discard the ones whose CRC fails,
 * keep the later by 8-bit sequence; an equal pair goes to slot 0; one valid slot wins alone.
 * Write: seq + 1, new CRC, into the slot that does NOT hold the latest copy, then flush + fence.
 * The latest valid copy is never overwritten, so a torn write loses at most the new copy.
 *
 * The writer carries a ReplicaSlot {slot, seq} naming the latest copy; each persist returns the
 * next one. With no valid copy (a new record) the state is the kernel's zero-initialised one,
 * {slot 0, seq 0}: the first write lands in slot 1 with seq 1.
 *
 * | record       | slot 0                 | stride  | size |
 * |--------------|------------------------|---------|------|
 * | cache_info   | 0x2000                 | 0x1000  | 24   |
 * | key_tail     | 0x4000                 | 16      | 16   |
 * | dirty_tail   | 0x4020                 | 16      | 16   |
 * | segment_info | segment + 0x0000       | 0x1000  | 16   |
 * | seg_gen      | segment + 0x2000       | 16      | 16   |
 */
import { assert } from "../assert.ts";
import type { PersistDomain } from "../persist/domain.ts";
import { hex32, hexOff, isAllZero } from "./bytes.ts";
import { type CacheInfo, decodeCacheInfo, encodeCacheInfoBody } from "./cache_info.ts";
import {
  CACHE_INFO_OFF,
  CACHE_INFO_SIZE,
  CACHE_INFO_STRIDE,
  DIRTY_TAIL_POS_OFF,
  KEY_TAIL_POS_OFF,
  META_REPLICAS,
  POS_SIZE,
  POS_STRIDE,
  SEG_GEN_OFF,
  SEG_GEN_SIZE,
  SEG_GEN_STRIDE,
  SEG_INFO_OFF,
  SEG_INFO_SIZE,
  SEG_INFO_STRIDE,
  segmentOffset,
} from "./constants.ts";
import { recordCrc, sealRecord, seqAfter, seqNext, storedCrc } from "./header.ts";
import { type CachePos, decodePos, encodePosBody } from "./pos.ts";
import {
  type SegGen,
  type SegmentInfo,
  decodeSegGen,
  decodeSegmentInfo,
  encodeSegGenBody,
  encodeSegmentInfoBody,
} from "./segment.ts";

export type Slot = 0 | 1;

/** Where the latest copy of a record is, and its sequence: what the next write needs. */
export interface ReplicaSlot {
  readonly slot: Slot;
  readonly seq: number;
}

/** A record's latest valid copy. */
export interface Replica<T> extends ReplicaSlot {
  readonly value: T;
}

/** The writer's state for a record with no valid copy (kernel: zero-initialised in memory). */
export const NO_REPLICA: ReplicaSlot = Object.freeze({ slot: 0, seq: 0 });

/** What one slot held, for error messages. */
export interface SlotReport {
  slot: Slot;
  dev_off: number;
  /** valid: CRC matches; zero: all bytes zero (never written); bad_crc: anything else. */
  state: "valid" | "zero" | "bad_crc";
  seq: number;
  crc_stored: number;
  crc_computed: number;
}

export interface ReplicaRead<T> {
  latest: Replica<T> | null;
  slots: [SlotReport, SlotReport];
}

/** One kind of replicated record: where its slots are and how its body is coded. */
export interface RecordKind<T> {
  readonly name: string;
  readonly size: number;
  /** Device offset of the slot of the record numbered index (physical segment id, or 0). */
  offsetOf(index: number, slot: Slot): number;
  encodeBody(value: T, rec: Uint8Array): void;
  /** `where` names the record in errors about field values. */
  decode(rec: Uint8Array, where: string): T;
  /** Human name of record index for messages ("segment_info of physical segment 7"). */
  describe(index: number): string;
}

export const CACHE_INFO_RECORD: RecordKind<CacheInfo> = {
  name: "cache_info",
  size: CACHE_INFO_SIZE,
  offsetOf: (_index, slot) => CACHE_INFO_OFF + slot * CACHE_INFO_STRIDE,
  encodeBody: encodeCacheInfoBody,
  decode: (rec) => decodeCacheInfo(rec),
  describe: () => "cache_info",
};

export type TailName = "key_tail" | "dirty_tail";

function tailRecord(name: TailName, base: number): RecordKind<CachePos> {
  return {
    name,
    size: POS_SIZE,
    offsetOf: (_index, slot) => base + slot * POS_STRIDE,
    encodeBody: encodePosBody,
    decode: (rec) => decodePos(rec),
    describe: () => name,
  };
}

export const KEY_TAIL_RECORD = tailRecord("key_tail", KEY_TAIL_POS_OFF);
export const DIRTY_TAIL_RECORD = tailRecord("dirty_tail", DIRTY_TAIL_POS_OFF);

export function tailRecordOf(which: TailName): RecordKind<CachePos> {
  return which === "key_tail" ? KEY_TAIL_RECORD : DIRTY_TAIL_RECORD;
}

export const SEGMENT_INFO_RECORD: RecordKind<SegmentInfo> = {
  name: "segment_info",
  size: SEG_INFO_SIZE,
  offsetOf: (seg_id, slot) => segmentOffset(seg_id) + SEG_INFO_OFF + slot * SEG_INFO_STRIDE,
  encodeBody: encodeSegmentInfoBody,
  decode: (rec) => decodeSegmentInfo(rec),
  describe: (seg_id) => `segment_info of physical segment ${seg_id}`,
};

export const SEG_GEN_RECORD: RecordKind<SegGen> = {
  name: "seg_gen",
  size: SEG_GEN_SIZE,
  offsetOf: (seg_id, slot) => segmentOffset(seg_id) + SEG_GEN_OFF + slot * SEG_GEN_STRIDE,
  encodeBody: encodeSegGenBody,
  decode: decodeSegGen,
  describe: (seg_id) => `seg_gen of physical segment ${seg_id}`,
};

/**
 * The latest of two slots by the replica rule, given which are valid and their sequences.
 * Pure; exported for the tests of the rule itself.
 */
export function pickLatest(valid0: boolean, seq0: number, valid1: boolean, seq1: number): Slot | null {
  if (valid0 && valid1) return seqAfter(seq1, seq0) ? 1 : 0;
  if (valid0) return 0;
  if (valid1) return 1;
  return null;
}

function inspectSlot(dom: PersistDomain, kind: RecordKind<unknown>, index: number, slot: Slot): SlotReport {
  const dev_off = kind.offsetOf(index, slot);
  const rec = dom.view(dev_off, kind.size);
  const crc_stored = storedCrc(rec);
  const crc_computed = recordCrc(rec);
  const state = crc_stored === crc_computed ? "valid" : isAllZero(rec) ? "zero" : "bad_crc";
  return { slot, dev_off, state, seq: rec[4], crc_stored, crc_computed };
}

/** Read both slots of a record and pick the latest valid copy. Never writes. */
export function readReplicas<T>(dom: PersistDomain, kind: RecordKind<T>, index = 0): ReplicaRead<T> {
  const s0 = inspectSlot(dom, kind, index, 0);
  const s1 = inspectSlot(dom, kind, index, 1);
  const slot = pickLatest(s0.state === "valid", s0.seq, s1.state === "valid", s1.seq);
  if (slot === null) return { latest: null, slots: [s0, s1] };
  const rep = slot === 0 ? s0 : s1;
  // Copy before decoding: the view aliases the device.
  const rec = dom.view(rep.dev_off, kind.size).slice();
  const where = `${kind.describe(index)} (slot ${slot} at ${hexOff(rep.dev_off)})`;
  return { latest: { slot, seq: rep.seq, value: kind.decode(rec, where) }, slots: [s0, s1] };
}

/** Bytes of a sealed record: body, seq, CRC. */
export function encodeRecord<T>(kind: RecordKind<T>, value: T, seq: number): Uint8Array {
  const rec = new Uint8Array(kind.size);
  kind.encodeBody(value, rec);
  sealRecord(rec, seq);
  return rec;
}

/**
 * Write the next copy of a record: seq + 1 into the slot that does not hold the latest copy,
 * flush, fence. `prev` is the state returned by the last load or persist (null: no valid copy).
 * Returns the state for the next write.
 */
export function writeReplica<T>(
  dom: PersistDomain,
  kind: RecordKind<T>,
  index: number,
  value: T,
  prev: ReplicaSlot | null,
): ReplicaSlot {
  const from = prev ?? NO_REPLICA;
  assert(from.slot === 0 || from.slot === 1, `replica slot ${from.slot} is not 0 or 1`);
  assert(Number.isInteger(from.seq) && from.seq >= 0 && from.seq <= 0xff, `replica seq ${from.seq} is not a u8`);
  const slot: Slot = from.slot === 0 ? 1 : 0;
  const seq = seqNext(from.seq);
  const rec = encodeRecord(kind, value, seq);
  const dev_off = kind.offsetOf(index, slot);
  dom.write(dev_off, rec);
  dom.flush(dev_off, rec.length);
  dom.fence();
  // Both sides of the boundary: what is on the device now is the record we meant.
  const back = dom.view(dev_off, kind.size);
  assert(storedCrc(back) === recordCrc(back) && back[4] === seq, `${kind.describe(index)} slot ${slot} did not read back`);
  return { slot, seq };
}

/** "slot 0 at 0x2000: bad CRC (stored 0x..., computed 0x...)" for each slot. */
export function describeSlots(slots: readonly SlotReport[]): string {
  return slots
    .map((s) => {
      const at = `slot ${s.slot} at ${hexOff(s.dev_off)}`;
      if (s.state === "zero") return `${at}: all zero (never written)`;
      if (s.state === "bad_crc") return `${at}: bad CRC (stored ${hex32(s.crc_stored)}, computed ${hex32(s.crc_computed)})`;
      return `${at}: valid, seq ${s.seq}`;
    })
    .join("; ");
}

/** "segment_info of physical segment 7 (both replicas): bad CRC [slot 0 ...; slot 1 ...]". */
export function describeNoValidReplica(what: string, slots: readonly SlotReport[]): string {
  const states = new Set(slots.map((s) => s.state));
  const summary = states.size === 1 && states.has("zero") ? "never written (all zero)" : "bad CRC";
  return `${what} (both replicas): ${summary} [${describeSlots(slots)}]`;
}

// ---- typed load / persist ----

export function loadCacheInfo(dom: PersistDomain): Replica<CacheInfo> | null {
  return readReplicas(dom, CACHE_INFO_RECORD).latest;
}

export function persistCacheInfo(dom: PersistDomain, info: CacheInfo, prev: ReplicaSlot | null): ReplicaSlot {
  return writeReplica(dom, CACHE_INFO_RECORD, 0, info, prev);
}

export function loadTail(dom: PersistDomain, which: TailName): Replica<CachePos> | null {
  return readReplicas(dom, tailRecordOf(which)).latest;
}

export function persistTail(dom: PersistDomain, which: TailName, pos: CachePos, prev: ReplicaSlot | null): ReplicaSlot {
  return writeReplica(dom, tailRecordOf(which), 0, pos, prev);
}

export function loadSegmentInfo(dom: PersistDomain, seg_id: number): Replica<SegmentInfo> | null {
  return readReplicas(dom, SEGMENT_INFO_RECORD, seg_id).latest;
}

export function persistSegmentInfo(
  dom: PersistDomain,
  seg_id: number,
  info: SegmentInfo,
  prev: ReplicaSlot | null,
): ReplicaSlot {
  return writeReplica(dom, SEGMENT_INFO_RECORD, seg_id, info, prev);
}

/** The latest seg_gen copy, or null when neither slot is valid (the generation is then 0). */
export function loadSegGen(dom: PersistDomain, seg_id: number): Replica<SegGen> | null {
  return readReplicas(dom, SEG_GEN_RECORD, seg_id).latest;
}

export function persistSegGen(dom: PersistDomain, seg_id: number, gen: number, prev: ReplicaSlot | null): ReplicaSlot {
  return writeReplica(dom, SEG_GEN_RECORD, seg_id, { gen }, prev);
}

/** Both slots of every record kind exist exactly META_REPLICAS times. */
assert(META_REPLICAS === 2, "the replica code assumes two slots");
