/**
 * NBD server fuzzer. Bursts of seeded transcripts (fuzz_gen.ts) are played over several
 * connections at once and every answer is checked (fuzz_conn.ts). Between bursts a canary — a
 * correct client on a connection kept open for the whole run, plus a fresh connection each time —
 * writes and reads back its own region; the reserved region written at the start must read back
 * unchanged at the end; the server must stay alive, and its memory must stay bounded: at every
 * check below a generous peak bound (a server under load holds garbage it has not collected
 * yet), and once the run is over and the server idle, within a tight bound of where it started.
 *
 * Targets: "in-process" (an NbdServer over the engine on a sim cache device and a memory backing
 * device, with writeback and GC running) or a running server's unix socket (`pid` names the
 * process for the liveness and memory checks; without it the socket's owner is looked up).
 * A failure names the seed and the frame number; the first one ends the run.
 */
import { mkdtempSync, readdirSync, readFileSync, readlinkSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { MemoryBacking } from "../../core/device/memory_backing.ts";
import { Engine } from "../../core/engine/engine.ts";
import { EngineExport } from "../../core/engine/nbd_export.ts";
import { formatCache } from "../../core/format/format_cache.ts";
import { Gc } from "../../core/gc/gc.ts";
import { NbdServer } from "../../core/nbd/server.ts";
import { makeRng, SimDomain } from "../../core/persist/sim.ts";
import { Writeback } from "../../core/writeback/writeback.ts";
import { playConnection } from "./fuzz_conn.ts";
import { FuzzGen, type ConnScript } from "./fuzz_gen.ts";
import { NbdClient, type NbdTarget } from "./nbd_client.ts";
import { procMemory } from "./server_process.ts";

const MiB = 1024 * 1024;
const REGION_BYTES = 4 * MiB;
/** Smallest export the geometry (fuzz area, canary region, reserved region) fits in. */
const EXPORT_BYTES_MIN = 64 * MiB;
const IN_PROCESS_CACHE_BYTES = 512 * MiB;
const IN_PROCESS_BACKING_BYTES = 64 * MiB;
const MEMORY_GROWTH_BYTES_MAX = 256 * MiB;
const MEMORY_PEAK_GROWTH_BYTES_MAX = 1024 * MiB;
/** How long an idle server gets to give back its garbage after the run. */
const MEMORY_SETTLE_MS = 30_000;
const CANARY_TIMEOUT_MS = 20_000;
const FRAMES_MAX = 1_000_000_000;

export type FuzzTarget = { socket_path: string; pid?: number } | "in-process";

export interface NbdFuzzOptions {
  seed: number;
  frames: number;
  target: FuzzTarget;
  /** Fuzz connections open at once (default 4). */
  concurrency?: number;
  /** Frames between canary checks (default: a tenth of the run, between 500 and 5000). */
  burst_frames?: number;
  /** Allowed growth of the server's memory once the run is over and it is idle (default 256 MiB). */
  memory_growth_bytes_max?: number;
  /** Allowed growth at any check during the run (default 1 GiB). */
  memory_peak_growth_bytes_max?: number;
  log?: (line: string) => void;
}

export interface NbdFuzzResult {
  frames: number;
  connections: number;
  failures: string[];
  /** Growth of the server's memory after the run, idle (RssAnon of the process, or this process's RSS). */
  memory_growth_bytes: number;
  /** Largest growth seen at a check during the run. */
  memory_peak_growth_bytes: number;
}

interface TargetHandle {
  target: NbdTarget;
  /** Bytes of memory that count for the bound, or null when unknown. */
  memory(): number | null;
  /** Why the server is not healthy, or null. */
  health(): string | null;
  stop(): Promise<void>;
}

export async function runNbdFuzz(o: NbdFuzzOptions): Promise<NbdFuzzResult> {
  if (!Number.isSafeInteger(o.seed)) throw new Error("seed must be an integer");
  if (!Number.isInteger(o.frames) || o.frames < 1 || o.frames > FRAMES_MAX) throw new Error(`frames must be an integer in 1..${FRAMES_MAX}`);
  const result: NbdFuzzResult = { frames: 0, connections: 0, failures: [], memory_growth_bytes: 0, memory_peak_growth_bytes: 0 };
  const handle = o.target === "in-process" ? await startInProcess(o.seed) : attachSocket(o.target);
  try {
    await new FuzzRun(o, handle, result).run();
  } catch (e) {
    result.failures.push(`nbd fuzz seed ${o.seed}, frame ${result.frames}: ${e instanceof Error ? e.message : String(e)}`);
  } finally {
    await handle.stop();
  }
  return result;
}

class FuzzRun {
  private readonly rng: () => number;
  private canary: NbdClient | null = null;
  private size_bytes = 0;
  private canary_off = 0;
  private reserved_off = 0;
  private readonly canary_mirror = new Uint8Array(REGION_BYTES);
  private reserved: Uint8Array = new Uint8Array(0);
  private memory_base: number | null = null;
  private checks = 0;

  constructor(
    private readonly o: NbdFuzzOptions,
    private readonly h: TargetHandle,
    private readonly result: NbdFuzzResult,
  ) {
    this.rng = makeRng(o.seed ^ 0x5eed);
  }

  private fail(msg: string): void {
    this.result.failures.push(`nbd fuzz seed ${this.o.seed}, ${msg}`);
  }

  async run(): Promise<void> {
    if (!(await this.setup())) return;
    const gen = new FuzzGen(this.o.seed, { size_bytes: this.size_bytes, fuzz_end: this.canary_off });
    const burst = this.o.burst_frames ?? Math.max(500, Math.min(5000, Math.floor(this.o.frames / 10)));
    const log = this.o.log ?? (() => {});
    // Bounded: every burst generates at least one frame.
    while (gen.frames_generated < this.o.frames && this.result.failures.length === 0) {
      const scripts: ConnScript[] = [];
      const until = Math.min(this.o.frames, gen.frames_generated + burst);
      while (gen.frames_generated < until) scripts.push(gen.next());
      await this.playAll(scripts);
      if (this.result.failures.length > 0) break;
      await this.check(`after frame ${gen.frames_generated}`);
      log(`nbd fuzz seed ${this.o.seed}: ${this.result.frames} frames, ${this.result.connections} connections, memory peak +${(this.result.memory_peak_growth_bytes / MiB).toFixed(1)} MiB`);
    }
    if (this.result.failures.length === 0) await this.finalCheck();
  }

  private async setup(): Promise<boolean> {
    const c = await this.connectCanary("setup");
    if (c === null) return false;
    this.canary = c;
    this.size_bytes = c.size_bytes;
    if (this.size_bytes < EXPORT_BYTES_MIN) {
      this.fail(`setup: the export has ${this.size_bytes} bytes; the fuzzer needs at least ${EXPORT_BYTES_MIN}`);
      return false;
    }
    this.reserved_off = this.size_bytes - REGION_BYTES;
    this.canary_off = this.reserved_off - REGION_BYTES;
    this.reserved = randomBytes(REGION_BYTES, makeRng(this.o.seed ^ 0x7e5e));
    this.canary_mirror.set(randomBytes(REGION_BYTES, this.rng));
    const ok = await this.canaryStep("setup", async () => {
      await c.write(this.reserved_off, this.reserved);
      await c.write(this.canary_off, this.canary_mirror);
      await c.flush();
    });
    this.memory_base = this.h.memory();
    return ok;
  }

  private async playAll(scripts: ConnScript[]): Promise<void> {
    const n_workers = Math.max(1, Math.min(this.o.concurrency ?? 4, 32));
    let next = 0;
    const worker = async () => {
      // Bounded by the script list.
      while (next < scripts.length && this.result.failures.length === 0) {
        const sc = scripts[next++]!;
        const out = await playConnection(this.h.target, sc, makeRng(this.o.seed ^ Math.imul(sc.index + 1, 0x9e3779b1)));
        this.result.frames += out.frames_sent;
        this.result.connections++;
        if (out.failure !== null) {
          const first = sc.frames[0]?.no ?? 0;
          const last = sc.frames[sc.frames.length - 1]?.no ?? first;
          this.fail(`frame ${first}..${last}, connection ${sc.index} (${sc.kind}): ${out.failure}`);
        }
      }
    };
    await Promise.all(Array.from({ length: n_workers }, worker));
  }

  private async connectCanary(when: string): Promise<NbdClient | null> {
    try {
      return await NbdClient.connect(this.h.target, { timeout_ms: CANARY_TIMEOUT_MS });
    } catch (e) {
      this.fail(`frame ${this.result.frames} (${when}): the canary cannot connect: ${e instanceof Error ? e.message : String(e)}`);
      return null;
    }
  }

  /** Runs canary I/O; any error is a failure (the server must keep answering correct clients). */
  private async canaryStep(when: string, body: () => Promise<void>): Promise<boolean> {
    try {
      await body();
      return true;
    } catch (e) {
      this.fail(`frame ${this.result.frames} (${when}): canary I/O failed: ${e instanceof Error ? e.message : String(e)}`);
      return false;
    }
  }

  /** Between bursts: server healthy, canary write + read back on both connections, memory bound. */
  private async check(when: string): Promise<void> {
    this.checks++;
    const health = this.h.health();
    if (health !== null) return this.fail(`frame ${this.result.frames} (${when}): ${health}`);
    const c = this.canary!;
    const fresh = await this.connectCanary(when);
    if (fresh === null) return;
    const len = 512 * (1 + Math.floor(this.rng() * 128));
    const at = 512 * Math.floor(this.rng() * ((REGION_BYTES - len) / 512 + 1));
    const data = randomBytes(len, this.rng);
    await this.canaryStep(when, async () => {
      await c.write(this.canary_off + at, data, this.rng() < 0.5);
      this.canary_mirror.set(data, at);
      await this.expectCanary(fresh, at, len, "fresh connection");
      await fresh.flush();
      const at2 = 512 * Math.floor(this.rng() * (REGION_BYTES / 512 - 8));
      await this.expectCanary(c, at2, 4096, "long-lived connection");
      if (this.checks % 10 === 0) await this.expectReserved(fresh);
    });
    await fresh.disconnect();
    this.sampleMemory(when);
  }

  private async expectCanary(c: NbdClient, at: number, len: number, which: string): Promise<void> {
    const got = await c.read(this.canary_off + at, len);
    const i = firstDifference(got, this.canary_mirror.subarray(at, at + len));
    if (i >= 0) throw new Error(`canary region byte ${at + i} read back wrong on the ${which}`);
  }

  private async expectReserved(c: NbdClient): Promise<void> {
    const got = await c.read(this.reserved_off, REGION_BYTES);
    const i = firstDifference(got, this.reserved);
    if (i >= 0) throw new Error(`reserved region changed at byte ${this.reserved_off + i} (offset ${i} in the region)`);
  }

  private sampleMemory(when: string): void {
    const m = this.h.memory();
    if (m === null || this.memory_base === null) return;
    const growth = m - this.memory_base;
    this.result.memory_peak_growth_bytes = Math.max(this.result.memory_peak_growth_bytes, growth);
    const bound = this.o.memory_peak_growth_bytes_max ?? MEMORY_PEAK_GROWTH_BYTES_MAX;
    if (growth > bound) this.fail(`frame ${this.result.frames} (${when}): server memory grew by ${(growth / MiB).toFixed(0)} MiB (peak bound ${(bound / MiB).toFixed(0)} MiB)`);
  }

  /** After the run: the idle server must come back within the bound (it may take a few GCs). */
  private async settleMemory(): Promise<void> {
    if (this.memory_base === null || this.h.memory() === null) return;
    const bound = this.o.memory_growth_bytes_max ?? MEMORY_GROWTH_BYTES_MAX;
    const deadline = Date.now() + MEMORY_SETTLE_MS;
    let growth = Infinity;
    // Bounded by the deadline.
    for (;;) {
      growth = Math.min(growth, (this.h.memory() ?? this.memory_base) - this.memory_base);
      if (growth <= bound || Date.now() >= deadline) break;
      await Bun.sleep(500);
    }
    this.result.memory_growth_bytes = growth;
    if (growth > bound) {
      this.fail(`frame ${this.result.frames} (after the run): server memory stayed ${(growth / MiB).toFixed(0)} MiB above its start for ${MEMORY_SETTLE_MS / 1000} s idle (bound ${(bound / MiB).toFixed(0)} MiB)`);
    }
  }

  private async finalCheck(): Promise<void> {
    await this.check("final check");
    if (this.result.failures.length > 0) return;
    const c = await this.connectCanary("final check");
    if (c === null) return;
    await this.canaryStep("final check", async () => {
      await this.expectReserved(c);
      await this.expectCanary(c, 0, REGION_BYTES, "final connection");
    });
    await c.disconnect();
    await this.canary?.disconnect();
    await this.settleMemory();
  }
}

// -------------------------------------------------------------------------------------------
// Targets.

/** An NbdServer over the engine (sim cache device, memory backing) with writeback and GC running. */
async function startInProcess(seed: number): Promise<TargetHandle> {
  const dom = new SimDomain(IN_PROCESS_CACHE_BYTES, { seed, track: false });
  formatCache(dom, { data_crc: false, gc_percent: 70 });
  const backing = new MemoryBacking(IN_PROCESS_BACKING_BYTES);
  // Make every page resident now, so RSS growth measures the server, not the devices filling up.
  touchPages(new Uint8Array(dom.memory));
  touchPages(backing.bytes);
  const engine = Engine.open(dom, backing, { n_ksets: 2 });
  const loops = [new Writeback(engine.ctx, engine.meta).run(), new Gc(engine.ctx, engine.meta).run()];
  const errors: string[] = [];
  const server = new NbdServer({
    export: new EngineExport(engine, false),
    export_name: "fuzz",
    log: (level, msg) => void (level === "error" && errors.length < 10 && errors.push(msg)),
  });
  const dir = mkdtempSync(join(tmpdir(), "pcache-fuzz-"));
  const path = join(dir, "nbd.sock");
  const on_error = (e: unknown) => void (errors.length < 10 && errors.push(`unhandled: ${e instanceof Error ? e.message : String(e)}`));
  process.on("unhandledRejection", on_error);
  process.on("uncaughtException", on_error);
  await server.listen({ kind: "unix", path });
  return {
    target: { unix: path },
    memory: () => {
      // Collect first: what counts is what stays allocated, not garbage not yet collected.
      Bun.gc(true);
      return process.memoryUsage().rss;
    },
    health: () => (errors.length > 0 ? `the server logged an error: ${errors[0]}` : null),
    async stop() {
      await server.stop({ timeout_ms: 5000 });
      await engine.close();
      await Promise.all(loops);
      process.off("unhandledRejection", on_error);
      process.off("uncaughtException", on_error);
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

function attachSocket(t: { socket_path: string; pid?: number }): TargetHandle {
  const pid = t.pid ?? socketOwnerPid(t.socket_path);
  return {
    target: { unix: t.socket_path },
    memory: () => (pid === null ? null : (procMemory(pid)?.anon_bytes ?? null)),
    health: () => (pid === null || processExists(pid) ? null : `server process ${pid} is gone`),
    async stop() {},
  };
}

function processExists(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/** The process holding the listening unix socket at `path` (from /proc), or null. */
export function socketOwnerPid(path: string): number | null {
  let inode: string | null = null;
  try {
    for (const line of readFileSync("/proc/net/unix", "utf8").split("\n")) {
      const f = line.trim().split(/\s+/);
      // Num RefCount Protocol Flags Type St Inode Path; St 01 = listening.
      if (f.length >= 8 && f[7] === path && f[5] === "01") inode = f[6]!;
    }
  } catch {
    return null;
  }
  if (inode === null) return null;
  const want = `socket:[${inode}]`;
  for (const name of readdirSync("/proc")) {
    if (!/^\d+$/.test(name)) continue;
    let fds: string[];
    try {
      fds = readdirSync(`/proc/${name}/fd`);
    } catch {
      continue;
    }
    for (const fd of fds) {
      try {
        if (readlinkSync(`/proc/${name}/fd/${fd}`) === want) return Number(name);
      } catch {
        // The fd closed while we looked.
      }
    }
  }
  return null;
}

/** Writes every page without changing it (an atomic add of 0, which no optimiser drops). */
function touchPages(b: Uint8Array): void {
  const words = new Int32Array(b.buffer, b.byteOffset, Math.floor(b.byteLength / 4));
  for (let i = 0; i < words.length; i += 1024) Atomics.add(words, i, 0);
}

function randomBytes(n: number, rng: () => number): Uint8Array {
  const words = new Uint32Array(n / 4);
  for (let i = 0; i < words.length; i++) words[i] = (rng() * 0x1_0000_0000) >>> 0;
  return new Uint8Array(words.buffer);
}

function firstDifference(a: Uint8Array, b: Uint8Array): number {
  if (a.length !== b.length) return 0;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return i;
  return -1;
}
