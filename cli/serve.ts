import { closeSync, existsSync, ftruncateSync, mkdirSync, openSync } from "node:fs";
import { homedir } from "node:os";
import { join } from "node:path";
import { defineCommand } from "citty";
import { openCacheDevice } from "../core/device/cache_device.ts";
import { openBackingFile } from "../core/device/file_backing.ts";
import { Engine } from "../core/engine/engine.ts";
import { EngineExport } from "../core/engine/nbd_export.ts";
import { GiB } from "../core/format/constants.ts";
import { formatCache } from "../core/format/format_cache.ts";
import { inspectSuperblockArea } from "../core/format/superblock.ts";
import { Gc } from "../core/gc/gc.ts";
import { DEFAULT_NBD_HOST, DEFAULT_NBD_PORT, NbdServer, socketActivationFd } from "../core/nbd/server.ts";
import { Writeback } from "../core/writeback/writeback.ts";
import { makeLogger } from "./logger.ts";
import { fail, runCommand } from "./run.ts";

/** Where `pcache serve` with no devices keeps its files. */
export function defaultDataDir(): string {
  const base = process.env.XDG_DATA_HOME || join(homedir(), ".local", "share");
  return join(base, "pcache");
}

const DEFAULT_CACHE_BYTES = 1 * GiB;
const DEFAULT_BACKING_BYTES = 4 * GiB;

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
    export: { type: "string", description: "export name (default: pcache)", default: "pcache" },
    description: { type: "string", description: "export description shown to clients" },
    "read-only": { type: "boolean", description: "refuse writes (EPERM)", default: false },
    "data-crc": { type: "boolean", description: "require a cache formatted with --data-crc (and format new ones so)", default: false },
    "data-dir": { type: "string", description: "folder for the default devices" },
    "log-level": { type: "string", description: "error, warn, info or debug (default info)", default: "info" },
    "log-format": { type: "string", description: "text or json (default text)", default: "text" },
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
  "log-level": string;
  "log-format": string;
}

async function serve(args: ServeArgs): Promise<number> {
  const log = makeLogger(args["log-level"], args["log-format"]);
  let cache_path = args.cache;
  let backing_path = args.backing;
  let create_cache: number | undefined;
  let create_backing: number | undefined;
  if (cache_path === undefined || backing_path === undefined) {
    if (cache_path !== undefined || backing_path !== undefined) fail("name both --cache and --backing, or neither (to use the data folder)");
    const dir = args["data-dir"] ?? defaultDataDir();
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    cache_path = join(dir, "cache.img");
    backing_path = join(dir, "backing.img");
    if (!existsSync(cache_path)) create_cache = DEFAULT_CACHE_BYTES;
    if (!existsSync(backing_path)) create_backing = DEFAULT_BACKING_BYTES;
    log.info(`using the data folder ${dir}`);
  }
  if (create_backing !== undefined) {
    const fd = openSync(backing_path, "a", 0o600);
    ftruncateSync(fd, create_backing); // sparse
    closeSync(fd);
  }
  const cache = openCacheDevice(cache_path, { create_size_bytes: create_cache });
  const backing = openBackingFile(backing_path, { readOnly: args["read-only"] });
  try {
    if (create_cache !== undefined || (args.cache === undefined && inspectSuperblockArea(cache.domain) === "blank")) {
      formatCache(cache.domain, { data_crc: args["data-crc"] });
      log.info(`formatted new cache ${cache_path}`);
    }
    const engine = Engine.open(cache.domain, backing, { data_crc: args.cache === undefined ? undefined : args["data-crc"], logger: log });
    const r = engine.replay_result!;
    log.info(`replayed ${r.keys} keys in ${r.ksets} ksets in ${r.elapsed_ms.toFixed(1)} ms (${r.stale_keys} stale); ${r.end_reason}`);
    if (r.ended_dirty) log.warn(`the key log ended early: ${r.end_reason}; writes after that point were not acknowledged as flushed`);
    const writeback = new Writeback(engine.ctx, engine.meta);
    const gc = new Gc(engine.ctx, engine.meta);
    const background = [writeback.run(), gc.run()];
    const server = new NbdServer({
      export: new EngineExport(engine, args["read-only"]),
      export_name: args.export,
      description: args.description,
      log: (level, msg) => log[level === "error" ? "error" : level === "warn" ? "warn" : level === "debug" ? "debug" : "info"](msg),
    });
    let stopping = false;
    const stop = async (signal: string) => {
      if (stopping) {
        log.warn(`${signal} again: exiting at once`);
        process.exit(1);
      }
      stopping = true;
      log.info(`${signal}: finishing in-flight requests`);
      await server.stop({ timeout_ms: 30_000 });
      await engine.close();
      await Promise.allSettled(background);
      cache.close();
      backing.close();
      log.info("stopped; every kset is closed");
      process.exit(0);
    };
    process.on("SIGTERM", () => void stop("SIGTERM"));
    process.on("SIGINT", () => void stop("SIGINT"));
    if (args.stdin) {
      await server.serveFd(0);
      await stop("end of stdin connection");
      return 0;
    }
    const activated = socketActivationFd();
    const info = await server.listen(activated !== null ? { kind: "fd", fd: activated } : (args.nbd ?? `tcp://${DEFAULT_NBD_HOST}:${DEFAULT_NBD_PORT}`));
    const uri =
      info.kind === "tcp" ? `nbd://${info.host.includes(":") ? `[${info.host}]` : info.host}:${info.port}/${args.export}` : info.kind === "unix" ? `nbd+unix:///${args.export}?socket=${info.path}` : `fd ${info.fd}`;
    log.info(`serving ${backing_path} (${backing.size_bytes} bytes) cached on ${cache_path} [${cache.domain.describe()}]`);
    process.stdout.write(`listening: ${uri}\n`);
    await new Promise(() => {}); // until a signal
    return 0;
  } catch (err) {
    cache.close();
    backing.close();
    throw err;
  }
}
