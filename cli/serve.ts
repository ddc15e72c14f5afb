import { closeSync, existsSync, ftruncateSync, mkdirSync, openSync } from "node:fs";
import { join } from "node:path";
import { defineCommand } from "citty";
import { checkControlPath, defaultControlPath } from "../core/control/paths.ts";
import { openCacheDevice } from "../core/device/cache_device.ts";
import { openBackingFile } from "../core/device/file_backing.ts";
import { Engine } from "../core/engine/engine.ts";
import { GiB } from "../core/format/constants.ts";
import { formatCache } from "../core/format/format_cache.ts";
import { inspectSuperblockArea } from "../core/format/superblock.ts";
import { BUSY_POLL_BUDGET_DEFAULT_US, BUSY_POLL_BUDGET_MAX_US } from "../core/nbd/busy_poll.ts";
import { DEFER_MS_DEFAULT, DEFER_MS_MAX, PIPELINED_WINDOW_MS } from "../core/writeback/defer.ts";
import { DEFAULT_NBD_HOST, DEFAULT_NBD_PORT, socketActivationFd } from "../core/nbd/server.ts";
import { DATA_DIR_BACKING_FILE, DATA_DIR_CACHE_FILE, defaultDataDir } from "./data_dir.ts";
import { type ServeRuntime, startServing } from "./serve_runtime.ts";
import { makeLogger } from "./logger.ts";
import { fail, parseIntInRange, runCommand } from "./run.ts";

const DEFAULT_CACHE_BYTES = 1 * GiB;
const DEFAULT_BACKING_BYTES = 4 * GiB;

const MAX_WORKERS = 64;
const MAX_CONNECTIONS = 4096;

/**
 * Worker entry points. Run from source, this file is cli/serve.ts; compiled, every module is
 * bundled into the entry at the root of the embedded file system, next to workers/.
 */
const COMPILED = import.meta.url.includes("$bunfs");
const WORKER_URLS = {
  request: COMPILED ? new URL("./workers/request.ts", import.meta.url) : new URL("../workers/request.ts", import.meta.url),
  writeback: COMPILED ? new URL("./workers/writeback.ts", import.meta.url) : new URL("../workers/writeback.ts", import.meta.url),
  gc: COMPILED ? new URL("./workers/gc.ts", import.meta.url) : new URL("../workers/gc.ts", import.meta.url),
};

export const serveCommand = defineCommand({
  meta: {
    name: "serve",
    description: `Serve a cached block device over NBD.\nExample: pcache serve --cache /dev/shm/cache.img --backing /var/lib/disk.img --nbd tcp://127.0.0.1:10809`,
  },
  args: {
    cache: { type: "string", description: "cache device or file (default: a 1 GiB file in the data folder, formatted on first use)" },
    backing: { type: "string", description: "backing device or file (default: a 4 GiB sparse file in the data folder)" },
    nbd: { type: "string", description: `listen address: tcp://HOST:PORT or unix:PATH (default tcp://${DEFAULT_NBD_HOST}:${DEFAULT_NBD_PORT})` },
    stdin: { type: "boolean", description: "serve one client already connected on fd 0 (like nbdkit -s)", default: false },
    export: { type: "string", description: "export name", default: "pcache" },
    description: { type: "string", description: "export description shown to clients" },
    "read-only": { type: "boolean", description: "refuse writes (EPERM)", default: false },
    "data-crc": { type: "boolean", description: "require a cache formatted with --data-crc (and format new ones so)", default: false },
    "data-dir": { type: "string", description: "folder for the default devices" },
    prefault: { type: "boolean", description: "map every page of the cache at start (about 0.8 s per GiB; a tmpfs cache then holds its whole size in memory) so first writes take no page faults", default: false },
    workers: { type: "string", description: "request worker threads (default: one per CPU core)" },
    "max-connections": { type: "string", description: "open NBD connections allowed at once, over all workers", default: "64" },
    "busy-poll-us": {
      type: "string",
      description: `after a reply, spin up to this many µs for a quick client's next request instead of sleeping, only while a CPU is otherwise idle; 0..${BUSY_POLL_BUDGET_MAX_US}, 0 turns it off`,
      default: String(BUSY_POLL_BUDGET_DEFAULT_US),
    },
    "writeback-defer-ms": {
      type: "string",
      description: `while clients keep several requests in flight and GC can make room without writeback, let dirty data (already persistent in the cache) wait up to this many ms before writing it back; writeback runs at once after ${PIPELINED_WINDOW_MS} ms without such a request, or on \`pcache drain\`; 0..${DEFER_MS_MAX}, 0 writes back at once as the kernel does`,
      default: String(DEFER_MS_DEFAULT),
    },
    control: { type: "string", description: "control socket for status, gc-percent and drain (default: derived from the cache path, under $XDG_RUNTIME_DIR/pcache or /tmp/pcache-UID)" },
    "log-level": { type: "string", description: "error, warn, info or debug", default: "info" },
    "log-format": { type: "string", description: "text, or json (one object per line) for machines", default: "text" },
  },
  run: ({ args }) => runCommand(() => serve(args)),
});

interface ServeArgs {
  cache?: string;
  backing?: string;
  nbd?: string;
  stdin: boolean;
  export: string;
  description?: string;
  "read-only": boolean;
  "data-crc": boolean;
  "data-dir"?: string;
  prefault: boolean;
  workers?: string;
  "max-connections": string;
  "busy-poll-us": string;
  "writeback-defer-ms": string;
  control?: string;
  "log-level": string;
  "log-format": string;
}

async function serve(args: ServeArgs): Promise<number> {
  const log = makeLogger(args["log-level"], args["log-format"]);
  const n_request_workers =
    args.workers === undefined ? Math.max(1, Math.min(MAX_WORKERS, navigator.hardwareConcurrency || 1)) : parseIntInRange(args.workers, "--workers", 1, MAX_WORKERS);
  const max_connections = parseIntInRange(args["max-connections"], "--max-connections", 1, MAX_CONNECTIONS);
  const busy_poll_us = parseIntInRange(args["busy-poll-us"], "--busy-poll-us", 0, BUSY_POLL_BUDGET_MAX_US);
  const writeback_defer_ms = parseIntInRange(args["writeback-defer-ms"], "--writeback-defer-ms", 0, DEFER_MS_MAX);
  const activated = args.stdin ? null : socketActivationFd();
  if (args.stdin && args.nbd !== undefined) fail("--stdin serves the client on fd 0; it cannot be combined with --nbd");
  let cache_path = args.cache;
  let backing_path = args.backing;
  let create_cache: number | undefined;
  let create_backing: number | undefined;
  if (cache_path === undefined || backing_path === undefined) {
    if (cache_path !== undefined || backing_path !== undefined) fail("name both --cache and --backing, or neither (to use the data folder)");
    const dir = args["data-dir"] ?? defaultDataDir();
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    cache_path = join(dir, DATA_DIR_CACHE_FILE);
    backing_path = join(dir, DATA_DIR_BACKING_FILE);
    if (!existsSync(cache_path)) create_cache = DEFAULT_CACHE_BYTES;
    if (!existsSync(backing_path)) create_backing = DEFAULT_BACKING_BYTES;
    log.info(`using the data folder ${dir}`);
  }
  if (create_backing !== undefined) {
    const fd = openSync(backing_path, "a", 0o600);
    ftruncateSync(fd, create_backing); // sparse
    closeSync(fd);
  }
  if (args.control !== undefined) checkControlPath(args.control);
  const cache = openCacheDevice(cache_path, { create_size_bytes: create_cache, populate: args.prefault });
  let runtime: ServeRuntime | null = null;
  try {
    const backing = openBackingFile(backing_path, { readOnly: args["read-only"] });
    try {
      if (create_cache !== undefined || (args.cache === undefined && inspectSuperblockArea(cache.domain) === "blank")) {
        formatCache(cache.domain, { data_crc: args["data-crc"] });
        log.info(`formatted new cache ${cache_path}`);
      }
      const engine = Engine.open(cache.domain, backing, {
        data_crc: args.cache === undefined ? undefined : args["data-crc"],
        logger: log,
        n_heads: n_request_workers,
        n_stat_slots: n_request_workers + 3,
        writeback_defer_ms,
      });
      const r = engine.replay_result!;
      log.info(`replayed ${r.keys} keys in ${r.ksets} ksets in ${r.elapsed_ms.toFixed(1)} ms (${r.stale_keys} stale); ${r.end_reason}`);
      if (r.ended_dirty) log.warn(`the key log ended early: ${r.end_reason}; writes after that point were not acknowledged as flushed`);
      runtime = await startServing({
        log,
        engine,
        cache,
        backing,
        n_request_workers,
        listen: args.stdin ? { kind: "stdin" } : activated !== null ? { kind: "fd", fd: activated } : { kind: "spec", spec: args.nbd ?? `tcp://${DEFAULT_NBD_HOST}:${DEFAULT_NBD_PORT}` },
        request: { export_name: args.export, description: args.description, read_only: args["read-only"], max_connections, busy_poll_us },
        worker_urls: WORKER_URLS,
        control_path: args.control ?? defaultControlPath(cache_path),
      });
    } catch (err) {
      backing.close();
      throw err;
    }
  } catch (err) {
    cache.close();
    throw err;
  }
  if (runtime.uri !== null) {
    log.info(`serving ${backing_path} cached on ${cache_path} [${cache.domain.describe()}] with ${n_request_workers} request worker(s)`);
    log.info(
      writeback_defer_ms === 0
        ? "writeback: at once (deferral off)"
        : `writeback: deferred while clients keep requests in flight and GC can make room without it, up to ${writeback_defer_ms} ms`,
    );
    process.stdout.write(`listening: ${runtime.uri}\ncontrol: ${runtime.control_path}\n`);
  }
  return await runtime.finished;
}
