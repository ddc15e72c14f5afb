import { defineCommand } from "citty";
import { controlRequest } from "../core/control/client.ts";
import { lockSharedIfFree } from "../core/control/in_use.ts";
import { defaultControlPath } from "../core/control/paths.ts";
import type { StatusSnapshot } from "../core/control/status.ts";
import { openCacheDevice } from "../core/device/cache_device.ts";
import { PcacheError } from "../core/errors.ts";
import { CACHE_MODE_NAMES } from "../core/format/cache_info.ts";
import { type CacheMeta, loadCache } from "../core/format/load_cache.ts";
import { posToString } from "../core/log/position.ts";
import { walkLog } from "../core/log/walk.ts";
import type { PersistDomain } from "../core/persist/domain.ts";
import { describeNative, native } from "../ffi/native.ts";
import { runCommand } from "./run.ts";

/** A live status from the server takes at most this long; info goes on without it. */
const LIVE_TIMEOUT_MS = 3_000;

const IN_USE_NOTE = "in use by a running server: positions may be moving (live: what the server reports now)";
const IN_USE_NO_SERVER_NOTE = "in use by a running server: positions may be moving (its control socket did not answer)";

export const infoCommand = defineCommand({
  meta: {
    name: "info",
    description:
      "Show a cache device's superblock, cache_info, log positions and usage (never writes; also works while a server uses the device).\nExample: pcache info --cache /dev/shm/cache.img --json",
  },
  args: {
    cache: { type: "string", description: "cache device or file", required: true },
    control: { type: "string", description: "control socket of the server using the device (default: derived from the cache path)" },
    json: { type: "boolean", description: "one JSON document", default: false },
  },
  run: ({ args }) =>
    runCommand(async () => {
      // Read-only and without the server's exclusive lock, so it also works on a device in use.
      const dev = openCacheDevice(args.cache, { readOnly: true });
      try {
        const in_use = lockSharedIfFree(dev.fd) === "in_use";
        const live = in_use ? await liveStatus(args.control ?? defaultControlPath(args.cache)) : null;
        const meta = loadCache(dev.domain);
        const report = buildReport(args.cache, dev.size_bytes, dev.domain, meta, in_use, live);
        process.stdout.write(args.json ? `${JSON.stringify(report, null, 2)}\n` : formatText(report, meta));
      } finally {
        dev.close();
      }
    }),
});

async function liveStatus(control_path: string): Promise<StatusSnapshot | null> {
  try {
    return (await controlRequest(control_path, { op: "status" }, LIVE_TIMEOUT_MS)) as StatusSnapshot;
  } catch {
    return null;
  }
}

interface LogUsage {
  key_head: string;
  log_end: string;
  ksets: number;
  keys: number;
  segments_in_use: number;
}

/** Walk from key_tail; on a device in use the log may change under the walk, which is then reported, not fatal. */
function walkUsage(dom: PersistDomain, meta: CacheMeta, in_use: boolean): LogUsage | { error: string } {
  const used = new Set<number>();
  try {
    const walk = walkLog(dom, meta, meta.key_tail, {}, (k) => {
      used.add(k.pos.cache_seg_id);
      if (k.last && k.next_cache_seg_id !== undefined) used.add(k.next_cache_seg_id);
      for (const key of k.keys) if (!key.stale) used.add(key.cache_seg_id);
      return true;
    });
    used.add(walk.end_pos.cache_seg_id);
    return { key_head: posToString(walk.end_pos), log_end: walk.end_reason, ksets: walk.ksets, keys: walk.keys, segments_in_use: used.size };
  } catch (err) {
    if (!in_use || !(err instanceof PcacheError)) throw err;
    return { error: `the log changed while it was read (${err.message})` };
  }
}

function buildReport(device: string, size_bytes: number, dom: PersistDomain, meta: CacheMeta, in_use: boolean, live: StatusSnapshot | null) {
  const usage = walkUsage(dom, meta, in_use);
  const walked = "error" in usage ? { key_head: null, log_end: usage.error, ksets: null, keys: null, segments_in_use: null } : usage;
  return {
    device,
    size_bytes,
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
    ...walked,
    persistence_domain: dom.describe(),
    native_helpers: describeNative(),
    native_available: native.available,
    in_use,
    note: !in_use ? "not in use: a consistent snapshot" : live !== null ? IN_USE_NOTE : IN_USE_NO_SERVER_NOTE,
    live: live === null ? null : { key_head: live.key_head, dirty_tail: live.dirty_tail, key_tail: live.key_tail, segments_used: live.segments_used, gc_percent: live.gc_percent, dirty_bytes: live.dirty_bytes, pid: live.pid },
  };
}

function formatText(r: ReturnType<typeof buildReport>, meta: CacheMeta): string {
  const lines = [
    `device            ${r.device} (${r.size_bytes} bytes)`,
    `superblock        flags 0x${meta.sb.flags.toString(16)}, magic ${r.superblock.magic}, seg_num ${meta.sb.seg_num}`,
    `cache_info        mode ${r.cache_info.cache_mode}, data_crc ${meta.data_crc ? "on" : "off"}, gc_percent ${meta.gc_percent}, INIT_DONE, n_segs ${meta.n_segs}, first segment ${r.cache_info.seg_id}`,
    `key_tail          ${r.key_tail}`,
    `dirty_tail        ${r.dirty_tail}`,
    r.key_head === null ? `key_head          unknown: ${r.log_end}` : `key_head          ${r.key_head} (${r.log_end})`,
    `log               ${r.ksets ?? "?"} ksets, ${r.keys ?? "?"} keys`,
    `segments in use   ${r.segments_in_use ?? "?"} of ${meta.n_segs}`,
    `persistence       ${r.persistence_domain}`,
    `native            ${r.native_helpers}`,
  ];
  if (r.in_use) lines.push(`in use            ${r.note}`);
  if (r.live !== null) {
    const l = r.live;
    lines.push(
      `live (pid ${l.pid})`.padEnd(18) +
        `key_head ${l.key_head}, dirty_tail ${l.dirty_tail}, key_tail ${l.key_tail}, ${l.segments_used} segments used, gc_percent ${l.gc_percent}, dirty ${l.dirty_bytes ?? "?"} bytes`,
    );
  }
  return `${lines.join("\n")}\n`;
}
