/**
 * A stand-alone NBD server over a MemoryExport, for tests that need the server in its own
 * process: stdin mode (fd 0 is the client socket, as with `nbdkit -s`), systemd socket
 * activation (LISTEN_PID/LISTEN_FDS, listening socket on fd 3), or a listen address.
 *
 *   bun test/helpers/nbd_serve_memory.ts --stdin [--size BYTES] [--name NAME]
 *   bun test/helpers/nbd_serve_memory.ts --activation
 *   bun test/helpers/nbd_serve_memory.ts --listen unix:/tmp/x.sock
 *
 * Never writes to stdout: in stdin mode stdout may be the client socket.
 */
import { MemoryExport } from "../../core/nbd/memory_export.ts";
import { stderrLogger } from "../../core/nbd/logger.ts";
import { NbdServer, socketActivationFd } from "../../core/nbd/server.ts";

function arg(name: string): string | undefined {
  const i = process.argv.indexOf(name);
  return i >= 0 ? process.argv[i + 1] : undefined;
}

const size_bytes = Number(arg("--size") ?? 64 * 1024 * 1024);
const exp = new MemoryExport({ size_bytes, read_only: process.argv.includes("--read-only") });
const server = new NbdServer({
  export: exp,
  export_name: arg("--name") ?? "pc",
  description: "pcache memory test export",
  log: stderrLogger(process.env.NBD_DEBUG ? "debug" : "warn"),
});

async function main(): Promise<void> {
  if (process.argv.includes("--stdin")) {
    await server.serveFd(0);
    process.exit(0);
  }
  if (process.argv.includes("--activation")) {
    const fd = socketActivationFd();
    if (fd === null) {
      process.stderr.write("nbd_serve_memory: not socket-activated (LISTEN_PID/LISTEN_FDS missing or not ours)\n");
      process.exit(1);
    }
    await server.listen({ kind: "fd", fd });
  } else {
    await server.listen(arg("--listen") ?? "tcp://127.0.0.1:10809");
  }
  const stop = () => void server.stop({ timeout_ms: 5000 }).then(() => process.exit(0));
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
  process.stderr.write("nbd_serve_memory: ready\n");
}

main().catch((e) => {
  process.stderr.write(`nbd_serve_memory: ${e instanceof Error ? e.message : String(e)}\n`);
  process.exit(1);
});
