/**
 * What the benchmark reads from /proc: a process's CPU time and memory, the machine's busy time
 * (to spot other load on a shared box) and the load average. Every reader returns null instead of
 * throwing when the process is gone, so a server that died is reported, not a crash.
 */
import { readFileSync } from "node:fs";

/** Clock ticks per second of utime/stime (USER_HZ); 100 on every Linux the benchmark targets. */
export const CLK_TCK = 100;

function readText(path: string): string | null {
  try {
    return readFileSync(path, "utf8");
  } catch {
    return null;
  }
}

/** Fields of /proc/PID/stat after the "(comm)" field, which may itself contain spaces. */
function statFields(path: string): string[] | null {
  const text = readText(path);
  if (text === null) return null;
  const close = text.lastIndexOf(")");
  if (close < 0) return null;
  return text.slice(close + 2).trim().split(/\s+/);
}

/** User + system CPU seconds of every thread of a process, or null when it is gone. */
export function processCpuSeconds(pid: number): number | null {
  const f = statFields(`/proc/${pid}/stat`);
  // After "(comm) ": state=0 ... utime=11 stime=12 (fields 14 and 15 of stat(5)).
  if (f === null || f.length < 13) return null;
  return (Number(f[11]) + Number(f[12])) / CLK_TCK;
}

/** CPU seconds of this process plus its reaped children (fio, nbdinfo, ...). */
export function selfAndChildrenCpuSeconds(): number {
  const f = statFields("/proc/self/stat");
  if (f === null || f.length < 15) return 0;
  return (Number(f[11]) + Number(f[12]) + Number(f[13]) + Number(f[14])) / CLK_TCK;
}

/** Machine-wide busy CPU seconds (user + nice + system + irq + softirq) and steal. */
export function machineCpuSeconds(): { busy_s: number; steal_s: number } {
  const line = (readText("/proc/stat") ?? "").split("\n")[0] ?? "";
  const v = line.trim().split(/\s+/).slice(1).map(Number);
  if (v.length < 8) return { busy_s: 0, steal_s: 0 };
  return { busy_s: (v[0] + v[1] + v[2] + v[5] + v[6]) / CLK_TCK, steal_s: v[7] / CLK_TCK };
}

export interface MemStatus {
  vm_rss_bytes: number;
  vm_hwm_bytes: number;
  rss_anon_bytes: number;
  rss_file_bytes: number;
  rss_shmem_bytes: number;
}

/** Resident memory of a process from /proc/PID/status, or null when it is gone. */
export function processMemory(pid: number): MemStatus | null {
  const text = readText(`/proc/${pid}/status`);
  if (text === null) return null;
  const kib = (name: string): number => {
    const m = new RegExp(`^${name}:\\s+(\\d+) kB`, "m").exec(text);
    return m ? Number(m[1]) * 1024 : 0;
  };
  return {
    vm_rss_bytes: kib("VmRSS"),
    vm_hwm_bytes: kib("VmHWM"),
    rss_anon_bytes: kib("RssAnon"),
    rss_file_bytes: kib("RssFile"),
    rss_shmem_bytes: kib("RssShmem"),
  };
}

/** The 1-minute load average. */
export function loadAverage1(): number {
  const text = readText("/proc/loadavg") ?? "0";
  return Number(text.split(" ")[0]) || 0;
}

/** Snapshot for measuring one interval: wall clock, server CPU, our CPU, machine CPU. */
export interface CpuSnapshot {
  wall_s: number;
  server_s: number | null;
  self_s: number;
  busy_s: number;
  steal_s: number;
}

export function cpuSnapshot(server_pid: number): CpuSnapshot {
  const m = machineCpuSeconds();
  return { wall_s: performance.now() / 1000, server_s: processCpuSeconds(server_pid), self_s: selfAndChildrenCpuSeconds(), ...m };
}

export interface CpuDelta {
  wall_s: number;
  /** Server CPU seconds in the interval (null if the server is gone). */
  server_cpu_s: number | null;
  /** CPU used by anything but the server, fio and this script, in % of one core: a noise indicator. */
  other_cpu_pct: number;
  steal_pct: number;
}

export function cpuDelta(a: CpuSnapshot, b: CpuSnapshot): CpuDelta {
  const wall_s = Math.max(b.wall_s - a.wall_s, 1e-9);
  const server_cpu_s = a.server_s === null || b.server_s === null ? null : b.server_s - a.server_s;
  const other_s = b.busy_s - a.busy_s - (b.self_s - a.self_s) - (server_cpu_s ?? 0);
  return {
    wall_s,
    server_cpu_s,
    other_cpu_pct: Math.max(0, (100 * other_s) / wall_s),
    steal_pct: (100 * (b.steal_s - a.steal_s)) / wall_s,
  };
}
