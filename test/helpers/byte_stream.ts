/**
 * A byte stream over a Bun client socket for tests: exact reads with deadlines (so no test can
 * hang), sends queued in order as the socket takes them. Receiving keeps chunks in a RecvBuffer
 * instead of copying the whole buffer per chunk, so multi-MiB reads stay cheap.
 */
import { RecvBuffer } from "../../core/nbd/recv_buffer.ts";

export type NbdTarget = { unix: string } | { hostname: string; port: number };

interface BunClientSocket {
  write(b: Uint8Array): number;
  end(): void;
  terminate(): void;
  pause(): void;
  resume(): void;
}

/** Bytes in, exact reads out; every wait has a deadline so nothing here can hang a run. */
export class ByteStream {
  private readonly recv = new RecvBuffer();
  private waiters: Array<() => void> = [];
  private out: Uint8Array[] = [];
  private sock!: BunClientSocket;
  is_closed = false;
  bytes_received = 0;

  static async connect(target: NbdTarget): Promise<ByteStream> {
    const s = new ByteStream();
    const handlers = {
      data: (_s: unknown, d: Uint8Array) => s.onData(d),
      close: () => s.onClose(),
      end: () => s.onClose(),
      drain: () => s.flush(),
      error: () => s.onClose(),
      connectError: () => s.onClose(),
    };
    const opts = { ...target, socket: handlers } as unknown as Parameters<typeof Bun.connect>[0];
    s.sock = (await Bun.connect(opts)) as unknown as BunClientSocket;
    return s;
  }

  get buffered(): number {
    return this.recv.length;
  }

  private onData(d: Uint8Array): void {
    this.recv.push(d);
    this.bytes_received += d.length;
    this.wake();
  }

  private onClose(): void {
    this.is_closed = true;
    this.out = [];
    this.wake();
  }

  private wake(): void {
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }

  private flush(): void {
    while (this.out.length > 0 && !this.is_closed) {
      const head = this.out[0]!;
      const n = Math.max(0, this.sock.write(head));
      if (n < head.length) {
        this.out[0] = head.subarray(n);
        return;
      }
      this.out.shift();
    }
  }

  /** Queues bytes; they go out in order as the socket takes them. */
  send(bytes: Uint8Array): void {
    if (this.is_closed || bytes.length === 0) return;
    this.out.push(bytes);
    if (this.out.length === 1) this.flush();
  }

  /** Bytes queued and not yet taken by the kernel. */
  get unsent(): number {
    let n = 0;
    for (const b of this.out) n += b.length;
    return n;
  }

  /** Resolves once the send queue is empty; false on close or timeout. */
  async sent(timeout_ms: number): Promise<boolean> {
    const deadline = Date.now() + timeout_ms;
    while (this.out.length > 0) {
      if (this.is_closed || Date.now() > deadline) return false;
      await Bun.sleep(1);
    }
    return !this.is_closed;
  }

  /** Waits for more data or a close; false on timeout. */
  waitChange(timeout_ms: number): Promise<boolean> {
    return new Promise((resolve) => {
      const t = setTimeout(() => resolve(false), Math.max(0, timeout_ms));
      this.waiters.push(() => {
        clearTimeout(t);
        resolve(true);
      });
    });
  }

  /** Exactly n bytes (a view when possible); throws on timeout or close. */
  async read(n: number, timeout_ms: number): Promise<Uint8Array> {
    await this.waitFor(n, timeout_ms);
    return this.recv.take(n);
  }

  /** Exactly dst.length bytes copied into dst. */
  async readInto(dst: Uint8Array, timeout_ms: number): Promise<void> {
    await this.waitFor(dst.length, timeout_ms);
    // Gathered straight into dst when the bytes span chunks; copied once otherwise.
    const got = this.recv.take(dst.length, () => dst);
    if (got !== dst) dst.set(got);
  }

  /** Drops up to n buffered bytes. */
  skip(n: number): number {
    return this.recv.skip(n);
  }

  private async waitFor(n: number, timeout_ms: number): Promise<void> {
    const deadline = Date.now() + timeout_ms;
    while (this.recv.length < n) {
      if (this.is_closed) throw new StreamClosed(`connection closed with ${this.recv.length} of ${n} bytes`);
      const left = deadline - Date.now();
      if (left <= 0 || !(await this.waitChange(left))) {
        throw new Error(`timed out after ${timeout_ms} ms waiting for ${n} bytes (have ${this.recv.length})`);
      }
    }
  }

  /** True once the peer has closed (buffered bytes are kept), false on timeout. */
  async waitClosed(timeout_ms: number): Promise<boolean> {
    const deadline = Date.now() + timeout_ms;
    while (!this.is_closed) {
      const left = deadline - Date.now();
      if (left <= 0) return false;
      await this.waitChange(left);
    }
    return true;
  }

  /** Stop reading from the socket (the kernel's buffers fill and the peer sees backpressure). */
  pause(): void {
    if (!this.is_closed) this.sock.pause();
  }

  resume(): void {
    if (!this.is_closed) this.sock.resume();
  }

  /** Half-close: our side is done sending. */
  end(): void {
    if (!this.is_closed) this.sock.end();
  }

  /** Drop the connection at once (RST), as a crashing client would. */
  terminate(): void {
    if (!this.is_closed) this.sock.terminate();
    this.onClose();
  }
}

export class StreamClosed extends Error {
  override name = "StreamClosed";
}
