/**
 * Transmission phase: validate a request (in ONE place, before dispatch), run it against the
 * export, encode the reply as one buffer. The connection owns the bytes and the socket; this
 * module owns the rules (nbd-interop.md §1.6, §1.9, §4).
 *
 * Error rules: unknown command or flag => EINVAL; DF without structured replies => EINVAL;
 * write/trim/zero on a read-only export => EPERM; write/zero past the end => ENOSPC;
 * read/trim/cache/block-status past the end => EINVAL; READ or WRITE over 32 MiB => EINVAL
 * (a WRITE's payload is consumed first, or the connection dropped when it is absurd);
 * FLUSH with offset or length != 0 => EINVAL; BLOCK_STATUS without structured replies and a
 * selected context => EINVAL; anything after shutdown began => ESHUTDOWN.
 * Zero-length READ/WRITE/TRIM/ZERO/CACHE succeed and do nothing.
 */
import { assert } from "../assert.ts";
import type { BufferPool } from "./buffer_pool.ts";
import { type NbdExport, type WriteData, writeDataLength } from "./export.ts";
import { describeError, type NbdLogger } from "./logger.ts";
import * as W from "./wire.ts";

/** Per-connection state the transmission rules depend on. */
export interface Session {
  readonly export: NbdExport;
  readonly structured_replies: boolean;
  /** Selected base:allocation context id, or null. */
  readonly meta_context_id: number | null;
  shutting_down: boolean;
  readonly log: NbdLogger;
  readonly label: string;
  /** Where READ reply buffers come from; the connection releases them once written. */
  readonly read_pool: BufferPool;
}

/** A request copied out of the receive buffer, ready to run asynchronously. */
export interface Request {
  type: number;
  flags: number;
  cookie_hi: number;
  cookie_lo: number;
  offset: number;
  length: number;
}

/** Why a request was refused before dispatch. */
export interface Rejection {
  errno: number;
  message: Uint8Array;
}

function rejection(errno: number, message: string): Rejection {
  return { errno, message: W.utf8(message) };
}

const R_UNKNOWN_COMMAND = rejection(W.NBD_EINVAL, "unknown command");
const R_BAD_FLAGS = rejection(W.NBD_EINVAL, "invalid command flags");
const R_DF_WITHOUT_SR = rejection(W.NBD_EINVAL, "DF requires structured replies");
const R_SHUTDOWN = rejection(W.NBD_ESHUTDOWN, "server is shutting down");
const R_READ_ONLY = rejection(W.NBD_EPERM, "export is read-only");
const R_TOO_LONG = rejection(W.NBD_EINVAL, "request length over 32 MiB");
const R_FLUSH_ARGS = rejection(W.NBD_EINVAL, "flush offset and length must be 0");
const R_NO_CONTEXT = rejection(W.NBD_EINVAL, "block status needs a selected meta context");
const R_BS_EMPTY = rejection(W.NBD_EINVAL, "block status length 0");
const R_OUT_OF_RANGE = rejection(W.NBD_EINVAL, "offset and length beyond end of export");
const R_NO_SPACE = rejection(W.NBD_ENOSPC, "write beyond end of export");

/** Flags each command accepts (FUA is valid on every command since we advertise SEND_FUA). */
function allowedFlags(type: number): number {
  switch (type) {
    case W.CMD_READ: return W.CMD_FLAG_FUA | W.CMD_FLAG_DF;
    case W.CMD_WRITE_ZEROES: return W.CMD_FLAG_FUA | W.CMD_FLAG_NO_HOLE | W.CMD_FLAG_FAST_ZERO;
    case W.CMD_BLOCK_STATUS: return W.CMD_FLAG_FUA | W.CMD_FLAG_REQ_ONE;
    default: return W.CMD_FLAG_FUA;
  }
}

/**
 * The single validation point. Returns null when the request may run, else why not.
 * After null, handlers may rely on: integer offset/length, offset+length <= size_bytes,
 * payload lengths <= 32 MiB, no writes to a read-only export.
 */
export function validateRequest(hdr: W.RequestHeader, s: Session): Rejection | null {
  const t = hdr.type;
  // DISC never gets here (the connection handles it: no reply); treat it like any unknown type.
  if (t > W.CMD_BLOCK_STATUS || t === W.CMD_DISC) return R_UNKNOWN_COMMAND;
  if ((hdr.flags & ~allowedFlags(t)) !== 0) return R_BAD_FLAGS;
  if ((hdr.flags & W.CMD_FLAG_DF) !== 0 && !s.structured_replies) return R_DF_WITHOUT_SR;
  if (s.shutting_down) return R_SHUTDOWN;
  const writes = t === W.CMD_WRITE || t === W.CMD_TRIM || t === W.CMD_WRITE_ZEROES;
  if (writes && s.export.read_only) return R_READ_ONLY;
  if ((t === W.CMD_READ || t === W.CMD_WRITE) && hdr.length > W.PAYLOAD_BYTES_MAX) return R_TOO_LONG;
  if (t === W.CMD_FLUSH) {
    return hdr.offset_hi !== 0 || hdr.offset !== 0 || hdr.length !== 0 ? R_FLUSH_ARGS : null;
  }
  if (t === W.CMD_BLOCK_STATUS) {
    if (!s.structured_replies || s.meta_context_id === null) return R_NO_CONTEXT;
    if (hdr.length === 0) return R_BS_EMPTY;
  }
  // offset_hi >= 2^21 means offset >= 2^53: past any export we can describe, and not an
  // exact JS number, so refuse it before doing arithmetic with it.
  const in_range = hdr.offset_hi < W.U64_SAFE_HI_LIMIT && hdr.offset + hdr.length <= s.export.size_bytes;
  if (!in_range) return t === W.CMD_WRITE || t === W.CMD_WRITE_ZEROES ? R_NO_SPACE : R_OUT_OF_RANGE;
  return null;
}

/** How the connection treats a WRITE's payload. */
export type PayloadPlan = "take" | "skip" | "drop";

/** Payloads above this are not skipped but end the connection (a client this far off is broken or hostile). */
export const WRITE_SKIP_BYTES_MAX = 128 * 1024 * 1024;

export function writePayloadPlan(hdr: W.RequestHeader, rej: Rejection | null): PayloadPlan {
  if (rej === null) return "take";
  return hdr.length <= WRITE_SKIP_BYTES_MAX ? "skip" : "drop";
}

export function copyRequest(hdr: W.RequestHeader): Request {
  return {
    type: hdr.type,
    flags: hdr.flags,
    cookie_hi: hdr.cookie_hi,
    cookie_lo: hdr.cookie_lo,
    offset: hdr.offset,
    length: hdr.length,
  };
}

/** Reply for a request refused before dispatch (or failed in the export). */
export function errorReply(req: Request, errno: number, message: Uint8Array, s: Session): Uint8Array {
  // With structured replies READ MUST use chunks; for the rest a chunk carries the message too.
  if (s.structured_replies) return W.encodeErrorChunk(req.cookie_hi, req.cookie_lo, errno, message);
  return W.encodeSimpleReply(errno, req.cookie_hi, req.cookie_lo);
}

/** Errnos the protocol defines and that we pass through from the export unchanged. */
function errnoForClient(e: unknown, req: Request): { errno: number; expected: boolean } {
  const raw = typeof e === "object" && e !== null ? (e as { errno?: unknown }).errno : undefined;
  if (typeof raw !== "number" || !Number.isInteger(raw)) return { errno: W.NBD_EIO, expected: false };
  const n = Math.abs(raw); // node-style negative errnos too
  switch (n) {
    case W.NBD_EPERM:
    case W.NBD_EIO:
    case W.NBD_ENOMEM:
    case W.NBD_EINVAL:
    case W.NBD_ENOSPC:
    case W.NBD_EOVERFLOW:
    case W.NBD_ESHUTDOWN:
      return { errno: n, expected: true };
    case 27: // EFBIG
    case 122: // EDQUOT
      return { errno: W.NBD_ENOSPC, expected: true };
    case 30: // EROFS
      return { errno: W.NBD_EPERM, expected: true };
    case W.NBD_ENOTSUP: {
      // ENOTSUP is only meaningful as the answer to a FAST_ZERO write-zeroes.
      const fast_zero = req.type === W.CMD_WRITE_ZEROES && (req.flags & W.CMD_FLAG_FAST_ZERO) !== 0;
      return { errno: fast_zero ? W.NBD_ENOTSUP : W.NBD_EINVAL, expected: true };
    }
    default:
      return { errno: W.NBD_EIO, expected: false };
  }
}

const MSG_BY_ERRNO: Record<number, Uint8Array> = {
  [W.NBD_EPERM]: W.utf8("operation not permitted"),
  [W.NBD_EIO]: W.utf8("input/output error"),
  [W.NBD_ENOMEM]: W.utf8("out of memory"),
  [W.NBD_EINVAL]: W.utf8("invalid argument"),
  [W.NBD_ENOSPC]: W.utf8("no space left"),
  [W.NBD_EOVERFLOW]: W.utf8("value too large"),
  [W.NBD_ENOTSUP]: W.utf8("fast zero not supported"),
  [W.NBD_ESHUTDOWN]: W.utf8("server is shutting down"),
};

function failed(req: Request, e: unknown, s: Session): Uint8Array {
  const { errno, expected } = errnoForClient(e, req);
  // One line at most, and never a stack: the export's own errors are its business to log.
  s.log(
    expected ? "debug" : "warn",
    `${s.label}: ${W.commandName(req.type)} off=${req.offset} len=${req.length} failed (errno ${errno}): ${describeError(e)}`,
  );
  return errorReply(req, errno, MSG_BY_ERRNO[errno] ?? MSG_BY_ERRNO[W.NBD_EIO]!, s);
}

/** Successful reply for a command that returns no data. */
function okReply(req: Request): Uint8Array {
  return W.encodeSimpleReply(0, req.cookie_hi, req.cookie_lo);
}

/** Most extents one BLOCK_STATUS chunk carries (the spec suggests <= 2^20; 2^16 is plenty). */
export const BLOCK_STATUS_EXTENTS_MAX = 65536;

/**
 * Runs a validated request and returns its reply: the reply itself when the export finished at
 * once (a cached read, a write with room: no promise per request), else a promise of it. Never
 * fails: every failure becomes an error reply. `payload` is the WRITE data (exactly req.length
 * bytes).
 */
export function execute(req: Request, payload: WriteData | null, s: Session): Uint8Array | Promise<Uint8Array> {
  // The other side of validateRequest's boundary. A failure here is our bug: it throws, and
  // the connection logs it and closes (the export is never called with a bad range).
  assert(Number.isSafeInteger(req.offset) && req.offset + req.length <= s.export.size_bytes, "request range validated");
  assert(req.type !== W.CMD_WRITE || (payload !== null && writeDataLength(payload) === req.length), "WRITE payload is complete");
  if (req.type === W.CMD_READ) return read(req, s);
  if (req.type === W.CMD_WRITE) return write(req, payload!, s);
  return executeOther(req, s);
}

function write(req: Request, payload: WriteData, s: Session): Uint8Array | Promise<Uint8Array> {
  if (req.length === 0) return okReply(req);
  let pending: Promise<void> | undefined;
  try {
    pending = s.export.write(req.offset, payload, (req.flags & W.CMD_FLAG_FUA) !== 0);
  } catch (e) {
    return failed(req, e, s);
  }
  if (pending === undefined) return okReply(req);
  return pending.then(
    () => okReply(req),
    (e: unknown) => failed(req, e, s),
  );
}

/**
 * READ: the export reads straight into the reply buffer, after room for the header, so header
 * and data leave in one write. With structured replies, one OFFSET_DATA chunk covers the whole
 * range, which also satisfies DF.
 */
function read(req: Request, s: Session): Uint8Array | Promise<Uint8Array> {
  const n = req.length;
  if (n === 0) return s.structured_replies ? W.encodeNoneChunk(req.cookie_hi, req.cookie_lo) : okReply(req);
  const prefix = s.structured_replies ? W.OFFSET_DATA_PREFIX_BYTES : W.SIMPLE_REPLY_BYTES;
  const buf = s.read_pool.acquire(prefix + n);
  let pending: Promise<void> | undefined;
  try {
    pending = s.export.read(req.offset, n, buf.subarray(prefix));
  } catch (e) {
    s.read_pool.release(buf);
    return failed(req, e, s);
  }
  if (pending === undefined) return readReply(req, s, buf);
  return pending.then(
    () => readReply(req, s, buf),
    (e: unknown) => {
      s.read_pool.release(buf);
      return failed(req, e, s);
    },
  );
}

/** Puts the header in front of the data the export read. */
function readReply(req: Request, s: Session, buf: Uint8Array): Uint8Array {
  if (s.structured_replies) W.writeOffsetDataPrefix(buf, W.REPLY_FLAG_DONE, req.cookie_hi, req.cookie_lo, req.offset, req.length);
  else W.writeSimpleReplyHeader(buf, 0, req.cookie_hi, req.cookie_lo);
  return buf;
}

/** Every command but READ and WRITE: none is on the hot path. */
async function executeOther(req: Request, s: Session): Promise<Uint8Array> {
  const ex = s.export;
  const fua = (req.flags & W.CMD_FLAG_FUA) !== 0;
  try {
    switch (req.type) {
      case W.CMD_FLUSH:
        await ex.flush();
        return okReply(req);
      case W.CMD_TRIM:
        if (req.length > 0) await ex.trim(req.offset, req.length, fua);
        return okReply(req);
      case W.CMD_CACHE:
        if (req.length > 0) await ex.cache(req.offset, req.length);
        return okReply(req);
      case W.CMD_WRITE_ZEROES:
        if (req.length > 0) {
          await ex.writeZeroes(req.offset, req.length, {
            fua,
            no_hole: (req.flags & W.CMD_FLAG_NO_HOLE) !== 0,
            fast_zero: (req.flags & W.CMD_FLAG_FAST_ZERO) !== 0,
          });
        }
        return okReply(req);
      case W.CMD_BLOCK_STATUS:
        return await blockStatus(req, s);
      default:
        // validateRequest refuses everything else; reaching here is a bug in this module.
        return errorReply(req, W.NBD_EINVAL, R_UNKNOWN_COMMAND.message, s);
    }
  } catch (e) {
    return failed(req, e, s);
  }
}

async function blockStatus(req: Request, s: Session): Promise<Uint8Array> {
  const raw = await s.export.blockStatus(req.offset, req.length);
  const req_one = (req.flags & W.CMD_FLAG_REQ_ONE) !== 0;
  const extents = clipExtents(raw, req.length, req_one);
  if (extents.length === 0) {
    throw new Error("export returned no usable block-status extent");
  }
  return W.encodeBlockStatusChunk(req.cookie_hi, req.cookie_lo, s.meta_context_id!, extents);
}

/**
 * Makes the export's extents safe to send: positive integer lengths, flags limited to the two
 * base:allocation bits, adjacent equal extents merged, at most BLOCK_STATUS_EXTENTS_MAX (one
 * with REQ_ONE), and the total clipped to the request so the reply never amplifies it.
 * Stops at the first malformed extent (what came before is still correct).
 */
export function clipExtents(
  raw: ReadonlyArray<{ length: number; flags: number }> | null | undefined,
  len: number,
  req_one: boolean,
): Array<{ length: number; flags: number }> {
  const out: Array<{ length: number; flags: number }> = [];
  if (!Array.isArray(raw)) return out;
  let total = 0;
  for (const e of raw) {
    if (total >= len) break;
    const l = e?.length;
    if (typeof l !== "number" || !Number.isSafeInteger(l) || l <= 0) break;
    const flags = typeof e.flags === "number" ? e.flags & (W.STATE_HOLE | W.STATE_ZERO) : 0;
    const take = Math.min(l, len - total);
    const last = out[out.length - 1];
    if (last && last.flags === flags) last.length += take;
    else {
      if (req_one && out.length === 1) break;
      if (out.length >= BLOCK_STATUS_EXTENTS_MAX) break;
      out.push({ length: take, flags });
    }
    total += take;
  }
  return out;
}
