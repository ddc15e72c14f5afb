/**
 * NBD wire format: constants, encoders and decoders. No state and no I/O live here; the
 * handshake, transmission and connection modules decide what to send, this module only
 * knows how the bytes look. Every number on the wire is big-endian.
 *
 * Vocabulary follows the protocol document (doc/proto.md of the nbd project): option,
 * reply type, info type, transmission flags, command flags, cookie, chunk.
 */

// ---------------------------------------------------------------------------------------
// Magic numbers (u64 ones are split into hi/lo u32 so no BigInt is needed on hot paths).

/** "NBDMAGIC", first 8 bytes the server sends. */
export const NBD_MAGIC_HI = 0x4e42444d;
export const NBD_MAGIC_LO = 0x41474943;
/** "IHAVEOPT": newstyle server magic and the prefix of every client option. */
export const IHAVEOPT_HI = 0x49484156;
export const IHAVEOPT_LO = 0x454f5054;
/** Prefix of every option reply: 0x0003e889045565a9. */
export const OPT_REPLY_MAGIC_HI = 0x0003e889;
export const OPT_REPLY_MAGIC_LO = 0x045565a9;
/** Compact (28-byte) request. */
export const REQUEST_MAGIC = 0x25609513;
/** Simple (16-byte) reply. */
export const SIMPLE_REPLY_MAGIC = 0x67446698;
/** Structured reply chunk (20-byte header). */
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

// ---------------------------------------------------------------------------------------
// Handshake.

/** Handshake flags (server, u16). */
export const FLAG_FIXED_NEWSTYLE = 1 << 0;
export const FLAG_NO_ZEROES = 1 << 1;
/** Client flags (u32). Any other bit set => the server MUST drop the connection. */
export const FLAG_C_FIXED_NEWSTYLE = 1 << 0;
export const FLAG_C_NO_ZEROES = 1 << 1;

/** Option types. */
export const OPT_EXPORT_NAME = 1;
export const OPT_ABORT = 2;
export const OPT_LIST = 3;
export const OPT_PEEK_EXPORT = 4;
export const OPT_STARTTLS = 5;
export const OPT_INFO = 6;
export const OPT_GO = 7;
export const OPT_STRUCTURED_REPLY = 8;
export const OPT_LIST_META_CONTEXT = 9;
export const OPT_SET_META_CONTEXT = 10;
export const OPT_EXTENDED_HEADERS = 11;

/** Option reply types. Errors have bit 31 set. */
export const REP_ACK = 1;
export const REP_SERVER = 2;
export const REP_INFO = 3;
export const REP_META_CONTEXT = 4;
const REP_ERR = 0x80000000;
export const REP_ERR_UNSUP = REP_ERR + 1;
export const REP_ERR_POLICY = REP_ERR + 2;
export const REP_ERR_INVALID = REP_ERR + 3;
export const REP_ERR_PLATFORM = REP_ERR + 4;
export const REP_ERR_TLS_REQD = REP_ERR + 5;
export const REP_ERR_UNKNOWN = REP_ERR + 6;
export const REP_ERR_SHUTDOWN = REP_ERR + 7;
export const REP_ERR_BLOCK_SIZE_REQD = REP_ERR + 8;
export const REP_ERR_TOO_BIG = REP_ERR + 9;
export const REP_ERR_EXT_HEADER_REQD = REP_ERR + 10;

/** Info types inside REP_INFO. */
export const INFO_EXPORT = 0;
export const INFO_NAME = 1;
export const INFO_DESCRIPTION = 2;
export const INFO_BLOCK_SIZE = 3;

// ---------------------------------------------------------------------------------------
// Transmission.

/** Transmission flags (u16). */
export const TF_HAS_FLAGS = 1 << 0;
export const TF_READ_ONLY = 1 << 1;
export const TF_SEND_FLUSH = 1 << 2;
export const TF_SEND_FUA = 1 << 3;
export const TF_ROTATIONAL = 1 << 4;
export const TF_SEND_TRIM = 1 << 5;
export const TF_SEND_WRITE_ZEROES = 1 << 6;
export const TF_SEND_DF = 1 << 7;
export const TF_CAN_MULTI_CONN = 1 << 8;
export const TF_SEND_RESIZE = 1 << 9;
export const TF_SEND_CACHE = 1 << 10;
export const TF_SEND_FAST_ZERO = 1 << 11;

/** Command types. */
export const CMD_READ = 0;
export const CMD_WRITE = 1;
export const CMD_DISC = 2;
export const CMD_FLUSH = 3;
export const CMD_TRIM = 4;
export const CMD_CACHE = 5;
export const CMD_WRITE_ZEROES = 6;
export const CMD_BLOCK_STATUS = 7;

/** Command flags (u16). */
export const CMD_FLAG_FUA = 1 << 0;
export const CMD_FLAG_NO_HOLE = 1 << 1;
export const CMD_FLAG_DF = 1 << 2;
export const CMD_FLAG_REQ_ONE = 1 << 3;
export const CMD_FLAG_FAST_ZERO = 1 << 4;
export const CMD_FLAG_PAYLOAD_LEN = 1 << 5;

/** Structured reply flags and chunk types. */
export const REPLY_FLAG_DONE = 1 << 0;
export const REPLY_TYPE_NONE = 0;
export const REPLY_TYPE_OFFSET_DATA = 1;
export const REPLY_TYPE_OFFSET_HOLE = 2;
export const REPLY_TYPE_BLOCK_STATUS = 5;
export const REPLY_TYPE_ERROR = (1 << 15) + 1;
export const REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2;

/** base:allocation extent flags. */
export const STATE_HOLE = 1 << 0;
export const STATE_ZERO = 1 << 1;
export const META_CONTEXT_BASE_ALLOCATION = "base:allocation";

/** Error values the protocol defines (the reply `error` field). */
export const NBD_EPERM = 1;
export const NBD_EIO = 5;
export const NBD_ENOMEM = 12;
export const NBD_EINVAL = 22;
export const NBD_ENOSPC = 28;
export const NBD_EOVERFLOW = 75;
export const NBD_ENOTSUP = 95;
export const NBD_ESHUTDOWN = 108;

// ---------------------------------------------------------------------------------------
// Sizes and limits.

export const OPTION_HEADER_BYTES = 16;
export const OPTION_REPLY_HEADER_BYTES = 20;
export const REQUEST_HEADER_BYTES = 28;
export const SIMPLE_REPLY_BYTES = 16;
export const CHUNK_HEADER_BYTES = 20;
/** Greeting: NBDMAGIC, IHAVEOPT, u16 handshake flags. */
export const GREETING_BYTES = 18;
export const CLIENT_FLAGS_BYTES = 4;
/** Reply to EXPORT_NAME: u64 size, u16 flags, then 124 zero bytes unless NO_ZEROES. */
export const EXPORT_NAME_REPLY_BYTES = 10;
export const EXPORT_NAME_ZEROES_BYTES = 124;
/** Strings (export names, queries, messages) MUST be at most this long. */
export const STRING_BYTES_MAX = 4096;
/** Largest READ/WRITE payload we serve (the portable maximum every client respects). */
export const PAYLOAD_BYTES_MAX = 32 * 1024 * 1024;
/** Block size constraints advertised in INFO_BLOCK_SIZE. */
export const BLOCK_SIZE_MIN = 1;
export const BLOCK_SIZE_PREFERRED_DEFAULT = 4096;
/** Offsets and lengths at or above 2^53 cannot be exact JS numbers; they are out of range. */
export const U64_SAFE_HI_LIMIT = 0x200000;

// ---------------------------------------------------------------------------------------
// Decoders.

/** A decoded transmission request header. The cookie is kept as two u32 halves. */
export interface RequestHeader {
  magic: number;
  flags: number;
  type: number;
  cookie_hi: number;
  cookie_lo: number;
  /** Offset as a JS number; exact when offset_hi < U64_SAFE_HI_LIMIT. */
  offset: number;
  offset_hi: number;
  length: number;
}

/** Decodes a 28-byte request header starting at `at` without copying. */
/** Decodes the 28-byte request header at b[at..]: byte reads, no DataView per request. */
export function decodeRequestHeader(b: Uint8Array, at: number, out: RequestHeader): void {
  out.magic = be32(b, at);
  out.flags = (b[at + 4]! << 8) | b[at + 5]!;
  out.type = (b[at + 6]! << 8) | b[at + 7]!;
  out.cookie_hi = be32(b, at + 8);
  out.cookie_lo = be32(b, at + 12);
  const off_hi = be32(b, at + 16);
  out.offset_hi = off_hi;
  out.offset = off_hi * 0x100000000 + be32(b, at + 20);
  out.length = be32(b, at + 24);
}

function be32(b: Uint8Array, at: number): number {
  return ((b[at]! << 24) | (b[at + 1]! << 16) | (b[at + 2]! << 8) | b[at + 3]!) >>> 0;
}

export function newRequestHeader(): RequestHeader {
  return { magic: 0, flags: 0, type: 0, cookie_hi: 0, cookie_lo: 0, offset: 0, offset_hi: 0, length: 0 };
}

/** A decoded option header (magic already checked by the caller through `magic_ok`). */
export interface OptionHeader {
  magic_ok: boolean;
  option: number;
  length: number;
}

export function decodeOptionHeader(view: DataView, at: number): OptionHeader {
  const magic_ok = view.getUint32(at, false) === IHAVEOPT_HI && view.getUint32(at + 4, false) === IHAVEOPT_LO;
  return { magic_ok, option: view.getUint32(at + 8, false), length: view.getUint32(at + 12, false) };
}

export function dataViewOf(bytes: Uint8Array): DataView {
  return new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

// ---------------------------------------------------------------------------------------
// Encoders. Each returns one buffer so that a reply is one socket write.

const text_encoder = new TextEncoder();

export function utf8(s: string): Uint8Array {
  return text_encoder.encode(s);
}

/** Writes a u64 given as a non-negative safe integer. */
export function setU64(view: DataView, at: number, value: number): void {
  view.setUint32(at, Math.floor(value / 0x100000000), false);
  view.setUint32(at + 4, value >>> 0, false);
}

export function encodeGreeting(handshake_flags: number): Uint8Array {
  const buf = new Uint8Array(GREETING_BYTES);
  const v = dataViewOf(buf);
  v.setUint32(0, NBD_MAGIC_HI, false);
  v.setUint32(4, NBD_MAGIC_LO, false);
  v.setUint32(8, IHAVEOPT_HI, false);
  v.setUint32(12, IHAVEOPT_LO, false);
  v.setUint16(16, handshake_flags, false);
  return buf;
}

/** One option reply: magic, option echo, reply type, length, data. */
export function encodeOptionReply(option: number, reply_type: number, data?: Uint8Array): Uint8Array {
  const data_bytes = data ? data.length : 0;
  const buf = new Uint8Array(OPTION_REPLY_HEADER_BYTES + data_bytes);
  const v = dataViewOf(buf);
  v.setUint32(0, OPT_REPLY_MAGIC_HI, false);
  v.setUint32(4, OPT_REPLY_MAGIC_LO, false);
  v.setUint32(8, option >>> 0, false);
  v.setUint32(12, reply_type >>> 0, false);
  v.setUint32(16, data_bytes, false);
  if (data) buf.set(data, OPTION_REPLY_HEADER_BYTES);
  return buf;
}

/** REP_SERVER data: u32 name length, name, optional description. */
export function encodeRepServerData(name: Uint8Array, description: Uint8Array): Uint8Array {
  const buf = new Uint8Array(4 + name.length + description.length);
  dataViewOf(buf).setUint32(0, name.length, false);
  buf.set(name, 4);
  buf.set(description, 4 + name.length);
  return buf;
}

export function encodeInfoExport(size_bytes: number, transmission_flags: number): Uint8Array {
  const buf = new Uint8Array(12);
  const v = dataViewOf(buf);
  v.setUint16(0, INFO_EXPORT, false);
  setU64(v, 2, size_bytes);
  v.setUint16(10, transmission_flags, false);
  return buf;
}

/** INFO_NAME or INFO_DESCRIPTION: u16 type then the string. */
export function encodeInfoString(info_type: number, s: Uint8Array): Uint8Array {
  const buf = new Uint8Array(2 + s.length);
  dataViewOf(buf).setUint16(0, info_type, false);
  buf.set(s, 2);
  return buf;
}

export function encodeInfoBlockSize(min: number, preferred: number, max: number): Uint8Array {
  const buf = new Uint8Array(14);
  const v = dataViewOf(buf);
  v.setUint16(0, INFO_BLOCK_SIZE, false);
  v.setUint32(2, min, false);
  v.setUint32(6, preferred, false);
  v.setUint32(10, max, false);
  return buf;
}

export function encodeMetaContextData(context_id: number, name: Uint8Array): Uint8Array {
  const buf = new Uint8Array(4 + name.length);
  dataViewOf(buf).setUint32(0, context_id, false);
  buf.set(name, 4);
  return buf;
}

/** Reply to EXPORT_NAME: size, flags, and the 124 reserved zero bytes unless NO_ZEROES. */
export function encodeExportNameReply(size_bytes: number, transmission_flags: number, zeroes: boolean): Uint8Array {
  const buf = new Uint8Array(EXPORT_NAME_REPLY_BYTES + (zeroes ? EXPORT_NAME_ZEROES_BYTES : 0));
  const v = dataViewOf(buf);
  setU64(v, 0, size_bytes);
  v.setUint16(8, transmission_flags, false);
  return buf;
}

/**
 * Writes a simple reply header into `buf` at 0: magic, error, cookie. The caller allocates
 * `buf` with room for READ data after the header so the reply goes out in one write.
 */
export function writeSimpleReplyHeader(buf: Uint8Array, error: number, cookie_hi: number, cookie_lo: number): void {
  putBe32(buf, 0, SIMPLE_REPLY_MAGIC);
  putBe32(buf, 4, error);
  putBe32(buf, 8, cookie_hi);
  putBe32(buf, 12, cookie_lo);
}

/** Per-reply header writes go byte by byte: a DataView per reply was a visible cost at high IOPS. */
function putBe32(b: Uint8Array, at: number, v: number): void {
  b[at] = v >>> 24;
  b[at + 1] = v >>> 16;
  b[at + 2] = v >>> 8;
  b[at + 3] = v;
}

export function encodeSimpleReply(error: number, cookie_hi: number, cookie_lo: number): Uint8Array {
  const buf = new Uint8Array(SIMPLE_REPLY_BYTES);
  writeSimpleReplyHeader(buf, error, cookie_hi, cookie_lo);
  return buf;
}

/** Writes a structured chunk header at 0 of `buf`; `payload_bytes` follows it. */
export function writeChunkHeader(
  buf: Uint8Array,
  flags: number,
  type: number,
  cookie_hi: number,
  cookie_lo: number,
  payload_bytes: number,
): void {
  putBe32(buf, 0, STRUCTURED_REPLY_MAGIC);
  buf[4] = flags >>> 8;
  buf[5] = flags;
  buf[6] = type >>> 8;
  buf[7] = type;
  putBe32(buf, 8, cookie_hi);
  putBe32(buf, 12, cookie_lo);
  putBe32(buf, 16, payload_bytes);
}

/** Bytes before the data in a one-chunk OFFSET_DATA reply: chunk header + u64 offset. */
export const OFFSET_DATA_PREFIX_BYTES = CHUNK_HEADER_BYTES + 8;

/** Fills the prefix of an OFFSET_DATA chunk whose `data_bytes` of data follow at OFFSET_DATA_PREFIX_BYTES. */
export function writeOffsetDataPrefix(
  buf: Uint8Array,
  flags: number,
  cookie_hi: number,
  cookie_lo: number,
  offset: number,
  data_bytes: number,
): void {
  writeChunkHeader(buf, flags, REPLY_TYPE_OFFSET_DATA, cookie_hi, cookie_lo, 8 + data_bytes);
  setU64(dataViewOf(buf), CHUNK_HEADER_BYTES, offset);
}

export function encodeNoneChunk(cookie_hi: number, cookie_lo: number): Uint8Array {
  const buf = new Uint8Array(CHUNK_HEADER_BYTES);
  writeChunkHeader(buf, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie_hi, cookie_lo, 0);
  return buf;
}

/** An ERROR chunk with DONE: u32 error, u16 message length, message. */
export function encodeErrorChunk(cookie_hi: number, cookie_lo: number, error: number, message: Uint8Array): Uint8Array {
  const payload_bytes = 6 + message.length;
  const buf = new Uint8Array(CHUNK_HEADER_BYTES + payload_bytes);
  writeChunkHeader(buf, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie_hi, cookie_lo, payload_bytes);
  const v = dataViewOf(buf);
  v.setUint32(CHUNK_HEADER_BYTES, error, false);
  v.setUint16(CHUNK_HEADER_BYTES + 4, message.length, false);
  buf.set(message, CHUNK_HEADER_BYTES + 6);
  return buf;
}

/** A BLOCK_STATUS chunk with DONE: u32 context id, then {u32 length, u32 flags} per extent. */
export function encodeBlockStatusChunk(
  cookie_hi: number,
  cookie_lo: number,
  context_id: number,
  extents: ReadonlyArray<{ length: number; flags: number }>,
): Uint8Array {
  const payload_bytes = 4 + 8 * extents.length;
  const buf = new Uint8Array(CHUNK_HEADER_BYTES + payload_bytes);
  writeChunkHeader(buf, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, cookie_hi, cookie_lo, payload_bytes);
  const v = dataViewOf(buf);
  v.setUint32(CHUNK_HEADER_BYTES, context_id, false);
  let at = CHUNK_HEADER_BYTES + 4;
  for (const e of extents) {
    v.setUint32(at, e.length, false);
    v.setUint32(at + 4, e.flags, false);
    at += 8;
  }
  return buf;
}

/** Human-readable names, for log lines only. */
export function commandName(type: number): string {
  switch (type) {
    case CMD_READ: return "READ";
    case CMD_WRITE: return "WRITE";
    case CMD_DISC: return "DISC";
    case CMD_FLUSH: return "FLUSH";
    case CMD_TRIM: return "TRIM";
    case CMD_CACHE: return "CACHE";
    case CMD_WRITE_ZEROES: return "WRITE_ZEROES";
    case CMD_BLOCK_STATUS: return "BLOCK_STATUS";
    default: return `CMD_${type}`;
  }
}
