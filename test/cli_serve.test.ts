/**
 * The compiled binary, driven the way a user drives it: format / info / dump-ksets refusals and
 * output, and `serve` with real NBD clients (qemu-io, nbdinfo), SIGKILL and restart, SIGTERM.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { PCACHE_BIN as BIN, have, killAll, requireBinary, startServe, tempDir } from "./helpers/serve_binary.ts";

const dir = tempDir("pcache-cli-");

function run(...args: string[]) {
  const r = Bun.spawnSync([BIN, ...args], { env: { ...process.env, NO_COLOR: "1" } });
  return { code: r.exitCode, out: r.stdout.toString(), err: r.stderr.toString() };
}

beforeAll(requireBinary);

afterAll(async () => {
  await killAll();
  rmSync(dir, { recursive: true, force: true });
});

describe("format / info / dump-ksets", () => {
  test("a fresh 1 GiB cache: seg_num 63, n_segs 63, gc_percent 70, tails 0:0, empty log", () => {
    const cache = join(dir, "a.img");
    const f = run("format", "--cache", cache, "--size", "1G");
    expect(f.code).toBe(0);
    const info = run("info", "--cache", cache, "--json");
    expect(info.code).toBe(0);
    const j = JSON.parse(info.out);
    expect(j.superblock.seg_num).toBe(63);
    expect(j.cache_info.n_segs).toBe(63);
    expect(j.cache_info.gc_percent).toBe(70);
    expect(j.key_tail).toBe("0:0");
    expect(j.dirty_tail).toBe("0:0");
    expect(j.key_head).toBe("0:0");
    const d = run("dump-ksets", "--cache", cache);
    expect(d.code).toBe(0);
    expect(d.out).toContain("0 ksets, 0 keys");
  });

  test("refusals are one line with a non-zero exit", () => {
    const cache = join(dir, "b.img");
    expect(run("format", "--cache", cache, "--size", "100M").err).toMatch(/512 MiB/);
    const bad_gc = run("format", "--cache", cache, "--size", "1G", "--gc-percent", "91");
    expect(bad_gc.code).toBe(1);
    expect(bad_gc.err).toMatch(/--gc-percent: 91 is out of range/);
    expect(run("format", "--cache", cache, "--size", "1G").code).toBe(0);
    const again = run("format", "--cache", cache);
    expect(again.code).toBe(1);
    expect(again.err).toMatch(/already holds a pcache; use --force/);
    expect(run("format", "--cache", cache, "--force").code).toBe(0);
    const junk = join(dir, "junk.img");
    writeFileSync(junk, new Uint8Array(1024 * 1024).fill(0x5a));
    Bun.spawnSync(["truncate", "-s", "600M", junk]);
    const foreign = run("format", "--cache", junk);
    expect(foreign.code).toBe(1);
    const info = run("info", "--cache", junk);
    expect(info.code).toBe(2);
    expect(info.err.trim().split("\n").length).toBe(1);
    expect(info.err).toMatch(/superblock/);
  });
});

function qemuIo(uri: string, ...cmds: string[]) {
  const args = ["qemu-io", "-f", "raw"];
  for (const c of cmds) args.push("-c", c);
  args.push(uri);
  const r = Bun.spawnSync(args);
  return { code: r.exitCode, out: r.stdout.toString() + r.stderr.toString() };
}

describe.skipIf(!have("qemu-io") || !have("nbdinfo"))("serve with real clients", () => {
  test("qemu-io patterns, nbdinfo, SIGKILL + restart keeps flushed data, SIGTERM exits 0", async () => {
    const cache = join(dir, "s.img");
    const backing = join(dir, "s-backing.img");
    const sock = join(dir, "s.sock");
    expect(run("format", "--cache", cache, "--size", "1G").code).toBe(0);
    Bun.spawnSync(["truncate", "-s", "256M", backing]);
    let p = await startServe({ cache, backing, dir, socket_name: "s.sock" });
    const uri = p.uri;
    expect(uri).toBe(`nbd+unix:///pcache?socket=${sock}`);

    const info = Bun.spawnSync(["nbdinfo", "--json", uri]);
    expect(info.exitCode).toBe(0);
    const j = JSON.parse(info.stdout.toString());
    expect(j.exports[0]["export-size"]).toBe(256 * 1024 * 1024);
    expect(j.exports[0]["can_flush"]).toBe(true);
    expect(j.exports[0]["can_multi_conn"]).toBe(true);

    const w = qemuIo(uri, "write -P 0xab 1000 70k", "write -P 0xcd 5M 3M", "write -z 2000 1000", "flush", "write -P 0xee 100M 4k");
    expect(w.code).toBe(0);
    expect(qemuIo(uri, "read -P 0xab 3000 60k", "read -P 0 2000 1000", "read -P 0xcd 5M 3M").out).not.toMatch(/Pattern verification failed/);

    expect(await p.stop("SIGKILL")).toBeNull();
    p = await startServe({ cache, backing, dir, socket_name: "s.sock" });
    expect(p.uri).toBe(uri);
    const r = qemuIo(uri, "read -P 0xab 3000 60k", "read -P 0 2000 1000", "read -P 0xcd 5M 3M");
    expect(r.code).toBe(0);
    expect(r.out).not.toMatch(/Pattern verification failed/);

    expect(await p.stop("SIGTERM")).toBe(0);
    const after = run("dump-ksets", "--cache", cache);
    expect(after.code).toBe(0);
    expect(after.out).toMatch(/ksets, \d+ keys/);
  }, 60_000);
});
