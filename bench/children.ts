/**
 * Every process the benchmark starts goes through here, so an interrupt or a failure can stop
 * exactly those (by pid, never by name) and nothing is left running or holding a socket.
 */
import { closeSync, openSync } from "node:fs";
import type { Subprocess } from "bun";

/** Live children by pid; bounded by how many the benchmark runs at once (a server and a client). */
const live = new Map<number, Subprocess>();
const LIVE_MAX = 16;

export interface SpawnOptions {
  /** Append stdout and stderr to this file (else they are discarded). */
  log_path?: string;
  env?: Record<string, string | undefined>;
}

export function spawnChild(argv: string[], opts: SpawnOptions = {}): Subprocess {
  if (live.size >= LIVE_MAX) throw new Error(`more than ${LIVE_MAX} child processes at once`);
  const fd = opts.log_path === undefined ? null : openSync(opts.log_path, "a");
  try {
    const proc = Bun.spawn(argv, {
      stdin: "ignore",
      stdout: fd ?? "ignore",
      stderr: fd ?? "ignore",
      env: opts.env ?? (process.env as Record<string, string | undefined>),
    });
    live.set(proc.pid, proc);
    void proc.exited.then(() => live.delete(proc.pid));
    return proc;
  } finally {
    if (fd !== null) closeSync(fd);
  }
}

/** SIGTERM, then SIGKILL after grace_ms; resolves once the process has exited. */
export async function stopChild(proc: Subprocess, grace_ms: number): Promise<number | null> {
  if (proc.exitCode !== null || proc.signalCode !== null) return proc.exitCode;
  proc.kill("SIGTERM");
  const timer = setTimeout(() => proc.kill("SIGKILL"), grace_ms);
  try {
    return await proc.exited;
  } finally {
    clearTimeout(timer);
  }
}

/** Run to completion with a time limit; output captured. */
export async function runChild(
  argv: string[],
  timeout_ms: number,
  env?: Record<string, string | undefined>,
): Promise<{ code: number | null; stdout: string; stderr: string; timed_out: boolean }> {
  if (live.size >= LIVE_MAX) throw new Error(`more than ${LIVE_MAX} child processes at once`);
  const proc = Bun.spawn(argv, { stdin: "ignore", stdout: "pipe", stderr: "pipe", env: env ?? (process.env as Record<string, string | undefined>) });
  live.set(proc.pid, proc);
  let timed_out = false;
  const timer = setTimeout(() => {
    timed_out = true;
    proc.kill("SIGKILL");
  }, timeout_ms);
  try {
    const [stdout, stderr, code] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text(), proc.exited]);
    return { code, stdout, stderr, timed_out };
  } finally {
    clearTimeout(timer);
    live.delete(proc.pid);
  }
}

/** Kill every child still running (interrupt path): SIGTERM, short grace, SIGKILL. */
export async function stopAllChildren(grace_ms: number): Promise<void> {
  await Promise.allSettled([...live.values()].map((p) => stopChild(p, grace_ms)));
}

/** Is the command on PATH? */
export function haveCommand(name: string): boolean {
  return Bun.which(name) !== null;
}
