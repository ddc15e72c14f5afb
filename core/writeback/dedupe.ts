/**
 * The keys of one kset reduced to non-overlapping extents, later keys winning (they are in log
 * order), as the kernel does by inserting them into a private tree with overlap fixup. A kset has
 * at most 128 keys, so a quadratic cut is cheap and obviously right; it runs only when two keys
 * overlap, which a sort by offset finds first (random writes rarely overlap within one kset).
 */
export interface KsetKey {
  off: number;
  len: number;
  flags: number;
  cache_seg_id: number;
  cache_seg_off: number;
  seg_gen: number;
}

export interface Extent {
  off: number;
  len: number;
  flags: number;
  cache_seg_id: number;
  seg_off: number;
  seg_gen: number;
}

/** The extents, sorted by offset. */
export function dedupeKset(keys: readonly KsetKey[]): Extent[] {
  const by_off = [...keys].sort((a, b) => a.off - b.off);
  let overlap = false;
  for (let i = 1; i < by_off.length && !overlap; i++) overlap = by_off[i - 1].off + by_off[i - 1].len > by_off[i].off;
  if (!overlap) return by_off.map(extentOf);
  return cutOverlaps(keys).sort((a, b) => a.off - b.off);
}

function extentOf(k: KsetKey): Extent {
  return { off: k.off, len: k.len, flags: k.flags, cache_seg_id: k.cache_seg_id, seg_off: k.cache_seg_off, seg_gen: k.seg_gen };
}

function cutOverlaps(keys: readonly KsetKey[]): Extent[] {
  let extents: Extent[] = [];
  for (const k of keys) {
    const k_end = k.off + k.len;
    const kept: Extent[] = [];
    for (const e of extents) {
      const e_end = e.off + e.len;
      if (e_end <= k.off || e.off >= k_end) {
        kept.push(e);
        continue;
      }
      if (e.off < k.off) kept.push({ ...e, len: k.off - e.off });
      if (e_end > k_end) kept.push({ ...e, off: k_end, len: e_end - k_end, seg_off: e.seg_off + (k_end - e.off) });
    }
    kept.push(extentOf(k));
    extents = kept;
  }
  return extents;
}
