/**
 * The reliability report: runs the crash-state explorer, the damaged-image checks, the fault
 * scenarios (test/faults.test.ts), the NBD fuzzer and the SIGKILL soak, and prints how many of
 * each were tried and how many failed. Exit status 0 only when nothing failed; 2 for a bad
 * command line.
 *
 *   bun scripts/reliability.ts                                  # small defaults (a few minutes)
 *   bun scripts/reliability.ts --crash-cases 5000 --image-cases 5000 --fuzz-frames 200000 --kill-rounds 50
 *   bun scripts/reliability.ts --only crash,image                # some parts only
 *
 * The fuzzer and the soak (test/reliability/nbd_fuzz.ts, kill_soak.ts) are loaded when present;
 * when not, their rows say "not available". dist/pcache must be built for the binary parts.
 */
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { runCrashExplore } from "../test/reliability/crash_explore.ts";
import { runImageDamage } from "../test/reliability/image_damage.ts";

const PARTS = ["crash", "image", "faults", "fuzz", "kill"] as const;
type Part = (typeof PARTS)[number];

interface Row {
  what: string;
  tried: number | null;
  failed: number | null;
  note?: string;
}

function usage(message: string): never {
  process.stderr.write(`reliability: ${message}\n(see the header of scripts/reliability.ts for the options)\n`);
  process.exit(2);
}

const NUMBER_FLAGS = {
  "crash-cases": 40,
  "crash-seed": 1,
  "crash-exhaustive-seeds": 1,
  "crash-exhaustive-ops": 14,
  "image-cases": 100,
  "image-seed": 1,
  "image-binary": 4,
  "image-case": -1,
  "fuzz-frames": 2000,
  "fuzz-seed": 1,
  "kill-rounds": 3,
  "kill-seed": 1,
} as const;
type NumberFlag = keyof typeof NUMBER_FLAGS;

function parse(): { n: Record<NumberFlag, number>; parts: Set<Part> } {
  const options: Record<string, { type: "string" }> = { only: { type: "string" } };
  for (const k of Object.keys(NUMBER_FLAGS)) options[k] = { type: "string" };
  let values: Record<string, string | undefined>;
  try {
    ({ values } = parseArgs({ options }) as { values: Record<string, string | undefined> });
  } catch (err) {
    usage((err as Error).message);
  }
  const n = { ...NUMBER_FLAGS } as Record<NumberFlag, number>;
  for (const k of Object.keys(NUMBER_FLAGS) as NumberFlag[]) {
    const text = values[k];
    if (text === undefined) continue;
    if (!/^\d+$/.test(text) || !Number.isSafeInteger(Number(text)) || Number(text) > 100_000_000) usage(`--${k}: "${text}" is not a whole number in 0..100000000`);
    n[k] = Number(text);
  }
  const parts = new Set<Part>(PARTS);
  if (values.only !== undefined) {
    parts.clear();
    for (const p of values.only.split(",")) {
      if (!(PARTS as readonly string[]).includes(p)) usage(`--only: "${p}" is not one of ${PARTS.join(", ")}`);
      parts.add(p as Part);
    }
  }
  return { n, parts };
}

const progress = (line: string) => process.stderr.write(`${line}\n`);

async function crashRow(n: Record<NumberFlag, number>): Promise<Row> {
  let done = 0;
  const onCase = () => {
    if (++done % 100 === 0) progress(`crash: ${done} cases`);
  };
  const random = await runCrashExplore({ seeds: { from: n["crash-seed"], count: n["crash-cases"] }, onCase });
  const seeds = Array.from({ length: n["crash-exhaustive-seeds"] }, (_, i) => 1000 + n["crash-seed"] + i);
  const exhaustive = await runCrashExplore({ seeds, exhaustive_barriers: true, ops: n["crash-exhaustive-ops"], onCase });
  for (const f of [...random.failures, ...exhaustive.failures]) progress(`crash FAILED: ${f.message}`);
  const note = `${random.cases} random + ${exhaustive.cases} at every barrier of ${seeds.length} workload(s); ${random.segs_freed + exhaustive.segs_freed} segments freed by GC`;
  return { what: "crash states", tried: random.cases + exhaustive.cases, failed: random.failures.length + exhaustive.failures.length, note };
}

async function imageRow(n: Record<NumberFlag, number>): Promise<Row> {
  const binary = existsSync(join(import.meta.dir, "..", "dist", "pcache")) ? n["image-binary"] : 0;
  const dir = mkdtempSync(join(tmpdir(), "pcache-reliability-"));
  try {
    const only = n["image-case"] >= 0 ? n["image-case"] : undefined;
    const r = await runImageDamage({ seed: n["image-seed"], cases: n["image-cases"], only, binary_cases: binary, dir });
    for (const f of r.failures) progress(`image FAILED: ${f.message}`);
    const note = `${r.refused} refused, ${r.recovered} recovered, ${r.binary_runs} through the binary${binary === 0 ? " (dist/pcache missing)" : ""}`;
    return { what: "image damage cases", tried: r.cases, failed: r.failures.length, note };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/** The fault scenarios are the tests of test/faults.test.ts, run as they run in CI. */
async function faultsRow(): Promise<Row> {
  const p = Bun.spawn([process.execPath, "test", "test/faults.test.ts"], { cwd: join(import.meta.dir, ".."), stdout: "pipe", stderr: "pipe" });
  const [out, err] = await Promise.all([new Response(p.stdout).text(), new Response(p.stderr).text(), p.exited]);
  const text = out + err;
  const count = (word: string) => Number(new RegExp(`^\\s*(\\d+) ${word}$`, "m").exec(text)?.[1] ?? 0);
  const pass = count("pass");
  const fail = count("fail");
  const skip = count("skip");
  if (pass + fail === 0) return { what: "fault scenarios", tried: 0, failed: 1, note: `bun test did not run: ${text.trim().split("\n").slice(-3).join(" | ")}` };
  for (const line of text.split("\n").filter((l) => l.startsWith("(fail)"))) progress(`faults FAILED: ${line}`);
  return { what: "fault scenarios", tried: pass + fail, failed: fail, note: skip > 0 ? `${skip} skipped (client missing)` : undefined };
}

/** Loads a harness another part of the project provides; null when its file is not there. */
async function optional<T>(file: string, name: string): Promise<T | null> {
  const path = join(import.meta.dir, "..", "test", "reliability", file);
  if (!existsSync(path)) return null;
  const mod = (await import(path)) as Record<string, unknown>;
  if (typeof mod[name] !== "function") throw new Error(`${file} does not export ${name}()`);
  return mod[name] as T;
}

type FuzzFn = (o: { seed: number; frames: number; target: "in-process"; log?: (l: string) => void }) => Promise<{ frames: number; failures: unknown[] }>;
type SoakFn = (o: { rounds: number; seed: number; log?: (l: string) => void }) => Promise<{ kills: number; failures: unknown[] }>;

async function fuzzRow(n: Record<NumberFlag, number>): Promise<Row> {
  const run = await optional<FuzzFn>("nbd_fuzz.ts", "runNbdFuzz");
  if (run === null) return { what: "NBD fuzz frames", tried: null, failed: null, note: "not available" };
  const r = await run({ seed: n["fuzz-seed"], frames: n["fuzz-frames"], target: "in-process" });
  for (const f of r.failures) progress(`fuzz FAILED: ${String(f)}`);
  return { what: "NBD fuzz frames", tried: r.frames, failed: r.failures.length };
}

async function killRow(n: Record<NumberFlag, number>): Promise<Row> {
  const run = await optional<SoakFn>("kill_soak.ts", "runKillSoak");
  if (run === null) return { what: "SIGKILL kills", tried: null, failed: null, note: "not available" };
  const r = await run({ rounds: n["kill-rounds"], seed: n["kill-seed"] });
  for (const f of r.failures) progress(`kill soak FAILED: ${String(f)}`);
  return { what: "SIGKILL kills", tried: r.kills, failed: r.failures.length };
}

/** Runs one part; a harness that throws counts as one failure of that part. */
async function guard(what: string, fn: () => Promise<Row>): Promise<Row> {
  try {
    return await fn();
  } catch (err) {
    progress(`${what}: the harness failed: ${(err as Error)?.stack ?? err}`);
    return { what, tried: 0, failed: 1, note: `harness error: ${(err as Error)?.message ?? err}` };
  }
}

function printTable(rows: Row[]): void {
  const cell = (v: number | null) => (v === null ? "-" : String(v));
  const lines = [`${"".padEnd(22)}${"tried".padStart(10)}${"failed".padStart(8)}`];
  for (const r of rows) lines.push(`${r.what.padEnd(22)}${cell(r.tried).padStart(10)}${cell(r.failed).padStart(8)}${r.note ? `   ${r.note}` : ""}`);
  process.stdout.write(`${lines.join("\n")}\n`);
}

const { n, parts } = parse();
const rows: Row[] = [];
if (parts.has("crash")) rows.push(await guard("crash states", () => crashRow(n)));
if (parts.has("image")) rows.push(await guard("image damage cases", () => imageRow(n)));
if (parts.has("faults")) rows.push(await guard("fault scenarios", () => faultsRow()));
if (parts.has("fuzz")) rows.push(await guard("NBD fuzz frames", () => fuzzRow(n)));
if (parts.has("kill")) rows.push(await guard("SIGKILL kills", () => killRow(n)));
printTable(rows);
const failed = rows.reduce((sum, r) => sum + (r.failed ?? 0), 0);
process.stdout.write(failed === 0 ? "no failures\n" : `${failed} failure(s)\n`);
process.exit(failed === 0 ? 0 : 1);
