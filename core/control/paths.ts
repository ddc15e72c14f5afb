/**
 * Where a server's control socket lives. The default is derived from the cache device, so
 * `pcache status --cache DEV` finds the server of DEV and several servers can run side by side:
 *   $XDG_RUNTIME_DIR/pcache/<name>-<hash>.sock   when XDG_RUNTIME_DIR is set, else
 *   /tmp/pcache-<uid>/<name>-<hash>.sock
 * <name> is the cache file's base name (sanitized, shortened) and <hash> the first 12 hex digits
 * of the SHA-256 of its real path, so a symlink or a relative path finds the same socket.
 *
 * The folder is made 0700 and must stay private to this user: a folder someone else owns (or
 * others can enter) is refused rather than used, since whoever controls it could put a socket
 * of their own in our place.
 */
import { createHash } from "node:crypto";
import { existsSync, lstatSync, mkdirSync, realpathSync } from "node:fs";
import { basename, dirname, join } from "node:path";
import { PcacheError } from "../errors.ts";

/** sun_path holds 108 bytes with the terminating NUL. */
export const CONTROL_PATH_MAX_BYTES = 107;
const NAME_MAX_CHARS = 32;
const HASH_HEX_CHARS = 12;

function uid(): number {
  return process.getuid?.() ?? 0;
}

/** The folder default control sockets go in (not created here). */
export function defaultControlDir(): string {
  const runtime = process.env.XDG_RUNTIME_DIR;
  if (runtime && runtime.startsWith("/") && existsSync(runtime)) return join(runtime, "pcache");
  return `/tmp/pcache-${uid()}`;
}

/** The default control socket of the server using `cache_path` (which must exist). */
export function defaultControlPath(cache_path: string): string {
  let real: string;
  try {
    real = realpathSync(cache_path);
  } catch {
    throw new PcacheError(`cache device ${cache_path} does not exist (name the cache the server was started with, or pass --control PATH)`);
  }
  const name = basename(real).replace(/[^A-Za-z0-9._-]/g, "_").slice(0, NAME_MAX_CHARS) || "cache";
  const hash = createHash("sha256").update(real).digest("hex").slice(0, HASH_HEX_CHARS);
  return join(defaultControlDir(), `${name}-${hash}.sock`);
}

/** A control path from the options of a client command: --control wins, else derived from --cache. */
export function resolveControlPath(opts: { control?: string; cache?: string }): string {
  if (opts.control !== undefined && opts.control !== "") return checkControlPath(opts.control);
  if (opts.cache !== undefined && opts.cache !== "") return defaultControlPath(opts.cache);
  throw new PcacheError("name the server: --cache DEV (the cache it serves) or --control PATH (its control socket)");
}

export function checkControlPath(path: string): string {
  const bytes = new TextEncoder().encode(path).length;
  if (bytes > CONTROL_PATH_MAX_BYTES) throw new PcacheError(`control socket path is ${bytes} bytes; at most ${CONTROL_PATH_MAX_BYTES} fit: ${path} (pass a shorter --control)`);
  if (path.includes("\0")) throw new PcacheError("control socket path contains a NUL byte");
  return path;
}

/** Create the default folder (0700) or check that an existing one is private to this user. */
export function ensurePrivateDir(dir: string): void {
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const st = lstatSync(dir);
  if (!st.isDirectory()) throw new PcacheError(`${dir} is not a directory; remove it or pass --control PATH`);
  if (st.uid !== uid() || (st.mode & 0o077) !== 0) {
    throw new PcacheError(
      `${dir} is not private (owner uid ${st.uid}, mode 0${(st.mode & 0o777).toString(8)}; needed: owner uid ${uid()}, mode 0700); fix or remove it, or pass --control PATH`,
    );
  }
}

/** Whether `path` is in the folder default control sockets go in (which must then be private). */
export function isInDefaultDir(path: string): boolean {
  return dirname(path) === defaultControlDir();
}
