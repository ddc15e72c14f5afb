/**
 * The main thread's side of the workers: start each one and wait for `ready`, forward their
 * log lines, stop them in order, and turn any unexpected end (a `fatal` message, an uncaught
 * error, an exit nobody asked for) into one call of `on_failure` — the server then stops rather
 * than run half alive.
 */
import type { Logger } from "../engine/context.ts";
import { PcacheError } from "../errors.ts";
import type { FromWorker, StartMessage, WorkerRole } from "./protocol.ts";

/** A worker that has not answered `start` by then is treated as failed. */
export const WORKER_START_TIMEOUT_MS = 30_000;

export type WorkerState = "starting" | "running" | "stopping" | "stopped" | "failed";

interface Managed {
  name: string;
  role: WorkerRole;
  worker: Worker;
  state: WorkerState;
  /** Settles on `ready` (or failure before it). */
  ready: PromiseWithResolvers<void>;
  /** Settles on `stopped`, on exit, or on failure. */
  ended: PromiseWithResolvers<void>;
}

export interface WorkerEvents {
  /** A worker failed; called once for the first failure. */
  on_failure(name: string, why: string): void;
  /** The stdin-mode client disconnected. */
  on_client_gone?(): void;
}

export class Supervisor {
  private readonly workers: Managed[] = [];
  private failed = false;

  constructor(
    private readonly log: Logger,
    private readonly events: WorkerEvents,
  ) {}

  /** Start a worker from `url` and wait until it answers ready. */
  async start(url: URL, start: StartMessage): Promise<void> {
    const m: Managed = {
      name: start.name,
      role: start.role,
      worker: new Worker(url),
      state: "starting",
      ready: Promise.withResolvers<void>(),
      ended: Promise.withResolvers<void>(),
    };
    m.ready.promise.catch(() => {});
    this.workers.push(m);
    m.worker.addEventListener("message", (e: MessageEvent<FromWorker>) => this.onMessage(m, e.data));
    m.worker.addEventListener("error", (e: Event) => {
      e.preventDefault?.();
      const ev = e as ErrorEvent;
      this.fail(m, ev.error instanceof Error ? ev.error.message : firstLine(ev.message ?? "uncaught error"));
    });
    m.worker.addEventListener("close", (e: Event) => {
      const code = (e as CloseEvent).code;
      if (m.state !== "stopped" && m.state !== "failed") this.fail(m, `exited unexpectedly (code ${code})`);
      m.ended.resolve();
    });
    m.worker.postMessage(start);
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new PcacheError(`${m.name} did not start within ${WORKER_START_TIMEOUT_MS} ms`)), WORKER_START_TIMEOUT_MS);
    });
    try {
      await Promise.race([m.ready.promise, timeout]);
    } finally {
      clearTimeout(timer);
    }
  }

  private onMessage(m: Managed, msg: FromWorker): void {
    switch (msg.type) {
      case "ready":
        if (m.state === "starting") m.state = "running";
        m.ready.resolve();
        return;
      case "log":
        this.log[msg.level](msg.msg);
        return;
      case "client_gone":
        this.events.on_client_gone?.();
        return;
      case "stopped":
        m.state = "stopped";
        m.ended.resolve();
        return;
      case "fatal":
        if (msg.stack) this.log.debug(`${m.name}: ${msg.stack}`);
        this.fail(m, msg.msg);
        return;
    }
  }

  private fail(m: Managed, why: string): void {
    if (m.state === "failed") return;
    m.state = "failed";
    const err = new PcacheError(`${m.name} failed: ${why}`);
    m.ready.reject(err);
    m.ended.resolve();
    if (this.failed) return;
    this.failed = true;
    this.events.on_failure(m.name, why);
  }

  /** Ask every worker of `role` to stop and wait (bounded) until each has. */
  async stop(role: WorkerRole, timeout_ms: number): Promise<boolean> {
    const group = this.workers.filter((m) => m.role === role && (m.state === "running" || m.state === "starting"));
    for (const m of group) {
      m.state = "stopping";
      m.worker.postMessage({ type: "stop", timeout_ms });
    }
    return this.waitEnded(group, timeout_ms + 5_000);
  }

  private async waitEnded(group: Managed[], timeout_ms: number): Promise<boolean> {
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timed_out = await Promise.race([
      Promise.all(group.map((m) => m.ended.promise)).then(() => false),
      new Promise<boolean>((resolve) => (timer = setTimeout(() => resolve(true), timeout_ms))),
    ]);
    clearTimeout(timer);
    for (const m of group) {
      if (m.state !== "stopped") this.log.warn(`${m.name} did not stop within ${timeout_ms} ms (state ${m.state})`);
    }
    return !timed_out;
  }

  /** End every worker thread now (after stop(), or when giving up). */
  terminateAll(): void {
    for (const m of this.workers) {
      if (m.state !== "failed") m.state = "stopped";
      m.worker.terminate();
    }
  }

  states(): Array<{ name: string; role: WorkerRole; state: WorkerState }> {
    return this.workers.map((m) => ({ name: m.name, role: m.role, state: m.state }));
  }
}

function firstLine(text: string): string {
  const lines = text.split("\n").map((l) => l.trim());
  return lines.find((l) => l.startsWith("error:")) ?? lines.find((l) => l.length > 0) ?? text;
}
