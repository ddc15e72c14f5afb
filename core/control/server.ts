/**
 * The control socket of a running server (main thread): a unix socket, mode 0600, serving the
 * line protocol of protocol.ts — one request, one response, then the connection closes.
 *
 * Who may use it: the socket is created under umask 0177 (so it is never more open than 0600,
 * not even between bind and chmod) and chmod'ed 0600; the default folder is 0700 and checked to
 * be ours (paths.ts). On top of that each connection's peer uid is read with SO_PEERCRED and any
 * uid other than ours (or root) is refused.
 *
 * Bounds: a request line is at most REQUEST_MAX_BYTES and must arrive within REQUEST_TIMEOUT_MS;
 * at most CONTROL_CONNECTIONS_MAX connections are served at once (more are told "busy").
 */
import { chmodSync, lstatSync, unlinkSync } from "node:fs";
import type { Socket, UnixSocketListener } from "bun";
import type { Logger } from "../engine/context.ts";
import { PcacheError } from "../errors.ts";
import { removeStaleUnixSocket } from "../nbd/server.ts";
import { peerUid } from "../../ffi/socket.ts";
import { type ControlRequest, type ControlResponse, parseRequest, REQUEST_MAX_BYTES } from "./protocol.ts";
import { checkControlPath, ensurePrivateDir, isInDefaultDir } from "./paths.ts";
import { dirname } from "node:path";

export const CONTROL_CONNECTIONS_MAX = 16;
export const REQUEST_TIMEOUT_MS = 10_000;

/** Runs one request; a thrown PcacheError becomes {ok:false, error}. */
export type ControlHandler = (req: ControlRequest) => Promise<unknown>;

interface Conn {
  received: string;
  /** The request line has arrived; anything after it is ignored. */
  requested: boolean;
  out: Uint8Array | null;
  timer: ReturnType<typeof setTimeout> | undefined;
  /** Counted in open_conns (and not yet released). */
  counted: boolean;
  decoder: TextDecoder;
  /** Set when the connection is refused: sent in place of the answer, after the request arrived
   * (answering before reading would make the client's write fail and lose the message). */
  refusal: string | null;
}

export class ControlServer {
  private open_conns = 0;
  private closed = false;

  private constructor(
    readonly path: string,
    private readonly listener: UnixSocketListener<Conn>,
    private readonly ino: number,
  ) {}

  /** Listen on `path`, refusing one a live server holds; a stale socket file is replaced. */
  static async listen(path: string, handle: ControlHandler, log: Logger): Promise<ControlServer> {
    checkControlPath(path);
    if (isInDefaultDir(path)) ensurePrivateDir(dirname(path));
    try {
      await removeStaleUnixSocket(path);
    } catch (e) {
      throw new PcacheError(`control socket ${(e as Error).message}; stop that server or pass --control PATH`);
    }
    let server: ControlServer | null = null;
    const old_umask = process.umask(0o177);
    let listener: UnixSocketListener<Conn>;
    try {
      listener = Bun.listen<Conn>({
        unix: path,
        socket: {
          open: (s) => server?.onOpen(s),
          data: (s, chunk) => server?.onData(s, chunk, handle, log),
          drain: (s) => server?.flush(s),
          close: (s) => server?.onClose(s),
          error: (s) => server?.onClose(s),
        },
      });
    } catch (e) {
      throw new PcacheError(`cannot listen on control socket ${path}: ${(e as Error).message}`);
    } finally {
      process.umask(old_umask);
    }
    chmodSync(path, 0o600);
    server = new ControlServer(path, listener, lstatSync(path).ino);
    return server;
  }

  private onOpen(s: Socket<Conn>): void {
    s.data = { received: "", requested: false, out: null, timer: undefined, counted: true, decoder: new TextDecoder(), refusal: null };
    this.open_conns++;
    const uid = socketPeerUid(s);
    const me = process.getuid?.() ?? 0;
    if (this.closed) s.data.refusal = "the server is stopping";
    else if (this.open_conns > CONTROL_CONNECTIONS_MAX) s.data.refusal = "busy: too many control connections; try again";
    else if (uid !== null && uid !== me && uid !== 0) s.data.refusal = `permission denied: this server belongs to uid ${me}`;
    s.data.timer = setTimeout(() => this.answer(s, { ok: false, error: `no request within ${REQUEST_TIMEOUT_MS} ms` }), REQUEST_TIMEOUT_MS);
  }

  private onData(s: Socket<Conn>, chunk: Uint8Array, handle: ControlHandler, log: Logger): void {
    const c = s.data;
    if (c.requested) return;
    c.received += c.decoder.decode(chunk, { stream: true });
    const nl = c.received.indexOf("\n");
    if (nl < 0 && c.received.length <= REQUEST_MAX_BYTES) return;
    c.requested = true;
    clearTimeout(c.timer);
    if (nl < 0 || nl > REQUEST_MAX_BYTES) return this.answer(s, { ok: false, error: `request longer than ${REQUEST_MAX_BYTES} bytes` });
    if (c.refusal !== null) return this.answer(s, { ok: false, error: c.refusal });
    const req = parseRequest(c.received.slice(0, nl));
    if (typeof req === "string") return this.answer(s, { ok: false, error: req });
    log.debug(`control: ${req.op}`);
    handle(req).then(
      (result) => this.answer(s, { ok: true, result }),
      (err) => {
        if (!(err instanceof PcacheError)) log.error(`control ${req.op} failed: ${(err as Error)?.message ?? err}`);
        this.answer(s, { ok: false, error: (err as Error)?.message ?? String(err) });
      },
    );
  }

  /** Send the one response line of this connection and close once it is written. */
  private answer(s: Socket<Conn>, res: ControlResponse): void {
    const c = s.data;
    if (c.out !== null) return;
    c.requested = true;
    clearTimeout(c.timer);
    c.out = new TextEncoder().encode(`${JSON.stringify(res)}\n`);
    this.flush(s);
  }

  /** Write what the kernel takes; the rest goes on the next drain. */
  private flush(s: Socket<Conn>): void {
    const c = s.data;
    // Nothing to send, or the client is gone (a slow request outlived its connection).
    if (c.out === null || c.out.length === 0 || !c.counted) return;
    const n = s.write(c.out);
    c.out = c.out.subarray(Math.max(0, n));
    if (c.out.length === 0) s.end();
  }

  private onClose(s: Socket<Conn>): void {
    const c = s.data;
    if (c === undefined || !c.counted) return;
    clearTimeout(c.timer);
    c.counted = false;
    this.open_conns--;
  }

  /** Stop listening and remove the socket file, unless another server has replaced it since. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.listener.stop(true);
    try {
      if (lstatSync(this.path).ino === this.ino) unlinkSync(this.path);
    } catch {
      // Already gone.
    }
  }
}

/** Peer uid when the runtime exposes the socket's fd (Bun does, as `fd`); null otherwise. */
function socketPeerUid(s: Socket<Conn>): number | null {
  const fd = (s as unknown as { fd?: unknown }).fd;
  return typeof fd === "number" && fd >= 0 ? peerUid(fd) : null;
}
