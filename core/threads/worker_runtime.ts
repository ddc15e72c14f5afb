/**
 * The worker side of core/threads/protocol.ts: receive `start`, build the role's work over the
 * shared engine, answer `ready`; on `stop`, finish and answer `stopped`. Any error that escapes
 * becomes one `fatal` message (the main thread stops the server), never a half-alive worker.
 */
import { attachCacheDevice } from "../device/cache_device.ts";
import { attachBackingFile, type BackingAttachOptions } from "../device/file_backing.ts";
import type { Logger } from "../engine/context.ts";
import { Engine } from "../engine/engine.ts";
import { niceThisThread } from "../../ffi/libc.ts";
import type { FromWorker, StartMessage, ToWorker } from "./protocol.ts";

/**
 * Writeback and GC run at this nice value: when the CPUs are busy, request threads (whose
 * latency clients see) come first, and background work still gets a share (a third of a
 * request thread's at nice 5), so it cannot starve.
 */
export const BACKGROUND_NICE = 5;

declare const self: Worker;

export interface RoleHandle {
  /** Finish the role's work (bounded by timeout_ms where requests are involved). */
  stop(timeout_ms: number): Promise<void>;
}

export interface WorkerTools {
  log: Logger;
  post(msg: FromWorker): void;
  /** Report an error that ends this worker. */
  fatal(err: unknown): void;
}

const LEVEL_RANK = { error: 0, warn: 1, info: 2, debug: 3 } as const;

function post(msg: FromWorker): void {
  self.postMessage(msg);
}

function describe(err: unknown): { msg: string; stack?: string } {
  if (err instanceof Error) return { msg: err.message, stack: err.stack };
  return { msg: String(err) };
}

/** Log lines go to the main thread, which owns the output format. */
function forwardingLogger(name: string, level: StartMessage["log_level"]): Logger {
  const max = LEVEL_RANK[level];
  const emit = (lvl: keyof typeof LEVEL_RANK) => (msg: string) => {
    // Engine messages that already name their thread (e.g. "writeback: ...") keep one prefix.
    if (LEVEL_RANK[lvl] <= max) post({ type: "log", level: lvl, msg: msg.startsWith(`${name}: `) ? msg : `${name}: ${msg}` });
  };
  return { error: emit("error"), warn: emit("warn"), info: emit("info"), debug: emit("debug") };
}

/** This thread's engine over the opener's mapping, backing fd and shared state. */
export function attachEngine(start: StartMessage, log: Logger, backing_opts: BackingAttachOptions = {}): Engine {
  const dom = attachCacheDevice(start.cache);
  const backing = attachBackingFile(start.backing, backing_opts);
  return Engine.attach(start.shared, dom, backing, start.slot, log);
}

/**
 * Test hook: PCACHE_TEST_WORKER_FAULT="NAME" makes the worker called NAME ("gc", "writeback",
 * "request worker 1") throw an uncaught error shortly after it started, so tests can check that
 * a dying worker stops the whole server.
 */
function injectFault(name: string): void {
  if (process.env.PCACHE_TEST_WORKER_FAULT !== name) return;
  setTimeout(() => {
    throw new Error("injected fault (PCACHE_TEST_WORKER_FAULT)");
  }, 200);
}

export function runWorker(role: (start: StartMessage, tools: WorkerTools) => Promise<RoleHandle>): void {
  let handle: RoleHandle | null = null;
  let failed = false;
  const fatal = (err: unknown) => {
    if (failed) return;
    failed = true;
    post({ type: "fatal", ...describe(err) });
  };
  self.addEventListener("error", (e: Event) => {
    e.preventDefault();
    fatal((e as ErrorEvent).error ?? (e as ErrorEvent).message);
  });
  self.addEventListener("unhandledrejection", (e: Event) => {
    e.preventDefault();
    fatal((e as Event & { reason?: unknown }).reason);
  });
  self.onmessage = async (e: MessageEvent<ToWorker>) => {
    const msg = e.data;
    try {
      if (msg.type === "start") {
        const log = forwardingLogger(msg.name, msg.log_level);
        if (msg.role !== "request") {
          const refused = niceThisThread(BACKGROUND_NICE);
          if (refused !== null) log.debug(`could not lower this thread's priority: ${refused}`);
        }
        handle = await role(msg, { log, post, fatal });
        post({ type: "ready" });
        injectFault(msg.name);
      } else if (msg.type === "stop") {
        if (handle) await handle.stop(msg.timeout_ms);
        post({ type: "stopped" });
      }
    } catch (err) {
      fatal(err);
    }
  };
}
