/**
 * `dist/pcache` as a child process for the reliability harness: format, serve on a unix socket,
 * SIGKILL, SIGTERM, `info --json`, and the server's memory from /proc. Every wait is bounded and
 * every error comes back as a one-line string, so callers can report it with their seed.
 */
import { readFileSync } from "node:fs";

export interface PcacheProcessOptions {
  binary: string;
  cache: string;
  backing: string;
  socket: string;
  data_crc?: boolean;
  /** serve --log-level (default warn). */
  log_level?: string;
}

/** The positions `pcache info --json` reports. */
export interface CacheInfo {
  key_tail: string;
  dirty_tail: string;
  key_head: string;
  segments_in_use: number;
}

/** Kept of the server's stderr for failure messages. */
const STDERR_TAIL_BYTES = 64 * 1024;
const START_TIMEOUT_MS = 60_000;
const STOP_TIMEOUT_MS = 60_000;

export class PcacheProcess {
  private proc: Bun.Subprocess<"ignore", "pipe", "pipe"> | null = null;
  private stdout_text = "";
  private stderr_text = "";
  private last_error = "";
  uri: string | null = null;

  constructor(readonly o: PcacheProcessOptions) {}

  get pid(): number | null {
    return this.proc?.pid ?? null;
  }

  /** Running and not yet seen to exit. */
  alive(): boolean {
    return this.proc !== null && this.proc.exitCode === null && this.proc.signalCode === null;
  }

  /** The last few non-empty lines the server wrote to stderr, on one line. */
  stderrTail(): string {
    const lines = this.stderr_text.split("\n").filter((l) => l.trim() !== "");
    return lines.slice(-6).join(" | ");
  }

  lastError(): string {
    return this.last_error;
  }

  /** Formats the cache (512 MiB); returns an error line or null. */
  async format(gc_percent: number): Promise<string | null> {
    const argv = [this.o.binary, "format", "--cache", this.o.cache, "--size", "512M", "--gc-percent", String(gc_percent), "--force"];
    if (this.o.data_crc) argv.push("--data-crc");
    const r = await runToText(argv, 60_000);
    return r.code === 0 ? null : `pcache format failed (exit ${r.code}): ${r.text.trim()}`;
  }

  /** Starts `serve` and waits for "listening:"; returns an error line or null. */
  async start(): Promise<string | null> {
    if (this.alive()) return "start: the server is already running";
    const argv = [this.o.binary, "serve", "--cache", this.o.cache, "--backing", this.o.backing, "--nbd", `unix:${this.o.socket}`, "--log-level", this.o.log_level ?? "warn"];
    if (this.o.data_crc) argv.push("--data-crc");
    this.stdout_text = "";
    this.stderr_text = "";
    this.uri = null;
    const p = Bun.spawn(argv, { stdin: "ignore", stdout: "pipe", stderr: "pipe", env: { ...process.env, NO_COLOR: "1" } });
    this.proc = p;
    drain(p.stdout, (t) => (this.stdout_text = (this.stdout_text + t).slice(-STDERR_TAIL_BYTES)));
    drain(p.stderr, (t) => (this.stderr_text = (this.stderr_text + t).slice(-STDERR_TAIL_BYTES)));
    const deadline = Date.now() + START_TIMEOUT_MS;
    while (Date.now() < deadline) {
      const m = /listening: (\S+)/.exec(this.stdout_text);
      if (m) {
        this.uri = m[1]!;
        return null;
      }
      if (!this.alive()) {
        await p.exited;
        return `the server exited with ${p.exitCode ?? p.signalCode} while starting: ${this.stderrTail()}`;
      }
      await Bun.sleep(10);
    }
    await this.stopHard();
    return `the server did not print "listening:" within ${START_TIMEOUT_MS} ms: ${this.stderrTail()}`;
  }

  /** SIGKILL; an error line if the server had already died on its own. */
  async kill(): Promise<string | null> {
    const p = this.proc;
    if (p === null) return "kill: no server was started";
    const was_alive = this.alive();
    if (was_alive) p.kill("SIGKILL");
    await p.exited;
    this.proc = null;
    if (!was_alive) return `the server had exited on its own (${p.exitCode ?? p.signalCode}) before the kill: ${this.stderrTail()}`;
    return null;
  }

  /** SIGTERM and wait: the exit code, or -1 after a forced kill. */
  async stopGracefully(): Promise<number> {
    const p = this.proc;
    if (p === null) return -1;
    if (this.alive()) p.kill("SIGTERM");
    const done = await Promise.race([p.exited.then(() => true), Bun.sleep(STOP_TIMEOUT_MS).then(() => false)]);
    if (!done) {
      await this.stopHard();
      return -1;
    }
    this.proc = null;
    return p.exitCode ?? -1;
  }

  /** SIGKILL without questions (cleanup). */
  async stopHard(): Promise<void> {
    const p = this.proc;
    if (p === null) return;
    if (this.alive()) p.kill("SIGKILL");
    await p.exited;
    this.proc = null;
  }

  /** `pcache info --json` (safe while the server runs: positions may be moving). */
  async info(): Promise<CacheInfo | null> {
    const r = await runToText([this.o.binary, "info", "--cache", this.o.cache, "--json"], 30_000, true);
    if (r.code !== 0) {
      this.last_error = `exit ${r.code}: ${r.text.trim().split("\n")[0]}`;
      return null;
    }
    try {
      const j = JSON.parse(r.text) as CacheInfo;
      return { key_tail: j.key_tail, dirty_tail: j.dirty_tail, key_head: j.key_head, segments_in_use: j.segments_in_use };
    } catch (e) {
      this.last_error = `unparseable info output: ${String(e)}`;
      return null;
    }
  }

  /** Resident memory of the server from /proc: total and anonymous (heap, buffers) in bytes. */
  memory(): { rss_bytes: number; anon_bytes: number } | null {
    const pid = this.pid;
    return pid === null ? null : procMemory(pid);
  }
}

/** VmRSS and RssAnon of a process, or null when it is gone. */
export function procMemory(pid: number): { rss_bytes: number; anon_bytes: number } | null {
  let text: string;
  try {
    text = readFileSync(`/proc/${pid}/status`, "utf8");
  } catch {
    return null;
  }
  const kb = (key: string) => Number(new RegExp(`^${key}:\\s+(\\d+) kB`, "m").exec(text)?.[1] ?? NaN) * 1024;
  return { rss_bytes: kb("VmRSS"), anon_bytes: kb("RssAnon") };
}

/** Reads a child's stream to the end in the background, so its pipe never fills. */
function drain(stream: ReadableStream<Uint8Array>, on_text: (t: string) => void): void {
  const dec = new TextDecoder();
  void (async () => {
    const r = stream.getReader();
    // Bounded by the child: the stream ends when it exits.
    for (;;) {
      const { value, done } = await r.read();
      if (done) return;
      on_text(dec.decode(value, { stream: true }));
    }
  })().catch(() => {});
}

/** Runs a command to completion (killed after timeout_ms); stdout + stderr as text. */
export async function runToText(argv: string[], timeout_ms: number, stdout_only = false, cwd?: string): Promise<{ code: number; text: string }> {
  const p = Bun.spawn(argv, { cwd, stdin: "ignore", stdout: "pipe", stderr: "pipe", env: { ...process.env, NO_COLOR: "1" } });
  const timer = setTimeout(() => p.kill("SIGKILL"), timeout_ms);
  const [out, err] = await Promise.all([new Response(p.stdout).text(), new Response(p.stderr).text()]);
  await p.exited;
  clearTimeout(timer);
  const code = p.exitCode ?? -1;
  return { code, text: stdout_only && code === 0 ? out : out + err };
}
