/**
 * A small correct pipelined NBD client for the reliability harness (fixed newstyle, GO, simple
 * replies, READ/WRITE/FLUSH/DISC), over test/helpers/byte_stream.ts.
 */
import { ByteStream, type NbdTarget, StreamClosed } from "../helpers/byte_stream.ts";
import * as W from "../../core/nbd/wire.ts";

export { ByteStream, type NbdTarget, StreamClosed };

/** A request the server answered with a non-zero error. */
export class NbdReplyError extends Error {
  override name = "NbdReplyError";
  constructor(
    readonly errno: number,
    what: string,
  ) {
    super(`${what} failed with NBD error ${errno}`);
  }
}

interface Pending {
  what: string;
  /** READ destination (simple replies carry the data after the header). */
  dst: Uint8Array | null;
  resolve: () => void;
  reject: (e: Error) => void;
  timer: ReturnType<typeof setTimeout>;
}

export interface NbdClientOptions {
  export_name?: string;
  /** Per-request deadline. */
  timeout_ms?: number;
}

/** Requests in flight at most (the server's own cap is 64; staying below it keeps us honest). */
export const CLIENT_INFLIGHT_MAX = 48;

/** A correct NBD client with simple replies; requests may be pipelined up to CLIENT_INFLIGHT_MAX. */
export class NbdClient {
  size_bytes = 0;
  transmission_flags = 0;
  private readonly pending = new Map<number, Pending>();
  private next_cookie = 1;
  private failure: Error | null = null;

  private constructor(
    readonly stream: ByteStream,
    private readonly timeout_ms: number,
  ) {}

  static async connect(target: NbdTarget, o: NbdClientOptions = {}): Promise<NbdClient> {
    const c = new NbdClient(await ByteStream.connect(target), o.timeout_ms ?? 30_000);
    try {
      await c.handshake(o.export_name ?? "");
    } catch (e) {
      c.stream.terminate();
      throw e;
    }
    void c.receiveLoop();
    return c;
  }

  get inflight(): number {
    return this.pending.size;
  }

  get is_closed(): boolean {
    return this.stream.is_closed || this.failure !== null;
  }

  private async handshake(name: string): Promise<void> {
    const s = this.stream;
    const t = this.timeout_ms;
    const g = await s.read(W.GREETING_BYTES, t);
    const v = W.dataViewOf(g);
    if (v.getUint32(0) !== W.NBD_MAGIC_HI || v.getUint32(4) !== W.NBD_MAGIC_LO) throw new Error("bad NBD greeting");
    if (v.getUint32(8) !== W.IHAVEOPT_HI || v.getUint32(12) !== W.IHAVEOPT_LO) throw new Error("server is not fixed newstyle");
    const hflags = v.getUint16(16);
    const cflags = W.FLAG_C_FIXED_NEWSTYLE | (hflags & W.FLAG_NO_ZEROES ? W.FLAG_C_NO_ZEROES : 0);
    const name_bytes = W.utf8(name);
    const opt = new Uint8Array(4 + 16 + 6 + name_bytes.length);
    const ov = W.dataViewOf(opt);
    ov.setUint32(0, cflags);
    ov.setUint32(4, W.IHAVEOPT_HI);
    ov.setUint32(8, W.IHAVEOPT_LO);
    ov.setUint32(12, W.OPT_GO);
    ov.setUint32(16, 6 + name_bytes.length);
    ov.setUint32(20, name_bytes.length);
    opt.set(name_bytes, 24);
    ov.setUint16(24 + name_bytes.length, 0);
    s.send(opt);
    // Bounded: GO answers with a handful of INFO replies, then ACK.
    for (let i = 0; i < 64; i++) {
      const h = W.dataViewOf((await s.read(W.OPTION_REPLY_HEADER_BYTES, t)).slice());
      const type = h.getUint32(12);
      const len = h.getUint32(16);
      if (len > 65536) throw new Error(`GO reply of ${len} bytes`);
      const data = (await s.read(len, t)).slice();
      if (type === W.REP_ACK) {
        if (this.size_bytes === 0 && this.transmission_flags === 0) throw new Error("GO acknowledged without INFO_EXPORT");
        return;
      }
      if (type !== W.REP_INFO) throw new Error(`GO refused: reply type 0x${type.toString(16)}`);
      const dv = W.dataViewOf(data);
      if (len >= 12 && dv.getUint16(0) === W.INFO_EXPORT) {
        this.size_bytes = Number(dv.getBigUint64(2));
        this.transmission_flags = dv.getUint16(10);
      }
    }
    throw new Error("GO: too many replies");
  }

  /** Reads simple replies until the stream closes; every pending request ends either way. */
  private async receiveLoop(): Promise<void> {
    const s = this.stream;
    try {
      for (;;) {
        // Idle connections wait as long as they like; a request's own timer bounds its wait.
        while (s.buffered < W.SIMPLE_REPLY_BYTES) {
          if (s.is_closed) throw new StreamClosed("connection closed");
          await s.waitChange(60_000);
        }
        const h = W.dataViewOf((await s.read(W.SIMPLE_REPLY_BYTES, 1000)).slice());
        if (h.getUint32(0) !== W.SIMPLE_REPLY_MAGIC) throw new Error(`bad reply magic 0x${h.getUint32(0).toString(16)}`);
        const error = h.getUint32(4);
        const cookie = h.getUint32(12);
        const p = this.pending.get(cookie);
        if (!p || h.getUint32(8) !== 0) throw new Error(`reply for unknown cookie ${cookie}`);
        if (error === 0 && p.dst) await s.readInto(p.dst, this.timeout_ms);
        this.pending.delete(cookie);
        clearTimeout(p.timer);
        if (error === 0) p.resolve();
        else p.reject(new NbdReplyError(error, p.what));
      }
    } catch (e) {
      this.fail(e instanceof Error ? e : new Error(String(e)));
    }
  }

  private fail(e: Error): void {
    if (this.failure === null) this.failure = e;
    for (const p of this.pending.values()) {
      clearTimeout(p.timer);
      p.reject(this.failure);
    }
    this.pending.clear();
    this.stream.terminate();
  }

  private request(type: number, flags: number, off: number, len: number, payload: Uint8Array | null, dst: Uint8Array | null): Promise<void> {
    if (this.failure) return Promise.reject(this.failure);
    if (this.stream.is_closed) return Promise.reject(new StreamClosed("connection closed"));
    if (this.pending.size >= CLIENT_INFLIGHT_MAX) return Promise.reject(new Error("too many requests in flight"));
    const cookie = this.next_cookie;
    this.next_cookie = (this.next_cookie % 0x7fffffff) + 1;
    const what = `${W.commandName(type)} off=${off} len=${len}`;
    const hdr = new Uint8Array(W.REQUEST_HEADER_BYTES + (payload ? payload.length : 0));
    const v = W.dataViewOf(hdr);
    v.setUint32(0, W.REQUEST_MAGIC);
    v.setUint16(4, flags);
    v.setUint16(6, type);
    v.setUint32(12, cookie);
    W.setU64(v, 16, off);
    v.setUint32(24, len);
    if (payload) hdr.set(payload, W.REQUEST_HEADER_BYTES);
    return new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => this.fail(new Error(`${what}: no reply within ${this.timeout_ms} ms`)), this.timeout_ms);
      this.pending.set(cookie, { what, dst, resolve, reject, timer });
      // One write per request: header and payload never interleave with another request.
      this.stream.send(hdr);
    });
  }

  async read(off: number, len: number, dst = new Uint8Array(len)): Promise<Uint8Array> {
    await this.request(W.CMD_READ, 0, off, len, null, dst.subarray(0, len));
    return dst;
  }

  write(off: number, data: Uint8Array, fua = false): Promise<void> {
    return this.request(W.CMD_WRITE, fua ? W.CMD_FLAG_FUA : 0, off, data.length, data, null);
  }

  writeZeroes(off: number, len: number, fua = false): Promise<void> {
    return this.request(W.CMD_WRITE_ZEROES, fua ? W.CMD_FLAG_FUA : 0, off, len, null, null);
  }

  flush(): Promise<void> {
    return this.request(W.CMD_FLUSH, 0, 0, 0, null, null);
  }

  /** Soft disconnect: DISC, then wait for the server to close. */
  async disconnect(timeout_ms = 5000): Promise<void> {
    if (this.is_closed) return;
    const hdr = new Uint8Array(W.REQUEST_HEADER_BYTES);
    const v = W.dataViewOf(hdr);
    v.setUint32(0, W.REQUEST_MAGIC);
    v.setUint16(6, W.CMD_DISC);
    this.stream.send(hdr);
    if (!(await this.stream.waitClosed(timeout_ms))) this.stream.terminate();
  }

  /** Hard close. */
  close(): void {
    this.fail(new StreamClosed("closed by the client"));
  }
}
