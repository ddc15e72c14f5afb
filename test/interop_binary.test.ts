/**
 * Real clients against the compiled binary (`dist/pcache serve`), as a user runs them: nbdinfo,
 * qemu-img, qemu-io, nbdcopy, nbdsh (strict mode off, invalid requests), fio's nbd engine with
 * crc32c verify; restart persistence after SIGKILL (flushed data, FUA data, another connection's
 * writes made durable by a FLUSH, fio's verify pass), a read-only export, the connection cap, TCP.
 * test/nbd_clients.test.ts covers the same clients against the NBD layer in-process; this file
 * proves the shipped program.
 *
 * Every test checks bytes read back or error codes returned. Each tool's tests skip (loudly) when
 * the tool is missing.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { randomBytes } from "node:crypto";
import { closeSync, ftruncateSync, openSync, readFileSync, rmSync, writeFileSync, writeSync } from "node:fs";
import { join } from "node:path";
import type { FileSink } from "bun";
import {
  drain,
  formatCache,
  have,
  killAll,
  ok,
  requireBinary,
  run,
  sparseFile,
  spawnTracked,
  startServe,
  tempDir,
  waitExit,
  type RunResult,
  type ServeHandle,
} from "./helpers/serve_binary.ts";

const MiB = 1024 * 1024;
const EXPORT_BYTES = 64 * MiB;
const HAVE = {
  nbdinfo: have("nbdinfo"),
  nbdsh: have("nbdsh"),
  nbdcopy: have("nbdcopy"),
  qemu_io: have("qemu-io"),
  qemu_img: have("qemu-img"),
  fio: have("fio"),
};
const when = (ok: boolean) => (ok ? test : test.skip);

let dir = "";
beforeAll(() => {
  requireBinary();
  dir = tempDir("pcache-interop-");
});
afterAll(async () => {
  await killAll();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

interface Served {
  s: ServeHandle;
  cache: string;
  backing: string;
  /** Restarts on the same files and socket (the uri stays the same). */
  restart(): Promise<void>;
}

/** A formatted 512 MiB cache in front of a sparse backing file, served on its own socket. */
async function serve(
  name: string,
  args: string[] = [],
  opts: { tcp?: boolean; backing_bytes?: number; fill_backing?: (path: string) => void } = {},
): Promise<Served> {
  const cache = join(dir, `${name}-cache.img`);
  const backing = join(dir, `${name}-backing.img`);
  await formatCache(cache);
  await sparseFile(backing, opts.backing_bytes ?? EXPORT_BYTES);
  opts.fill_backing?.(backing);
  const start = () => startServe({ cache, backing, dir, socket_name: `${name}.sock`, tcp: opts.tcp, args });
  const served: Served = {
    s: await start(),
    cache,
    backing,
    restart: async () => {
      served.s = await start();
    },
  };
  return served;
}

/** qemu-io reports a failed command on its output and may still exit 0. */
function qemuIoClean(r: RunResult): void {
  expect(r.code).toBe(0);
  expect(r.stdout + r.stderr).not.toMatch(/Pattern verification failed|failed|error|Error/);
}

function qemuIo(uri: string, cmds: string[], extra: string[] = []): Promise<RunResult> {
  return run(["qemu-io", "-f", "raw", ...extra, uri, ...cmds.flatMap((c) => ["-c", c])]);
}

/** A sparse raw image: random data in a few regions, holes between; returns its bytes. */
function makeImage(path: string, length_bytes: number): Uint8Array {
  const img = new Uint8Array(length_bytes);
  const regions: Array<[number, number]> = [
    [0, 4096],
    [1 * MiB + 512, 300 * 1024],
    [5 * MiB, 3 * MiB],
    [40 * MiB + 12345, 777 * 1024],
    [length_bytes - 8192, 8192],
  ];
  const fd = openSync(path, "w");
  ftruncateSync(fd, length_bytes);
  for (const [off, len] of regions) {
    img.set(randomBytes(len), off);
    writeSync(fd, img, off, len, off);
  }
  closeSync(fd);
  return img;
}

function sameFile(path: string, want: Uint8Array): boolean {
  return Buffer.from(readFileSync(path)).equals(Buffer.from(want));
}

/** Runs a python script with nbdsh; it must print OK. */
async function nbdsh(script: string, uri: string | null, timeout_ms = 60_000): Promise<void> {
  const path = join(dir, `script-${Date.now()}-${Math.random().toString(36).slice(2)}.py`);
  writeFileSync(path, script);
  const connect = uri === null ? [] : ["-u", uri];
  const r = await ok(["nbdsh", ...connect, "-c", `exec(open(${JSON.stringify(path)}).read())`], timeout_ms);
  expect(r.stdout).toContain("OK");
}

/** fio's JSON output follows a "connected" line; any verify complaint makes it exit non-zero. */
function fioJobs(r: RunResult): Array<{ error: number; write: { io_bytes: number }; read: { io_bytes: number } }> {
  return JSON.parse(r.stdout.slice(r.stdout.indexOf("{"))).jobs;
}

// ===========================================================================================
describe("one export on a unix socket", () => {
  let x: Served;
  beforeAll(async () => {
    x = await serve("main");
  });

  when(HAVE.nbdinfo)("nbdinfo: size, flags, --list, --json, default and unknown export names", async () => {
    const uri = x.s.uri;
    const plain = await ok(["nbdinfo", uri]);
    expect(plain.stdout).toContain(`export-size: ${EXPORT_BYTES}`);
    for (const f of ["can_flush: true", "can_fua: true", "can_trim: true", "can_zero: true", "can_fast_zero: true",
      "can_cache: true", "can_df: true", "can_multi_conn: true", "is_read_only: false"]) {
      expect(plain.stdout).toContain(f);
    }
    expect((await ok(["nbdinfo", "--size", uri])).stdout.trim()).toBe(String(EXPORT_BYTES));
    const j = JSON.parse((await ok(["nbdinfo", "--json", uri])).stdout);
    expect(j.protocol).toBe("newstyle-fixed");
    const e = j.exports[0];
    expect(e["export-name"]).toBe("pcache");
    expect(e["export-size"]).toBe(EXPORT_BYTES);
    expect(e.contexts).toEqual(["base:allocation"]);
    expect(e.block_size_minimum).toBe(1);
    expect(e.block_size_maximum).toBe(32 * MiB);
    const root_uri = uri.replace("/pcache?", "/?");
    const list = JSON.parse((await ok(["nbdinfo", "--list", "--json", root_uri])).stdout);
    expect(list.exports.map((v: { "export-name": string }) => v["export-name"])).toEqual(["pcache"]);
    expect((await ok(["nbdinfo", "--list", root_uri])).stdout).toContain('export="pcache"');
    // The default export "" is the same export; an unknown name is refused.
    expect((await ok(["nbdinfo", "--size", root_uri])).stdout.trim()).toBe(String(EXPORT_BYTES));
    expect((await run(["nbdinfo", uri.replace("/pcache?", "/nope?")])).code).not.toBe(0);
  }, 30_000);

  when(HAVE.qemu_img && HAVE.qemu_io)("qemu-img: info, convert in over old data, compare, SIGKILL + restart, compare, convert out", async () => {
    const src = join(dir, "qimg-src.img");
    const out = join(dir, "qimg-out.img");
    const img = makeImage(src, EXPORT_BYTES);
    const info = JSON.parse((await ok(["qemu-img", "info", "--output=json", "-f", "raw", x.s.uri])).stdout);
    expect(info["virtual-size"]).toBe(EXPORT_BYTES);
    // Old data everywhere first, so the image's holes must become zeroes on the export.
    qemuIoClean(await qemuIo(x.s.uri, ["write -P 0x99 0 64M"]));
    await ok(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, x.s.uri]);
    expect((await ok(["qemu-img", "compare", "-f", "raw", "-F", "raw", src, x.s.uri])).stdout).toContain("Images are identical");

    // convert ends with a FLUSH: everything must come back after a crash of the server.
    expect(await x.s.stop("SIGKILL")).toBeNull();
    await x.restart();
    expect((await ok(["qemu-img", "compare", "-f", "raw", "-F", "raw", src, x.s.uri])).stdout).toContain("Images are identical");
    await ok(["qemu-img", "convert", "-f", "raw", "-O", "raw", x.s.uri, out]);
    expect(sameFile(out, img)).toBe(true);
    expect((await ok(["qemu-img", "compare", "-f", "raw", "-F", "raw", src, out])).stdout).toContain("Images are identical");
    // compare does notice a difference (so "identical" above means something).
    qemuIoClean(await qemuIo(x.s.uri, ["write -P 0x01 30M 512"]));
    const diff = await run(["qemu-img", "compare", "-f", "raw", "-F", "raw", src, x.s.uri]);
    expect(diff.code).toBe(1);
    expect(diff.stdout).toContain(`Content mismatch at offset ${30 * MiB}`);
  }, 60_000);

  when(HAVE.qemu_io)("qemu-io: writes with and without FUA, reads, discard and write-zeroes read back as zeroes", async () => {
    const uri = x.s.uri;
    const base = 8 * MiB;
    // Default cache mode (writethrough): every write carries FUA.
    qemuIoClean(await qemuIo(uri, [`write -P 0xab ${base} 64k`, `read -P 0xab ${base} 64k`]));
    // writeback: FUA only on -f.
    qemuIoClean(await qemuIo(uri, [
      `write -P 0xcd ${base + 64 * 1024} 64k`,
      `write -f -P 0xce ${base + 128 * 1024} 64k`,
      `read -P 0xab ${base} 64k`,
      `read -P 0xcd ${base + 64 * 1024} 64k`,
      `read -P 0xce ${base + 128 * 1024} 64k`,
    ], ["-t", "writeback"]));
    // Unaligned, sub-block I/O is read-modify-write inside the server.
    qemuIoClean(await qemuIo(uri, [`write -P 0x17 ${base + 1000} 1000`, `read -P 0x17 ${base + 1000} 1000`, `read -P 0xab ${base} 1000`, `read -P 0xab ${base + 2000} 4096`]));
    // Trim and zero are logged as zero keys: later reads return zeroes, neighbours are intact.
    qemuIoClean(await qemuIo(uri, [
      `discard ${base} 64k`,
      `write -z ${base + 64 * 1024} 32k`,
      `write -z -u ${base + 96 * 1024} 32k`,
      `read -P 0 ${base} 128k`,
      `read -P 0xce ${base + 128 * 1024} 64k`,
    ]));
    // A wrong expectation is reported (the checks above can fail).
    const wrong = await qemuIo(uri, [`read -P 0xce ${base} 4k`]);
    expect(wrong.stdout + wrong.stderr).toContain("Pattern verification failed");
  }, 30_000);

  when(HAVE.qemu_io)("a FUA write (qemu-io write -f, no flush) survives SIGKILL of the server", async () => {
    // qemu-io flushes when it closes the image, so it stays open (commands on stdin) while the
    // server is killed: only the FUA bit can have made the write durable.
    const qio = spawnTracked(["qemu-io", "-f", "raw", "-t", "writeback", x.s.uri], { stdin: "pipe" });
    let out = "";
    let wrote: () => void = () => {};
    const done = new Promise<void>((resolve) => (wrote = resolve));
    void drain(qio.proc.stdout as ReadableStream<Uint8Array>, (chunk) => {
      out += chunk;
      if (out.includes(`wrote 65536/65536 bytes at offset ${20 * MiB}`)) wrote();
    });
    const stdin = qio.proc.stdin as FileSink;
    stdin.write(`write -f -P 0x5a ${20 * MiB} 64k\n`);
    stdin.flush();
    let timer: Timer | undefined;
    const waited = await Promise.race([done.then(() => "wrote"), new Promise((r) => (timer = setTimeout(() => r("timeout"), 20_000)))]);
    clearTimeout(timer);
    expect(waited, `qemu-io output: ${out} ${qio.stderr()}`).toBe("wrote");
    expect(await x.s.stop("SIGKILL")).toBeNull();
    qio.proc.kill("SIGKILL");
    await waitExit(qio.proc, 10_000);
    await x.restart();
    qemuIoClean(await qemuIo(x.s.uri, [`read -P 0x5a ${20 * MiB} 64k`]));
  }, 60_000);

  when(HAVE.nbdsh)("multi-conn durability: a FLUSH on one connection keeps another connection's writes through SIGKILL", async () => {
    // The script kills the server itself right after the flush reply, with the writing
    // connection still open, so nothing but that FLUSH can have made the writes durable.
    await nbdsh(`
import nbd, os, signal
uri = ${JSON.stringify(x.s.uri)}
M = 1024 * 1024
w = nbd.NBD(); w.connect_uri(uri)
f = nbd.NBD(); f.connect_uri(uri)
for i in range(48):
    w.pwrite(bytes([i + 1]) * 65536, i * M + 4096)
f.flush()
os.kill(${x.s.proc.pid}, signal.SIGKILL)
print("OK")
`, null);
    expect(await x.s.stop("SIGKILL")).toBeNull();
    await x.restart();
    await nbdsh(`
M = 1024 * 1024
lost = [i for i in range(48) if h.pread(65536, i * M + 4096) != bytes([i + 1]) * 65536]
assert lost == [], "writes lost after the flush: %r" % lost
print("OK")
`, x.s.uri);
  }, 60_000);

  when(HAVE.nbdcopy && HAVE.nbdinfo)("nbdcopy in and out with 4 connections (multi-conn)", async () => {
    const src = join(dir, "copy-src.img");
    const out = join(dir, "copy-out.img");
    const img = makeImage(src, EXPORT_BYTES);
    // --threads: nbdcopy never opens more connections than threads (default: one per core).
    const into = await ok(["nbdcopy", "-v", "--connections=4", "--threads=4", "--flush", src, x.s.uri]);
    expect(into.stderr).toContain("connections=4");
    writeFileSync(out, new Uint8Array(0));
    const back = await ok(["nbdcopy", "-v", "--connections=4", "--threads=4", x.s.uri, out]);
    expect(back.stderr).toContain("connections=4");
    expect(sameFile(out, img)).toBe(true);
  }, 60_000);

  when(HAVE.nbdsh)("nbdsh, strict mode off: invalid requests get their error and the connection stays usable", async () => {
    await nbdsh(`
import errno, nbd
h.set_strict_mode(0)
size = h.get_size()
M = 1024 * 1024
def expect_err(what, fn, code):
    try:
        fn()
    except nbd.Error as e:
        assert e.errnum == code, "%s: got %r (%s), want %d" % (what, e.errnum, e, code)
        return
    raise AssertionError("%s: no error" % what)
# Out of range.
expect_err("read past the end", lambda: h.pread(512, size), errno.EINVAL)
expect_err("read straddling the end", lambda: h.pread(512, size - 256), errno.EINVAL)
expect_err("read at offset 2^63", lambda: h.pread(512, 2 ** 63), errno.EINVAL)
expect_err("zero-length read past the end", lambda: h.pread(0, size + 1), errno.EINVAL)
expect_err("write past the end", lambda: h.pwrite(b"x" * 512, size - 1), errno.ENOSPC)
expect_err("trim past the end", lambda: h.trim(8192, size - 4096), errno.EINVAL)
expect_err("zero past the end", lambda: h.zero(8192, size), errno.ENOSPC)
expect_err("cache past the end", lambda: h.cache(4096, size), errno.EINVAL)
# Too big for one request (max payload 32 MiB); the server consumes the payload and carries on.
expect_err("read over 32 MiB", lambda: h.pread(32 * M + 512, 0), errno.EINVAL)
expect_err("write over 32 MiB", lambda: h.pwrite(bytes(32 * M + 512), 0), errno.EINVAL)
# Flags the server did not advertise or that the command does not take.
expect_err("read with an unknown flag", lambda: h.pread(512, 0, 0x40), errno.EINVAL)
expect_err("write with PAYLOAD_LEN (no extended headers)", lambda: h.pwrite(b"a" * 512, 0, 0x20), errno.EINVAL)
expect_err("read with REQ_ONE", lambda: h.pread(512, 0, nbd.CMD_FLAG_REQ_ONE), errno.EINVAL)
expect_err("write with NO_HOLE", lambda: h.pwrite(b"a" * 512, 0, nbd.CMD_FLAG_NO_HOLE), errno.EINVAL)
expect_err("trim with FAST_ZERO", lambda: h.trim(512, 0, nbd.CMD_FLAG_FAST_ZERO), errno.EINVAL)
expect_err("zero with DF", lambda: h.zero(512, 0, nbd.CMD_FLAG_DF), errno.EINVAL)
expect_err("flush with DF", lambda: h.flush(nbd.CMD_FLAG_DF), errno.EINVAL)
expect_err("block status without a meta context", lambda: h.block_status(4096, 0, lambda *a: 0), errno.EINVAL)
# Zero-length requests inside the export succeed and change nothing.
h.pwrite(b"\\x42" * 4096, 12 * M)
assert h.pread(0, 12 * M) == b""
h.pwrite(b"", 12 * M)
h.trim(0, 12 * M)
h.zero(0, 12 * M)
h.cache(0, 12 * M)
assert h.pread(0, size) == b""
assert h.pread(4096, 12 * M) == b"\\x42" * 4096
# FUA on a read must be accepted; unaligned I/O works.
assert h.pread(4096, 12 * M, nbd.CMD_FLAG_FUA) == b"\\x42" * 4096
h.pwrite(b"\\x33" * 777, 12 * M + 12345)
assert h.pread(777, 12 * M + 12345) == b"\\x33" * 777
assert h.pread(12345, 12 * M) == b"\\x42" * 4096 + bytes(12345 - 4096)
# DF needs structured replies; without them it is refused.
s = nbd.NBD()
s.set_strict_mode(0)
s.set_request_structured_replies(False)
s.connect_uri(h.get_uri())
assert not s.get_structured_replies_negotiated()
expect_err("DF without structured replies", lambda: s.pread(512, 0, nbd.CMD_FLAG_DF), errno.EINVAL)
assert s.pread(4096, 12 * M) == b"\\x42" * 4096
s.shutdown()
# CAN_MULTI_CONN: a write on one connection, a flush on another, a read on a third sees it.
h2 = nbd.NBD(); h2.connect_uri(h.get_uri())
h3 = nbd.NBD(); h3.connect_uri(h.get_uri())
h2.pwrite(b"\\xaa" * 4096, 13 * M)
h3.flush()
assert h.pread(4096, 13 * M) == b"\\xaa" * 4096
h2.shutdown(); h3.shutdown()
h.shutdown()
print("OK")
`, x.s.uri);
  }, 60_000);

  when(HAVE.fio)("fio randwrite 4k..64k with crc32c verify; after SIGKILL + restart a verify-only pass still matches", async () => {
    const job = ["fio", "--name=pcache", "--ioengine=nbd", `--uri=${x.s.uri}`, "--rw=randwrite", "--bsrange=4k-64k",
      "--size=64M", "--iodepth=16", "--verify=crc32c", "--verify_fatal=1", "--verify_state_save=0", "--output-format=json"];
    const first = fioJobs(await ok([...job, "--do_verify=1", "--end_fsync=1"], 120_000))[0]!;
    expect(first.error).toBe(0);
    expect(first.write.io_bytes).toBe(EXPORT_BYTES);
    expect(first.read.io_bytes).toBe(EXPORT_BYTES); // the verify pass
    expect(await x.s.stop("SIGKILL")).toBeNull();
    await x.restart();
    // Same options and seed: fio regenerates the same blocks and checks every one.
    const again = fioJobs(await ok([...job, "--verify_only"], 120_000))[0]!;
    expect(again.error).toBe(0);
    expect(again.read.io_bytes).toBe(EXPORT_BYTES);
    // One overwritten block makes the verify-only pass fail.
    qemuIoClean(await qemuIo(x.s.uri, ["write -P 0x11 0 4k"]));
    const bad = await run([...job, "--verify_only"], 120_000);
    expect(bad.code).not.toBe(0);
    expect(bad.stdout + bad.stderr).toMatch(/verify: bad/);
  }, 120_000);

  when(HAVE.fio)("fio: four jobs on four connections, each verifying its own 16 MiB", async () => {
    const r = await ok(["fio", "--name=multi", "--ioengine=nbd", `--uri=${x.s.uri}`, "--rw=randwrite", "--bs=16k",
      "--numjobs=4", "--size=16M", "--offset_increment=16M", "--iodepth=8", "--verify=crc32c", "--do_verify=1",
      "--verify_fatal=1", "--verify_state_save=0", "--output-format=json"], 120_000);
    const jobs = fioJobs(r);
    expect(jobs.length).toBe(4);
    for (const j of jobs) {
      expect(j.error).toBe(0);
      expect(j.write.io_bytes).toBe(16 * MiB);
      expect(j.read.io_bytes).toBe(16 * MiB);
    }
  }, 120_000);
});

// ===========================================================================================
describe("a read-only export", () => {
  when(HAVE.nbdsh && HAVE.nbdinfo)("advertises READ_ONLY, serves the backing data, refuses writes with EPERM", async () => {
    // The backing file holds data before the server starts: reads are cache misses.
    const fill = (path: string) => {
      const fd = openSync(path, "r+");
      writeSync(fd, new Uint8Array(MiB).fill(0x77), 0, MiB, 0);
      closeSync(fd);
    };
    const x = await serve("ro", ["--read-only"], { backing_bytes: 16 * MiB, fill_backing: fill });
    const j = JSON.parse((await ok(["nbdinfo", "--json", x.s.uri])).stdout).exports[0];
    expect(j.is_read_only).toBe(true);
    await nbdsh(`
import errno, nbd
h.set_strict_mode(0)
assert h.is_read_only()
def expect_err(what, fn, code):
    try:
        fn()
    except nbd.Error as e:
        assert e.errnum == code, "%s: got %r (%s), want %d" % (what, e.errnum, e, code)
        return
    raise AssertionError("%s: no error" % what)
assert h.pread(4096, 0) == b"\\x77" * 4096
expect_err("write", lambda: h.pwrite(b"x" * 4096, 0), errno.EPERM)
expect_err("write FUA", lambda: h.pwrite(b"x" * 4096, 0, nbd.CMD_FLAG_FUA), errno.EPERM)
expect_err("trim", lambda: h.trim(4096, 0), errno.EPERM)
expect_err("zero", lambda: h.zero(4096, 0), errno.EPERM)
h.flush()
assert h.pread(4096, 0) == b"\\x77" * 4096
h.shutdown()
print("OK")
`, x.s.uri);
    expect(await x.s.stop("SIGTERM")).toBe(0);
    const backing = readFileSync(x.backing);
    expect(backing.subarray(0, MiB).every((b) => b === 0x77)).toBe(true);
    expect(backing.subarray(MiB).every((b) => b === 0)).toBe(true);
  }, 30_000);
});

// ===========================================================================================
describe("the connection cap", () => {
  when(HAVE.nbdsh)("--max-connections 2: a third connection is refused, the two open ones keep working, a freed slot is reused", async () => {
    const x = await serve("cap", ["--max-connections", "2"], { backing_bytes: 16 * MiB });
    await nbdsh(`
import nbd, time
uri = ${JSON.stringify(x.s.uri)}
def connect():
    c = nbd.NBD()
    c.connect_uri(uri)
    return c
a = connect()
b = connect()
try:
    c = connect()
    c.pread(512, 0)
    raise AssertionError("a third connection was served")
except nbd.Error:
    pass
a.pwrite(b"\\x61" * 4096, 0)
a.flush()
assert b.pread(4096, 0) == b"\\x61" * 4096
a.shutdown()
del a  # frees the handle, which closes its socket
# The server sees the close asynchronously: retry for a bounded time.
d = None
for attempt in range(100):
    try:
        d = connect()
        break
    except nbd.Error:
        time.sleep(0.1)
assert d is not None, "no connection accepted after one closed"
assert d.pread(4096, 0) == b"\\x61" * 4096
d.shutdown(); b.shutdown()
print("OK")
`, null);
    expect(await x.s.stop("SIGTERM")).toBe(0);
  }, 60_000);
});

// ===========================================================================================
describe("TCP on loopback", () => {
  when(HAVE.nbdinfo && HAVE.qemu_io)("nbdinfo --list and qemu-io over nbd://127.0.0.1:PORT/pcache", async () => {
    const x = await serve("tcp", [], { tcp: true, backing_bytes: 16 * MiB });
    expect(x.s.uri).toMatch(/^nbd:\/\/127\.0\.0\.1:\d+\/pcache$/);
    const list = JSON.parse((await ok(["nbdinfo", "--list", "--json", x.s.uri.replace(/\/pcache$/, "/")])).stdout);
    expect(list.exports[0]["export-name"]).toBe("pcache");
    expect(list.exports[0]["export-size"]).toBe(16 * MiB);
    qemuIoClean(await qemuIo(x.s.uri, ["write -P 0x3c 1M 1M", "flush", "read -P 0x3c 1M 1M", "read -P 0 0 1M"]));
    expect(await x.s.stop("SIGTERM")).toBe(0);
  }, 30_000);
});
