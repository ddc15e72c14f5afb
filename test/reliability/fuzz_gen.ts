/**
 * Seeded generator of NBD client transcripts for the fuzzer. Each transcript is one connection:
 * client flags, options (valid, mutated, out of order, oversized, after GO) and transmission
 * requests (valid, with corrupted fields, overflowing ranges, huge lengths, short payloads),
 * each frame tagged with what the server must do with it (nbd-interop.md §1, §4 and the
 * decisions in core/nbd/handshake.ts and transmission.ts):
 *   options:  ack | err | ack_or_err | go | export_name | abort | fatal (server drops, no reply)
 *   requests: ok | err | any | fatal | disc
 * Writes, trims and zeroes that can succeed stay below `fuzz_end`; the rest of the export (the
 * canary and the reserved region) is only ever named by requests that must fail.
 */
import { makeRng } from "../../core/persist/sim.ts";
import * as W from "../../core/nbd/wire.ts";

const KiB = 1024;
const MiB = 1024 * KiB;
const PAYLOAD_POOL_BYTES = MiB;
/** The server's option count limit (core/nbd/connection.ts DEFAULT_CONNECTION_LIMITS). */
const SERVER_OPTIONS_MAX = 32;
/** The server's option length limit; longer options are dropped before any data is read. */
const SERVER_OPTION_BYTES_MAX = 64 * KiB;
/** WRITE payloads above this end the connection (transmission.ts WRITE_SKIP_BYTES_MAX). */
const SERVER_WRITE_SKIP_BYTES_MAX = 128 * MiB;

export type OptExpect = "ack" | "err" | "ack_or_err" | "go" | "export_name" | "abort" | "fatal";
export type ReqExpect = "ok" | "err" | "any" | "fatal" | "disc";

export type Frame =
  | { phase: "flags"; bytes: Uint8Array; no: number; note: string; fatal: boolean; no_zeroes: boolean }
  | { phase: "option"; bytes: Uint8Array; no: number; note: string; option: number; expect: OptExpect }
  | {
      phase: "request";
      bytes: Uint8Array;
      no: number;
      note: string;
      cookie_hi: number;
      cookie_lo: number;
      type: number;
      length: number;
      expect: ReqExpect;
    }
  /** Bytes with no single expected answer (garbage, trailing bytes after DISC). */
  | { phase: "raw"; bytes: Uint8Array; no: number; note: string; fatal: boolean };

export interface ConnScript {
  /** Connection number, from 0. */
  index: number;
  kind: "garbage" | "handshake" | "transmission";
  frames: Frame[];
  /** How we leave: after DISC wait for the server's close; end = half-close; rst = reset. */
  ending: "disc" | "end" | "rst";
  /** Stop after this many bytes of the transcript (a truncation), or null. */
  cut_at_bytes: number | null;
  /** Send in small random pieces with pauses, so frames straddle reads. */
  split: boolean;
}

export interface FuzzGeometry {
  size_bytes: number;
  /** Requests that may succeed and modify data stay below this offset. */
  fuzz_end: number;
}

export class FuzzGen {
  private readonly rng: () => number;
  private readonly pool: Uint8Array;
  private frame_no = 0;
  private conn_no = 0;
  // Per-connection state while generating.
  private frames: Frame[] = [];
  private options_sent = 0;
  private sr = false;
  private meta = false;
  private cookie_hi = 0;
  private cookie_lo = 0;
  private no_zeroes = true;
  private fixed = true;
  /** A frame that ends the connection was generated: nothing follows it. */
  private done = false;

  constructor(
    readonly seed: number,
    private readonly geo: FuzzGeometry,
  ) {
    this.rng = makeRng(seed);
    this.pool = new Uint8Array(PAYLOAD_POOL_BYTES);
    for (let i = 0; i < this.pool.length; i++) this.pool[i] = (this.rng() * 256) | 0;
  }

  /** Frames generated so far (the next frame's number). */
  get frames_generated(): number {
    return this.frame_no;
  }

  next(): ConnScript {
    this.frames = [];
    this.options_sent = 0;
    this.sr = false;
    this.meta = false;
    this.cookie_hi = this.u32();
    this.cookie_lo = 1;
    this.no_zeroes = true;
    this.done = false;
    const x = this.rng();
    const kind: ConnScript["kind"] = x < 0.05 ? "garbage" : x < 0.4 ? "handshake" : "transmission";
    let ending: ConnScript["ending"] = "end";
    if (kind === "garbage") this.garbage();
    else ending = this.connection(kind);
    const total = this.frames.reduce((n, f) => n + f.bytes.length, 0);
    const cut_at_bytes = this.chance(0.1) && total > 0 ? this.int(0, total - 1) : null;
    if (cut_at_bytes !== null) ending = this.chance(0.5) ? "end" : "rst";
    return { index: this.conn_no++, kind, frames: this.frames, ending, cut_at_bytes, split: this.chance(0.1) };
  }

  // ---------------------------------------------------------------------------------------
  // Random helpers.

  private int(lo: number, hi: number): number {
    return lo + Math.floor(this.rng() * (hi - lo + 1));
  }
  private chance(p: number): boolean {
    return this.rng() < p;
  }
  private pick<T>(xs: readonly T[]): T {
    return xs[Math.floor(this.rng() * xs.length)]!;
  }
  private u32(): number {
    return Math.floor(this.rng() * 0x1_0000_0000) >>> 0;
  }
  /** A payload view of n bytes (n <= pool size) or fresh random bytes. */
  private payload(n: number): Uint8Array {
    if (n <= this.pool.length) {
      const at = this.int(0, this.pool.length - n);
      return this.pool.subarray(at, at + n);
    }
    return new Uint8Array(n);
  }
  private ascii(n: number): Uint8Array {
    const b = new Uint8Array(n);
    for (let i = 0; i < n; i++) b[i] = this.int(0x61, 0x7a);
    return b;
  }

  private push(f: Frame): void {
    this.frames.push(f);
    this.frame_no++;
  }

  // ---------------------------------------------------------------------------------------
  // Connections.

  private garbage(): void {
    const n = this.int(1, 2048);
    const bytes = this.payload(n).slice();
    if (this.chance(0.5)) {
      // Client flags with unknown bits set: the server MUST drop.
      bytes[0] = 0x80 | bytes[0]!;
      this.push({ phase: "raw", bytes, no: this.frame_no, note: `${n} random bytes as client flags`, fatal: n >= 4 });
      return;
    }
    this.clientFlags(W.FLAG_C_FIXED_NEWSTYLE | W.FLAG_C_NO_ZEROES, false);
    // Anything but IHAVEOPT where an option header starts ends the connection, once the whole
    // 16-byte header is in.
    bytes[0] = bytes[0] === 0x49 ? 0x48 : bytes[0]!;
    this.push({ phase: "raw", bytes, no: this.frame_no, note: `${n} random bytes as options`, fatal: n >= W.OPTION_HEADER_BYTES });
  }

  private connection(kind: "handshake" | "transmission"): ConnScript["ending"] {
    if (!this.flagsFrame()) return "end";
    if (!this.fixed) return this.afterNonFixedFlags();
    const n_opts = kind === "handshake" ? this.int(1, SERVER_OPTIONS_MAX + 3) : this.int(0, 4);
    for (let i = 0; i < n_opts && !this.done; i++) {
      if (this.options_sent === SERVER_OPTIONS_MAX) {
        this.option(this.pick([W.OPT_LIST, W.OPT_INFO, 0x1234]), new Uint8Array(0), "fatal", "option over the per-connection limit");
        return "end";
      }
      if (kind === "handshake") this.anyOption();
      else this.goodOption();
    }
    if (this.done) return "end";
    if (kind === "handshake" && this.chance(0.4)) {
      if (this.chance(0.5)) this.option(W.OPT_ABORT, this.chance(0.3) ? this.payload(this.int(1, 16)) : new Uint8Array(0), "abort", "ABORT");
      return this.chance(0.5) ? "end" : "rst";
    }
    if (this.options_sent === SERVER_OPTIONS_MAX) return "end";
    this.enterTransmission();
    return this.transmission(kind === "handshake" ? this.int(0, 8) : this.requestCount());
  }

  /** Client flags; false when they end the connection. */
  private flagsFrame(): boolean {
    const x = this.rng();
    if (x < 0.04) {
      const bad = (this.u32() | (1 << this.int(2, 31))) >>> 0;
      this.clientFlags(bad, true);
      return false;
    }
    if (x < 0.1) {
      this.fixed = false;
      this.clientFlags(this.chance(0.5) ? W.FLAG_C_NO_ZEROES : 0, false);
      return true;
    }
    this.fixed = true;
    this.clientFlags(W.FLAG_C_FIXED_NEWSTYLE | (this.chance(0.7) ? W.FLAG_C_NO_ZEROES : 0), false);
    return true;
  }

  private clientFlags(flags: number, fatal: boolean): void {
    const b = new Uint8Array(4);
    W.dataViewOf(b).setUint32(0, flags >>> 0);
    this.no_zeroes = (flags & W.FLAG_C_NO_ZEROES) !== 0;
    this.push({ phase: "flags", bytes: b, no: this.frame_no, note: `client flags 0x${(flags >>> 0).toString(16)}`, fatal, no_zeroes: this.no_zeroes });
  }

  /** Without FIXED_NEWSTYLE only EXPORT_NAME is understood; anything else is dropped. */
  private afterNonFixedFlags(): ConnScript["ending"] {
    if (this.chance(0.5)) {
      this.option(this.pick([W.OPT_LIST, W.OPT_GO, W.OPT_STRUCTURED_REPLY]), new Uint8Array(0), "fatal", "option from a non-fixed-newstyle client");
      return "end";
    }
    this.option(W.OPT_EXPORT_NAME, new Uint8Array(0), "export_name", "EXPORT_NAME from a non-fixed-newstyle client");
    return this.transmission(this.requestCount());
  }

  private requestCount(): number {
    const x = this.rng();
    if (x < 0.5) return this.int(1, 20);
    if (x < 0.9) return this.int(20, 150);
    return this.int(150, 400);
  }

  // ---------------------------------------------------------------------------------------
  // Options.

  private option(opt: number, data: Uint8Array, expect: OptExpect, note: string, length = data.length, magic_ok = true): void {
    const b = new Uint8Array(W.OPTION_HEADER_BYTES + data.length);
    const v = W.dataViewOf(b);
    v.setUint32(0, W.IHAVEOPT_HI);
    v.setUint32(4, magic_ok ? W.IHAVEOPT_LO : W.IHAVEOPT_LO ^ (1 << this.int(0, 31)));
    v.setUint32(8, opt >>> 0);
    v.setUint32(12, length >>> 0);
    b.set(data, W.OPTION_HEADER_BYTES);
    this.options_sent++;
    this.push({ phase: "option", bytes: b, no: this.frame_no, note, option: opt >>> 0, expect });
    if (expect === "fatal" || expect === "abort") this.done = true;
  }

  /** Options a normal client sends before GO (valid, in a valid order). */
  private goodOption(): void {
    const x = this.rng();
    if (x < 0.4) {
      // Repeating a state-changing option MAY be refused.
      this.option(W.OPT_STRUCTURED_REPLY, new Uint8Array(0), this.sr ? "ack_or_err" : "ack", "STRUCTURED_REPLY");
      this.sr = true;
      return;
    }
    if (x < 0.7 && this.sr) return this.setMeta(["base:allocation"], "");
    if (x < 0.85) return this.infoOrGo(W.OPT_INFO, "", this.infoRequests(false), "ack", "INFO");
    return this.option(W.OPT_LIST, new Uint8Array(0), "ack", "LIST");
  }

  /** Any option, valid or mutated, in any order. */
  private anyOption(): void {
    const x = this.rng();
    if (x < 0.35) return this.goodOption();
    if (x < 0.5) return this.badInfoOrGo();
    if (x < 0.62) return this.metaOption();
    if (x < 0.72) return this.unknownOption();
    if (x < 0.78) return this.option(W.OPT_LIST, this.payload(this.int(1, 64)), "err", "LIST with data");
    if (x < 0.82) return this.option(W.OPT_STRUCTURED_REPLY, this.payload(this.int(1, 64)), "err", "STRUCTURED_REPLY with data");
    if (x < 0.87) return this.hugeOption();
    if (x < 0.9) return this.option(this.pick([W.OPT_LIST, W.OPT_GO]), new Uint8Array(0), "fatal", "bad option magic", 0, false);
    if (x < 0.94) return this.badExportName();
    return this.infoOrGo(this.pick([W.OPT_INFO, W.OPT_GO]), `nope-${this.int(0, 999)}`, [], "err", "INFO/GO for an unknown export");
  }

  private infoRequests(allow_dupes: boolean): number[] {
    const n = this.int(0, 6);
    const out: number[] = [];
    for (let i = 0; i < n; i++) {
      const t = this.chance(0.8) ? this.int(0, 3) : this.int(4, 0xffff);
      if (allow_dupes || !out.includes(t)) out.push(t);
    }
    return out;
  }

  private infoOrGo(opt: number, name: string | Uint8Array, infos: number[], expect: OptExpect, note: string): void {
    const n = typeof name === "string" ? W.utf8(name) : name;
    const b = new Uint8Array(4 + n.length + 2 + 2 * infos.length);
    const v = W.dataViewOf(b);
    v.setUint32(0, n.length);
    b.set(n, 4);
    v.setUint16(4 + n.length, infos.length);
    infos.forEach((t, i) => v.setUint16(6 + n.length + 2 * i, t));
    this.option(opt, b, expect, note);
  }

  /** INFO or GO with broken lengths or names: ERR_INVALID / ERR_UNKNOWN, and the handshake goes on. */
  private badInfoOrGo(): void {
    const opt = this.pick([W.OPT_INFO, W.OPT_GO]);
    const name = opt === W.OPT_GO ? "GO" : "INFO";
    const x = this.rng();
    if (x < 0.2) {
      const b = this.payload(this.int(0, 5)).slice();
      return this.option(opt, b, "err", `${name} data shorter than 6 bytes`);
    }
    if (x < 0.4) {
      // namelen larger than the option: must not be trusted.
      const b = new Uint8Array(6 + this.int(0, 8));
      W.dataViewOf(b).setUint32(0, this.pick([b.length - 5, 0xffffffff, 0x80000000, this.u32() | 0x10000]) >>> 0);
      return this.option(opt, b, "err", `${name} namelen beyond the option`);
    }
    if (x < 0.55) {
      // Request count that does not match the bytes.
      const b = new Uint8Array(6 + 2 * this.int(0, 3));
      W.dataViewOf(b).setUint16(4, this.int(b.length / 2, 0xffff));
      return this.option(opt, b, "err", `${name} info count beyond the option`);
    }
    if (x < 0.7) {
      const b = new Uint8Array(6 + this.int(1, 7));
      return this.option(opt, b, "err", `${name} with trailing bytes`);
    }
    if (x < 0.85) return this.infoOrGo(opt, this.ascii(this.int(4097, 6000)), [], "err", `${name} name over 4096 bytes`);
    return this.infoOrGo(opt, this.ascii(this.pick([255, 256, 4095, 4096])), this.infoRequests(true), "err", `${name} long unknown name`);
  }

  private metaData(name: Uint8Array, queries: Uint8Array[]): Uint8Array {
    const len = 8 + name.length + queries.reduce((n, q) => n + 4 + q.length, 0);
    const b = new Uint8Array(len);
    const v = W.dataViewOf(b);
    v.setUint32(0, name.length);
    b.set(name, 4);
    v.setUint32(4 + name.length, queries.length);
    let at = 8 + name.length;
    for (const q of queries) {
      v.setUint32(at, q.length);
      b.set(q, at + 4);
      at += 4 + q.length;
    }
    return b;
  }

  private setMeta(queries: string[], name: string): void {
    const ok = this.sr && name === "";
    this.option(W.OPT_SET_META_CONTEXT, this.metaData(W.utf8(name), queries.map(W.utf8)), ok ? "ack" : "err", `SET_META_CONTEXT ${queries.join(",")}`);
    // SET replaces the selection even when it fails.
    this.meta = ok && queries.includes("base:allocation");
  }

  private metaOption(): void {
    const opt = this.pick([W.OPT_LIST_META_CONTEXT, W.OPT_SET_META_CONTEXT]);
    const is_set = opt === W.OPT_SET_META_CONTEXT;
    const label = is_set ? "SET_META_CONTEXT" : "LIST_META_CONTEXT";
    const x = this.rng();
    if (x < 0.5) {
      const pool = ["base:allocation", "base:", "qemu:dirty-bitmap:x", "x-fuzz:thing", "base:nope"];
      const queries = Array.from({ length: this.int(0, 4) }, () => this.pick(pool));
      if (is_set) return this.setMeta(queries, "");
      return this.option(opt, this.metaData(new Uint8Array(0), queries.map(W.utf8)), this.sr ? "ack" : "err", `${label} ${queries.join(",")}`);
    }
    if (is_set) this.meta = false;
    let data: Uint8Array;
    let note: string;
    if (x < 0.65) {
      data = this.metaData(new Uint8Array(0), [W.utf8("base:allocation")]);
      W.dataViewOf(data).setUint32(4, this.pick([2, 1000, 0xffffffff]));
      note = "query count beyond the option";
    } else if (x < 0.8) {
      data = this.metaData(new Uint8Array(0), [W.utf8("base:allocation")]);
      W.dataViewOf(data).setUint32(8, this.pick([16, 1000, 0xffffffff]));
      note = "query length beyond the option";
    } else if (x < 0.9) {
      data = this.metaData(new Uint8Array(0), [this.ascii(this.int(4097, 5000))]);
      note = "query over 4096 bytes";
    } else {
      data = this.metaData(new Uint8Array(0), [new Uint8Array([0x62, 0xff, 0xfe])]);
      note = "query not UTF-8";
    }
    this.option(opt, data, "err", `${label} ${note}`);
  }

  private unknownOption(): void {
    const opt = this.pick([W.OPT_PEEK_EXPORT, W.OPT_STARTTLS, W.OPT_EXTENDED_HEADERS, this.int(12, 0xffff), this.u32() | 0x10000]);
    const data = this.chance(0.5) ? new Uint8Array(0) : this.payload(this.int(1, 256));
    this.option(opt, data, "err", `option ${opt} (unsupported or unknown)`);
  }

  /** A length the server refuses to buffer: dropped before a byte of data is read. */
  private hugeOption(): void {
    const length = this.pick([SERVER_OPTION_BYTES_MAX + 1, 0x7fffffff, 0xffffffff, this.int(SERVER_OPTION_BYTES_MAX + 1, 0xffffffff)]);
    const sent = this.payload(this.int(0, 512));
    this.option(this.pick([W.OPT_GO, W.OPT_LIST, W.OPT_SET_META_CONTEXT, this.u32()]), sent, "fatal", `option length ${length}`, length);
  }

  /** EXPORT_NAME cannot carry an error: an unknown or oversized name ends the session. */
  private badExportName(): void {
    const name = this.chance(0.5) ? W.utf8(`nope-${this.int(0, 99)}`) : this.ascii(this.int(4097, 5000));
    this.option(W.OPT_EXPORT_NAME, name, "fatal", `EXPORT_NAME ${name.length > 64 ? `of ${name.length} bytes` : "unknown"}`);
  }

  private enterTransmission(): void {
    if (this.chance(0.8)) this.infoOrGo(W.OPT_GO, "", this.infoRequests(false), "go", "GO");
    else this.option(W.OPT_EXPORT_NAME, new Uint8Array(0), "export_name", "EXPORT_NAME");
  }

  // ---------------------------------------------------------------------------------------
  // Transmission.

  private request(type: number, flags: number, offset: number | bigint, length: number, expect: ReqExpect, note: string, payload?: Uint8Array, magic = W.REQUEST_MAGIC): void {
    const b = new Uint8Array(W.REQUEST_HEADER_BYTES + (payload ? payload.length : 0));
    const v = W.dataViewOf(b);
    const lo = this.cookie_lo++;
    v.setUint32(0, magic >>> 0);
    v.setUint16(4, flags & 0xffff);
    v.setUint16(6, type & 0xffff);
    v.setUint32(8, this.cookie_hi);
    v.setUint32(12, lo);
    v.setBigUint64(16, BigInt(offset));
    v.setUint32(24, length >>> 0);
    if (payload) b.set(payload, W.REQUEST_HEADER_BYTES);
    this.push({ phase: "request", bytes: b, no: this.frame_no, note, cookie_hi: this.cookie_hi, cookie_lo: lo, type, length: length >>> 0, expect });
  }

  private transmission(n: number): ConnScript["ending"] {
    for (let i = 0; i < n && !this.done; i++) this.anyRequest();
    if (this.done) return "end";
    const x = this.rng();
    if (x < 0.55) {
      this.request(W.CMD_DISC, 0, 0, 0, "disc", "DISC");
      // Bytes after DISC are never parsed.
      if (this.chance(0.2)) this.push({ phase: "raw", bytes: this.payload(this.int(1, 300)), no: this.frame_no, note: "bytes after DISC", fatal: false });
      return "disc";
    }
    if (x < 0.7) this.shortWrite();
    return this.chance(0.7) ? "end" : "rst";
  }

  /** A valid range in the fuzz area: mostly short, sometimes up to len_max, sometimes empty. */
  private range(len_max: number): { off: number; len: number } {
    const cap = Math.min(len_max, this.geo.fuzz_end);
    const len = this.chance(0.1) ? 0 : this.chance(0.95) ? this.int(1, Math.min(cap, 64 * KiB)) : this.int(1, cap);
    return { off: this.offsetFor(len), len };
  }

  /** An offset in the fuzz area where `len` bytes fit; half of them 512-aligned. */
  private offsetFor(len: number): number {
    const room = this.geo.fuzz_end - len;
    return this.chance(0.5) ? Math.floor(this.int(0, room) / 512) * 512 : this.int(0, room);
  }

  private validRequest(): void {
    const x = this.rng();
    const fua = this.chance(0.2) ? W.CMD_FLAG_FUA : 0;
    if (x < 0.3) {
      // Now and then the largest READ a client may send.
      const { off, len } = this.range(this.chance(0.002) ? W.PAYLOAD_BYTES_MAX : MiB);
      const df = this.sr && this.chance(0.3) ? W.CMD_FLAG_DF : 0;
      // READ of length 0 is unspecified by the protocol: any answer, but an answer.
      return this.request(W.CMD_READ, fua | df, off, len, len === 0 ? "any" : "ok", "READ");
    }
    if (x < 0.55) {
      const { off, len } = this.range(this.chance(0.05) ? MiB : 64 * KiB);
      return this.request(W.CMD_WRITE, fua, off, len, "ok", "WRITE", this.payload(len));
    }
    if (x < 0.65) return this.request(W.CMD_FLUSH, fua, 0, 0, "ok", "FLUSH");
    if (x < 0.75) {
      const { off, len } = this.range(4 * MiB);
      return this.request(W.CMD_TRIM, fua, off, len, "ok", "TRIM");
    }
    if (x < 0.85) {
      const { off, len } = this.range(4 * MiB);
      const f = fua | (this.chance(0.3) ? W.CMD_FLAG_NO_HOLE : 0) | (this.chance(0.3) ? W.CMD_FLAG_FAST_ZERO : 0);
      return this.request(W.CMD_WRITE_ZEROES, f, off, len, "ok", "WRITE_ZEROES");
    }
    if (x < 0.92 || !this.meta) {
      const { off, len } = this.range(4 * MiB);
      return this.request(W.CMD_CACHE, fua, off, len, "ok", "CACHE");
    }
    const { off, len } = this.range(64 * MiB);
    const flags = fua | (this.chance(0.5) ? W.CMD_FLAG_REQ_ONE : 0);
    return this.request(W.CMD_BLOCK_STATUS, flags, off, Math.max(1, len), "ok", "BLOCK_STATUS");
  }

  /** Offset and length whose end lies past the export (or overflows 64 bits); len <= len_max. */
  private pastEnd(len_max: number): { off: bigint; len: number } {
    const size = BigInt(this.geo.size_bytes);
    const x = this.rng();
    if (x < 0.3) {
      const len = this.int(1, len_max);
      return { off: size - BigInt(this.int(0, len - 1)), len };
    }
    if (x < 0.5) return { off: size + BigInt(this.int(1, 1 << 20)), len: this.int(0, len_max) };
    if (x < 0.7) return { off: (1n << 64n) - BigInt(this.int(1, 4096)), len: this.int(1, len_max) };
    if (x < 0.85) return { off: 1n << BigInt(this.int(53, 63)), len: this.int(0, len_max) };
    // The whole export and then some, from inside it.
    const len = this.int(1, len_max);
    return { off: BigInt(Math.max(0, this.geo.size_bytes - len + 1)) + BigInt(this.int(0, len - 1)), len };
  }

  private anyRequest(): void {
    const x = this.rng();
    if (x < 0.55) return this.validRequest();
    if (x < 0.62) {
      const type = this.pick([8, 9, 100, 0xffff, this.int(10, 0xfffe)]);
      return this.request(type, 0, this.int(0, this.geo.fuzz_end), this.int(0, 4096), "err", `unknown command ${type}`);
    }
    if (x < 0.7) return this.badFlags();
    if (x < 0.8) {
      const type = this.pick([W.CMD_READ, W.CMD_WRITE, W.CMD_TRIM, W.CMD_WRITE_ZEROES, W.CMD_CACHE]);
      const { off, len } = this.pastEnd(type === W.CMD_WRITE ? 64 * KiB : 8 * MiB);
      const payload = type === W.CMD_WRITE ? this.payload(len) : undefined;
      return this.request(type, 0, off, len, "err", `${W.commandName(type)} past the end (${off}+${len})`, payload);
    }
    if (x < 0.84) return this.request(W.CMD_FLUSH, 0, this.chance(0.5) ? this.int(1, 1 << 20) : 0, this.int(1, 4096), "err", "FLUSH with offset/length");
    if (x < 0.87) {
      if (this.chance(0.5) && this.geo.size_bytes < 0xffffffff) {
        // An effect length of 4 GiB - 1 from inside a smaller export.
        const type = this.pick([W.CMD_TRIM, W.CMD_WRITE_ZEROES, W.CMD_CACHE]);
        return this.request(type, 0, this.int(0, 4096), 0xffffffff, "err", `${W.commandName(type)} of 4 GiB - 1`);
      }
      const len = this.int(W.PAYLOAD_BYTES_MAX + 1, 0xffffffff);
      return this.request(W.CMD_READ, 0, 0, len, "err", `READ of ${len} bytes`);
    }
    if (x < 0.9) {
      if (!this.sr) return this.request(W.CMD_READ, W.CMD_FLAG_DF, 0, 512, "err", "DF without structured replies");
      if (!this.meta) return this.request(W.CMD_BLOCK_STATUS, 0, 0, 4096, "err", "BLOCK_STATUS without a meta context");
      return this.request(W.CMD_BLOCK_STATUS, 0, 0, 0, "err", "BLOCK_STATUS of length 0");
    }
    if (x < 0.92) {
      // A cookie of any value is echoed, whatever it is.
      this.cookie_hi = this.u32();
      return this.validRequest();
    }
    if (x < 0.94) return this.badMagic();
    if (x < 0.95) return this.hugeWrite();
    if (x < 0.96) return this.optionAfterGo();
    return this.validRequest();
  }

  private badFlags(): void {
    const type = this.pick([W.CMD_READ, W.CMD_WRITE, W.CMD_FLUSH, W.CMD_TRIM, W.CMD_WRITE_ZEROES, W.CMD_CACHE]);
    // A flag no command takes, or one that belongs to another command.
    const wrong: Record<number, number[]> = {
      [W.CMD_READ]: [W.CMD_FLAG_NO_HOLE, W.CMD_FLAG_REQ_ONE, W.CMD_FLAG_FAST_ZERO],
      [W.CMD_WRITE]: [W.CMD_FLAG_NO_HOLE, W.CMD_FLAG_DF, W.CMD_FLAG_REQ_ONE],
      [W.CMD_FLUSH]: [W.CMD_FLAG_DF, W.CMD_FLAG_NO_HOLE],
      [W.CMD_TRIM]: [W.CMD_FLAG_DF, W.CMD_FLAG_FAST_ZERO],
      [W.CMD_WRITE_ZEROES]: [W.CMD_FLAG_DF, W.CMD_FLAG_REQ_ONE],
      [W.CMD_CACHE]: [W.CMD_FLAG_NO_HOLE, W.CMD_FLAG_DF],
    };
    const flag = this.chance(0.5) ? this.pick(wrong[type]!) : 1 << this.int(5, 15);
    const { off, len } = type === W.CMD_FLUSH ? { off: 0, len: 0 } : this.range(64 * KiB);
    const payload = type === W.CMD_WRITE ? this.payload(len) : undefined;
    this.request(type, flag, off, len, "err", `${W.commandName(type)} with flag 0x${flag.toString(16)}`, payload);
  }

  /** A request magic that is not one: the stream cannot be trusted, the server hangs up. */
  private badMagic(): void {
    const magic = this.pick([0x12560953, 0x25609514, 0x21e41c71, W.IHAVEOPT_HI, this.u32(), W.REQUEST_MAGIC ^ (1 << this.int(0, 31))]);
    if (magic === W.REQUEST_MAGIC) return this.validRequest();
    this.request(W.CMD_READ, 0, 0, 512, "fatal", `request magic 0x${(magic >>> 0).toString(16)}`, undefined, magic);
    this.done = true;
  }

  /** WRITE lengths the server refuses to skip: it hangs up rather than read gigabytes. */
  private hugeWrite(): void {
    const len = this.pick([0x80000000, 0xffffffff, SERVER_WRITE_SKIP_BYTES_MAX + 1, this.int(SERVER_WRITE_SKIP_BYTES_MAX + 1, 0xffffffff)]);
    this.request(W.CMD_WRITE, 0, 0, len, "fatal", `WRITE of ${len} bytes`, this.payload(this.int(0, 4096)));
    this.done = true;
  }

  /** Option bytes in the transmission phase read as a request with a bad magic. */
  private optionAfterGo(): void {
    const b = new Uint8Array(W.OPTION_HEADER_BYTES + 12);
    const v = W.dataViewOf(b);
    v.setUint32(0, W.IHAVEOPT_HI);
    v.setUint32(4, W.IHAVEOPT_LO);
    v.setUint32(8, this.pick([W.OPT_GO, W.OPT_LIST, W.OPT_STRUCTURED_REPLY]));
    this.push({ phase: "request", bytes: b, no: this.frame_no, note: "option after GO", cookie_hi: 0, cookie_lo: 0, type: -1, length: 0, expect: "fatal" });
    this.done = true;
  }

  /** A WRITE whose payload stops short; the connection then ends (set by the caller). */
  private shortWrite(): void {
    const declared = this.pick([this.int(2, 64 * KiB), this.int(64 * KiB, W.PAYLOAD_BYTES_MAX), W.PAYLOAD_BYTES_MAX]);
    const sent = this.int(0, Math.min(declared - 1, 64 * KiB));
    const b = new Uint8Array(W.REQUEST_HEADER_BYTES + sent);
    const v = W.dataViewOf(b);
    v.setUint32(0, W.REQUEST_MAGIC);
    v.setUint16(6, W.CMD_WRITE);
    v.setUint32(8, this.cookie_hi);
    v.setUint32(12, this.cookie_lo++);
    W.setU64(v, 16, this.offsetFor(declared));
    v.setUint32(24, declared);
    b.set(this.payload(sent), W.REQUEST_HEADER_BYTES);
    this.push({ phase: "raw", bytes: b, no: this.frame_no, note: `WRITE of ${declared} bytes with ${sent} sent`, fatal: false });
  }
}
