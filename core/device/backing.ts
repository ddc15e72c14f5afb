/**
 * The slow device behind the cache. Implementations: FileBacking (regular file or block device,
 * core/device/file_backing.ts), MemoryBacking (tests; can simulate a crash that drops unflushed
 * writes) and FaultyBacking (tests; fails reads or writes on command).
 *
 * Every method validates its range; a failed operation rejects with BackingIoError (errno kept).
 * Reads and writes never block the caller's event loop, except writes of a FileBacking attached
 * with sync_writes (the writeback thread's, which has nothing else to run meanwhile).
 */
export interface BackingDevice {
  readonly size_bytes: number;
  /** Human name for messages (path). */
  readonly name: string;
  read(off: number, dst: Uint8Array): Promise<void>;
  write(off: number, src: Uint8Array): Promise<void>;
  /** Make every completed write durable (fdatasync). */
  flush(): Promise<void>;
  /** Make [off, off + len) read back as zeroes. */
  writeZeroes(off: number, len: number): Promise<void>;
  /** Hint that [off, off + len) is unused; contents afterwards are unspecified. */
  discard(off: number, len: number): Promise<void>;
  close(): void;
}
