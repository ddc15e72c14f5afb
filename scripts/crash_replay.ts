/**
 * Replay one crash case of the crash-state explorer exactly, printing every step.
 *
 *   bun scripts/crash_replay.ts --seed S [--barrier K | --write K | --backing-io K | --end] [--ops N]
 *
 * With no crash point the case picks its own from the seed (as the CI run does). Exit status 0
 * when the case keeps every invariant, 1 when it does not, 2 for a bad command line.
 */
import { parseArgs } from "node:util";
import { type CrashCaseOptions, runCrashCase } from "../test/reliability/crash_explore.ts";

function usage(message: string): never {
  process.stderr.write(`crash_replay: ${message}\n`);
  process.stderr.write("usage: bun scripts/crash_replay.ts --seed S [--barrier K | --write K | --backing-io K | --end] [--ops N]\n");
  process.exit(2);
}

function whole(text: string | undefined, name: string, min: number): number | undefined {
  if (text === undefined) return undefined;
  if (!/^\d+$/.test(text)) usage(`${name}: "${text}" is not a whole number`);
  const n = Number(text);
  if (!Number.isSafeInteger(n) || n < min) usage(`${name}: ${text} is out of range (at least ${min})`);
  return n;
}

function parse(): { seed: number; opts: CrashCaseOptions } {
  let values: Record<string, string | boolean | undefined>;
  try {
    ({ values } = parseArgs({
      options: {
        seed: { type: "string" },
        barrier: { type: "string" },
        write: { type: "string" },
        "backing-io": { type: "string" },
        end: { type: "boolean" },
        ops: { type: "string" },
      },
    }));
  } catch (err) {
    usage((err as Error).message);
  }
  const seed = whole(values.seed as string | undefined, "--seed", 0);
  if (seed === undefined) usage("--seed is required");
  const opts: CrashCaseOptions = {
    barrier: whole(values.barrier as string | undefined, "--barrier", 1),
    write: whole(values.write as string | undefined, "--write", 1),
    backing_io: whole(values["backing-io"] as string | undefined, "--backing-io", 1),
    end: values.end === true ? true : undefined,
    ops: whole(values.ops as string | undefined, "--ops", 1),
  };
  const points = [opts.barrier, opts.write, opts.backing_io, opts.end].filter((v) => v !== undefined);
  if (points.length > 1) usage("give at most one of --barrier, --write, --backing-io, --end");
  if (opts.ops !== undefined && opts.ops > 100_000) usage(`--ops: ${opts.ops} is out of range (at most 100000)`);
  return { seed, opts };
}

const { seed, opts } = parse();
const r = await runCrashCase(seed, { ...opts, trace: (line) => process.stdout.write(`${line}\n`) });
process.stdout.write(
  `${r.ok ? "OK" : "FAILED"}: seed ${seed}, crash at ${r.crash}, op ${r.step}, ${r.barriers} barriers, ` +
    `${r.cache_stores} cache stores, ${r.backing_ios} backing writes and flushes, ${r.segs_freed} segments freed, ` +
    `${r.log_rolls} log rolls written back, ${r.ksets_written_back} ksets written back\n`,
);
if (!r.ok) process.stdout.write(`${r.failure}\n`);
process.exit(r.ok ? 0 : 1);
