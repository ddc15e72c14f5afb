/**
 * Bounded busy-wait for a socket to become readable: poll(2) with a zero timeout, in a loop
 * (core/nbd/busy_poll.ts says when it is worth it).
 */
import { dlopen } from "bun:ffi";

const POLLIN = 0x001;

const lib = dlopen("libc.so.6", {
  poll: { args: ["ptr", "u64", "i32"], returns: "i32" },
}).symbols;

/** One struct pollfd { int fd; short events; short revents; }, reused by every call (one thread). */
const pollfd = new Int32Array(2);
const pollfd_bytes = new Uint8Array(pollfd.buffer);
const pollfd_shorts = new Int16Array(pollfd.buffer);

/**
 * Polls `fd` until it is readable, shows an error or hang-up (true: the event loop will see
 * those too), or `budget_ms` has passed (false). An invalid fd also returns true (POLLNVAL),
 * so a closed socket never costs the whole budget.
 */
export function spinUntilReadable(fd: number, budget_ms: number): boolean {
  const deadline_ms = performance.now() + budget_ms;
  pollfd[0] = fd;
  pollfd_shorts[2] = POLLIN;
  do {
    pollfd_shorts[3] = 0;
    if (lib.poll(pollfd_bytes, 1, 0) !== 0) return true;
  } while (performance.now() < deadline_ms);
  return false;
}
