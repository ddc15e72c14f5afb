/**
 * Faults: a backing device that fails reads, writes or flushes (in process, and a real backing
 * file on a full file system under the binary), and cache devices `serve` must refuse at start:
 * too small, read-only, locked by another server.
 *
 * What must hold: a read that misses gets EIO (an NBD client sees errno 5), cache hits and writes
 * go on; writeback retries the same kset without moving dirty_tail and says so (error word,
 * counters, one log line when the trouble begins and one when it ends); once the fault clears
 * everything drains and the backing device holds exactly what was written. A refused device is
 * left byte for byte as it was.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { closeSync, openSync, readSync, rmSync } from "node:fs";
import { join } from "node:path";
import { MemoryBacking } from "../core/device/memory_backing.ts";
import { EngineExport } from "../core/engine/nbd_export.ts";
import type { Logger } from "../core/engine/context.ts";
import {
  CTL_WRITEBACK_ERROR,
  POS_DIRTY_TAIL,
  POS_KEY_HEAD,
  POS_KEY_TAIL,
  STAT_ERR_BACKING_READ,
  STAT_ERR_BACKING_WRITE,
} from "../core/engine/shared_state.ts";
import { BackingIoError } from "../core/errors.ts";
import { MiB } from "../core/format/constants.ts";
import { loadTail } from "../core/format/meta.ts";
import { NbdServer } from "../core/nbd/server.ts";
import { drainWithLoops, closeWithLoops, drainWriteback, freshCache, type Harness, openHarness, pattern, startLoops } from "./helpers/engine_harness.ts";
import { firstDiff } from "./reliability/crash_workload.ts";
import { formatCache, have, killAll, PCACHE_BIN, requireBinary, run, sparseFile, startServe, tempDir } from "./helpers/serve_binary.ts";

const BACKING_BYTES = 16 * MiB;

const dirs: string[] = [];

/** A temp folder removed after the file's tests. */
function scratch(prefix: string): string {
  const d = tempDir(prefix);
  dirs.push(d);
  return d;
}

afterAll(async () => {
  await killAll();
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

interface Logged extends Logger {
  lines: string[];
}

function collectingLogger(): Logged {
  const lines: string[] = [];
  const add = (level: string) => (m: string) => void lines.push(`${level}: ${m}`);
  return { lines, error: add("error"), warn: add("warn"), info: add("info"), debug: add("debug") };
}

/** A harness over a backing device pre-filled with a pattern; writes a few ranges and flushes. */
async function withData(log: Logger): Promise<{ h: Harness; model: Uint8Array }> {
  const backing = new MemoryBacking(BACKING_BYTES, { bytes: pattern(BACKING_BYTES, 99) });
  const h = openHarness(freshCache(), backing, { logger: log });
  const model = backing.bytes.slice();
  const put = async (off: number, data: Uint8Array) => {
    await h.engine.write(off, data, false);
    model.set(data, off);
  };
  await put(0, pattern(64 * 1024, 1));
  await put(5 * MiB + 123, pattern(8000, 2));
  await put(4 * MiB - 4096, pattern(8192, 3)); // crosses the 4 MiB boundary: two ksets
  await h.engine.writeZeroes(MiB, 4096, { fua: false });
  model.fill(0, MiB, MiB + 4096);
  await h.engine.flush();
  return { h, model };
}

function pos(h: Harness, at: number): string {
  const s = h.engine.ctx.s;
  return `${s.pos[at]}:${s.pos[at + 1]}`;
}

async function readAll(h: Harness): Promise<Uint8Array> {
  const got = new Uint8Array(BACKING_BYTES);
  await h.engine.read(0, BACKING_BYTES, got);
  return got;
}

describe("backing read errors", () => {
  test("a miss fails with EIO, hits and writes go on, and the range reads right once the fault clears", async () => {
    const { h, model } = await withData(collectingLogger());
    const backing = h.backing;
    backing.fail_reads = true;
    const miss = new Uint8Array(4096);
    const err = await h.engine.read(2 * MiB, 4096, miss).catch((e) => e);
    expect(err).toBeInstanceOf(BackingIoError);
    expect((err as BackingIoError).errno).toBe(5);
    // A read that is partly a hit and partly a miss fails as a whole.
    expect(await h.engine.read(60 * 1024, 8192, new Uint8Array(8192)).catch((e) => e)).toBeInstanceOf(BackingIoError);
    expect(h.engine.ctx.s.statTotal(STAT_ERR_BACKING_READ)).toBe(2);
    const hit = new Uint8Array(64 * 1024);
    await h.engine.read(0, hit.length, hit);
    expect(firstDiff(hit, model.subarray(0, hit.length), "hit")).toBeNull();
    await h.engine.write(2 * MiB + 4096, pattern(4096, 4), true);
    model.set(pattern(4096, 4), 2 * MiB + 4096);
    backing.fail_reads = false;
    // No placeholder of the failed reads is left behind: every byte reads right.
    expect(firstDiff(await readAll(h), model, "read")).toBeNull();
    h.engine.ctx.log.stopTimers();
  }, 60_000);

  test.skipIf(!have("nbdsh"))("a real NBD client (nbdsh) gets errno EIO for a miss and its data once the fault clears", async () => {
    const { h, model } = await withData(collectingLogger());
    const dir = scratch("pcache-faults-nbd-");
    const sock = join(dir, "f.sock");
    const server = new NbdServer({ export: new EngineExport(h.engine, false), export_name: "pcache", log: () => {} });
    await server.listen(`unix:${sock}`);
    const uri = `nbd+unix:///pcache?socket=${sock}`;
    const script = [
      "import nbd",
      "try:",
      "    h.pread(4096, 3 * 1024 * 1024)",
      "    print('miss-read ok')",
      "except nbd.Error as e:",
      "    print('miss-read errno', e.errno, e.errnum)",
      "h.pwrite(b'\\x5a' * 4096, 8 * 1024 * 1024, nbd.CMD_FLAG_FUA)",
      "print('hit', h.pread(4096, 8 * 1024 * 1024) == b'\\x5a' * 4096)",
    ].join("\n");
    try {
      h.backing.fail_reads = true;
      const r = await run(["nbdsh", "-u", uri, "-c", script], 60_000);
      expect(r.stderr).toBe("");
      expect(r.stdout).toBe("miss-read errno EIO 5\nhit True\n");
      h.backing.fail_reads = false;
      const after = await run(["nbdsh", "-u", uri, "-c", "print(h.pread(16, 3 * 1024 * 1024).hex())"], 60_000);
      expect(after.stdout.trim()).toBe(Buffer.from(model.subarray(3 * MiB, 3 * MiB + 16)).toString("hex"));
    } finally {
      await server.stop({ timeout_ms: 5000 });
      h.engine.ctx.log.stopTimers();
    }
  }, 120_000);
});

describe("backing write and flush errors", () => {
  test("writeback retries without moving dirty_tail, says so once, and drains when the fault clears", async () => {
    const log = collectingLogger();
    const { h, model } = await withData(log);
    const s = h.engine.ctx.s;
    const initial = pattern(BACKING_BYTES, 99);
    const dirty0 = pos(h, POS_DIRTY_TAIL);
    const key_tail0 = pos(h, POS_KEY_TAIL);
    const persisted0 = loadTail(h.dom, "dirty_tail")!.value;
    expect(pos(h, POS_KEY_HEAD)).not.toBe(dirty0);

    h.backing.fail_writes = true;
    for (let i = 0; i < 4; i++) expect(await h.writeback.step()).toBe("error");
    expect(pos(h, POS_DIRTY_TAIL)).toBe(dirty0);
    expect(loadTail(h.dom, "dirty_tail")!.value).toEqual(persisted0);
    expect(Atomics.load(s.ctl, CTL_WRITEBACK_ERROR)).toBe(5);
    expect(s.statTotal(STAT_ERR_BACKING_WRITE)).toBe(4);
    expect(h.writeback.retries).toBe(4);
    expect(firstDiff(h.backing.bytes, initial, "backing")).toBeNull();
    // GC cannot reclaim what is not written back; reads are still served from the cache.
    h.gc.collect();
    expect(pos(h, POS_KEY_TAIL)).toBe(key_tail0);
    expect(firstDiff(await readAll(h), model, "read")).toBeNull();

    // Writes that land but cannot be flushed do not count either.
    h.backing.fail_writes = false;
    h.backing.fail_flushes = true;
    expect(await h.writeback.step()).toBe("error");
    expect(pos(h, POS_DIRTY_TAIL)).toBe(dirty0);
    expect(Atomics.load(s.ctl, CTL_WRITEBACK_ERROR)).toBe(5);

    h.backing.fail_flushes = false;
    await drainWriteback(h);
    expect(Atomics.load(s.ctl, CTL_WRITEBACK_ERROR)).toBe(0);
    expect(pos(h, POS_DIRTY_TAIL)).toBe(pos(h, POS_KEY_HEAD));
    expect(firstDiff(h.backing.bytes, model, "backing")).toBeNull();
    const lines = log.lines.filter((l) => l.includes("writeback: backing device errors"));
    expect(lines).toHaveLength(2);
    expect(lines[0]).toMatch(/^error: writeback: backing device errors began \(.*injected write error.*\); dirty_tail stays, retrying$/);
    expect(lines[1]).toBe("info: writeback: backing device errors ended after 5 retries");
    h.engine.ctx.log.stopTimers();
  }, 60_000);

  test("the writeback loop retries on its own and drains once the fault clears", async () => {
    const { h, model } = await withData(collectingLogger());
    const s = h.engine.ctx.s;
    const dirty0 = pos(h, POS_DIRTY_TAIL);
    h.backing.fail_writes = true;
    const loops = startLoops(h.writeback, h.gc);
    try {
      const deadline = Date.now() + 20_000;
      while (h.writeback.retries < 3 && Date.now() < deadline) await Bun.sleep(20);
      expect(h.writeback.retries).toBeGreaterThanOrEqual(3);
      expect(Atomics.load(s.ctl, CTL_WRITEBACK_ERROR)).toBe(5);
      expect(pos(h, POS_DIRTY_TAIL)).toBe(dirty0);
      h.backing.fail_writes = false;
      expect(await drainWithLoops(h.engine, loops, 30_000)).toBe(true);
      expect(Atomics.load(s.ctl, CTL_WRITEBACK_ERROR)).toBe(0);
      expect(firstDiff(h.backing.bytes, model, "backing")).toBeNull();
    } finally {
      await closeWithLoops(h.engine, loops);
    }
  }, 60_000);
});

/** SHA-1 of a whole file, read in 16 MiB pieces. */
function fileHash(path: string): string {
  const hasher = new Bun.CryptoHasher("sha1");
  const buf = new Uint8Array(16 * MiB);
  const fd = openSync(path, "r");
  try {
    for (;;) {
      const n = readSync(fd, buf, 0, buf.length, null);
      if (n === 0) break;
      hasher.update(buf.subarray(0, n));
    }
  } finally {
    closeSync(fd);
  }
  return hasher.digest("hex");
}

/** One line on stderr, the exit code expected, nothing on the device changed. */
async function expectRefused(args: string[], device: string, code: number, message: RegExp): Promise<void> {
  const before = fileHash(device);
  const r = await run([PCACHE_BIN, ...args], 60_000);
  expect({ code: r.code, lines: r.stderr.trimEnd().split("\n").length }).toEqual({ code, lines: 1 });
  expect(r.stderr.trimEnd()).toMatch(message);
  expect(r.stderr).not.toMatch(/\n\s+at |TypeError|RangeError/);
  expect(fileHash(device)).toBe(before);
}

describe("cache device trouble at start (the binary)", () => {
  let dir = "";
  let backing = "";

  beforeAll(async () => {
    requireBinary();
    dir = scratch("pcache-faults-");
    backing = join(dir, "backing.img");
    await sparseFile(backing, 64 * MiB);
  });

  const serveArgs = (cache: string, name: string) => ["serve", "--cache", cache, "--backing", backing, "--nbd", `unix:${join(dir, `${name}.sock`)}`];

  test("too small: format and serve refuse a 100 MiB device, and a 512 MiB cache cut to 100 MiB", async () => {
    const blank = join(dir, "small.img");
    await sparseFile(blank, 100 * MiB);
    await expectRefused(["format", "--cache", blank, "--size", "100M"], blank, 1, /^pcache: --size 100M is below the 512 MiB minimum of a cache device$/);
    await expectRefused(["format", "--cache", blank], blank, 1, /^pcache: cache device .*small\.img has 104857600 bytes; a cache device needs at least 512 MiB/);
    await expectRefused(serveArgs(blank, "small"), blank, 2, /^pcache: superblock at 0x1000: all zero: the device is not formatted \(run pcache format\); at 104857600 bytes it is also below the 512 MiB minimum$/);
    const cut = join(dir, "cut.img");
    await formatCache(cut);
    await run(["truncate", "-s", "100M", cut]);
    await expectRefused(serveArgs(cut, "cut"), cut, 2, /^pcache: superblock at 0x1000: seg_num 31 needs 520114176 bytes but the device has 104857600 \(room for 6 segments\)$/);
    const tiny = join(dir, "tiny.img");
    await sparseFile(tiny, 4096);
    await expectRefused(serveArgs(tiny, "tiny"), tiny, 2, /too small for the pcache metadata area/);
  }, 120_000);

  test("read-only: an immutable cache file (root) and a 0444 file for another user are refused at open", async () => {
    // tmpfs has no immutable flag: this one lives next to the test on a disk file system.
    const ro_dir = tempDirOnDisk();
    dirs.push(ro_dir);
    const cache = join(ro_dir, "ro.img");
    await formatCache(cache);
    const chattr = await run(["chattr", "+i", cache]);
    try {
      if (chattr.code === 0) {
        await expectRefused(serveArgs(cache, "ro1"), cache, 1, /^pcache: open failed: cache device .*ro\.img: EPERM \(Operation not permitted\)/);
      } else {
        console.warn(`\n!!!!! SKIPPING the immutable-file case: chattr +i failed (${chattr.stderr.trim()}) !!!!!\n`);
      }
    } finally {
      await run(["chattr", "-i", cache]);
    }
    // Mode 0444 stops only a user other than root: as root, run the server as nobody.
    await run(["chmod", "0444", cache]);
    await run(["chmod", "0755", ro_dir]);
    const as_root = process.getuid?.() === 0;
    if (!as_root || have("setpriv")) {
      const as_user = as_root ? ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", PCACHE_BIN] : [PCACHE_BIN];
      const before = fileHash(cache);
      const r = await run([...as_user, ...serveArgs(cache, "ro2")], 60_000);
      expect(r.code).toBe(1);
      expect(r.stderr).toMatch(/^pcache: open failed: cache device .*ro\.img: EACCES \(Permission denied\) \(errno 13\)\n$/);
      expect(fileHash(cache)).toBe(before);
    }
  }, 120_000);

  test.skipIf(!have("qemu-io"))("locked: a second server on the same cache is refused and the first keeps serving", async () => {
    const cache = join(dir, "locked.img");
    await formatCache(cache);
    const first = await startServe({ cache, backing, dir, socket_name: "l1.sock" });
    try {
      const second = await run([PCACHE_BIN, ...serveArgs(cache, "l2")], 60_000);
      expect(second.code).toBe(1);
      expect(second.stderr).toMatch(/^pcache: cache device .*locked\.img is in use by another pcache process \(locked\)\n$/);
      const io = await run(["qemu-io", "-f", "raw", "-c", "write -P 0x3c 1M 64k", "-c", "read -P 0x3c 1M 64k", first.uri], 60_000);
      expect(io.code).toBe(0);
      expect(io.stdout).toContain("read 65536/65536 bytes at offset 1048576");
      expect(io.stdout + io.stderr).not.toMatch(/Pattern verification failed|error/i);
      // SIGTERM while writeback is busy can take a minute today (reported separately); let it
      // finish first so this test is about the lock.
      await statusUntil(cache, (st) => st.dirty_tail === st.key_head, 20_000);
    } finally {
      const code = await first.stop().catch((err) => `${(err as Error).message}; the server printed: ${first.stderr()}`);
      expect(code).toBe(0);
    }
  }, 120_000);
});

/** `pcache status --json` of the server using `cache`, or null while it does not answer. */
async function status(cache: string): Promise<Record<string, unknown> | null> {
  const r = await run([PCACHE_BIN, "status", "--cache", cache, "--json"], 30_000);
  if (r.code !== 0) return null;
  return JSON.parse(r.stdout) as Record<string, unknown>;
}

/** Polls status until `done` holds (bounded); returns the last status seen. */
async function statusUntil(cache: string, done: (st: Record<string, unknown>) => boolean, wait_ms: number): Promise<Record<string, unknown> | null> {
  const deadline = Date.now() + wait_ms;
  let st: Record<string, unknown> | null = null;
  while (Date.now() < deadline) {
    st = await status(cache);
    if (st !== null && done(st)) return st;
    await Bun.sleep(200);
  }
  return st;
}

describe("a full backing file system under the binary", () => {
  const mnt = "/tmp/pcache-faults-enospc";
  let mounted = false;

  beforeAll(async () => {
    requireBinary();
    await run(["mkdir", "-p", mnt]);
    mounted = (await run(["mount", "-t", "tmpfs", "-o", "size=4M", "tmpfs", mnt])).code === 0;
    if (!mounted) console.warn("\n!!!!! SKIPPING the ENOSPC test: cannot mount a small tmpfs here !!!!!\n");
  });

  afterAll(async () => {
    await killAll();
    if (mounted) await run(["umount", mnt]);
    await run(["rmdir", mnt]);
  });

  test.skipIf(!have("qemu-io"))("ENOSPC: status shows the errno, dirty_tail stays, and it all drains once there is room", async () => {
    if (!mounted) return;
    const dir = scratch("pcache-faults-enospc-");
    const cache = join(dir, "cache.img");
    const backing = join(mnt, "backing.img");
    await formatCache(cache);
    await sparseFile(backing, 64 * MiB);
    const server = await startServe({ cache, backing, dir });
    try {
      // 16 MiB of dirty data, flushed into the cache; the backing file system holds 4 MiB.
      const w = await run(["qemu-io", "-f", "raw", "-t", "writeback", "-c", "write -P 0x5a 0 16M", "-c", "flush", server.uri], 60_000);
      expect(w.code).toBe(0);
      const failing = await statusUntil(cache, (st) => st.writeback_error_errno === 28, 30_000);
      expect(failing?.writeback_error_errno).toBe(28);
      expect((failing?.errors as { backing_write: number }).backing_write).toBeGreaterThan(0);
      expect(failing?.dirty_tail).toBe("0:0");
      expect(failing?.dirty_bytes).toBe(16 * MiB);
      // Retried, still not moved.
      const later = await statusUntil(cache, (st) => (st.errors as { backing_write: number }).backing_write >= 2, 30_000);
      expect(later?.dirty_tail).toBe("0:0");
      expect((await run(["mount", "-o", "remount,size=128M", mnt])).code).toBe(0);
      const drained = await statusUntil(cache, (st) => st.dirty_bytes === 0 && st.writeback_error_errno === 0, 60_000);
      expect(drained?.dirty_bytes).toBe(0);
      expect(drained?.writeback_error_errno).toBe(0);
      expect(drained?.dirty_tail).toBe(drained?.key_head);
      expect(server.stderr()).toMatch(/backing device errors began \(.*ENOSPC.*\); dirty_tail stays, retrying/);
      expect(server.stderr()).toMatch(/backing device errors ended after \d+ retries/);
    } finally {
      expect(await server.stop()).toBe(0);
    }
    const fd = openSync(backing, "r");
    const got = new Uint8Array(16 * MiB);
    readSync(fd, got, 0, got.length, 0);
    closeSync(fd);
    expect(got.every((b) => b === 0x5a)).toBe(true);
  }, 180_000);
});

function tempDirOnDisk(): string {
  const r = Bun.spawnSync(["mktemp", "-d", "/tmp/pcache-faults-ro-XXXXXX"]);
  return r.stdout.toString().trim();
}
