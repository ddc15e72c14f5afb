/**
 * Raw-socket tests of the NBD server: every row of the malformed-input table in
 * nbd-interop.md §4, plus the limits and lifecycle rules around it. Each test sends exact
 * bytes and checks the exact reply bytes (or the disconnect).
 */
import { afterEach, describe, expect, test } from "bun:test";
import * as W from "../core/nbd/wire.ts";
import { ERRNO, NbdExportError } from "../core/nbd/export.ts";
import {
  GREETING,
  RawClient,
  be16,
  be32,
  be64,
  bytes,
  goData,
  handshakeGo,
  metaData,
  option,
  optReply,
  readChunk,
  readOptReply,
  readSimple,
  request,
  simpleReply,
  startHandshake,
  startTestServer,
  str,
  u16,
  u32,
  u64,
  type TestServer,
} from "./helpers/nbd_raw.ts";

const hex = (b: Uint8Array) => Buffer.from(b).toString("hex");
const MiB = 1024 * 1024;
const SIZE = 64 * MiB;
/** Where stillWorks() writes its 512 bytes of 0x5a. */
const STILL_OFF = 40 * MiB;

let servers: TestServer[] = [];
let clients: RawClient[] = [];

async function server(o: Parameters<typeof startTestServer>[0] = {}): Promise<TestServer> {
  const s = await startTestServer(o);
  servers.push(s);
  return s;
}

async function client(s: TestServer): Promise<RawClient> {
  const c = await RawClient.connect(s.target);
  clients.push(c);
  return c;
}

afterEach(async () => {
  for (const c of clients) c.kill();
  clients = [];
  for (const s of servers) await s.stop();
  servers = [];
});

/** Expected structured error chunk with DONE. */
function errorChunk(cookie: number, errno: number, msg: string): Uint8Array {
  const m = str(msg);
  return bytes(
    be32(W.STRUCTURED_REPLY_MAGIC),
    be16(W.REPLY_FLAG_DONE),
    be16(W.REPLY_TYPE_ERROR),
    be64(cookie),
    be32(6 + m.length),
    be32(errno),
    be16(m.length),
    m,
  );
}

/** Reads exactly as many bytes as `want` has and compares them (hex, for a readable diff). */
async function expectBytes(c: RawClient, want: Uint8Array): Promise<void> {
  expect(hex(await c.read(want.length))).toBe(hex(want));
}

/** Reads a structured error chunk and returns errno and message. */
async function readErrorChunk(c: RawClient, cookie: number): Promise<{ errno: number; msg: string }> {
  const ch = await readChunk(c);
  expect(ch.magic).toBe(W.STRUCTURED_REPLY_MAGIC);
  expect(ch.type).toBe(W.REPLY_TYPE_ERROR);
  expect(ch.flags).toBe(W.REPLY_FLAG_DONE);
  expect(ch.cookie).toBe(BigInt(cookie));
  const len = u16(ch.payload, 4);
  expect(ch.payload.length).toBe(6 + len);
  return { errno: u32(ch.payload, 0), msg: new TextDecoder().decode(ch.payload.subarray(6)) };
}

/** A connection in transmission with simple replies only. */
async function simpleSession(s: TestServer): Promise<RawClient> {
  const c = await client(s);
  await handshakeGo(c);
  return c;
}

async function srSession(s: TestServer, meta = false): Promise<RawClient> {
  const c = await client(s);
  await handshakeGo(c, { sr: true, meta });
  return c;
}

/** The connection still works: a small write then read round-trips. */
async function stillWorks(c: RawClient, cookie = 0x77): Promise<void> {
  const data = new Uint8Array(512).fill(0x5a);
  c.send(request(W.CMD_WRITE, 0, cookie, STILL_OFF, 512, data));
  await expectBytes(c, simpleReply(0, cookie));
}

// ===========================================================================================
describe("handshake: §4 table", () => {
  test("greeting is NBDMAGIC IHAVEOPT FIXED_NEWSTYLE|NO_ZEROES", async () => {
    const s = await server();
    const c = await client(s);
    await expectBytes(c, GREETING);
  });

  test("unknown option => ERR_UNSUP, and negotiation continues", async () => {
    const s = await server();
    const c = await client(s);
    await startHandshake(c);
    c.send(option(0x1234, [1, 2, 3, 4, 5]));
    await expectBytes(c, optReply(0x1234, W.REP_ERR_UNSUP, str("option not supported")));
    // PEEK_EXPORT (withdrawn) too.
    c.send(option(W.OPT_PEEK_EXPORT));
    expect((await readOptReply(c)).type).toBe(W.REP_ERR_UNSUP);
    c.send(option(W.OPT_LIST));
    const r = await readOptReply(c);
    expect(r.type).toBe(W.REP_SERVER);
    expect((await readOptReply(c)).type).toBe(W.REP_ACK);
  });

  test("LIST with data => ERR_INVALID", async () => {
    const s = await server();
    const c = await client(s);
    await startHandshake(c);
    c.send(option(W.OPT_LIST, [0]));
    await expectBytes(c, optReply(W.OPT_LIST, W.REP_ERR_INVALID, str("option takes no data")));
    expect(await c.expectQuiet(50)).toBe(true);
  });

  test("LIST => one REP_SERVER (name + description) then ACK, exact bytes", async () => {
    const s = await server();
    const c = await client(s);
    await startHandshake(c);
    c.send(option(W.OPT_LIST));
    const expected = bytes(
      optReply(W.OPT_LIST, W.REP_SERVER, [...be32(2), ...str("pc"), ...str("pcache test")]),
      optReply(W.OPT_LIST, W.REP_ACK),
    );
    await expectBytes(c, expected);
  });

  for (const flags of [0x4, 0x80000000, 0xffffffff]) {
    test(`unknown client flag 0x${flags.toString(16)} => drop`, async () => {
      const s = await server();
      const c = await client(s);
      await c.read(18);
      c.send(be32(flags));
      expect(await c.waitClosed(2000)).toBe(true);
      expect(c.buffered).toBe(0);
    });
  }

  for (const opt of [W.OPT_GO, W.OPT_INFO]) {
    const name = opt === W.OPT_GO ? "GO" : "INFO";
    test(`${name} with a 5000-byte name => ERR_INVALID`, async () => {
      const s = await server();
      const c = await client(s);
      await startHandshake(c);
      c.send(option(opt, goData("x".repeat(5000))));
      await expectBytes(c, optReply(opt, W.REP_ERR_INVALID, str("export name too long")));
      // Still negotiating: a proper GO works afterwards.
      if (opt === W.OPT_GO) {
        c.send(option(W.OPT_GO, goData("pc")));
        expect((await readOptReply(c)).type).toBe(W.REP_INFO);
      }
    });

    test(`${name} with namelen > optlen - 6 => ERR_INVALID`, async () => {
      const s = await server();
      const c = await client(s);
      await startHandshake(c);
      // namelen 100 but only 2 name bytes and the u16 count follow.
      c.send(option(opt, [...be32(100), ...str("pc"), ...be16(0)]));
      await expectBytes(c, optReply(opt, W.REP_ERR_INVALID, str("malformed option data")));
      // namelen 0xffffffff must not wrap around anything.
      c.send(option(opt, [...be32(0xffffffff), ...be16(0)]));
      expect((await readOptReply(c)).type).toBe(W.REP_ERR_INVALID);
      // Too short to hold the fixed fields.
      c.send(option(opt, [0, 0, 0]));
      expect((await readOptReply(c)).type).toBe(W.REP_ERR_INVALID);
      // Info count not matching the remaining length.
      c.send(option(opt, [...be32(0), ...be16(2), ...be16(W.INFO_NAME)]));
      expect((await readOptReply(c)).type).toBe(W.REP_ERR_INVALID);
    });
  }

  test("GO for an unknown export => ERR_UNKNOWN, negotiation continues", async () => {
    const s = await server();
    const c = await client(s);
    await startHandshake(c);
    c.send(option(W.OPT_GO, goData("nope")));
    await expectBytes(c, optReply(W.OPT_GO, W.REP_ERR_UNKNOWN, str("unknown export name")));
    c.send(option(W.OPT_GO, goData("")));
    expect((await readOptReply(c)).type).toBe(W.REP_INFO);
  });

  test("option length 2^31-1 => disconnect without allocating", async () => {
    const s = await server();
    const c = await client(s);
    await startHandshake(c);
    const rss_before = process.memoryUsage().rss;
    c.send(bytes([0x49, 0x48, 0x41, 0x56, 0x45, 0x4f, 0x50, 0x54], be32(W.OPT_GO), be32(0x7fffffff)));
    expect(await c.waitClosed(2000)).toBe(true);
    expect(c.buffered).toBe(0);
    // Nothing near 2 GiB was reserved for the option data.
    expect(process.memoryUsage().rss - rss_before).toBeLessThan(256 * MiB);
    expect(s.logs.some((l) => l.includes("over limit"))).toBe(true);
  });

  test("option just over 64 KiB => disconnect; 64 KiB exactly is read and answered", async () => {
    const s = await server();
    const c = await client(s);
    await startHandshake(c);
    c.send(option(0x4242, new Uint8Array(64 * 1024)));
    expect((await readOptReply(c)).type).toBe(W.REP_ERR_UNSUP);
    c.send(option(0x4242, [], 64 * 1024 + 1));
    expect(await c.waitClosed(2000)).toBe(true);
  });

  test("SET_META_CONTEXT / LIST_META_CONTEXT before STRUCTURED_REPLY => ERR_INVALID", async () => {
    const s = await server();
    const c = await client(s);
    await startHandshake(c);
    for (const opt of [W.OPT_SET_META_CONTEXT, W.OPT_LIST_META_CONTEXT]) {
      c.send(option(opt, metaData("pc", ["base:allocation"])));
      await expectBytes(c, optReply(opt, W.REP_ERR_INVALID, str("structured replies must be negotiated first")));
    }
  });

  test("option count is capped: the 33rd option => disconnect", async () => {
    const s = await server();
    const c = await client(s);
    await startHandshake(c);
    for (let i = 0; i < 32; i++) {
      c.send(option(W.OPT_STRUCTURED_REPLY));
      expect((await readOptReply(c)).type).toBe(W.REP_ACK);
    }
    c.send(option(W.OPT_STRUCTURED_REPLY));
    expect(await c.waitClosed(2000)).toBe(true);
    expect(c.buffered).toBe(0);
  });

  test("bad option magic => disconnect", async () => {
    const s = await server();
    const c = await client(s);
    await startHandshake(c);
    c.send(bytes(str("IHAVEOPX"), be32(W.OPT_LIST), be32(0)));
    expect(await c.waitClosed(2000)).toBe(true);
  });
});

// ===========================================================================================
describe("handshake: options", () => {
  test("EXPORT_NAME without NO_ZEROES => size, flags and 124 zero bytes", async () => {
    const s = await server();
    const c = await client(s);
    await startHandshake(c, W.FLAG_C_FIXED_NEWSTYLE);
    c.send(option(W.OPT_EXPORT_NAME, str("pc")));
    const flags = W.TF_HAS_FLAGS | W.TF_SEND_FLUSH | W.TF_SEND_FUA | W.TF_SEND_TRIM | W.TF_SEND_WRITE_ZEROES |
      W.TF_SEND_FAST_ZERO | W.TF_SEND_CACHE | W.TF_CAN_MULTI_CONN;
    const expected = bytes(be64(SIZE), be16(flags), new Uint8Array(124));
    await expectBytes(c, expected);
    expect(await c.expectQuiet(50)).toBe(true);
    await stillWorks(c);
  });

  test("EXPORT_NAME with NO_ZEROES => no padding", async () => {
    const s = await server();
    const c = await client(s);
    await startHandshake(c);
    c.send(option(W.OPT_EXPORT_NAME, []));
    const r = await c.read(10);
    expect(u64(r, 0)).toBe(BigInt(SIZE));
    // The next bytes on the wire are the reply to our first request, not zeroes.
    await stillWorks(c);
  });

  test("EXPORT_NAME with an unknown name => disconnect", async () => {
    const s = await server();
    const c = await client(s);
    await startHandshake(c);
    c.send(option(W.OPT_EXPORT_NAME, str("other")));
    expect(await c.waitClosed(2000)).toBe(true);
    expect(c.buffered).toBe(0);
  });

  test("EXPORT_NAME with a 5000-byte name => disconnect", async () => {
    const s = await server();
    const c = await client(s);
    await startHandshake(c);
    c.send(option(W.OPT_EXPORT_NAME, str("p".repeat(5000))));
    expect(await c.waitClosed(2000)).toBe(true);
  });

  test("non-fixed-newstyle client: EXPORT_NAME works (with zeroes), any other option => drop", async () => {
    const s = await server();
    const c = await client(s);
    await startHandshake(c, 0);
    c.send(option(W.OPT_EXPORT_NAME, str("pc")));
    const r = await c.read(134);
    expect(u64(r, 0)).toBe(BigInt(SIZE));
    expect(r.subarray(10).every((b) => b === 0)).toBe(true);

    const c2 = await client(s);
    await startHandshake(c2, 0);
    c2.send(option(W.OPT_LIST));
    expect(await c2.waitClosed(2000)).toBe(true);
    expect(c2.buffered).toBe(0);
  });

  test("INFO then GO with the same parameters give the same answers", async () => {
    const s = await server();
    const c = await client(s);
    await startHandshake(c);
    const infos = [W.INFO_NAME, W.INFO_DESCRIPTION, W.INFO_BLOCK_SIZE, 77];
    c.send(option(W.OPT_INFO, goData("pc", infos)));
    const info_replies: string[] = [];
    for (;;) {
      const r = await readOptReply(c);
      expect(r.option).toBe(W.OPT_INFO);
      if (r.type === W.REP_ACK) break;
      expect(r.type).toBe(W.REP_INFO);
      info_replies.push(hex(r.data));
    }
    c.send(option(W.OPT_GO, goData("pc", infos)));
    const go_replies: string[] = [];
    for (;;) {
      const r = await readOptReply(c);
      expect(r.option).toBe(W.OPT_GO);
      if (r.type === W.REP_ACK) break;
      go_replies.push(hex(r.data));
    }
    expect(go_replies.sort()).toEqual(info_replies.sort());
    const flags = W.TF_HAS_FLAGS | W.TF_SEND_FLUSH | W.TF_SEND_FUA | W.TF_SEND_TRIM | W.TF_SEND_WRITE_ZEROES |
      W.TF_SEND_FAST_ZERO | W.TF_SEND_CACHE | W.TF_CAN_MULTI_CONN;
    expect(info_replies.sort()).toEqual(
      [
        hex(bytes(be16(W.INFO_EXPORT), be64(SIZE), be16(flags))),
        hex(bytes(be16(W.INFO_NAME), str("pc"))),
        hex(bytes(be16(W.INFO_DESCRIPTION), str("pcache test"))),
        hex(bytes(be16(W.INFO_BLOCK_SIZE), be32(1), be32(4096), be32(32 * MiB))),
      ].sort(),
    );
    // GO entered transmission: no padding, requests work.
    await stillWorks(c);
  });

  test("GO with no info requests => INFO_EXPORT and BLOCK_SIZE then ACK, exact bytes", async () => {
    const s = await server();
    const c = await client(s);
    await startHandshake(c);
    c.send(option(W.OPT_GO, goData("")));
    const flags = W.TF_HAS_FLAGS | W.TF_SEND_FLUSH | W.TF_SEND_FUA | W.TF_SEND_TRIM | W.TF_SEND_WRITE_ZEROES |
      W.TF_SEND_FAST_ZERO | W.TF_SEND_CACHE | W.TF_CAN_MULTI_CONN;
    const expected = bytes(
      optReply(W.OPT_GO, W.REP_INFO, bytes(be16(W.INFO_EXPORT), be64(SIZE), be16(flags))),
      optReply(W.OPT_GO, W.REP_INFO, bytes(be16(W.INFO_BLOCK_SIZE), be32(1), be32(4096), be32(32 * MiB))),
      optReply(W.OPT_GO, W.REP_ACK),
    );
    await expectBytes(c, expected);
    expect(await c.expectQuiet(50)).toBe(true);
  });

  test("SEND_DF is advertised only with structured replies", async () => {
    const s = await server();
    const a = await client(s);
    expect((await handshakeGo(a, { sr: true })).flags & W.TF_SEND_DF).toBe(W.TF_SEND_DF);
    const b = await client(s);
    expect((await handshakeGo(b)).flags & W.TF_SEND_DF).toBe(0);
  });

  test("ABORT => ACK, then the server closes", async () => {
    const s = await server();
    const c = await client(s);
    await startHandshake(c);
    c.send(option(W.OPT_ABORT, [1, 2, 3]));
    await expectBytes(c, optReply(W.OPT_ABORT, W.REP_ACK));
    expect(await c.waitClosed(2000)).toBe(true);
  });

  test("STARTTLS and EXTENDED_HEADERS => ERR_UNSUP", async () => {
    const s = await server();
    const c = await client(s);
    await startHandshake(c);
    c.send(option(W.OPT_STARTTLS));
    await expectBytes(c, optReply(W.OPT_STARTTLS, W.REP_ERR_UNSUP, str("TLS is not supported by this server")));
    c.send(option(W.OPT_EXTENDED_HEADERS));
    await expectBytes(c, optReply(W.OPT_EXTENDED_HEADERS, W.REP_ERR_UNSUP, str("extended headers are not supported")));
    // Still negotiating, with compact headers.
    await handshakeGoAfterFlags(c);
    await stillWorks(c);
  });

  test("STRUCTURED_REPLY with data => ERR_INVALID", async () => {
    const s = await server();
    const c = await client(s);
    await startHandshake(c);
    c.send(option(W.OPT_STRUCTURED_REPLY, [0]));
    expect((await readOptReply(c)).type).toBe(W.REP_ERR_INVALID);
  });

  test("LIST_META_CONTEXT: no query, base: wildcard, exact name, unknown namespace", async () => {
    const s = await server();
    const c = await client(s);
    await startHandshake(c);
    c.send(option(W.OPT_STRUCTURED_REPLY));
    await readOptReply(c);
    const base = optReply(W.OPT_LIST_META_CONTEXT, W.REP_META_CONTEXT, [...be32(0), ...str("base:allocation")]);
    const ack = optReply(W.OPT_LIST_META_CONTEXT, W.REP_ACK);
    for (const queries of [[], ["base:"], ["base:allocation"], ["x-foo:bar", "base:allocation"]]) {
      c.send(option(W.OPT_LIST_META_CONTEXT, metaData("pc", queries)));
      await expectBytes(c, bytes(base, ack));
    }
    for (const queries of [["x-foo:bar"], ["base:nothing"], ["qemu:dirty-bitmap:a"]]) {
      c.send(option(W.OPT_LIST_META_CONTEXT, metaData("pc", queries)));
      await expectBytes(c, ack);
    }
    // Unknown export.
    c.send(option(W.OPT_LIST_META_CONTEXT, metaData("zz", [])));
    expect((await readOptReply(c)).type).toBe(W.REP_ERR_UNKNOWN);
    // Malformed: query length beyond the option.
    c.send(option(W.OPT_LIST_META_CONTEXT, [...be32(0), ...be32(1), ...be32(100), ...str("base:")]));
    expect((await readOptReply(c)).type).toBe(W.REP_ERR_INVALID);
    // Malformed: more queries announced than present.
    c.send(option(W.OPT_LIST_META_CONTEXT, [...be32(0), ...be32(0x10000000)]));
    expect((await readOptReply(c)).type).toBe(W.REP_ERR_INVALID);
    // Malformed: trailing bytes.
    c.send(option(W.OPT_LIST_META_CONTEXT, [...metaData("", []), 0]));
    expect((await readOptReply(c)).type).toBe(W.REP_ERR_INVALID);
  });

  test("SET_META_CONTEXT: selects base:allocation once; base: wildcard selects nothing; failure clears", async () => {
    const s = await server();
    const c = await client(s);
    await startHandshake(c);
    c.send(option(W.OPT_STRUCTURED_REPLY));
    await readOptReply(c);
    const sel = optReply(W.OPT_SET_META_CONTEXT, W.REP_META_CONTEXT, [...be32(0), ...str("base:allocation")]);
    const ack = optReply(W.OPT_SET_META_CONTEXT, W.REP_ACK);
    c.send(option(W.OPT_SET_META_CONTEXT, metaData("pc", ["base:allocation", "base:allocation"])));
    await expectBytes(c, bytes(sel, ack));
    c.send(option(W.OPT_SET_META_CONTEXT, metaData("pc", ["base:"])));
    await expectBytes(c, ack);
    // Select again, then a failing SET (unknown export) clears the selection.
    c.send(option(W.OPT_SET_META_CONTEXT, metaData("", ["base:allocation"])));
    await c.read(sel.length + ack.length);
    c.send(option(W.OPT_SET_META_CONTEXT, metaData("zz", ["base:allocation"])));
    expect((await readOptReply(c)).type).toBe(W.REP_ERR_UNKNOWN);
    c.send(option(W.OPT_GO, goData("pc")));
    while ((await readOptReply(c)).type !== W.REP_ACK) {}
    c.send(request(W.CMD_BLOCK_STATUS, 0, 9, 0, 4096));
    expect((await readErrorChunk(c, 9)).errno).toBe(W.NBD_EINVAL);
  });

  test("stalled handshake times out (before client flags and between options)", async () => {
    const s = await server({ server: { limits: { handshake_timeout_ms: 150 } } });
    const a = await client(s);
    await a.read(18);
    const b = await client(s);
    await startHandshake(b);
    b.send(option(W.OPT_STRUCTURED_REPLY));
    await readOptReply(b);
    const c = await client(s);
    await startHandshake(c);
    c.send(option(W.OPT_GO).subarray(0, 10)); // half an option header
    const t0 = Date.now();
    expect(await a.waitClosed(2000)).toBe(true);
    expect(await b.waitClosed(2000)).toBe(true);
    expect(await c.waitClosed(2000)).toBe(true);
    expect(Date.now() - t0).toBeLessThan(1500);
    // A connection that reached transmission is not timed out.
    const d = await client(s);
    await handshakeGo(d);
    await Bun.sleep(300);
    await stillWorks(d);
  });
});

// ===========================================================================================
describe("transmission: §4 table", () => {
  test("bad request magic => disconnect", async () => {
    for (const magic of [0x12345678, 0x12560953, W.SIMPLE_REPLY_MAGIC]) {
      const s = await server();
      const c = await simpleSession(s);
      c.send(request(W.CMD_READ, 0, 1, 0, 512, undefined, magic));
      expect(await c.waitClosed(2000)).toBe(true);
      expect(c.buffered).toBe(0);
    }
  });

  test("unknown command => EINVAL (simple and structured)", async () => {
    const s = await server();
    const c = await simpleSession(s);
    c.send(request(8, 0, 0x1111, 0, 0)); // RESIZE: experimental, not supported
    await expectBytes(c, simpleReply(W.NBD_EINVAL, 0x1111));
    c.send(request(0xffff, 0, 0x2222, 0, 0));
    await expectBytes(c, simpleReply(W.NBD_EINVAL, 0x2222));
    await stillWorks(c);
    const d = await srSession(s);
    d.send(request(9, 0, 0x3333, 0, 0));
    await expectBytes(d, errorChunk(0x3333, W.NBD_EINVAL, "unknown command"));
  });

  test("unknown flag / flag on the wrong command => EINVAL", async () => {
    const s = await server();
    const c = await simpleSession(s);
    const cases: Array<[number, number]> = [
      [W.CMD_READ, 0x40],
      [W.CMD_READ, W.CMD_FLAG_NO_HOLE],
      [W.CMD_READ, W.CMD_FLAG_REQ_ONE],
      [W.CMD_READ, W.CMD_FLAG_PAYLOAD_LEN],
      [W.CMD_FLUSH, W.CMD_FLAG_DF],
      [W.CMD_TRIM, W.CMD_FLAG_NO_HOLE],
      [W.CMD_CACHE, W.CMD_FLAG_FAST_ZERO],
      [W.CMD_WRITE_ZEROES, W.CMD_FLAG_DF],
      [W.CMD_WRITE_ZEROES, 0x8000],
    ];
    let cookie = 100;
    for (const [type, flags] of cases) {
      c.send(request(type, flags, cookie, 0, 512));
      await expectBytes(c, simpleReply(W.NBD_EINVAL, cookie));
      cookie++;
    }
    // A WRITE with a bad flag: its payload is consumed, then EINVAL.
    c.send(request(W.CMD_WRITE, W.CMD_FLAG_NO_HOLE, 0x99, 0, 512, new Uint8Array(512).fill(7)));
    await expectBytes(c, simpleReply(W.NBD_EINVAL, 0x99));
    expect(s.exp.peek(0, 512).every((b) => b === 0)).toBe(true);
    await stillWorks(c);
  });

  test("READ / TRIM / CACHE past end => EINVAL", async () => {
    const s = await server();
    const c = await simpleSession(s);
    const cases: Array<[number, number | bigint, number]> = [
      [W.CMD_READ, SIZE - 511, 512],
      [W.CMD_READ, SIZE, 1],
      [W.CMD_TRIM, SIZE - 4096, 8192],
      [W.CMD_CACHE, SIZE, 4096],
      [W.CMD_READ, 1n << 53n, 512],
      [W.CMD_READ, (1n << 63n) + 5n, 512],
      [W.CMD_READ, 0xffffffffffffffffn, 1], // offset + length overflows u64
      [W.CMD_TRIM, 0xfffffffffffff000n, 0xffffffff],
    ];
    let cookie = 1;
    for (const [type, off, len] of cases) {
      c.send(request(type, 0, cookie, off, len));
      await expectBytes(c, simpleReply(W.NBD_EINVAL, cookie));
      cookie++;
    }
    // The last byte itself is fine.
    c.send(request(W.CMD_READ, 0, 50, SIZE - 1, 1));
    await expectBytes(c, bytes(simpleReply(0, 50), [0]));
    // Structured: READ past end => error chunk.
    const d = await srSession(s);
    d.send(request(W.CMD_READ, 0, 7, SIZE, 512));
    await expectBytes(d, errorChunk(7, W.NBD_EINVAL, "offset and length beyond end of export"));
  });

  test("WRITE / WRITE_ZEROES past end => ENOSPC (payload consumed)", async () => {
    const s = await server();
    const c = await simpleSession(s);
    c.send(request(W.CMD_WRITE, 0, 1, SIZE - 256, 512, new Uint8Array(512).fill(1)));
    await expectBytes(c, simpleReply(W.NBD_ENOSPC, 1));
    c.send(request(W.CMD_WRITE, W.CMD_FLAG_FUA, 2, 1n << 60n, 512, new Uint8Array(512).fill(1)));
    await expectBytes(c, simpleReply(W.NBD_ENOSPC, 2));
    c.send(request(W.CMD_WRITE_ZEROES, 0, 3, SIZE, 1));
    await expectBytes(c, simpleReply(W.NBD_ENOSPC, 3));
    c.send(request(W.CMD_WRITE_ZEROES, W.CMD_FLAG_NO_HOLE, 4, 0xffffffffffffffffn, 0xffffffff));
    await expectBytes(c, simpleReply(W.NBD_ENOSPC, 4));
    expect(s.exp.stats.write).toBe(0);
    await stillWorks(c);
  });

  test("READ length 0 => success with no data (simple: bare reply; structured: NONE chunk)", async () => {
    const s = await server();
    const c = await simpleSession(s);
    c.send(request(W.CMD_READ, 0, 0xabc, 4096, 0));
    await expectBytes(c, simpleReply(0, 0xabc));
    expect(await c.expectQuiet(50)).toBe(true);
    const d = await srSession(s);
    d.send(request(W.CMD_READ, 0, 0xdef, 4096, 0));
    const none = bytes(be32(W.STRUCTURED_REPLY_MAGIC), be16(W.REPLY_FLAG_DONE), be16(W.REPLY_TYPE_NONE), be64(0xdef), be32(0));
    await expectBytes(d, none);
    expect(await d.expectQuiet(50)).toBe(true);
  });

  test("READ 32 MiB + 512 => EINVAL; READ 32 MiB => data", async () => {
    const s = await server();
    const c = await simpleSession(s);
    c.send(request(W.CMD_READ, 0, 1, 0, 32 * MiB + 512));
    await expectBytes(c, simpleReply(W.NBD_EINVAL, 1));
    expect(await c.expectQuiet(50)).toBe(true);
    s.exp.poke(32 * MiB - 1, Uint8Array.of(0xee));
    c.send(request(W.CMD_READ, 0, 2, 0, 32 * MiB));
    const r = await c.read(16 + 32 * MiB, 10_000);
    expect(hex(r.subarray(0, 16))).toBe(hex(simpleReply(0, 2)));
    expect(r[16 + 32 * MiB - 1]).toBe(0xee);
    const d = await srSession(s);
    d.send(request(W.CMD_READ, 0, 3, 0, 32 * MiB + 512));
    await expectBytes(d, errorChunk(3, W.NBD_EINVAL, "request length over 32 MiB"));
  });

  test("WRITE 33 MiB => payload consumed, EINVAL, connection stays usable", async () => {
    const s = await server();
    const c = await simpleSession(s);
    c.send(request(W.CMD_WRITE, 0, 0x33, 0, 33 * MiB, new Uint8Array(33 * MiB).fill(0xcc)));
    expect(hex(await c.read(16, 15_000))).toBe(hex(simpleReply(W.NBD_EINVAL, 0x33)));
    expect(s.exp.stats.write).toBe(0);
    await stillWorks(c);
  }, 30_000);

  test("WRITE header announcing over 128 MiB => disconnect at once", async () => {
    const s = await server();
    const c = await simpleSession(s);
    c.send(request(W.CMD_WRITE, 0, 1, 0, 0xffffffff));
    expect(await c.waitClosed(2000)).toBe(true);
    expect(c.buffered).toBe(0);
  });

  test("FUA on READ (and other non-writes) is accepted", async () => {
    const s = await server();
    const c = await simpleSession(s);
    s.exp.poke(0, new Uint8Array(512).fill(0x42));
    c.send(request(W.CMD_READ, W.CMD_FLAG_FUA, 1, 0, 512));
    await expectBytes(c, bytes(simpleReply(0, 1), new Uint8Array(512).fill(0x42)));
    c.send(request(W.CMD_FLUSH, W.CMD_FLAG_FUA, 2, 0, 0));
    await expectBytes(c, simpleReply(0, 2));
    c.send(request(W.CMD_CACHE, W.CMD_FLAG_FUA, 3, 0, 4096));
    await expectBytes(c, simpleReply(0, 3));
  });

  test("FLUSH with offset or length != 0 => EINVAL", async () => {
    const s = await server();
    const c = await simpleSession(s);
    c.send(request(W.CMD_FLUSH, 0, 1, 4096, 0));
    await expectBytes(c, simpleReply(W.NBD_EINVAL, 1));
    c.send(request(W.CMD_FLUSH, 0, 2, 0, 512));
    await expectBytes(c, simpleReply(W.NBD_EINVAL, 2));
    c.send(request(W.CMD_FLUSH, 0, 3, 1n << 40n, 0));
    await expectBytes(c, simpleReply(W.NBD_EINVAL, 3));
    expect(s.exp.stats.flush).toBe(0);
    c.send(request(W.CMD_FLUSH, 0, 4, 0, 0));
    await expectBytes(c, simpleReply(0, 4));
    expect(s.exp.stats.flush).toBe(1);
  });

  test("DF without structured replies => EINVAL; with them => one data chunk", async () => {
    const s = await server();
    const c = await simpleSession(s);
    c.send(request(W.CMD_READ, W.CMD_FLAG_DF, 1, 0, 512));
    await expectBytes(c, simpleReply(W.NBD_EINVAL, 1));
    expect(await c.expectQuiet(50)).toBe(true);
    const d = await srSession(s);
    s.exp.poke(1024, new Uint8Array(64 * 1024).fill(9));
    d.send(request(W.CMD_READ, W.CMD_FLAG_DF, 2, 1024, 64 * 1024));
    const ch = await readChunk(d);
    expect(ch.type).toBe(W.REPLY_TYPE_OFFSET_DATA);
    expect(ch.flags).toBe(W.REPLY_FLAG_DONE);
    expect(u64(ch.payload, 0)).toBe(1024n);
    expect(ch.payload.length).toBe(8 + 64 * 1024);
    expect(ch.payload.subarray(8).every((b) => b === 9)).toBe(true);
  });

  test("BLOCK_STATUS without structured replies or without a context => EINVAL", async () => {
    const s = await server();
    const c = await simpleSession(s);
    c.send(request(W.CMD_BLOCK_STATUS, 0, 1, 0, 4096));
    await expectBytes(c, simpleReply(W.NBD_EINVAL, 1));
    const d = await srSession(s, false);
    d.send(request(W.CMD_BLOCK_STATUS, 0, 2, 0, 4096));
    await expectBytes(d, errorChunk(2, W.NBD_EINVAL, "block status needs a selected meta context"));
  });
});

// ===========================================================================================
describe("transmission: commands", () => {
  test("structured READ => one OFFSET_DATA chunk with DONE, exact bytes", async () => {
    const s = await server();
    const c = await srSession(s);
    const data = Uint8Array.from({ length: 300 }, (_, i) => i & 255);
    s.exp.poke(5000, data);
    c.send(request(W.CMD_READ, 0, 0x0102030405060708n, 5000, 300));
    const expected = bytes(
      be32(W.STRUCTURED_REPLY_MAGIC),
      be16(W.REPLY_FLAG_DONE),
      be16(W.REPLY_TYPE_OFFSET_DATA),
      be64(0x0102030405060708n),
      be32(8 + 300),
      be64(5000),
      data,
    );
    await expectBytes(c, expected);
  });

  test("WRITE, FUA WRITE, TRIM, WRITE_ZEROES (NO_HOLE, FAST_ZERO), CACHE round-trip", async () => {
    const s = await server();
    const c = await simpleSession(s);
    const a = new Uint8Array(1024).fill(0xa1);
    c.send(request(W.CMD_WRITE, 0, 1, 1000, 1024, a)); // unaligned, 1 KiB
    await expectBytes(c, simpleReply(0, 1));
    c.send(request(W.CMD_WRITE, W.CMD_FLAG_FUA, 2, 128 * 1024, 1024, a));
    await expectBytes(c, simpleReply(0, 2));
    expect(s.exp.stats.fua).toBe(1);
    c.send(request(W.CMD_READ, 0, 3, 1000, 1024));
    await expectBytes(c, bytes(simpleReply(0, 3), a));
    c.send(request(W.CMD_WRITE_ZEROES, W.CMD_FLAG_NO_HOLE, 4, 1000, 24));
    await expectBytes(c, simpleReply(0, 4));
    c.send(request(W.CMD_WRITE_ZEROES, W.CMD_FLAG_FAST_ZERO, 5, 1024, 1000));
    await expectBytes(c, simpleReply(0, 5));
    c.send(request(W.CMD_TRIM, 0, 6, 128 * 1024, 1024));
    await expectBytes(c, simpleReply(0, 6));
    c.send(request(W.CMD_CACHE, 0, 7, 0, 1 * MiB));
    await expectBytes(c, simpleReply(0, 7));
    expect(s.exp.peek(1000, 1024).every((b) => b === 0)).toBe(true);
    expect(s.exp.peek(2024, 1).every((b) => b === 0xa1)).toBe(false);
    expect(s.exp.peek(128 * 1024, 1024).every((b) => b === 0)).toBe(true);
    // Zero-length write/trim/zero/cache are no-ops that succeed.
    for (const t of [W.CMD_WRITE, W.CMD_TRIM, W.CMD_WRITE_ZEROES, W.CMD_CACHE]) {
      c.send(request(t, 0, 10 + t, 0, 0));
      await expectBytes(c, simpleReply(0, 10 + t));
    }
  });

  test("FAST_ZERO that the export cannot do fast => ENOTSUP", async () => {
    const s = await server({ memory: { fast_zero: false } });
    const c = await simpleSession(s);
    c.send(request(W.CMD_WRITE_ZEROES, W.CMD_FLAG_FAST_ZERO, 1, 0, 4096));
    await expectBytes(c, simpleReply(W.NBD_ENOTSUP, 1));
    c.send(request(W.CMD_WRITE_ZEROES, 0, 2, 0, 4096));
    await expectBytes(c, simpleReply(0, 2));
  });

  test("BLOCK_STATUS: extents exact, REQ_ONE gives one extent, clipped to the request", async () => {
    const s = await server();
    const c = await srSession(s, true);
    s.exp.poke(64 * 1024, new Uint8Array(10).fill(1)); // chunk 1 allocated
    const H = W.STATE_HOLE | W.STATE_ZERO;
    const chunk = (cookie: number, ext: Array<[number, number]>) =>
      bytes(
        be32(W.STRUCTURED_REPLY_MAGIC),
        be16(W.REPLY_FLAG_DONE),
        be16(W.REPLY_TYPE_BLOCK_STATUS),
        be64(cookie),
        be32(4 + 8 * ext.length),
        be32(0),
        ...ext.map(([l, f]) => [...be32(l), ...be32(f)]),
      );
    c.send(request(W.CMD_BLOCK_STATUS, 0, 1, 0, 256 * 1024));
    let want = chunk(1, [[65536, H], [65536, 0], [131072, H]]);
    await expectBytes(c, want);
    c.send(request(W.CMD_BLOCK_STATUS, W.CMD_FLAG_REQ_ONE, 2, 0, 256 * 1024));
    want = chunk(2, [[65536, H]]);
    await expectBytes(c, want);
    c.send(request(W.CMD_BLOCK_STATUS, 0, 3, 70000, 1000));
    want = chunk(3, [[1000, 0]]);
    await expectBytes(c, want);
    // Past end and zero length => EINVAL.
    c.send(request(W.CMD_BLOCK_STATUS, 0, 4, SIZE - 10, 11));
    expect((await readErrorChunk(c, 4)).errno).toBe(W.NBD_EINVAL);
    c.send(request(W.CMD_BLOCK_STATUS, 0, 5, 0, 0));
    expect((await readErrorChunk(c, 5)).errno).toBe(W.NBD_EINVAL);
  });

  test("export errors: errno passes through, EDQUOT => ENOSPC, plain Error => EIO with one log line", async () => {
    const s = await server({
      memory: {
        fail: (op, off) => {
          if (off === 4096) return ERRNO.EIO;
          if (off === 8192) return ERRNO.ENOSPC;
          if (off === 12288) return ERRNO.EDQUOT;
          if (off === 16384) return new Error("disk on fire\nsecond line");
          if (off === 20480) return new NbdExportError(ERRNO.ENOTSUP, "no");
          if (op === "flush") return ERRNO.EIO;
          return undefined;
        },
      },
    });
    const c = await simpleSession(s);
    const w = (cookie: number, off: number) => request(W.CMD_WRITE, 0, cookie, off, 512, new Uint8Array(512));
    c.send(w(1, 4096));
    await expectBytes(c, simpleReply(W.NBD_EIO, 1));
    c.send(w(2, 8192));
    await expectBytes(c, simpleReply(W.NBD_ENOSPC, 2));
    c.send(w(3, 12288));
    await expectBytes(c, simpleReply(W.NBD_ENOSPC, 3));
    c.send(w(4, 16384));
    await expectBytes(c, simpleReply(W.NBD_EIO, 4));
    c.send(w(5, 20480)); // ENOTSUP outside FAST_ZERO => EINVAL
    await expectBytes(c, simpleReply(W.NBD_EINVAL, 5));
    c.send(request(W.CMD_READ, 0, 6, 16384, 512)); // simple READ error: no payload
    await expectBytes(c, simpleReply(W.NBD_EIO, 6));
    expect(await c.expectQuiet(50)).toBe(true);
    c.send(request(W.CMD_FLUSH, 0, 7, 0, 0));
    await expectBytes(c, simpleReply(W.NBD_EIO, 7));
    const warn = s.logs.filter((l) => l.startsWith("warn:") && l.includes("disk on fire"));
    expect(warn.length).toBe(2);
    for (const l of warn) {
      expect(l.includes("\n")).toBe(false);
      expect(l.includes(" at ")).toBe(false); // no stack frames
    }
    // Structured READ error => error chunk, no data.
    const d = await srSession(s);
    d.send(request(W.CMD_READ, 0, 8, 4096, 512));
    await expectBytes(d, errorChunk(8, W.NBD_EIO, "input/output error"));
    await stillWorks(c, 9);
  });

  test("read-only export: READ_ONLY flag; WRITE, TRIM, WRITE_ZEROES => EPERM; READ/FLUSH fine", async () => {
    const s = await server({ memory: { read_only: true } });
    const c = await client(s);
    const { flags } = await handshakeGo(c);
    expect(flags & W.TF_READ_ONLY).toBe(W.TF_READ_ONLY);
    c.send(request(W.CMD_WRITE, 0, 1, 0, 1024, new Uint8Array(1024).fill(1)));
    await expectBytes(c, simpleReply(W.NBD_EPERM, 1));
    c.send(request(W.CMD_TRIM, 0, 2, 0, 1024));
    await expectBytes(c, simpleReply(W.NBD_EPERM, 2));
    c.send(request(W.CMD_WRITE_ZEROES, 0, 3, 0, 1024));
    await expectBytes(c, simpleReply(W.NBD_EPERM, 3));
    c.send(request(W.CMD_READ, 0, 4, 0, 16));
    await expectBytes(c, bytes(simpleReply(0, 4), new Uint8Array(16)));
    c.send(request(W.CMD_FLUSH, 0, 5, 0, 0));
    await expectBytes(c, simpleReply(0, 5));
    expect(s.exp.stats.write + s.exp.stats.trim + s.exp.stats.zero).toBe(0);
  });
});

// ===========================================================================================
describe("connection behaviour", () => {
  test("replies complete out of order and carry the right cookies", async () => {
    const s = await server({ memory: { delay_ms: (op, off) => (op === "read" && off === 0 ? 150 : 0) } });
    const c = await simpleSession(s);
    s.exp.poke(0, new Uint8Array(512).fill(1));
    s.exp.poke(4096, new Uint8Array(512).fill(2));
    c.send(bytes(request(W.CMD_READ, 0, 0xaaaa, 0, 512), request(W.CMD_READ, 0, 0xbbbb, 4096, 512)));
    const first = await c.read(16 + 512);
    const second = await c.read(16 + 512);
    expect(hex(first)).toBe(hex(bytes(simpleReply(0, 0xbbbb), new Uint8Array(512).fill(2))));
    expect(hex(second)).toBe(hex(bytes(simpleReply(0, 0xaaaa), new Uint8Array(512).fill(1))));
  });

  test("random delays: 200 pipelined requests, each reply matches its cookie", async () => {
    const s = await server({ memory: { jitter_ms: 5 } });
    const c = await srSession(s);
    for (let i = 0; i < 100; i++) s.exp.poke(i * 4096, new Uint8Array(64).fill(i));
    const reqs: Uint8Array[] = [];
    for (let i = 0; i < 200; i++) reqs.push(request(W.CMD_READ, 0, 1000 + i, (i % 100) * 4096, 64));
    c.send(bytes(...reqs));
    const seen = new Set<bigint>();
    let in_order = true;
    for (let i = 0; i < 200; i++) {
      const ch = await readChunk(c);
      const k = Number(ch.cookie) - 1000;
      if (k !== i) in_order = false;
      expect(u64(ch.payload, 0)).toBe(BigInt((k % 100) * 4096));
      expect(ch.payload.subarray(8).every((b) => b === k % 100)).toBe(true);
      seen.add(ch.cookie);
    }
    expect(seen.size).toBe(200);
    expect(in_order).toBe(false);
  });

  test("partial frames: a request delivered one byte at a time, and many requests in one chunk", async () => {
    const s = await server();
    const c = await simpleSession(s);
    const data = new Uint8Array(100).fill(0x3c);
    const req = request(W.CMD_WRITE, 0, 0x42, 777, 100, data);
    for (const b of req) {
      c.send([b]);
      await Bun.sleep(0);
    }
    await expectBytes(c, simpleReply(0, 0x42));
    const many: Uint8Array[] = [];
    for (let i = 0; i < 50; i++) many.push(request(W.CMD_READ, 0, i, 777, 100));
    c.send(bytes(...many));
    for (let i = 0; i < 50; i++) {
      const r = await c.read(116);
      expect(r.subarray(16).every((b) => b === 0x3c)).toBe(true);
    }
  });

  test("pipelined requests are counted (what writeback deferral watches); one request at a time counts none", async () => {
    let release!: () => void;
    let gate = new Promise<void>((r) => (release = r));
    const s = await server({ memory: { gate: () => gate } });
    const c = await simpleSession(s);
    // One at a time, each reply read before the next request: nothing was pipelined.
    release();
    for (let i = 0; i < 5; i++) {
      c.send(request(W.CMD_READ, 0, i, i * 512, 512));
      await c.read(16 + 512);
    }
    expect(s.server.pipelined_requests).toBe(0);
    // Three sent together while the export holds the first: each began with the others sent.
    gate = new Promise<void>((r) => (release = r));
    c.send(bytes(...[10, 11, 12].map((i) => request(W.CMD_READ, 0, i, i * 512, 512))));
    await Bun.sleep(100);
    release();
    for (let i = 0; i < 3; i++) await c.read(16 + 512);
    expect(s.server.pipelined_requests).toBe(3);
  });

  test("a large WRITE counts as pipelined when the next request arrived before its reply", async () => {
    // A streaming writer's 1 MiB WRITEs arrive over several reads: the first one completes before
    // the next is whole, so none is ever in flight with another. The bytes of the next request,
    // already received when the first is dispatched, still show that the client keeps a queue.
    const s = await server();
    const c = await simpleSession(s);
    const len = 256 * 1024;
    const first = request(W.CMD_WRITE, 0, 1, 0, len, new Uint8Array(len).fill(1));
    const second = request(W.CMD_WRITE, 0, 2, len, len, new Uint8Array(len).fill(2));
    c.send(first.subarray(0, 1000));
    await Bun.sleep(20);
    c.send(bytes(first.subarray(1000), second.subarray(0, 1000)));
    await expectBytes(c, simpleReply(0, 1));
    expect(s.server.pipelined_requests).toBe(1);
    c.send(second.subarray(1000));
    await expectBytes(c, simpleReply(0, 2));
    // The second began with nothing else sent or in flight.
    expect(s.server.pipelined_requests).toBe(1);
  });

  test("requests in flight per connection are capped; the rest wait, then all complete", async () => {
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    const s = await server({ memory: { gate: () => gate }, server: { limits: { inflight_max: 4 } } });
    const c = await simpleSession(s);
    const reqs: Uint8Array[] = [];
    for (let i = 0; i < 20; i++) reqs.push(request(W.CMD_READ, 0, i, i * 512, 512));
    c.send(bytes(...reqs));
    await Bun.sleep(100);
    expect(s.exp.inflight_now).toBe(4);
    release();
    for (let i = 0; i < 20; i++) await c.read(16 + 512);
    expect(s.exp.inflight_max).toBe(4);
    expect(s.exp.stats.read).toBe(20);
  });

  test("a client that never reads replies: reading pauses at the queue cap, data still correct later", async () => {
    const s = await server({ server: { limits: { write_queue_bytes_max: 1 * MiB, inflight_bytes_max: 4 * MiB } } });
    const c = await simpleSession(s);
    for (let i = 0; i < 64; i++) s.exp.poke(i * MiB, new Uint8Array(16).fill(i));
    const reqs: Uint8Array[] = [];
    for (let i = 0; i < 64; i++) reqs.push(request(W.CMD_READ, 0, i, i * MiB, MiB));
    c.pause();
    c.send(bytes(...reqs));
    // Give the server time to run as far as it can without us reading.
    await Bun.sleep(300);
    const dispatched = s.exp.stats.read;
    expect(dispatched).toBeLessThan(64);
    c.resume();
    for (let i = 0; i < 64; i++) {
      const r = await c.read(16 + MiB, 10_000);
      expect(u64(r, 8)).toBe(BigInt(i));
      expect(r.subarray(16, 32).every((b) => b === i)).toBe(true);
    }
    expect(s.exp.stats.read).toBe(64);
  }, 30_000);

  test("DISC: requests in flight finish and are answered, then the server closes", async () => {
    const s = await server({ memory: { delay_ms: 100 } });
    const c = await simpleSession(s);
    c.send(bytes(request(W.CMD_WRITE, 0, 1, 0, 512, new Uint8Array(512).fill(4)), request(W.CMD_DISC, 0, 2, 0, 0)));
    await expectBytes(c, simpleReply(0, 1));
    expect(await c.waitClosed(2000)).toBe(true);
    expect(c.buffered).toBe(0);
    expect(s.exp.peek(0, 512).every((b) => b === 4)).toBe(true);
  });

  test("a client dying mid-payload does not disturb another connection's data", async () => {
    const s = await server();
    const a = await simpleSession(s);
    const b = await simpleSession(s);
    const good = new Uint8Array(256 * 1024).fill(0x11);
    // A announces 1 MiB at offset 0 but sends only half, then dies.
    a.send(request(W.CMD_WRITE, 0, 1, 0, MiB, new Uint8Array(MiB / 2).fill(0xee)));
    await a.sent();
    // B writes its own range meanwhile.
    b.send(request(W.CMD_WRITE, 0, 2, 2 * MiB, good.length, good));
    await expectBytes(b, simpleReply(0, 2));
    a.kill();
    await Bun.sleep(50);
    b.send(request(W.CMD_READ, 0, 3, 2 * MiB, good.length));
    const r = await b.read(16 + good.length);
    expect(r.subarray(16).every((x) => x === 0x11)).toBe(true);
    // The half-sent write never reached the export.
    expect(s.exp.peek(0, MiB).every((x) => x === 0)).toBe(true);
    expect(s.server.connection_count).toBe(1);
    await stillWorks(b);
  });

  test("connection cap: the extra connection is closed at once, others unaffected", async () => {
    const s = await server({ server: { max_connections: 2 } });
    const a = await simpleSession(s);
    const b = await simpleSession(s);
    const c = await client(s);
    expect(await c.waitClosed(2000)).toBe(true);
    expect(c.buffered).toBe(0);
    await stillWorks(a);
    await stillWorks(b);
    a.send(request(W.CMD_DISC, 0, 0, 0, 0));
    expect(await a.waitClosed(2000)).toBe(true);
    await Bun.sleep(20);
    const d = await client(s);
    expect((await d.read(18)).length).toBe(18);
  });

  test("graceful stop: in-flight finishes, new requests get ESHUTDOWN, then close", async () => {
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    const s = await server({ memory: { gate: (op) => (op === "write" ? gate : undefined) } });
    const c = await simpleSession(s);
    const n = await client(s); // still negotiating
    await startHandshake(n);
    c.send(request(W.CMD_WRITE, 0, 1, 0, 512, new Uint8Array(512).fill(8)));
    await Bun.sleep(50);
    const stopped = s.server.stop({ timeout_ms: 5000 });
    await Bun.sleep(20);
    expect(await n.waitClosed(1000)).toBe(true);
    c.send(request(W.CMD_READ, 0, 2, 0, 512));
    await expectBytes(c, simpleReply(W.NBD_ESHUTDOWN, 2));
    c.send(request(W.CMD_WRITE, 0, 3, 0, 512, new Uint8Array(512)));
    await expectBytes(c, simpleReply(W.NBD_ESHUTDOWN, 3));
    expect(c.is_closed).toBe(false);
    release();
    await expectBytes(c, simpleReply(0, 1));
    expect(await c.waitClosed(2000)).toBe(true);
    await stopped;
    expect(s.exp.peek(0, 512).every((b) => b === 8)).toBe(true);
    // New connections are refused after stop.
    await expect(RawClient.connect(s.target).then((x) => x.read(1, 500))).rejects.toThrow();
  });

  test("stop during an option: it is answered ERR_SHUTDOWN, then the server closes", async () => {
    const s = await server();
    const c = await client(s);
    await startHandshake(c);
    const opt = option(W.OPT_LIST);
    c.send(opt.subarray(0, 8)); // half of the option header is in
    await Bun.sleep(20);
    const stopped = s.server.stop({ timeout_ms: 2000 });
    await Bun.sleep(20);
    c.send(opt.subarray(8));
    await expectBytes(c, optReply(W.OPT_LIST, W.REP_ERR_SHUTDOWN, str("server is shutting down")));
    expect(await c.waitClosed(2000)).toBe(true);
    await stopped;
  });

  test("stop: a connection stuck in the export is closed after the timeout", async () => {
    const s = await server({ memory: { gate: () => new Promise(() => {}) } });
    const c = await simpleSession(s);
    c.send(request(W.CMD_READ, 0, 1, 0, 512));
    await Bun.sleep(20);
    const t0 = Date.now();
    await s.server.stop({ timeout_ms: 200 });
    expect(Date.now() - t0).toBeLessThan(2000);
    expect(await c.waitClosed(1000)).toBe(true);
  });

  test("TCP listener on a free port works the same", async () => {
    const s = await server({ tcp: true });
    const c = await client(s);
    const { size } = await handshakeGo(c, { sr: true, meta: true, name: "pc" });
    expect(size).toBe(BigInt(SIZE));
    await stillWorks(c);
    c.send(request(W.CMD_READ, 0, 5, STILL_OFF, 512));
    const ch = await readChunk(c);
    expect(ch.payload.subarray(8).every((b) => b === 0x5a)).toBe(true);
  });
});

/** GO on a connection whose client flags were already sent. */
async function handshakeGoAfterFlags(c: RawClient): Promise<void> {
  c.send(option(W.OPT_GO, goData("")));
  while ((await readOptReply(c)).type !== W.REP_ACK) {}
}
