/**
 * A short burst of the NBD fuzzer (test/reliability/nbd_fuzz.ts): ~20 000 frames against an
 * in-process server over the engine, ~2 000 against dist/pcache, and proof that the fuzzer's
 * checks fire on a server that misbehaves. The long run is `bun scripts/nbd_fuzz.ts`.
 * PCACHE_FUZZ_SEED picks another seed; PCACHE_FUZZ_FRAMES changes the in-process burst.
 */
import { afterAll, describe, expect, test } from "bun:test";
import { existsSync, mkdtempSync, rmSync, truncateSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { MemoryExport } from "../core/nbd/memory_export.ts";
import { startTestServer, type TestServer } from "./helpers/nbd_raw.ts";
import { runNbdFuzz } from "./reliability/nbd_fuzz.ts";
import { PcacheProcess } from "./reliability/server_process.ts";

const SEED = Number(process.env.PCACHE_FUZZ_SEED ?? 20260601);
const FRAMES = Number(process.env.PCACHE_FUZZ_FRAMES ?? 20_000);
const BIN = join(import.meta.dir, "..", "dist", "pcache");
const MiB = 1024 * 1024;
const servers: TestServer[] = [];

afterAll(async () => {
  for (const s of servers) await s.stop();
});

describe("NBD fuzzer, short burst", () => {
  test(
    `${FRAMES} frames against the in-process engine export: checked answers, canary, reserved region, bounded memory`,
    async () => {
      const r = await runNbdFuzz({ seed: SEED, frames: FRAMES, target: "in-process" });
      expect(r.failures).toEqual([]);
      // Truncated transcripts leave a few generated frames unsent.
      expect(r.frames).toBeGreaterThan(FRAMES * 0.9);
      expect(r.connections).toBeGreaterThan(FRAMES / 100);
    },
    120_000,
  );

  test(
    "2 000 frames against dist/pcache serve: it stays up, answers the canary, and SIGTERM exits 0",
    async () => {
      if (!existsSync(BIN)) throw new Error(`${BIN} is missing: run "bun scripts/build.ts" first`);
      const dir = mkdtempSync(join(existsSync("/dev/shm") ? "/dev/shm" : tmpdir(), "pcache-fuzz-test-"));
      const p = new PcacheProcess({ binary: BIN, cache: join(dir, "cache.img"), backing: join(dir, "backing.img"), socket: join(dir, "nbd.sock") });
      try {
        writeFileSync(p.o.backing, new Uint8Array(0));
        truncateSync(p.o.backing, 64 * MiB);
        expect(await p.format(70)).toBeNull();
        expect(await p.start()).toBeNull();
        const r = await runNbdFuzz({ seed: SEED + 1, frames: 2000, target: { socket_path: p.o.socket, pid: p.pid! }, burst_frames: 500 });
        expect(r.failures).toEqual([]);
        expect(r.frames).toBeGreaterThan(1500);
        expect(p.alive()).toBe(true);
        expect(await p.stopGracefully()).toBe(0);
      } finally {
        await p.stopHard();
        rmSync(dir, { recursive: true, force: true });
      }
    },
    120_000,
  );
});

describe("the fuzzer's checks fire", () => {
  test(
    "a server that fails a valid request with EIO is reported with the seed and the frame",
    async () => {
      const s = await startTestServer({ memory: { size_bytes: 64 * MiB, fail: (op) => (op === "cache" ? 5 : undefined) } });
      servers.push(s);
      const r = await runNbdFuzz({ seed: SEED, frames: 1500, target: { socket_path: s.sock_path, pid: process.pid } });
      expect(r.failures.length).toBe(1);
      expect(r.failures[0]).toMatch(new RegExp(`^nbd fuzz seed ${SEED}, frame \\d+\\.\\.\\d+, connection \\d+ .*frame \\d+ \\(CACHE\\): failed with error 5, expected success`));
    },
    60_000,
  );

  test(
    "a TRIM that also writes the end of the export is caught by the reserved region",
    async () => {
      let exp: MemoryExport | null = null;
      const junk = new Uint8Array(16).fill(0xee);
      const s = await startTestServer({
        memory: {
          size_bytes: 64 * MiB,
          gate: async (op) => {
            if (op === "trim" && exp) await exp.write(64 * MiB - 64, junk, false);
          },
        },
      });
      servers.push(s);
      exp = s.exp;
      const r = await runNbdFuzz({ seed: SEED, frames: 1500, target: { socket_path: s.sock_path, pid: process.pid } });
      expect(r.failures.length).toBe(1);
      expect(r.failures[0]).toMatch(/^nbd fuzz seed \d+, frame \d+ \(final check\): canary I\/O failed: reserved region changed at byte 67108800/);
    },
    60_000,
  );

  test(
    "a server process that is gone is reported",
    async () => {
      const s = await startTestServer({ memory: { size_bytes: 64 * MiB } });
      servers.push(s);
      const gone = Bun.spawn(["true"]);
      await gone.exited;
      const r = await runNbdFuzz({ seed: SEED, frames: 600, target: { socket_path: s.sock_path, pid: gone.pid } });
      expect(r.failures.length).toBe(1);
      expect(r.failures[0]).toMatch(new RegExp(`^nbd fuzz seed ${SEED}, frame \\d+ \\(after frame \\d+\\): server process ${gone.pid} is gone`));
    },
    60_000,
  );
});
