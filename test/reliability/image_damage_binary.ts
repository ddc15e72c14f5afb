/**
 * The binary on a damaged image file: `info --json` and `dump-ksets` exit 0 (with output that
 * parses) or 2 (one line on stderr); `serve` either refuses (exit 1 or 2, one line) or serves a
 * client read and exits 0 on SIGTERM. Never a stack trace, never a hang (every wait is bounded),
 * and a command that refused, or only reads, leaves the file byte for byte as it was.
 */
import { closeSync, openSync, readSync, statSync } from "node:fs";
import { join } from "node:path";
import { MiB } from "../../core/format/constants.ts";
import { drain, PCACHE_BIN, run, type RunResult, sparseFile, spawnTracked, waitExit } from "../helpers/serve_binary.ts";

const RUN_WAIT_MS = 30_000;
const LISTEN_WAIT_MS = 20_000;
const STOP_WAIT_MS = 30_000;
/** What must never appear in what the binary prints. */
const CRASH_SIGNS = /\n\s+at |TypeError|RangeError|ReferenceError|internal error|unexpected error|panic/;

/**
 * What must not change: the file's size and allocated blocks (a store into a hole allocates
 * one) and an xxHash3 of each MiB chunk that holds data (chunks: their indexes; all when null).
 */
export function fileDigest(path: string, chunks: number[] | null): string {
  const st = statSync(path);
  const buf = new Uint8Array(MiB);
  const parts: string[] = [`${st.size}/${st.blocks}`];
  const fd = openSync(path, "r");
  try {
    const all = Array.from({ length: Math.ceil(st.size / MiB) }, (_, i) => i);
    for (const c of chunks ?? all) {
      const n = readSync(fd, buf, 0, buf.length, c * MiB);
      parts.push(Bun.hash.xxHash3(buf.subarray(0, n)).toString(16));
    }
  } finally {
    closeSync(fd);
  }
  return parts.join(".");
}

function oneLineRefusal(tool: string, r: RunResult): string | null {
  const lines = r.stderr.trimEnd().split("\n");
  if (lines.length !== 1 || !lines[0]!.startsWith("pcache: ")) return `${tool} exited ${r.code} without a one-line refusal: ${JSON.stringify(r.stderr.slice(0, 500))}`;
  return null;
}

/** info or dump-ksets: exit 0 with output, or 2 with one line; never writes. */
async function readOnlyTool(file: string, args: string[], digest: () => string, before: string): Promise<string | null> {
  const tool = args[0]!;
  const r = await run([PCACHE_BIN, ...args], RUN_WAIT_MS);
  if (r.code === null) return `${tool} did not finish within ${RUN_WAIT_MS} ms (hang)`;
  if (CRASH_SIGNS.test(r.stderr)) return `${tool} crashed: ${r.stderr.slice(0, 500)}`;
  if (r.code === 0) {
    if (tool === "info") {
      try {
        JSON.parse(r.stdout);
      } catch {
        return `info --json printed something that is not JSON: ${r.stdout.slice(0, 200)}`;
      }
    }
  } else if (r.code === 2) {
    const bad = oneLineRefusal(tool, r);
    if (bad !== null) return bad;
  } else {
    return `${tool} exited ${r.code}: ${r.stderr.slice(0, 500)}`;
  }
  if (digest() !== before) return `${tool} changed the image`;
  return null;
}

/** serve: refuse cleanly, or serve a read and stop on SIGTERM with exit 0. */
async function serveTool(file: string, opts: { data_crc: boolean; dir: string }, digest: () => string, before: string): Promise<string | null> {
  const backing = join(opts.dir, "damage-backing.img");
  await sparseFile(backing, 8 * MiB);
  const sock = join(opts.dir, "damage.sock");
  const argv = [PCACHE_BIN, "serve", "--cache", file, "--backing", backing, "--nbd", `unix:${sock}`, "--workers", "1"];
  if (opts.data_crc) argv.push("--data-crc");
  const { proc, stderr } = spawnTracked(argv);
  let stdout = "";
  let listening: () => void = () => {};
  const up = new Promise<"up">((resolve) => (listening = () => resolve("up")));
  void drain(proc.stdout as ReadableStream<Uint8Array>, (chunk) => {
    stdout += chunk;
    if (/^listening: /m.test(stdout)) listening();
  });
  let timer: Timer | undefined;
  const timeout = new Promise<"timeout">((resolve) => (timer = setTimeout(() => resolve("timeout"), LISTEN_WAIT_MS)));
  const first = await Promise.race([up, proc.exited.then(() => "exited" as const), timeout]);
  clearTimeout(timer);
  if (first === "timeout") {
    await waitExit(proc, 1).catch(() => {});
    return `serve neither listened nor exited within ${LISTEN_WAIT_MS} ms (hang)`;
  }
  if (first === "exited") {
    await Bun.sleep(20); // let the drains take in the last of the output
    const code = proc.exitCode;
    const r: RunResult = { code, stdout, stderr: stderr() };
    if (CRASH_SIGNS.test(r.stderr)) return `serve crashed at start: ${r.stderr.slice(0, 500)}`;
    if (code !== 1 && code !== 2) return `serve exited ${code} at start: ${r.stderr.slice(0, 500)}`;
    const last = r.stderr.trimEnd().split("\n").pop() ?? "";
    if (!last.startsWith("pcache: ")) return `serve refused without a one-line message: ${JSON.stringify(r.stderr.slice(0, 500))}`;
    if (digest() !== before) return "serve refused the image but changed it";
    return null;
  }
  const uri = `nbd+unix:///pcache?socket=${sock}`;
  const read = await run(["qemu-io", "-f", "raw", "-c", "read 0 1M", uri], RUN_WAIT_MS);
  if (read.code === null) return "a client read did not finish (hang)";
  proc.kill("SIGTERM");
  let code: number | null;
  try {
    code = await waitExit(proc, STOP_WAIT_MS);
  } catch (err) {
    return `serve did not stop on SIGTERM: ${(err as Error).message}; it printed: ${stderr().slice(-1500)}`;
  }
  await Bun.sleep(20);
  if (CRASH_SIGNS.test(stderr())) return `serve crashed while serving: ${stderr().slice(-800)}`;
  if (code !== 0) return `serve exited ${code} after SIGTERM: ${stderr().slice(-500)}`;
  return null;
}

/** chunks: the MiB chunks of the image that hold data (the rest is a hole). */
export async function runBinaryChecks(file: string, opts: { data_crc: boolean; serve: boolean; dir: string; chunks: number[] }): Promise<string | null> {
  const digest = () => fileDigest(file, opts.chunks);
  const before = digest();
  const problems = [
    await readOnlyTool(file, ["info", "--cache", file, "--json"], digest, before),
    await readOnlyTool(file, ["dump-ksets", "--cache", file], digest, before),
  ];
  if (opts.serve) problems.push(await serveTool(file, opts, digest, before));
  const found = problems.filter((p) => p !== null);
  return found.length === 0 ? null : found.join("; ");
}
