/**
 * A raw-socket NBD client for tests: sends exact bytes and reads exact bytes back, with
 * timeouts everywhere so no test can hang. Also byte builders for options and requests and a
 * few handshake shortcuts.
 */
import { MemoryExport, type MemoryExportOptions } from "../../core/nbd/memory_export.ts";
import { silentLogger, type NbdLogger } from "../../core/nbd/logger.ts";
import { NbdServer, type NbdServerOptions } from "../../core/nbd/server.ts";
import * as W from "../../core/nbd/wire.ts";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { ByteStream, type NbdTarget } from "./byte_stream.ts";

export type Target = NbdTarget;

/** Exact bytes out and in, with the defaults the protocol tests use, over a ByteStream. */
export class RawClient {
  private constructor(private readonly s: ByteStream) {}

  static async connect(target: Target): Promise<RawClient> {
    return new RawClient(await ByteStream.connect(target));
  }

  get is_closed(): boolean {
    return this.s.is_closed;
  }

  send(bytes: Uint8Array | ArrayLike<number>): void {
    this.s.send(bytes instanceof Uint8Array ? bytes : Uint8Array.from(bytes as ArrayLike<number>));
  }

  /** Bytes received and not yet read. */
  get buffered(): number {
    return this.s.buffered;
  }

  /** Resolves when everything queued by send() has been handed to the kernel. */
  async sent(timeout_ms = 5000): Promise<void> {
    if (await this.s.sent(timeout_ms)) return;
    throw new Error(this.s.is_closed ? "closed before all bytes were sent" : "timed out sending");
  }

  /** Exactly n bytes; throws on timeout or if the connection closes first. */
  read(n: number, timeout_ms = 3000): Promise<Uint8Array> {
    return this.s.read(n, timeout_ms);
  }

  /** True if the server closed the connection within the timeout. */
  waitClosed(timeout_ms = 3000): Promise<boolean> {
    return this.s.waitClosed(timeout_ms);
  }

  /** Nothing more arrives within `ms` and the connection stays open. */
  async expectQuiet(ms = 100): Promise<boolean> {
    const before = this.s.buffered;
    await Bun.sleep(ms);
    return this.s.buffered === before && !this.s.is_closed;
  }

  /** Stop reading from the socket: replies back up in the kernel and then in the server. */
  pause(): void {
    this.s.pause();
  }

  resume(): void {
    this.s.resume();
  }

  close(): void {
    this.s.end();
  }

  /** Drops the connection at once (RST), as a crashing client would. */
  kill(): void {
    this.s.terminate();
  }
}

// -------------------------------------------------------------------------------------------
// Byte builders.

export function be32(n: number): number[] {
  return [(n >>> 24) & 255, (n >>> 16) & 255, (n >>> 8) & 255, n & 255];
}
export function be16(n: number): number[] {
  return [(n >>> 8) & 255, n & 255];
}
export function be64(n: number | bigint): number[] {
  const b = BigInt(n);
  return [...be32(Number((b >> 32n) & 0xffffffffn)), ...be32(Number(b & 0xffffffffn))];
}
export function str(s: string): number[] {
  return [...new TextEncoder().encode(s)];
}
export function bytes(...parts: Array<number[] | Uint8Array>): Uint8Array {
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
export function u32(b: Uint8Array, at: number): number {
  return new DataView(b.buffer, b.byteOffset, b.byteLength).getUint32(at, false);
}
export function u16(b: Uint8Array, at: number): number {
  return new DataView(b.buffer, b.byteOffset, b.byteLength).getUint16(at, false);
}
export function u64(b: Uint8Array, at: number): bigint {
  return new DataView(b.buffer, b.byteOffset, b.byteLength).getBigUint64(at, false);
}

export const IHAVEOPT = [0x49, 0x48, 0x41, 0x56, 0x45, 0x4f, 0x50, 0x54];
export const GREETING = bytes(str("NBDMAGIC"), IHAVEOPT, be16(W.FLAG_FIXED_NEWSTYLE | W.FLAG_NO_ZEROES));

export function option(opt: number, data: number[] | Uint8Array = [], length?: number): Uint8Array {
  return bytes(IHAVEOPT, be32(opt), be32(length ?? data.length), data);
}

/** Expected option reply bytes. */
export function optReply(opt: number, type: number, data: number[] | Uint8Array = []): Uint8Array {
  return bytes(be64(0x0003e889045565a9n), be32(opt), be32(type), be32(data.length), data);
}

export function goData(name: string, infos: number[] = []): number[] {
  const n = str(name);
  return [...be32(n.length), ...n, ...be16(infos.length), ...infos.flatMap(be16)];
}

export function metaData(name: string, queries: string[]): number[] {
  const n = str(name);
  return [...be32(n.length), ...n, ...be32(queries.length), ...queries.flatMap((q) => [...be32(str(q).length), ...str(q)])];
}

export function request(
  type: number,
  flags: number,
  cookie: number | bigint,
  offset: number | bigint,
  length: number,
  payload?: Uint8Array,
  magic = W.REQUEST_MAGIC,
): Uint8Array {
  const hdr = bytes(be32(magic), be16(flags), be16(type), be64(cookie), be64(offset), be32(length));
  return payload ? bytes(hdr, payload) : hdr;
}

export function simpleReply(error: number, cookie: number | bigint): Uint8Array {
  return bytes(be32(W.SIMPLE_REPLY_MAGIC), be32(error), be64(cookie));
}

/** Reads one option reply: returns header fields and data. */
export async function readOptReply(c: RawClient): Promise<{ magic: bigint; option: number; type: number; data: Uint8Array }> {
  const h = await c.read(20);
  const len = u32(h, 16);
  const data = await c.read(len);
  return { magic: u64(h, 0), option: u32(h, 8), type: u32(h, 12), data };
}

/** Reads one structured chunk. */
export async function readChunk(
  c: RawClient,
): Promise<{ magic: number; flags: number; type: number; cookie: bigint; payload: Uint8Array }> {
  const h = await c.read(20);
  const payload = await c.read(u32(h, 16));
  return { magic: u32(h, 0), flags: u16(h, 4), type: u16(h, 6), cookie: u64(h, 8), payload };
}

/** Reads one simple reply header (no data). */
export async function readSimple(c: RawClient): Promise<{ magic: number; error: number; cookie: bigint }> {
  const h = await c.read(16);
  return { magic: u32(h, 0), error: u32(h, 4), cookie: u64(h, 8) };
}

/** Greeting + client flags. */
export async function startHandshake(c: RawClient, client_flags = W.FLAG_C_FIXED_NEWSTYLE | W.FLAG_C_NO_ZEROES): Promise<void> {
  const g = await c.read(18);
  if (!Buffer.from(g).equals(Buffer.from(GREETING))) throw new Error("unexpected greeting");
  c.send(be32(client_flags));
}

/**
 * Full handshake to transmission with GO. Returns export size and transmission flags.
 * Options: structured replies, base:allocation selected.
 */
export async function handshakeGo(
  c: RawClient,
  o: { sr?: boolean; meta?: boolean; name?: string } = {},
): Promise<{ size: bigint; flags: number }> {
  await startHandshake(c);
  if (o.sr) {
    c.send(option(W.OPT_STRUCTURED_REPLY));
    const r = await readOptReply(c);
    if (r.type !== W.REP_ACK) throw new Error("SR refused");
  }
  if (o.meta) {
    c.send(option(W.OPT_SET_META_CONTEXT, metaData(o.name ?? "", ["base:allocation"])));
    for (;;) {
      const r = await readOptReply(c);
      if (r.type === W.REP_ACK) break;
      if (r.type !== W.REP_META_CONTEXT) throw new Error(`meta context refused: 0x${r.type.toString(16)}`);
    }
  }
  c.send(option(W.OPT_GO, goData(o.name ?? "")));
  let size = -1n;
  let flags = -1;
  for (;;) {
    const r = await readOptReply(c);
    if (r.type === W.REP_ACK) break;
    if (r.type !== W.REP_INFO) throw new Error(`GO failed: 0x${r.type.toString(16)}`);
    if (u16(r.data, 0) === W.INFO_EXPORT) {
      size = u64(r.data, 2);
      flags = u16(r.data, 10);
    }
  }
  return { size, flags };
}

// -------------------------------------------------------------------------------------------
// An in-process server on a fresh unix socket (and optionally TCP).

export interface TestServer {
  server: NbdServer;
  exp: MemoryExport;
  sock_path: string;
  dir: string;
  target: Target;
  logs: string[];
  stop(): Promise<void>;
}

export async function startTestServer(
  o: {
    memory?: Partial<MemoryExportOptions>;
    server?: Partial<NbdServerOptions>;
    tcp?: boolean;
  } = {},
): Promise<TestServer> {
  const exp = new MemoryExport({ size_bytes: 64 * 1024 * 1024, ...o.memory });
  const logs: string[] = [];
  const log: NbdLogger = (level, msg) => logs.push(`${level}: ${msg}`);
  const server = new NbdServer({ export: exp, export_name: "pc", description: "pcache test", log, ...o.server });
  const dir = mkdtempSync(join(tmpdir(), "nbd-test-"));
  const sock_path = join(dir, "nbd.sock");
  let target: Target;
  if (o.tcp) {
    const info = await server.listen({ kind: "tcp", host: "127.0.0.1", port: 0 });
    target = { hostname: "127.0.0.1", port: info.kind === "tcp" ? info.port : 0 };
  } else {
    await server.listen({ kind: "unix", path: sock_path });
    target = { unix: sock_path };
  }
  return {
    server,
    exp,
    sock_path,
    dir,
    target,
    logs,
    async stop() {
      await server.stop({ timeout_ms: 2000 });
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

export { silentLogger };
