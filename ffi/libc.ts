/**
 * The libc calls pcache needs that node:fs does not offer (mmap, msync, flock, MAP_SYNC, block
 * device sizes, fallocate), through bun:ffi dlopen("libc.so.6"). Linux/glibc only.
 *
 * Every failure throws SysError with errno and a readable detail. Pointers are plain numbers
 * (the `ptr` argument type accepts them, and a number costs nothing to pass); Uint8Arrays are
 * passed straight to `ptr` arguments, which hands C the address of their first byte.
 */
import { dlopen, FFIType, read, type Pointer } from "bun:ffi";
import { statSync } from "node:fs";
import { PcacheError, SysError } from "../core/errors.ts";

// ---- constants (Linux x86_64 and the generic layout of aarch64 agree on all of these) ----
export const O_RDONLY = 0;
export const O_WRONLY = 1;
export const O_RDWR = 2;
export const O_CREAT = 0o100;
export const O_EXCL = 0o200;
export const O_CLOEXEC = 0o2000000;

export const PROT_READ = 1;
export const PROT_WRITE = 2;
export const MAP_SHARED = 0x1;
export const MAP_SHARED_VALIDATE = 0x3;
export const MAP_POPULATE = 0x8000;
export const MAP_SYNC = 0x80000;
export const MS_ASYNC = 1;
export const MS_SYNC = 4;

export const LOCK_SH = 1;
export const LOCK_EX = 2;
export const LOCK_NB = 4;

export const S_IFMT = 0o170000;
export const S_IFREG = 0o100000;
export const S_IFBLK = 0o060000;
export const S_IFCHR = 0o020000;

export const FALLOC_FL_KEEP_SIZE = 0x01;
export const FALLOC_FL_PUNCH_HOLE = 0x02;
export const FALLOC_FL_ZERO_RANGE = 0x10;

/** _IOR(0x12, 114, u64): size of a block device in bytes. */
export const BLKGETSIZE64 = 0x80081272;

export const EINTR = 4;
export const EIO = 5;
export const EBADF = 9;
export const EAGAIN = 11;
export const EBUSY = 16;
export const EWOULDBLOCK = EAGAIN;
export const EINVAL = 22;
export const ENOSYS = 38;
export const EOPNOTSUPP = 95;

const ERRNO_NAMES: Record<number, string> = {
  1: "EPERM", 2: "ENOENT", 3: "ESRCH", 4: "EINTR", 5: "EIO", 6: "ENXIO", 7: "E2BIG", 9: "EBADF",
  11: "EWOULDBLOCK", 12: "ENOMEM", 13: "EACCES", 14: "EFAULT", 16: "EBUSY", 17: "EEXIST",
  19: "ENODEV", 20: "ENOTDIR", 21: "EISDIR", 22: "EINVAL", 23: "ENFILE", 24: "EMFILE",
  25: "ENOTTY", 26: "ETXTBSY", 27: "EFBIG", 28: "ENOSPC", 29: "ESPIPE", 30: "EROFS", 32: "EPIPE",
  36: "ENAMETOOLONG", 38: "ENOSYS", 40: "ELOOP", 61: "ENODATA", 75: "EOVERFLOW",
  95: "EOPNOTSUPP", 98: "EADDRINUSE", 99: "EADDRNOTAVAIL", 110: "ETIMEDOUT", 121: "EREMOTEIO", 122: "EDQUOT",
};

/** Symbolic name of an errno value ("ENOENT"), or "errno N" for the rare ones. */
export function errnoName(errno: number): string {
  return ERRNO_NAMES[errno] ?? `errno ${errno}`;
}

/** Layout of struct stat: the fields we read (x86_64 and aarch64 differ). */
const STAT_LAYOUT =
  process.arch === "arm64"
    ? { size_bytes: 128, mode_off: 16, rdev_off: 32, size_off: 48, blocks_off: 64 }
    : { size_bytes: 144, mode_off: 24, rdev_off: 40, size_off: 48, blocks_off: 64 };

const SYMBOLS = {
  open: { args: ["ptr", "i32", "i32"], returns: "i32" },
  close: { args: ["i32"], returns: "i32" },
  mmap: { args: ["ptr", "u64", "i32", "i32", "i32", "i64"], returns: "ptr" },
  munmap: { args: ["ptr", "u64"], returns: "i32" },
  madvise: { args: ["ptr", "u64", "i32"], returns: "i32" },
  msync: { args: ["ptr", "u64", "i32"], returns: "i32" },
  pread: { args: ["i32", "ptr", "u64", "i64"], returns: FFIType.i64_fast },
  pwrite: { args: ["i32", "ptr", "u64", "i64"], returns: FFIType.i64_fast },
  fdatasync: { args: ["i32"], returns: "i32" },
  fsync: { args: ["i32"], returns: "i32" },
  flock: { args: ["i32", "i32"], returns: "i32" },
  ioctl: { args: ["i32", "u64", "ptr"], returns: "i32" },
  ftruncate: { args: ["i32", "i64"], returns: "i32" },
  fallocate: { args: ["i32", "i32", "i64", "i64"], returns: "i32" },
  fstatfs: { args: ["i32", "ptr"], returns: "i32" },
  gettid: { args: [], returns: "i32" },
  setpriority: { args: ["i32", "u32", "i32"], returns: "i32" },
  sysconf: { args: ["i32"], returns: FFIType.i64_fast },
  strerror: { args: ["i32"], returns: "cstring" },
  __errno_location: { args: [], returns: "ptr" },
} as const;

function openLibc() {
  try {
    return dlopen("libc.so.6", SYMBOLS).symbols;
  } catch (e) {
    throw new PcacheError(`pcache needs glibc (libc.so.6), which failed to load: ${(e as Error).message}`);
  }
}
const libc = openLibc();

/** fstat is a real symbol since glibc 2.33; older ones only export __fxstat(_STAT_VER, ...). */
const fstatRaw: (fd: number, buf: Uint8Array) => number = (() => {
  try {
    const f = dlopen("libc.so.6", { fstat: { args: ["i32", "ptr"], returns: "i32" } }).symbols.fstat;
    return (fd, buf) => f(fd, buf);
  } catch {
    const f = dlopen("libc.so.6", { __fxstat: { args: ["i32", "i32", "ptr"], returns: "i32" } }).symbols.__fxstat;
    const stat_ver = process.arch === "arm64" ? 0 : 1;
    return (fd, buf) => f(stat_ver, fd, buf);
  }
})();

/** A number used as a C pointer (bun:ffi's Pointer type is a branded number). */
function asPtr(addr: number): Pointer {
  return addr as Pointer;
}

/** errno of the last failed call on this thread. Read it right after the call that failed. */
export function getErrno(): number {
  const loc = libc.__errno_location();
  return loc === null ? 0 : read.i32(loc, 0);
}

/** "ENOENT (No such file or directory)" */
export function describeErrno(errno: number): string {
  return `${errnoName(errno)} (${libc.strerror(errno) ?? "unknown error"})`;
}

function sysError(call: string, errno: number, what: string): SysError {
  return new SysError(call, errno, `${what}: ${describeErrno(errno)}`);
}

/** Bound on EINTR retries: a signal storm must not spin forever. */
const EINTR_RETRIES_MAX = 100;

/** Run a call that returns -1 with errno on failure, retrying on EINTR. */
function check(call: string, what: string, fn: () => number | bigint): number {
  for (let i = 0; ; i++) {
    const r = Number(fn());
    if (r !== -1) return r;
    const errno = getErrno();
    if (errno !== EINTR || i >= EINTR_RETRIES_MAX) throw sysError(call, errno, what);
  }
}

function cPath(path: string): Uint8Array {
  if (path.includes("\0")) throw new PcacheError(`invalid path (contains a NUL byte): ${JSON.stringify(path)}`);
  return new TextEncoder().encode(path + "\0");
}

/** open(2). flags from O_*; O_CLOEXEC is added so workers and children never inherit the fd. */
export function openFile(path: string, flags: number, mode = 0o644): number {
  const c_path = cPath(path);
  return check("open", path, () => libc.open(c_path, flags | O_CLOEXEC, mode));
}

/**
 * Open a cache or backing device read-write (or read-only). A block device opened for writing
 * gets O_EXCL, the kernel's exclusive claim: it fails with EBUSY while the device is mounted or
 * claimed by another program, which flock alone cannot see. `what` names it in messages
 * ("cache device /dev/pmem0").
 */
export function openDeviceFile(path: string, what: string, opts: { readOnly?: boolean; create?: boolean } = {}): number {
  let is_block = false;
  try {
    is_block = statSync(path).isBlockDevice();
  } catch {
    // Missing (maybe created below) or unreadable: open reports the real error.
  }
  const flags = opts.readOnly ? O_RDONLY : O_RDWR | (is_block ? O_EXCL : opts.create ? O_CREAT : 0);
  try {
    return openFile(path, flags, 0o600);
  } catch (e) {
    if (!(e instanceof SysError)) throw e;
    if (e.errno === EBUSY && is_block) {
      throw new PcacheError(`${what} is busy: it is mounted or opened exclusively by another program`);
    }
    throw new SysError("open", e.errno, `${what}: ${describeErrno(e.errno)}`);
  }
}

export function closeFd(fd: number): void {
  // No EINTR retry: on Linux the fd is released even when close reports EINTR.
  if (libc.close(fd) !== 0) throw sysError("close", getErrno(), `fd ${fd}`);
}

export type FileKind = "file" | "block" | "chardev" | "other";

export interface StatInfo {
  mode: number;
  kind: FileKind;
  /** st_size: meaningful for regular files only (0 for devices). */
  size_bytes: number;
  /** Allocated space in 512-byte units (shows whether a file is sparse). */
  blocks_512: number;
  rdev_major: number;
  rdev_minor: number;
}

export function fstatFd(fd: number): StatInfo {
  const buf = new Uint8Array(STAT_LAYOUT.size_bytes);
  check("fstat", `fd ${fd}`, () => fstatRaw(fd, buf));
  const dv = new DataView(buf.buffer);
  const mode = dv.getUint32(STAT_LAYOUT.mode_off, true);
  const fmt = mode & S_IFMT;
  const kind: FileKind = fmt === S_IFREG ? "file" : fmt === S_IFBLK ? "block" : fmt === S_IFCHR ? "chardev" : "other";
  // glibc's dev_t encoding: 12 bits of major and 20 of minor, split across the 64-bit value.
  const rdev = dv.getBigUint64(STAT_LAYOUT.rdev_off, true);
  const rdev_major = Number(((rdev >> 8n) & 0xfffn) | ((rdev >> 32n) & ~0xfffn));
  const rdev_minor = Number((rdev & 0xffn) | ((rdev >> 12n) & ~0xffn));
  return {
    mode,
    kind,
    size_bytes: Number(dv.getBigInt64(STAT_LAYOUT.size_off, true)),
    blocks_512: Number(dv.getBigInt64(STAT_LAYOUT.blocks_off, true)),
    rdev_major,
    rdev_minor,
  };
}

/** Size of a block device (ioctl BLKGETSIZE64). */
export function blockDeviceSize(fd: number): number {
  const out = new BigUint64Array(1);
  check("ioctl(BLKGETSIZE64)", `fd ${fd}`, () => libc.ioctl(fd, BLKGETSIZE64, out));
  return Number(out[0]);
}

const PRIO_PROCESS = 0;

/**
 * Give the calling thread a nice value (Linux nice is per thread). Best effort: returns the errno
 * text when refused, null on success.
 */
export function niceThisThread(nice: number): string | null {
  const tid = libc.gettid();
  if (libc.setpriority(PRIO_PROCESS, tid, nice) === 0) return null;
  return describeErrno(getErrno());
}

/** f_type values of file systems whose pages are the storage itself (no writeback to do). */
const TMPFS_MAGIC = 0x01021994;
const RAMFS_MAGIC = 0x858458f6;

/**
 * Is fd a file on tmpfs or ramfs? There msync has nothing to write back (the kernel's fsync of
 * shmem is a no-op), so the msync domain can skip the syscall without changing what is durable.
 */
export function onMemoryFileSystem(fd: number): boolean {
  const buf = new Uint8Array(120); // struct statfs on x86_64/aarch64; f_type is the first long
  check("fstatfs", `fd ${fd}`, () => libc.fstatfs(fd, buf));
  const f_type = Number(new DataView(buf.buffer).getBigInt64(0, true));
  return f_type === TMPFS_MAGIC || f_type === RAMFS_MAGIC;
}

/** Size in bytes of a regular file (st_size) or a block device (BLKGETSIZE64). */
export function fileSize(fd: number): number {
  const st = fstatFd(fd);
  if (st.kind === "file") return st.size_bytes;
  if (st.kind === "block") return blockDeviceSize(fd);
  throw new PcacheError(`fd ${fd} is neither a regular file nor a block device (mode 0o${st.mode.toString(8)})`);
}

/**
 * Take an exclusive, non-blocking flock. `what` names the resource for the message, e.g.
 * "cache device /dev/pmem0". The lock lives as long as the open file description (close drops it),
 * so two opens conflict even inside one process.
 */
export function lockExclusive(fd: number, what: string): void {
  for (let i = 0; ; i++) {
    if (libc.flock(fd, LOCK_EX | LOCK_NB) === 0) return;
    const errno = getErrno();
    if (errno === EINTR && i < EINTR_RETRIES_MAX) continue;
    if (errno === EWOULDBLOCK) throw new PcacheError(`${what} is in use by another pcache process (locked)`);
    throw sysError("flock", errno, what);
  }
}

export function ftruncateFd(fd: number, length_bytes: number): void {
  check("ftruncate", `fd ${fd} to ${length_bytes} bytes`, () => libc.ftruncate(fd, length_bytes));
}

/** fallocate(2); mode from FALLOC_FL_*. Throws SysError (EOPNOTSUPP when unsupported). */
export function fallocateFd(fd: number, mode: number, off: number, len: number): void {
  check("fallocate", `fd ${fd} mode 0x${mode.toString(16)} offset ${off} length ${len}`, () =>
    libc.fallocate(fd, mode, off, len),
  );
}

export function fdatasync(fd: number): void {
  check("fdatasync", `fd ${fd}`, () => libc.fdatasync(fd));
}

export function fsync(fd: number): void {
  check("fsync", `fd ${fd}`, () => libc.fsync(fd));
}

/** Read into all of dst from file offset off; returns bytes read (less only at end of file). */
export function preadInto(fd: number, dst: Uint8Array, off: number): number {
  let done = 0;
  while (done < dst.length) {
    const part = done === 0 ? dst : dst.subarray(done);
    const n = check("pread", `fd ${fd} offset ${off + done} length ${part.length}`, () =>
      libc.pread(fd, part, part.length, off + done),
    );
    if (n === 0) break;
    done += n;
  }
  return done;
}

/** Write all of src at file offset off (loops over short writes). */
export function pwriteFrom(fd: number, src: Uint8Array, off: number): void {
  let done = 0;
  while (done < src.length) {
    const part = done === 0 ? src : src.subarray(done);
    const n = check("pwrite", `fd ${fd} offset ${off + done} length ${part.length}`, () =>
      libc.pwrite(fd, part, part.length, off + done),
    );
    if (n === 0) throw sysError("pwrite", EIO, `fd ${fd} offset ${off + done}: wrote 0 bytes`);
    done += n;
  }
}

let page_size_bytes = 0;
export function pageSize(): number {
  if (page_size_bytes === 0) page_size_bytes = Number(libc.sysconf(30 /* _SC_PAGESIZE */));
  return page_size_bytes;
}

export interface MapOptions {
  readOnly?: boolean;
  /** Pre-fault every page at mmap time (about 0.8 s per GiB on tmpfs; makes first writes fast). */
  populate?: boolean;
  /** Try MAP_SHARED_VALIDATE|MAP_SYNC first (default true). */
  trySync?: boolean;
}

export interface Mapping {
  base: number;
  /** The kernel accepted MAP_SYNC: CPU cache flushes alone make stores durable (DAX). */
  sync: boolean;
}

function mmapOnce(fd: number, length_bytes: number, prot: number, flags: number): number | null {
  const p = libc.mmap(null, length_bytes, prot, flags, fd, 0);
  // MAP_FAILED ((void *)-1) comes back as the BigInt 2^64-1, not as a number.
  return typeof p === "number" && p !== 0 ? p : null;
}

/**
 * mmap the first length_bytes of fd shared. MAP_SYNC is probed first: it only succeeds on DAX
 * (EOPNOTSUPP on tmpfs and on page-cache files; EINVAL on kernels without MAP_SHARED_VALIDATE),
 * and success is what tells us stores plus cache flushes are durable.
 */
export function mapShared(fd: number, length_bytes: number, opts: MapOptions = {}): Mapping {
  const prot = opts.readOnly ? PROT_READ : PROT_READ | PROT_WRITE;
  const populate = opts.populate ? MAP_POPULATE : 0;
  if (opts.trySync ?? true) {
    const base = mmapOnce(fd, length_bytes, prot, MAP_SHARED_VALIDATE | MAP_SYNC | populate);
    if (base !== null) return { base, sync: true };
    const errno = getErrno();
    if (errno !== EOPNOTSUPP && errno !== EINVAL) throw sysError("mmap", errno, `fd ${fd} length ${length_bytes} (MAP_SYNC)`);
  }
  const base = mmapOnce(fd, length_bytes, prot, MAP_SHARED | populate);
  if (base === null) throw sysError("mmap", getErrno(), `fd ${fd} length ${length_bytes}`);
  return { base, sync: false };
}

const MADV_HUGEPAGE = 14;
const HUGE_PAGE_BYTES = 2 * 1024 * 1024;

/**
 * Ask for transparent huge pages under the whole 2 MiB pages inside [base, base + length_bytes)
 * (best effort: false when the kernel refuses or THP is off). For large, randomly walked
 * memory such as the key index, where TLB misses add to every cache miss.
 */
export function adviseHugePages(base: number, length_bytes: number): boolean {
  const start = Math.ceil(base / HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES;
  const end = Math.floor((base + length_bytes) / HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES;
  if (end <= start) return false;
  return libc.madvise(asPtr(start), end - start, MADV_HUGEPAGE) === 0;
}

export function unmap(base: number, length_bytes: number): void {
  if (libc.munmap(asPtr(base), length_bytes) !== 0) throw sysError("munmap", getErrno(), `length ${length_bytes}`);
}

/**
 * msync the pages covering [base + off, base + off + len). The range is widened to whole pages
 * (msync needs a page-aligned start; the kernel rounds the end up itself, we do it explicitly).
 */
export function msyncRange(base: number, off: number, len: number, flags = MS_SYNC): void {
  if (len <= 0) return;
  const page = pageSize();
  const start = Math.floor((base + off) / page) * page;
  const end = Math.ceil((base + off + len) / page) * page;
  if (libc.msync(asPtr(start), end - start, flags) !== 0) {
    throw sysError("msync", getErrno(), `offset ${off} length ${len}`);
  }
}
