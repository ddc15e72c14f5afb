/**
 * Unit tests for the NBD layer's pure pieces: receive buffer, buffer pool, extent clipping,
 * listen-address parsing, socket-activation detection, the memory export, and one connection
 * over a recording socket (when replies are written, and in how many writes).
 */
import { describe, expect, test } from "bun:test";
import { BufferPool } from "../core/nbd/buffer_pool.ts";
import { RecvBuffer } from "../core/nbd/recv_buffer.ts";
import { clipExtents, BLOCK_STATUS_EXTENTS_MAX } from "../core/nbd/transmission.ts";
import { NbdServer, parseListenAddress, socketActivationFd } from "../core/nbd/server.ts";
import { MemoryExport } from "../core/nbd/memory_export.ts";
import * as W from "../core/nbd/wire.ts";
import { STATE_HOLE, STATE_ZERO } from "../core/nbd/wire.ts";
import { DEFAULT_CONNECTION_LIMITS, NbdConnection, type NbdSocket } from "../core/nbd/connection.ts";
import type { MemoryExportOptions } from "../core/nbd/memory_export.ts";
import { be32, bytes, goData, option, request, simpleReply } from "./helpers/nbd_raw.ts";
import { PcacheError } from "../core/errors.ts";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

describe("RecvBuffer", () => {
  test("peek/take/skip across chunk boundaries, zero-copy inside one chunk", () => {
    const r = new RecvBuffer();
    const a = Uint8Array.of(1, 2, 3);
    const b = Uint8Array.of(4, 5);
    const c = Uint8Array.of(6, 7, 8, 9);
    r.push(a);
    r.push(new Uint8Array(0));
    r.push(b);
    r.push(c);
    expect(r.length).toBe(9);
    const p = r.peek(2);
    expect(p.bytes).toBe(a); // no copy
    expect([...p.bytes.subarray(p.at, p.at + 2)]).toEqual([1, 2]);
    const q = r.peek(5);
    expect([...q.bytes.subarray(q.at, q.at + 5)]).toEqual([1, 2, 3, 4, 5]);
    expect(r.skip(2)).toBe(2);
    const t = r.take(1);
    expect(t.buffer).toBe(a.buffer); // a view of the chunk
    expect([...t]).toEqual([3]);
    expect([...r.take(4)]).toEqual([4, 5, 6, 7]);
    expect(r.length).toBe(2);
    expect(r.skip(10)).toBe(2);
    expect(r.length).toBe(0);
  });

  test("take() gathers into the allocator's buffer when the bytes span chunks", () => {
    const r = new RecvBuffer();
    for (let i = 0; i < 10; i++) r.push(new Uint8Array(100).fill(i));
    const target = new Uint8Array(250);
    const got = r.take(250, () => target);
    expect(got).toBe(target);
    expect(got[0]).toBe(0);
    expect(got[100]).toBe(1);
    expect(got[249]).toBe(2);
    expect(r.length).toBe(750);
  });

  test("many small chunks: spent chunks are compacted", () => {
    const r = new RecvBuffer();
    for (let i = 0; i < 10_000; i++) {
      r.push(Uint8Array.of(i & 255, 7));
      expect(r.take(2)[0]).toBe(i & 255);
    }
    expect(r.length).toBe(0);
  });
});

describe("RecvBuffer with release_chunks", () => {
  const chunk = (n: number, v: number) => new Uint8Array(n).fill(v);
  const detached = (b: Uint8Array) => (b.buffer as ArrayBuffer).detached;

  test("takeParts: one view inside a chunk, views in order across chunks, nothing copied", () => {
    const r = new RecvBuffer({ release_chunks: true });
    const [a, b, c] = [chunk(10, 1), chunk(10, 2), chunk(10, 3)];
    r.push(a);
    r.push(b);
    r.push(c);
    const one = r.takeParts(4) as Uint8Array;
    expect(one.buffer).toBe(a.buffer);
    expect([...one]).toEqual([1, 1, 1, 1]);
    const parts = r.takeParts(20) as Uint8Array[];
    expect(parts.map((p) => [p.buffer === a.buffer ? "a" : p.buffer === b.buffer ? "b" : "c", p.length])).toEqual([["a", 6], ["b", 10], ["c", 4]]);
    expect(r.length).toBe(6);
    expect((r.takeParts(0) as Uint8Array).length).toBe(0);
  });

  test("a chunk is detached only when it is consumed and every part of it is given back", () => {
    const r = new RecvBuffer({ release_chunks: true });
    const [a, b] = [chunk(8, 1), chunk(8, 2)];
    r.push(a);
    r.push(b);
    const p1 = r.takeParts(6); // a: 2 bytes left unread
    const p2 = r.takeParts(6); // rest of a, and 4 bytes of b
    expect(detached(a)).toBe(false); // parts still out
    r.releaseParts(p1);
    expect(detached(a)).toBe(false); // p2 still holds a
    r.releaseParts(p2);
    expect(detached(a)).toBe(true);
    expect(detached(b)).toBe(false); // 4 unread bytes
    expect(r.skip(4)).toBe(4);
    expect(detached(b)).toBe(true);
  });

  test("take() copies (handshake data outlives its chunk); clear() releases unread chunks", () => {
    const r = new RecvBuffer({ release_chunks: true });
    const a = chunk(4, 9);
    r.push(a);
    const t = r.take(4);
    expect(detached(a)).toBe(true);
    expect([...t]).toEqual([9, 9, 9, 9]);
    const b = chunk(4, 5);
    r.push(b);
    const part = r.takeParts(2);
    r.clear();
    expect(detached(b)).toBe(false); // the part is still out
    expect([...(part as Uint8Array)]).toEqual([5, 5]);
    r.releaseParts(part);
    expect(detached(b)).toBe(true);
  });

  test("the same buffer pushed twice stays until both are consumed", () => {
    const r = new RecvBuffer({ release_chunks: true });
    const a = chunk(4, 3);
    r.push(a);
    r.push(a);
    expect(r.skip(4)).toBe(4);
    expect(detached(a)).toBe(false);
    expect([...r.take(4)]).toEqual([3, 3, 3, 3]);
    expect(detached(a)).toBe(true);
  });

  test("a chunk that is a view of a larger buffer is never detached", () => {
    const r = new RecvBuffer({ release_chunks: true });
    const whole = chunk(16, 7);
    r.push(whole.subarray(0, 8));
    r.push(whole.subarray(8));
    r.releaseParts(r.takeParts(16));
    expect(detached(whole)).toBe(false);
    expect(whole[15]).toBe(7);
  });
});

describe("BufferPool", () => {
  test("small requests are plain allocations; large ones are reused after release", () => {
    const pool = new BufferPool(4 * 65536);
    const small = pool.acquire(100);
    expect(small.length).toBe(100);
    pool.release(small);
    expect(pool.pooled_free_bytes).toBe(0);
    const big = pool.acquire(70_000);
    expect(big.length).toBe(70_000);
    expect(big.buffer.byteLength).toBe(131072);
    pool.release(big.subarray(5000)); // any view of it
    expect(pool.pooled_free_bytes).toBe(131072);
    pool.release(big); // second release ignored
    expect(pool.pooled_free_bytes).toBe(131072);
    const again = pool.acquire(100_000);
    expect(again.buffer).toBe(big.buffer);
    expect(pool.pooled_free_bytes).toBe(0);
  });

  test("size classes: powers of two from 4 KiB to 64 KiB, then multiples of 64 KiB", () => {
    expect([1, 4096, 4097, 4112, 40_000, 65536, 65537, 200_000].map((n) => BufferPool.classBytes(n))).toEqual([
      4096, 4096, 8192, 8192, 65536, 65536, 131072, 262144,
    ]);
    const pool = new BufferPool();
    const reply = pool.acquire(4112); // a 4 KiB READ and its header
    expect(reply.buffer.byteLength).toBe(8192);
    pool.release(reply);
    expect(pool.acquire(5000).buffer).toBe(reply.buffer);
    expect(pool.acquire(4095).buffer.byteLength).toBe(4095); // below 4 KiB: a plain allocation
  });

  test("foreign buffers are never taken in; the free list is capped", () => {
    const pool = new BufferPool(131072);
    pool.release(new Uint8Array(65536 * 4));
    expect(pool.pooled_free_bytes).toBe(0);
    const a = pool.acquire(65536);
    const b = pool.acquire(65536);
    const c = pool.acquire(65536);
    pool.release(a);
    pool.release(b);
    pool.release(c); // over the cap: left to the GC
    expect(pool.pooled_free_bytes).toBe(131072);
  });
});

describe("clipExtents", () => {
  const H = STATE_HOLE | STATE_ZERO;
  test("clips to the request, merges equal neighbours, masks flags", () => {
    expect(clipExtents([{ length: 100, flags: 0 }, { length: 100, flags: 0x80 }, { length: 1000, flags: H }], 500, false)).toEqual([
      { length: 200, flags: 0 },
      { length: 300, flags: H },
    ]);
  });
  test("REQ_ONE returns one extent", () => {
    expect(clipExtents([{ length: 10, flags: H }, { length: 10, flags: 0 }], 20, true)).toEqual([{ length: 10, flags: H }]);
    expect(clipExtents([{ length: 50, flags: H }], 20, true)).toEqual([{ length: 20, flags: H }]);
  });
  test("stops at the first malformed extent; nothing usable => empty", () => {
    expect(clipExtents([{ length: 10, flags: 0 }, { length: 0, flags: 0 }, { length: 10, flags: H }], 30, false)).toEqual([
      { length: 10, flags: 0 },
    ]);
    expect(clipExtents([{ length: -1, flags: 0 }], 30, false)).toEqual([]);
    expect(clipExtents([{ length: 1.5, flags: 0 }], 30, false)).toEqual([]);
    expect(clipExtents(null, 30, false)).toEqual([]);
    expect(clipExtents([], 30, false)).toEqual([]);
  });
  test("caps the number of extents", () => {
    const many = Array.from({ length: BLOCK_STATUS_EXTENTS_MAX + 10 }, (_, i) => ({ length: 1, flags: i & 1 }));
    expect(clipExtents(many, many.length, false).length).toBe(BLOCK_STATUS_EXTENTS_MAX);
  });
});

describe("parseListenAddress", () => {
  test("forms", () => {
    expect(parseListenAddress("tcp://127.0.0.1:10809")).toEqual({ kind: "tcp", host: "127.0.0.1", port: 10809 });
    expect(parseListenAddress("tcp://localhost")).toEqual({ kind: "tcp", host: "localhost", port: 10809 });
    expect(parseListenAddress("0.0.0.0:0")).toEqual({ kind: "tcp", host: "0.0.0.0", port: 0 });
    expect(parseListenAddress("tcp://[::1]:1234")).toEqual({ kind: "tcp", host: "::1", port: 1234 });
    expect(parseListenAddress("tcp://[::1]")).toEqual({ kind: "tcp", host: "::1", port: 10809 });
    expect(parseListenAddress("unix:/run/p.sock")).toEqual({ kind: "unix", path: "/run/p.sock" });
    expect(parseListenAddress("unix:///run/p.sock")).toEqual({ kind: "unix", path: "/run/p.sock" });
    expect(parseListenAddress("fd:3")).toEqual({ kind: "fd", fd: 3 });
  });
  test("bad forms are PcacheErrors with a one-line reason", () => {
    for (const bad of ["tcp://:80", "tcp://h:99999", "tcp://h:x", "unix:", "fd:-1", "fd:x", "tcp://[::1", "tcp://[::1]x"]) {
      expect(() => parseListenAddress(bad)).toThrow(PcacheError);
    }
  });
});

describe("socketActivationFd", () => {
  test("LISTEN_PID must be ours and LISTEN_FDS >= 1; variables are removed", () => {
    const env: Record<string, string | undefined> = { LISTEN_PID: "42", LISTEN_FDS: "1", LISTEN_FDNAMES: "x" };
    expect(socketActivationFd(env, 42)).toBe(3);
    expect(env.LISTEN_PID).toBeUndefined();
    expect(env.LISTEN_FDNAMES).toBeUndefined();
    expect(socketActivationFd({ LISTEN_PID: "41", LISTEN_FDS: "1" }, 42)).toBeNull();
    expect(socketActivationFd({ LISTEN_PID: "42", LISTEN_FDS: "0" }, 42)).toBeNull();
    expect(socketActivationFd({}, 42)).toBeNull();
    const keep: Record<string, string | undefined> = { LISTEN_PID: "42", LISTEN_FDS: "2" };
    expect(socketActivationFd(keep, 42, false)).toBe(3);
    expect(keep.LISTEN_PID).toBe("42");
  });
});

describe("MemoryExport", () => {
  test("sparse: reads of holes are zero, block status merges, trim/zero behave", async () => {
    const m = new MemoryExport({ size_bytes: 1 << 20 });
    expect(m.allocated_bytes).toBe(0);
    await m.write(65536 + 10, new Uint8Array(20).fill(7), false);
    expect(m.allocated_bytes).toBe(65536);
    const dst = new Uint8Array(100).fill(9);
    await m.read(65536, 100, dst);
    expect(dst[9]).toBe(0);
    expect(dst[10]).toBe(7);
    expect(await m.blockStatus(0, 1 << 20)).toEqual([
      { length: 65536, flags: 3 },
      { length: 65536, flags: 0 },
      { length: (1 << 20) - 131072, flags: 3 },
    ]);
    await m.writeZeroes(65536, 65536, { fua: false, no_hole: true, fast_zero: false });
    expect(m.allocated_bytes).toBe(65536);
    expect(m.peek(65536, 65536).every((b) => b === 0)).toBe(true);
    await m.trim(0, 1 << 20, false);
    expect(m.allocated_bytes).toBe(0);
  });

  test("fast_zero: false => ENOTSUP; fail knob carries errno", async () => {
    const m = new MemoryExport({ size_bytes: 1 << 20, fast_zero: false, fail: (op) => (op === "flush" ? 5 : undefined) });
    await expect(m.writeZeroes(0, 10, { fua: false, no_hole: false, fast_zero: true })).rejects.toMatchObject({ errno: 95 });
    await expect(m.flush()).rejects.toMatchObject({ errno: 5 });
    expect(m.inflight_now).toBe(0);
  });
});

describe("NbdServer lifecycle", () => {
  const quiet = () => {};

  test("a live unix socket is not stolen; a stale one is replaced; the file goes away on stop", async () => {
    const dir = mkdtempSync(join(tmpdir(), "nbd-life-"));
    const path = join(dir, "s.sock");
    try {
      const a = new NbdServer({ export: new MemoryExport({ size_bytes: 4096 }), log: quiet });
      await a.listen(`unix:${path}`);
      const b = new NbdServer({ export: new MemoryExport({ size_bytes: 4096 }), log: quiet });
      await expect(b.listen(`unix:${path}`)).rejects.toThrow(/in use/);
      await a.stop();
      expect(existsSync(path)).toBe(false);
      await expect(a.listen(`unix:${path}`)).rejects.toThrow(/stopping/);
      await a.stop(); // idempotent
      // A stale socket file (bound by a process that is gone, nobody listening) is replaced.
      const bind = Bun.spawnSync(["/usr/bin/python3", "-c", `import socket; socket.socket(socket.AF_UNIX).bind(${JSON.stringify(path)})`]);
      expect(bind.exitCode).toBe(0);
      expect(existsSync(path)).toBe(true);
      await b.listen(`unix:${path}`);
      await b.stop();
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test("TCP: port 0 gets a real port; a busy port is a clear error", async () => {
    const a = new NbdServer({ export: new MemoryExport({ size_bytes: 4096 }), log: quiet });
    const info = await a.listen("tcp://127.0.0.1:0");
    expect(info.kind === "tcp" && info.port > 0).toBe(true);
    const b = new NbdServer({ export: new MemoryExport({ size_bytes: 4096 }), log: quiet });
    const port = info.kind === "tcp" ? info.port : 0;
    await expect(b.listen(`tcp://127.0.0.1:${port}`)).rejects.toThrow(PcacheError);
    await a.stop();
    await b.stop();
  });

  test("constructor refuses bad configuration with PcacheError", () => {
    const ex = new MemoryExport({ size_bytes: 4096 });
    expect(() => new NbdServer({ export: ex, export_name: "x".repeat(5000), log: quiet })).toThrow(PcacheError);
    expect(() => new NbdServer({ export: ex, block_size_preferred: 1000, log: quiet })).toThrow(PcacheError);
    expect(() => new NbdServer({ export: { ...ex, size_bytes: -1 } as never, log: quiet })).toThrow(PcacheError);
  });
});

describe("NbdConnection over a recording socket", () => {
  const hex = (b: Uint8Array) => Buffer.from(b).toString("hex");

  /**
   * A connection in transmission phase whose socket records every write. `room.bytes` is what the
   * socket takes before it is full (a client that does not read its replies).
   */
  function connected(memory: Partial<MemoryExportOptions>) {
    const exp = new MemoryExport({ size_bytes: 1 << 20, ...memory });
    const writes: Uint8Array[] = [];
    const room = { bytes: Number.POSITIVE_INFINITY, paused: false };
    const socket: NbdSocket = {
      write: (d) => {
        const n = Math.min(d.length, room.bytes);
        room.bytes -= n;
        if (n > 0) writes.push(d.slice(0, n)); // the connection reuses its staging buffer
        return n;
      },
      end: () => {},
      pause: () => (room.paused = true),
      resume: () => (room.paused = false),
    };
    const load = { inflight: 0, pipelined: 0 };
    const conn = new NbdConnection(socket, {
      config: { name: "pc", description: "", export: exp, block_size_preferred: 4096 },
      limits: DEFAULT_CONNECTION_LIMITS,
      log: () => {},
      label: "test",
      read_pool: new BufferPool(),
      busy_poll: null,
      is_only_connection: () => true,
      load,
    });
    conn.start();
    conn.onData(bytes(be32(W.FLAG_C_FIXED_NEWSTYLE | W.FLAG_C_NO_ZEROES)));
    conn.onData(option(W.OPT_GO, goData("pc")));
    expect(conn.in_transmission).toBe(true);
    writes.length = 0;
    return { exp, conn, writes, load, room };
  }

  /** Twenty 512-byte WRITEs, then twenty READs of them, in one received chunk. */
  function burst(): Uint8Array {
    const reqs: Uint8Array[] = [];
    for (let i = 0; i < 20; i++) reqs.push(request(W.CMD_WRITE, 0, i, i * 512, 512, new Uint8Array(512).fill(i + 1)));
    for (let i = 0; i < 20; i++) reqs.push(request(W.CMD_READ, 0, 100 + i, i * 512, 512));
    return bytes(...reqs);
  }

  function expectedReplies(): Uint8Array {
    const parts: Uint8Array[] = [];
    for (let i = 0; i < 20; i++) parts.push(simpleReply(0, i));
    for (let i = 0; i < 20; i++) parts.push(simpleReply(0, 100 + i), new Uint8Array(512).fill(i + 1));
    return bytes(...parts);
  }

  test("an export that finishes at once: every reply to one chunk is written before onData returns, in one write, in order", () => {
    const { exp, conn, writes, load } = connected({ synchronous: true });
    conn.onData(burst());
    expect(writes.length).toBe(1);
    expect(hex(writes[0]!)).toBe(hex(expectedReplies()));
    expect(exp.stats.write).toBe(20);
    expect(conn.requests_in_flight).toBe(0);
    expect(load.inflight).toBe(0);
    // Every request but the last had more bytes behind it: the client keeps a queue.
    expect(load.pipelined).toBe(39);
  });

  test("an export that finishes later: the same replies, batched once the requests complete", async () => {
    const { conn, writes } = connected({});
    conn.onData(burst());
    expect(writes.length).toBe(0);
    for (let i = 0; i < 50 && conn.requests_in_flight > 0; i++) await Bun.sleep(1);
    await Bun.sleep(5);
    expect(hex(bytes(...writes))).toBe(hex(expectedReplies()));
    expect(writes.length).toBeLessThanOrEqual(2);
  });

  test("a client that does not read its replies: parsing stops at the reply-queue cap, and resumes on drain", () => {
    const { exp, conn, writes, room } = connected({ synchronous: true, size_bytes: 64 << 20 });
    room.bytes = 0;
    const len = 1 << 20;
    const reply_bytes = 16 + len;
    const n = 40;
    conn.onData(bytes(...Array.from({ length: n }, (_, i) => request(W.CMD_READ, 0, i, 0, len))));
    // Requests are taken until the queued replies reach the cap (16 MiB): 16 of them. The rest
    // stay unparsed in the receive buffer and the socket is paused.
    const cap = DEFAULT_CONNECTION_LIMITS.write_queue_bytes_max;
    expect(exp.stats.read).toBe(Math.ceil(cap / reply_bytes));
    expect(room.paused).toBe(true);
    expect(writes.length).toBe(0);
    let out = 0;
    for (let round = 0; round < 200 && out < n * reply_bytes; round++) {
      room.bytes = 3 * len;
      conn.onDrain();
      out = writes.reduce((a, w) => a + w.length, 0);
      // Never more than the cap queued plus one request's reply.
      expect(exp.stats.read * reply_bytes - out).toBeLessThanOrEqual(cap + reply_bytes);
    }
    const got = bytes(...writes);
    expect(got.length).toBe(n * reply_bytes);
    for (let i = 0; i < n; i++) expect(hex(got.subarray(i * reply_bytes, i * reply_bytes + 16))).toBe(hex(simpleReply(0, i)));
    expect(exp.stats.read).toBe(n);
    expect(room.paused).toBe(false);
  });

  test("a synchronous failure is an error reply for that request only", () => {
    const { conn, writes } = connected({ synchronous: true, fail: (op, off) => (op === "write" && off === 512 ? 5 : undefined) });
    conn.onData(bytes(...[0, 1, 2].map((i) => request(W.CMD_WRITE, 0, i, i * 512, 512, new Uint8Array(512)))));
    expect(writes.length).toBe(1);
    const errno = new DataView(writes[0]!.buffer).getUint32(16 + 4, false);
    expect(hex(writes[0]!.subarray(0, 16))).toBe(hex(simpleReply(0, 0)));
    expect(errno).toBe(W.NBD_EIO);
    expect(hex(writes[0]!.subarray(32, 48))).toBe(hex(simpleReply(0, 2)));
    expect(writes[0]!.length).toBe(48);
  });
});
