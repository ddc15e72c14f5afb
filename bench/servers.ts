/**
 * The servers the benchmark compares: pcache and its peers, each started in the foreground on its
 * own unix socket with a fresh backing file, and stopped by pid.
 */
import { existsSync } from "node:fs";
import { join } from "node:path";
import type { Subprocess } from "bun";
import { haveCommand, runChild, spawnChild, stopChild } from "./children.ts";

export interface ServerContext {
  sock: string;
  /** Fresh sparse backing file of size_bytes on disk. */
  backing_path: string;
  /** Fresh directory on tmpfs (cache files). */
  scratch_dir: string;
  size_bytes: number;
  log_path: string;
}

export interface PcacheOptions {
  bin: string;
  cache_size: string;
  /** Extra `serve` arguments (--workers N when supported, then --serve-arg values). */
  serve_args: string[];
  /** Format a fresh cache before starting (false: serve the cache file as it is). */
  format?: boolean;
  /** Cache file (default: cache.img in the scratch directory). */
  cache_path?: string;
}

export interface ServerSpec {
  /** Short name for --server. */
  id: string;
  name: string;
  description: string;
  export_name: string;
  /** What is not installed for it to run here ("nbdkit memory plugin"), or null. */
  missing(): string | null;
  /** Anything to do before starting (pcache formats its cache). */
  prepare?(ctx: ServerContext): Promise<void>;
  argv(ctx: ServerContext): string[];
  /**
   * Wait until the server has no background work left from earlier workloads (pcache: dirty data
   * written back). Servers without it only get the `sync` every server gets.
   */
  settle?(ctx: ServerContext): Promise<void>;
  env?(ctx: ServerContext): Record<string, string | undefined>;
}

export interface RunningServer {
  spec: ServerSpec;
  proc: Subprocess;
  pid: number;
  uri: string;
}

const STARTUP_TIMEOUT_MS = 60_000;
/** Longest wait for a server's backlog before a workload (pcache: 4 GiB of random 4 KiB dirty data). */
const SETTLE_TIMEOUT_S = 300;
const STOP_GRACE_MS = 15_000;

let nbdkit_dirs: { plugins: string; filters: string } | null = null;

async function nbdkitDirs(): Promise<{ plugins: string; filters: string }> {
  if (nbdkit_dirs !== null) return nbdkit_dirs;
  const r = await runChild(["nbdkit", "--dump-config"], 10_000);
  const get = (k: string): string => new RegExp(`^${k}=(.*)$`, "m").exec(r.stdout)?.[1] ?? "";
  nbdkit_dirs = { plugins: get("plugindir"), filters: get("filterdir") };
  return nbdkit_dirs;
}

/** Resolved before the specs are used: which nbdkit plugins and filters exist. */
export async function probeNbdkit(): Promise<void> {
  if (haveCommand("nbdkit")) await nbdkitDirs();
}

function nbdkitMissing(plugin: string, filter?: string): string | null {
  if (!haveCommand("nbdkit")) return "nbdkit";
  const d = nbdkit_dirs;
  if (d === null) return "not probed (call probeNbdkit first)";
  if (!existsSync(join(d.plugins, `nbdkit-${plugin}-plugin.so`))) return `nbdkit ${plugin} plugin`;
  if (filter !== undefined && !existsSync(join(d.filters, `nbdkit-${filter}-filter.so`))) return `nbdkit ${filter} filter`;
  return null;
}

function nbdkitArgv(ctx: ServerContext, rest: string[]): string[] {
  return ["nbdkit", "--foreground", "--exit-with-parent", "--unix", ctx.sock, ...rest];
}

export function pcacheSpec(p: PcacheOptions): ServerSpec {
  const cachePath = (ctx: ServerContext): string => p.cache_path ?? join(ctx.scratch_dir, "cache.img");
  return {
    id: "pcache",
    name: "pcache",
    description: `pcache serve, ${p.cache_size} cache file on tmpfs, backing file on disk${p.serve_args.length ? ` (${p.serve_args.join(" ")})` : ""}`,
    export_name: "pcache",
    missing: () => (existsSync(p.bin) ? null : p.bin),
    async prepare(ctx) {
      if (p.format === false) return;
      const r = await runChild([p.bin, "format", "--cache", cachePath(ctx), "--size", p.cache_size], 120_000);
      if (r.code !== 0) throw new Error(`pcache format failed: ${r.stderr.trim() || r.stdout.trim()}`);
    },
    argv: (ctx) => [p.bin, "serve", "--cache", cachePath(ctx), "--backing", ctx.backing_path, "--nbd", `unix:${ctx.sock}`, ...p.serve_args],
    async settle(ctx) {
      const r = await runChild([p.bin, "drain", "--cache", cachePath(ctx), "--timeout", String(SETTLE_TIMEOUT_S)], (SETTLE_TIMEOUT_S + 30) * 1000);
      if (r.code !== 0) throw new Error(`pcache drain failed: ${r.stderr.trim() || r.stdout.trim()}`);
    },
  };
}

/** The peers, in report order: protocol floor first, then RAM, then disk-backed servers. */
export function peerSpecs(): ServerSpec[] {
  return [
    {
      id: "null",
      name: "nbdkit null",
      description: "nbdkit null plugin: discards writes, reads zeroes (protocol floor)",
      export_name: "",
      missing: () => nbdkitMissing("null"),
      argv: (ctx) => nbdkitArgv(ctx, ["null", `size=${ctx.size_bytes}`]),
    },
    {
      id: "memory",
      name: "nbdkit memory",
      description: "nbdkit memory plugin: sparse array in RAM",
      export_name: "",
      missing: () => nbdkitMissing("memory"),
      argv: (ctx) => nbdkitArgv(ctx, ["memory", `size=${ctx.size_bytes}`]),
    },
    {
      id: "file",
      name: "nbdkit file",
      description: "nbdkit file plugin on the backing file (page cache; flush = fdatasync)",
      export_name: "",
      missing: () => nbdkitMissing("file"),
      argv: (ctx) => nbdkitArgv(ctx, ["file", `file=${ctx.backing_path}`]),
    },
    {
      id: "file+cache",
      name: "nbdkit file+cache",
      description: "nbdkit file plugin + cache filter (cache=writeback, cache file on tmpfs)",
      export_name: "",
      missing: () => nbdkitMissing("file", "cache"),
      argv: (ctx) => nbdkitArgv(ctx, ["--filter=cache", "file", `file=${ctx.backing_path}`, "cache=writeback"]),
      // The cache filter puts its (unlinked) cache file in TMPDIR.
      env: (ctx) => ({ ...process.env, TMPDIR: ctx.scratch_dir }),
    },
    {
      id: "qemu-nbd",
      name: "qemu-nbd",
      description: "qemu-nbd --cache=writeback -f raw on the backing file",
      export_name: "",
      missing: () => (haveCommand("qemu-nbd") ? null : "qemu-nbd"),
      argv: (ctx) => ["qemu-nbd", "--cache=writeback", "--format=raw", `--socket=${ctx.sock}`, "--persistent", "--shared=8", ctx.backing_path],
    },
  ];
}

export function uriFor(spec: ServerSpec, sock: string): string {
  return `nbd+unix:///${spec.export_name}?socket=${sock}`;
}

/** Start a server and wait until it completes an NBD handshake with the expected size. */
export async function startServer(spec: ServerSpec, ctx: ServerContext): Promise<RunningServer> {
  if (spec.prepare) await spec.prepare(ctx);
  const proc = spawnChild(spec.argv(ctx), { log_path: ctx.log_path, env: spec.env?.(ctx) });
  const uri = uriFor(spec, ctx.sock);
  try {
    await waitReady(proc, uri, ctx);
  } catch (err) {
    await stopChild(proc, 2_000);
    throw err;
  }
  return { spec, proc, pid: proc.pid, uri };
}

async function waitReady(proc: Subprocess, uri: string, ctx: ServerContext): Promise<void> {
  const deadline = Date.now() + STARTUP_TIMEOUT_MS;
  const exited = (): boolean => proc.exitCode !== null || proc.signalCode !== null;
  while (!existsSync(ctx.sock)) {
    if (exited()) throw new Error(`exited (status ${proc.exitCode ?? proc.signalCode}) before creating its socket`);
    if (Date.now() > deadline) throw new Error(`no socket after ${STARTUP_TIMEOUT_MS / 1000} s`);
    await Bun.sleep(50);
  }
  if (!haveCommand("nbdinfo")) return; // the socket exists; fio will tell if the handshake fails
  let last = "";
  while (Date.now() <= deadline) {
    if (exited()) throw new Error(`exited (status ${proc.exitCode ?? proc.signalCode}) during startup`);
    const r = await runChild(["nbdinfo", "--size", uri], 10_000);
    if (r.code === 0) {
      const size = Number(r.stdout.trim());
      if (size < ctx.size_bytes) throw new Error(`export is ${size} bytes, expected ${ctx.size_bytes}`);
      return;
    }
    last = r.stderr.trim().split("\n").pop() ?? "";
    await Bun.sleep(100);
  }
  throw new Error(`no NBD handshake after ${STARTUP_TIMEOUT_MS / 1000} s: ${last}`);
}

export async function stopServer(s: RunningServer): Promise<number | null> {
  return stopChild(s.proc, STOP_GRACE_MS);
}

export function serverAlive(s: RunningServer): boolean {
  return s.proc.exitCode === null && s.proc.signalCode === null;
}
