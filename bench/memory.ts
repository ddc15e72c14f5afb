/**
 * pcache's resident memory: the bound the README's index formula gives (plus the request
 * workers' buffer pools), and an optional soak that watches for growth.
 */
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { nodesMaxFor } from "../core/engine/engine.ts";
import { formatSegNum } from "../core/format/format_cache.ts";
import { NODE_BYTES } from "../core/index/key_index.ts";
import { runFio } from "./fio.ts";
import { processMemory } from "./proc.ts";
import type { RunningServer } from "./servers.ts";
import type { MemorySample } from "./suite.ts";

export interface MemoryMeasure {
  index_bytes: number;
  pool_bytes: number;
  workers: number;
  start_anon_bytes: number;
  /** Bound: RssAnon at start + the whole index pool + every request worker's buffer pools. */
  bound_bytes: number;
  final: MemorySample["mem"];
  /** RssAnon after the last workload minus after the first. */
  growth_bytes: number;
  within_bound: boolean;
}

/** BufferPool keeps at most this much in free lists; each request worker has one (READ replies). */
const POOL_FREE_BYTES_MAX = 32 * 2 ** 20;

export function requestWorkers(log_path: string): number {
  const m = /with (\d+) request worker/.exec(readFileSync(log_path, "utf8"));
  return m ? Number(m[1]) : 1;
}

export function memoryMeasure(samples: MemorySample[], cache_size_bytes: number, workers: number): MemoryMeasure | null {
  const start = samples.find((s) => s.after === "start");
  const runs = samples.filter((s) => s.after !== "start");
  if (start === undefined || runs.length === 0) return null;
  const index_bytes = nodesMaxFor(formatSegNum(cache_size_bytes)) * NODE_BYTES;
  const pool_bytes = POOL_FREE_BYTES_MAX * workers;
  const final = runs[runs.length - 1].mem;
  const bound_bytes = start.mem.rss_anon_bytes + index_bytes + pool_bytes;
  return {
    index_bytes,
    pool_bytes,
    workers,
    start_anon_bytes: start.mem.rss_anon_bytes,
    bound_bytes,
    final,
    growth_bytes: final.rss_anon_bytes - runs[0].mem.rss_anon_bytes,
    within_bound: Math.max(...runs.map((s) => s.mem.rss_anon_bytes)) <= bound_bytes,
  };
}

export interface SoakMeasure {
  minutes: number;
  samples_anon_bytes: number[];
  /** Last sample minus the largest sample of the first half (allocator noise aside, should be <= 0). */
  growth_bytes: number;
  error: string | null;
}

/** Allowed noise before a soak counts as growing. */
export const SOAK_GROWTH_BYTES_MAX = 16 * 2 ** 20;

export function soakGrowth(anon: number[]): number {
  if (anon.length < 2) return 0;
  const half = anon.slice(0, Math.ceil(anon.length / 2));
  return anon[anon.length - 1] - Math.max(...half);
}

/** Random 4 KiB reads and writes over the whole export for `minutes`, RssAnon sampled each minute. */
export async function runSoak(s: RunningServer, minutes: number, size_bytes: number, out_dir: string, log: (m: string) => void): Promise<SoakMeasure> {
  const r: SoakMeasure = { minutes, samples_anon_bytes: [], growth_bytes: 0, error: null };
  const sample = (): void => {
    const m = processMemory(s.pid);
    if (m !== null) r.samples_anon_bytes.push(m.rss_anon_bytes);
  };
  sample();
  for (let i = 0; i < minutes; i++) {
    try {
      await runFio({
        name: "soak",
        uri: s.uri,
        region_bytes: size_bytes,
        args: ["--rw=randrw", "--rwmixread=50", "--bs=4k", "--iodepth=16", "--time_based", "--runtime=60"],
        json_path: join(out_dir, `soak-${i + 1}.json`),
        timeout_ms: 180_000,
      });
    } catch (err) {
      r.error = `minute ${i + 1}: ${(err as Error).message}`;
      break;
    }
    sample();
    log(`pcache: soak minute ${i + 1}/${minutes}: RssAnon ${(r.samples_anon_bytes[r.samples_anon_bytes.length - 1] / 2 ** 20).toFixed(1)} MiB`);
  }
  r.growth_bytes = soakGrowth(r.samples_anon_bytes);
  return r;
}
