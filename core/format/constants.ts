/**
 * dm-pcache on-media constants (reference §1.2–§1.4). Byte-compatible with Linux dm-pcache.
 * All device offsets are plain numbers: a cache of 16 TiB stays far below 2^53.
 */

export const KiB = 1024;
export const MiB = 1024 * KiB;
export const GiB = 1024 * MiB;

/** CRC-32C seed for every CRC in the format (metadata, superblock, kset, data). */
export const CRC_SEED = 0x3b15a;

export const META_HEADER_SIZE = 8;
/** Every mutable metadata record exists twice. */
export const META_REPLICAS = 2;

// ---- cache device map ----
export const SB_OFF = 0x1000;
export const SB_SIZE = 24;
export const SB_MAGIC = 0x65b05efa96c596efn;
/** Superblock flag bit 0: formatted on a big-endian host. We refuse such images. */
export const SB_F_BIGENDIAN = 1 << 0;

export const CACHE_INFO_OFF = 0x2000;
export const CACHE_INFO_STRIDE = 0x1000;
export const CACHE_INFO_SIZE = 24;

export const CACHE_CTRL_OFF = 0x4000;
export const KEY_TAIL_POS_OFF = 0x4000;
export const DIRTY_TAIL_POS_OFF = 0x4020;
export const POS_STRIDE = 16;
export const POS_SIZE = 16;

/** First segment starts here; segments are 16 MiB long and NOT 16 MiB aligned. */
export const SEGMENTS_OFF = 0x5000;
export const SEG_SIZE = 16 * MiB;

// ---- inside a segment ----
export const SEG_INFO_OFF = 0x0000;
export const SEG_INFO_STRIDE = 0x1000;
export const SEG_INFO_SIZE = 16;
export const SEG_GEN_OFF = 0x2000;
export const SEG_GEN_STRIDE = 16;
export const SEG_GEN_SIZE = 16;
/** Start of the data area; every seg_off in keys and positions is relative to this. */
export const SEG_DATA_OFF = 0x3000;
/** Bytes in a segment's data area (16 MiB - 12 KiB). */
export const SEG_DATA_SIZE = SEG_SIZE - SEG_DATA_OFF;

export const SEG_INFO_F_HAS_NEXT = 1 << 0;
export const SEG_INFO_TYPE_SHIFT = 1;
export const SEG_INFO_TYPE_MASK = 0xf << SEG_INFO_TYPE_SHIFT;
/** Every cache segment, data or key-log, is typed CACHE_DATA (1). */
export const SEG_TYPE_CACHE_DATA = 1;

// ---- cache_info flags ----
export const CACHE_INFO_F_DATA_CRC = 1 << 0;
export const CACHE_INFO_F_INIT_DONE = 1 << 1;
export const CACHE_INFO_MODE_SHIFT = 2;
export const CACHE_INFO_MODE_MASK = 0xf << CACHE_INFO_MODE_SHIFT;
export const CACHE_MODE_WRITEBACK = 0;
export const CACHE_INFO_GC_PERCENT_SHIFT = 6;
export const CACHE_INFO_GC_PERCENT_MASK = 0x7f << CACHE_INFO_GC_PERCENT_SHIFT;
export const GC_PERCENT_MIN = 0;
export const GC_PERCENT_MAX = 90;
export const GC_PERCENT_DEFAULT = 70;

// ---- keys and ksets ----
export const KEY_SIZE = 40;
export const KEY_F_EMPTY = 1 << 0;
export const KEY_F_CLEAN = 1 << 1;

export const KSET_HEADER_SIZE = 24;
export const KSET_MAGIC = 0x676894a64e164f1an;
export const KSET_F_LAST = 1n;
export const KSET_KEYS_MAX = 128;
/** Largest kset on media: 24 + 128 * 40 = 5144 bytes. */
export const KSET_SIZE_MAX = KSET_HEADER_SIZE + KSET_KEYS_MAX * KEY_SIZE;

// ---- geometry ----
/** Smallest cache device the kernel accepts. */
export const CACHE_DEV_SIZE_MIN = 512 * MiB;
/** PCACHE_CACHE_SEGS_MAX: 16 TiB of segments. */
export const CACHE_SEGS_MAX = 1_048_576;
/** Index subtrees and ksets split the backing device in 4 MiB units. */
export const SUBTREE_SHIFT = 22;
export const SUBTREE_SPAN = 1 << SUBTREE_SHIFT;

/** Physical segments that fit a cache device of the given size. */
export function segNumForSize(cache_dev_bytes: number): number {
  if (cache_dev_bytes < SEGMENTS_OFF) return 0;
  return Math.floor((cache_dev_bytes - SEGMENTS_OFF) / SEG_SIZE);
}

/** Device byte offset of physical segment seg_id. */
export function segmentOffset(seg_id: number): number {
  return SEGMENTS_OFF + seg_id * SEG_SIZE;
}

/** Bytes a normal kset with key_num keys occupies on media. */
export function ksetSize(key_num: number): number {
  return KSET_HEADER_SIZE + key_num * KEY_SIZE;
}
