/**
 * Logging for the NBD layer: one injectable function, so the server can run inside a worker,
 * in stdin mode (where stdout IS the client socket and must never be written), or in tests
 * that want silence. Lines are single-line by construction; nothing here prints a stack.
 */
export type NbdLogLevel = "debug" | "info" | "warn" | "error";
export type NbdLogger = (level: NbdLogLevel, message: string) => void;

const LEVEL_RANK: Record<NbdLogLevel, number> = { debug: 0, info: 1, warn: 2, error: 3 };

/** Writes `nbd: LEVEL: message` lines to stderr (never stdout) at or above `min_level`. */
export function stderrLogger(min_level: NbdLogLevel = "info"): NbdLogger {
  const min = LEVEL_RANK[min_level];
  return (level, message) => {
    if (LEVEL_RANK[level] < min) return;
    process.stderr.write(`nbd: ${level}: ${oneLine(message)}\n`);
  };
}

export const silentLogger: NbdLogger = () => {};

/** Collapses newlines so a peer- or export-supplied message cannot forge extra log lines. */
export function oneLine(s: string): string {
  return s.replace(/[\r\n]+/g, " ").slice(0, 1024);
}

/** Describes an error in one line: its name and message, never its stack. */
export function describeError(e: unknown): string {
  if (e instanceof Error) return oneLine(`${e.name}: ${e.message}`);
  return oneLine(String(e));
}
