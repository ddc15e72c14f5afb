/**
 * Real-process crash soak. Each round starts `dist/pcache serve` on a unix socket, checks every
 * block of the volume against the durability contract (soak_model.ts), drives a workload and
 * kills the server with SIGKILL at a random moment:
 *   burst     - in the middle of random writes (mixed sizes, some FUA, periodic FLUSH);
 *   writeback - after a flushed burst, once `pcache info` shows dirty_tail moving;
 *   gc        - after a burst, once key_tail moves (GC reclaiming);
 *   small     - tens of thousands of 4 KiB writes with frequent flushes, killed part way: each
 *               is a key of its own, so over a long soak the kset log rolls into new segments;
 *   fio       - after a complete `fio --verify=crc32c --end_fsync=1` run over a region of its own,
 *               which `fio --verify_only` checks after the restart. Killing fio itself would not be
 *               sound: fio's verify state cannot tell lost unflushed writes from lost flushed ones.
 * After the last round the server is restarted, checked once more and stopped with SIGTERM.
 * A failure names the seed and the round. Nothing here asserts on timing.
 */
import { existsSync, mkdirSync, mkdtempSync, rmSync, truncateSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { makeRng } from "../../core/persist/sim.ts";
import { NbdClient, type NbdTarget } from "./nbd_client.ts";
import { BLOCK_BYTES, DurabilityModel } from "./soak_model.ts";
import { PcacheProcess, runToText, type CacheInfo } from "./server_process.ts";

const MiB = 1024 * 1024;
export const SOAK_BACKING_BYTES = 256 * MiB;
/** The last 16 MiB belong to fio rounds; the model covers the rest. */
const FIO_REGION_BYTES = 16 * MiB;
const FIO_REGION_OFF = SOAK_BACKING_BYTES - FIO_REGION_BYTES;
const MODEL_BLOCKS = FIO_REGION_OFF / BLOCK_BYTES;
const WRITE_BLOCKS_MAX = 256;
const VERIFY_CHUNK_BYTES = MiB;
const VERIFY_QD = 8;
/** Reported per check, at most; the first one is what matters. */
const BAD_BLOCKS_REPORTED_MAX = 5;
const KILL_POLL_MS_MAX = 4000;
const ROUNDS_MAX = 100_000;

export type RoundKind = "burst" | "writeback" | "gc" | "fio" | "small";
/** The first rounds cover every kind whatever the seed; later ones are drawn at random. */
const FIRST_ROUNDS: RoundKind[] = ["burst", "writeback", "gc", "fio", "burst"];

export interface KillSoakOptions {
  rounds: number;
  seed: number;
  /** Holds cache.img, backing.img and the socket (default: a fresh folder on /dev/shm, removed after). */
  workdir?: string;
  /** GC threshold the cache is formatted with (default: drawn from 10, 30, 70 by the seed). */
  gc_percent?: number;
  /** Format with --data-crc (default: drawn by the seed). */
  data_crc?: boolean;
  /** The pcache binary (default dist/pcache). */
  binary?: string;
  /** Progress lines. */
  log?: (line: string) => void;
}

export interface KillSoakResult {
  kills: number;
  failures: string[];
  rounds: number;
  written_bytes: number;
  /** Rounds in which key_tail moved (GC reclaimed) between the restart and the kill. */
  gc_rounds: number;
  /** Rounds in which dirty_tail moved (writeback ran) between the restart and the kill. */
  writeback_rounds: number;
  /** Kills after which dirty_tail had not reached key_head (writeback pending or running). */
  kills_mid_writeback: number;
  /** Kills made right after `pcache info` showed key_tail moving (GC reclaiming). */
  kills_while_gc: number;
  fio_rounds: number;
  /** Blocks that read back as a legal mix of two writes (rewritten afterwards). */
  torn_blocks: number;
}

interface AckedWrite {
  id: number;
  first: number;
  n: number;
}

interface BurstPlan {
  bytes: number;
  /** Kill once this many bytes were issued (null: finish the burst). */
  kill_at_bytes: number | null;
  qd: number;
  /** Every write is one block (small rounds). */
  single_blocks: boolean;
  fua_ratio: number;
  flush_every_writes: number;
  final_flush: boolean;
}

export async function runKillSoak(o: KillSoakOptions): Promise<KillSoakResult> {
  if (!Number.isInteger(o.rounds) || o.rounds < 1 || o.rounds > ROUNDS_MAX) throw new Error(`rounds must be an integer in 1..${ROUNDS_MAX}`);
  if (!Number.isSafeInteger(o.seed)) throw new Error("seed must be an integer");
  const own_dir = o.workdir === undefined;
  const dir = o.workdir ?? mkdtempSync(join(existsSync("/dev/shm") ? "/dev/shm" : tmpdir(), "pcache-soak-"));
  mkdirSync(dir, { recursive: true });
  const soak = new Soak(o, dir);
  try {
    await soak.run();
  } catch (e) {
    soak.fail(`unexpected error: ${e instanceof Error ? e.message : String(e)}`);
  } finally {
    await soak.server.stopHard();
    if (own_dir) rmSync(dir, { recursive: true, force: true });
  }
  return soak.result;
}

class Soak {
  readonly result: KillSoakResult = {
    kills: 0,
    failures: [],
    rounds: 0,
    written_bytes: 0,
    gc_rounds: 0,
    writeback_rounds: 0,
    kills_mid_writeback: 0,
    kills_while_gc: 0,
    fio_rounds: 0,
    torn_blocks: 0,
  };
  readonly server: PcacheProcess;
  private readonly rng: () => number;
  private readonly model: DurabilityModel;
  private readonly busy = new Uint8Array(MODEL_BLOCKS);
  private readonly gc_percent: number;
  private readonly data_crc: boolean;
  private next_id = 1;
  private round = -1;
  /** Set by a watcher to make the running burst stop and kill. */
  private kill_requested = false;
  private burst_issued_bytes = 0;
  /** fio job parameters to verify after the next restart. */
  private fio_verify: string[] | null = null;
  private readonly log: (line: string) => void;

  constructor(
    private readonly o: KillSoakOptions,
    private readonly dir: string,
  ) {
    this.rng = makeRng(o.seed);
    this.model = new DurabilityModel(MODEL_BLOCKS, o.seed >>> 0);
    this.gc_percent = o.gc_percent ?? [10, 30, 70][Math.floor(this.rng() * 3)]!;
    this.data_crc = o.data_crc ?? this.rng() < 0.5;
    this.log = o.log ?? (() => {});
    this.server = new PcacheProcess({
      binary: o.binary ?? join(import.meta.dir, "..", "..", "dist", "pcache"),
      cache: join(dir, "cache.img"),
      backing: join(dir, "backing.img"),
      socket: join(dir, "nbd.sock"),
      data_crc: this.data_crc,
    });
  }

  fail(msg: string): void {
    const where = this.round < 0 ? "setup" : this.round >= this.o.rounds ? "final check" : `round ${this.round}`;
    this.result.failures.push(`kill soak seed ${this.o.seed}, ${where}: ${msg}`);
  }

  private rand(lo: number, hi: number): number {
    return lo + Math.floor(this.rng() * (hi - lo + 1));
  }

  async run(): Promise<void> {
    const s = this.server;
    rmSync(s.o.cache, { force: true });
    writeFileSync(s.o.backing, new Uint8Array(0));
    truncateSync(s.o.backing, SOAK_BACKING_BYTES);
    const fmt = await s.format(this.gc_percent);
    if (fmt !== null) return this.fail(fmt);
    this.log(`kill soak seed ${this.o.seed}: ${this.o.rounds} rounds, gc_percent ${this.gc_percent}, data_crc ${this.data_crc}`);
    let before = await s.info();
    for (this.round = 0; this.round < this.o.rounds; this.round++) {
      if (!(await this.restartAndCheck())) return;
      const kind = this.round < FIRST_ROUNDS.length ? FIRST_ROUNDS[this.round]! : this.drawKind();
      const written0 = this.result.written_bytes;
      const how = await this.runRound(kind);
      if (how === null) return;
      this.result.kills++;
      this.result.rounds++;
      const after = await s.info();
      if (after === null) return this.fail(`pcache info failed after the kill: ${s.lastError()}`);
      if (before && after.key_tail !== before.key_tail) this.result.gc_rounds++;
      if (before && after.dirty_tail !== before.dirty_tail) this.result.writeback_rounds++;
      if (after.dirty_tail !== after.key_head) this.result.kills_mid_writeback++;
      this.log(
        `round ${this.round}: ${kind}, wrote ${((this.result.written_bytes - written0) / MiB).toFixed(1)} MiB, killed ${how}; ` +
          `key_tail ${before?.key_tail} -> ${after.key_tail}, dirty_tail ${before?.dirty_tail} -> ${after.dirty_tail}, key_head ${after.key_head}, ${after.segments_in_use} segments in use`,
      );
      before = after;
    }
    if (!(await this.restartAndCheck())) return;
    const code = await s.stopGracefully();
    if (code !== 0) this.fail(`SIGTERM: the server exited with ${code}: ${s.stderrTail()}`);
  }

  private drawKind(): RoundKind {
    const x = this.rng();
    if (x < 0.35) return "burst";
    if (x < 0.55) return "writeback";
    if (x < 0.75) return "gc";
    if (x < 0.9) return "small";
    return "fio";
  }

  /** Starts the server and checks the whole volume; false (with a failure) when the soak must stop. */
  private async restartAndCheck(): Promise<boolean> {
    const err = await this.server.start();
    if (err !== null) {
      this.fail(err);
      return false;
    }
    const client = await this.connect();
    if (client === null) return false;
    try {
      if (!(await this.checkVolume(client))) return false;
    } finally {
      await client.disconnect();
    }
    if (this.fio_verify !== null) {
      const r = await runToText(["fio", ...this.fio_verify, "--verify_only"], 120_000, false, this.dir);
      this.fio_verify = null;
      if (r.code !== 0) {
        this.fail(`fio --verify_only failed (exit ${r.code}): ${lastLines(r.text, 4)}`);
        return false;
      }
    }
    return true;
  }

  private async connect(): Promise<NbdClient | null> {
    const target: NbdTarget = { unix: this.server.o.socket };
    try {
      return await NbdClient.connect(target, { export_name: "pcache", timeout_ms: 60_000 });
    } catch (e) {
      this.fail(`cannot connect: ${e instanceof Error ? e.message : String(e)}`);
      return null;
    }
  }

  /** Reads every modelled block, checks it, settles the model; torn blocks are rewritten. */
  private async checkVolume(client: NbdClient): Promise<boolean> {
    const torn: number[] = [];
    const bad: string[] = [];
    let bad_blocks = 0;
    const chunk_blocks = VERIFY_CHUNK_BYTES / BLOCK_BYTES;
    const check = (first: number, buf: Uint8Array) => {
      for (let i = 0; i < chunk_blocks; i++) {
        const b = first + i;
        const v = this.model.check(b, buf.subarray(i * BLOCK_BYTES, (i + 1) * BLOCK_BYTES));
        if (v.kind === "ok") this.model.settle(b, v.id);
        else if (v.kind === "torn") torn.push(b);
        else if (bad_blocks++ < BAD_BLOCKS_REPORTED_MAX) bad.push(`block ${b} (offset ${b * BLOCK_BYTES}): ${v.why}`);
      }
    };
    const inflight = new Set<Promise<void>>();
    let read_error: string | null = null;
    for (let first = 0; first < MODEL_BLOCKS && read_error === null; first += chunk_blocks) {
      while (inflight.size >= VERIFY_QD) await Promise.race(inflight);
      const p: Promise<void> = client.read(first * BLOCK_BYTES, VERIFY_CHUNK_BYTES).then(
        (buf) => check(first, buf),
        (e: unknown) => void (read_error ??= e instanceof Error ? e.message : String(e)),
      );
      inflight.add(p);
      void p.then(() => inflight.delete(p));
    }
    await Promise.all(inflight);
    if (read_error !== null) {
      this.fail(`reading the volume back failed: ${read_error}`);
      return false;
    }
    if (bad_blocks > 0) {
      this.fail(`${bad_blocks} block(s) break the durability contract; first ${bad.length}: ${bad.join("; ")}`);
      return false;
    }
    this.result.torn_blocks += torn.length;
    for (const b of torn) {
      const id = this.next_id++;
      try {
        await client.write(b * BLOCK_BYTES, this.model.data(id, b, 1), true);
      } catch (e) {
        this.fail(`rewriting torn block ${b} failed: ${e instanceof Error ? e.message : String(e)}`);
        return false;
      }
      this.model.settle(b, id);
    }
    return true;
  }

  /** One round's workload and kill; returns how the kill happened, or null after a failure. */
  private async runRound(kind: RoundKind): Promise<string | null> {
    if (kind === "fio") return this.fioRound();
    const client = await this.connect();
    if (client === null) return null;
    const small = kind === "small";
    const bytes = small ? this.rand(20_000, 80_000) * BLOCK_BYTES : this.rand(8, 32) * 4 * MiB;
    const plan: BurstPlan = {
      bytes,
      kill_at_bytes: kind === "burst" || small ? Math.floor(bytes * (small ? 0.3 + 0.7 * this.rng() : 0.05 + 0.95 * this.rng())) : null,
      qd: this.rand(1, small ? 32 : 16),
      single_blocks: small,
      fua_ratio: [0, 0.05, 0.3][this.rand(0, 2)]!,
      flush_every_writes: small ? this.rand(1, 8) : this.rand(2, 64),
      final_flush: kind === "writeback" || this.rng() < 0.5,
    };
    // GC rounds watch key_tail while writing and kill as soon as it moves (GC reclaiming).
    const watch = kind === "gc" ? this.watchKeyTail(Math.floor(bytes * this.rng() * 0.5)) : null;
    const outcome = await this.burst(client, plan);
    if (watch) watch.stop();
    if (outcome === "failed") return null;
    if (outcome === "killed") return kind === "gc" ? "while GC was seen moving key_tail (mid-burst)" : "mid-burst";
    if (small) return (await this.kill()) ? "after the burst" : null;
    if (this.rng() < 0.5) await client.disconnect();
    let how: string | null;
    if (kind === "writeback") {
      // Writeback trails the writes by a moment: kill inside that moment.
      await Bun.sleep(this.rand(0, 300));
      how = (await this.kill()) ? "after the final flush" : null;
    } else {
      how = await this.killWhenKeyTailMoves();
    }
    client.close();
    return how;
  }

  /**
   * Polls `pcache info` during a burst; once `min_bytes` were written and key_tail moved between
   * two polls, asks the burst to stop and kill. Runs until stop() (each poll is one process run).
   */
  private watchKeyTail(min_bytes: number): { stop(): void } {
    let stopped = false;
    void (async () => {
      let prev = await this.server.info();
      while (!stopped && !this.kill_requested) {
        const cur = await this.server.info();
        if (prev && cur && cur.key_tail !== prev.key_tail && this.burst_issued_bytes >= min_bytes) this.kill_requested = true;
        prev = cur ?? prev;
      }
    })();
    return { stop: () => void (stopped = true) };
  }

  /** After a burst: kill as soon as key_tail moves between two polls, or at a random deadline. */
  private async killWhenKeyTailMoves(): Promise<string | null> {
    const deadline = Date.now() + this.rand(500, KILL_POLL_MS_MAX);
    let prev = await this.server.info();
    // Bounded by the deadline; each poll is one process run.
    while (Date.now() < deadline) {
      const cur = await this.server.info();
      if (prev !== null && cur !== null && cur.key_tail !== prev.key_tail) {
        if (!(await this.kill())) return null;
        this.result.kills_while_gc++;
        return "while GC was seen moving key_tail";
      }
      prev = cur ?? prev;
    }
    if (!(await this.kill())) return null;
    return "after polling (GC not seen moving)";
  }

  private async kill(): Promise<boolean> {
    const err = await this.server.kill();
    if (err !== null) this.fail(err);
    return err === null;
  }

  /** Random writes and flushes, until the plan's bytes, its kill point, or a kill request. */
  private async burst(client: NbdClient, plan: BurstPlan): Promise<"done" | "killed" | "failed"> {
    const inflight = new Set<Promise<void>>();
    const track = (p: Promise<void>) => {
      inflight.add(p);
      void p.then(() => inflight.delete(p));
    };
    let acked: AckedWrite[] = [];
    let issued_bytes = 0;
    this.burst_issued_bytes = 0;
    this.kill_requested = false;
    let writes_since_flush = 0;
    let error: string | null = null;
    let killing = false;
    const failed = (what: string) => (e: unknown) => {
      if (!killing) error ??= `${what}: ${e instanceof Error ? e.message : String(e)}`;
    };
    // Bounded: every pass issues a request, waits for one, or stops.
    while (issued_bytes < plan.bytes && error === null) {
      if (this.kill_requested || (plan.kill_at_bytes !== null && issued_bytes >= plan.kill_at_bytes)) {
        killing = true;
        break;
      }
      while (inflight.size >= plan.qd) await Promise.race(inflight);
      if (writes_since_flush >= plan.flush_every_writes) {
        writes_since_flush = 0;
        // Covers exactly the writes acknowledged before the FLUSH is sent.
        const covered = acked;
        acked = [];
        track(client.flush().then(() => this.promoteAll(covered), failed("FLUSH")));
        continue;
      }
      const n = plan.single_blocks ? 1 : this.writeBlocks();
      const first = this.freeRange(n);
      if (first === null) {
        if (inflight.size > 0) await Promise.race(inflight);
        continue;
      }
      const id = this.next_id++;
      const fua = this.rng() < plan.fua_ratio;
      this.model.issue(id, first, n);
      this.busy.fill(1, first, first + n);
      const p = client.write(first * BLOCK_BYTES, this.model.data(id, first, n), fua).then(
        () => {
          if (fua) this.model.promote(id, first, n);
          else acked.push({ id, first, n });
        },
        failed(`WRITE of ${n} blocks at block ${first}`),
      );
      track(p.finally(() => this.busy.fill(0, first, first + n)));
      issued_bytes += n * BLOCK_BYTES;
      this.burst_issued_bytes = issued_bytes;
      writes_since_flush++;
    }
    this.result.written_bytes += issued_bytes;
    if (killing) {
      const ok = await this.kill();
      if (ok && this.kill_requested) this.result.kills_while_gc++;
      await Promise.all(inflight);
      this.busy.fill(0);
      return ok ? "killed" : "failed";
    }
    await Promise.all(inflight);
    if (error === null && plan.final_flush) {
      const covered = acked;
      await client.flush().then(() => this.promoteAll(covered), failed("final FLUSH"));
    }
    if (error !== null) this.fail(`${error} (before any kill)`);
    return error === null ? "done" : "failed";
  }

  private promoteAll(ws: AckedWrite[]): void {
    for (const w of ws) this.model.promote(w.id, w.first, w.n);
  }

  /** Mostly small writes, some up to 1 MiB. */
  private writeBlocks(): number {
    const x = this.rng();
    if (x < 0.7) return this.rand(1, 16);
    if (x < 0.95) return this.rand(17, 64);
    return this.rand(65, WRITE_BLOCKS_MAX);
  }

  /** A random range not overlapping any write in flight, or null after a few tries. */
  private freeRange(n: number): number | null {
    for (let tries = 0; tries < 8; tries++) {
      const first = this.rand(0, MODEL_BLOCKS - n);
      if (this.busy.subarray(first, first + n).every((x) => x === 0)) return first;
    }
    return null;
  }

  private async fioRound(): Promise<string | null> {
    if (!haveCommand("fio")) {
      this.log("fio is not installed: a writeback round instead");
      return this.runRound("writeback");
    }
    const client = await this.connect();
    if (client === null) return null;
    // Zeroes first (flushed), so a lost fio write reads as zeroes, which fio reports, and never
    // as an older fio run's block, which fio 3.33 would accept.
    try {
      for (let off = 0; off < FIO_REGION_BYTES; off += 4 * MiB) await client.writeZeroes(FIO_REGION_OFF + off, 4 * MiB);
      await client.flush();
    } catch (e) {
      this.fail(`zeroing the fio region failed: ${e instanceof Error ? e.message : String(e)}`);
      return null;
    }
    await client.disconnect();
    const job = [
      "--name=soak",
      "--ioengine=nbd",
      `--uri=nbd+unix:///pcache?socket=${this.server.o.socket}`,
      "--rw=randwrite",
      `--bs=${["4k", "16k", "64k"][this.rand(0, 2)]}`,
      `--iodepth=${[1, 8, 16][this.rand(0, 2)]}`,
      `--offset=${FIO_REGION_OFF}`,
      `--size=${FIO_REGION_BYTES}`,
      "--verify=crc32c",
      // No verify state file: it would land in the working folder, and verify_only does not need it.
      "--verify_state_save=0",
      `--randseed=${this.rand(1, 1_000_000)}`,
      "--output-format=terse",
    ];
    const r = await runToText(["fio", ...job, "--do_verify=0", "--end_fsync=1"], 120_000, false, this.dir);
    if (r.code !== 0) {
      this.fail(`fio run failed (exit ${r.code}): ${lastLines(r.text, 4)}`);
      return null;
    }
    this.result.fio_rounds++;
    this.result.written_bytes += FIO_REGION_BYTES;
    this.fio_verify = job;
    // fio's final fsync has been answered; writeback of its data trails it by a moment.
    await Bun.sleep(this.rand(0, 300));
    return (await this.kill()) ? "after fio finished" : null;
  }
}

function haveCommand(cmd: string): boolean {
  return Bun.spawnSync(["sh", "-c", `command -v ${cmd}`]).exitCode === 0;
}

function lastLines(text: string, n: number): string {
  return text.trim().split("\n").slice(-n).join(" | ");
}
