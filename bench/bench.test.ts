/**
 * The benchmark's pure parts: fio JSON parsing, target judgement, the report and the command
 * line. (Running the benchmark itself takes minutes and is not part of the test suite.)
 */
import { describe, expect, test } from "bun:test";
import { ArgError, parseArgs, selection } from "./args.ts";
import { soakGrowth } from "./memory.ts";
import { fioNumbers, parseFioJson, WORKLOADS, workloadById, type FioNumbers } from "./fio.ts";
import { mdTable, workloadSection } from "./report.ts";
import { executionOrder, type ServerResult, type WorkloadResult } from "./suite.ts";
import { evaluateTargets } from "./targets.ts";

function dir(iops: number, bw_bytes: number, ios: number, mean_ns: number, p99_ns: number) {
  return { iops, bw_bytes, total_ios: ios, lat_ns: { mean: mean_ns, percentile: { "99.000000": p99_ns } } };
}

const NONE = dir(0, 0, 0, 0, 0);

describe("fio JSON", () => {
  test("mixed job: IOPS and bandwidth add up, mean is weighted by I/O count, p99 is the worse side", () => {
    const text = `nbd: connected\n${JSON.stringify({ jobs: [{ error: 0, read: dir(700, 700 * 4096, 7000, 10_000, 50_000), write: dir(300, 300 * 4096, 3000, 20_000, 90_000) }] })}`;
    const n = fioNumbers(parseFioJson(text));
    expect(n.iops).toBe(1000);
    expect(n.mib_s).toBeCloseTo((1000 * 4096) / 2 ** 20, 9);
    expect(n.lat_mean_us).toBeCloseTo(13, 9); // (7000*10 + 3000*20) / 10000 µs
    expect(n.lat_p99_us).toBe(90);
    expect(n.flush_mean_us).toBeNull();
  });

  test("flush workload: the sync section gives the flush latency", () => {
    const job = { error: 0, read: NONE, write: dir(500, 500 * 4096, 5000, 30_000, 80_000), sync: { total_ios: 5000, lat_ns: { mean: 12_000, percentile: { "99.000000": 40_000 } } } };
    const n = fioNumbers(parseFioJson(JSON.stringify({ jobs: [job] })));
    expect(n.iops).toBe(500);
    expect(n.flush_mean_us).toBe(12);
    expect(n.flush_p99_us).toBe(40);
  });

  test("a job error, no JSON or no I/O is an error, not a number", () => {
    expect(() => parseFioJson(JSON.stringify({ jobs: [{ error: 5, read: NONE, write: NONE }] }))).toThrow("fio job error 5");
    expect(() => parseFioJson("fio: engine nbd not loadable")).toThrow("no JSON");
    expect(() => fioNumbers(parseFioJson(JSON.stringify({ jobs: [{ error: 0, read: NONE, write: NONE }] })))).toThrow("no I/O");
  });
});

function numbers(iops: number, p99_us: number, mib_s = 0): FioNumbers {
  return { iops, mib_s, lat_mean_us: 1, lat_p99_us: p99_us, flush_mean_us: null, flush_p99_us: null, ios: 1 };
}

function server(name: string, by_id: Record<string, FioNumbers>, cache_full = false): ServerResult {
  const workloads: Record<string, WorkloadResult> = {};
  for (const [id, n] of Object.entries(by_id)) {
    workloads[id] = { numbers: n, error: null, server_cpu_s: 1, wall_s: 1, other_cpu_pct: 0, steal_pct: 0, settle_s: 0, cache_full };
  }
  return { name, description: "", status: "ok", note: null, workloads, prefill_mib_s: null, memory: [], log_path: null };
}

describe("targets", () => {
  const rw = workloadById("rw4k-qd1")!;
  const fl = workloadById("rw4k-qd1-flush")!;
  const sw = workloadById("sw1m-qd8")!;

  test("ratios against the named peer decide met and missed; a missing peer is not measured", () => {
    const servers = [
      server("pcache", { "rw4k-qd1": numbers(1000, 100), "rw4k-qd1-flush": numbers(350, 100), "sw1m-qd8": numbers(0, 100, 900) }),
      server("nbdkit memory", { "rw4k-qd1": numbers(1001, 60), "rw4k-qd1-flush": numbers(1, 100), "sw1m-qd8": numbers(0, 100, 900) }),
      server("nbdkit file", { "rw4k-qd1-flush": numbers(100, 100) }),
    ];
    const rows = evaluateTargets({ workloads: [rw, fl, sw], servers, replay: null, writeback: null, memory: null, soak: null });
    const status = (prefix: string): string => rows.find((r) => r.target.startsWith(prefix))!.status;
    expect(status("4k random write, QD1: ≥")).toBe("missed"); // 1000 < 1001
    expect(status("4k random write + flush after every write, QD1: ≥ 3.5× nbdkit file")).toBe("met"); // 3.5×
    expect(status("4k random write + flush after every write, QD1: ≥ 0.8× nbdkit null")).toBe("not measured");
    expect(status("1 MiB sequential write, QD8: ≥")).toBe("met"); // MiB/s, not IOPS, compared
    expect(status("4k random write, QD1: p99")).toBe("missed"); // 100 / 60 > 1.5
    expect(status("1 MiB sequential write, QD8: p99")).toBe("met");
    expect(rows.some((r) => r.target.startsWith("replay"))).toBe(false); // extras not run
  });

  test("absolute targets: replay speed, writeback ratio, soak growth", () => {
    const rows = evaluateTargets({
      workloads: [],
      servers: [],
      replay: { keys: 1_000_000, ksets: 7813, key_len_bytes: 512, build_s: 1, replay_ms: 900, keys_per_s: 1_111_111, startup_ms: 1000 },
      writeback: { bytes: 1, keys: 1, pcache_s: 1, pcache_mib_s: 1, fio_s: 1, fio_mib_s: 1, fio_args: "", ratio: 0.69 },
      memory: null,
      soak: { minutes: 10, samples_anon_bytes: [], growth_bytes: 64 * 2 ** 20, error: null },
    });
    expect(rows.map((r) => r.status)).toEqual(["met", "missed", "not measured", "missed"]);
  });
});

describe("helpers", () => {
  test("soak growth compares the last sample with the first half's peak", () => {
    expect(soakGrowth([100, 120, 110, 115])).toBe(-5);
    expect(soakGrowth([100, 100, 100, 180])).toBe(80);
    expect(soakGrowth([100])).toBe(0);
  });

  test("cached-read workloads run first, right after the prefill", () => {
    const order = executionOrder(WORKLOADS).map((w) => w.cached_read);
    expect(order).toEqual([...order].sort((a, b) => Number(b) - Number(a)));
    expect(executionOrder(WORKLOADS)).toHaveLength(WORKLOADS.length);
  });

  test("a workload during which pcache's cache filled up is marked in its table", () => {
    const sw = workloadById("sw1m-qd8")!;
    const peer = server("nbdkit memory", { "sw1m-qd8": numbers(0, 100, 900) });
    const full = workloadSection({ servers: [server("pcache", { "sw1m-qd8": numbers(0, 100, 500) }, true), peer] }, sw).join("\n");
    expect(full).toContain("| pcache (cache full) | 500 |");
    expect(full).toContain("the cache filled up during this workload");
    const roomy = workloadSection({ servers: [server("pcache", { "sw1m-qd8": numbers(0, 100, 500) }), peer] }, sw).join("\n");
    expect(roomy).toContain("| pcache | 500 |");
    expect(roomy).not.toContain("cache full");
  });

  test("Markdown tables escape pipes and align numbers right", () => {
    expect(mdTable(["a", "b"], [["x|y", "1"]])).toBe("| a | b |\n| --- | ---: |\n| x\\|y | 1 |");
  });
});

describe("command line", () => {
  test("--quick shortens runs unless a value is given; --only splits lists", () => {
    const a = parseArgs(["--quick", "--runtime=5", "--only", "rw4k-qd1,replay", "--serve-arg", "--log-level=warn"]);
    expect([a.runtime_s, a.ramp_s, a.read_region_bytes]).toEqual([5, 1, 256 * 2 ** 20]);
    expect(a.serve_args).toEqual(["--log-level=warn"]);
    expect(selection(a)).toEqual({ workload_ids: ["rw4k-qd1"], replay: true, writeback: false });
  });

  test("bad values are refused with the option's name", () => {
    expect(() => parseArgs(["--runtime", "0"])).toThrow("--runtime: 0 is out of range");
    expect(() => parseArgs(["--size", "2X"])).toThrow('--size: "2X" is not a size');
    expect(() => parseArgs(["--only", "rw9"])).toThrow('--only: unknown "rw9"');
    expect(() => parseArgs(["--server", "nbd"])).toThrow(ArgError);
    expect(() => parseArgs(["--workers"])).toThrow("--workers needs a value");
    expect(() => parseArgs(["--read-region", "4G"])).toThrow("larger than --size");
  });
});
