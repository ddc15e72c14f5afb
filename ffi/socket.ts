/**
 * Listening sockets made by the main thread, so that every request worker can accept on the
 * same socket: threads share the fd table, and each worker adopts a dup of the fd with
 * Bun.listen({fd}). Binding here (not with SO_REUSEPORT in each worker) means a second server
 * on the same port fails with EADDRINUSE instead of silently sharing our connections.
 */
import { dlopen } from "bun:ffi";
import { isIP } from "node:net";
import { PcacheError } from "../core/errors.ts";
import { closeFd, describeErrno, getErrno } from "./libc.ts";

const AF_UNIX = 1;
const AF_INET = 2;
const AF_INET6 = 10;
const SOCK_STREAM = 1;
const SOCK_CLOEXEC = 0o2000000;
const SOL_SOCKET = 1;
const SO_REUSEADDR = 2;
const IPPROTO_IPV6 = 41;
const IPV6_V6ONLY = 26;
const SO_PEERCRED = 17;
const F_DUPFD_CLOEXEC = 1030;
/** sun_path is 108 bytes including the terminating NUL. */
const UNIX_PATH_MAX_BYTES = 107;
export const LISTEN_BACKLOG = 128;

const sock = dlopen("libc.so.6", {
  socket: { args: ["i32", "i32", "i32"], returns: "i32" },
  bind: { args: ["i32", "ptr", "u32"], returns: "i32" },
  listen: { args: ["i32", "i32"], returns: "i32" },
  setsockopt: { args: ["i32", "i32", "i32", "ptr", "u32"], returns: "i32" },
  getsockopt: { args: ["i32", "i32", "i32", "ptr", "ptr"], returns: "i32" },
  getsockname: { args: ["i32", "ptr", "ptr"], returns: "i32" },
  fcntl: { args: ["i32", "i32", "i32"], returns: "i32" },
  poll: { args: ["ptr", "u64", "i32"], returns: "i32" },
}).symbols;

function fail(call: string, what: string): never {
  const errno = getErrno();
  throw new PcacheError(`cannot ${what}: ${call}: ${describeErrno(errno)}`);
}

/** A new fd for the same open socket (close-on-exec). */
export function dupFd(fd: number): number {
  const r = sock.fcntl(fd, F_DUPFD_CLOEXEC, 3);
  if (r < 0) fail("fcntl", `dup of fd ${fd}`);
  return r;
}

function sockaddrUnix(path: string): Uint8Array {
  const bytes = new TextEncoder().encode(path);
  if (bytes.length > UNIX_PATH_MAX_BYTES) throw new PcacheError(`unix socket path is ${bytes.length} bytes; at most ${UNIX_PATH_MAX_BYTES} fit: ${path}`);
  if (bytes.includes(0)) throw new PcacheError(`unix socket path contains a NUL byte: ${JSON.stringify(path)}`);
  const sa = new Uint8Array(2 + 108);
  new DataView(sa.buffer).setUint16(0, AF_UNIX, true);
  sa.set(bytes, 2);
  return sa;
}

function ipv6Bytes(host: string): Uint8Array {
  // Expand "::" and an embedded IPv4 tail into 8 groups.
  let text = host;
  const v4 = text.match(/(\d+\.\d+\.\d+\.\d+)$/);
  if (v4) {
    const p = v4[1].split(".").map(Number);
    text = `${text.slice(0, -v4[1].length)}${((p[0] << 8) | p[1]).toString(16)}:${((p[2] << 8) | p[3]).toString(16)}`;
  }
  const [head, tail] = text.includes("::") ? text.split("::") : [text, undefined];
  const h = head ? head.split(":") : [];
  const t = tail ? tail.split(":") : [];
  const groups = tail === undefined ? h : [...h, ...Array(8 - h.length - t.length).fill("0"), ...t];
  const out = new Uint8Array(16);
  groups.forEach((g, i) => {
    const v = parseInt(g, 16);
    out[2 * i] = v >> 8;
    out[2 * i + 1] = v & 0xff;
  });
  return out;
}

function sockaddrIp(ip: string, port: number): Uint8Array {
  if (isIP(ip) === 4) {
    const sa = new Uint8Array(16);
    const dv = new DataView(sa.buffer);
    dv.setUint16(0, AF_INET, true);
    dv.setUint16(2, port, false);
    ip.split(".").forEach((p, i) => (sa[4 + i] = Number(p)));
    return sa;
  }
  const sa = new Uint8Array(28);
  const dv = new DataView(sa.buffer);
  dv.setUint16(0, AF_INET6, true);
  dv.setUint16(2, port, false);
  sa.set(ipv6Bytes(ip), 8);
  return sa;
}

async function resolveHost(host: string): Promise<string> {
  if (isIP(host)) return host;
  try {
    const r = await Bun.dns.lookup(host, {});
    if (r.length > 0) return r[0].address;
  } catch (e) {
    throw new PcacheError(`cannot resolve listen host "${host}": ${(e as Error).message}`);
  }
  throw new PcacheError(`cannot resolve listen host "${host}": no addresses`);
}

function openListening(family: number, sa: Uint8Array, what: string, prepare: (fd: number) => void): number {
  const fd = sock.socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) fail("socket", what);
  try {
    prepare(fd);
    if (sock.bind(fd, sa, sa.length) !== 0) fail("bind", what);
    if (sock.listen(fd, LISTEN_BACKLOG) !== 0) fail("listen", what);
    return fd;
  } catch (e) {
    closeFd(fd);
    throw e;
  }
}

function setIntOption(fd: number, level: number, name: number, value: number, what: string): void {
  const v = new Int32Array([value]);
  if (sock.setsockopt(fd, level, name, v, 4) !== 0) fail("setsockopt", what);
}

/** Port actually bound (when 0 was asked for). */
function boundPort(fd: number): number {
  const sa = new Uint8Array(28);
  const len = new Uint32Array([sa.length]);
  if (sock.getsockname(fd, sa, len) !== 0) fail("getsockname", `fd ${fd}`);
  return new DataView(sa.buffer).getUint16(2, false);
}

export interface TcpListening {
  fd: number;
  host: string;
  port: number;
}

/** A listening TCP socket (SO_REUSEADDR so a restart can rebind at once; never SO_REUSEPORT). */
export async function listenTcp(host: string, port: number): Promise<TcpListening> {
  const ip = await resolveHost(host);
  const what = `listen on tcp://${host.includes(":") ? `[${host}]` : host}:${port}`;
  const family = isIP(ip) === 4 ? AF_INET : AF_INET6;
  const fd = openListening(family, sockaddrIp(ip, port), what, (s) => {
    setIntOption(s, SOL_SOCKET, SO_REUSEADDR, 1, what);
    if (family === AF_INET6) setIntOption(s, IPPROTO_IPV6, IPV6_V6ONLY, 1, what);
  });
  return { fd, host, port: port === 0 ? boundPort(fd) : port };
}

/** A listening unix socket at `path` (the caller removes stale files first and unlinks at exit). */
export function listenUnix(path: string): number {
  return openListening(AF_UNIX, sockaddrUnix(path), `listen on unix:${path}`, () => {});
}

/** The uid of the process at the other end of a connected unix socket (SO_PEERCRED), or null. */
export function peerUid(fd: number): number | null {
  const cred = new Int32Array(3); // struct ucred: pid, uid, gid
  const len = new Uint32Array([cred.byteLength]);
  if (sock.getsockopt(fd, SOL_SOCKET, SO_PEERCRED, cred, len) !== 0 || len[0] < 8) return null;
  return cred[1] >>> 0;
}

const POLLIN = 0x001;
/** One struct pollfd { int fd; short events; short revents; }, reused by every call (one thread). */
const pollfd = new Int32Array(2);
const pollfd_bytes = new Uint8Array(pollfd.buffer);
const pollfd_shorts = new Int16Array(pollfd.buffer);

/**
 * Busy-waits (poll(2) with a zero timeout, in a loop) until `fd` is readable, shows an error or
 * hang-up (true: the event loop will see those too), or `budget_ms` has passed (false). An
 * invalid fd also returns true (POLLNVAL), so a closed socket never costs the whole budget.
 * core/nbd/busy_poll.ts says when this is worth it.
 */
export function spinUntilReadable(fd: number, budget_ms: number): boolean {
  const deadline_ms = performance.now() + budget_ms;
  pollfd[0] = fd;
  pollfd_shorts[2] = POLLIN;
  do {
    pollfd_shorts[3] = 0;
    if (sock.poll(pollfd_bytes, 1, 0) !== 0) return true;
  } while (performance.now() < deadline_ms);
  return false;
}
