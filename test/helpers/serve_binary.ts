/**
 * Drives the compiled binary the way a user does: `pcache format`, then `pcache serve` on a unix
 * socket (or loopback TCP) in a temp folder, ready once it prints its `listening:` line. Every
 * child started here is tracked, and killAll() (call it from afterAll) kills whatever is left,
 * so a failing test never leaves a server or a client behind.
 *
 * Children run through Bun.spawn with their output drained as it comes: a server that logs into
 * a pipe nobody reads would block once the pipe is full.
 */
import type { Subprocess } from "bun";
import { existsSync, mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

/** The binary under test; PCACHE_BIN points the tests at another build. */
export const PCACHE_BIN = process.env.PCACHE_BIN ?? join(import.meta.dir, "..", "..", "dist", "pcache");

/** Debian's nbdsh runs `python3` from PATH and needs the system one (with the nbd module). */
export const CLIENT_ENV: Record<string, string | undefined> = {
  ...process.env,
  PATH: `/usr/bin:/usr/sbin:/bin:/sbin:${process.env.PATH ?? ""}`,
  NO_COLOR: "1",
  LIBNBD_DEBUG: "0",
};

const READY_WAIT_MS = 20_000;
const STOP_WAIT_MS = 30_000;
/** After SIGKILL, how long to wait for the exit (a process stuck in the kernel never exits). */
const KILLED_EXIT_WAIT_MS = 5_000;
/** How much of a child's output is kept for error messages. */
const OUTPUT_KEEP_CHARS = 64 * 1024;

const children = new Set<Subprocess>();

/** True when `bin` is on the client PATH; says loudly which tests it skips when it is not. */
export function have(bin: string): boolean {
  const found = Bun.which(bin, { PATH: CLIENT_ENV.PATH }) !== null;
  if (!found) console.warn(`\n!!!!! SKIPPING tests that need "${bin}": it is not installed on this machine !!!!!\n`);
  return found;
}

/** Fails the file early with the fix when the binary was not built. */
export function requireBinary(): void {
  if (!existsSync(PCACHE_BIN)) throw new Error(`${PCACHE_BIN} is missing: run "bun scripts/build.ts" first`);
}

/** A fresh folder on tmpfs when there is one (the cache and backing files live there). */
export function tempDir(prefix: string): string {
  return mkdtempSync(join(existsSync("/dev/shm") ? "/dev/shm" : tmpdir(), prefix));
}

export interface RunResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/**
 * Runs a command to completion (SIGKILLed after timeout_ms); never throws on a non-zero exit.
 * code is null when a signal ended it, or when it could not even be killed (output then says so).
 */
export async function run(argv: string[], timeout_ms = 60_000): Promise<RunResult> {
  const p = Bun.spawn(argv, { stdout: "pipe", stderr: "pipe", stdin: "ignore", env: CLIENT_ENV });
  children.add(p);
  const kill = setTimeout(() => p.kill("SIGKILL"), timeout_ms);
  let give_up: Timer | undefined;
  const stuck = new Promise<null>((resolve) => (give_up = setTimeout(() => resolve(null), timeout_ms + KILLED_EXIT_WAIT_MS)));
  try {
    const all = Promise.all([new Response(p.stdout).text(), new Response(p.stderr).text(), p.exited]);
    const r = await Promise.race([all, stuck]);
    if (r === null) return { code: null, stdout: "", stderr: `${argv[0]} did not exit after SIGKILL (stuck in the kernel?)` };
    const [stdout, stderr, code] = r;
    return { code: p.signalCode ? null : code, stdout, stderr };
  } finally {
    clearTimeout(kill);
    clearTimeout(give_up);
    children.delete(p);
  }
}

/** Runs and requires exit 0, with the command's output in the error when it fails. */
export async function ok(argv: string[], timeout_ms = 60_000): Promise<RunResult> {
  const r = await run(argv, timeout_ms);
  if (r.code !== 0) throw new Error(`${argv.join(" ")} exited ${r.code}\nstdout: ${r.stdout}\nstderr: ${r.stderr}`);
  return r;
}

/** `pcache format --cache path --size size` (512M is the smallest cache the format accepts). */
export async function formatCache(path: string, size = "512M", ...extra: string[]): Promise<void> {
  await ok([PCACHE_BIN, "format", "--cache", path, "--size", size, ...extra]);
}

/** A sparse file of length_bytes (the backing device; its size is the export size). */
export async function sparseFile(path: string, length_bytes: number): Promise<void> {
  await ok(["truncate", "-s", String(length_bytes), path]);
}

/** Starts a child whose output is drained (and stderr's tail kept) until it exits. */
export function spawnTracked(argv: string[], opts: { stdin?: "pipe" | "ignore" } = {}) {
  const proc = Bun.spawn(argv, { stdout: "pipe", stderr: "pipe", stdin: opts.stdin ?? "ignore", env: CLIENT_ENV });
  children.add(proc);
  void proc.exited.then(() => children.delete(proc));
  let stderr_tail = "";
  void drain(proc.stderr, (chunk) => {
    stderr_tail = (stderr_tail + chunk).slice(-OUTPUT_KEEP_CHARS);
  });
  return { proc, stderr: () => stderr_tail };
}

/** Feeds decoded chunks of `stream` to `sink` until it ends. */
export async function drain(stream: ReadableStream<Uint8Array>, sink: (text: string) => void): Promise<void> {
  const decoder = new TextDecoder();
  try {
    for await (const chunk of stream) sink(decoder.decode(chunk, { stream: true }));
  } catch {
    // The child died and the pipe broke: what was read is all there is.
  }
}

/** Resolves to p's exit code, or "timeout" after wait_ms. */
async function exitWithin(p: Subprocess, wait_ms: number): Promise<number | "timeout"> {
  let timer: Timer | undefined;
  const timed_out = new Promise<"timeout">((resolve) => (timer = setTimeout(() => resolve("timeout"), wait_ms)));
  try {
    return await Promise.race([p.exited, timed_out]);
  } finally {
    clearTimeout(timer);
  }
}

/** Waits for `p` to exit for at most wait_ms, then SIGKILLs it and throws. Returns the exit code (null: by signal). */
export async function waitExit(p: Subprocess, wait_ms: number): Promise<number | null> {
  const r = await exitWithin(p, wait_ms);
  if (r !== "timeout") return p.signalCode ? null : r;
  p.kill("SIGKILL");
  const killed = await exitWithin(p, KILLED_EXIT_WAIT_MS);
  throw new Error(`${p.pid} did not exit within ${wait_ms} ms; SIGKILL ${killed === "timeout" ? "did not end it either" : "ended it"}`);
}

export interface ServeOptions {
  cache: string;
  backing: string;
  /** Folder for the unix socket. */
  dir: string;
  /** Socket file name in dir (default s.sock); a restart on the same name gets the same uri. */
  socket_name?: string;
  /** Listen on tcp://127.0.0.1 with a port the kernel picks instead of a unix socket. */
  tcp?: boolean;
  /** More `serve` options (--read-only, --max-connections 2, --data-crc, ...). */
  args?: string[];
}

export interface ServeHandle {
  /** What the server printed after `listening: `. */
  uri: string;
  /** The unix socket path, null on TCP. */
  socket: string | null;
  proc: Subprocess;
  /** Everything the server has written to stderr so far (the last 64 KiB). */
  stderr(): string;
  /** Sends `signal` and waits (bounded) for the exit; returns the exit code, null when a signal ended it. */
  stop(signal?: NodeJS.Signals): Promise<number | null>;
}

/** Starts `pcache serve` and resolves once it is listening; throws with its stderr if it is not. */
export async function startServe(opts: ServeOptions): Promise<ServeHandle> {
  const socket = opts.tcp ? null : join(opts.dir, opts.socket_name ?? "s.sock");
  const listen = socket === null ? "tcp://127.0.0.1:0" : `unix:${socket}`;
  const argv = [PCACHE_BIN, "serve", "--cache", opts.cache, "--backing", opts.backing, "--nbd", listen, ...(opts.args ?? [])];
  const { proc, stderr } = spawnTracked(argv);
  const uri = await waitListening(proc, stderr, argv);
  const stop = async (signal: NodeJS.Signals = "SIGTERM") => {
    if (proc.exitCode === null && proc.signalCode === null) proc.kill(signal);
    return waitExit(proc, STOP_WAIT_MS);
  };
  return { uri, socket, proc, stderr, stop };
}

async function waitListening(proc: Subprocess, stderr: () => string, argv: string[]): Promise<string> {
  let stdout = "";
  let found: (uri: string) => void = () => {};
  const listening = new Promise<string>((resolve) => (found = resolve));
  void drain(proc.stdout as ReadableStream<Uint8Array>, (chunk) => {
    stdout = (stdout + chunk).slice(-OUTPUT_KEEP_CHARS);
    const m = /^listening: (\S+)$/m.exec(stdout);
    if (m) found(m[1]!);
  });
  let timer: Timer | undefined;
  const timed_out = new Promise<"timeout">((resolve) => (timer = setTimeout(() => resolve("timeout"), READY_WAIT_MS)));
  const r = await Promise.race([listening, proc.exited.then(() => "exited" as const), timed_out]);
  clearTimeout(timer);
  if (r !== "exited" && r !== "timeout") return r;
  proc.kill("SIGKILL");
  await exitWithin(proc, KILLED_EXIT_WAIT_MS);
  // Let the drain loops take in the last of the output before it is shown.
  await Bun.sleep(50);
  const why = r === "timeout" ? `printed no "listening:" line within ${READY_WAIT_MS} ms` : `exited ${proc.exitCode ?? proc.signalCode}`;
  throw new Error(`${argv.join(" ")} ${why}\nstdout: ${stdout}\nstderr: ${stderr()}`);
}

/** SIGKILLs every child still running and waits (bounded) for each; for afterAll. */
export async function killAll(): Promise<void> {
  const left = [...children];
  children.clear();
  for (const p of left) p.kill("SIGKILL");
  await Promise.allSettled(left.map((p) => waitExit(p, 5_000)));
}
