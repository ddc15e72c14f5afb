/**
 * One NBD client connection: framing of the byte stream (partial frames are buffered), the
 * handshake and transmission state machine, a bounded number of requests in flight that may
 * complete in any order, and a write queue for what the socket did not take.
 *
 * Bun's socket.write() returns how many bytes the kernel took and keeps nothing
 * (bun-platform-notes §5): the rest is queued here and written on `drain`, and new replies go
 * behind it so bytes never interleave. Every reply is built as one buffer and is one write.
 *
 * Back-pressure: while the requests in flight, their payload bytes, or the queued reply bytes
 * are at their caps, no new request is parsed and the socket is paused, so a client that
 * floods requests or never reads replies is held by TCP flow control, not by our memory.
 */
import { BufferPool } from "./buffer_pool.ts";
import { ClientPace, type BusyPoll } from "./busy_poll.ts";
import { Handshake, type ExportConfig, type HandshakeLimits } from "./handshake.ts";
import type { WriteData } from "./export.ts";
import { describeError, type NbdLogger } from "./logger.ts";
import { RecvBuffer } from "./recv_buffer.ts";
import {
  copyRequest,
  errorReply,
  execute,
  validateRequest,
  writePayloadPlan,
  type Rejection,
  type Request,
  type Session,
} from "./transmission.ts";
import * as W from "./wire.ts";

/** The part of a socket the connection uses (Bun's Socket satisfies it). */
export interface NbdSocket {
  /** Returns the number of bytes taken; the caller keeps the rest. */
  write(data: Uint8Array): number;
  end(): void;
  pause(): void;
  resume(): void;
  /** The socket's file descriptor, where the runtime exposes it (for the busy-poll). */
  readonly fd?: number;
}

export interface ConnectionLimits extends HandshakeLimits {
  /** A connection that has not reached transmission after this long is closed. */
  handshake_timeout_ms: number;
  /** Requests dispatched to the export and not yet answered. */
  inflight_max: number;
  /** READ lengths plus WRITE payloads of requests in flight (one request may exceed it alone). */
  inflight_bytes_max: number;
  /** Reply bytes waiting for the socket; above this no new request is started. */
  write_queue_bytes_max: number;
}

export const DEFAULT_CONNECTION_LIMITS: ConnectionLimits = {
  option_bytes_max: 64 * 1024,
  options_max: 32,
  handshake_timeout_ms: 10_000,
  inflight_max: 64,
  inflight_bytes_max: 64 * 1024 * 1024,
  write_queue_bytes_max: 16 * 1024 * 1024,
};

/** Replies joined into one socket write: at most this many bytes per connection (made on first use). */
const STAGING_BYTES = 128 * 1024;
/** Larger messages are written on their own (copying them would cost more than the syscall). */
const COALESCE_MESSAGE_MAX_BYTES = 16 * 1024;

const enum Phase {
  CLIENT_FLAGS,
  OPTION_HEADER,
  OPTION_DATA,
  REQUEST_HEADER,
  WRITE_PAYLOAD,
  SKIP_PAYLOAD,
  /** DISC received or ABORT answered: nothing more is parsed; close once replies are out. */
  FINISHING,
  CLOSED,
}

export interface ConnectionOptions {
  config: ExportConfig;
  limits: ConnectionLimits;
  log: NbdLogger;
  label: string;
  /** Shared by the connections of one server: READ reply buffers. */
  read_pool: BufferPool;
  /** Shared by the connections of one server; null: never busy-poll. */
  busy_poll: BusyPoll | null;
  /** True while this is the server's only open connection. */
  is_only_connection: () => boolean;
  /** Shared by the connections of one server: requests in flight, and how many began pipelined. */
  load: ServerLoad;
}

export interface ServerLoad {
  /** Requests dispatched and not yet answered, over every connection of the server. */
  inflight: number;
  /**
   * Requests dispatched while another was in flight or with more bytes already received after
   * them: clients that keep a queue, not one at a time.
   */
  pipelined: number;
}

export class NbdConnection {
  readonly label: string;
  /** Resolves when the socket has closed, for whatever reason. */
  readonly closed: Promise<void>;
  private resolve_closed!: () => void;

  private phase = Phase.CLIENT_FLAGS;
  /** Chunks come from Bun's socket only, so they are released as soon as they are spent. */
  private readonly recv = new RecvBuffer({ release_chunks: true });
  private readonly handshake: Handshake;
  private session: (Session & { shutting_down: boolean }) | null = null;
  private shutting_down = false;
  private handshake_timer: ReturnType<typeof setTimeout> | null = null;

  /** Option being received. */
  private option = 0;
  private option_bytes = 0;
  /** WRITE whose payload is being received or skipped. */
  private pending: Request | null = null;
  private pending_rejection: Rejection | null = null;
  private skip_left = 0;

  private inflight = 0;
  private inflight_bytes = 0;
  private readonly queue: Uint8Array[] = [];
  private queued_bytes = 0;
  /** A setImmediate will write the queued replies (they wait for their neighbours' replies). */
  private batch_scheduled = false;
  /** Replies were queued inside the parse loop: pump() writes them when the loop stops. */
  private flush_after_parse = false;
  /** Where small queued messages are joined into one socket write (made on first use). */
  private staging: Uint8Array | null = null;
  private reading_paused = false;
  /** The last parse stopped before a request header because a cap was reached. */
  private blocked_on_caps = false;
  /** end() has been called (or must be, once the queue is empty). */
  private close_when_flushed = false;
  private ended = false;
  private is_closed = false;
  private pumping = false;
  private readonly hdr = W.newRequestHeader();
  /** Null when busy-polling is off. */
  private readonly pace: ClientPace | null;

  constructor(
    private readonly socket: NbdSocket,
    private readonly opts: ConnectionOptions,
  ) {
    this.label = opts.label;
    this.handshake = new Handshake(opts.config, opts.limits);
    this.pace = opts.busy_poll ? new ClientPace(opts.busy_poll) : null;
    this.closed = new Promise((resolve) => (this.resolve_closed = resolve));
  }

  /** In transmission phase (for the server's bookkeeping and tests). */
  get in_transmission(): boolean {
    return this.session !== null && !this.is_closed;
  }

  get requests_in_flight(): number {
    return this.inflight;
  }

  /** Sends the greeting and starts the handshake timer. */
  start(): void {
    this.handshake_timer = setTimeout(() => {
      this.handshake_timer = null;
      this.drop(`handshake not finished within ${this.opts.limits.handshake_timeout_ms} ms`);
    }, this.opts.limits.handshake_timeout_ms);
    this.send(this.handshake.greeting());
  }

  onData(chunk: Uint8Array): void {
    if (this.is_closed || this.ended || this.phase === Phase.FINISHING) return;
    this.pace?.onData();
    this.recv.push(chunk);
    this.pump();
  }

  onDrain(): void {
    if (this.is_closed) return;
    this.flushQueue();
    this.pump();
  }

  /** The socket closed (peer hung up, error, or our end()). In-flight replies are discarded. */
  onClose(): void {
    if (this.is_closed) return;
    this.is_closed = true;
    this.phase = Phase.CLOSED;
    this.clearHandshakeTimer();
    this.recv.clear();
    this.queue.length = 0;
    this.queued_bytes = 0;
    this.resolve_closed();
  }

  /**
   * Graceful shutdown: a connection still negotiating is closed (an option already arriving
   * gets ERR_SHUTDOWN first); in transmission, new requests get ESHUTDOWN, requests in flight
   * finish, and the connection closes once it is idle.
   */
  shutdown(): void {
    if (this.is_closed || this.shutting_down) return;
    this.shutting_down = true;
    if (this.session) {
      this.session.shutting_down = true;
      this.pump();
      return;
    }
    const between_options =
      this.phase === Phase.CLIENT_FLAGS || (this.phase === Phase.OPTION_HEADER && this.recv.length === 0);
    if (between_options) this.closeWhenFlushed();
    // Otherwise the option being received is answered with ERR_SHUTDOWN, then we close.
  }

  /** Closes the socket now, dropping anything queued. */
  abort(reason: string): void {
    this.drop(reason);
  }

  // -------------------------------------------------------------------------------------

  private pump(): void {
    if (this.pumping || this.is_closed) return;
    this.pumping = true;
    try {
      this.parse();
    } catch (e) {
      // A bug here must cost this client its connection, never the server.
      this.opts.log("error", `${this.label}: internal error, closing: ${describeError(e)}`);
      this.drop("internal error");
    } finally {
      this.pumping = false;
    }
    if (this.flush_after_parse) {
      this.flush_after_parse = false;
      this.flushQueue();
    }
    this.updateReadPause();
    this.maybeFinish();
    // Spinning would delay the worker's other connections: only a connection alone may.
    if (this.pace !== null && !this.ended && this.isIdle() && this.opts.is_only_connection()) this.pace.onIdle(this.socket.fd);
  }

  /** True while new requests must wait (caps reached). */
  private blocked(): boolean {
    return this.inflight >= this.opts.limits.inflight_max || this.queued_bytes >= this.opts.limits.write_queue_bytes_max;
  }

  private updateReadPause(): void {
    if (this.is_closed || this.ended) return;
    const want_pause = this.phase === Phase.REQUEST_HEADER && this.blocked_on_caps;
    if (want_pause && !this.reading_paused) {
      this.reading_paused = true;
      this.socket.pause();
    } else if (!want_pause && this.reading_paused) {
      this.reading_paused = false;
      this.socket.resume();
    }
  }

  private parse(): void {
    const recv = this.recv;
    for (;;) {
      if (this.is_closed || this.ended) return;
      switch (this.phase) {
        case Phase.CLIENT_FLAGS: {
          if (recv.length < W.CLIENT_FLAGS_BYTES) return;
          const { bytes, at } = recv.peek(W.CLIENT_FLAGS_BYTES);
          const flags = W.dataViewOf(bytes).getUint32(at, false);
          recv.skip(W.CLIENT_FLAGS_BYTES);
          const bad = this.handshake.clientFlags(flags);
          if (bad !== null) return this.drop(bad);
          this.phase = Phase.OPTION_HEADER;
          break;
        }
        case Phase.OPTION_HEADER: {
          if (recv.length < W.OPTION_HEADER_BYTES) return;
          const { bytes, at } = recv.peek(W.OPTION_HEADER_BYTES);
          const hdr = W.decodeOptionHeader(W.dataViewOf(bytes), at);
          recv.skip(W.OPTION_HEADER_BYTES);
          // Checked before a single data byte is buffered: a 2 GiB length costs nothing.
          const bad = this.handshake.optionHeader(hdr);
          if (bad !== null) return this.drop(bad);
          this.option = hdr.option;
          this.option_bytes = hdr.length;
          this.phase = Phase.OPTION_DATA;
          break;
        }
        case Phase.OPTION_DATA: {
          if (recv.length < this.option_bytes) return;
          const data = recv.take(this.option_bytes);
          const res = this.handshake.option(this.option, data, this.shutting_down);
          if (res.action === "drop") return this.drop(res.reason);
          this.send(res.bytes);
          if (res.action === "close" || (this.shutting_down && res.action === "reply")) {
            this.phase = Phase.FINISHING;
            this.recv.clear();
            this.closeWhenFlushed();
            return;
          }
          if (res.action === "transmission") this.enterTransmission();
          else this.phase = Phase.OPTION_HEADER;
          break;
        }
        case Phase.REQUEST_HEADER: {
          this.blocked_on_caps = this.blocked();
          if (this.blocked_on_caps) return;
          if (recv.length < W.REQUEST_HEADER_BYTES) return;
          if (!this.request()) return;
          break;
        }
        case Phase.WRITE_PAYLOAD: {
          const req = this.pending!;
          if (recv.length < req.length) return;
          // Not gathered: the export copies the parts straight to where the data goes.
          const payload = recv.takeParts(req.length);
          this.pending = null;
          this.phase = Phase.REQUEST_HEADER;
          this.dispatch(req, payload);
          break;
        }
        case Phase.SKIP_PAYLOAD: {
          this.skip_left -= recv.skip(this.skip_left);
          if (this.skip_left > 0) return;
          const req = this.pending!;
          const rej = this.pending_rejection!;
          this.pending = null;
          this.pending_rejection = null;
          this.phase = Phase.REQUEST_HEADER;
          this.send(errorReply(req, rej.errno, rej.message, this.session!));
          break;
        }
        case Phase.FINISHING:
        case Phase.CLOSED:
          recv.clear();
          return;
      }
    }
  }

  /**
   * Parses one request header (28 bytes are buffered). Returns false when parsing must stop
   * (waiting for in-flight bytes to drain, disconnect, or close).
   */
  private request(): boolean {
    const s = this.session!;
    const { bytes, at } = this.recv.peek(W.REQUEST_HEADER_BYTES);
    const hdr = this.hdr;
    W.decodeRequestHeader(bytes, at, hdr);
    if (hdr.magic !== W.REQUEST_MAGIC) {
      this.drop(`bad request magic 0x${hdr.magic.toString(16)}`);
      return false;
    }
    if (hdr.type === W.CMD_DISC) {
      // No reply. Requests already dispatched finish; then the socket closes.
      this.recv.clear();
      this.phase = Phase.FINISHING;
      this.closeWhenFlushed();
      return false;
    }
    const rej = validateRequest(hdr, s);
    const carries_bytes = rej === null && (hdr.type === W.CMD_READ || hdr.type === W.CMD_WRITE);
    const cost = carries_bytes ? hdr.length : 0;
    if (cost > 0 && this.inflight > 0 && this.inflight_bytes + cost > this.opts.limits.inflight_bytes_max) {
      // Leave the header buffered until enough in-flight bytes complete.
      this.blocked_on_caps = true;
      return false;
    }
    if (hdr.type === W.CMD_WRITE) {
      const plan = writePayloadPlan(hdr, rej);
      if (plan === "drop") {
        this.drop(`WRITE payload of ${hdr.length} bytes refused`);
        return false;
      }
      this.recv.skip(W.REQUEST_HEADER_BYTES);
      this.pending = copyRequest(hdr);
      if (plan === "take") {
        this.phase = Phase.WRITE_PAYLOAD;
      } else {
        this.pending_rejection = rej;
        this.skip_left = hdr.length;
        this.phase = Phase.SKIP_PAYLOAD;
      }
      return true;
    }
    this.recv.skip(W.REQUEST_HEADER_BYTES);
    const req = copyRequest(hdr);
    if (rej !== null) this.send(errorReply(req, rej.errno, rej.message, s));
    else this.dispatch(req, null);
    return true;
  }

  private dispatch(req: Request, payload: WriteData | null): void {
    const s = this.session!;
    const cost = req.type === W.CMD_READ || req.type === W.CMD_WRITE ? req.length : 0;
    const load = this.opts.load;
    // Pipelined: another request is in flight, or the client sent more before this one's reply
    // (a large WRITE arrives over several reads, so it is seldom in flight with the next one).
    if (load.inflight > 0 || this.recv.length > 0) load.pipelined++;
    load.inflight++;
    this.inflight++;
    this.inflight_bytes += cost;
    let result: Uint8Array | Promise<Uint8Array>;
    try {
      result = execute(req, payload, s);
    } catch (e) {
      this.completed(cost, payload, null, e);
      return;
    }
    // A cached read or a write with room is answered here, in the parse loop: its reply goes
    // out with the others of the same received bytes when the loop stops (see send).
    if (result instanceof Uint8Array) {
      this.completed(cost, payload, result, null);
      return;
    }
    result.then(
      (reply) => this.completed(cost, payload, reply, null),
      (e: unknown) => this.completed(cost, payload, null, e),
    );
  }

  /** A dispatched request finished. Never throws: the promise chain above has no catch. */
  private completed(cost: number, payload: WriteData | null, reply: Uint8Array | null, error: unknown): void {
    // The export is done with the payload (it copies what it keeps): its chunks may go.
    if (payload !== null) this.recv.releaseParts(payload);
    this.opts.load.inflight--;
    this.inflight--;
    this.inflight_bytes -= cost;
    try {
      if (reply) {
        this.send(reply);
      } else {
        // execute() turns every export failure into a reply; getting here is a bug.
        this.opts.log("error", `${this.label}: internal error in request: ${describeError(error)}`);
        this.drop("internal error");
      }
    } catch (e) {
      this.opts.log("error", `${this.label}: sending a reply failed: ${describeError(e)}`);
      this.drop("internal error");
    }
    this.pump();
  }

  private enterTransmission(): void {
    this.clearHandshakeTimer();
    this.session = {
      export: this.opts.config.export,
      structured_replies: this.handshake.structured_replies,
      meta_context_id: this.handshake.meta_context_id,
      shutting_down: this.shutting_down,
      log: this.opts.log,
      label: this.label,
      read_pool: this.opts.read_pool,
    };
    this.phase = Phase.REQUEST_HEADER;
  }

  /**
   * Queues or writes one complete message. A reply made inside the parse loop (a request the
   * export finished at once) waits for the loop to stop, so the replies to one read's worth of
   * requests leave in one socket write. While other requests are in flight their replies
   * usually follow within the same turn of the event loop, so a reply waits (one setImmediate at
   * most) and the batch goes out in one write: at queue depth 32 that saves most of the write
   * syscalls. With nothing else in flight the reply goes out at once (queue depth 1 waits for
   * nothing).
   */
  private send(bytes: Uint8Array): void {
    if (this.is_closed || this.ended) return;
    this.queue.push(bytes);
    this.queued_bytes += bytes.length;
    if (this.queue.length > 1 && !this.batch_scheduled && !this.flush_after_parse) return; // backpressure: onDrain writes it
    if (this.pumping && this.queued_bytes < STAGING_BYTES) {
      this.flush_after_parse = true;
      return;
    }
    if (this.inflight === 0 || this.queued_bytes >= STAGING_BYTES) {
      this.flushQueue();
      return;
    }
    if (!this.batch_scheduled) {
      this.batch_scheduled = true;
      setImmediate(this.flush_batch);
    }
  }

  private readonly flush_batch = () => {
    this.batch_scheduled = false;
    if (this.is_closed || this.ended) return;
    this.flushQueue();
    this.maybeFinish();
    this.pump();
  };

  private write(bytes: Uint8Array): number {
    const n = this.socket.write(bytes);
    // Bun returns a negative number when the socket is already closed; treat as nothing taken.
    return n > 0 ? n : 0;
  }

  /** Writes what the socket takes; small messages in a row go out together from the staging buffer. */
  private flushQueue(): void {
    while (this.queue.length > 0 && !this.ended) {
      const taken = this.coalescible();
      const head = taken > 1 ? this.stage(taken) : this.queue[0]!;
      const n = this.write(head);
      this.queued_bytes -= n;
      if (taken > 1) {
        // Bun copied what it took into the kernel; the originals are in the staging copy.
        for (let i = 0; i < taken; i++) this.opts.read_pool.release(this.queue[i]!);
        this.queue.splice(0, taken);
        if (n < head.length) {
          this.queue.unshift(head.slice(n)); // staging is reused: keep a copy of the rest
          return;
        }
        continue;
      }
      if (n < head.length) {
        this.queue[0] = head.subarray(n);
        return;
      }
      this.queue.shift();
      // Bun copied every byte into the kernel; the buffer may be reused.
      this.opts.read_pool.release(head);
    }
  }

  /** How many messages from the queue's head fit the staging buffer together (1: write alone). */
  private coalescible(): number {
    let total = 0;
    let i = 0;
    for (; i < this.queue.length; i++) {
      const len = this.queue[i]!.length;
      if (len > COALESCE_MESSAGE_MAX_BYTES || total + len > STAGING_BYTES) break;
      total += len;
    }
    return Math.max(i, 1);
  }

  private stage(taken: number): Uint8Array {
    this.staging ??= new Uint8Array(STAGING_BYTES);
    let at = 0;
    for (let i = 0; i < taken; i++) {
      const m = this.queue[i]!;
      this.staging.set(m, at);
      at += m.length;
    }
    return this.staging.subarray(0, at);
  }

  private closeWhenFlushed(): void {
    this.close_when_flushed = true;
    this.clearHandshakeTimer();
    this.maybeFinish();
  }

  /** Ends the socket when it has to close and nothing is left to send or finish. */
  private maybeFinish(): void {
    if (this.is_closed || this.ended) return;
    if (this.shutting_down && this.session && this.isIdle()) this.close_when_flushed = true;
    if (this.close_when_flushed && this.inflight === 0 && this.queue.length === 0) {
      this.ended = true;
      this.socket.end();
    }
  }

  /** Nothing in flight, nothing queued, no half-received request, nothing buffered. */
  private isIdle(): boolean {
    return (
      this.inflight === 0 &&
      this.queue.length === 0 &&
      this.phase === Phase.REQUEST_HEADER &&
      this.recv.length === 0
    );
  }

  private drop(reason: string): void {
    if (this.is_closed || this.ended) return;
    this.opts.log("debug", `${this.label}: disconnecting: ${reason}`);
    this.phase = Phase.FINISHING;
    this.ended = true;
    this.clearHandshakeTimer();
    this.recv.clear();
    this.queue.length = 0;
    this.queued_bytes = 0;
    this.socket.end();
  }

  private clearHandshakeTimer(): void {
    if (this.handshake_timer !== null) {
      clearTimeout(this.handshake_timer);
      this.handshake_timer = null;
    }
  }
}
