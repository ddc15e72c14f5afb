/**
 * libc through bun:ffi (ffi/libc.ts) and the native helpers with their fallback (ffi/native.ts).
 * Needs the .so: `bun scripts/build.ts --native-only` (the `test` script builds it first).
 */
import { afterAll, describe, expect, test } from "bun:test";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { toArrayBuffer, type Pointer } from "bun:ffi";
import CRC32C from "crc-32/crc32c";
import { PcacheError, SysError } from "../core/errors.ts";
import {
  closeFd,
  errnoName,
  fallocateFd,
  FALLOC_FL_KEEP_SIZE,
  FALLOC_FL_PUNCH_HOLE,
  fileSize,
  fstatFd,
  ftruncateFd,
  lockExclusive,
  mapShared,
  msyncRange,
  O_CREAT,
  O_RDONLY,
  O_RDWR,
  openFile,
  pageSize,
  preadInto,
  pwriteFrom,
  unmap,
} from "../ffi/libc.ts";
import { crc32cRawJs, describeNative, makeFallbackNative, native, type Native } from "../ffi/native.ts";

const tmp_dirs: string[] = [];
function tempDir(parent: string): string {
  const d = mkdtempSync(join(parent, "pcache-ffi-"));
  tmp_dirs.push(d);
  return d;
}
const shm_dir = tempDir("/dev/shm");
const disk_dir = tempDir(tmpdir());

afterAll(() => {
  for (const d of tmp_dirs) rmSync(d, { recursive: true, force: true });
});

/** Deterministic pseudo-random bytes. */
function pattern(len: number, seed: number): Uint8Array<ArrayBuffer> {
  const out = new Uint8Array(len);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < len; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out[i] = x & 0xff;
  }
  return out;
}

function newFile(dir: string, name: string, size_bytes: number): { path: string; fd: number } {
  const path = join(dir, name);
  const fd = openFile(path, O_RDWR | O_CREAT, 0o600);
  ftruncateFd(fd, size_bytes);
  return { path, fd };
}

describe("libc", () => {
  test("pwrite/pread round trip, also beyond 4 GiB, short read at end of file", () => {
    const { fd } = newFile(disk_dir, "rw.bin", 6 * 2 ** 30);
    const data = pattern(10_000, 7);
    for (const off of [0, 12345, 5 * 2 ** 30 + 3]) {
      pwriteFrom(fd, data, off);
      const back = new Uint8Array(data.length);
      expect(preadInto(fd, back, off)).toBe(data.length);
      expect(back).toEqual(data);
    }
    const tail = new Uint8Array(100);
    expect(preadInto(fd, tail, 6 * 2 ** 30 - 40)).toBe(40);
    expect(preadInto(fd, new Uint8Array(0), 0)).toBe(0);
    closeFd(fd);
  });

  test("open of a missing file throws SysError ENOENT with the path", () => {
    const path = join(disk_dir, "missing");
    let err: unknown;
    try {
      openFile(path, O_RDONLY);
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(SysError);
    expect((err as SysError).errno).toBe(2);
    expect((err as SysError).message).toContain("ENOENT");
    expect((err as SysError).message).toContain(path);
    expect(errnoName(95)).toBe("EOPNOTSUPP");
    expect(errnoName(11)).toBe("EWOULDBLOCK");
  });

  test("flock: a second open of the same file cannot take the lock until the first closes", () => {
    const { path, fd } = newFile(disk_dir, "lock.bin", 4096);
    lockExclusive(fd, `cache device ${path}`);
    const fd2 = openFile(path, O_RDWR);
    expect(() => lockExclusive(fd2, `cache device ${path}`)).toThrow(
      new PcacheError(`cache device ${path} is in use by another pcache process (locked)`),
    );
    closeFd(fd);
    lockExclusive(fd2, `cache device ${path}`);
    closeFd(fd2);
  });

  test("fstat: size and kind; sparse files; character devices", () => {
    const { fd } = newFile(disk_dir, "stat.bin", 3 * 2 ** 30 + 5);
    const st = fstatFd(fd);
    expect(st.kind).toBe("file");
    expect(st.size_bytes).toBe(3 * 2 ** 30 + 5);
    expect(st.blocks_512).toBeLessThan(64); // sparse: nothing allocated
    expect(fileSize(fd)).toBe(3 * 2 ** 30 + 5);
    closeFd(fd);

    const null_fd = openFile("/dev/null", O_RDONLY);
    const nst = fstatFd(null_fd);
    expect(nst.kind).toBe("chardev");
    expect([nst.rdev_major, nst.rdev_minor]).toEqual([1, 3]);
    expect(() => fileSize(null_fd)).toThrow(PcacheError);
    closeFd(null_fd);
  });

  test("fallocate punches a hole that reads back as zeroes", () => {
    const { fd } = newFile(shm_dir, "hole.bin", 1 << 20);
    pwriteFrom(fd, new Uint8Array(1 << 20).fill(0xaa), 0);
    fallocateFd(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 4096, 8192);
    const back = new Uint8Array(3 * 4096);
    preadInto(fd, back, 0);
    expect(back.subarray(0, 4096).every((b) => b === 0xaa)).toBe(true);
    expect(back.subarray(4096).every((b) => b === 0)).toBe(true);
    expect(fileSize(fd)).toBe(1 << 20);
    closeFd(fd);
  });

  // No DAX here: both tmpfs and the page cache refuse MAP_SYNC, so mapShared falls back.
  for (const [where, dir] of [["/dev/shm (tmpfs)", shm_dir], ["tmpdir", disk_dir]] as const) {
    test(`MAP_SYNC probe falls back to MAP_SHARED on ${where}; stores reach the file`, () => {
      const { fd } = newFile(dir, "map.bin", 1 << 20);
      const map = mapShared(fd, 1 << 20);
      expect(map.sync).toBe(false);
      console.log(`note: ${where}: MAP_SYNC refused, the cache device would use the msync domain`);
      const view = new Uint8Array(toArrayBuffer(map.base as Pointer, 0, 1 << 20));
      const data = pattern(5000, 3);
      view.set(data, 4097);
      msyncRange(map.base, 4097, data.length); // unaligned start and end: widened to pages
      const back = new Uint8Array(data.length);
      preadInto(fd, back, 4097);
      expect(back).toEqual(data);
      unmap(map.base, 1 << 20);
      closeFd(fd);
    });
  }

  test("read-only mapping with populate", () => {
    const { path, fd } = newFile(shm_dir, "ro.bin", 64 << 10);
    pwriteFrom(fd, pattern(100, 9), 0);
    closeFd(fd);
    const ro = openFile(path, O_RDONLY);
    const map = mapShared(ro, 64 << 10, { readOnly: true, populate: true });
    expect(new Uint8Array(toArrayBuffer(map.base as Pointer, 0, 100))).toEqual(pattern(100, 9));
    unmap(map.base, 64 << 10);
    closeFd(ro);
    expect(pageSize()).toBeGreaterThanOrEqual(4096);
  });
});

/** A mapped scratch area for copying into (the fallback's msync needs a real mapping). */
function scratchMapping(name: string, size_bytes: number): { base: number; bytes: Uint8Array; done: () => void } {
  const { fd } = newFile(shm_dir, name, size_bytes);
  const map = mapShared(fd, size_bytes, { trySync: false });
  return {
    base: map.base,
    bytes: new Uint8Array(toArrayBuffer(map.base as Pointer, 0, size_bytes)),
    done: () => {
      unmap(map.base, size_bytes);
      closeFd(fd);
    },
  };
}

function checkMemcpyNt(n: Native, name: string): void {
  const area = scratchMapping(name, 1 << 20);
  const src = pattern(300_000, 11);
  // Unaligned starts and lengths around the 64-byte line: head only, head+lines+tail, exact lines.
  const cases: [number, number][] = [
    [0, 0], [1, 1], [3, 60], [7, 64], [64, 64], [63, 65], [5, 127], [128, 4096], [4095, 4097],
    [1000, 131_073], [65_537, 200_000], [17, 299_983],
  ];
  for (const [dst_off, len] of cases) {
    area.bytes.fill(0x5c);
    const src_off = (dst_off * 7) % 13; // source misaligned differently from the destination
    n.memcpyNt(area.base + dst_off, src.subarray(src_off), len);
    n.sfence();
    expect(area.bytes.subarray(dst_off, dst_off + len)).toEqual(src.subarray(src_off, src_off + len));
    // Neighbouring bytes untouched.
    if (dst_off > 0) expect(area.bytes[dst_off - 1]).toBe(0x5c);
    expect(area.bytes[dst_off + len]).toBe(0x5c);
  }
  expect(() => n.memcpyNt(area.base, src.subarray(0, 10), 11)).toThrow(RangeError);
  n.flushRange(area.base + 3, 1000);
  n.sfence();
  area.done();
}

describe("native helpers", () => {
  const enc = new TextEncoder();

  test("the .so is built and loaded", () => {
    if (process.env.PCACHE_NO_NATIVE === "1") return;
    // A failure here means the .so was not built: run `bun scripts/build.ts --native-only`.
    expect(native.reason).toBe("");
    expect(native.available).toBe(true);
    console.log(`note: ${describeNative()}`);
  });

  test("crc32cRaw test vectors (native and JS)", () => {
    for (const crc of [native.crc32cRaw, crc32cRawJs]) {
      expect(crc(0xffffffff, enc.encode("123456789"))).toBe(0x1cf96d7c);
      expect(crc(0x3b15a, enc.encode("123456789"))).toBe(0xe5868ab2);
      expect(crc(0x3b15a, new Uint8Array(20))).toBe(0xb9b69066);
      expect(crc(0x3b15a, new Uint8Array(0))).toBe(0x3b15a);
    }
    // The standard CRC32C check value is the inverted form of the raw one.
    expect(CRC32C.str("123456789") >>> 0).toBe(0xe3069283);
  });

  test("crc32cRaw native equals JS on random buffers of odd lengths and offsets", () => {
    const big = pattern(70_000, 5);
    for (let i = 0; i < 200; i++) {
      const off = (i * 37) % 17;
      const len = (i * 7919) % 65_537;
      const buf = big.subarray(off, off + len);
      const seed = (i * 0x9e3779b9) >>> 0;
      expect(native.crc32cRaw(seed, buf)).toBe(crc32cRawJs(seed, buf));
    }
  });

  test("memcpyNt over unaligned ranges (native)", () => checkMemcpyNt(native, "nt-native.bin"));
  test("memcpyNt over unaligned ranges (fallback)", () => checkMemcpyNt(makeFallbackNative("test"), "nt-fallback.bin"));

  test("describeNative names the mechanism", () => {
    expect(describeNative(makeFallbackNative("why not"))).toBe(
      "native helpers unavailable (why not): plain copies, msync, JS crc32c",
    );
    if (native.available) expect(describeNative()).toStartWith("native helpers: ");
  });

  test("PCACHE_NO_NATIVE=1 selects the fallback in a fresh process", () => {
    const script = join(disk_dir, "no-native.ts");
    const native_ts = join(import.meta.dir, "../ffi/native.ts");
    writeFileSync(
      script,
      `import { native, describeNative } from ${JSON.stringify(native_ts)};
       const crc = native.crc32cRaw(0x3b15a, new TextEncoder().encode("123456789"));
       console.log(JSON.stringify({ available: native.available, reason: native.reason, crc, text: describeNative() }));`,
    );
    const r = Bun.spawnSync([process.execPath, script], { env: { ...process.env, PCACHE_NO_NATIVE: "1" } });
    expect(r.exitCode).toBe(0);
    const out = JSON.parse(r.stdout.toString());
    expect(out).toEqual({
      available: false,
      reason: "disabled by PCACHE_NO_NATIVE=1",
      crc: 0xe5868ab2,
      text: "native helpers unavailable (disabled by PCACHE_NO_NATIVE=1): plain copies, msync, JS crc32c",
    });
  });
});
