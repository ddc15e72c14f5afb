/**
 * Replay (reference §2.2): rebuild the index and the segment table from key_tail to the end of
 * the log. Every kset passes the loader's hardening checks (core/log/walk.ts); stale keys (older
 * generation than their segment) are dropped but still counted as references, which keeps GC's
 * later per-key put balanced. A corrupt kset ends the log; that is reported, not fatal.
 */
import { InvalidDeviceError, PcacheError } from "../errors.ts";
import { KEY_F_EMPTY, SEG_DATA_SIZE } from "../format/constants.ts";
import type { CacheMeta } from "../format/load_cache.ts";
import { KEY_F_CRC_VERIFIED } from "../index/key_index.ts";
import { posEqual } from "../log/position.ts";
import { walkLog } from "../log/walk.ts";
import { zeroRange } from "../persist/zero.ts";
import type { EngineContext } from "./context.ts";
import { ReplayIndexBuilder } from "./replay_index.ts";
import { POS_DIRTY_TAIL, POS_KEY_HEAD, POS_KEY_TAIL } from "./shared_state.ts";

export interface ReplayResult {
  ksets: number;
  keys: number;
  stale_keys: number;
  end_reason: string;
  /** True when the log ended at something other than a clean zero header. */
  ended_dirty: boolean;
  elapsed_ms: number;
}

export function replay(ctx: EngineContext, meta: CacheMeta): ReplayResult {
  const t0 = performance.now();
  const { idx, segs, s } = ctx;
  let keys = 0;
  let stale_keys = 0;
  let ksets = 0;
  let dirty_tail_seen = false;
  const builder = new ReplayIndexBuilder(idx);
  segs.markUsed(meta.key_tail.cache_seg_id);
  const walk = walkLog(
    ctx.media.dom,
    meta,
    meta.key_tail,
    { backing_size_bytes: ctx.media.backing_size_bytes, verify_data_crc: meta.data_crc },
    (kset) => {
      ksets++;
      if (posEqual(kset.pos, meta.dirty_tail)) dirty_tail_seen = true;
      if (kset.last) {
        segs.markUsed(kset.next_cache_seg_id!);
        return true;
      }
      for (const k of kset.keys) {
        if (k.crc_ok === false) {
          throw new InvalidDeviceError(
            `data CRC mismatch in key off=${k.off} len=${k.len} of kset at ${kset.pos.cache_seg_id}:${kset.pos.seg_off}; the cache cannot be trusted`,
          );
        }
        segs.markUsed(k.cache_seg_id);
        segs.get(k.cache_seg_id);
        keys++;
        if (k.stale) {
          stale_keys++;
          continue;
        }
        const node = idx.allocNode();
        if (node < 0) {
          throw new PcacheError(
            `index pool exhausted during replay after ${keys} keys (${idx.nodes_max} nodes); start with a larger --index-nodes`,
          );
        }
        idx.setKey(node, k.off, k.len, k.cache_seg_id, k.cache_seg_off, k.seg_gen, k.flags & ~KEY_F_EMPTY);
        if (meta.data_crc) {
          // The walk verified every live key's data CRC already.
          idx.setCrc(node, k.data_crc, k.cache_seg_off, k.len);
          idx.flags[node] |= KEY_F_CRC_VERIFIED;
        }
        // Linked once the walk is done (replay_index.ts). Generations do not move during replay,
        // and the walk already dropped every key whose generation moved on.
        builder.add(node, k.off, k.len);
      }
      return true;
    },
  );
  builder.finish();
  const head = walk.end_pos;
  if (!dirty_tail_seen && !posEqual(head, meta.dirty_tail)) {
    throw new InvalidDeviceError(
      `dirty_tail ${meta.dirty_tail.cache_seg_id}:${meta.dirty_tail.seg_off} is not on the log between key_tail ` +
        `${meta.key_tail.cache_seg_id}:${meta.key_tail.seg_off} and key_head ${head.cache_seg_id}:${head.seg_off}`,
    );
  }
  s.pos[POS_KEY_HEAD] = head.cache_seg_id;
  s.pos[POS_KEY_HEAD + 1] = head.seg_off;
  s.pos[POS_KEY_TAIL] = meta.key_tail.cache_seg_id;
  s.pos[POS_KEY_TAIL + 1] = meta.key_tail.seg_off;
  s.pos[POS_DIRTY_TAIL] = meta.dirty_tail.cache_seg_id;
  s.pos[POS_DIRTY_TAIL + 1] = meta.dirty_tail.seg_off;
  const ended_dirty = !walk.end_clean;
  if (ended_dirty) {
    // Whatever follows the end of the log must never parse as a kset once we append there.
    const at = ctx.media.dataOff(head.cache_seg_id, head.seg_off);
    zeroRange(ctx.media.dom, at, SEG_DATA_SIZE - head.seg_off);
    ctx.media.dom.fence();
  }
  return { ksets, keys, stale_keys, end_reason: walk.end_reason, ended_dirty, elapsed_ms: performance.now() - t0 };
}
