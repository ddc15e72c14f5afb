/**
 * Errors that carry a meaning for the user. Every one has a one-line message that says what is
 * wrong and, where it helps, what to do next; the CLI maps them to exit codes and never prints a
 * stack trace for them.
 */

/** Exit codes shared by every command. */
export const EXIT_OK = 0;
/** Bad command line, refused operation, device busy, I/O trouble. */
export const EXIT_USAGE = 1;
/** The cache device's contents are invalid (corrupt, foreign or crafted image). */
export const EXIT_INVALID_DEVICE = 2;

/** A user-facing error: message is printed as is, exit_code is the process exit status. */
export class PcacheError extends Error {
  override name = "PcacheError";
  constructor(message: string, readonly exit_code: number = EXIT_USAGE) {
    super(message);
  }
}

/** The cache device holds something that fails a format check. Names the structure and position. */
export class InvalidDeviceError extends PcacheError {
  override name = "InvalidDeviceError";
  constructor(message: string) {
    super(message, EXIT_INVALID_DEVICE);
  }
}

/** A system call failed; errno is kept so callers can map it (EIO to clients, EBUSY on lock). */
export class SysError extends PcacheError {
  override name = "SysError";
  constructor(readonly call: string, readonly errno: number, detail: string) {
    super(`${call} failed: ${detail} (errno ${errno})`);
  }
}

/** The backing device failed a read, write or flush. */
export class BackingIoError extends PcacheError {
  override name = "BackingIoError";
  constructor(message: string, readonly errno: number = 5) {
    super(message);
  }
}

/** No cache space (segments, index nodes, log room) became free within the wait bound. */
export class CacheFullError extends PcacheError {
  override name = "CacheFullError";
}

/** Data CRC of a cached extent did not match its key. */
export class DataCrcError extends PcacheError {
  override name = "DataCrcError";
}
