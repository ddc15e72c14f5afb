/**
 * Mapped persistence domains (pmem, msync), the cache device opener and the file backing.
 * Every durable write is checked through a fresh mapping or pread after the domain is closed.
 */
import { afterAll, describe, expect, test } from "bun:test";
import { existsSync, mkdtempSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { AssertionError } from "../core/assert.ts";
import { BackingIoError, PcacheError, SysError } from "../core/errors.ts";
import { GiB, MiB, SEG_SIZE, SEGMENTS_OFF, segmentOffset, segNumForSize } from "../core/format/constants.ts";
import { attachCacheDevice, openCacheDevice } from "../core/device/cache_device.ts";
import { attachBackingFile, FileBacking, openBackingFile } from "../core/device/file_backing.ts";
import { writeDurable, type PersistDomain } from "../core/persist/domain.ts";
import { MsyncDomain } from "../core/persist/msync.ts";
import { PmemDomain } from "../core/persist/pmem.ts";
import { closeFd, fstatFd, ftruncateFd, mapShared, O_CREAT, O_RDWR, openFile, preadInto } from "../ffi/libc.ts";
import { makeFallbackNative, native, type Native } from "../ffi/native.ts";

const tmp_dirs: string[] = [];
function tempDir(parent: string): string {
  const d = mkdtempSync(join(parent, "pcache-persist-"));
  tmp_dirs.push(d);
  return d;
}
const shm_dir = tempDir("/dev/shm");
const disk_dir = tempDir(tmpdir());
const cleanups: (() => void)[] = [];

afterAll(() => {
  for (const c of cleanups.reverse()) c();
  for (const d of tmp_dirs) rmSync(d, { recursive: true, force: true });
});

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

function preadFile(path: string, off: number, len: number): Uint8Array {
  const fd = openFile(path, O_RDWR);
  const out = new Uint8Array(len);
  expect(preadInto(fd, out, off)).toBe(len);
  closeFd(fd);
  return out;
}

/** Writes at awkward places: metadata area, segment start, unaligned inside a segment, a segment end. */
function writeSamples(dom: PersistDomain, seg: number): [number, Uint8Array][] {
  const seg_base = segmentOffset(seg);
  const samples: [number, Uint8Array][] = [
    [0x1000, pattern(24, 1)],
    [0x4020 + 3, pattern(61, 2)],
    [seg_base, pattern(4096, 3)],
    [seg_base + 12_345, pattern(70_001, 4)],
    [seg_base + SEG_SIZE - 100, pattern(100, 5)],
  ];
  for (const [off, data] of samples) {
    dom.write(off, data);
    dom.flush(off, data.length);
  }
  dom.fill(seg_base + 200_000, 333, 0xee);
  dom.flush(seg_base + 200_000, 333);
  dom.fence();
  samples.push([seg_base + 200_000, new Uint8Array(333).fill(0xee)]);
  return samples;
}

function checkSamples(read: (off: number, len: number) => Uint8Array, samples: [number, Uint8Array][]): void {
  for (const [off, data] of samples) expect(read(off, data.length)).toEqual(data);
}

describe("domains over a file mapping", () => {
  test("msync domain (cache device on disk): write/flush/fence, read back after reopen", () => {
    const path = join(disk_dir, "msync.img");
    const dev = openCacheDevice(path, { create_size_bytes: SEGMENTS_OFF + 3 * SEG_SIZE });
    expect(dev.kind).toBe("file");
    expect(dev.map_sync).toBe(false);
    expect(dev.domain.name).toBe("msync");
    expect(dev.domain.describe()).toContain("msync(MS_SYNC)");
    const samples = writeSamples(dev.domain, 2);
    checkSamples((off, len) => dev.domain.view(off, len), samples);
    dev.close();
    checkSamples((off, len) => preadFile(path, off, len), samples);
    const again = openCacheDevice(path);
    checkSamples((off, len) => again.domain.view(off, len), samples);
    again.close();
  });

  test.if(existsSync("/dev/shm"))("msync domain on tmpfs: no msync needed (said so), data read back after reopen", () => {
    const d = mkdtempSync("/dev/shm/pcache-persist-");
    try {
      const path = join(d, "tmpfs.img");
      const dev = openCacheDevice(path, { create_size_bytes: SEGMENTS_OFF + 3 * SEG_SIZE });
      expect(dev.domain.name).toBe("msync");
      expect(dev.domain.describe()).toContain("file on tmpfs: the pages are the file, so no msync is needed");
      const samples = writeSamples(dev.domain, 2);
      dev.close();
      checkSamples((off, len) => preadFile(path, off, len), samples);
    } finally {
      rmSync(d, { recursive: true, force: true });
    }
  });

  // MAP_SYNC is not available on this machine, so the pmem domain is exercised over a plain
  // MAP_SHARED mapping: the copies, flushes and fences run for real, only the durability
  // guarantee of DAX is missing.
  for (const [what, helpers] of [["native helpers", native], ["fallback helpers", makeFallbackNative("test")]] as const) {
    test(`pmem domain with ${what}: write/flush/fence, read back after unmap`, () => {
      const path = join(shm_dir, `pmem-${helpers.available}.img`);
      const size_bytes = SEGMENTS_OFF + 2 * SEG_SIZE;
      const fd = openFile(path, O_RDWR | O_CREAT, 0o600);
      ftruncateFd(fd, size_bytes);
      const map = mapShared(fd, size_bytes, { trySync: false });
      const dom = new PmemDomain({ base: map.base, size_bytes, helpers, note: "test mapping" });
      expect(dom.describe()).toStartWith("pmem: test mapping");
      const samples = writeSamples(dom, 1);
      writeDurable(dom, 0x2000, pattern(24, 9));
      samples.push([0x2000, pattern(24, 9)]);
      checkSamples((off, len) => dom.view(off, len), samples);
      dom.close();
      closeFd(fd);
      checkSamples((off, len) => preadFile(path, off, len), samples);
    });
  }
});

test("pmem domain skips the flush of a range its last non-temporal write covered", () => {
  const path = join(shm_dir, "pmem-memo.img");
  const size_bytes = SEGMENTS_OFF + SEG_SIZE;
  const fd = openFile(path, O_RDWR | O_CREAT, 0o600);
  ftruncateFd(fd, size_bytes);
  const map = mapShared(fd, size_bytes, { trySync: false });
  let flushes = 0;
  const spy: Native = { ...native, flushRange: (addr, len) => (flushes++, native.flushRange(addr, len)) };
  const dom = new PmemDomain({ base: map.base, size_bytes, helpers: spy });
  const at = segmentOffset(0) + 3;
  dom.write(at, pattern(5000, 81));
  dom.flush(at, 5000);
  dom.flush(at + 100, 200);
  expect(flushes).toBe(native.available ? 0 : 2);
  dom.fill(at + 10, 10, 1); // ordinary stores: must be flushed
  dom.flush(at, 5000);
  expect(flushes).toBe(native.available ? 1 : 3);
  dom.write(at + 8000, pattern(64, 82));
  dom.flush(at, 5000); // not the last write any more
  dom.flush(at + 8000, 65); // one byte more than written
  dom.fence();
  expect(flushes).toBe(native.available ? 3 : 5);
  dom.close();
  closeFd(fd);
});

describe("cache device", () => {
  test("sparse 9 GiB device: segments beyond 4 GiB and the last segment, partial tail unaddressable", () => {
    const path = join(shm_dir, "big.img");
    const size_bytes = 9 * GiB + 5 * MiB; // ends with a partial segment
    const seg_num = segNumForSize(size_bytes);
    const dev = openCacheDevice(path, { create_size_bytes: size_bytes });
    expect(dev.size_bytes).toBe(size_bytes);
    expect((dev.domain as MsyncDomain).seg_num).toBe(seg_num);
    const far_seg = Math.ceil((5 * GiB - SEGMENTS_OFF) / SEG_SIZE); // starts beyond 5 GiB
    const far = pattern(1 << 20, 21);
    const last = pattern(SEG_SIZE, 22);
    writeDurable(dev.domain, segmentOffset(far_seg) + 777, far);
    writeDurable(dev.domain, segmentOffset(seg_num - 1), last);
    expect(dev.domain.view(segmentOffset(far_seg) + 777, far.length)).toEqual(far);
    const tail_start = segmentOffset(seg_num);
    expect(tail_start).toBeLessThan(size_bytes);
    expect(() => dev.domain.view(tail_start, 1)).toThrow(AssertionError);
    expect(() => dev.domain.write(size_bytes - 10, new Uint8Array(10))).toThrow(AssertionError);
    dev.close();

    // Still sparse: only what we wrote is allocated.
    expect(statSync(path).blocks * 512).toBeLessThan(64 * MiB);
    expect(preadFile(path, segmentOffset(far_seg) + 777, far.length)).toEqual(far);
    const again = openCacheDevice(path);
    expect(again.domain.view(segmentOffset(far_seg) + 777, far.length)).toEqual(far);
    expect(again.domain.view(segmentOffset(seg_num - 1), SEG_SIZE)).toEqual(last);
    again.close();
  });

  test("views and writes never cross the metadata area, a segment, or the device end", () => {
    const dev = openCacheDevice(join(shm_dir, "bounds.img"), { create_size_bytes: SEGMENTS_OFF + 2 * SEG_SIZE });
    const d = dev.domain;
    const seg1 = segmentOffset(1);
    expect(d.view(seg1 - 10, 10).length).toBe(10);
    expect(d.view(seg1, SEG_SIZE).length).toBe(SEG_SIZE);
    expect(d.view(0, SEGMENTS_OFF).length).toBe(SEGMENTS_OFF);
    expect(() => d.view(seg1 - 10, 11)).toThrow(AssertionError);
    expect(() => d.view(SEGMENTS_OFF - 1, 2)).toThrow(AssertionError);
    expect(() => d.view(segmentOffset(2), 1)).toThrow(AssertionError);
    expect(() => d.view(-1, 1)).toThrow(AssertionError);
    expect(() => d.view(1.5, 1)).toThrow(AssertionError);
    expect(() => d.write(seg1 - 1, new Uint8Array(2))).toThrow(AssertionError);
    expect(() => d.flush(seg1 - 1, 2)).toThrow(AssertionError);
    expect(() => d.fill(seg1 - 1, 2, 0)).toThrow(AssertionError);
    dev.close();
    expect(() => d.view(0, 1)).toThrow(AssertionError); // used after close
  });

  test("exclusive lock; read-only open takes no lock and refuses writes", () => {
    const path = join(shm_dir, "locked.img");
    const dev = openCacheDevice(path, { create_size_bytes: SEGMENTS_OFF + SEG_SIZE });
    writeDurable(dev.domain, 0x1000, pattern(24, 31));
    expect(() => openCacheDevice(path)).toThrow(`cache device ${path} is in use by another pcache process`);
    const ro = openCacheDevice(path, { readOnly: true });
    expect(ro.domain.view(0x1000, 24)).toEqual(pattern(24, 31));
    expect(() => ro.domain.write(0x1000, new Uint8Array(1))).toThrow(PcacheError);
    expect(() => ro.domain.flush(0x1000, 1)).toThrow("read-only");
    expect(() => ro.domain.fill(0x1000, 1, 0)).toThrow("read-only");
    ro.close();
    dev.close();
    openCacheDevice(path).close(); // lock released by close
  });

  test("create never shrinks; missing file without create is ENOENT; odd file types refused", () => {
    const path = join(shm_dir, "grow.img");
    openCacheDevice(path, { create_size_bytes: 64 * MiB }).close();
    const dev = openCacheDevice(path, { create_size_bytes: 32 * MiB });
    expect(dev.size_bytes).toBe(64 * MiB);
    dev.close();
    const missing = join(shm_dir, "nope.img");
    expect(() => openCacheDevice(missing)).toThrow(SysError);
    expect(() => openCacheDevice(missing)).toThrow(`cache device ${missing}: ENOENT`);
    expect(() => openCacheDevice("/dev/null", { readOnly: true })).toThrow("not a device-dax");
    expect(() => openCacheDevice(shm_dir, { readOnly: true })).toThrow("not a regular file, block device");
  });

  test("a worker attaches to the same mapping by base address", async () => {
    const dev = openCacheDevice(join(shm_dir, "attach.img"), { create_size_bytes: SEGMENTS_OFF + 2 * SEG_SIZE });
    // In-thread attach: writes through it show in the owner's views; its close does not unmap.
    const attached = attachCacheDevice(dev.attach);
    expect(attached.name).toBe(dev.domain.name);
    writeDurable(attached, segmentOffset(0) + 5, pattern(99, 41));
    attached.close();
    expect(dev.domain.view(segmentOffset(0) + 5, 99)).toEqual(pattern(99, 41));

    const worker_file = join(disk_dir, "attach-worker.ts");
    writeFileSync(
      worker_file,
      `import { attachCacheDevice } from ${JSON.stringify(join(import.meta.dir, "../core/device/cache_device.ts"))};
       self.onmessage = (e) => {
         const dom = attachCacheDevice(e.data);
         const data = new Uint8Array(4096).map((_, i) => (i * 7 + 3) & 0xff);
         dom.write(${segmentOffset(1) + 100}, data);
         dom.flush(${segmentOffset(1) + 100}, data.length);
         dom.fence();
         postMessage(dom.describe());
       };`,
    );
    const worker = new Worker(worker_file);
    const described = await new Promise<string>((resolve, reject) => {
      worker.onmessage = (e) => resolve(e.data);
      worker.onerror = (e) => reject(e);
      worker.postMessage(dev.attach);
    });
    worker.terminate();
    expect(described).toStartWith("msync:");
    expect(dev.domain.view(segmentOffset(1) + 100, 4096)).toEqual(new Uint8Array(4096).map((_, i) => (i * 7 + 3) & 0xff));
    dev.close();
  });
});

/** Attach a loop device to a file (root only); null when that is not possible here. */
function loopDevice(file: string): string | null {
  const r = Bun.spawnSync(["losetup", "-f", "--show", file], { stderr: "pipe" });
  if (r.exitCode !== 0) return null;
  const dev = r.stdout.toString().trim();
  cleanups.push(() => Bun.spawnSync(["losetup", "-d", dev]));
  return dev;
}

describe("block device (loop)", () => {
  test("cache device and backing device on a loop device", async () => {
    const file = join(disk_dir, "loop.img");
    writeFileSync(file, "");
    ftruncateFd(openAndKeep(file), 48 * MiB);
    const loop = loopDevice(file);
    if (loop === null) {
      console.log("note: skipped: losetup is not available (needs root)");
      return;
    }
    const dev = openCacheDevice(loop);
    expect(dev.kind).toBe("block");
    expect(dev.size_bytes).toBe(48 * MiB);
    expect(dev.domain.name).toBe("msync");
    expect(dev.domain.describe()).toContain("block device");
    writeDurable(dev.domain, segmentOffset(1) + 1, pattern(5000, 51));
    // Opened O_EXCL: a second writer is refused by the kernel, a read-only look is not.
    expect(() => openCacheDevice(loop)).toThrow(`cache device ${loop} is busy`);
    expect(() => openBackingFile(loop)).toThrow(`backing device ${loop} is busy`);
    const ro = openCacheDevice(loop, { readOnly: true });
    expect(ro.domain.view(segmentOffset(1) + 1, 5000)).toEqual(pattern(5000, 51));
    ro.close();
    dev.close();

    const back = openBackingFile(loop);
    expect(back.kind).toBe("block");
    expect(back.size_bytes).toBe(48 * MiB);
    const got = new Uint8Array(5000);
    await back.read(segmentOffset(1) + 1, got);
    expect(got).toEqual(pattern(5000, 51));
    await back.writeZeroes(segmentOffset(1), 3 * MiB + 5); // zero buffers on block devices
    await back.flush();
    await back.read(segmentOffset(1) + 1, got);
    expect(got.every((b) => b === 0)).toBe(true);
    await back.discard(0, MiB); // a no-op on block devices
    back.close();
  });
});

const kept_fds: number[] = [];
function openAndKeep(path: string): number {
  const fd = openFile(path, O_RDWR);
  kept_fds.push(fd);
  cleanups.push(() => closeFd(fd));
  return fd;
}

describe("file backing", () => {
  test("read/write round trip (also beyond 4 GiB), flush, range errors", async () => {
    const path = join(disk_dir, "backing.img");
    writeFileSync(path, "");
    ftruncateFd(openAndKeep(path), 6 * GiB);
    const b = openBackingFile(path);
    expect(b.size_bytes).toBe(6 * GiB);
    expect(b.name).toBe(path);
    const data = pattern(300_000, 61);
    for (const off of [0, 4097, 5 * GiB + 1, 6 * GiB - data.length]) {
      await b.write(off, data);
      const got = new Uint8Array(data.length);
      await b.read(off, got);
      expect(got).toEqual(data);
    }
    await b.flush();
    expect(preadFile(path, 5 * GiB + 1, data.length)).toEqual(data);

    const beyond = b.read(6 * GiB - 10, new Uint8Array(11));
    await expect(beyond).rejects.toBeInstanceOf(BackingIoError);
    await expect(b.read(6 * GiB - 10, new Uint8Array(11))).rejects.toThrow(`offset ${6 * GiB - 10} length 11`);
    await expect(b.write(-1, new Uint8Array(1))).rejects.toThrow("outside the device");
    await expect(b.writeZeroes(6 * GiB, 1)).rejects.toThrow(BackingIoError);
    expect(() => openBackingFile(path)).toThrow(`backing device ${path} is in use by another pcache process`);
    b.close();
    await expect(b.read(0, new Uint8Array(1))).rejects.toThrow("after close");
  });

  test("an attached view with sync_writes (writeback's) writes on the calling thread: same bytes, same errors", async () => {
    const path = join(disk_dir, "sync-writes.img");
    writeFileSync(path, "");
    ftruncateFd(openAndKeep(path), 5 * GiB);
    const owner = openBackingFile(path);
    const b = attachBackingFile(owner.attach, { sync_writes: true });
    const data = pattern(300_000, 62);
    for (const off of [0, 4097, 4 * GiB + 3, 5 * GiB - data.length]) {
      const p = b.write(off, data);
      // Already on the file when write() returns its promise: nothing was handed to another thread.
      expect(preadFile(path, off, data.length)).toEqual(data);
      await p;
    }
    await b.flush();
    await expect(b.write(5 * GiB - 10, new Uint8Array(11))).rejects.toThrow("outside the device");
    const ro = attachBackingFile({ ...owner.attach, read_only: true }, { sync_writes: true });
    await expect(ro.write(0, data)).rejects.toThrow("read-only");
    b.close();
    await expect(b.write(0, data)).rejects.toThrow("after close");
    owner.close();
  });

  test("writeZeroes (fallocate on files, zero buffers otherwise) and discard", async () => {
    for (const dir of [shm_dir, disk_dir]) {
      const path = join(dir, "zero.img");
      writeFileSync(path, new Uint8Array(8 * MiB).fill(0x77));
      const b = openBackingFile(path);
      await b.writeZeroes(1000, 3 * MiB);
      await b.discard(5 * MiB, MiB);
      const got = new Uint8Array(8 * MiB);
      await b.read(0, got);
      expect(got.subarray(0, 1000).every((x) => x === 0x77)).toBe(true);
      expect(got.subarray(1000, 1000 + 3 * MiB).every((x) => x === 0)).toBe(true);
      expect(got[1000 + 3 * MiB]).toBe(0x77);
      b.close();
      expect(statSync(path).size).toBe(8 * MiB);
    }
    // The zero-buffer path (used for block devices) on a regular file.
    const path = join(shm_dir, "zero-buffers.img");
    writeFileSync(path, new Uint8Array(4 * MiB).fill(0x66));
    const fd = openFile(path, O_RDWR);
    const b = new FileBacking(fd, path, "block", 4 * MiB, false);
    await b.writeZeroes(7, 2 * MiB + 3);
    const got = new Uint8Array(4 * MiB);
    await b.read(0, got);
    expect(got.subarray(0, 7).every((x) => x === 0x66)).toBe(true);
    expect(got.subarray(7, 7 + 2 * MiB + 3).every((x) => x === 0)).toBe(true);
    expect(got[7 + 2 * MiB + 3]).toBe(0x66);
    b.close();
  });

  test("read-only backing refuses writes and takes no lock", async () => {
    const path = join(shm_dir, "ro-backing.img");
    writeFileSync(path, pattern(4096, 71));
    const rw = openBackingFile(path);
    const ro = openBackingFile(path, { readOnly: true });
    const got = new Uint8Array(4096);
    await ro.read(0, got);
    expect(got).toEqual(pattern(4096, 71));
    await expect(ro.write(0, got)).rejects.toThrow("read-only");
    await expect(ro.writeZeroes(0, 1)).rejects.toThrow(PcacheError);
    ro.close();
    rw.close();
  });

  test("reads run off the JS thread: timers keep firing during a large read", async () => {
    const path = join(shm_dir, "offthread.img");
    writeFileSync(path, new Uint8Array(256 * MiB).fill(1));
    const b = openBackingFile(path, { readOnly: true });
    const dst = new Uint8Array(256 * MiB);
    let ticks = 0;
    const timer = setInterval(() => ticks++, 1);
    const t0 = performance.now();
    const pending = b.read(0, dst);
    b.close(); // deferred: the fd stays open until the read completes
    await pending;
    const read_ms = performance.now() - t0;
    clearInterval(timer);
    console.log(`note: 256 MiB read took ${read_ms.toFixed(0)} ms; ${ticks} timer ticks ran meanwhile`);
    expect(dst[256 * MiB - 1]).toBe(1);
    if (read_ms > 30) expect(ticks).toBeGreaterThan(3);
    expect(fstatFd(kept_fds[0]!).kind).toBe("file"); // unrelated fds untouched
  });
});
