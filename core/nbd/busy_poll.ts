/**
 * Busy-poll after a reply, for clients that send their next request at once (queue depth 1).
 *
 * Without it every such request costs the server thread a sleep in epoll and a wake-up by the
 * client's send. In a VM that wake-up is an inter-processor interrupt through the hypervisor,
 * tens of microseconds; it was most of the latency of a cached 4k read at queue depth 1
 * (README, performance). Spinning for up to `budget_us` after the reply lets the next request
 * find the thread awake.
 *
 * Spinning must not take a CPU that other work needs (the writeback thread, the client, the
 * kernel's own threads): it is allowed only while /proc/stat shows at least `spare_cpus_min`
 * CPUs idle, not counting the time this poller itself spent spinning. A client must also have
 * been quick: its last request came within the budget of the reply before it.
 */
import { readFileSync } from "node:fs";
import { spinUntilReadable } from "../../ffi/socket.ts";
import { assert } from "../assert.ts";

/** Largest budget accepted (`serve --busy-poll-us`). */
export const BUSY_POLL_BUDGET_MAX_US = 1000;
/** Default budget: longer than a client's turnaround across vCPUs here (30–50 µs, measured). */
export const BUSY_POLL_BUDGET_DEFAULT_US = 50;
/** How often the idle CPU time is sampled. */
const SAMPLE_MS = 200;
/** /proc/stat counts in USER_HZ ticks, 100 per second on Linux. */
const TICKS_PER_S = 100;
/** Spin only while a whole CPU would be idle without our spinning (half was not enough: measured, it slowed write+flush pairs by a third while writeback was busy). */
const SPARE_CPUS_MIN = 1;

export interface BusyPollOptions {
  /** Longest spin after one reply, µs; 0 turns busy-polling off. */
  budget_us: number;
  spare_cpus_min?: number;
  /** Reads /proc/stat (tests pass their own); null when unreadable. */
  read_proc_stat?: () => string | null;
  /** Clock in ms (performance.now by default). */
  now_ms?: () => number;
  /** Waits up to budget_ms for fd to be readable (tests pass their own). */
  spin?: (fd: number, budget_ms: number) => boolean;
}

export interface BusyPollStats {
  spins: number;
  /** Spins that found the next request within the budget. */
  hits: number;
  spin_ms: number;
}

function readProcStat(): string | null {
  try {
    return readFileSync("/proc/stat", "latin1");
  } catch {
    return null;
  }
}

/** Idle plus iowait ticks of all CPUs, from the first line of /proc/stat; null when malformed. */
export function idleTicksOf(proc_stat: string): number | null {
  const end = proc_stat.indexOf("\n");
  const line = end < 0 ? proc_stat : proc_stat.slice(0, end);
  const f = line.trim().split(/\s+/);
  if (f[0] !== "cpu" || f.length < 6) return null;
  const idle = Number(f[4]);
  const iowait = Number(f[5]);
  if (!Number.isSafeInteger(idle) || !Number.isSafeInteger(iowait) || idle < 0 || iowait < 0) return null;
  return idle + iowait;
}

export class BusyPoll {
  readonly budget_ms: number;
  readonly stats: BusyPollStats = { spins: 0, hits: 0, spin_ms: 0 };
  private readonly spare_cpus_min: number;
  private readonly read_proc_stat: () => string | null;
  private readonly now_ms: () => number;
  private readonly spin_fn: (fd: number, budget_ms: number) => boolean;
  private sample_at_ms = -1;
  private sample_idle_ticks = 0;
  private sample_spin_ms = 0;
  private spare = false;

  constructor(opts: BusyPollOptions) {
    assert(Number.isInteger(opts.budget_us) && opts.budget_us >= 0 && opts.budget_us <= BUSY_POLL_BUDGET_MAX_US, `busy-poll budget ${opts.budget_us} µs out of range`);
    this.budget_ms = opts.budget_us / 1000;
    this.spare_cpus_min = opts.spare_cpus_min ?? SPARE_CPUS_MIN;
    this.read_proc_stat = opts.read_proc_stat ?? readProcStat;
    this.now_ms = opts.now_ms ?? (() => performance.now());
    this.spin_fn = opts.spin ?? spinUntilReadable;
  }

  get enabled(): boolean {
    return this.budget_ms > 0;
  }

  /** The clock the pollers share (so connections measure their client's pace with it). */
  now(): number {
    return this.now_ms();
  }

  /**
   * Spins until `fd` is readable or the budget is spent, if a CPU is spare. True when the
   * next request (or a hang-up) is already there.
   */
  spin(fd: number): boolean {
    if (!this.enabled || !this.cpuIsSpare()) return false;
    const start = this.now_ms();
    const ready = this.spin_fn(fd, this.budget_ms);
    this.stats.spin_ms += this.now_ms() - start;
    this.stats.spins++;
    if (ready) this.stats.hits++;
    return ready;
  }

  /** Re-samples /proc/stat at most every SAMPLE_MS; until the first full window, no spinning. */
  private cpuIsSpare(): boolean {
    const now = this.now_ms();
    if (this.sample_at_ms >= 0 && now - this.sample_at_ms < SAMPLE_MS) return this.spare;
    const text = this.read_proc_stat();
    const idle_ticks = text === null ? null : idleTicksOf(text);
    if (idle_ticks === null) {
      this.sample_at_ms = now;
      this.spare = false;
      return false;
    }
    if (this.sample_at_ms >= 0) {
      const window_s = (now - this.sample_at_ms) / 1000;
      const idle_s = (idle_ticks - this.sample_idle_ticks) / TICKS_PER_S;
      const spun_s = (this.stats.spin_ms - this.sample_spin_ms) / 1000;
      this.spare = window_s > 0 && (idle_s + spun_s) / window_s >= this.spare_cpus_min;
    }
    this.sample_at_ms = now;
    this.sample_idle_ticks = idle_ticks;
    this.sample_spin_ms = this.stats.spin_ms;
    return this.spare;
  }
}

/**
 * One connection's view of its client's pace: whether its last request came within the
 * budget of our last reply. Spinning for a client that thinks longer than the budget would
 * only burn the budget every time.
 */
export class ClientPace {
  private idle_since_ms = -1;
  private quick = false;

  constructor(private readonly poll: BusyPoll) {}

  /** Bytes arrived from the client. */
  onData(): void {
    if (this.idle_since_ms < 0) return;
    this.quick = this.poll.now() - this.idle_since_ms <= this.poll.budget_ms;
    this.idle_since_ms = -1;
  }

  /** Every reply is out and nothing is pending: wait a little for the next request, if worth it. */
  onIdle(fd: number | undefined): void {
    this.idle_since_ms = this.poll.now();
    if (!this.quick || fd === undefined || fd < 0) return;
    if (!this.poll.spin(fd)) this.quick = false;
  }
}
