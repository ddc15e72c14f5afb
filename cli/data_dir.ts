/**
 * The data folder: where `pcache serve` with no devices keeps its cache and backing files, and
 * where the client commands (status, gc-percent, drain) look for a server when none is named.
 */
import { existsSync } from "node:fs";
import { homedir } from "node:os";
import { join } from "node:path";

export const DATA_DIR_CACHE_FILE = "cache.img";
export const DATA_DIR_BACKING_FILE = "backing.img";

export function defaultDataDir(): string {
  const base = process.env.XDG_DATA_HOME || join(homedir(), ".local", "share");
  return join(base, "pcache");
}

/** The data folder's cache file when it exists (a server started with no devices uses it). */
export function dataDirCache(): string | undefined {
  const path = join(defaultDataDir(), DATA_DIR_CACHE_FILE);
  return existsSync(path) ? path : undefined;
}
