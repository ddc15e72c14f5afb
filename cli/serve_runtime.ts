/**
 * The main thread of `serve` once the log is replayed: start the writeback, GC and request
 * workers over the shared engine, then wait for a signal (or a failed worker, or the end of the
 * stdin client) and shut down in the order that keeps every acknowledged write:
 *   1. request workers stop accepting, finish in-flight requests and close their ksets;
 *   2. the main thread closes any kset still open and sets CTL_STOPPING;
 *   3. writeback and GC finish their current step and stop;
 *   4. the listening socket goes, the devices are released, exit.
 * The control socket (core/control/) stops answering when the shutdown begins and its file is
 * removed. A second signal exits at once; what was acknowledged before a FLUSH is durable either way.
 */
import { controlHandler } from "../core/control/handlers.ts";
import { StateMonitor } from "../core/control/monitor.ts";
import { ControlServer } from "../core/control/server.ts";
import type { CacheDevice } from "../core/device/cache_device.ts";
import type { FileBacking } from "../core/device/file_backing.ts";
import { Engine } from "../core/engine/engine.ts";
import { boundLockWaits, LOCK_FREE } from "../core/sync/lock.ts";
import type { RequestOptions, StartMessage, WorkerRole } from "../core/threads/protocol.ts";
import { Supervisor } from "../core/threads/supervisor.ts";
import type { LevelLogger } from "./logger.ts";
import { EXIT_INTERNAL } from "./run.ts";
import { inheritedListening, type Listening, openListening } from "./listen.ts";

/** In-flight requests get this long after SIGTERM before their connections are closed. */
export const REQUEST_DRAIN_TIMEOUT_MS = 30_000;
/** Writeback and GC finish their current step within this. */
const BACKGROUND_STOP_TIMEOUT_MS = 30_000;
/** After a worker failure, how long a held lock may take to be released before it counts as the dead worker's. */
const FAILED_LOCK_WAIT_MS = 2_000;
/** If an orderly shutdown takes longer than this, exit anyway. */
const SHUTDOWN_DEADLINE_MS = 90_000;
/**
 * The main thread's longest wait for a shared lock while serving (drain_start's kset closes,
 * gc-percent, shutdown). Holders keep locks for microseconds, a log roll (zeroing a 16 MiB
 * segment) for milliseconds: only a dead worker holds one this long.
 */
const MAIN_THREAD_LOCK_WAIT_MS = 10_000;

export interface ServeOptions {
  log: LevelLogger;
  engine: Engine;
  cache: CacheDevice;
  backing: FileBacking;
  n_request_workers: number;
  listen: { kind: "spec"; spec: string } | { kind: "fd"; fd: number } | { kind: "stdin" };
  request: Omit<RequestOptions, "listen">;
  worker_urls: Record<WorkerRole, URL>;
  /** Where the control socket goes (core/control/paths.ts derives the default). */
  control_path: string;
}

export interface ServeRuntime {
  /** Where clients connect (null in stdin mode). */
  uri: string | null;
  /** The control socket (`pcache status --control PATH`). */
  control_path: string;
  /** Resolves with the exit status once the server has stopped. */
  finished: Promise<number>;
}

export async function startServing(opts: ServeOptions): Promise<ServeRuntime> {
  const { log, engine, cache, backing } = opts;
  const n = opts.n_request_workers;
  const finished = Promise.withResolvers<number>();
  boundLockWaits(MAIN_THREAD_LOCK_WAIT_MS);
  // The main thread's own slot, after the request workers' (0..n-1), writeback (n) and GC (n+1).
  const main = Engine.attach(engine.shared, cache.domain, backing, n + 2, log);
  let listening: Listening | null = null;
  let control: ControlServer | null = null;
  const monitor = new StateMonitor(main.ctx, log);
  let stopping = false;
  let started = false;
  let worker_failed = false;

  const shutdown = async (reason: string, code: number) => {
    if (stopping) return;
    stopping = true;
    log.info(`${reason}: stopping`);
    control?.close();
    monitor.stop();
    const deadline = setTimeout(() => {
      log.error(`shutdown did not finish within ${SHUTDOWN_DEADLINE_MS} ms; exiting (acknowledged flushed writes are safe)`);
      process.exit(code === 0 ? EXIT_INTERNAL : code);
    }, SHUTDOWN_DEADLINE_MS);
    await stopRole("request", REQUEST_DRAIN_TIMEOUT_MS, "request workers stopped");
    // Writeback and GC still run here and take locks briefly; only a dead worker holds one for long.
    let closing = !worker_failed || (await locksFreeWithin(main, FAILED_LOCK_WAIT_MS));
    if (closing) {
      try {
        await main.close();
      } catch (e) {
        log.error(`closing the ksets failed: ${(e as Error).message}`);
        closing = false;
      }
    }
    if (!closing) {
      // A worker died holding a lock (closing ksets could wait for ever), or closing failed.
      // Writes acknowledged before the last FLUSH are durable already; later ones are as after a crash.
      log.warn(worker_failed ? "a lock is still held by a failed worker: open ksets were not closed" : "open ksets were not closed");
      main.ctx.log.stopTimers();
      main.stopBackground();
    }
    await stopRole("writeback", BACKGROUND_STOP_TIMEOUT_MS, "writeback stopped");
    await stopRole("gc", BACKGROUND_STOP_TIMEOUT_MS, "gc stopped");
    supervisor.terminateAll();
    listening?.close();
    cache.close();
    backing.close();
    clearTimeout(deadline);
    log.info(code !== 0 ? "stopped after a failure" : closing ? "stopped; every kset is closed" : "stopped; open ksets were left as after a crash");
    finished.resolve(code);
  };

  const supervisor = new Supervisor(log, {
    on_failure: (name, why) => {
      worker_failed = true;
      // During start the failure rejects start() below, which cleans up instead.
      if (!started) return;
      log.error(`${name} failed: ${why}; stopping the server`);
      void shutdown("worker failure", EXIT_INTERNAL);
    },
    on_client_gone: () => void shutdown("the stdin client disconnected", 0),
  });
  // One line per role once all its workers have stopped (a worker that did not says so itself).
  const stopRole = async (role: WorkerRole, timeout_ms: number, done: string) => {
    const had = supervisor.states().some((w) => w.role === role && w.state === "running");
    if ((await supervisor.stop(role, timeout_ms)) && had) log.info(done);
  };
  const onSignal = (signal: string) => {
    if (stopping) {
      log.warn(`${signal} again: exiting at once`);
      process.exit(1);
    }
    void shutdown(signal, 0);
  };
  process.on("SIGTERM", () => onSignal("SIGTERM"));
  process.on("SIGINT", () => onSignal("SIGINT"));

  const base = (role: WorkerRole, slot: number, name: string): StartMessage => ({
    type: "start",
    role,
    slot,
    name,
    shared: engine.shared,
    cache: cache.attach,
    backing: backing.attach,
    log_level: log.level,
  });
  try {
    control = await ControlServer.listen(
      opts.control_path,
      controlHandler({
        engine: main,
        monitor,
        workers: () => supervisor.states(),
        persistence_domain: cache.domain.name,
        persistence_detail: cache.domain.describe(),
        read_only: opts.request.read_only,
        log,
      }),
      log,
    );
    monitor.start();
    if (opts.request.read_only) log.info("read-only: writeback is off; dirty data already in the cache stays there");
    else await supervisor.start(opts.worker_urls.writeback, base("writeback", n, "writeback"));
    await supervisor.start(opts.worker_urls.gc, base("gc", n + 1, "gc"));
    if (opts.listen.kind === "spec") listening = await openListening(opts.listen.spec);
    else if (opts.listen.kind === "fd") listening = inheritedListening(opts.listen.fd);
    for (let i = 0; i < n; i++) {
      const listen: RequestOptions["listen"] =
        listening !== null ? { kind: "fd", fd: listening.dupForWorker() } : i === 0 ? { kind: "connected", fd: 0 } : { kind: "none" };
      await supervisor.start(opts.worker_urls.request, { ...base("request", i, `request worker ${i + 1}`), request: { ...opts.request, listen } });
    }
  } catch (err) {
    supervisor.terminateAll();
    listening?.close();
    control?.close();
    monitor.stop();
    throw err;
  }
  started = true;
  log.info(`control socket ${opts.control_path}`);
  return { uri: listening?.uriFor(opts.request.export_name) ?? null, control_path: opts.control_path, finished: finished.promise };
}

/**
 * After a worker failure: are all locks free, or do they become free within `wait_ms`? Writeback
 * and GC hold locks only for short steps, so a lock held that long belongs to the dead worker.
 */
async function locksFreeWithin(engine: Engine, wait_ms: number): Promise<boolean> {
  const locks = engine.ctx.s.locks;
  const until = performance.now() + wait_ms;
  for (;;) {
    let held = false;
    for (let i = 0; i < locks.length && !held; i++) held = Atomics.load(locks, i) !== LOCK_FREE;
    if (!held) return true;
    if (performance.now() >= until) return false;
    await Bun.sleep(10);
  }
}
