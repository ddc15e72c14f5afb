/**
 * One kset at a position, with every check of the log walk: what writeback (at dirty_tail) and
 * GC (at key_tail) consume one at a time.
 */
import type { PersistDomain } from "../persist/domain.ts";
import type { CachePos } from "./position.ts";
import { walkLog, type WalkedKey, type WalkMeta } from "./walk.ts";

export type DecodedKset =
  | { kind: "normal"; size_bytes: number; keys: WalkedKey[] }
  | { kind: "last"; size_bytes: number; next_cache_seg_id: number }
  | { kind: "end"; reason: string };

export function readKsetAt(
  dom: PersistDomain,
  meta: WalkMeta,
  pos: CachePos,
  opts: { backing_size_bytes?: number; verify_data_crc?: boolean },
): DecodedKset {
  let found: DecodedKset | null = null;
  const result = walkLog(dom, meta, pos, { ...opts, limit: 1 }, (k) => {
    found = k.last
      ? { kind: "last", size_bytes: k.size_bytes, next_cache_seg_id: k.next_cache_seg_id! }
      : { kind: "normal", size_bytes: k.size_bytes, keys: k.keys };
    return false;
  });
  return found ?? { kind: "end", reason: result.end_reason };
}
