/** consola-backed logger for the server: --log-level and --log-format json. */
import { createConsola, LogLevels } from "consola";
import type { Logger } from "../core/engine/context.ts";
import { fail } from "./run.ts";

const LEVELS = ["error", "warn", "info", "debug"] as const;
export type Level = (typeof LEVELS)[number];

/** A logger that knows its level (workers get the same level and forward their lines). */
export interface LevelLogger extends Logger {
  readonly level: Level;
}

export function makeLogger(level_name: string, format: string): LevelLogger {
  if (!(LEVELS as readonly string[]).includes(level_name)) fail(`--log-level must be one of ${LEVELS.join(", ")}, not "${level_name}"`);
  if (format !== "text" && format !== "json") fail(`--log-format must be text or json, not "${format}"`);
  const level = LogLevels[level_name as Level];
  if (format === "json") {
    const emit = (lvl: Level) => (msg: string) => {
      if (LogLevels[lvl] <= level) process.stderr.write(`${JSON.stringify({ time: new Date().toISOString(), level: lvl, msg })}\n`);
    };
    return { level: level_name as Level, error: emit("error"), warn: emit("warn"), info: emit("info"), debug: emit("debug") };
  }
  const c = createConsola({ level, stderr: process.stderr, stdout: process.stderr }).withTag("pcache");
  return { level: level_name as Level, error: (m) => c.error(m), warn: (m) => c.warn(m), info: (m) => c.info(m), debug: (m) => c.debug(m) };
}
