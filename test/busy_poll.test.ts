/**
 * Busy-polling after replies: the poll loop on a real socket, the spare-CPU gate (fed its own
 * /proc/stat and clock), the per-client pace, and a real client (nbdsh, in its own process)
 * at queue depth 1 against the server in this process.
 */
import { afterAll, describe, expect, test } from "bun:test";
import type { Socket } from "bun";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { spinUntilReadable } from "../ffi/socket.ts";
import { BusyPoll, ClientPace, idleTicksOf, BUSY_POLL_BUDGET_MAX_US } from "../core/nbd/busy_poll.ts";
import { startTestServer } from "./helpers/nbd_raw.ts";

const dir = mkdtempSync(join(tmpdir(), "pcache-busy-poll-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** A connected unix socket pair: `server` is the accepted end (its fd is what we poll). */
async function socketPair(): Promise<{ server: Socket<undefined>; client: Socket<undefined>; close(): void }> {
  const path = join(dir, `pair-${Math.random().toString(36).slice(2)}.sock`);
  let accepted!: (s: Socket<undefined>) => void;
  const got = new Promise<Socket<undefined>>((r) => (accepted = r));
  const listener = Bun.listen<undefined>({ unix: path, socket: { open: (s) => accepted(s), data() {} } });
  const client = await Bun.connect<undefined>({ unix: path, socket: { data() {} } });
  const server = await got;
  return {
    server,
    client,
    close() {
      client.end();
      server.end();
      listener.stop(true);
    },
  };
}

/** /proc/stat's first line with the given idle and iowait ticks. */
const procStat = (idle: number, iowait = 0) => `cpu  100 0 50 ${idle} ${iowait} 0 3 0 0 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n`;

describe("spinUntilReadable", () => {
  test("true at once when a request is waiting; false after the budget when none comes; true on hang-up", async () => {
    const p = await socketPair();
    try {
      const fd = (p.server as unknown as { fd: number }).fd;
      expect(fd).toBeGreaterThan(2);
      let t0 = performance.now();
      expect(spinUntilReadable(fd, 2)).toBe(false);
      expect(performance.now() - t0).toBeGreaterThanOrEqual(2);
      p.client.write(new Uint8Array([1, 2, 3]));
      t0 = performance.now();
      expect(spinUntilReadable(fd, 1000)).toBe(true);
      expect(performance.now() - t0).toBeLessThan(1000);
      p.client.end();
      await Bun.sleep(20);
      expect(spinUntilReadable(fd, 1000)).toBe(true);
    } finally {
      p.close();
    }
  });

  test("an fd that is not open returns at once instead of spending the budget", () => {
    const t0 = performance.now();
    expect(spinUntilReadable(987_654, 1000)).toBe(true);
    expect(performance.now() - t0).toBeLessThan(1000);
  });
});

describe("idleTicksOf", () => {
  test("idle plus iowait of the all-CPU line; malformed text is null", () => {
    expect(idleTicksOf(procStat(400, 25))).toBe(425);
    expect(idleTicksOf("cpu0 1 2 3 4 5\n")).toBeNull();
    expect(idleTicksOf("cpu 1 2 3\n")).toBeNull();
    expect(idleTicksOf("cpu 1 2 3 x 5\n")).toBeNull();
    expect(idleTicksOf("cpu 1 2 3 -4 5\n")).toBeNull();
    expect(idleTicksOf("")).toBeNull();
  });
});

/** A BusyPoll on a fake clock and /proc/stat; `spin` takes `spin_ms` of fake time and reports `ready`. */
function fakePoll(o: { spare_cpus_min?: number; stat: () => string | null; ready?: () => boolean; spin_ms?: number }) {
  const clock = { ms: 1000 };
  const spun: number[] = [];
  const bp = new BusyPoll({
    budget_us: 50,
    spare_cpus_min: o.spare_cpus_min,
    read_proc_stat: o.stat,
    now_ms: () => clock.ms,
    spin: (fd, budget_ms) => {
      spun.push(fd);
      expect(budget_ms).toBe(0.05);
      clock.ms += o.spin_ms ?? 0.01;
      return o.ready ? o.ready() : true;
    },
  });
  return { bp, clock, spun };
}

describe("BusyPoll: the spare-CPU gate", () => {
  test("no spin before the first full window; spins while a CPU is idle; stops when the CPUs are busy", () => {
    let idle = 0;
    const { bp, clock, spun } = fakePoll({ stat: () => procStat(idle) });
    expect(bp.spin(7)).toBe(false); // first sample: no window yet
    clock.ms += 200;
    idle += 30; // 0.3 s idle over 0.2 s: 1.5 CPUs
    expect(bp.spin(7)).toBe(true);
    expect(bp.spin(7)).toBe(true); // same window: no new sample
    clock.ms += 200;
    idle += 10; // 0.5 CPUs idle
    expect(bp.spin(7)).toBe(false);
    expect(spun).toEqual([7, 7]);
    expect(bp.stats.spins).toBe(2);
    expect(bp.stats.hits).toBe(2);
    expect(bp.stats.spin_ms).toBeCloseTo(0.02, 6);
  });

  test("the poller's own spinning counts as idle (it would be, without the spin)", () => {
    let idle = 0;
    const { bp, clock } = fakePoll({ stat: () => procStat(idle), spin_ms: 100 });
    bp.spin(3);
    clock.ms += 200;
    idle += 40; // 2 CPUs idle
    expect(bp.spin(3)).toBe(true); // takes 100 ms of the clock
    clock.ms += 100;
    idle += 10; // 0.2 s window: 0.1 s idle + 0.1 s of our spin = 1 CPU
    expect(bp.spin(3)).toBe(true);
  });

  test("an unreadable or malformed /proc/stat never spins", () => {
    for (const stat of [() => null, () => "garbage\n"]) {
      const { bp, clock, spun } = fakePoll({ stat });
      for (let i = 0; i < 5; i++) {
        expect(bp.spin(3)).toBe(false);
        clock.ms += 250;
      }
      expect(spun).toEqual([]);
    }
  });

  test("a budget of 0 is off; budgets outside 0..max are refused", () => {
    expect(new BusyPoll({ budget_us: 0 }).enabled).toBe(false);
    expect(new BusyPoll({ budget_us: BUSY_POLL_BUDGET_MAX_US }).enabled).toBe(true);
    expect(() => new BusyPoll({ budget_us: BUSY_POLL_BUDGET_MAX_US + 1 })).toThrow(/out of range/);
    expect(() => new BusyPoll({ budget_us: -1 })).toThrow(/out of range/);
    expect(() => new BusyPoll({ budget_us: 1.5 })).toThrow(/out of range/);
  });
});

describe("ClientPace", () => {
  test("spins only for a client whose last request came within the budget; a miss stops it until the client is quick again", () => {
    let ready = true;
    const { bp, clock, spun } = fakePoll({ spare_cpus_min: 0, stat: () => procStat(0), ready: () => ready });
    bp.spin(-5); // take the first sample
    spun.length = 0;
    clock.ms += 300;
    const pace = new ClientPace(bp);
    pace.onIdle(9); // pace unknown yet: no spin
    expect(spun).toEqual([]);
    clock.ms += 0.02;
    pace.onData(); // came 20 µs after the reply: quick
    pace.onIdle(9);
    expect(spun).toEqual([9]);
    pace.onData();
    ready = false;
    pace.onIdle(9); // spins, nothing comes
    expect(spun).toEqual([9, 9]);
    clock.ms += 5;
    pace.onData(); // 5 ms later: slow
    pace.onIdle(9);
    expect(spun).toEqual([9, 9]);
    clock.ms += 0.01;
    pace.onData(); // quick again
    pace.onIdle(undefined); // no fd: nothing to poll
    expect(spun).toEqual([9, 9]);
  });
});

const have_nbdsh = Bun.which("nbdsh", { PATH: `/usr/bin:/bin:${process.env.PATH ?? ""}` }) !== null;

describe("a real client at queue depth 1", () => {
  (have_nbdsh ? test : test.skip)(
    "nbdsh reads back what it wrote while the server busy-polls; a second connection stops the spinning",
    async () => {
      let open = 0;
      const t = await startTestServer({
        server: { busy_poll: { budget_us: BUSY_POLL_BUDGET_MAX_US, spare_cpus_min: 0 }, on_connections: (n) => (open = n) },
      });
      try {
        const script = join(dir, "qd1.py");
        writeFileSync(
          script,
          `
import sys, time
i = 0
end = time.monotonic() + 1.5
while time.monotonic() < end or i < 2000:
    block = bytes([i & 255]) * 4096
    h.pwrite(block, (i % 64) * 4096)
    assert h.pread(4096, (i % 64) * 4096) == block, i
    i += 1
sys.stdin.readline()
for i in range(200):
    assert len(h.pread(4096, 0)) == 4096
print("OK")
`,
        );
        const env = { ...process.env, PATH: `/usr/bin:/bin:${process.env.PATH ?? ""}`, LIBNBD_DEBUG: "0" };
        const uri = `nbd+unix:///pc?socket=${t.sock_path}`;
        const a = Bun.spawn(["nbdsh", "-u", uri, "-c", `exec(open(${JSON.stringify(script)}).read())`], { env, stdin: "pipe", stdout: "pipe", stderr: "pipe" });
        // The first phase (1.5 s of write-read pairs) is over when the counters stop moving. The gate's first
        // 200 ms window never spins, so not every request is counted.
        let last = -1;
        for (let i = 0; i < 300 && (t.server.busy_poll_stats.spins === 0 || t.server.busy_poll_stats.spins !== last); i++) {
          last = t.server.busy_poll_stats.spins;
          await Bun.sleep(200);
        }
        const first = { ...t.server.busy_poll_stats };
        expect(first.spins).toBeGreaterThanOrEqual(1000);
        expect(first.hits).toBeGreaterThan(first.spins / 2);
        // A second connection, idle: while it is open the first must not spin (it would hold up the second).
        const b = Bun.spawn(["nbdsh", "-u", uri, "-c", "import sys; sys.stdin.readline()"], { env, stdin: "pipe", stdout: "pipe", stderr: "pipe" });
        for (let i = 0; i < 200 && open < 2; i++) await Bun.sleep(25);
        expect(open).toBe(2);
        const before = t.server.busy_poll_stats.spins;
        a.stdin.write("go\n");
        a.stdin.end();
        expect(await a.exited).toBe(0);
        expect(await new Response(a.stdout).text()).toContain("OK");
        expect(t.server.busy_poll_stats.spins).toBe(before);
        b.stdin.end();
        expect(await b.exited).toBe(0);
      } finally {
        await t.stop();
      }
    },
    60_000,
  );
});
