/**
 * Command line of bench/run.ts. Every bad value is one line naming the option.
 */
import { WORKLOADS } from "./fio.ts";

export const USAGE = `usage: ./node_modules/.bin/bun bench/run.ts [options]
  --quick               3 s per workload, smaller read region and writeback burst
  --runtime S           measured seconds per workload (default 10; --quick 3)
  --ramp S              unmeasured warm-up seconds per workload (default 2; --quick 1)
  --only NAME           run only this workload or measurement (repeatable, or comma list):
                        ${WORKLOADS.map((w) => w.id).join(", ")}, replay, writeback
  --server ID           run only these servers (repeatable): pcache, null, memory, file, file+cache, qemu-nbd
  --serve-arg ARG       extra argument for \`pcache serve\` (repeatable)
  --workers N           request workers for pcache (passed only if \`serve --help\` lists --workers; default nproc)
  --size SIZE           export / backing file size (default 2G)
  --cache-size SIZE     pcache cache file size (default 4G)
  --read-region SIZE    region written then read by the cached-read workloads (default 1G; --quick 256M)
  --replay-keys N       keys in the replay log (default 1000000)
  --writeback-size SIZE dirty data for the writeback measurement (default 1G; --quick 256M)
  --soak-min N          also run pcache for N minutes and watch its memory (default 0: off)
  --backing-dir DIR     backing files (on disk; default /tmp)
  --shm-dir DIR         cache files (tmpfs; default /dev/shm)
  --out FILE            report (default bench/RESULTS.md)
  --no-settle           do not wait for a server's write-back backlog (and sync) before each
                        workload; later workloads then pay for earlier ones
  --no-build            use dist/pcache as it is`;

export interface BenchArgs {
  quick: boolean;
  runtime_s: number;
  ramp_s: number;
  only: string[];
  servers: string[];
  serve_args: string[];
  workers: number | null;
  size_bytes: number;
  cache_size: string;
  cache_size_bytes: number;
  read_region_bytes: number;
  replay_keys: number;
  writeback_bytes: number;
  soak_min: number;
  backing_dir: string;
  shm_dir: string;
  out: string | null;
  build: boolean;
  settle: boolean;
  help: boolean;
}

export class ArgError extends Error {}

const UNITS: Record<string, number> = { "": 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40 };
const SERVER_IDS = ["pcache", "null", "memory", "file", "file+cache", "qemu-nbd"];
const EXTRA_NAMES = ["replay", "writeback"];

export function parseSizeArg(text: string, what: string): number {
  const m = /^(\d+)([kmgt]?)(?:i?b)?$/i.exec(text.trim());
  if (m === null) throw new ArgError(`${what}: "${text}" is not a size (examples: 2G, 256M)`);
  const n = Number(m[1]) * UNITS[m[2].toLowerCase()];
  if (!Number.isSafeInteger(n) || n <= 0) throw new ArgError(`${what}: "${text}" is out of range`);
  return n;
}

export function parseIntArg(text: string, what: string, min: number, max: number): number {
  if (!/^\d+$/.test(text.trim())) throw new ArgError(`${what}: "${text}" is not a whole number (${min}..${max})`);
  const n = Number(text);
  if (n < min || n > max) throw new ArgError(`${what}: ${n} is out of range (${min}..${max})`);
  return n;
}

function defaults(): BenchArgs {
  return {
    quick: false,
    runtime_s: 10,
    ramp_s: 2,
    only: [],
    servers: [],
    serve_args: [],
    workers: null,
    size_bytes: 2 * 2 ** 30,
    cache_size: "4G",
    cache_size_bytes: 4 * 2 ** 30,
    read_region_bytes: 2 ** 30,
    replay_keys: 1_000_000,
    writeback_bytes: 2 ** 30,
    soak_min: 0,
    backing_dir: "/tmp",
    shm_dir: "/dev/shm",
    out: null,
    build: true,
    settle: true,
    help: false,
  };
}

export function parseArgs(argv: string[]): BenchArgs {
  const a = defaults();
  const set = new Set<string>();
  for (let i = 0; i < argv.length; i++) {
    const opt = argv[i];
    const flag = opt.startsWith("--") && opt.includes("=") ? opt.slice(0, opt.indexOf("=")) : opt;
    const inline = flag !== opt ? opt.slice(flag.length + 1) : undefined;
    const value = (): string => {
      if (inline !== undefined) return inline;
      if (i + 1 >= argv.length) throw new ArgError(`${flag} needs a value`);
      return argv[++i];
    };
    set.add(flag);
    applyOption(a, flag, value);
  }
  if (a.quick) {
    if (!set.has("--runtime")) a.runtime_s = 3;
    if (!set.has("--ramp")) a.ramp_s = 1;
    if (!set.has("--read-region")) a.read_region_bytes = 256 * 2 ** 20;
    if (!set.has("--writeback-size")) a.writeback_bytes = 256 * 2 ** 20;
  }
  validate(a);
  return a;
}

function applyOption(a: BenchArgs, flag: string, value: () => string): void {
  switch (flag) {
    case "--quick": a.quick = true; break;
    case "--no-build": a.build = false; break;
    case "--no-settle": a.settle = false; break;
    case "-h": case "--help": a.help = true; break;
    case "--runtime": a.runtime_s = parseIntArg(value(), flag, 1, 3600); break;
    case "--ramp": a.ramp_s = parseIntArg(value(), flag, 0, 600); break;
    case "--only": a.only.push(...value().split(",").map((s) => s.trim()).filter(Boolean)); break;
    case "--server": a.servers.push(value()); break;
    case "--serve-arg": a.serve_args.push(value()); break;
    case "--workers": a.workers = parseIntArg(value(), flag, 1, 256); break;
    case "--size": a.size_bytes = parseSizeArg(value(), flag); break;
    case "--cache-size": a.cache_size = value(); a.cache_size_bytes = parseSizeArg(a.cache_size, flag); break;
    case "--read-region": a.read_region_bytes = parseSizeArg(value(), flag); break;
    case "--replay-keys": a.replay_keys = parseIntArg(value(), flag, 1, 16 * 2 ** 20); break;
    case "--writeback-size": a.writeback_bytes = parseSizeArg(value(), flag); break;
    case "--soak-min": a.soak_min = parseIntArg(value(), flag, 0, 24 * 60); break;
    case "--backing-dir": a.backing_dir = value(); break;
    case "--shm-dir": a.shm_dir = value(); break;
    case "--out": a.out = value(); break;
    default: throw new ArgError(`unknown option ${flag} (--help lists them)`);
  }
}

function validate(a: BenchArgs): void {
  const names = [...WORKLOADS.map((w) => w.id), ...EXTRA_NAMES];
  for (const o of a.only) if (!names.includes(o)) throw new ArgError(`--only: unknown "${o}" (have: ${names.join(", ")})`);
  for (const s of a.servers) if (!SERVER_IDS.includes(s)) throw new ArgError(`--server: unknown "${s}" (have: ${SERVER_IDS.join(", ")})`);
  if (a.read_region_bytes > a.size_bytes) throw new ArgError("--read-region is larger than --size");
  if (a.size_bytes % 4096 !== 0) throw new ArgError("--size must be a multiple of 4 KiB");
  if (a.cache_size_bytes < 512 * 2 ** 20) throw new ArgError("--cache-size must be at least 512M");
  if (a.writeback_bytes > a.size_bytes) throw new ArgError("--writeback-size is larger than --size");
  if (a.writeback_bytes < 4096) throw new ArgError("--writeback-size must be at least 4K");
  if (a.replay_keys * 512 > a.size_bytes) throw new ArgError("--replay-keys × 512 B does not fit in --size");
}

/** What to run: workloads and extras after --only. */
export function selection(a: BenchArgs): { workload_ids: string[]; replay: boolean; writeback: boolean } {
  if (a.only.length === 0) return { workload_ids: WORKLOADS.map((w) => w.id), replay: true, writeback: true };
  return { workload_ids: WORKLOADS.map((w) => w.id).filter((id) => a.only.includes(id)), replay: a.only.includes("replay"), writeback: a.only.includes("writeback") };
}
