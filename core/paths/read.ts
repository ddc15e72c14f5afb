/**
 * Read path (reference §2.6, §2.7): per 4 MiB chunk, walk the subtree under its lock; copy hits
 * from the cache (generation checked before and after the copy, data CRC verified when on); for
 * gaps queue a backing read and insert an EMPTY placeholder, which the miss completion turns into
 * a CLEAN key unless a write replaced it meanwhile. Backing reads run after the lock is dropped
 * and never block the event loop.
 */
import { BackingIoError, DataCrcError } from "../errors.ts";
import { KEY_F_CLEAN, KEY_F_EMPTY, KSET_KEYS_MAX } from "../format/constants.ts";
import { crc32c } from "../format/crc.ts";
import type { EngineContext } from "../engine/context.ts";
import {
  STAT_ERR_BACKING_READ,
  STAT_ERR_CRC,
  STAT_READ_HIT_BYTES,
  STAT_READ_HIT_COUNT,
  STAT_READ_MISS_BYTES,
  STAT_READ_MISS_COUNT,
} from "../engine/shared_state.ts";
import { spanLeft } from "./write.ts";
import { KEY_F_CRC_VALID as CRC_VALID_FLAG, KEY_F_CRC_VERIFIED as CRC_VERIFIED_FLAG } from "../index/key_index.ts";

interface Miss {
  off: number;
  len: number;
  /** Placeholder node and its version, or -1 when another reader is already filling. */
  node: number;
  ver: number;
}

/**
 * Read [off, off + dst.length) into dst. A read served wholly from the cache finishes here and
 * returns undefined (no promise: at queue depth 32 a promise chain per request was a tenth of the
 * request thread's time); with misses it returns the promise of the backing reads. Errors of the
 * cached part are thrown at once.
 */
export function readPath(ctx: EngineContext, off: number, dst: Uint8Array): Promise<void> | undefined {
  const misses: Miss[] = [];
  let hit_bytes = 0;
  for (let done = 0; done < dst.length; ) {
    const n = Math.min(dst.length - done, spanLeft(off + done));
    // A read inside one 4 MiB chunk (the usual case) needs no view of its own.
    hit_bytes += walkChunk(ctx, off + done, n, n === dst.length ? dst : dst.subarray(done, done + n), misses);
    done += n;
  }
  const s = ctx.s;
  if (hit_bytes > 0) {
    s.addStat(ctx.slot, STAT_READ_HIT_COUNT, 1);
    s.addStat(ctx.slot, STAT_READ_HIT_BYTES, hit_bytes);
  }
  if (misses.length === 0) return undefined;
  s.addStat(ctx.slot, STAT_READ_MISS_COUNT, 1);
  s.addStat(ctx.slot, STAT_READ_MISS_BYTES, dst.length - hit_bytes);
  return readMisses(ctx, off, dst, misses);
}

/** Read the misses from the backing device, then fill (or drop) their placeholders. */
async function readMisses(ctx: EngineContext, off: number, dst: Uint8Array, misses: Miss[]): Promise<void> {
  const results = await Promise.allSettled(misses.map((m) => ctx.backing.read(m.off, dst.subarray(m.off - off, m.off - off + m.len))));
  let failure: unknown = null;
  for (let i = 0; i < misses.length; i++) {
    const m = misses[i];
    if (results[i].status === "rejected") {
      failure ??= (results[i] as PromiseRejectedResult).reason;
      if (m.node >= 0) dropPlaceholder(ctx, m);
    } else if (m.node >= 0) {
      fillPlaceholder(ctx, m, dst.subarray(m.off - off, m.off - off + m.len));
    }
  }
  if (failure !== null) {
    ctx.s.addStat(ctx.slot, STAT_ERR_BACKING_READ, 1);
    if (failure instanceof BackingIoError) throw failure;
    throw new BackingIoError(`backing read failed: ${(failure as Error)?.message ?? failure}`);
  }
}

/**
 * Walk one chunk (inside one subtree) under the subtree lock: copy hits into dst, queue misses.
 * Returns the bytes served from the cache.
 */
function walkChunk(ctx: EngineContext, off: number, len: number, dst: Uint8Array, misses: Miss[]): number {
  const { idx } = ctx;
  const sub = idx.subtreeOf(off);
  const end = off + len;
  const gaps: Array<[number, number]> = [];
  let hit = 0;
  idx.lockSubtree(sub);
  try {
    let cur = off;
    while (cur < end) {
      const t = idx.ceilingPurge(sub, cur, ctx.isStale);
      if (t < 0 || idx.off[t] >= end) {
        gaps.push([cur, end]);
        break;
      }
      const t_off = idx.off[t];
      if (t_off > cur) {
        gaps.push([cur, t_off]);
        cur = t_off;
      }
      const stop = Math.min(t_off + idx.len[t], end);
      if ((idx.flags[t] & KEY_F_EMPTY) !== 0) {
        // Someone else is filling this range: read the backing device ourselves.
        misses.push({ off: cur, len: stop - cur, node: -1, ver: 0 });
      } else if (copyHit(ctx, t, cur, stop, dst, cur - off)) {
        hit += stop - cur;
      } else {
        // The segment was reused during the copy: the key was clean or written back, so the
        // backing device holds its bytes.
        idx.remove(sub, t);
        misses.push({ off: cur, len: stop - cur, node: -1, ver: 0 });
      }
      cur = stop;
    }
    for (const [g_off, g_end] of gaps) misses.push(placeholderFor(ctx, sub, g_off, g_end - g_off));
  } finally {
    idx.unlockSubtree(sub);
  }
  return hit;
}

/**
 * Copy [cur, stop) of key t from the cache to dst at dst_off. False when the segment changed
 * generation meanwhile.
 */
function copyHit(ctx: EngineContext, t: number, cur: number, stop: number, dst: Uint8Array, dst_off: number): boolean {
  const { idx, segs, media } = ctx;
  const seg = idx.cache_seg_id[t];
  const seq = segs.genSeq(seg);
  if ((idx.flags[t] & CRC_VALID_FLAG) !== 0 && (idx.flags[t] & CRC_VERIFIED_FLAG) === 0) verifyKeyCrc(ctx, t);
  const at = media.dataOff(seg, idx.seg_off[t] + (cur - idx.off[t]));
  dst.set(media.dom.view(at, stop - cur), dst_off);
  return segs.genSeq(seg) === seq;
}

/** Check the CRC of the extent a key was written with; once per key. */
function verifyKeyCrc(ctx: EngineContext, t: number): void {
  const { idx, media } = ctx;
  const seg = idx.cache_seg_id[t];
  const bytes = media.dom.view(media.dataOff(seg, idx.crc_seg_off[t]), idx.crc_len[t]);
  const crc = crc32c(bytes);
  if (crc !== idx.data_crc[t]) {
    ctx.s.addStat(ctx.slot, STAT_ERR_CRC, 1);
    const msg = `data CRC mismatch in key off=${idx.off[t]} len=${idx.crc_len[t]} at segment ${seg}:${idx.crc_seg_off[t]} (stored 0x${idx.data_crc[t].toString(16)}, computed 0x${crc.toString(16)})`;
    ctx.logger.error(msg);
    throw new DataCrcError(msg);
  }
  idx.flags[t] |= CRC_VERIFIED_FLAG;
}

/** Insert an EMPTY placeholder for a gap (subtree lock held); without a free node, none. */
function placeholderFor(ctx: EngineContext, sub: number, off: number, len: number): Miss {
  const { idx } = ctx;
  const node = idx.allocNode();
  if (node < 0) return { off, len, node: -1, ver: 0 };
  idx.setKey(node, off, len, 0, 0, 0, KEY_F_EMPTY);
  const spare_used = idx.insert(sub, node, -1, ctx.isStale) !== 0;
  if (spare_used) throw new Error("placeholder insert needed a split: the gap was not free");
  return { off, len, node, ver: idx.ver[node] };
}

function stillOurs(ctx: EngineContext, m: Miss): boolean {
  const { idx } = ctx;
  return idx.ver[m.node] === m.ver && (idx.flags[m.node] & KEY_F_EMPTY) !== 0;
}

function dropPlaceholder(ctx: EngineContext, m: Miss): void {
  const sub = ctx.idx.subtreeOf(m.off);
  ctx.idx.lockSubtree(sub);
  try {
    if (stillOurs(ctx, m)) ctx.idx.remove(sub, m.node);
  } finally {
    ctx.idx.unlockSubtree(sub);
  }
}

/**
 * Miss completion: cache what the backing device returned and log it as a CLEAN key, unless a
 * write replaced the placeholder. Fill failures are not the reader's problem: the data already
 * came from the backing device; the placeholder is simply dropped.
 */
function fillPlaceholder(ctx: EngineContext, m: Miss, data: Uint8Array): void {
  const { idx, segs, log, media } = ctx;
  const sub = idx.subtreeOf(m.off);
  const a = segs.allocData(ctx.slot, m.len);
  if (a !== null) {
    const at = media.dataOff(a.cache_seg_id, a.seg_off);
    media.dom.write(at, data.subarray(0, a.len));
    media.dom.flush(at, a.len);
    media.dom.fence();
  }
  const kset_id = log.ksetIdOf(m.off);
  let used = false;
  idx.lockSubtree(sub);
  log.lock(kset_id);
  try {
    if (!stillOurs(ctx, m)) return;
    if (a === null || (log.isFull(kset_id) && !log.close(kset_id))) {
      idx.remove(sub, m.node);
      return;
    }
    // Writes may only have shortened the placeholder from its end; cache what is left of it.
    const len = Math.min(idx.len[m.node], a.len);
    const data_crc = media.data_crc ? crc32c(data.subarray(0, len)) : 0;
    idx.setKey(m.node, m.off, len, a.cache_seg_id, a.seg_off, a.seg_gen, KEY_F_CLEAN);
    if (media.data_crc) {
      // Computed from the bytes just written: nothing to verify on the next read.
      idx.setCrc(m.node, data_crc, a.seg_off, len);
      idx.flags[m.node] |= CRC_VERIFIED_FLAG;
    }
    const key = { off: m.off, len, flags: KEY_F_CLEAN, cache_seg_id: a.cache_seg_id, cache_seg_off: a.seg_off, seg_gen: a.seg_gen, data_crc };
    if (log.append(kset_id, key) === KSET_KEYS_MAX) log.close(kset_id);
    used = true;
  } finally {
    log.unlock(kset_id);
    idx.unlockSubtree(sub);
    if (a !== null && !used) segs.put(a.cache_seg_id);
  }
}
