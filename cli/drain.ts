/**
 * `pcache drain`: write back every dirty byte now. The server closes every kset and takes the
 * key_head after that as the target; drain then waits until dirty_tail reaches it. Writes that
 * arrive during the drain are not waited for (with steady writes, dirty_tail would never catch
 * up with a moving key_head).
 */
import { defineCommand } from "citty";
import { controlRequest } from "../core/control/client.ts";
import type { DrainProgress, DrainStartResult } from "../core/control/protocol.ts";
import { formatBytes, formatErrno } from "../core/control/text.ts";
import { posToString } from "../core/log/position.ts";
import { fail, parseIntInRange, runCommand } from "./run.ts";
import { controlArgs, controlPathOf } from "./status.ts";

const POLL_MS = 250;
/** The server walks the dirty log for each poll on its main thread: keep that under 1/POLL_COST_FACTOR of its time. */
const POLL_COST_FACTOR = 4;
/** Plain (non-terminal) output prints at most one line per this. */
const PLAIN_LINE_MS = 1_000;
/** The rate shown is measured over this window. */
const RATE_WINDOW_MS = 3_000;
/** drain_start closes every kset, which may wait for log space (the engine bounds that at 30 s). */
const START_TIMEOUT_MS = 45_000;
const BAR_CELLS = 30;
const TIMEOUT_MAX_S = 7 * 24 * 3600;

export const drainCommand = defineCommand({
  meta: {
    name: "drain",
    description:
      "Write back every dirty byte of a running server now, with progress; exit 0 once dirty_tail reaches the key_head seen at the start.\nExample: pcache drain --cache /dev/shm/cache.img --timeout 600",
  },
  args: {
    ...controlArgs,
    timeout: { type: "string", description: "give up after this many seconds (0: no limit)", default: "0" },
    "stall-timeout": { type: "string", description: "give up when dirty_tail has not moved for this many seconds (writeback failing, paused or stuck)", default: "60" },
  },
  run: ({ args }) =>
    runCommand(async () => {
      const timeout_s = parseIntInRange(args.timeout, "--timeout", 0, TIMEOUT_MAX_S);
      const stall_s = parseIntInRange(args["stall-timeout"], "--stall-timeout", 1, TIMEOUT_MAX_S);
      const path = controlPathOf(args);
      return drain(path, timeout_s * 1000, stall_s * 1000);
    }),
});

interface Sample {
  t_ms: number;
  left_bytes: number;
}

/** Why writeback is not keeping up, from what the server reports. */
function reason(p: DrainProgress): string {
  if (p.writeback_error !== 0) return `writeback is failing: backing write errors, ${formatErrno(p.writeback_error)}`;
  if (p.writeback_paused) return "writeback is paused";
  if (p.writeback_state !== "running") return `writeback is ${p.writeback_state}`;
  return "writeback reports no error";
}

async function drain(path: string, timeout_ms: number, stall_ms: number): Promise<number> {
  const t0 = performance.now();
  const start = (await controlRequest(path, { op: "drain_start" }, START_TIMEOUT_MS)) as DrainStartResult;
  const target = posToString(start.target);
  const out = new ProgressOutput(start.left_bytes, process.stdout.isTTY === true);
  let last_tail = "";
  let last_move_ms = performance.now();
  for (;;) {
    const p = (await controlRequest(path, { op: "drain_progress", target: start.target })) as DrainProgress;
    const now = performance.now();
    if (p.reached) {
      // The amount is unknown when the log moved under every count at the start.
      const what = start.left_bytes === null ? "the dirty data" : formatBytes(start.left_bytes);
      out.finish(`drained: dirty_tail reached ${target} (${what} written back in ${((now - t0) / 1000).toFixed(1)} s)`);
      return 0;
    }
    if (p.dirty_tail !== last_tail) {
      last_tail = p.dirty_tail;
      last_move_ms = now;
    }
    out.update(now, p);
    const left = p.left_bytes === null ? "an unknown amount" : formatBytes(p.left_bytes);
    if (p.writeback_state !== "running") {
      out.abort();
      fail(`drain stopped: ${reason(p)} with ${left} left to write back (see the server's log)`);
    }
    if (timeout_ms > 0 && now - t0 >= timeout_ms) {
      out.abort();
      fail(`drain timed out after ${timeout_ms / 1000} s with ${left} left to write back (${reason(p)}); run it again or raise --timeout`);
    }
    if (now - last_move_ms >= stall_ms) {
      out.abort();
      fail(`drain gave up: dirty_tail has not moved for ${stall_ms / 1000} s with ${left} left to write back (${reason(p)}); check the backing device`);
    }
    await Bun.sleep(Math.max(POLL_MS, POLL_COST_FACTOR * p.scan_ms));
  }
}

/** A bar redrawn in place on a terminal; otherwise a plain line at most once a second. */
class ProgressOutput {
  private readonly samples: Sample[] = [];
  private last_line_ms = Number.NEGATIVE_INFINITY;
  private drawn = false;

  constructor(
    private readonly total_bytes: number | null,
    private readonly tty: boolean,
  ) {}

  update(now_ms: number, p: DrainProgress): void {
    if (p.left_bytes !== null) {
      this.samples.push({ t_ms: now_ms, left_bytes: p.left_bytes });
      while (this.samples.length > 2 && now_ms - this.samples[0].t_ms > RATE_WINDOW_MS) this.samples.shift();
    }
    const left = p.left_bytes === null ? "? left" : `${formatBytes(p.left_bytes)} left`;
    const rate = `${formatBytes(this.rate())}/s`;
    if (this.tty) {
      process.stdout.write(`\r\x1b[K${this.bar(p.left_bytes)} ${left}  ${rate}`);
      this.drawn = true;
      return;
    }
    if (now_ms - this.last_line_ms < PLAIN_LINE_MS) return;
    this.last_line_ms = now_ms;
    process.stdout.write(`drain: ${left}, ${rate}, dirty_tail ${p.dirty_tail}\n`);
  }

  private rate(): number {
    if (this.samples.length < 2) return 0;
    const a = this.samples[0];
    const b = this.samples[this.samples.length - 1];
    const dt_s = (b.t_ms - a.t_ms) / 1000;
    return dt_s > 0 ? Math.max(0, (a.left_bytes - b.left_bytes) / dt_s) : 0;
  }

  private bar(left: number | null): string {
    const done = this.total_bytes === null || this.total_bytes === 0 || left === null ? 0 : Math.max(0, Math.min(1, 1 - left / this.total_bytes));
    const cells = Math.round(done * BAR_CELLS);
    return `[${"#".repeat(cells)}${"-".repeat(BAR_CELLS - cells)}] ${String(Math.floor(done * 100)).padStart(3)}%`;
  }

  finish(line: string): void {
    if (this.drawn) process.stdout.write(`\r\x1b[K${this.bar(0)}\n`);
    process.stdout.write(`${line}\n`);
  }

  /** End the bar's line so the error starts on a fresh one. */
  abort(): void {
    if (this.drawn) process.stdout.write("\n");
  }
}
