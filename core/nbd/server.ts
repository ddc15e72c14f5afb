/**
 * NBD server: listeners (TCP, unix socket, an inherited listening fd such as systemd socket
 * activation), stdin mode (one client on an already connected fd, like `nbdkit -s`), the
 * connection cap and graceful stop. Everything below the listener is per connection
 * (connection.ts). No process-wide state: no signal handlers, no process.exit, no stdout,
 * so a request worker can run one of these.
 *
 * Measured on Bun 1.4.5 (see the NBD layer report):
 *  - Bun.listen({fd}) adopts an inherited listening socket, TCP or unix (socket activation);
 *  - Bun.connect({fd}) adopts an already connected socket (stdin mode); node:net
 *    `new Socket({fd})` did not deliver data in Bun;
 *  - Bun.listen({hostname, port, reusePort: true}) in several workers spreads TCP connections
 *    (SO_REUSEPORT); for unix sockets reusePort fails with EADDRINUSE, but every worker may
 *    call Bun.listen({fd}) on one shared listening fd (threads share the fd table).
 */
import { lstatSync, unlinkSync } from "node:fs";
import { PcacheError } from "../errors.ts";
import { assert } from "../assert.ts";
import { BufferPool } from "./buffer_pool.ts";
import { BusyPoll, type BusyPollOptions, type BusyPollStats } from "./busy_poll.ts";
import { NbdConnection, DEFAULT_CONNECTION_LIMITS, type ConnectionLimits, type NbdSocket, type ServerLoad } from "./connection.ts";
import type { NbdExport } from "./export.ts";
import type { ExportConfig } from "./handshake.ts";
import { describeError, stderrLogger, type NbdLogger } from "./logger.ts";
import { BLOCK_SIZE_PREFERRED_DEFAULT, STRING_BYTES_MAX, utf8 } from "./wire.ts";

export const DEFAULT_NBD_PORT = 10809;
export const DEFAULT_NBD_HOST = "127.0.0.1";
/** Loopback only unless told otherwise. */
export const DEFAULT_LISTEN_ADDRESS: ListenAddress = { kind: "tcp", host: DEFAULT_NBD_HOST, port: DEFAULT_NBD_PORT };
/** First fd passed by systemd socket activation (SD_LISTEN_FDS_START). */
export const SD_LISTEN_FDS_START = 3;

export type ListenAddress =
  | { kind: "tcp"; host: string; port: number; reuse_port?: boolean }
  | { kind: "unix"; path: string }
  /** An already listening socket (TCP or unix) inherited from the parent, e.g. socket activation. */
  | { kind: "fd"; fd: number };

/** Where a listener ended up (the real port when 0 was asked for). */
export type ListenInfo =
  | { kind: "tcp"; host: string; port: number }
  | { kind: "unix"; path: string }
  | { kind: "fd"; fd: number };

/**
 * Parses `tcp://HOST:PORT`, `tcp://[V6]:PORT`, `tcp://HOST` (port 10809), `HOST:PORT`,
 * `unix:PATH` (also `unix://PATH`) and `fd:N`.
 */
export function parseListenAddress(spec: string): ListenAddress {
  const bad = (why: string) => new PcacheError(`bad NBD listen address "${spec}": ${why}`);
  if (spec.startsWith("unix:")) {
    const path = spec.startsWith("unix://") ? spec.slice("unix://".length) : spec.slice("unix:".length);
    if (path.length === 0) throw bad("empty socket path");
    return { kind: "unix", path };
  }
  if (spec.startsWith("fd:")) {
    const fd = Number(spec.slice(3));
    if (!Number.isInteger(fd) || fd < 0) throw bad("fd must be a non-negative integer");
    return { kind: "fd", fd };
  }
  const rest = spec.startsWith("tcp://") ? spec.slice("tcp://".length) : spec;
  let host: string;
  let port_text: string | undefined;
  if (rest.startsWith("[")) {
    const close = rest.indexOf("]");
    if (close < 0) throw bad("unterminated [IPv6] host");
    host = rest.slice(1, close);
    const after = rest.slice(close + 1);
    if (after.length > 0) {
      if (!after.startsWith(":")) throw bad("expected :PORT after ]");
      port_text = after.slice(1);
    }
  } else {
    const colon = rest.lastIndexOf(":");
    host = colon < 0 ? rest : rest.slice(0, colon);
    port_text = colon < 0 ? undefined : rest.slice(colon + 1);
  }
  if (host.length === 0) throw bad("empty host");
  const port = port_text === undefined ? DEFAULT_NBD_PORT : Number(port_text);
  if (!Number.isInteger(port) || port < 0 || port > 65535) throw bad("port must be 0..65535");
  return { kind: "tcp", host, port };
}

/**
 * The listening fd passed by systemd-style socket activation, or null. The protocol:
 * LISTEN_PID equals our pid and LISTEN_FDS >= 1 => fds 3 .. 3+N-1 are listening sockets. We
 * serve the first. With `unset` the variables are removed so children do not inherit them.
 */
export function socketActivationFd(
  env: Record<string, string | undefined> = process.env,
  pid: number = process.pid,
  unset = true,
): number | null {
  const listen_pid = env.LISTEN_PID;
  const listen_fds = env.LISTEN_FDS;
  if (listen_pid === undefined || listen_fds === undefined) return null;
  const ok = Number(listen_pid) === pid && Number.isInteger(Number(listen_fds)) && Number(listen_fds) >= 1;
  if (unset) {
    delete env.LISTEN_PID;
    delete env.LISTEN_FDS;
    delete env.LISTEN_FDNAMES;
  }
  return ok ? SD_LISTEN_FDS_START : null;
}

export interface NbdServerOptions {
  export: NbdExport;
  /** Canonical export name; "" (the default) always matches too. */
  export_name?: string;
  description?: string;
  /** Advertised preferred block size (power of two >= 512). Default 4096. */
  block_size_preferred?: number;
  /** Connections beyond this are closed at once. Default 64. */
  max_connections?: number;
  limits?: Partial<ConnectionLimits>;
  /** Busy-poll after replies (core/nbd/busy_poll.ts); absent or a budget of 0 never spins. */
  busy_poll?: BusyPollOptions;
  log?: NbdLogger;
  /** A cap shared with other servers of the process (one per request worker). */
  gate?: ConnectionGate;
  /** Told whenever the number of open connections changes. */
  on_connections?: (open: number) => void;
}

/** Admission across several NbdServers (e.g. a counter in shared memory). */
export interface ConnectionGate {
  /** Claims a place; false when every place is taken. */
  tryAcquire(): boolean;
  release(): void;
  readonly max: number;
}

/** What Bun's listen/connect sockets look like to us (kept minimal to stay version-proof). */
interface BunSocket extends NbdSocket {
  data: NbdConnection | undefined;
  setNoDelay?(no_delay?: boolean): boolean;
  remoteAddress?: string;
}

interface BunListener {
  stop(close_active_connections?: boolean): void;
  port?: number;
}

/**
 * Bun.listen and Bun.connect with the option shapes we use. bun-types 1.4.5 does not declare
 * `fd` for either, nor `reusePort` for listen, although both work (measured); one untyped
 * entry point keeps the casts in one place.
 */
const bunListen = Bun.listen as unknown as (opts: Record<string, unknown>) => BunListener;
const bunConnect = Bun.connect as unknown as (opts: Record<string, unknown>) => Promise<BunSocket>;

const NO_BUSY_POLL: BusyPollStats = Object.freeze({ spins: 0, hits: 0, spin_ms: 0 });

export class NbdServer {
  private readonly config: ExportConfig;
  private readonly limits: ConnectionLimits;
  private readonly log: NbdLogger;
  private readonly max_connections: number;
  private readonly gate: ConnectionGate | undefined;
  private readonly on_connections: (open: number) => void;
  private readonly connections = new Set<NbdConnection>();
  private readonly listeners: Array<{ listener: BunListener; info: ListenInfo }> = [];
  private next_id = 1;
  private at_cap = false;
  private stopping: Promise<void> | null = null;
  /** Separate pools so a reused buffer only ever held the same kind of data (see buffer_pool.ts). */
  private readonly read_pool = new BufferPool();
  private readonly busy_poll: BusyPoll | null;
  private readonly load: ServerLoad = { inflight: 0, pipelined: 0 };
  private readonly is_only_connection = () => this.connections.size === 1;

  constructor(opts: NbdServerOptions) {
    const name = opts.export_name ?? "";
    const description = opts.description ?? "";
    if (utf8(name).length > STRING_BYTES_MAX) throw new PcacheError("export name longer than 4096 bytes");
    if (utf8(description).length > STRING_BYTES_MAX) throw new PcacheError("export description longer than 4096 bytes");
    const pref = opts.block_size_preferred ?? BLOCK_SIZE_PREFERRED_DEFAULT;
    if (!(Number.isInteger(pref) && pref >= 512 && pref <= 32 * 1024 * 1024 && (pref & (pref - 1)) === 0)) {
      throw new PcacheError("preferred block size must be a power of two between 512 and 32 MiB");
    }
    const size = opts.export.size_bytes;
    if (!(Number.isSafeInteger(size) && size >= 0)) throw new PcacheError("export size must be a safe integer");
    this.config = { name, description, export: opts.export, block_size_preferred: pref };
    this.limits = { ...DEFAULT_CONNECTION_LIMITS, ...opts.limits };
    // Connections get null rather than a poller that is off, so they keep no pace for nothing.
    this.busy_poll = opts.busy_poll && opts.busy_poll.budget_us > 0 ? new BusyPoll(opts.busy_poll) : null;
    this.log = opts.log ?? stderrLogger("info");
    this.max_connections = opts.max_connections ?? 64;
    assert(this.max_connections >= 1, "max_connections >= 1");
    this.gate = opts.gate;
    this.on_connections = opts.on_connections ?? (() => {});
  }

  /** Open connections (any phase). */
  get connection_count(): number {
    return this.connections.size;
  }

  /** Requests dispatched pipelined on this server (ServerLoad; core/writeback/defer.ts). */
  get pipelined_requests(): number {
    return this.load.pipelined;
  }

  /** Busy-poll counters of this server's connections (zeros when busy-polling is off). */
  get busy_poll_stats(): Readonly<BusyPollStats> {
    return this.busy_poll?.stats ?? NO_BUSY_POLL;
  }

  get listening(): ReadonlyArray<ListenInfo> {
    return this.listeners.map((l) => l.info);
  }

  /**
   * Starts listening (default tcp://127.0.0.1:10809). May be called more than once (e.g. TCP
   * and a unix socket). Throws PcacheError when the address is busy or invalid.
   */
  async listen(address: ListenAddress | string = DEFAULT_LISTEN_ADDRESS): Promise<ListenInfo> {
    if (this.stopping) throw new PcacheError("NBD server is stopping");
    const addr = typeof address === "string" ? parseListenAddress(address) : address;
    const socket = this.handlers();
    let listener: BunListener;
    let info: ListenInfo;
    try {
      if (addr.kind === "tcp") {
        // reusePort is accepted by Bun.listen at run time although bun-types only declares it for connect.
        listener = bunListen({ hostname: addr.host, port: addr.port, reusePort: addr.reuse_port ?? false, socket });
        info = { kind: "tcp", host: addr.host, port: listener.port ?? addr.port };
      } else if (addr.kind === "unix") {
        await removeStaleUnixSocket(addr.path);
        listener = bunListen({ unix: addr.path, socket });
        info = { kind: "unix", path: addr.path };
      } else {
        listener = bunListen({ fd: addr.fd, socket });
        info = { kind: "fd", fd: addr.fd };
      }
    } catch (e) {
      if (e instanceof PcacheError) throw e;
      throw new PcacheError(`cannot listen on ${describeAddress(addr)}: ${describeError(e)}`);
    }
    this.listeners.push({ listener, info });
    this.log("info", `listening on ${describeAddress(info)}`);
    return info;
  }

  /**
   * Stdin mode: serves the one client already connected on `fd` (0 by default, like
   * `nbdkit -s`). Resolves when that connection closes. Stdout may be the same socket, so
   * the logger must not write to stdout (the default logger writes to stderr).
   */
  async serveFd(fd = 0): Promise<void> {
    if (this.stopping) throw new PcacheError("NBD server is stopping");
    let sock: BunSocket;
    try {
      sock = await bunConnect({ fd, socket: this.handlers() });
    } catch (e) {
      throw new PcacheError(`cannot serve NBD on fd ${fd}: ${describeError(e)}`);
    }
    const conn = sock.data;
    if (conn) await conn.closed;
  }

  /**
   * Graceful stop: stop accepting, answer new requests ESHUTDOWN (new options
   * ERR_SHUTDOWN), let requests in flight finish, close every connection. Connections still
   * busy after `timeout_ms` are closed hard.
   */
  stop(opts: { timeout_ms?: number } = {}): Promise<void> {
    if (this.stopping) return this.stopping;
    this.stopping = this.doStop(opts.timeout_ms ?? 30_000);
    return this.stopping;
  }

  private async doStop(timeout_ms: number): Promise<void> {
    for (const { listener, info } of this.listeners) {
      try {
        listener.stop(false);
      } catch (e) {
        this.log("warn", `stopping listener ${describeAddress(info)}: ${describeError(e)}`);
      }
      if (info.kind === "unix") unlinkQuietly(info.path);
    }
    this.listeners.length = 0;
    const conns = [...this.connections];
    for (const c of conns) c.shutdown();
    const all_closed = Promise.all(conns.map((c) => c.closed));
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timed_out = await Promise.race([
      all_closed.then(() => false),
      new Promise<boolean>((resolve) => (timer = setTimeout(() => resolve(true), timeout_ms))),
    ]);
    clearTimeout(timer);
    if (timed_out) {
      for (const c of this.connections) {
        this.log("warn", `${c.label}: still busy ${timeout_ms} ms after stop, closing`);
        c.abort("stop timeout");
      }
      await all_closed;
    }
  }

  private handlers() {
    return {
      open: (s: BunSocket) => this.accept(s),
      data: (s: BunSocket, chunk: Uint8Array) => s.data?.onData(chunk),
      drain: (s: BunSocket) => s.data?.onDrain(),
      close: (s: BunSocket) => {
        const conn = s.data;
        if (!conn) return;
        this.connections.delete(conn);
        this.gate?.release();
        this.on_connections(this.connections.size);
        conn.onClose();
        this.log("debug", `${conn.label}: closed`);
      },
      error: (s: BunSocket, e: Error) => {
        this.log("debug", `${s.data?.label ?? "connection"}: socket error: ${describeError(e)}`);
      },
    };
  }

  private accept(s: BunSocket): void {
    s.data = undefined;
    if (this.stopping) {
      s.end();
      return;
    }
    if (this.connections.size >= this.max_connections || (this.gate && !this.gate.tryAcquire())) {
      // One line when the cap is reached, not one per refused connection (a flood stays quiet).
      if (!this.at_cap) this.log("warn", `connection cap reached (${this.gate?.max ?? this.max_connections} open): refusing new connections until one closes`);
      this.at_cap = true;
      s.end();
      return;
    }
    this.at_cap = false;
    try {
      s.setNoDelay?.(true);
    } catch {
      // Not a TCP socket (unix, or an fd of another kind); nothing to do.
    }
    const id = this.next_id++;
    const peer = s.remoteAddress ? ` ${s.remoteAddress}` : "";
    const conn = new NbdConnection(s, {
      config: this.config,
      limits: this.limits,
      log: this.log,
      label: `conn#${id}${peer}`,
      read_pool: this.read_pool,
      busy_poll: this.busy_poll,
      is_only_connection: this.is_only_connection,
      load: this.load,
    });
    s.data = conn;
    this.connections.add(conn);
    this.on_connections(this.connections.size);
    this.log("debug", `${conn.label}: accepted`);
    conn.start();
  }
}

export function describeAddress(a: ListenAddress | ListenInfo): string {
  switch (a.kind) {
    case "tcp":
      return a.host.includes(":") ? `tcp://[${a.host}]:${a.port}` : `tcp://${a.host}:${a.port}`;
    case "unix":
      return `unix:${a.path}`;
    case "fd":
      return `fd:${a.fd}`;
  }
}

/** Removes a leftover socket file nobody listens on; refuses to steal a live one. */
export async function removeStaleUnixSocket(path: string): Promise<void> {
  let is_socket = false;
  try {
    is_socket = lstatSync(path).isSocket();
  } catch {
    return; // does not exist
  }
  if (!is_socket) throw new PcacheError(`${path} exists and is not a socket`);
  const live = await new Promise<boolean>((resolve) => {
    Bun.connect({
      unix: path,
      socket: {
        open(s) {
          s.end();
          resolve(true);
        },
        connectError() {
          resolve(false);
        },
        data() {},
      },
    }).catch(() => resolve(false));
  });
  if (live) throw new PcacheError(`${path} is in use by another server`);
  unlinkQuietly(path);
}

export function unlinkQuietly(path: string): void {
  try {
    if (lstatSync(path).isSocket()) unlinkSync(path);
  } catch {
    // Already gone.
  }
}
