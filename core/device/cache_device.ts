/**
 * Opening the cache device: a regular file, a block device, or a device-dax character device.
 *
 * The main thread opens, locks and maps it once; the persistence domain is chosen by what the
 * kernel allows: MAP_SYNC accepted (fs-dax) or a devdax character device => `pmem` (stores plus
 * cache flushes are durable), anything else => `msync` (page cache, msync per flush).
 * Workers share the address space, so they attach to the same mapping by its base address
 * (attachCacheDevice) instead of mapping the device again.
 */
import { existsSync, readFileSync, realpathSync } from "node:fs";
import { PcacheError } from "../errors.ts";
import {
  closeFd,
  fileSize,
  fstatFd,
  ftruncateFd,
  lockExclusive,
  mapShared,
  openDeviceFile,
  type StatInfo,
  onMemoryFileSystem,
} from "../../ffi/libc.ts";
import type { PersistDomain, PersistDomainName } from "../persist/domain.ts";
import { MsyncDomain } from "../persist/msync.ts";
import { PmemDomain } from "../persist/pmem.ts";

export type CacheDeviceKind = "file" | "block" | "chardev";

export interface OpenCacheOptions {
  /** Map PROT_READ and take no lock (`pcache info` on a device a server is using). */
  readOnly?: boolean;
  /** Create the regular file if missing and extend it (sparse) to this size; never shrinks. */
  create_size_bytes?: number;
  /** Pre-fault the whole mapping at open (slow for large devices: about 0.8 s per GiB). */
  populate?: boolean;
}

export interface CacheDevice {
  domain: PersistDomain;
  fd: number;
  path: string;
  size_bytes: number;
  kind: CacheDeviceKind;
  /** The kernel accepted MAP_SYNC for this mapping. */
  map_sync: boolean;
  /** Address of the mapping. */
  base: number;
  /** Everything a worker needs to attach to this mapping (structured-clonable). */
  attach: AttachOptions;
  /** Unmap, close the fd and so drop the lock. */
  close(): void;
}

/** Size of a device-dax character device, from sysfs (st_size is 0 for character devices). */
function daxDeviceSize(path: string, st: StatInfo): number {
  const sys = `/sys/dev/char/${st.rdev_major}:${st.rdev_minor}`;
  let subsystem = "";
  try {
    subsystem = realpathSync(`${sys}/subsystem`);
  } catch {
    // No sysfs entry: not a device we know how to map.
  }
  if (!subsystem.endsWith("/dax") || !existsSync(`${sys}/size`)) {
    throw new PcacheError(`cache device ${path} is a character device but not a device-dax (devdax) device`);
  }
  return Number(readFileSync(`${sys}/size`, "utf8").trim());
}

export function openCacheDevice(path: string, opts: OpenCacheOptions = {}): CacheDevice {
  const read_only = opts.readOnly ?? false;
  const create = !read_only && opts.create_size_bytes !== undefined;
  const fd = openDeviceFile(path, `cache device ${path}`, { readOnly: read_only, create });
  try {
    const st = fstatFd(fd);
    if (st.kind === "other") {
      throw new PcacheError(`cache device ${path} is not a regular file, block device or device-dax character device`);
    }
    const kind: CacheDeviceKind = st.kind;
    if (!read_only) lockExclusive(fd, `cache device ${path}`);
    if (create && kind === "file" && st.size_bytes < opts.create_size_bytes!) {
      ftruncateFd(fd, opts.create_size_bytes!);
    }
    const size_bytes = kind === "chardev" ? daxDeviceSize(path, st) : fileSize(fd);
    if (!Number.isSafeInteger(size_bytes) || size_bytes <= 0) {
      throw new PcacheError(`cache device ${path} is empty (size ${size_bytes} bytes)`);
    }
    const map = mapShared(fd, size_bytes, { readOnly: read_only, populate: opts.populate });
    const memory_fs = kind === "file" && !map.sync && onMemoryFileSystem(fd);
    const attach: AttachOptions = {
      base: map.base,
      size_bytes,
      domain_name: map.sync || kind === "chardev" ? "pmem" : "msync",
      read_only,
      path,
      note: map.sync ? "MAP_SYNC" : kind === "chardev" ? "device dax" : kind === "block" ? "block device" : memory_fs ? "file on tmpfs" : "regular file",
      memory_fs,
    };
    const domain = makeDomain(attach, true);
    return {
      domain,
      fd,
      path,
      size_bytes,
      kind,
      map_sync: map.sync,
      base: map.base,
      attach,
      close() {
        domain.close();
        closeFd(fd);
      },
    };
  } catch (e) {
    closeFd(fd);
    throw e;
  }
}

export interface AttachOptions {
  base: number;
  size_bytes: number;
  domain_name: PersistDomainName;
  read_only?: boolean;
  /** Device path, for messages. */
  path?: string;
  /** How the device is mapped, for describe(). */
  note?: string;
  /** A file on tmpfs/ramfs: the msync domain skips msync, which has nothing to write there. */
  memory_fs?: boolean;
}

function makeDomain(opts: AttachOptions, owns_mapping: boolean): PersistDomain {
  const args = {
    base: opts.base,
    size_bytes: opts.size_bytes,
    read_only: opts.read_only ?? false,
    owns_mapping,
    label: `cache device ${opts.path ?? "(attached)"}`,
    note: opts.note,
    memory_fs: opts.memory_fs ?? false,
  };
  if (opts.domain_name === "pmem") return new PmemDomain(args);
  if (opts.domain_name === "msync") return new MsyncDomain(args);
  throw new PcacheError(`cannot attach a "${opts.domain_name}" domain to a mapped cache device`);
}

/**
 * A domain over a mapping made by another thread of this process: pass the opener's
 * CacheDevice.attach to the worker. It never unmaps: the opener's close() does, after every
 * worker has stopped using it.
 */
export function attachCacheDevice(opts: AttachOptions): PersistDomain {
  return makeDomain(opts, false);
}
