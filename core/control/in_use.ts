/**
 * Whether a running server holds a cache device. Servers take an exclusive flock on it
 * (core/device/cache_device.ts); a reader that gets a shared flock knows none does, and holding
 * that lock keeps one from starting until the reader closes the fd, so what it reads is a
 * consistent snapshot.
 */
import { dlopen } from "bun:ffi";
import { EINTR, EWOULDBLOCK, getErrno, LOCK_NB, LOCK_SH } from "../../ffi/libc.ts";

const libc = dlopen("libc.so.6", { flock: { args: ["i32", "i32"], returns: "i32" } }).symbols;
const EINTR_RETRIES_MAX = 8;

/** Take a shared lock on fd if free: "free" (now held until fd closes) or "in_use". */
export function lockSharedIfFree(fd: number): "free" | "in_use" {
  for (let i = 0; i < EINTR_RETRIES_MAX; i++) {
    if (libc.flock(fd, LOCK_SH | LOCK_NB) === 0) return "free";
    const errno = getErrno();
    if (errno === EWOULDBLOCK) return "in_use";
    if (errno !== EINTR) break;
  }
  // flock unsupported here (some network filesystems): nothing to tell; assume it may be in use.
  return "in_use";
}
