import { defineCommand } from "citty";
import { openCacheDevice } from "../core/device/cache_device.ts";
import { KEY_F_CLEAN } from "../core/format/constants.ts";
import { loadCache } from "../core/format/load_cache.ts";
import { posToString } from "../core/log/position.ts";
import { walkLog, type WalkedKset } from "../core/log/walk.ts";
import { fail, parseIntInRange, runCommand } from "./run.ts";

export const dumpKsetsCommand = defineCommand({
  meta: {
    name: "dump-ksets",
    description: "Walk the key log the way replay does and print every kset and key (never writes).\nExample: pcache dump-ksets --cache /dev/shm/cache.img --from dirty-tail --limit 20",
  },
  args: {
    cache: { type: "string", description: "cache device or file", required: true },
    from: { type: "string", description: "where to start: key-tail or dirty-tail", default: "key-tail" },
    limit: { type: "string", description: "print at most this many ksets" },
    json: { type: "boolean", description: "one JSON document", default: false },
    "verify-data": { type: "boolean", description: "check the data CRC of every live key (caches formatted with --data-crc)", default: false },
  },
  run: ({ args }) =>
    runCommand(() => {
      if (args.from !== "key-tail" && args.from !== "dirty-tail") fail(`--from must be key-tail or dirty-tail, not "${args.from}"`);
      const limit = args.limit === undefined ? undefined : parseIntInRange(args.limit, "--limit", 1, 1_000_000_000);
      const dev = openCacheDevice(args.cache, { readOnly: true });
      try {
        const meta = loadCache(dev.domain);
        const start = args.from === "key-tail" ? meta.key_tail : meta.dirty_tail;
        const ksets: WalkedKset[] = [];
        const lines: string[] = [`log from ${args.from} ${posToString(start)}`];
        const walk = walkLog(dev.domain, meta, start, { verify_data_crc: args["verify-data"], limit }, (k) => {
          if (args.json) ksets.push(k);
          else lines.push(...describeKset(k, meta.data_crc, args["verify-data"]));
          return true;
        });
        const end = `log ends at ${posToString(walk.end_pos)}: ${walk.end_reason}`;
        if (args.json) {
          const doc = { from: args.from, start: posToString(start), ksets: ksets.map((k) => ({ ...k, pos: posToString(k.pos) })), end_pos: posToString(walk.end_pos), end_reason: walk.end_reason, keys: walk.keys, stale_keys: walk.stale_keys };
          process.stdout.write(`${JSON.stringify(doc, null, 2)}\n`);
        } else {
          lines.push(end, `${walk.ksets} ksets, ${walk.keys} keys (${walk.stale_keys} stale)`);
          process.stdout.write(`${lines.join("\n")}\n`);
        }
      } finally {
        dev.close();
      }
    }),
});

function describeKset(k: WalkedKset, data_crc: boolean, verify: boolean): string[] {
  if (k.last) return [`kset ${posToString(k.pos)} LAST size ${k.size_bytes} -> next segment ${k.next_cache_seg_id}`];
  const out = [`kset ${posToString(k.pos)} size ${k.size_bytes} keys ${k.keys.length}`];
  for (const key of k.keys) {
    const state = (key.flags & KEY_F_CLEAN) !== 0 ? "CLEAN" : "dirty";
    const crc = !data_crc ? "crc not stored" : !verify || key.stale ? "crc unchecked" : key.crc_ok ? "crc ok" : "crc BAD";
    out.push(`  key off ${key.off} len ${key.len} ${state} at ${key.cache_seg_id}:${key.cache_seg_off} gen ${key.seg_gen} ${key.stale ? "stale" : "live"} ${crc}`);
  }
  return out;
}
