/**
 * The control socket against the compiled binary: `status` (text, --json, Prometheus parsed line
 * by line), counters after real client I/O, the dirty-bytes gauge, `gc-percent` (at once,
 * refusals, persisted across a restart), `drain` (success with the data on the backing file,
 * timeout while writeback is paused, failure while the backing device is full), a wrong control
 * path, a stopped server, a second server on a taken control path, a peer of another uid, and
 * `info` on a device in use. First, without the binary: the dirty-log scan behind dirty bytes and
 * drain's target, over a log that crosses a LAST kset.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import type { Subprocess } from "bun";
import { chmodSync, existsSync, mkdirSync, mkdtempSync, rmSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { controlRequest } from "../core/control/client.ts";
import { scanDirty } from "../core/control/dirty.ts";
import { defaultControlPath } from "../core/control/paths.ts";
import { MemoryBacking } from "../core/device/memory_backing.ts";
import { Engine } from "../core/engine/engine.ts";
import { KEY_F_CLEAN } from "../core/format/constants.ts";
import { formatCache as formatSim } from "../core/format/format_cache.ts";
import { LogBuilder } from "../core/format/log_builder.ts";
import { SimDomain } from "../core/persist/sim.ts";
import { Writeback } from "../core/writeback/writeback.ts";
import { tmpdir } from "node:os";

const BIN = process.env.PCACHE_BIN ?? join(import.meta.dir, "..", "dist", "pcache");
/** The data folder of every command here: empty unless a test puts a cache in it. */
const DATA_HOME = mkdtempSync(join(tmpdir(), "pcache-control-xdg-"));
/** Debian's qemu-io and tools from /usr/bin; no colors in output. */
const ENV = { ...process.env, PATH: `/usr/bin:/usr/sbin:/bin:/sbin:${process.env.PATH ?? ""}`, NO_COLOR: "1", XDG_DATA_HOME: DATA_HOME };
const children = new Set<Subprocess>();

interface RunResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Runs a command to completion (SIGKILLed after timeout_ms); never throws on a non-zero exit. */
async function run(argv: string[], timeout_ms = 60_000): Promise<RunResult> {
  const p = Bun.spawn(argv, { stdout: "pipe", stderr: "pipe", stdin: "ignore", env: ENV });
  children.add(p);
  const timer = setTimeout(() => p.kill("SIGKILL"), timeout_ms);
  try {
    const [stdout, stderr, code] = await Promise.all([new Response(p.stdout).text(), new Response(p.stderr).text(), p.exited]);
    return { code: p.signalCode ? null : code, stdout, stderr };
  } finally {
    clearTimeout(timer);
    children.delete(p);
  }
}

/** Feeds decoded chunks of `stream` to `sink` until it ends. */
async function drainStream(stream: ReadableStream<Uint8Array>, sink: (text: string) => void): Promise<void> {
  const decoder = new TextDecoder();
  try {
    for await (const chunk of stream) sink(decoder.decode(chunk, { stream: true }));
  } catch {
    // The child died and the pipe broke: what was read is all there is.
  }
}

async function waitExit(p: Subprocess, wait_ms: number): Promise<number | null> {
  let timer: Timer | undefined;
  const r = await Promise.race([p.exited, new Promise<"timeout">((resolve) => (timer = setTimeout(() => resolve("timeout"), wait_ms)))]);
  clearTimeout(timer);
  if (r === "timeout") {
    p.kill("SIGKILL");
    await p.exited;
    throw new Error(`pid ${p.pid} did not exit within ${wait_ms} ms (killed)`);
  }
  return p.signalCode ? null : r;
}

const have = (bin: string) => Bun.which(bin, { PATH: ENV.PATH }) !== null;

const MiB = 1024 * 1024;
const KiB = 1024;
const dir = mkdtempSync(join(existsSync("/dev/shm") ? "/dev/shm" : tmpdir(), "pcache-control-"));
const HAVE_QEMU_IO = have("qemu-io");
if (!HAVE_QEMU_IO) console.warn("\n!!!!! SKIPPING control tests that need qemu-io: it is not installed !!!!!\n");

beforeAll(() => {
  if (!existsSync(BIN)) throw new Error(`${BIN} is missing: run "bun scripts/build.ts" first`);
});

afterAll(async () => {
  for (const p of children) p.kill("SIGKILL");
  await Promise.allSettled([...children].map((p) => p.exited));
  rmSync(dir, { recursive: true, force: true });
  rmSync(DATA_HOME, { recursive: true, force: true });
});

async function formatCache(path: string): Promise<void> {
  const r = await run([BIN, "format", "--cache", path, "--size", "512M"]);
  if (r.code !== 0) throw new Error(`format failed: ${r.stderr}`);
}

async function sparseFile(path: string, length_bytes: number): Promise<void> {
  expect((await run(["truncate", "-s", String(length_bytes), path])).code).toBe(0);
}

interface Server {
  proc: Subprocess<"ignore", "pipe", "pipe">;
  uri: string;
  control: string;
  stdout_lines: string[];
  stderr(): string;
  stop(): Promise<number | null>;
}

/** Starts serve and waits for its `listening:` and `control:` lines. */
async function serve(cache: string, backing: string, sock: string, extra: string[] = []): Promise<Server> {
  const argv = [BIN, "serve", "--cache", cache, "--backing", backing, "--nbd", `unix:${sock}`, "--workers", "1", ...extra];
  const proc = Bun.spawn(argv, { stdout: "pipe", stderr: "pipe", stdin: "ignore", env: ENV });
  children.add(proc);
  void proc.exited.then(() => children.delete(proc));
  let out = "";
  let err = "";
  const stderr = () => err;
  void drainStream(proc.stdout, (chunk) => (out += chunk));
  void drainStream(proc.stderr, (chunk) => (err = (err + chunk).slice(-65536)));
  const deadline = Date.now() + 20_000;
  while (!/^control: \S+$/m.test(out) && proc.exitCode === null && Date.now() < deadline) await Bun.sleep(20);
  const uri = /^listening: (\S+)$/m.exec(out)?.[1];
  const control = /^control: (\S+)$/m.exec(out)?.[1];
  if (uri === undefined || control === undefined) {
    proc.kill("SIGKILL");
    throw new Error(`${argv.join(" ")} did not start\nstdout: ${out}\nstderr: ${stderr()}`);
  }
  return {
    proc,
    uri,
    control,
    stdout_lines: out.trim().split("\n"),
    stderr,
    stop: async () => {
      proc.kill("SIGTERM");
      return waitExit(proc, 30_000);
    },
  };
}

function pcache(...args: string[]) {
  return run([BIN, ...args], 60_000);
}

function qemuIo(uri: string, ...cmds: string[]) {
  return run(["qemu-io", "-f", "raw", ...cmds.flatMap((c) => ["-c", c]), uri], 60_000);
}

async function statusJson(...where: string[]): Promise<Record<string, any>> {
  const r = await pcache("status", ...where, "--json");
  expect(r.stderr).toBe("");
  expect(r.code).toBe(0);
  return JSON.parse(r.stdout);
}

/** One-line error on stderr, exit 1. */
function expectRefusal(r: { code: number | null; stdout: string; stderr: string }, pattern: RegExp): void {
  expect(r.code).toBe(1);
  expect(r.stderr.trim().split("\n")).toHaveLength(1);
  expect(r.stderr).toMatch(pattern);
}

/** Sends raw bytes to a control socket and returns the first line of the answer. */
async function rawExchange(path: string, bytes: string): Promise<string> {
  const line = Promise.withResolvers<string>();
  let got = "";
  const sock = await Bun.connect({
    unix: path,
    socket: {
      data(_s, chunk) {
        got += new TextDecoder().decode(chunk);
        if (got.includes("\n")) line.resolve(got.slice(0, got.indexOf("\n")));
      },
      close() {
        line.reject(new Error(`closed without an answer (got ${JSON.stringify(got)})`));
      },
    },
  });
  sock.write(bytes);
  const timer = setTimeout(() => line.reject(new Error("no answer within 15 s")), 15_000);
  try {
    return await line.promise;
  } finally {
    clearTimeout(timer);
    sock.end();
  }
}

const METRIC_NAME = /^[a-zA-Z_:][a-zA-Z0-9_:]*$/;
const LABEL = /^([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"/;

/** Parses the text exposition format strictly; returns name{labels} -> value. Throws on any bad line. */
function parsePrometheus(text: string): Map<string, number> {
  expect(text.endsWith("\n")).toBe(true);
  const types = new Map<string, string>();
  const helps = new Set<string>();
  const counts = new Map<string, number>();
  const samples = new Map<string, number>();
  for (const line of text.slice(0, -1).split("\n")) {
    if (line.startsWith("#")) {
      const m = /^# (HELP|TYPE) (\S+) (.+)$/.exec(line);
      if (!m) throw new Error(`bad comment line: ${line}`);
      if (!METRIC_NAME.test(m[2])) throw new Error(`bad metric name: ${line}`);
      if (m[1] === "HELP") {
        if (helps.has(m[2])) throw new Error(`second HELP for ${m[2]}`);
        helps.add(m[2]);
      } else {
        if (types.has(m[2])) throw new Error(`second TYPE for ${m[2]}`);
        if (!["counter", "gauge", "histogram", "summary", "untyped"].includes(m[3])) throw new Error(`bad type: ${line}`);
        if (m[3] === "counter" && !m[2].endsWith("_total")) throw new Error(`counter not named _total: ${line}`);
        types.set(m[2], m[3]);
        counts.set(m[2], 0);
      }
      continue;
    }
    const name = /^[a-zA-Z_:][a-zA-Z0-9_:]*/.exec(line)?.[0];
    if (name === undefined) throw new Error(`bad sample line: ${line}`);
    let rest = line.slice(name.length);
    const labels: string[] = [];
    if (rest.startsWith("{")) {
      rest = rest.slice(1);
      while (!rest.startsWith("}")) {
        const m = LABEL.exec(rest);
        if (!m) throw new Error(`bad labels: ${line}`);
        labels.push(m[0]);
        rest = rest.slice(m[0].length);
        if (rest.startsWith(",")) rest = rest.slice(1);
        else if (!rest.startsWith("}")) throw new Error(`bad labels: ${line}`);
      }
      rest = rest.slice(1);
    }
    const value = /^ (\S+)$/.exec(rest)?.[1];
    if (value === undefined) throw new Error(`bad sample value: ${line}`);
    const v = value === "NaN" ? Number.NaN : value === "+Inf" ? Infinity : value === "-Inf" ? -Infinity : Number(value);
    if (value !== "NaN" && Number.isNaN(v)) throw new Error(`value is not a float: ${line}`);
    if (!types.has(name)) throw new Error(`sample of a family without TYPE: ${line}`);
    if (!helps.has(name)) throw new Error(`sample of a family without HELP: ${line}`);
    counts.set(name, (counts.get(name) ?? 0) + 1);
    const key = labels.length > 0 ? `${name}{${labels.join(",")}}` : name;
    if (samples.has(key)) throw new Error(`duplicate sample: ${line}`);
    samples.set(key, v);
  }
  for (const [name, n] of counts) if (n === 0) throw new Error(`family ${name} has a TYPE but no samples`);
  return samples;
}

describe("dirty-log scan (no binary)", () => {
  test("counts dirty keys (not CLEAN ones) across a LAST kset, and tracks a drain target as writeback passes it", async () => {
    const dom = new SimDomain(512 * MiB, { seed: 7 });
    const meta = formatSim(dom, { data_crc: false });
    const KiB = 1024;
    // Log in segment 0, then a LAST kset into segment 2; data in segment 1.
    const b = new LogBuilder(dom, meta);
    b.appendKset([{ off: 0, len: 8 * KiB, cache_seg_id: 1, cache_seg_off: 0 }]);
    b.appendKset([{ off: 64 * KiB, len: 4 * KiB, cache_seg_id: 1, cache_seg_off: 8 * KiB, flags: KEY_F_CLEAN }]);
    b.appendLast(2);
    const target = b.head;
    b.appendKset([{ off: 128 * KiB, len: 12 * KiB, cache_seg_id: 1, cache_seg_off: 12 * KiB }]);
    const engine = Engine.open(dom, new MemoryBacking(16 * MiB), { n_ksets: 1 });
    const ctx = engine.ctx;
    const walk_meta = { n_segs: meta.n_segs, seg_ids: engine.meta.seg_ids, seg_gens: ctx.s.seg_gens, data_crc: false };
    const all = scanDirty(ctx, walk_meta, target)!;
    expect(all.logged_dirty_bytes).toBe(20 * KiB);
    expect(all.key_head).toEqual(b.head);
    expect(all.target_reached).toBe(false);
    expect(all.before_target_bytes).toBe(8 * KiB);
    const wb = new Writeback(ctx, engine.meta);
    const seen: Array<[boolean, number, number]> = [];
    for (let i = 0; i < 4; i++) {
      expect(await wb.step()).toBe("progress");
      const r = scanDirty(ctx, walk_meta, target)!;
      seen.push([r.target_reached, r.before_target_bytes, r.logged_dirty_bytes]);
    }
    // After kset 1, the CLEAN kset, the LAST kset (dirty_tail == target), the last kset (past it).
    expect(seen).toEqual([
      [false, 0, 12 * KiB],
      [false, 0, 12 * KiB],
      [true, 0, 12 * KiB],
      [true, 0, 0],
    ]);
    expect(await wb.step()).toBe("idle");
  }, 30_000);
});

describe("control socket with a running server", () => {
  const cache = join(dir, "cache.img");
  const backing = join(dir, "backing.img");
  const sock = join(dir, "nbd.sock");
  let s: Server;

  beforeAll(async () => {
    await formatCache(cache);
    await sparseFile(backing, 64 * MiB);
    s = await serve(cache, backing, sock);
  });

  test("serve prints control: PATH after listening:, the default derived from the cache; the socket is 0600", () => {
    expect(s.stdout_lines[0]).toStartWith("listening: ");
    expect(s.stdout_lines[1]).toBe(`control: ${defaultControlPath(cache)}`);
    expect(statSync(s.control).mode & 0o777).toBe(0o600);
    expect(statSync(join(s.control, "..")).mode & 0o777).toBe(0o700);
  });

  test("status: text, --json and Prometheus on a fresh server", async () => {
    const text = await pcache("status", "--cache", cache);
    expect(text.code).toBe(0);
    // seg_num and n_segs of a 512 MiB cache, one segment used (the log), gc_percent 70, empty log.
    expect(text.stdout).toMatch(/^dm-pcache status {2}0x0 31 31 1 70 0x[0-9a-f]+ 0:0 0:0 0:0$/m);
    expect(text.stdout).toMatch(/^dirty {13}0 bytes$/m);
    expect(text.stdout).toMatch(/^busy-poll {9}0 spins, 0 found the next request, 0\.000 s of CPU$/m);
    const j = await statusJson("--control", s.control);
    expect(j.n_segs).toBe(31);
    expect(j.gc_percent).toBe(70);
    expect(j.key_head).toBe("0:0");
    expect(j.cache_mode).toBe("writeback");
    expect(j.data_crc).toBe(false);
    expect(j.persistence_domain).toBe("msync");
    expect(j.dirty_bytes).toBe(0);
    expect(j.busy_poll).toEqual({ spins: 0, hits: 0, seconds: 0 });
    expect(j.flush_epochs_tracked).toBe(true);
    expect(j.writeback_skipped_bytes).toBe(0);
    expect(j.writeback_defer_ms).toBe(30_000);
    expect(j.writeback_deferred).toBe(false);
    expect(j.workers.map((w: { name: string; state: string }) => `${w.name}=${w.state}`).sort()).toEqual([
      "gc=running",
      "request worker 1=running",
      "writeback=running",
    ]);
    const prom = await pcache("status", "--cache", cache, "--format", "prometheus");
    expect(prom.code).toBe(0);
    const m = parsePrometheus(prom.stdout);
    expect(m.get("pcache_gc_percent")).toBe(70);
    expect(m.get("pcache_cache_segments")).toBe(31);
    expect(m.get('pcache_log_position_segment{position="key_head"}')).toBe(0);
    expect(m.get('pcache_errors_total{kind="backing_write"}')).toBe(0);
    expect(m.get('pcache_worker_state{worker="writeback",role="writeback",state="running"}')).toBe(1);
    expect(m.get("pcache_dirty_bytes")).toBe(0);
    expect(m.get("pcache_busy_poll_spins_total")).toBe(0);
    expect(m.get("pcache_busy_poll_seconds_total")).toBe(0);
    expect(m.get("pcache_flush_epochs_tracked")).toBe(1);
    expect(m.get("pcache_writeback_skipped_bytes_total")).toBe(0);
    expect(m.get("pcache_writeback_defer_seconds")).toBe(30);
    expect(m.get("pcache_writeback_deferred")).toBe(0);
  }, 30_000);

  test.if(HAVE_QEMU_IO)(
    "counters move after a client writes and reads; dirty bytes are exact while writeback is paused; drain times out with the reason",
    async () => {
      await controlRequest(s.control, { op: "writeback_pause", paused: true });
      const io = await qemuIo(s.uri, "write -P 0x5a 0 4M", "read -P 0x5a 0 4M", "read 16M 1M");
      expect(io.code).toBe(0);
      const j = await statusJson("--cache", cache);
      expect(j.writes).toBeGreaterThanOrEqual(1);
      expect(j.written_bytes).toBe(4 * MiB);
      expect(j.read_hit_bytes).toBe(4 * MiB);
      expect(j.read_miss_bytes).toBe(1 * MiB);
      expect(j.read_misses).toBe(1);
      expect(j.dirty_bytes).toBe(4 * MiB);
      expect(j.writeback_paused).toBe(true);
      const m = parsePrometheus((await pcache("status", "--cache", cache, "--format", "prometheus")).stdout);
      expect(m.get("pcache_written_bytes_total")).toBe(4 * MiB);
      expect(m.get("pcache_read_hit_bytes_total")).toBe(4 * MiB);
      expect(m.get("pcache_dirty_bytes")).toBe(4 * MiB);
      const d = await pcache("drain", "--cache", cache, "--timeout", "1");
      expectRefusal(d, /drain timed out after 1 s with 4\.0 MiB left to write back \(writeback is paused\)/);
    },
    30_000,
  );

  test.if(HAVE_QEMU_IO)(
    "drain waits for writeback, shows progress, exits 0; then dirty_tail == key_head and the data is on the backing file",
    async () => {
      const drain = run([BIN, "drain", "--control", s.control, "--timeout", "20"], 60_000);
      // Let drain see the paused writeback for a while, then let writeback go.
      await Bun.sleep(1_200);
      await controlRequest(s.control, { op: "writeback_pause", paused: false });
      const d = await drain;
      expect(d.stderr).toBe("");
      expect(d.code).toBe(0);
      expect(d.stdout).toMatch(/^drain: 4\.0 MiB left, .*\/s, dirty_tail \d+:\d+$/m);
      expect(d.stdout).toMatch(/^drained: dirty_tail reached \d+:\d+ \(4\.0 MiB written back in [\d.]+ s\)$/m);
      const j = await statusJson("--cache", cache);
      expect(j.dirty_tail).toBe(j.key_head);
      expect(j.dirty_bytes).toBe(0);
      expect(j.writeback_bytes).toBe(4 * MiB);
      const on_backing = await Bun.file(backing).slice(0, 4 * MiB).bytes();
      expect(on_backing.every((b) => b === 0x5a)).toBe(true);
    },
    30_000,
  );

  test.if(HAVE_QEMU_IO)(
    "an overwrite within one flush epoch is never written back; the bytes left out show in status, the backing file gets the last version",
    async () => {
      await controlRequest(s.control, { op: "writeback_pause", paused: true });
      // 130 blocks written twice with no flush between (qemu-io in writeback mode flushes once,
      // when it closes; in its default writethrough mode every write is FUA, a boundary): the
      // first round's kset fills and closes, so the second round overwrites keys on media.
      const blocks = Array.from({ length: 130 }, (_, i) => 8 * MiB + i * 4 * KiB);
      const cmds = [...blocks.map((o) => `write -P 0x11 ${o} 4k`), ...blocks.map((o) => `write -P 0x22 ${o} 4k`)];
      const io = await run(["qemu-io", "-f", "raw", "-t", "writeback", ...cmds.flatMap((c) => ["-c", c]), s.uri], 60_000);
      expect(io.code).toBe(0);
      const before = await statusJson("--cache", cache);
      await controlRequest(s.control, { op: "writeback_pause", paused: false });
      const d = await pcache("drain", "--cache", cache, "--timeout", "20");
      expect(d.code).toBe(0);
      const j = await statusJson("--cache", cache);
      expect(j.writeback_skipped_bytes - before.writeback_skipped_bytes).toBe(130 * 4 * KiB);
      expect(j.writeback_bytes - before.writeback_bytes).toBe(130 * 4 * KiB);
      const m = parsePrometheus((await pcache("status", "--cache", cache, "--format", "prometheus")).stdout);
      expect(m.get("pcache_writeback_skipped_bytes_total")).toBe(j.writeback_skipped_bytes);
      const text = await pcache("status", "--cache", cache);
      expect(text.stdout).toMatch(/^overwritten {7}520\.0 KiB of dirty data replaced within its flush epoch, never written back$/m);
      const on_backing = await Bun.file(backing).slice(8 * MiB, 8 * MiB + 130 * 4 * KiB).bytes();
      expect(on_backing.every((b) => b === 0x22)).toBe(true);
    },
    30_000,
  );

  test("gc-percent 50 shows in status at once; 91, -1 and abc are refused with one line", async () => {
    const r = await pcache("gc-percent", "50", "--cache", cache);
    expect(r.code).toBe(0);
    expect(r.stdout).toBe("gc_percent 50 (was 70), persisted\n");
    const j = await statusJson("--cache", cache);
    expect(j.gc_percent).toBe(50);
    expect(j.dm_status.split(" ")[4]).toBe("50");
    expect((j.cache_info_flags >> 6) & 0x7f).toBe(50);
    expectRefusal(await pcache("gc-percent", "91", "--cache", cache), /gc-percent: 91 is out of range \(allowed: 0\.\.90\)/);
    expectRefusal(await pcache("gc-percent", "-1", "--cache", cache), /gc-percent: -1 is out of range/);
    expectRefusal(await pcache("gc-percent", "abc", "--cache", cache), /gc-percent: "abc" is not a whole number/);
    // The server checks too: a raw request out of range changes nothing.
    await expect(controlRequest(s.control, { op: "gc_percent", value: 95 })).rejects.toThrow(/from 0 to 90/);
    expect((await statusJson("--cache", cache)).gc_percent).toBe(50);
  }, 30_000);

  test("a wrong control path, a non-socket, a missing cache: one line and exit 1", async () => {
    const nope = join(dir, "nope.sock");
    expectRefusal(await pcache("status", "--control", nope), new RegExp(`no server is listening on ${nope} \\(is pcache serve running for this cache\\?\\)`));
    const plain = join(dir, "plain-file");
    writeFileSync(plain, "x");
    expectRefusal(await pcache("drain", "--control", plain), /no server is listening on/);
    expectRefusal(await pcache("gc-percent", "10", "--cache", join(dir, "no-such-cache.img")), /does not exist/);
    expectRefusal(await pcache("status"), /--cache DEV .* or --control PATH .*the data folder holds no cache/);
    expectRefusal(await pcache("status", "--cache", cache, "--format", "xml"), /--format must be text, json or prometheus/);
  }, 30_000);

  test("malformed control requests get a one-line error each and the server keeps serving", async () => {
    const cases: Array<[string, RegExp]> = [
      ["hello\n", /^the request is not JSON$/],
      ['{"op":"format"}\n', /^unknown op "format"$/],
      ['{"op":"gc_percent","value":"50"}\n', /^gc_percent must be a whole number from 0 to 90/],
      ['{"op":"drain_progress"}\n', /^drain_progress needs a target/],
      ["a".repeat(5000), /^request longer than 4096 bytes$/],
    ];
    for (const [request, error] of cases) {
      const answer = JSON.parse(await rawExchange(s.control, request));
      expect(answer.ok).toBe(false);
      expect(answer.error).toMatch(error);
    }
    expect((await statusJson("--cache", cache)).gc_percent).toBe(50);
  }, 30_000);

  test("info on the device in use: read-only, says so, includes the server's live values", async () => {
    const r = await pcache("info", "--cache", cache, "--json");
    expect(r.code).toBe(0);
    const j = JSON.parse(r.stdout);
    expect(j.in_use).toBe(true);
    expect(j.note).toMatch(/in use by a running server: positions may be moving/);
    expect(j.live.gc_percent).toBe(50);
    expect(j.live.pid).toBe(s.proc.pid);
    expect(j.cache_info.gc_percent).toBe(50);
    const text = await pcache("info", "--cache", cache);
    expect(text.stdout).toMatch(/^in use {12}in use by a running server: positions may be moving/m);
    expect(text.stdout).toMatch(new RegExp(`^live \\(pid ${s.proc.pid}\\) +key_head \\d+:\\d+`, "m"));
  }, 30_000);

  test("a second server on a control path in use is refused", async () => {
    const cache2 = join(dir, "cache2.img");
    const backing2 = join(dir, "backing2.img");
    await formatCache(cache2);
    await sparseFile(backing2, 16 * MiB);
    const r = await run([BIN, "serve", "--cache", cache2, "--backing", backing2, "--nbd", `unix:${join(dir, "nbd2.sock")}`, "--workers", "1", "--control", s.control]);
    expect(r.code).toBe(1);
    expect(r.stderr).toContain(`control socket ${s.control} is in use by another server; stop that server or pass --control PATH`);
    expect(r.stdout).toBe("");
  }, 30_000);

  test("a stopped server: socket removed, status says no server; gc_percent 50 survives the restart", async () => {
    const control = s.control;
    expect(await s.stop()).toBe(0);
    expect(s.stderr()).toContain("request workers stopped");
    expect(existsSync(control)).toBe(false);
    expectRefusal(await pcache("status", "--cache", cache), new RegExp(`no server is listening on ${control} \\(is pcache serve running`));
    const idle = JSON.parse((await pcache("info", "--cache", cache, "--json")).stdout);
    expect(idle.in_use).toBe(false);
    expect(idle.live).toBe(null);
    const explicit = join(dir, "ctl", "explicit.sock");
    mkdirSync(join(dir, "ctl"));
    s = await serve(cache, backing, sock, ["--control", explicit]);
    expect(s.control).toBe(explicit);
    expect(statSync(explicit).mode & 0o777).toBe(0o600);
    expect((await statusJson("--control", explicit)).gc_percent).toBe(50);
    if (process.getuid?.() === 0 && have("setpriv")) {
      // Open the file permissions so only the server's SO_PEERCRED check stands in the way.
      chmodSync(dir, 0o711);
      chmodSync(join(dir, "ctl"), 0o711);
      chmodSync(explicit, 0o666);
      const other = await run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", BIN, "status", "--control", explicit]);
      expectRefusal(other, /permission denied: this server belongs to uid 0/);
    }
    expect(await s.stop()).toBe(0);
  }, 60_000);
});

describe("writeback deferral with a busy client (fio)", () => {
  const cache = join(dir, "defer-cache.img");
  const backing = join(dir, "defer-backing.img");
  const sock = join(dir, "defer-nbd.sock");
  const can = have("fio") && have("nbdcopy");
  if (!can) console.warn("\n!!!!! SKIPPING writeback deferral tests: fio or nbdcopy is not installed !!!!!\n");
  let s: Server;

  beforeAll(async () => {
    if (!can) return;
    await formatCache(cache);
    await sparseFile(backing, 64 * MiB);
    s = await serve(cache, backing, sock);
  });

  afterAll(async () => {
    if (can) expect(await s.stop()).toBe(0);
  });

  /**
   * fio's 4 KiB random writes over the first 8 MiB at QD4 (requests pipelined, what deferral
   * watches) for runtime_s, a flush every 64 writes and a 2 ms pause every 16: busy all the time,
   * yet far from filling the cache up to gc_percent (where writeback would run regardless).
   */
  function busyClient(runtime_s: number): Subprocess {
    const argv = ["fio", "--name=busy", "--ioengine=nbd", `--uri=nbd+unix:///?socket=${sock}`, "--rw=randwrite", "--bs=4k", "--iodepth=4"];
    argv.push("--size=8m", "--time_based", `--runtime=${runtime_s}`, "--fsync=64", "--thinktime=2000", "--thinktime_blocks=16", "--output-format=terse");
    const p = Bun.spawn(argv, { stdout: "pipe", stderr: "pipe", stdin: "ignore", env: ENV });
    children.add(p);
    return p;
  }

  test.if(can)(
    "while fio writes, writeback waits and status says so; once fio stops it all goes back without a drain, and the backing file equals the export",
    async () => {
      const before = await statusJson("--control", s.control);
      const fio = busyClient(4);
      const busy: Array<Record<string, any>> = [];
      let busy_text = "";
      while (fio.exitCode === null) {
        await Bun.sleep(250);
        if (fio.exitCode === null) busy.push(await statusJson("--control", s.control));
        if (busy.length === 6 && busy_text === "") busy_text = (await pcache("status", "--control", s.control)).stdout;
      }
      expect(await fio.exited).toBe(0);
      const last_busy = busy.at(-1)!;
      // ksets closed (dozens a second from the flushes alone) and almost none written back.
      expect(last_busy.ksets_closed - before.ksets_closed).toBeGreaterThan(50);
      expect(last_busy.writeback_ksets - before.writeback_ksets).toBeLessThan((last_busy.ksets_closed - before.ksets_closed) / 10);
      expect(busy.filter((j) => j.writeback_deferred).length).toBeGreaterThan(busy.length / 2);
      expect(busy_text).toMatch(/^writeback {9}.*; ok, deferred while clients keep requests in flight \(up to 30 s, or until GC needs the room\)$/m);
      // Idle now: writeback catches up by itself.
      let j = await statusJson("--control", s.control);
      for (let i = 0; i < 100 && (j.dirty_bytes !== 0 || j.writeback_deferred); i++) {
        await Bun.sleep(100);
        j = await statusJson("--control", s.control);
      }
      expect(j.dirty_bytes).toBe(0);
      expect(j.writeback_deferred).toBe(false);
      expect(j.writeback_ksets).toBe(j.ksets_closed);
      const copy = join(dir, "defer-export.img");
      expect((await run(["nbdcopy", `nbd+unix:///?socket=${sock}`, copy])).code).toBe(0);
      expect(Bun.hash(await Bun.file(backing).bytes())).toBe(Bun.hash(await Bun.file(copy).bytes()));
      rmSync(copy);
    },
    60_000,
  );

  test.if(can)(
    "drain writes back while fio keeps writing",
    async () => {
      const fio = busyClient(6);
      await Bun.sleep(1_000);
      const d = await pcache("drain", "--control", s.control, "--timeout", "20");
      expect(d.code).toBe(0);
      expect(d.stdout).toMatch(/drained: dirty_tail reached/);
      expect(fio.exitCode).toBe(null); // the client was still busy when the drain finished
      expect(await fio.exited).toBe(0);
    },
    60_000,
  );
});

/** Whether this process may mount a tmpfs (root with CAP_SYS_ADMIN): tried once at collection. */
function canMountTmpfs(at: string): boolean {
  if (process.getuid?.() !== 0) return false;
  mkdirSync(at, { recursive: true });
  if (Bun.spawnSync(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", at]).exitCode !== 0) return false;
  Bun.spawnSync(["umount", at]);
  return true;
}

describe("drain while writeback fails", () => {
  // A backing file on a 2 MiB tmpfs: writing back 4 MiB fails with ENOSPC.
  const mnt = join(dir, "small");
  const mountable = canMountTmpfs(mnt);
  if (!mountable) console.warn("\n!!!!! SKIPPING the failing-writeback drain test: cannot mount a small tmpfs (needs root) !!!!!\n");

  beforeAll(() => {
    if (mountable) expect(Bun.spawnSync(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", mnt]).exitCode).toBe(0);
  });

  afterAll(() => {
    if (mountable) Bun.spawnSync(["umount", "-l", mnt]);
  });

  test.if(mountable && HAVE_QEMU_IO)(
    "drain exits non-zero naming the backing error; status counts backing write errors; the server logs the state once",
    async () => {
      const cache = join(dir, "fail-cache.img");
      const backing = join(mnt, "backing.img");
      await formatCache(cache);
      await sparseFile(backing, 32 * MiB);
      const s = await serve(cache, backing, join(dir, "fail.sock"), ["--control", join(dir, "fail-ctl.sock")]);
      expect((await qemuIo(s.uri, "write -P 0x33 0 4M", "flush")).code).toBe(0);
      const d = await pcache("drain", "--control", s.control, "--timeout", "3");
      expectRefusal(d, /with 4\.0 MiB left to write back \(writeback is failing: backing write errors, ENOSPC \(errno 28\)\)/);
      const j = await statusJson("--control", s.control);
      expect(j.writeback_error_errno).toBe(28);
      expect(j.errors.backing_write).toBeGreaterThanOrEqual(1);
      expect(j.dirty_bytes).toBe(4 * MiB);
      expect(j.dirty_tail).not.toBe(j.key_head);
      expect(await s.stop()).toBe(0);
      expect(s.stderr().match(/backing device errors began/g)?.length).toBe(1);
    },
    30_000,
  );
});

describe("the data folder", () => {
  test("status, gc-percent and drain with no --cache or --control find the server of `serve` with no devices", async () => {
    const sock = join(dir, "data-folder.sock");
    const proc = Bun.spawn([BIN, "serve", "--nbd", `unix:${sock}`, "--workers", "1"], { stdout: "pipe", stderr: "pipe", stdin: "ignore", env: ENV });
    children.add(proc);
    let out = "";
    void drainStream(proc.stdout, (chunk) => (out += chunk));
    const deadline = Date.now() + 20_000;
    while (!/^control: \S+$/m.test(out) && proc.exitCode === null && Date.now() < deadline) await Bun.sleep(20);
    const cache = join(DATA_HOME, "pcache", "cache.img");
    expect(out).toContain(`control: ${defaultControlPath(cache)}`);
    const st = await pcache("status", "--json");
    expect(st.code).toBe(0);
    expect(JSON.parse(st.stdout).gc_percent).toBe(70);
    expect((await pcache("gc-percent", "40")).code).toBe(0);
    expect(JSON.parse((await pcache("status", "--json")).stdout).gc_percent).toBe(40);
    expect((await pcache("drain", "--timeout", "30")).code).toBe(0);
    proc.kill("SIGTERM");
    expect(await waitExit(proc, 30_000)).toBe(0);
  }, 60_000);
});
