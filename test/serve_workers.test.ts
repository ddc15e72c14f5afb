/**
 * `pcache serve` as threads: request workers sharing one listening socket, writeback and GC
 * workers, and the supervisor that stops the server when any of them dies. Driven through the
 * compiled binary with nbdsh (libnbd), the way a user runs it.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const BIN = join(import.meta.dir, "..", "dist", "pcache");
const ENV = { ...process.env, NO_COLOR: "1", PATH: `/usr/bin:${process.env.PATH ?? ""}` };
const HAVE_NBDSH = Bun.spawnSync(["sh", "-c", "PATH=/usr/bin:$PATH nbdsh --version"]).exitCode === 0;
const dir = mkdtempSync(join(existsSync("/dev/shm") ? "/dev/shm" : tmpdir(), "pcache-workers-"));
const children: Bun.Subprocess[] = [];
let n_dirs = 0;

beforeAll(() => {
  if (!existsSync(BIN)) throw new Error(`${BIN} is missing: run "bun scripts/build.ts" first`);
});

afterAll(() => {
  for (const c of children) c.kill(9);
  rmSync(dir, { recursive: true, force: true });
});

/** A formatted 512 MiB cache and a 64 MiB backing file in a fresh folder. */
function devices(): { cache: string; backing: string; sock: string } {
  const d = join(dir, `d${n_dirs++}`);
  Bun.spawnSync(["mkdir", "-p", d]);
  const cache = join(d, "cache.img");
  const backing = join(d, "backing.img");
  expect(Bun.spawnSync([BIN, "format", "--cache", cache, "--size", "512M"]).exitCode).toBe(0);
  Bun.spawnSync(["truncate", "-s", "64M", backing]);
  return { cache, backing, sock: join(d, "nbd.sock") };
}

interface Server {
  proc: Bun.Subprocess<"ignore", "pipe", "pipe">;
  uri: string;
  stderr: () => Promise<string>;
}

async function serve(dev: { cache: string; backing: string; sock: string }, extra: string[] = [], env: Record<string, string> = {}): Promise<Server> {
  const proc = Bun.spawn([BIN, "serve", "--cache", dev.cache, "--backing", dev.backing, "--nbd", `unix:${dev.sock}`, ...extra], {
    stdin: "ignore",
    stdout: "pipe",
    stderr: "pipe",
    env: { ...ENV, ...env },
  });
  children.push(proc);
  const reader = proc.stdout.getReader();
  let out = "";
  const deadline = Date.now() + 20_000;
  while (!out.includes("\n") && Date.now() < deadline) {
    const { value, done } = await reader.read();
    if (done) break;
    out += new TextDecoder().decode(value);
  }
  reader.releaseLock();
  const m = /^listening: (\S+)/m.exec(out);
  if (!m) throw new Error(`serve did not start: ${out}${await new Response(proc.stderr).text()}`);
  return { proc, uri: m[1], stderr: () => new Response(proc.stderr).text() };
}

function nbdsh(script: string): { code: number; out: string; err: string } {
  const r = Bun.spawnSync(["nbdsh", "-c", script], { env: ENV, timeout: 60_000 });
  return { code: r.exitCode ?? -1, out: r.stdout.toString(), err: r.stderr.toString() };
}

describe("serve with worker threads", () => {
  test.if(HAVE_NBDSH)(
    "a FLUSH on one connection makes every connection's completed writes durable (multi-conn over workers), then SIGKILL",
    async () => {
      const dev = devices();
      const s = await serve(dev, ["--workers", "3"]);
      // 12 connections land on the 3 workers; each writes its own 1 MiB; only connection 0 flushes.
      const w = nbdsh(`
import nbd
hs = []
for i in range(12):
    h = nbd.NBD()
    h.connect_uri("${s.uri}")
    hs.append(h)
assert hs[0].can_multi_conn()
for i, h in enumerate(hs):
    h.pwrite(bytes([i + 1]) * (1 << 20), i << 20)
hs[0].flush()
print("flushed")
`);
      expect(w.err).toBe("");
      expect(w.out).toContain("flushed");
      s.proc.kill(9);
      await s.proc.exited;
      const s2 = await serve(dev, ["--workers", "2"]);
      const r = nbdsh(`
h = nbd.NBD()
h.connect_uri("${s2.uri}")
for i in range(12):
    assert h.pread(1 << 20, i << 20) == bytes([i + 1]) * (1 << 20), i
print("intact")
`);
      expect(r.err).toBe("");
      expect(r.out).toContain("intact");
      s2.proc.kill("SIGTERM");
      expect(await s2.proc.exited).toBe(0);
    },
    60_000,
  );

  for (const name of ["gc", "writeback", "request worker 2"]) {
    test(`when the "${name}" thread dies the server stops with a message naming it (exit 70)`, async () => {
      const dev = devices();
      const s = await serve(dev, ["--workers", "2"], { PCACHE_TEST_WORKER_FAULT: name });
      const code = await s.proc.exited;
      const err = await s.stderr();
      expect(code).toBe(70);
      expect(err).toContain(`${name} failed: injected fault`);
      expect(err).toContain("stopping the server");
      expect(err).not.toMatch(/\n\s+at /); // no stack trace at the default level
    }, 30_000);
  }

  test.if(HAVE_NBDSH)(
    "stdin mode and socket activation run the same workers",
    () => {
      const dev = devices();
      const argv = JSON.stringify([BIN, "serve", "--cache", dev.cache, "--backing", dev.backing, "--log-level", "error"]);
      const body = `
h.pwrite(b"q" * 65536, 4096, nbd.CMD_FLAG_FUA)
assert h.pread(65536, 4096) == b"q" * 65536
print(h.get_size())
h.shutdown()
`;
      const a = nbdsh(`h.connect_command(${argv.replace("]", ', "--stdin"]')})\n${body}`);
      expect(a.err).toBe("");
      expect(a.out.trim()).toBe(String(64 * 1024 * 1024));
      const b = nbdsh(`h.connect_systemd_socket_activation(${argv})\n${body}\nh2 = nbd.NBD()`);
      expect(b.err).toBe("");
      expect(b.out).toContain(String(64 * 1024 * 1024));
    },
    60_000,
  );

  test.if(HAVE_NBDSH)(
    "SIGTERM while writeback and GC are busy closes every kset and exits 0 (regression: a running worker's lock was taken for a failed worker's)",
    async () => {
      const dev = devices();
      for (let round = 0; round < 8; round++) {
        const s = await serve(dev);
        // 48 MiB of 64 KiB writes: writeback and GC are mid-step when the signal arrives.
        const w = nbdsh(`
import nbd
h = nbd.NBD()
h.connect_uri(${JSON.stringify(s.uri)})
for i in range(768):
    h.pwrite(bytes([${round} + 1]) * 65536, (i * 65536) % (64 << 20))
h.shutdown()
`);
        expect(w.err).toBe("");
        const t0 = performance.now();
        s.proc.kill("SIGTERM");
        const stopped = await Promise.race([s.proc.exited, Bun.sleep(20_000).then(() => "hung")]);
        const err = await s.stderr();
        expect({ round, stopped }).toEqual({ round, stopped: 0 });
        expect(err).not.toContain("lock is still held");
        expect(err).toContain("stopped; every kset is closed");
        expect(performance.now() - t0).toBeLessThan(20_000);
      }
      // Everything written (without a FLUSH) was in closed ksets at shutdown: it is all there.
      const s = await serve(dev);
      const r = nbdsh(`
import nbd
h = nbd.NBD()
h.connect_uri(${JSON.stringify(s.uri)})
for i in range(48):
    assert h.pread(1 << 20, i << 20) == bytes([8]) * (1 << 20), i
h.shutdown()
`);
      s.proc.kill("SIGKILL");
      expect(r.err).toBe("");
    },
    180_000,
  );

  test("--workers, --max-connections and --busy-poll-us are validated", () => {
    const dev = devices();
    for (const [flag, value, want] of [
      ["--workers", "0", /--workers: 0 is out of range \(allowed: 1\.\.64\)/],
      ["--workers", "two", /--workers: "two" is not a whole number/],
      ["--max-connections", "0", /--max-connections: 0 is out of range/],
      ["--busy-poll-us", "1001", /--busy-poll-us: 1001 is out of range \(allowed: 0\.\.1000\)/],
      ["--busy-poll-us", "fast", /--busy-poll-us: "fast" is not a whole number/],
    ] as const) {
      const r = Bun.spawnSync([BIN, "serve", "--cache", dev.cache, "--backing", dev.backing, "--nbd", `unix:${dev.sock}`, flag, value], { env: ENV, timeout: 10_000 });
      expect(r.exitCode).not.toBe(0);
      expect(r.stderr.toString()).toMatch(want);
    }
  });
});
