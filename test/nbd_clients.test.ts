/**
 * Real NBD clients (libnbd's nbdinfo/nbdsh/nbdcopy, qemu-io/qemu-img, fio's nbd engine)
 * against the NBD server running in this process over a MemoryExport, on a unix socket and
 * on TCP; plus stdin mode and socket activation with the server in a child process.
 *
 * Clients run as child processes through Bun.spawn (never a sync spawn: the server shares
 * this event loop). Every child has a timeout and is killed in afterAll.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import type { Subprocess } from "bun";
import { mkdtempSync, rmSync, writeFileSync, readFileSync, openSync, writeSync, closeSync, ftruncateSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { startTestServer, type TestServer } from "./helpers/nbd_raw.ts";

const MiB = 1024 * 1024;
// Debian's nbdsh runs `python3` from PATH and needs the system one (with the nbd module).
const ENV = { ...process.env, PATH: `/usr/bin:/bin:${process.env.PATH ?? ""}`, LIBNBD_DEBUG: "0" };
const BUN = process.execPath;
const SERVE_HELPER = join(import.meta.dir, "helpers", "nbd_serve_memory.ts");

function have(bin: string): boolean {
  const found = Bun.which(bin, { PATH: ENV.PATH }) !== null;
  if (!found) {
    console.warn(`\n!!!!! SKIPPING tests that need "${bin}": it is not installed on this machine !!!!!\n`);
  }
  return found;
}
const HAVE = {
  nbdinfo: have("nbdinfo"),
  nbdsh: have("nbdsh"),
  nbdcopy: have("nbdcopy"),
  qemu_io: have("qemu-io"),
  qemu_img: have("qemu-img"),
  fio: have("fio"),
};
const when = (ok: boolean) => (ok ? test : test.skip);

const children = new Set<Subprocess>();
afterAll(() => {
  for (const p of children) p.kill("SIGKILL");
  children.clear();
});

interface RunResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

async function run(argv: string[], timeout_ms = 60_000): Promise<RunResult> {
  const p = Bun.spawn(argv, { stdout: "pipe", stderr: "pipe", stdin: "ignore", env: ENV });
  children.add(p);
  const timer = setTimeout(() => p.kill("SIGKILL"), timeout_ms);
  try {
    const [stdout, stderr, code] = await Promise.all([
      new Response(p.stdout).text(),
      new Response(p.stderr).text(),
      p.exited,
    ]);
    return { code, stdout, stderr };
  } finally {
    clearTimeout(timer);
    children.delete(p);
  }
}

/** Runs and requires exit 0, showing the output when it fails. */
async function ok(argv: string[], timeout_ms = 60_000): Promise<RunResult> {
  const r = await run(argv, timeout_ms);
  if (r.code !== 0) {
    throw new Error(`${argv.join(" ")} exited ${r.code}\nstdout: ${r.stdout}\nstderr: ${r.stderr}`);
  }
  return r;
}

/** qemu-io reports failed commands on stdout/stderr but may still exit 0. */
function qemuIoClean(r: RunResult): void {
  const all = r.stdout + r.stderr;
  expect(all).not.toMatch(/Pattern verification failed|failed|error|Error/);
}

/** A sparse image: random data in a few places, holes between. */
function makeImage(path: string, size: number, seed: number): Uint8Array {
  const img = new Uint8Array(size);
  let x = seed >>> 0 || 1;
  const rnd = () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return x >>> 0;
  };
  const regions: Array<[number, number]> = [
    [0, 4096],
    [1 * MiB + 512, 300 * 1024],
    [5 * MiB, 2 * MiB],
    [size - 8192, 8192],
  ];
  for (const [off, len] of regions) for (let i = 0; i < len; i++) img[off + i] = rnd() & 255;
  const fd = openSync(path, "w");
  ftruncateSync(fd, size);
  for (const [off, len] of regions) writeSync(fd, img, off, len, off);
  closeSync(fd);
  return img;
}

function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && Buffer.from(a).equals(Buffer.from(b));
}

// ===========================================================================================
for (const transport of ["unix", "tcp"] as const) {
  describe(`real clients over ${transport}`, () => {
    let s: TestServer;
    let uri: string;
    let dir: string;

    beforeAll(async () => {
      s = await startTestServer({ tcp: transport === "tcp" });
      uri =
        transport === "unix"
          ? `nbd+unix:///pc?socket=${s.sock_path}`
          : `nbd://127.0.0.1:${(s.target as { port: number }).port}/pc`;
      dir = mkdtempSync(join(tmpdir(), "nbd-clients-"));
    });

    afterAll(async () => {
      await s?.stop();
      if (dir) rmSync(dir, { recursive: true, force: true });
    });

    when(HAVE.nbdinfo)("nbdinfo: size, flags, --list, --json", async () => {
      const plain = await ok(["nbdinfo", uri]);
      expect(plain.stdout).toContain("export-size: 67108864");
      expect(plain.stdout).toContain('description: pcache test');
      for (const f of ["can_flush: true", "can_fua: true", "can_trim: true", "can_zero: true", "can_fast_zero: true",
        "can_cache: true", "can_df: true", "can_multi_conn: true", "is_read_only: false"]) {
        expect(plain.stdout).toContain(f);
      }
      const sz = await ok(["nbdinfo", "--size", uri]);
      expect(sz.stdout.trim()).toBe("67108864");
      const json = JSON.parse((await ok(["nbdinfo", "--json", uri])).stdout);
      expect(json.protocol).toBe("newstyle-fixed");
      expect(json.structured).toBe(true);
      const e = json.exports[0];
      expect(e["export-name"]).toBe("pc");
      expect(e["export-size"]).toBe(64 * MiB);
      expect(e.contexts).toEqual(["base:allocation"]);
      expect(e.block_size_minimum).toBe(1);
      expect(e.block_size_preferred).toBe(4096);
      expect(e.block_size_maximum).toBe(32 * MiB);
      expect(e.can_multi_conn).toBe(true);
      const list_uri = uri.replace("/pc", "/");
      const list = JSON.parse((await ok(["nbdinfo", "--list", "--json", list_uri])).stdout);
      expect(list.exports.map((x: { "export-name": string }) => x["export-name"])).toEqual(["pc"]);
      const list_text = await ok(["nbdinfo", "--list", list_uri]);
      expect(list_text.stdout).toContain('export="pc"');
      // The default export ("") is the same export.
      const dflt = await ok(["nbdinfo", "--size", list_uri]);
      expect(dflt.stdout.trim()).toBe("67108864");
      // An unknown export name fails cleanly.
      const bad = await run(["nbdinfo", uri.replace("/pc", "/nope")]);
      expect(bad.code).not.toBe(0);
    });

    when(HAVE.qemu_io)("qemu-io: pattern write/read, FUA and not, discard, write -z", async () => {
      const base = 8 * MiB;
      const fua0 = s.exp.stats.fua;
      const r1 = await ok(["qemu-io", "-f", "raw", uri, "-c", `write -P 0xab ${base} 64k`, "-c", `read -P 0xab ${base} 64k`]);
      qemuIoClean(r1);
      expect(r1.stdout).toContain("wrote 65536/65536 bytes");
      expect(s.exp.peek(base, 64 * 1024).every((b) => b === 0xab)).toBe(true);
      // Default cache mode is writethrough: the write carried FUA.
      expect(s.exp.stats.fua).toBeGreaterThan(fua0);

      const fua1 = s.exp.stats.fua;
      const r2 = await ok([
        "qemu-io", "-f", "raw", "-t", "writeback", uri,
        "-c", `write -P 0xcd ${base + 64 * 1024} 64k`,
        "-c", `write -f -P 0xce ${base + 128 * 1024} 64k`,
        "-c", `read -P 0xcd ${base + 64 * 1024} 64k`,
        "-c", `read -P 0xce ${base + 128 * 1024} 64k`,
      ]);
      qemuIoClean(r2);
      expect(s.exp.stats.fua - fua1).toBe(1); // only the -f write

      const trim0 = s.exp.stats.trim;
      const r3 = await ok(["qemu-io", "-f", "raw", uri, "-c", `discard ${base} 64k`, "-c", `read -P 0 ${base} 64k`]);
      qemuIoClean(r3);
      expect(s.exp.stats.trim).toBe(trim0 + 1);

      const zero0 = s.exp.stats.zero;
      const r4 = await ok([
        "qemu-io", "-f", "raw", uri,
        "-c", `write -z ${base + 64 * 1024} 64k`,
        "-c", `write -z -u ${base + 128 * 1024} 64k`,
        "-c", `read -P 0 ${base + 64 * 1024} 128k`,
      ]);
      qemuIoClean(r4);
      expect(s.exp.stats.zero).toBe(zero0 + 2);
      expect(s.exp.peek(base + 64 * 1024, 128 * 1024).every((b) => b === 0)).toBe(true);

      // Unaligned 1 KiB I/O works (min block size 1).
      const r5 = await ok(["qemu-io", "-f", "raw", uri, "-c", `write -P 0x17 ${base + 1000} 1k`, "-c", `read -P 0x17 ${base + 1000} 1k`]);
      qemuIoClean(r5);
    });

    when(HAVE.qemu_img)("qemu-img: convert in, compare, map, convert out", async () => {
      const src = join(dir, "qimg-src.img");
      const out = join(dir, "qimg-out.img");
      const img = makeImage(src, 64 * MiB, transport === "unix" ? 11 : 12);
      await ok(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, uri]);
      expect(sameBytes(s.exp.peek(0, 64 * MiB), img)).toBe(true);
      const cmp = await ok(["qemu-img", "compare", "-f", "raw", "-F", "raw", src, uri]);
      expect(cmp.stdout).toContain("Images are identical");
      const info = await ok(["qemu-img", "info", "--output=json", "-f", "raw", uri]);
      expect(JSON.parse(info.stdout)["virtual-size"]).toBe(64 * MiB);
      // map uses BLOCK_STATUS with REQ_ONE: some extents are data, some are zero.
      const map = JSON.parse((await ok(["qemu-img", "map", "--output=json", "-f", "raw", uri])).stdout) as Array<{
        start: number; length: number; data: boolean; zero: boolean;
      }>;
      expect(map.some((e) => e.data)).toBe(true);
      expect(map.some((e) => !e.data && e.zero)).toBe(true);
      expect(map.reduce((n, e) => n + e.length, 0)).toBe(64 * MiB);
      await ok(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, out]);
      expect(sameBytes(new Uint8Array(readFileSync(out)), img)).toBe(true);
      await ok(["qemu-img", "compare", "-f", "raw", "-F", "raw", out, uri]);
    });

    when(HAVE.nbdcopy)("nbdcopy: file -> export (multi-conn, --flush) and export -> file", async () => {
      const src = join(dir, "copy-src.img");
      const out = join(dir, "copy-out.img");
      const img = makeImage(src, 64 * MiB, transport === "unix" ? 21 : 22);
      const flush0 = s.exp.stats.flush;
      await ok(["nbdcopy", "--flush", src, uri]);
      expect(s.exp.stats.flush).toBeGreaterThan(flush0);
      expect(sameBytes(s.exp.peek(0, 64 * MiB), img)).toBe(true);
      writeFileSync(out, new Uint8Array(0));
      await ok(["nbdcopy", uri, out]);
      expect(sameBytes(new Uint8Array(readFileSync(out)), img)).toBe(true);
      // Single connection and synchronous mode too.
      await ok(["nbdcopy", "--connections=1", "--synchronous", uri, out]);
      expect(sameBytes(new Uint8Array(readFileSync(out)), img)).toBe(true);
    });

    when(HAVE.nbdsh)("nbdsh: invalid requests with strict mode off get the right errors", async () => {
      const script = join(dir, `invalid-${transport}.py`);
      writeFileSync(
        script,
        `
import errno, nbd
h.set_strict_mode(0)
size = h.get_size()
def expect_err(what, fn, code):
    try:
        fn()
    except nbd.Error as e:
        assert e.errnum == code, "%s: got %r, want %d" % (what, e.errnum, code)
        return
    raise AssertionError("%s: no error" % what)
expect_err("read past end", lambda: h.pread(512, size), errno.EINVAL)
expect_err("read straddling end", lambda: h.pread(512, size - 256), errno.EINVAL)
expect_err("write past end", lambda: h.pwrite(b"x" * 512, size - 1), errno.ENOSPC)
expect_err("trim past end", lambda: h.trim(8192, size - 4096), errno.EINVAL)
expect_err("zero past end", lambda: h.zero(8192, size), errno.ENOSPC)
expect_err("cache past end", lambda: h.cache(4096, size), errno.EINVAL)
expect_err("flush with a flag flush does not take", lambda: h.flush(nbd.CMD_FLAG_DF), errno.EINVAL)
expect_err("read with an unknown flag", lambda: h.pread(512, 0, 0x40), errno.EINVAL)
expect_err("read with REQ_ONE", lambda: h.pread(512, 0, nbd.CMD_FLAG_REQ_ONE), errno.EINVAL)
expect_err("zero with DF", lambda: h.zero(512, 0, nbd.CMD_FLAG_DF), errno.EINVAL)
expect_err("read over 32 MiB", lambda: h.pread(32 * 1024 * 1024 + 512, 0), errno.EINVAL)
expect_err("block status without a context", lambda: h.block_status(4096, 0, lambda *a: 0), errno.EINVAL)
# The connection is still fine after all of that.
h.pwrite(b"\\x42" * 4096, 12 * 1024 * 1024)
assert h.pread(4096, 12 * 1024 * 1024) == b"\\x42" * 4096
h.shutdown()
print("OK")
`,
      );
      const r = await ok(["nbdsh", "-u", uri, "-c", `exec(open(${JSON.stringify(script)}).read())`]);
      expect(r.stdout).toContain("OK");
    });

    when(HAVE.nbdsh)("nbdsh: block status, cache, zero/trim flags, multi-conn visibility, simple replies", async () => {
      const script = join(dir, `ops-${transport}.py`);
      writeFileSync(
        script,
        `
import nbd
uri = ${JSON.stringify(uri)}
M = 1024 * 1024
base = 16 * M
h.zero(4 * M, base, nbd.CMD_FLAG_FAST_ZERO)
h.pwrite(b"\\x01" * 65536, base, nbd.CMD_FLAG_FUA)
h.cache(M, base)
got = []
def cb(metacontext, offset, entries, err):
    assert metacontext == "base:allocation", metacontext
    got.append((offset, list(entries)))
h.block_status(256 * 1024, base, cb)
assert got[0][0] == base
ents = got[0][1]
assert ents[0] == 65536 and ents[1] == 0, ents       # allocated data
assert ents[3] & 3 == 3, ents                        # then a hole reading as zero
assert sum(ents[0::2]) <= 256 * 1024, ents
got.clear()
h.block_status(256 * 1024, base, cb, nbd.CMD_FLAG_REQ_ONE)
assert len(got[0][1]) == 2, got
h.trim(65536, base)
assert h.pread(65536, base) == bytes(65536)
h.zero(65536, base, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(65536, base) == bytes(65536)

# CAN_MULTI_CONN: write on h2, flush on h3, read on h sees it.
assert h.can_multi_conn()
h2 = nbd.NBD(); h2.connect_uri(uri)
h3 = nbd.NBD(); h3.connect_uri(uri)
h2.pwrite(b"\\xaa" * 4096, base + M)
h3.flush()
assert h.pread(4096, base + M) == b"\\xaa" * 4096
h2.shutdown(); h3.shutdown()

# Without structured replies: simple replies, no DF, no block status.
s = nbd.NBD()
s.set_request_structured_replies(False)
s.connect_uri(uri)
assert not s.get_structured_replies_negotiated()
assert not s.can_df()
assert s.pread(4096, base + M) == b"\\xaa" * 4096
s.shutdown()

# Many commands in flight at once on one handle (replies out of order are matched by cookie).
bufs = [nbd.Buffer(4096) for _ in range(32)]
cookies = [h.aio_pread(bufs[i], base + 2 * M + i * 4096) for i in range(32)]
wc = [h.aio_pwrite(bytes([i]) * 4096, base + 3 * M + i * 4096) for i in range(32)]
while h.aio_in_flight() > 0:
    h.poll(-1)
for c in cookies + wc:
    assert h.aio_command_completed(c)
for i in range(32):
    assert h.pread(4096, base + 3 * M + i * 4096) == bytes([i]) * 4096
h.shutdown()
print("OK")
`,
      );
      const r = await ok(["nbdsh", "--base-allocation", "-u", uri, "-c", `exec(open(${JSON.stringify(script)}).read())`]);
      expect(r.stdout).toContain("OK");
    });

    when(HAVE.fio)("fio --ioengine=nbd randwrite with crc32c verify", async () => {
      const offset = transport === "unix" ? 32 * MiB : 48 * MiB;
      const r = await ok([
        "fio", "--name=nbdverify", "--ioengine=nbd", `--uri=${uri}`, "--rw=randwrite", "--bs=4k",
        `--offset=${offset}`, "--size=8m", "--iodepth=16", "--verify=crc32c", "--do_verify=1",
        "--verify_fatal=1", "--verify_state_save=0", "--output-format=json",
      ], 120_000);
      const job = JSON.parse(r.stdout.slice(r.stdout.indexOf("{"))).jobs[0];
      expect(job.error).toBe(0);
      expect(job.write.io_bytes).toBe(8 * MiB);
      expect(job.read.io_bytes).toBe(8 * MiB); // the verify pass
    }, 120_000);
  });
}

// ===========================================================================================
describe("server in a child process: stdin mode and socket activation", () => {
  when(HAVE.nbdinfo)("nbdinfo -- [ server --activation ] (LISTEN_PID/LISTEN_FDS, fd 3)", async () => {
    const r = await ok(["nbdinfo", "--json", "--", "[", BUN, SERVE_HELPER, "--activation", "]"]);
    const e = JSON.parse(r.stdout).exports[0];
    expect(e["export-size"]).toBe(64 * MiB);
    expect(e.can_multi_conn).toBe(true);
  });

  when(HAVE.nbdsh)("nbdsh connect_command (stdin mode) and connect_systemd_socket_activation", async () => {
    const body = [
      "h.pwrite(b'\\x5c' * 1024, 1000)",
      "assert h.pread(1024, 1000) == b'\\x5c' * 1024",
      "assert h.get_size() == 8 * 1024 * 1024",
      "h.flush()",
      "h.shutdown()",
      "print('OK')",
    ].join("; ");
    const argv = JSON.stringify([BUN, SERVE_HELPER, "--size", String(8 * MiB)]);
    const a = await ok(["nbdsh", "-c", `h.connect_command(${argv.replace("]", ', "--stdin"]')})`, "-c", body]);
    expect(a.stdout).toContain("OK");
    const b = await ok(["nbdsh", "-c", `h.connect_systemd_socket_activation(${argv.replace("]", ', "--activation"]')})`, "-c", body]);
    expect(b.stdout).toContain("OK");
  });

  when(HAVE.qemu_io)("qemu-io against the stand-alone server on a unix socket", async () => {
    const dir = mkdtempSync(join(tmpdir(), "nbd-standalone-"));
    const sock = join(dir, "s.sock");
    const p = Bun.spawn([BUN, SERVE_HELPER, "--listen", `unix:${sock}`], { stdout: "ignore", stderr: "pipe", env: ENV });
    children.add(p);
    try {
      // Wait for the "ready" line rather than sleeping.
      const reader = p.stderr.getReader();
      let seen = "";
      const deadline = Date.now() + 10_000;
      while (!seen.includes("ready") && Date.now() < deadline) {
        const { value, done } = await reader.read();
        if (done) break;
        seen += new TextDecoder().decode(value);
      }
      expect(seen).toContain("ready");
      const r = await ok(["qemu-io", "-f", "raw", `nbd+unix:///pc?socket=${sock}`, "-c", "write -P 0x66 0 1M", "-c", "read -P 0x66 0 1M"]);
      qemuIoClean(r);
      p.kill("SIGTERM");
      expect(await p.exited).toBe(0);
    } finally {
      p.kill("SIGKILL");
      children.delete(p);
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
