/**
 * The machine and tool versions a result was measured with, for the report header.
 */
import { readFileSync } from "node:fs";
import { cpus, hostname, release, totalmem } from "node:os";
import { haveCommand, runChild } from "./children.ts";
import { loadAverage1 } from "./proc.ts";

export interface MachineInfo {
  date: string;
  host: string;
  kernel: string;
  cpu_model: string;
  nproc: number;
  mem_total_bytes: number;
  load_start: number;
  versions: Record<string, string>;
  git: string;
  backing_fs: string;
  shm_fs: string;
}

async function firstLine(argv: string[]): Promise<string> {
  if (!haveCommand(argv[0])) return "not installed";
  const r = await runChild(argv, 10_000);
  return (r.stdout || r.stderr).trim().split("\n")[0] ?? "";
}

function cpuModel(): string {
  try {
    const m = /^model name\s*:\s*(.*)$/m.exec(readFileSync("/proc/cpuinfo", "utf8"));
    if (m) return m[1].trim();
  } catch {
    // fall through to os.cpus()
  }
  return cpus()[0]?.model ?? "unknown";
}

async function fsType(path: string): Promise<string> {
  const r = await runChild(["findmnt", "-no", "FSTYPE,SOURCE", "--target", path], 10_000);
  const line = r.stdout.trim().split("\n")[0] ?? "";
  return r.code === 0 && line ? line.trim().replace(/\s+/, " on ") : "unknown";
}

async function gitDescribe(): Promise<string> {
  const head = await runChild(["git", "rev-parse", "--short", "HEAD"], 10_000);
  if (head.code !== 0) return "unknown";
  const dirty = await runChild(["git", "status", "--porcelain", "--untracked-files=no"], 10_000);
  return `${head.stdout.trim()}${dirty.stdout.trim() ? " + uncommitted changes" : ""}`;
}

export async function machineInfo(backing_dir: string, shm_dir: string): Promise<MachineInfo> {
  return {
    date: new Date().toISOString(),
    host: hostname(),
    kernel: release(),
    cpu_model: cpuModel(),
    nproc: navigator.hardwareConcurrency ?? cpus().length,
    mem_total_bytes: totalmem(),
    load_start: loadAverage1(),
    versions: {
      fio: await firstLine(["fio", "--version"]),
      nbdkit: await firstLine(["nbdkit", "--version"]),
      "qemu-nbd": await firstLine(["qemu-nbd", "--version"]),
      bun: Bun.version,
    },
    git: await gitDescribe(),
    backing_fs: await fsType(backing_dir),
    shm_fs: await fsType(shm_dir),
  };
}
