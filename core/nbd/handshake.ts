/**
 * Fixed-newstyle handshake: the greeting, client flags and option haggling up to the
 * transmission phase. Pure decisions over complete messages: the connection hands in one whole
 * option (header already checked, data fully received) and sends back what this returns. No
 * socket, no timer and no export I/O happens here.
 *
 * Decisions (see nbd-interop.md §0, §1.3, §4):
 *  - handshake flags FIXED_NEWSTYLE | NO_ZEROES; unknown client flag bits => drop;
 *  - a client without C_FIXED_NEWSTYLE may only send EXPORT_NAME (it cannot parse replies);
 *  - the configured export name and "" (the default export) both select the one export;
 *  - names and queries over 4096 bytes => ERR_INVALID (EXPORT_NAME: disconnect);
 *  - STARTTLS, EXTENDED_HEADERS, PEEK_EXPORT and unknown options => ERR_UNSUP;
 *  - LIST/SET_META_CONTEXT need structured replies first (else ERR_INVALID); SET replaces
 *    the selection even when it fails;
 *  - INFO/GO always send INFO_EXPORT and INFO_BLOCK_SIZE, NAME and DESCRIPTION on request,
 *    so INFO then GO with the same parameters give the same answers.
 */
import type { NbdExport } from "./export.ts";
import * as W from "./wire.ts";

export interface ExportConfig {
  /** Canonical name; "" (the default export) always matches too. */
  name: string;
  /** Human-readable description for LIST and INFO_DESCRIPTION; "" = none. */
  description: string;
  export: NbdExport;
  /** Preferred block size advertised in INFO_BLOCK_SIZE (power of two, >= 512). */
  block_size_preferred: number;
}

export interface HandshakeLimits {
  /** Option data longer than this => hard disconnect before anything is allocated. */
  option_bytes_max: number;
  /** More options than this on one connection => hard disconnect. */
  options_max: number;
}

export type OptionResult =
  | { action: "reply"; bytes: Uint8Array }
  /** Send `bytes`, then enter the transmission phase. */
  | { action: "transmission"; bytes: Uint8Array }
  /** Send `bytes`, then close (ABORT). */
  | { action: "close"; bytes: Uint8Array }
  /** Hard disconnect, nothing sent. */
  | { action: "drop"; reason: string };

/** Context id used for base:allocation (SET); LIST replies use 0 as the spec asks. */
export const BASE_ALLOCATION_CONTEXT_ID = 0;

const MSG_UNSUP = W.utf8("option not supported");
const MSG_TLS_UNSUP = W.utf8("TLS is not supported by this server");
const MSG_EXT_HDR_UNSUP = W.utf8("extended headers are not supported");
const MSG_BAD_LENGTH = W.utf8("malformed option data");
const MSG_NO_DATA = W.utf8("option takes no data");
const MSG_NAME_TOO_LONG = W.utf8("export name too long");
const MSG_UNKNOWN_EXPORT = W.utf8("unknown export name");
const MSG_NEED_SR = W.utf8("structured replies must be negotiated first");
const MSG_QUERY_TOO_LONG = W.utf8("meta context query too long");
const MSG_SHUTDOWN = W.utf8("server is shutting down");

const text_decoder = new TextDecoder("utf-8", { fatal: true });
const QUERY_BASE_ALLOCATION = W.utf8(W.META_CONTEXT_BASE_ALLOCATION);
const QUERY_BASE_WILDCARD = W.utf8("base:");

export class Handshake {
  fixed_newstyle = false;
  no_zeroes = false;
  structured_replies = false;
  /** Selected base:allocation context id, or null when none is selected. */
  meta_context_id: number | null = null;
  options_seen = 0;
  private readonly name_bytes: Uint8Array;
  private readonly description_bytes: Uint8Array;

  constructor(
    private readonly config: ExportConfig,
    private readonly limits: HandshakeLimits,
  ) {
    this.name_bytes = W.utf8(config.name);
    this.description_bytes = W.utf8(config.description);
  }

  greeting(): Uint8Array {
    return W.encodeGreeting(W.FLAG_FIXED_NEWSTYLE | W.FLAG_NO_ZEROES);
  }

  /** Returns a drop reason, or null when the flags are acceptable. */
  clientFlags(flags: number): string | null {
    if ((flags & ~(W.FLAG_C_FIXED_NEWSTYLE | W.FLAG_C_NO_ZEROES)) !== 0) {
      return `unknown client flags 0x${(flags >>> 0).toString(16)}`;
    }
    this.fixed_newstyle = (flags & W.FLAG_C_FIXED_NEWSTYLE) !== 0;
    this.no_zeroes = (flags & W.FLAG_C_NO_ZEROES) !== 0;
    return null;
  }

  /** Checks an option header before its data is read. Returns a drop reason or null. */
  optionHeader(hdr: W.OptionHeader): string | null {
    if (!hdr.magic_ok) return "bad option magic";
    this.options_seen++;
    if (this.options_seen > this.limits.options_max) return `more than ${this.limits.options_max} options`;
    if (hdr.length > this.limits.option_bytes_max) return `option length ${hdr.length} over limit`;
    if (!this.fixed_newstyle && hdr.option !== W.OPT_EXPORT_NAME) return "non-fixed-newstyle client sent an option";
    return null;
  }

  /** Transmission flags for this connection (DF depends on structured replies). */
  transmissionFlags(): number {
    let f =
      W.TF_HAS_FLAGS |
      W.TF_SEND_FLUSH |
      W.TF_SEND_FUA |
      W.TF_SEND_TRIM |
      W.TF_SEND_WRITE_ZEROES |
      W.TF_SEND_FAST_ZERO |
      W.TF_SEND_CACHE |
      W.TF_CAN_MULTI_CONN;
    if (this.structured_replies) f |= W.TF_SEND_DF;
    if (this.config.export.read_only) f |= W.TF_READ_ONLY;
    return f;
  }

  /** Handles one complete option. */
  option(option: number, data: Uint8Array, shutting_down: boolean): OptionResult {
    if (shutting_down) {
      if (option === W.OPT_ABORT) return { action: "close", bytes: W.encodeOptionReply(option, W.REP_ACK) };
      if (option === W.OPT_EXPORT_NAME) return { action: "drop", reason: "EXPORT_NAME while shutting down" };
      return reply(W.encodeOptionReply(option, W.REP_ERR_SHUTDOWN, MSG_SHUTDOWN));
    }
    switch (option) {
      case W.OPT_EXPORT_NAME:
        return this.exportName(data);
      case W.OPT_ABORT:
        // The spec asks servers to ignore any data sent with ABORT.
        return { action: "close", bytes: W.encodeOptionReply(option, W.REP_ACK) };
      case W.OPT_LIST:
        return this.list(data);
      case W.OPT_STARTTLS:
        return reply(W.encodeOptionReply(option, W.REP_ERR_UNSUP, MSG_TLS_UNSUP));
      case W.OPT_INFO:
      case W.OPT_GO:
        return this.infoOrGo(option, data);
      case W.OPT_STRUCTURED_REPLY:
        if (data.length !== 0) return reply(W.encodeOptionReply(option, W.REP_ERR_INVALID, MSG_NO_DATA));
        this.structured_replies = true;
        return reply(W.encodeOptionReply(option, W.REP_ACK));
      case W.OPT_LIST_META_CONTEXT:
      case W.OPT_SET_META_CONTEXT:
        return this.metaContext(option, data);
      case W.OPT_EXTENDED_HEADERS:
        return reply(W.encodeOptionReply(option, W.REP_ERR_UNSUP, MSG_EXT_HDR_UNSUP));
      default:
        return reply(W.encodeOptionReply(option, W.REP_ERR_UNSUP, MSG_UNSUP));
    }
  }

  private matchesExport(name: Uint8Array): boolean {
    return name.length === 0 || bytesEqual(name, this.name_bytes);
  }

  private exportName(name: Uint8Array): OptionResult {
    // EXPORT_NAME cannot carry an error: anything we refuse ends the session.
    if (name.length > W.STRING_BYTES_MAX) return { action: "drop", reason: "EXPORT_NAME name too long" };
    if (!this.matchesExport(name)) return { action: "drop", reason: "EXPORT_NAME for an unknown export" };
    const size = this.config.export.size_bytes;
    return {
      action: "transmission",
      bytes: W.encodeExportNameReply(size, this.transmissionFlags(), !this.no_zeroes),
    };
  }

  private list(data: Uint8Array): OptionResult {
    if (data.length !== 0) return reply(W.encodeOptionReply(W.OPT_LIST, W.REP_ERR_INVALID, MSG_NO_DATA));
    const server = W.encodeOptionReply(
      W.OPT_LIST,
      W.REP_SERVER,
      W.encodeRepServerData(this.name_bytes, this.description_bytes),
    );
    return reply(concat([server, W.encodeOptionReply(W.OPT_LIST, W.REP_ACK)]));
  }

  private infoOrGo(option: number, data: Uint8Array): OptionResult {
    const invalid = (msg: Uint8Array): OptionResult => reply(W.encodeOptionReply(option, W.REP_ERR_INVALID, msg));
    if (data.length < 6) return invalid(MSG_BAD_LENGTH);
    const v = W.dataViewOf(data);
    const name_bytes = v.getUint32(0, false);
    // namelen <= optlen - 6, written so that a huge u32 cannot overflow anything.
    if (name_bytes > data.length - 6) return invalid(MSG_BAD_LENGTH);
    if (name_bytes > W.STRING_BYTES_MAX) return invalid(MSG_NAME_TOO_LONG);
    const name = data.subarray(4, 4 + name_bytes);
    const n_requests = v.getUint16(4 + name_bytes, false);
    if (6 + name_bytes + 2 * n_requests !== data.length) return invalid(MSG_BAD_LENGTH);
    if (!this.matchesExport(name)) return reply(W.encodeOptionReply(option, W.REP_ERR_UNKNOWN, MSG_UNKNOWN_EXPORT));

    let want_name = false;
    let want_description = false;
    for (let i = 0; i < n_requests; i++) {
      const t = v.getUint16(6 + name_bytes + 2 * i, false);
      if (t === W.INFO_NAME) want_name = true;
      else if (t === W.INFO_DESCRIPTION) want_description = true;
      // INFO_EXPORT and INFO_BLOCK_SIZE are always sent; unknown types are ignored.
    }
    const parts: Uint8Array[] = [];
    const info = (payload: Uint8Array) => parts.push(W.encodeOptionReply(option, W.REP_INFO, payload));
    info(W.encodeInfoExport(this.config.export.size_bytes, this.transmissionFlags()));
    if (want_name) info(W.encodeInfoString(W.INFO_NAME, this.name_bytes));
    if (want_description && this.description_bytes.length > 0) {
      info(W.encodeInfoString(W.INFO_DESCRIPTION, this.description_bytes));
    }
    info(W.encodeInfoBlockSize(W.BLOCK_SIZE_MIN, this.config.block_size_preferred, W.PAYLOAD_BYTES_MAX));
    parts.push(W.encodeOptionReply(option, W.REP_ACK));
    const bytes = concat(parts);
    return option === W.OPT_GO ? { action: "transmission", bytes } : reply(bytes);
  }

  private metaContext(option: number, data: Uint8Array): OptionResult {
    const is_set = option === W.OPT_SET_META_CONTEXT;
    // SET replaces the previous selection even when it fails.
    if (is_set) this.meta_context_id = null;
    const invalid = (msg: Uint8Array): OptionResult => reply(W.encodeOptionReply(option, W.REP_ERR_INVALID, msg));
    if (!this.structured_replies) return invalid(MSG_NEED_SR);

    const v = W.dataViewOf(data);
    if (data.length < 8) return invalid(MSG_BAD_LENGTH);
    const name_bytes = v.getUint32(0, false);
    if (name_bytes > data.length - 8) return invalid(MSG_BAD_LENGTH);
    if (name_bytes > W.STRING_BYTES_MAX) return invalid(MSG_NAME_TOO_LONG);
    const name = data.subarray(4, 4 + name_bytes);
    const n_queries = v.getUint32(4 + name_bytes, false);
    let at = 8 + name_bytes;
    let base_allocation = false;
    // Each query needs at least its 4-byte length, so n_queries is bounded by the option length.
    if (n_queries > (data.length - at) / 4) return invalid(MSG_BAD_LENGTH);
    for (let i = 0; i < n_queries; i++) {
      if (data.length - at < 4) return invalid(MSG_BAD_LENGTH);
      const q_bytes = v.getUint32(at, false);
      at += 4;
      if (q_bytes > data.length - at) return invalid(MSG_BAD_LENGTH);
      if (q_bytes > W.STRING_BYTES_MAX) return invalid(MSG_QUERY_TOO_LONG);
      const q = data.subarray(at, at + q_bytes);
      at += q_bytes;
      if (!validUtf8(q)) return invalid(MSG_BAD_LENGTH);
      if (bytesEqual(q, QUERY_BASE_ALLOCATION)) base_allocation = true;
      // "base:" is a LIST-only wildcard; SET ignores queries that select no single context.
      else if (!is_set && bytesEqual(q, QUERY_BASE_WILDCARD)) base_allocation = true;
      // Unknown namespaces and unknown base: leaves are ignored.
    }
    if (at !== data.length) return invalid(MSG_BAD_LENGTH);
    if (!this.matchesExport(name)) return reply(W.encodeOptionReply(option, W.REP_ERR_UNKNOWN, MSG_UNKNOWN_EXPORT));
    // LIST with no queries lists everything we have.
    if (!is_set && n_queries === 0) base_allocation = true;

    const parts: Uint8Array[] = [];
    if (base_allocation) {
      const id = BASE_ALLOCATION_CONTEXT_ID;
      parts.push(W.encodeOptionReply(option, W.REP_META_CONTEXT, W.encodeMetaContextData(id, QUERY_BASE_ALLOCATION)));
      if (is_set) this.meta_context_id = id;
    }
    parts.push(W.encodeOptionReply(option, W.REP_ACK));
    return reply(concat(parts));
  }
}

function reply(bytes: Uint8Array): OptionResult {
  return { action: "reply", bytes };
}

export function concat(parts: Uint8Array[]): Uint8Array {
  if (parts.length === 1) return parts[0]!;
  let n = 0;
  for (const p of parts) n += p.length;
  const out = new Uint8Array(n);
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

function bytesEqual(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

function validUtf8(b: Uint8Array): boolean {
  try {
    text_decoder.decode(b);
    return true;
  } catch {
    return false;
  }
}
