import { defineCommand } from "citty";
import { openCacheDevice } from "../core/device/cache_device.ts";
import { CACHE_MODE_NAMES } from "../core/format/cache_info.ts";
import { loadCache } from "../core/format/load_cache.ts";
import { posToString } from "../core/log/position.ts";
import { walkLog } from "../core/log/walk.ts";
import { describeNative, native } from "../ffi/native.ts";
import { runCommand } from "./run.ts";

export const infoCommand = defineCommand({
  meta: {
    name: "info",
    description: "Show a cache device's superblock, cache_info, log positions and usage (never writes).\nExample: pcache info --cache /dev/shm/cache.img --json",
  },
  args: {
    cache: { type: "string", description: "cache device or file", required: true },
    json: { type: "boolean", description: "one JSON document", default: false },
  },
  run: ({ args }) =>
    runCommand(() => {
      // Read-only and unlocked, so it also works on a device a running server holds.
      const dev = openCacheDevice(args.cache, { readOnly: true });
      try {
        const meta = loadCache(dev.domain);
        const used = new Set<number>();
        const walk = walkLog(dev.domain, meta, meta.key_tail, {}, (k) => {
          used.add(k.pos.cache_seg_id);
          if (k.last && k.next_cache_seg_id !== undefined) used.add(k.next_cache_seg_id);
          for (const key of k.keys) if (!key.stale) used.add(key.cache_seg_id);
          return true;
        });
        used.add(walk.end_pos.cache_seg_id);
        const report = {
          device: args.cache,
          size_bytes: dev.size_bytes,
          superblock: { flags: meta.sb.flags, magic: "0x65b05efa96c596ef", seg_num: meta.sb.seg_num },
          cache_info: {
            seg_id: meta.cache_info.value.seg_id,
            n_segs: meta.n_segs,
            flags: meta.cache_info.value.flags,
            cache_mode: CACHE_MODE_NAMES[meta.cache_mode] ?? String(meta.cache_mode),
            data_crc: meta.data_crc,
            gc_percent: meta.gc_percent,
            init_done: true,
          },
          key_tail: posToString(meta.key_tail),
          dirty_tail: posToString(meta.dirty_tail),
          key_head: posToString(walk.end_pos),
          log_end: walk.end_reason,
          ksets: walk.ksets,
          keys: walk.keys,
          segments_in_use: used.size,
          persistence_domain: dev.domain.describe(),
          native_helpers: describeNative(),
          native_available: native.available,
          note: "positions may be moving if a server is running on this device",
        };
        if (args.json) {
          process.stdout.write(`${JSON.stringify(report, null, 2)}\n`);
          return;
        }
        const lines = [
          `device            ${report.device} (${report.size_bytes} bytes)`,
          `superblock        flags 0x${meta.sb.flags.toString(16)}, magic ${report.superblock.magic}, seg_num ${meta.sb.seg_num}`,
          `cache_info        mode ${report.cache_info.cache_mode}, data_crc ${meta.data_crc ? "on" : "off"}, gc_percent ${meta.gc_percent}, INIT_DONE, n_segs ${meta.n_segs}, first segment ${report.cache_info.seg_id}`,
          `key_tail          ${report.key_tail}`,
          `dirty_tail        ${report.dirty_tail}`,
          `key_head          ${report.key_head} (${walk.end_reason})`,
          `log               ${walk.ksets} ksets, ${walk.keys} keys`,
          `segments in use   ${used.size} of ${meta.n_segs}`,
          `persistence       ${report.persistence_domain}`,
          `native            ${report.native_helpers}`,
        ];
        process.stdout.write(`${lines.join("\n")}\n`);
      } finally {
        dev.close();
      }
    }),
});
