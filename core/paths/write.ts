/**
 * Write path (reference §2.3): cut the request at 4 MiB boundaries and segment ends, copy each
 * piece into the cache and make it durable, and only then give it a key: insert the key into the
 * index (overlap fixup) and append it to its kset, under the subtree and kset locks, so index
 * order and log order of every byte agree.
 *
 * Also write-zeroes and trim, which pcache logs as ordinary keys pointing at a shared, durable
 * zero extent: the on-media format stays the kernel's, replay needs nothing special, and
 * writeback recognises all-zero extents and passes them to the backing device as write-zeroes.
 */
import { assert } from "../assert.ts";
import { KSET_KEYS_MAX, SUBTREE_SPAN } from "../format/constants.ts";
import { crc32c } from "../format/crc.ts";
import { zeroRange } from "../persist/zero.ts";
import { lock, unlock } from "../sync/lock.ts";
import type { EngineContext } from "../engine/context.ts";
import type { DataAlloc } from "../engine/segments.ts";
import type { PayloadCursor } from "./payload.ts";
import {
  CTL_ZERO_SEG,
  LOCK_SEG_TABLE,
  STAT_WRITE_BYTES,
  STAT_WRITE_COUNT,
  STAT_ZERO_BYTES,
} from "../engine/shared_state.ts";
import { INSERT_OK_SPARE_USED } from "../index/key_index.ts";

/** One piece of a request: a key to be. */
export interface Piece extends DataAlloc {
  off: number;
  flags: number;
  data_crc: number;
}

/** Bytes from off to the next 4 MiB boundary. */
export function spanLeft(off: number): number {
  return SUBTREE_SPAN - (off % SUBTREE_SPAN);
}

/**
 * Write the payload at off. The common case (room in the cache, free index nodes, no FUA)
 * finishes here and returns undefined, without a promise: at queue depth 32 a promise chain per
 * request was a tenth of the request thread's time. Otherwise it returns the promise of the rest.
 */
export function writePath(ctx: EngineContext, off: number, payload: PayloadCursor, fua: boolean): Promise<void> | undefined {
  const len = payload.length;
  if (len === 0) return undefined;
  const pieces: Piece[] = [];
  try {
    while (payload.consumed < len) {
      const piece_off = off + payload.consumed;
      const want = Math.min(len - payload.consumed, spanLeft(piece_off));
      const a = ctx.segs.allocData(ctx.slot, want);
      if (a === null) return copyWaiting(ctx, off, payload, pieces, fua);
      copyPiece(ctx, payload, a, piece_off, pieces);
    }
    // The data is durable before any key can name it.
    ctx.media.dom.fence();
  } catch (err) {
    putPieces(ctx, pieces, 0);
    throw err;
  }
  const logging = logPieces(ctx, pieces, fua);
  if (logging === undefined) {
    countWrite(ctx, len);
    return undefined;
  }
  return logging.then(() => countWrite(ctx, len));
}

/** writePath once the cache had no room: the rest of the copy waits for space as it goes. */
async function copyWaiting(ctx: EngineContext, off: number, payload: PayloadCursor, pieces: Piece[], fua: boolean): Promise<void> {
  const len = payload.length;
  try {
    while (payload.consumed < len) {
      const piece_off = off + payload.consumed;
      const want = Math.min(len - payload.consumed, spanLeft(piece_off));
      const a = ctx.segs.allocData(ctx.slot, want) ?? (await ctx.waitForSpace("cache segment", () => ctx.segs.allocData(ctx.slot, want)));
      copyPiece(ctx, payload, a, piece_off, pieces);
    }
    ctx.media.dom.fence();
  } catch (err) {
    putPieces(ctx, pieces, 0);
    throw err;
  }
  await logPieces(ctx, pieces, fua);
  countWrite(ctx, len);
}

/** Copy the next a.len payload bytes to the allocation and flush them (the caller fences). */
function copyPiece(ctx: EngineContext, payload: PayloadCursor, a: DataAlloc, piece_off: number, pieces: Piece[]): void {
  const dom = ctx.media.dom;
  const at = ctx.media.dataOff(a.cache_seg_id, a.seg_off);
  // Listed before the copy: a failed copy still gives the allocation's reference back.
  const piece: Piece = { cache_seg_id: a.cache_seg_id, seg_off: a.seg_off, len: a.len, seg_gen: a.seg_gen, off: piece_off, flags: 0, data_crc: 0 };
  pieces.push(piece);
  piece.data_crc = payload.copyTo(dom, at, a.len, ctx.media.data_crc);
  dom.flush(at, a.len);
}

/** Give back the segment references of pieces[from..] (not logged). */
function putPieces(ctx: EngineContext, pieces: Piece[], from: number): void {
  for (let i = from; i < pieces.length; i++) ctx.segs.put(pieces[i].cache_seg_id);
}

function countWrite(ctx: EngineContext, len: number): void {
  ctx.s.addStat(ctx.slot, STAT_WRITE_COUNT, 1);
  ctx.s.addStat(ctx.slot, STAT_WRITE_BYTES, len);
}

/**
 * Insert each piece's key and append it to its kset; with fua, end with a flush-epoch boundary
 * (every kset closed), so writes issued after this one's reply lie in a later epoch and
 * writeback never lets them reach the backing device before it. Pieces not logged (on error)
 * give back their segment reference. The common case (free index nodes, room in the kset, no
 * FUA) finishes here and returns undefined; otherwise the promise of the rest.
 */
export function logPieces(ctx: EngineContext, pieces: Piece[], fua: boolean): Promise<void> | undefined {
  let i = 0;
  try {
    for (; i < pieces.length; i++) {
      if (!tryInsertAndLog(ctx, pieces[i])) return logWaiting(ctx, pieces, i, fua);
    }
  } catch (err) {
    putPieces(ctx, pieces, i);
    throw err;
  }
  return fua ? ctx.log.closeAllAsBoundary(ctx.limits.space_wait_ms) : undefined;
}

/** logPieces from pieces[from] on, waiting for index nodes or log room as needed. */
async function logWaiting(ctx: EngineContext, pieces: Piece[], from: number, fua: boolean): Promise<void> {
  let i = from;
  try {
    for (; i < pieces.length; i++) {
      const p = pieces[i];
      if (!tryInsertAndLog(ctx, p)) await insertAndLogWaiting(ctx, p);
    }
  } catch (err) {
    putPieces(ctx, pieces, i);
    throw err;
  }
  if (fua) await ctx.log.closeAllAsBoundary(ctx.limits.space_wait_ms);
}

/** Two index nodes: one for the key, one spare for a split. */
function allocNodePair(ctx: EngineContext): [number, number] | null {
  const a = ctx.idx.allocNode();
  if (a < 0) return null;
  const b = ctx.idx.allocNode();
  if (b < 0) {
    ctx.idx.freeNode(a);
    return null;
  }
  return [a, b];
}

/** Log p without waiting; false when it has to wait for index nodes or for room in the log. */
function tryInsertAndLog(ctx: EngineContext, p: Piece): boolean {
  const pair = allocNodePair(ctx);
  return pair !== null && logWithNodes(ctx, p, pair);
}

async function insertAndLogWaiting(ctx: EngineContext, p: Piece): Promise<void> {
  for (;;) {
    const pair = await ctx.waitForNodes(() => allocNodePair(ctx));
    if (logWithNodes(ctx, p, pair)) return;
    // The kset is full and the log had no segment to roll into: wait for GC, then retry.
    await ctx.log.closeWaiting(ctx.log.ksetIdOf(p.off), ctx.limits.space_wait_ms);
  }
}

/**
 * Under the subtree and kset locks (so index order and log order agree): insert p's key (node)
 * and append it to its kset. False, with both nodes freed, when the kset is full and cannot
 * close into a new segment yet.
 */
function logWithNodes(ctx: EngineContext, p: Piece, [node, spare]: [number, number]): boolean {
  assert(p.len > 0 && Math.floor(p.off / SUBTREE_SPAN) === Math.floor((p.off + p.len - 1) / SUBTREE_SPAN), "piece crosses a 4 MiB boundary");
  const { idx, log } = ctx;
  const sub = idx.subtreeOf(p.off);
  const kset_id = log.ksetIdOf(p.off);
  setNode(ctx, node, p);
  let logged = false;
  let spare_used = false;
  idx.lockSubtree(sub);
  log.lock(kset_id);
  try {
    if (!log.isFull(kset_id) || log.close(kset_id)) {
      // Stamped under the kset lock: a boundary that begins later closes this kset first.
      idx.setLogStamp(node, log.epochs.current(), log.closes(kset_id));
      spare_used = idx.insert(sub, node, spare, ctx.isStale) === INSERT_OK_SPARE_USED;
      const key = { off: p.off, len: p.len, flags: p.flags, cache_seg_id: p.cache_seg_id, cache_seg_off: p.seg_off, seg_gen: p.seg_gen, data_crc: p.data_crc };
      if (log.append(kset_id, key) === KSET_KEYS_MAX) log.close(kset_id); // stays full if no room: the next appender retries
      logged = true;
    }
  } finally {
    log.unlock(kset_id);
    idx.unlockSubtree(sub);
  }
  if (!spare_used) idx.freeNode(spare);
  if (!logged) idx.freeNode(node);
  return logged;
}

function setNode(ctx: EngineContext, id: number, p: Piece): void {
  ctx.idx.setKey(id, p.off, p.len, p.cache_seg_id, p.seg_off, p.seg_gen, p.flags);
  if (ctx.media.data_crc) ctx.idx.setCrc(id, p.data_crc, p.seg_off, p.len);
}

// ---- write-zeroes and trim ----

/** The zero extent: SUBTREE_SPAN durable zero bytes in a segment that is never freed. */
async function zeroExtent(ctx: EngineContext): Promise<DataAlloc> {
  const s = ctx.s;
  for (;;) {
    const seg = Atomics.load(s.ctl, CTL_ZERO_SEG);
    if (seg >= 0) return { cache_seg_id: seg, seg_off: 0, len: SUBTREE_SPAN, seg_gen: ctx.segs.gen(seg) };
    const fresh = await ctx.waitForSpace("cache segment", () => {
      const id = ctx.segs.allocSegment(false);
      return id < 0 ? null : id;
    });
    ctx.segs.get(fresh); // held for as long as the server runs
    zeroRange(ctx.media.dom, ctx.media.dataOff(fresh, 0), SUBTREE_SPAN);
    ctx.media.dom.fence();
    lock(s.locks, LOCK_SEG_TABLE);
    const won = s.ctl[CTL_ZERO_SEG] < 0;
    if (won) Atomics.store(s.ctl, CTL_ZERO_SEG, fresh);
    unlock(s.locks, LOCK_SEG_TABLE);
    if (!won) ctx.segs.put(fresh); // another thread made one first
  }
}

const zero_crc_by_len = new Map<number, number>();

function zeroCrc(len: number): number {
  let crc = zero_crc_by_len.get(len);
  if (crc === undefined) {
    crc = crc32c(new Uint8Array(len));
    if (zero_crc_by_len.size < 64) zero_crc_by_len.set(len, crc);
  }
  return crc;
}

/** Write-zeroes and trim: every later read of the range returns zeroes, before and after restart. */
export async function zeroPath(ctx: EngineContext, off: number, len: number, fua: boolean): Promise<void> {
  if (len === 0) return;
  const z = await zeroExtent(ctx);
  const pieces: Piece[] = [];
  for (let done = 0; done < len; ) {
    const piece_off = off + done;
    const n = Math.min(len - done, spanLeft(piece_off));
    ctx.segs.get(z.cache_seg_id);
    pieces.push({ ...z, off: piece_off, len: n, flags: 0, data_crc: ctx.media.data_crc ? zeroCrc(n) : 0 });
    done += n;
  }
  await logPieces(ctx, pieces, fua);
  ctx.s.addStat(ctx.slot, STAT_ZERO_BYTES, len);
}
