/**
 * The long real-process crash soak (test/reliability/kill_soak.ts):
 *
 *   bun scripts/kill_soak.ts --rounds 200 --seed 7 [--workdir DIR] [--gc-percent N] [--data-crc on|off]
 *
 * Needs dist/pcache (bun scripts/build.ts); uses fio for one round kind when it is installed.
 * Prints one line per round and a summary; exit status 1 when any check failed.
 */
import { runKillSoak } from "../test/reliability/kill_soak.ts";

function arg(name: string): string | undefined {
  const i = process.argv.indexOf(name);
  return i >= 0 ? process.argv[i + 1] : undefined;
}

function intArg(name: string, fallback: number, lo: number, hi: number): number {
  const text = arg(name);
  if (text === undefined) return fallback;
  const n = Number(text);
  if (!Number.isInteger(n) || n < lo || n > hi) {
    process.stderr.write(`kill_soak: ${name} must be an integer in ${lo}..${hi}, got "${text}"\n`);
    process.exit(1);
  }
  return n;
}

const rounds = intArg("--rounds", 200, 1, 100_000);
const seed = intArg("--seed", Math.floor(Math.random() * 1e9), 0, Number.MAX_SAFE_INTEGER);
const gc_text = arg("--gc-percent");
const crc_text = arg("--data-crc");
if (crc_text !== undefined && crc_text !== "on" && crc_text !== "off") {
  process.stderr.write(`kill_soak: --data-crc must be on or off, got "${crc_text}"\n`);
  process.exit(1);
}
const t0 = Date.now();
const r = await runKillSoak({
  rounds,
  seed,
  workdir: arg("--workdir"),
  gc_percent: gc_text === undefined ? undefined : intArg("--gc-percent", 70, 0, 90),
  data_crc: crc_text === undefined ? undefined : crc_text === "on",
  log: (line) => process.stdout.write(`${line}\n`),
});
const mib = (r.written_bytes / 1024 / 1024).toFixed(0);
process.stdout.write(
  `kill soak seed ${seed}: ${r.rounds} rounds, ${r.kills} kills (${r.kills_mid_writeback} with writeback pending, ${r.kills_while_gc} while GC was seen moving), ` +
    `${mib} MiB written, GC in ${r.gc_rounds} rounds, writeback in ${r.writeback_rounds}, fio rounds ${r.fio_rounds}, ` +
    `torn blocks ${r.torn_blocks}, ${((Date.now() - t0) / 1000).toFixed(0)} s\n`,
);
for (const f of r.failures) process.stdout.write(`FAIL: ${f}\n`);
process.stdout.write(r.failures.length === 0 ? "PASS\n" : `${r.failures.length} failure(s); rerun with --seed ${seed}\n`);
process.exit(r.failures.length === 0 ? 0 : 1);
