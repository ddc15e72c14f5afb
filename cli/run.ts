/**
 * Shared plumbing for commands: one-line errors with the right exit code, never a stack trace
 * for a user-facing error; size and number parsing with specific messages.
 */
import { AssertionError } from "../core/assert.ts";
import { PcacheError } from "../core/errors.ts";

/** Exit status for a bug in pcache itself (an assertion or an unexpected exception). */
export const EXIT_INTERNAL = 70;

export function fail(message: string, exit_code = 1): never {
  throw new PcacheError(message, exit_code);
}

/** Run a command body; turn errors into one line on stderr and an exit status. */
export async function runCommand(body: () => Promise<number | void> | number | void): Promise<never> {
  let code = 0;
  try {
    code = (await body()) ?? 0;
  } catch (err) {
    code = reportError(err);
  }
  process.exit(code);
}

export function reportError(err: unknown): number {
  if (err instanceof PcacheError) {
    process.stderr.write(`pcache: ${err.message}\n`);
    return err.exit_code;
  }
  const e = err as Error;
  const kind = err instanceof AssertionError ? "internal error (a bug in pcache)" : "unexpected error";
  process.stderr.write(`pcache: ${kind}: ${e?.message ?? String(err)}\n`);
  if (process.env.PCACHE_DEBUG) process.stderr.write(`${e?.stack ?? ""}\n`);
  return EXIT_INTERNAL;
}

const SIZE_UNITS: Record<string, number> = { "": 1, b: 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40 };

/** "1G", "512M", "4096", "1.5g" -> bytes. */
export function parseSize(text: string, what: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([bkmgt]?)(?:i?b)?\s*$/i.exec(text);
  if (m === null) fail(`${what}: "${text}" is not a size (examples: 1G, 512M, 1048576)`);
  const bytes = Math.floor(Number(m[1]) * SIZE_UNITS[m[2].toLowerCase()]);
  if (!Number.isSafeInteger(bytes) || bytes <= 0) fail(`${what}: "${text}" is out of range`);
  return bytes;
}

/** A whole number in [min, max], with a message naming the option. */
export function parseIntInRange(text: string, what: string, min: number, max: number): number {
  if (!/^\s*-?\d+\s*$/.test(text)) fail(`${what}: "${text}" is not a whole number (allowed: ${min}..${max})`);
  const n = Number(text);
  if (!Number.isSafeInteger(n) || n < min || n > max) fail(`${what}: ${text} is out of range (allowed: ${min}..${max})`);
  return n;
}
