/**
 * The long NBD fuzz run (test/reliability/nbd_fuzz.ts):
 *
 *   bun scripts/nbd_fuzz.ts --frames 1000000 --seed 7                  # in-process server over the engine
 *   bun scripts/nbd_fuzz.ts --frames 1000000 --seed 7 --binary         # starts dist/pcache serve
 *   bun scripts/nbd_fuzz.ts --frames 1000000 --seed 7 --socket PATH [--pid N]   # a server already running
 *
 * Options: --concurrency N (fuzz connections at once, default 4), --quiet (summary only).
 * Prints progress after every burst and a summary; exit status 1 when any check failed.
 */
import { existsSync, mkdtempSync, rmSync, truncateSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { runNbdFuzz, type FuzzTarget } from "../test/reliability/nbd_fuzz.ts";
import { PcacheProcess } from "../test/reliability/server_process.ts";

function arg(name: string): string | undefined {
  const i = process.argv.indexOf(name);
  return i >= 0 ? process.argv[i + 1] : undefined;
}

function die(msg: string): never {
  process.stderr.write(`nbd_fuzz: ${msg}\n`);
  process.exit(1);
}

function intArg(name: string, fallback: number, lo: number, hi: number): number {
  const text = arg(name);
  if (text === undefined) return fallback;
  const n = Number(text);
  if (!Number.isInteger(n) || n < lo || n > hi) die(`${name} must be an integer in ${lo}..${hi}, got "${text}"`);
  return n;
}

const frames = intArg("--frames", 1_000_000, 1, 1_000_000_000);
const seed = intArg("--seed", Math.floor(Math.random() * 1e9), 0, Number.MAX_SAFE_INTEGER);
const concurrency = intArg("--concurrency", 4, 1, 32);
const socket = arg("--socket");
const binary = process.argv.includes("--binary");
if (socket !== undefined && binary) die("--socket and --binary exclude each other");
const quiet = process.argv.includes("--quiet");

let server: PcacheProcess | null = null;
let dir: string | null = null;
let target: FuzzTarget = "in-process";
if (socket !== undefined) {
  const pid = arg("--pid") === undefined ? undefined : intArg("--pid", 0, 1, 2 ** 31);
  target = { socket_path: socket, pid };
} else if (binary) {
  const bin = join(import.meta.dir, "..", "dist", "pcache");
  if (!existsSync(bin)) die(`${bin} is missing: run "bun scripts/build.ts" first`);
  dir = mkdtempSync(join(existsSync("/dev/shm") ? "/dev/shm" : tmpdir(), "pcache-fuzz-"));
  server = new PcacheProcess({ binary: bin, cache: join(dir, "cache.img"), backing: join(dir, "backing.img"), socket: join(dir, "nbd.sock") });
  writeFileSync(server.o.backing, new Uint8Array(0));
  truncateSync(server.o.backing, 256 * 1024 * 1024);
  const err = (await server.format(70)) ?? (await server.start());
  if (err !== null) die(err);
  target = { socket_path: server.o.socket, pid: server.pid ?? undefined };
}

const t0 = Date.now();
const r = await runNbdFuzz({ seed, frames, target, concurrency, log: quiet ? undefined : (line) => process.stdout.write(`${line}\n`) });
let stop_note = "";
if (server !== null) {
  const alive = server.alive();
  const code = await server.stopGracefully();
  if (!alive) r.failures.push(`nbd fuzz seed ${seed}: dist/pcache was not running at the end: ${server.stderrTail()}`);
  else if (code !== 0) r.failures.push(`nbd fuzz seed ${seed}: dist/pcache exited ${code} on SIGTERM: ${server.stderrTail()}`);
  stop_note = ", dist/pcache stopped cleanly";
}
if (dir !== null) rmSync(dir, { recursive: true, force: true });
const where = socket ?? (binary ? "dist/pcache" : "in-process engine");
process.stdout.write(
  `nbd fuzz seed ${seed} against ${where}: ${r.frames} frames over ${r.connections} connections in ` +
    `${((Date.now() - t0) / 1000).toFixed(0)} s, server memory +${(r.memory_growth_bytes / 1024 / 1024).toFixed(1)} MiB idle after the run (peak +${(r.memory_peak_growth_bytes / 1024 / 1024).toFixed(1)} MiB)${r.failures.length === 0 ? stop_note : ""}\n`,
);
for (const f of r.failures) process.stdout.write(`FAIL: ${f}\n`);
process.stdout.write(r.failures.length === 0 ? "PASS\n" : `${r.failures.length} failure(s); rerun with --seed ${seed}\n`);
process.exit(r.failures.length === 0 ? 0 : 1);
