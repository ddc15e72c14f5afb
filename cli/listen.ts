/**
 * The listening socket of `serve`, made once on the main thread; every request worker gets its
 * own dup of it (threads share the fd table) and accepts on it with Bun.listen({fd}).
 */
import { existsSync } from "node:fs";
import { closeFd } from "../ffi/libc.ts";
import { dupFd, listenTcp, listenUnix } from "../ffi/socket.ts";
import { parseListenAddress, removeStaleUnixSocket, unlinkQuietly } from "../core/nbd/server.ts";

export interface Listening {
  fd: number;
  /** What clients connect to: nbd://HOST:PORT/EXPORT or nbd+unix:///EXPORT?socket=PATH. */
  uriFor(export_name: string): string;
  /** A dup for one worker, which owns (and closes) it. */
  dupForWorker(): number;
  close(): void;
}

export async function openListening(spec: string): Promise<Listening> {
  const addr = parseListenAddress(spec);
  if (addr.kind === "tcp") {
    const t = await listenTcp(addr.host, addr.port);
    const host = t.host.includes(":") ? `[${t.host}]` : t.host;
    return listening(t.fd, (name) => `nbd://${host}:${t.port}/${name}`, () => {});
  }
  if (addr.kind === "unix") {
    if (existsSync(addr.path)) await removeStaleUnixSocket(addr.path);
    const fd = listenUnix(addr.path);
    return listening(fd, (name) => `nbd+unix:///${name}?socket=${addr.path}`, () => unlinkQuietly(addr.path));
  }
  return inheritedListening(addr.fd);
}

/** An already listening socket (socket activation): we serve it but never unlink anything. */
export function inheritedListening(fd: number): Listening {
  return listening(fd, () => `fd ${fd}`, () => {});
}

function listening(fd: number, uriFor: (name: string) => string, cleanup: () => void): Listening {
  let open = true;
  return {
    fd,
    uriFor,
    dupForWorker: () => dupFd(fd),
    close() {
      if (!open) return;
      open = false;
      try {
        closeFd(fd);
      } catch {
        // Already closed by the kernel at exit; nothing to release.
      }
      cleanup();
    },
  };
}
