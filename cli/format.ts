import { defineCommand } from "citty";
import { openCacheDevice } from "../core/device/cache_device.ts";
import { CACHE_DEV_SIZE_MIN, GC_PERCENT_DEFAULT, GC_PERCENT_MAX, GC_PERCENT_MIN } from "../core/format/constants.ts";
import { formatCache } from "../core/format/format_cache.ts";
import { inspectSuperblockArea } from "../core/format/superblock.ts";
import { fail, parseIntInRange, parseSize, runCommand } from "./run.ts";

export const formatCommand = defineCommand({
  meta: {
    name: "format",
    description: "Format a cache device (what dm-pcache writes on first start).\nExample: pcache format --cache /dev/shm/cache.img --size 1G",
  },
  args: {
    cache: { type: "string", description: "cache device or file", required: true },
    size: { type: "string", description: "create or extend a regular file to this size (sparse), e.g. 1G" },
    "data-crc": { type: "boolean", description: "store a CRC of every cached extent", default: false },
    "gc-percent": { type: "string", description: `GC threshold in percent of segments used, ${GC_PERCENT_MIN}..${GC_PERCENT_MAX} (default ${GC_PERCENT_DEFAULT})` },
    force: { type: "boolean", description: "overwrite an existing pcache or other data at the superblock", default: false },
  },
  run: ({ args }) =>
    runCommand(() => {
      const gc_percent = args["gc-percent"] === undefined ? GC_PERCENT_DEFAULT : parseIntInRange(args["gc-percent"], "--gc-percent", GC_PERCENT_MIN, GC_PERCENT_MAX);
      const size = args.size === undefined ? undefined : parseSize(args.size, "--size");
      if (size !== undefined && size < CACHE_DEV_SIZE_MIN) fail(`--size ${args.size} is below the 512 MiB minimum of a cache device`);
      const dev = openCacheDevice(args.cache, { create_size_bytes: size });
      try {
        if (dev.size_bytes < CACHE_DEV_SIZE_MIN) {
          fail(`cache device ${args.cache} has ${dev.size_bytes} bytes; a cache device needs at least 512 MiB (use --size for a file)`);
        }
        const area = inspectSuperblockArea(dev.domain);
        if (area !== "blank" && !args.force) {
          fail(`cache device ${args.cache} already holds ${area === "pcache" ? "a pcache" : "data at the superblock"}; use --force to overwrite it`);
        }
        const meta = formatCache(dev.domain, { data_crc: args["data-crc"], gc_percent });
        process.stdout.write(`formatted ${args.cache}: ${meta.n_segs} segments of 16 MiB, gc_percent ${meta.gc_percent}, data_crc ${meta.data_crc ? "on" : "off"}\n`);
      } finally {
        dev.close();
      }
    }),
});
