/**
 * `pcache dump-ksets` prints a log built through the format module exactly: several ksets in one
 * segment, a LAST kset rolling into another segment, and one key made stale by a generation bump.
 */
import { afterAll, expect, test } from "bun:test";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { openCacheDevice } from "../core/device/cache_device.ts";
import { KEY_F_CLEAN } from "../core/format/constants.ts";
import { formatCache } from "../core/format/format_cache.ts";
import { LogBuilder } from "../core/format/log_builder.ts";

const BIN = join(import.meta.dir, "..", "dist", "pcache");
const dir = mkdtempSync(join(tmpdir(), "pcache-dump-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

test("dump-ksets prints a built log exactly", () => {
  const path = join(dir, "log.img");
  const dev = openCacheDevice(path, { create_size_bytes: 512 * 1024 * 1024 });
  try {
    const meta = formatCache(dev.domain, { data_crc: false });
    const b = new LogBuilder(dev.domain, meta);
    b.appendKset([
      { off: 0, len: 4096, cache_seg_id: 1, cache_seg_off: 0 },
      { off: 8192, len: 512, cache_seg_id: 1, cache_seg_off: 4096, flags: KEY_F_CLEAN },
    ]);
    b.appendKset([{ off: 1048576, len: 8192, cache_seg_id: 2, cache_seg_off: 0 }]);
    b.appendLast(3);
    b.appendKset([{ off: 4194304, len: 100, cache_seg_id: 1, cache_seg_off: 4608 }]);
    b.bumpGen(2); // the key in segment 2 becomes stale
  } finally {
    dev.close();
  }
  const r = Bun.spawnSync([BIN, "dump-ksets", "--cache", path]);
  expect(r.stderr.toString()).toBe("");
  expect(r.exitCode).toBe(0);
  expect(r.stdout.toString()).toBe(
    [
      "log from key-tail 0:0",
      "kset 0:0 size 104 keys 2",
      "  key off 0 len 4096 dirty at 1:0 gen 0 live crc not stored",
      "  key off 8192 len 512 CLEAN at 1:4096 gen 0 live crc not stored",
      "kset 0:104 size 64 keys 1",
      "  key off 1048576 len 8192 dirty at 2:0 gen 0 stale crc not stored",
      "kset 0:168 LAST size 24 -> next segment 3",
      "kset 3:0 size 64 keys 1",
      "  key off 4194304 len 100 dirty at 1:4608 gen 0 live crc not stored",
      "log ends at 3:64: zero kset header at 3:64: end of the log",
      "4 ksets, 4 keys (1 stale)",
      "",
    ].join("\n"),
  );
});
