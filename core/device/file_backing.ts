/**
 * FileBacking: the backing device as a regular file or a block device.
 *
 * Reads, writes and flushes use node:fs's callback API on our fd; Bun runs these on its
 * thread pool, so the event loop keeps serving while the disk works (measured: a 512 MiB read
 * left timer gaps of at most ~3 ms). writeZeroes and discard use fallocate through ffi, which is
 * a synchronous call on the JS thread: on regular files it only changes extent metadata (fast);
 * on block devices we write zero buffers instead, and discard is skipped (it is only a hint),
 * because the kernel would zero or discard the range synchronously and stall the thread.
 */
import * as fs from "node:fs";
import { BackingIoError, PcacheError, SysError } from "../errors.ts";
import {
  closeFd,
  describeErrno,
  EBADF,
  EIO,
  EOPNOTSUPP,
  ENOSYS,
  EINVAL,
  fallocateFd,
  FALLOC_FL_KEEP_SIZE,
  FALLOC_FL_PUNCH_HOLE,
  FALLOC_FL_ZERO_RANGE,
  fileSize,
  fstatFd,
  lockExclusive,
  openDeviceFile,
  pwriteFrom,
} from "../../ffi/libc.ts";
import type { BackingDevice } from "./backing.ts";

/** Size of the zero buffer used when fallocate cannot zero a range. */
const ZERO_CHUNK_BYTES = 1 << 20;

export interface OpenBackingOptions {
  /** Open O_RDONLY and take no lock; writes are refused. */
  readOnly?: boolean;
}

function fsRead(fd: number, dst: Uint8Array, off: number): Promise<number> {
  return new Promise((resolve, reject) => {
    fs.read(fd, dst, 0, dst.length, off, (e, n) => (e ? reject(e) : resolve(n)));
  });
}

function fsWrite(fd: number, src: Uint8Array, off: number): Promise<number> {
  return new Promise((resolve, reject) => {
    fs.write(fd, src, 0, src.length, off, (e, n) => (e ? reject(e) : resolve(n)));
  });
}

export class FileBacking implements BackingDevice {
  readonly size_bytes: number;
  readonly name: string;
  readonly kind: "file" | "block";
  readonly read_only: boolean;
  private fd: number;
  private closed = false;
  /** Operations still running on the thread pool; the fd is closed after the last one. */
  private inflight = 0;
  private zeroes: Uint8Array | null = null;

  constructor(
    fd: number,
    path: string,
    kind: "file" | "block",
    size_bytes: number,
    read_only: boolean,
    /** A borrowed fd (another thread's open) is never closed here. */
    private readonly owns_fd = true,
    /** Write with pwrite on the calling thread (see BackingAttachOptions). */
    private readonly sync_writes = false,
  ) {
    this.fd = fd;
    this.name = path;
    this.kind = kind;
    this.size_bytes = size_bytes;
    this.read_only = read_only;
  }

  private checkRange(op: string, off: number, len: number): void {
    if (this.closed) throw new BackingIoError(`backing device ${this.name}: ${op} after close`, EBADF);
    const ok = Number.isSafeInteger(off) && Number.isSafeInteger(len) && off >= 0 && len >= 0 && off + len <= this.size_bytes;
    if (!ok) {
      throw new BackingIoError(
        `backing device ${this.name}: ${op} at offset ${off} length ${len} is outside the device (size ${this.size_bytes} bytes)`,
        EINVAL,
      );
    }
  }

  private checkWritable(op: string): void {
    if (this.read_only) throw new PcacheError(`backing device ${this.name} is open read-only; ${op} refused`);
  }

  private ioError(op: string, off: number, len: number, e: unknown): BackingIoError {
    if (e instanceof BackingIoError) return e;
    const errno = e instanceof SysError ? e.errno : (e as NodeJS.ErrnoException).errno;
    const why = errno === undefined ? (e as Error).message : describeErrno(Math.abs(errno));
    const where = `backing device ${this.name}: ${op} at offset ${off} length ${len}`;
    return new BackingIoError(`${where} failed: ${why}`, errno === undefined ? EIO : Math.abs(errno));
  }

  /**
   * Run one whole operation (every chunk of it) counted as in flight, so close() never frees an
   * fd number that a pending operation still uses. Errors become BackingIoError.
   */
  private async run(op: string, off: number, len: number, body: (fd: number) => Promise<void>): Promise<void> {
    this.inflight++;
    try {
      await body(this.fd);
    } catch (e) {
      throw this.ioError(op, off, len, e);
    } finally {
      this.inflight--;
      if (this.closed && this.inflight === 0) this.release();
    }
  }

  /** Write all of src; the kernel may write less per call (at most 2 GiB - 4 KiB on Linux). */
  private async writeAll(fd: number, off: number, src: Uint8Array): Promise<void> {
    for (let done = 0; done < src.length; ) {
      const n = await fsWrite(fd, src.subarray(done), off + done);
      if (n === 0) throw new BackingIoError(`backing device ${this.name}: write made no progress at offset ${off + done}`);
      done += n;
    }
  }

  async read(off: number, dst: Uint8Array): Promise<void> {
    this.checkRange("read", off, dst.length);
    await this.run("read", off, dst.length, async (fd) => {
      for (let done = 0; done < dst.length; ) {
        const n = await fsRead(fd, dst.subarray(done), off + done);
        // The size was fixed at open; a short file now means someone truncated it under us.
        if (n === 0) throw new BackingIoError(`backing device ${this.name}: unexpected end of file at offset ${off + done}`);
        done += n;
      }
    });
  }

  async write(off: number, src: Uint8Array): Promise<void> {
    this.checkWritable("write");
    this.checkRange("write", off, src.length);
    if (this.sync_writes) {
      await this.run("write", off, src.length, async (fd) => pwriteFrom(fd, src, off));
      return;
    }
    await this.run("write", off, src.length, (fd) => this.writeAll(fd, off, src));
  }

  async flush(): Promise<void> {
    if (this.closed) throw new BackingIoError(`backing device ${this.name}: flush after close`, EBADF);
    if (this.read_only) return;
    await this.run("flush", 0, 0, (fd) => new Promise((resolve, reject) => fs.fdatasync(fd, (e) => (e ? reject(e) : resolve()))));
  }

  async writeZeroes(off: number, len: number): Promise<void> {
    this.checkWritable("write-zeroes");
    this.checkRange("write-zeroes", off, len);
    if (len === 0) return;
    if (this.kind === "file") {
      // ZERO_RANGE keeps the blocks allocated (no fragmentation later); tmpfs lacks it, so
      // punching a hole (KEEP_SIZE) is the second choice. Both read back as zeroes.
      for (const mode of [FALLOC_FL_ZERO_RANGE, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE]) {
        try {
          fallocateFd(this.fd, mode, off, len);
          return;
        } catch (e) {
          if (!(e instanceof SysError) || !isUnsupported(e.errno)) throw this.ioError("write-zeroes", off, len, e);
        }
      }
    }
    await this.writeZeroBuffers(off, len);
  }

  private async writeZeroBuffers(off: number, len: number): Promise<void> {
    this.zeroes ??= new Uint8Array(ZERO_CHUNK_BYTES);
    const zeroes = this.zeroes;
    await this.run("write-zeroes", off, len, async (fd) => {
      for (let done = 0; done < len; done += ZERO_CHUNK_BYTES) {
        await this.writeAll(fd, off + done, zeroes.subarray(0, Math.min(ZERO_CHUNK_BYTES, len - done)));
      }
    });
  }

  async discard(off: number, len: number): Promise<void> {
    this.checkWritable("discard");
    this.checkRange("discard", off, len);
    if (len === 0 || this.kind !== "file") return;
    try {
      fallocateFd(this.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, len);
    } catch (e) {
      // Best effort: a filesystem without hole punching simply keeps the data.
      if (!(e instanceof SysError) || !isUnsupported(e.errno)) throw this.ioError("discard", off, len, e);
    }
  }

  /** Refuse new operations; the fd (and with it the lock) goes once pending ones finish. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    if (this.inflight === 0) this.release();
  }

  private release(): void {
    if (this.fd < 0) return;
    const fd = this.fd;
    this.fd = -1;
    if (this.owns_fd) closeFd(fd);
  }

  /** What another thread needs to use this device through the same fd (structured-clonable). */
  get attach(): BackingAttach {
    return { fd: this.fd, name: this.name, kind: this.kind, size_bytes: this.size_bytes, read_only: this.read_only };
  }
}

function isUnsupported(errno: number): boolean {
  return errno === EOPNOTSUPP || errno === ENOSYS || errno === EINVAL;
}

export interface BackingAttach {
  fd: number;
  name: string;
  kind: "file" | "block";
  size_bytes: number;
  read_only: boolean;
}

/**
 * A worker's view of the opener's backing device: threads share the fd table, so the worker
 * uses the same fd (and so the same exclusive lock). It never closes the fd; the opener does,
 * after every worker has stopped.
 */
export function attachBackingFile(a: BackingAttach, opts: BackingAttachOptions = {}): FileBacking {
  return new FileBacking(a.fd, a.name, a.kind, a.size_bytes, a.read_only, false, opts.sync_writes ?? false);
}

export interface BackingAttachOptions {
  /**
   * write() runs pwrite on the calling thread instead of the runtime's I/O thread pool. For the
   * writeback thread only, which has nothing else to do meanwhile: a buffered write is a copy
   * into the page cache, and handing each one to the pool (two thread switches) cost more CPU
   * than the copy; the cores it freed went to the request threads.
   */
  sync_writes?: boolean;
}

/** Open a regular file or block device as the backing device (exclusive lock unless read-only). */
export function openBackingFile(path: string, opts: OpenBackingOptions = {}): FileBacking {
  const read_only = opts.readOnly ?? false;
  const fd = openDeviceFile(path, `backing device ${path}`, { readOnly: read_only });
  try {
    const st = fstatFd(fd);
    if (st.kind !== "file" && st.kind !== "block") {
      throw new PcacheError(`backing device ${path} is neither a regular file nor a block device`);
    }
    if (!read_only) lockExclusive(fd, `backing device ${path}`);
    return new FileBacking(fd, path, st.kind, fileSize(fd), read_only);
  } catch (e) {
    closeFd(fd);
    throw e;
  }
}
