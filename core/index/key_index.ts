/**
 * The key index (reference §2.4, §3; ARCHITECTURE §3): which cached extent holds each byte of
 * the backing device, shared by every worker thread.
 *
 * Shape, as in the kernel: one subtree per 4 MiB of the backing device, each a balanced search
 * tree of keys ordered by `off`, each with its own lock word. Inside a subtree keys never overlap;
 * insert resolves overlaps with the fixup table of §2.4 (later writes win). Requests and keys are
 * cut at 4 MiB boundaries, so every key lives in exactly one subtree.
 *
 * Representation: every node comes from ONE pool of `nodes_max` nodes allocated at start, stored
 * as a struct of arrays, one SharedArrayBuffer per field, so `new KeyIndex(shared)` in any thread
 * sees the same nodes. Nothing ever grows; allocNode() returns NIL when the pool is empty, and the
 * caller either waits (waitForNodes / waitForNodesAsync: a wait word that freeNode signals, with
 * no subtree lock held) or fails the request.
 *
 * The trees are treaps: a binary search tree on `off` that is also a max-heap on a random
 * priority drawn (seeded xorshift) when a node is allocated, which keeps the expected depth
 * O(log n) whatever the insert order. Links live in one Int32Array with a 16-byte record per
 * node: its end (off + len, a float64 in words 0-1, kept equal to off + len whenever a linked key
 * changes), its left child links[4*id+2] and its right child links[4*id+3]; subtree s's root is
 * links[4*nodes_max + s]. A search reads only these records, one cache line per level. A
 * "slot" (an index into links) therefore names any place a node can hang from, which lets insert
 * and delete run without recursion and without parent pointers. A search remembers the slot of
 * the node it found, so deleting that node (a stale result, a key K covers) or putting K
 * in its place (K replaces T exactly, the common overwrite) needs no second search.
 *
 * Memory (see keyIndexBytes): NODE_BYTES = 72 bytes per node
 *   off 8 + seg_gen 8 + len 4 + cache_seg_id 4 + seg_off 4 + flags 4 + data_crc 4
 *   + crc_seg_off 4 + crc_len 4 + ver 4 + prio 4 + flush_epoch 4 + kset_closes 4 + the record
 *   (end 8 + two links 8), plus SUBTREE_BYTES = 12 per subtree (lock word, key count, root link)
 * and a 128-byte header. A 1 TiB backing device (262,144 subtrees) with 4 M nodes takes 3 MiB +
 * 304 MiB.
 *
 * Concurrency contract:
 * * Every tree operation (ceiling, first, next, insert, remove, removeRange, purgeStale, count,
 *   checkInvariants) requires the caller to hold that subtree's lock (lockSubtree). Node fields of
 *   a node linked into subtree s are read and written only under s's lock.
 * * A node the caller allocated and has not linked yet is private to the caller: set its fields
 *   without any lock, then insert it.
 * * allocNode/freeNode take the pool lock, a leaf lock (see core/sync/lock.ts for the order):
 *   they may be called under a subtree lock and never wait.
 * * `ver[id]` is bumped on every free. A thread that remembers (id, ver) - a pending miss
 *   completion remembering its EMPTY placeholder - takes the subtree lock and compares: equal
 *   means the very same key is still linked (possibly trimmed), different means it was deleted
 *   and the node may since have been reused for another key.
 */
import { ptr } from "bun:ffi";
import { adviseHugePages } from "../../ffi/libc.ts";
import { AssertionError } from "../assert.ts";
import { KEY_F_EMPTY, SUBTREE_SPAN } from "../format/constants.ts";
import { lock, tryLock, unlock } from "../sync/lock.ts";
import { signal, waitUntil, waitUntilAsync } from "../sync/wait_word.ts";

/** A failed internal check (an AssertionError); callers build the message only on failure. */
function broken(message: string): never {
  throw new AssertionError(`assertion failed: ${message}`);
}

export { KEY_F_CLEAN, KEY_F_EMPTY } from "../format/constants.ts";

/** In-memory only: data_crc / crc_seg_off / crc_len hold the data CRC of the original extent. */
export const KEY_F_CRC_VALID = 1 << 8;
/** In-memory only: the cached data was checked against data_crc once (no need to check again). */
export const KEY_F_CRC_VERIFIED = 1 << 9;
/** Flag bits that never reach the media. */
export const KEY_F_MEM_ONLY = KEY_F_CRC_VALID | KEY_F_CRC_VERIFIED;

/** "No node": empty child, empty tree, exhausted pool, no ceiling. */
export const NIL = -1;

/** Results of insert() and removeRange(). */
export const INSERT_OK = 0;
/** Done, and the spare node is now linked into the tree (the caller must not free it). */
export const INSERT_OK_SPARE_USED = 1;
/**
 * Nothing done: an existing non-EMPTY key strictly contains the range and has to be split, but
 * the caller passed spare = NIL. Only stale keys may have been purged. Allocate a spare (or wait
 * for one) and call again.
 */
export const INSERT_NEED_SPARE = 2;
export type InsertResult = typeof INSERT_OK | typeof INSERT_OK_SPARE_USED | typeof INSERT_NEED_SPARE;

/** Keys in offset order for buildSorted: node ids with their offsets and lengths side by side. */
export interface SortedKeys {
  ids: Int32Array;
  offs: Float64Array;
  lens: Uint32Array;
}

/** `isStale(id)`: seg_gen[id] < the current generation of segment cache_seg_id[id]. */
export type IsStale = (id: number) => boolean;

/** Bytes per pool node (see the file comment for the breakdown). */
export const NODE_BYTES = 76;
/** Bytes per subtree: lock word, key count, root link. */
export const SUBTREE_BYTES = 12;
/** Largest pool: the links buffer (16 bytes per node) must stay under Bun's 4 GiB per view. */
export const NODES_MAX_LIMIT = 1 << 26;
/** Largest number of subtrees (a 2^52-byte backing device). */
export const SUBTREES_MAX_LIMIT = 1 << 30;

// Header words (Int32). The pool lock and the pool wait word sit in different 64-byte lines: the
// wait word is bumped after every free, and sleepers on it should not slow the lock's holders.
const HDR_POOL_LOCK = 0;
const HDR_FREE_HEAD = 1;
const HDR_FREE_COUNT = 2;
const HDR_SEED = 3;
const HDR_INSTANCES = 4;
const HDR_POOL_WAIT = 16;
/** Threads inside waitForNodes; freeNode only pays for Atomics.notify when this is non-zero. */
const HDR_POOL_WAITERS = 17;
const HDR_WORDS = 32;
const HDR_BYTES = HDR_WORDS * 4;

// Subtree words (Int32): lock, count.
const SUB_WORDS = 2;
const SUB_LOCK = 0;
const SUB_COUNT = 1;

/** Int32 words per node in `links`: its end (a float64 in words 0-1), then left and right links. */
const NODE_WORDS = 4;

/** Index buffers from this size ask for transparent huge pages. */
const HUGE_ADVICE_MIN_BYTES = 8 * 1024 * 1024;

/** Right link of a node that is on the free list; catches double frees and inserting freed nodes. */
const FREE_MARK = -2;

/** Everything a thread needs to open the index; plain data, so it can be posted to a Worker. */
export interface KeyIndexShared {
  n_subtrees: number;
  nodes_max: number;
  hdr: SharedArrayBuffer;
  sub: SharedArrayBuffer;
  links: SharedArrayBuffer;
  off: SharedArrayBuffer;
  seg_gen: SharedArrayBuffer;
  len: SharedArrayBuffer;
  cache_seg_id: SharedArrayBuffer;
  seg_off: SharedArrayBuffer;
  flags: SharedArrayBuffer;
  data_crc: SharedArrayBuffer;
  crc_seg_off: SharedArrayBuffer;
  crc_len: SharedArrayBuffer;
  ver: SharedArrayBuffer;
  prio: SharedArrayBuffer;
  flush_epoch: SharedArrayBuffer;
  kset_closes: SharedArrayBuffer;
}

/** Subtrees for a backing device: one per 4 MiB, at least one. */
export function subtreesForBacking(backing_bytes: number): number {
  return Math.max(1, Math.ceil(backing_bytes / SUBTREE_SPAN));
}

/** Subtree holding byte `off` of the backing device. */
export function subtreeOf(off: number): number {
  return Math.floor(off / SUBTREE_SPAN);
}

/** Shared memory taken by an index of this size. */
export function keyIndexBytes(n_subtrees: number, nodes_max: number): number {
  return HDR_BYTES + n_subtrees * SUBTREE_BYTES + nodes_max * NODE_BYTES;
}

/**
 * Allocate and initialise the shared memory of an index: every subtree empty, every node free.
 * `seed` makes the treap priorities (and so the tree shapes) reproducible.
 */
export function createKeyIndexShared(n_subtrees: number, nodes_max: number, seed = 0x5eed): KeyIndexShared {
  if (!Number.isInteger(n_subtrees) || n_subtrees < 1 || n_subtrees > SUBTREES_MAX_LIMIT) broken(`n_subtrees ${n_subtrees}`);
  if (!Number.isInteger(nodes_max) || nodes_max < 1 || nodes_max > NODES_MAX_LIMIT) broken(`nodes_max ${nodes_max}`);
  const n = nodes_max;
  const shared: KeyIndexShared = {
    n_subtrees,
    nodes_max,
    hdr: new SharedArrayBuffer(HDR_BYTES),
    sub: new SharedArrayBuffer(n_subtrees * SUB_WORDS * 4),
    links: new SharedArrayBuffer((NODE_WORDS * n + n_subtrees) * 4),
    off: new SharedArrayBuffer(n * 8),
    seg_gen: new SharedArrayBuffer(n * 8),
    len: new SharedArrayBuffer(n * 4),
    cache_seg_id: new SharedArrayBuffer(n * 4),
    seg_off: new SharedArrayBuffer(n * 4),
    flags: new SharedArrayBuffer(n * 4),
    data_crc: new SharedArrayBuffer(n * 4),
    crc_seg_off: new SharedArrayBuffer(n * 4),
    crc_len: new SharedArrayBuffer(n * 4),
    ver: new SharedArrayBuffer(n * 4),
    prio: new SharedArrayBuffer(n * 4),
    flush_epoch: new SharedArrayBuffer(n * 4),
    kset_closes: new SharedArrayBuffer(n * 4),
  };
  // Before the first touch, so the pages are huge from the start where the kernel allows it.
  for (const buf of [shared.links, shared.off, shared.len, shared.flags, shared.seg_gen, shared.cache_seg_id]) {
    if (buf.byteLength >= HUGE_ADVICE_MIN_BYTES) adviseHugePages(Number(ptr(new Uint8Array(buf))), buf.byteLength);
  }
  const links = new Int32Array(shared.links);
  // Free list threaded through the left links, lowest ids first (they are handed out first).
  for (let id = 0; id < n; id++) {
    links[4 * id + 2] = id + 1 < n ? id + 1 : NIL;
    links[4 * id + 3] = FREE_MARK;
  }
  links.fill(NIL, NODE_WORDS * n);
  const hdr = new Int32Array(shared.hdr);
  hdr[HDR_FREE_HEAD] = 0;
  hdr[HDR_FREE_COUNT] = n;
  hdr[HDR_SEED] = seed | 0;
  return shared;
}

export interface KeyIndexOptions {
  /**
   * Check after every link that the new key does not overlap its neighbours (two extra O(log n)
   * searches). For tests and debug runs.
   */
  debug?: boolean;
}

/** One thread's view of the shared key index. Cheap to construct; construct one per thread. */
export class KeyIndex {
  readonly n_subtrees: number;
  readonly nodes_max: number;

  // Node fields, indexed by node id. Read them directly on hot paths: idx.off[id], idx.len[id].
  /** Byte offset on the backing device (< 2^53). */
  readonly off: Float64Array;
  /** Generation of cache_seg_id when the key was made; < the segment's gen means stale. */
  readonly seg_gen: Float64Array;
  /** Bytes; > 0 for linked keys. */
  readonly len: Uint32Array;
  readonly cache_seg_id: Uint32Array;
  /** Offset in the segment's data area (reference §0 "pos"). */
  readonly seg_off: Uint32Array;
  /** KEY_F_EMPTY, KEY_F_CLEAN, KEY_F_CRC_VALID, KEY_F_CRC_VERIFIED. Zeroed on free. */
  readonly flags: Uint32Array;
  /** CRC-32C of the ORIGINAL extent [crc_seg_off, crc_seg_off + crc_len) of the segment's data area. */
  readonly data_crc: Uint32Array;
  readonly crc_seg_off: Uint32Array;
  readonly crc_len: Uint32Array;
  /** Bumped on every free. */
  readonly ver: Uint32Array;
  /** Flush epoch current when the key was logged (core/log/flush_epochs.ts); 0 = unknown. */
  readonly flush_epoch: Int32Array;
  /** Closes of the key's kset before it was appended: once that count moves, the key is on media. */
  readonly kset_closes: Int32Array;

  /** Lock words of the subtrees: lock(subtree_locks, subtreeLockIndex(s)). */
  readonly subtree_locks: Int32Array;
  /**
   * The pool's wait word (pool_wait_words[pool_wait_index]), for callers that build their own
   * wait (e.g. one predicate over several resources). freeNode signals it only while someone is
   * registered, so such a caller must bracket its wait with poolWaiterEnter()/poolWaiterLeave().
   * waitForNodes / waitForNodesAsync do all of that.
   */
  readonly pool_wait_words: Int32Array;
  readonly pool_wait_index: number = HDR_POOL_WAIT;
  private readonly hdr: Int32Array;
  private readonly sub: Int32Array;
  private readonly links: Int32Array;
  /** off + len of node id at ends[2 * id], in the same 16 bytes as its links (see the file comment). */
  private readonly ends: Float64Array;
  private readonly prio: Uint32Array;
  private readonly root_base: number;
  private readonly debug: boolean;
  private rng_state: number;
  /** Set by search(): the link slot that holds the node it returned. */
  private found_slot = 0;

  constructor(readonly shared: KeyIndexShared, options: KeyIndexOptions = {}) {
    this.n_subtrees = shared.n_subtrees;
    this.nodes_max = shared.nodes_max;
    this.hdr = new Int32Array(shared.hdr);
    this.sub = new Int32Array(shared.sub);
    this.links = new Int32Array(shared.links);
    this.ends = new Float64Array(shared.links, 0, 2 * shared.nodes_max);
    this.off = new Float64Array(shared.off);
    this.seg_gen = new Float64Array(shared.seg_gen);
    this.len = new Uint32Array(shared.len);
    this.cache_seg_id = new Uint32Array(shared.cache_seg_id);
    this.seg_off = new Uint32Array(shared.seg_off);
    this.flags = new Uint32Array(shared.flags);
    this.data_crc = new Uint32Array(shared.data_crc);
    this.crc_seg_off = new Uint32Array(shared.crc_seg_off);
    this.crc_len = new Uint32Array(shared.crc_len);
    this.ver = new Uint32Array(shared.ver);
    this.prio = new Uint32Array(shared.prio);
    this.flush_epoch = new Int32Array(shared.flush_epoch);
    this.kset_closes = new Int32Array(shared.kset_closes);
    if (this.links.length !== NODE_WORDS * this.nodes_max + this.n_subtrees) broken("links buffer size");
    if (this.sub.length !== this.n_subtrees * SUB_WORDS) broken("subtree buffer size");
    this.subtree_locks = this.sub;
    this.pool_wait_words = this.hdr;
    this.root_base = NODE_WORDS * this.nodes_max;
    this.debug = options.debug ?? false;
    // Each view draws priorities from its own stream: the shared seed mixed with an instance
    // number, so two threads never hand out correlated priorities.
    const instance = Atomics.add(this.hdr, HDR_INSTANCES, 1);
    let x = Math.imul((this.hdr[HDR_SEED] ^ 0x9e3779b9) >>> 0, 0x85ebca6b) ^ Math.imul(instance + 1, 0xc2b2ae35);
    x = Math.imul(x ^ (x >>> 15), 0x2c1b3c6d);
    this.rng_state = (x ^ (x >>> 12)) >>> 0 || 0x6d2b79f5;
  }

  // ---------------------------------------------------------------- subtrees and locks

  /** Subtree of byte `off`. */
  subtreeOf(off: number): number {
    return Math.floor(off / SUBTREE_SPAN);
  }

  /** Index of subtree s's lock word in subtree_locks. */
  subtreeLockIndex(s: number): number {
    return s * SUB_WORDS + SUB_LOCK;
  }

  lockSubtree(s: number): void {
    if (s < 0 || s >= this.n_subtrees) broken(`subtree ${s} out of range`);
    lock(this.sub, s * SUB_WORDS + SUB_LOCK);
  }

  tryLockSubtree(s: number): boolean {
    if (s < 0 || s >= this.n_subtrees) broken(`subtree ${s} out of range`);
    return tryLock(this.sub, s * SUB_WORDS + SUB_LOCK);
  }

  unlockSubtree(s: number): void {
    unlock(this.sub, s * SUB_WORDS + SUB_LOCK);
  }

  /** Keys linked into subtree s (caller holds the lock). */
  count(s: number): number {
    if (s < 0 || s >= this.n_subtrees) broken(`subtree ${s} out of range`);
    return this.sub[s * SUB_WORDS + SUB_COUNT];
  }

  // ---------------------------------------------------------------- node pool

  /** Free nodes right now (a snapshot; other threads allocate and free concurrently). */
  nodesFree(): number {
    return Atomics.load(this.hdr, HDR_FREE_COUNT);
  }

  /**
   * Take a node from the pool; NIL when the pool is empty. Never blocks on anything but the short
   * pool lock, never throws for exhaustion. The node's fields are stale except: flags = 0,
   * no links, a fresh priority, ver unchanged since its last free.
   */
  allocNode(): number {
    const hdr = this.hdr;
    const links = this.links;
    lock(hdr, HDR_POOL_LOCK);
    const id = hdr[HDR_FREE_HEAD];
    if (id === NIL) {
      unlock(hdr, HDR_POOL_LOCK);
      return NIL;
    }
    hdr[HDR_FREE_HEAD] = links[4 * id + 2];
    Atomics.store(hdr, HDR_FREE_COUNT, hdr[HDR_FREE_COUNT] - 1);
    unlock(hdr, HDR_POOL_LOCK);
    links[4 * id + 2] = NIL;
    links[4 * id + 3] = NIL;
    this.flags[id] = 0;
    this.len[id] = 0;
    this.prio[id] = this.nextPriority();
    return id;
  }

  /**
   * Return node id (already unlinked, or never linked) to the pool: bumps ver, zeroes flags and
   * len, then wakes threads in waitForNodes, if any.
   */
  freeNode(id: number): void {
    if (id < 0 || id >= this.nodes_max) broken(`freeNode: bad node id ${id}`);
    const links = this.links;
    if (links[4 * id + 3] === FREE_MARK) broken(`freeNode: node ${id} is already free`);
    this.ver[id] = (this.ver[id] + 1) >>> 0;
    this.flags[id] = 0;
    this.len[id] = 0;
    links[4 * id + 3] = FREE_MARK;
    const hdr = this.hdr;
    lock(hdr, HDR_POOL_LOCK);
    links[4 * id + 2] = hdr[HDR_FREE_HEAD];
    hdr[HDR_FREE_HEAD] = id;
    Atomics.store(hdr, HDR_FREE_COUNT, hdr[HDR_FREE_COUNT] + 1);
    unlock(hdr, HDR_POOL_LOCK);
    // No lost wake-up: a waiter registers (Atomics.add) before it reads the free count, we
    // published the count (Atomics.store) before reading the registrations; with sequentially
    // consistent atomics one of the two sides sees the other.
    if (Atomics.load(hdr, HDR_POOL_WAITERS) !== 0) signal(hdr, HDR_POOL_WAIT);
  }

  /**
   * Block (Atomics.wait) until at least n nodes are free or timeout_ms passes; true if they are.
   * Never call it holding a subtree lock: the nodes come back from other threads' deletes, which
   * need that lock.
   */
  waitForNodes(n: number, timeout_ms: number): boolean {
    this.poolWaiterEnter();
    try {
      return waitUntil(this.hdr, HDR_POOL_WAIT, () => this.nodesFree() >= n, timeout_ms);
    } finally {
      this.poolWaiterLeave();
    }
  }

  /** Like waitForNodes without blocking the event loop (Atomics.waitAsync). */
  async waitForNodesAsync(n: number, timeout_ms: number): Promise<boolean> {
    this.poolWaiterEnter();
    try {
      return await waitUntilAsync(this.hdr, HDR_POOL_WAIT, () => this.nodesFree() >= n, timeout_ms);
    } finally {
      this.poolWaiterLeave();
    }
  }

  /** Register as a waiter on pool_wait_words BEFORE reading the counter and checking nodesFree. */
  poolWaiterEnter(): void {
    Atomics.add(this.hdr, HDR_POOL_WAITERS, 1);
  }

  /** Undo poolWaiterEnter once the wait is over (in a finally). */
  poolWaiterLeave(): void {
    Atomics.sub(this.hdr, HDR_POOL_WAITERS, 1);
  }

  /** Whether node id is on the free list (for assertions and tests). */
  isFree(id: number): boolean {
    return this.links[4 * id + 3] === FREE_MARK;
  }

  /**
   * Walk the free list under the pool lock and check it against the free count: every entry a
   * valid, marked, distinct node. Returns the free count. Tests and debug only (O(nodes_max)).
   */
  checkPool(): number {
    const hdr = this.hdr;
    const links = this.links;
    const seen = new Uint8Array(this.nodes_max);
    lock(hdr, HDR_POOL_LOCK);
    try {
      let n = 0;
      for (let id = hdr[HDR_FREE_HEAD]; id !== NIL; id = links[4 * id + 2]) {
        if (id < 0 || id >= this.nodes_max) broken(`free list: bad id ${id}`);
        if (seen[id] !== 0) broken(`free list: node ${id} listed twice`);
        if (links[4 * id + 3] !== FREE_MARK) broken(`free list: node ${id} not marked free`);
        seen[id] = 1;
        n++;
      }
      if (n !== hdr[HDR_FREE_COUNT]) broken(`free list holds ${n} nodes, free count says ${hdr[HDR_FREE_COUNT]}`);
      return n;
    } finally {
      unlock(hdr, HDR_POOL_LOCK);
    }
  }

  private nextPriority(): number {
    let x = this.rng_state;
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    this.rng_state = x >>> 0;
    return this.rng_state;
  }

  // ---------------------------------------------------------------- node fields

  /** Set the key fields of a private (allocated, not yet linked) node. Clears the CRC fields and the stamp. */
  setKey(id: number, off: number, len: number, cache_seg_id: number, seg_off: number, seg_gen: number, flags: number): void {
    this.off[id] = off;
    this.len[id] = len;
    this.ends[2 * id] = off + len; // setKey may rewrite a linked placeholder
    this.cache_seg_id[id] = cache_seg_id;
    this.seg_off[id] = seg_off;
    this.seg_gen[id] = seg_gen;
    this.flags[id] = flags & ~KEY_F_MEM_ONLY;
    this.data_crc[id] = 0;
    this.crc_seg_off[id] = 0;
    this.crc_len[id] = 0;
    this.flush_epoch[id] = 0;
    this.kset_closes[id] = 0;
  }

  /** Stamp a private node with where its key is logged: flush epoch and its kset's close count. */
  setLogStamp(id: number, flush_epoch: number, kset_closes: number): void {
    this.flush_epoch[id] = flush_epoch;
    this.kset_closes[id] = kset_closes;
  }

  /** Attach the data CRC of the key's original extent (sets KEY_F_CRC_VALID). */
  setCrc(id: number, data_crc: number, crc_seg_off: number, crc_len: number): void {
    this.data_crc[id] = data_crc;
    this.crc_seg_off[id] = crc_seg_off;
    this.crc_len[id] = crc_len;
    this.flags[id] = (this.flags[id] | KEY_F_CRC_VALID) >>> 0;
  }

  /** Copy every key field (not links, priority or ver) from src to dst. */
  copyKey(dst: number, src: number): void {
    this.off[dst] = this.off[src];
    this.len[dst] = this.len[src];
    this.cache_seg_id[dst] = this.cache_seg_id[src];
    this.seg_off[dst] = this.seg_off[src];
    this.seg_gen[dst] = this.seg_gen[src];
    this.flags[dst] = this.flags[src];
    this.data_crc[dst] = this.data_crc[src];
    this.crc_seg_off[dst] = this.crc_seg_off[src];
    this.crc_len[dst] = this.crc_len[src];
    this.flush_epoch[dst] = this.flush_epoch[src];
    this.kset_closes[dst] = this.kset_closes[src];
  }

  /** End of key id (off + len). */
  end(id: number): number {
    return this.off[id] + this.len[id];
  }

  /** Cut linked key id to [off, off + len): its fields and the end the searches read. */
  private setSpan(id: number, off: number, len: number): void {
    this.off[id] = off;
    this.len[id] = len;
    this.ends[2 * id] = off + len;
  }

  // ---------------------------------------------------------------- searches (lock held)

  /**
   * The first key (lowest off) of subtree s whose end is > x, or NIL. Keys do not overlap, so
   * this is the key containing x if there is one, else the next key after x; repeating with
   * x = end of the previous result walks the subtree in order.
   */
  ceiling(s: number, x: number): number {
    if (s < 0 || s >= this.n_subtrees) broken(`subtree ${s} out of range`);
    const links = this.links;
    const ends = this.ends;
    let t = links[this.root_base + s];
    let res = NIL;
    while (t !== NIL) {
      if (ends[2 * t] > x) {
        res = t;
        t = links[4 * t + 2];
      } else {
        t = links[4 * t + 3];
      }
    }
    return res;
  }

  /** Lowest key of subtree s, or NIL. */
  first(s: number): number {
    if (s < 0 || s >= this.n_subtrees) broken(`subtree ${s} out of range`);
    const links = this.links;
    let t = links[this.root_base + s];
    if (t === NIL) return NIL;
    for (let l = links[4 * t + 2]; l !== NIL; l = links[4 * t + 2]) t = l;
    return t;
  }

  /**
   * ceiling(s, x) that deletes stale keys (non-EMPTY, isStale true) it would return and searches
   * again, so the result is live. The kernel also deletes stale keys it passes on the way down;
   * here only results are checked (fewer cache misses per level), and GC's prune pass
   * (purgeStale) removes the others.
   */
  ceilingPurge(s: number, x: number, isStale: IsStale): number {
    if (s < 0 || s >= this.n_subtrees) broken(`subtree ${s} out of range`);
    return this.search(s, x, isStale);
  }

  /** Key after key id (linked in s), or NIL. */
  next(s: number, id: number): number {
    return this.ceiling(s, this.off[id] + this.len[id]);
  }

  // ---------------------------------------------------------------- updates (lock held)

  /**
   * Link private node k (fields set, len > 0, inside subtree s) into subtree s, first resolving
   * every overlap with existing keys as in reference §2.4:
   *
   *   T after K      (T.end <= K.start)              skip (never visited: the walk starts at
   *                                                   the ceiling of K.start)
   *   T before K     (T.start >= K.end)              stop
   *   tail           (T.start >= K.start, T.end >= K.end)
   *                  EMPTY T: delete it; else cut its front to K.end (seg_off advances too);
   *                  delete if nothing is left; stop
   *   contain        (T.start >= K.start, T.end < K.end)      delete T; continue
   *   contained      (T.start < K.start, T.end > K.end)
   *                  EMPTY T: cut its back to K.start (the part after K is dropped: the pending
   *                  miss fills only the head); else split: `spare` becomes a clone of T cut to
   *                  start at K.end, T is cut to end at K.start; stop
   *   head           (T.start < K.start < T.end <= K.end)      cut T's back to K.start; continue
   *
   * Stale keys (non-EMPTY, isStale(id) true) met on any search path are deleted first, as the
   * kernel does, so every T the table sees is live; a stale key is invisible to readers, so
   * dropping it instead of cutting it changes nothing a reader can observe. Deleted nodes go
   * back to the pool (ver bumped). Cuts keep data_crc / crc_seg_off / crc_len: they describe the
   * original extent, which a later reader re-reads to verify.
   *
   * Only one key can strictly contain K, and then it is the only key K overlaps, so one spare
   * node is always enough. Returns INSERT_OK_SPARE_USED when the spare was linked (do not free
   * it), INSERT_OK when it was not (it is still the caller's), INSERT_NEED_SPARE (nothing linked,
   * only stale keys purged) when a split is needed and spare is NIL.
   */
  insert(s: number, k: number, spare: number, isStale: IsStale | null): InsertResult {
    this.checkPrivateKey(s, k);
    if (spare === k) broken("insert: spare is the key itself");
    return this.fixup(s, this.off[k], this.off[k] + this.len[k], spare, isStale, k);
  }

  /**
   * Link private node k WITHOUT overlap fixup. For callers that know the range is free (e.g. a
   * range they just cleared with removeRange under the same lock hold). Asserts no overlap.
   */
  insertNoFixup(s: number, k: number): void {
    this.checkPrivateKey(s, k);
    const c = this.ceiling(s, this.off[k]);
    if (c !== NIL && this.off[c] < this.off[k] + this.len[k]) broken(`insertNoFixup: key ${k} overlaps key ${c}`);
    this.link(s, k);
  }

  /**
   * Remove everything in [start, end) from subtree s (trim, write-zeroes): the same table as
   * insert with K = [start, end), without linking anything. A range strictly inside one non-EMPTY
   * key needs the spare for the part after the range; results as for insert.
   */
  removeRange(s: number, start: number, end: number, spare: number, isStale: IsStale | null): InsertResult {
    if (start >= end) broken(`removeRange: empty range [${start}, ${end})`);
    this.checkRange(s, start, end - start);
    return this.fixup(s, start, end, spare, isStale, NIL);
  }

  /** Unlink key id from subtree s and free it (ver bumped, flags cleared). */
  remove(s: number, id: number): void {
    this.unlink(s, id);
    this.freeNode(id);
  }

  /** Unlink key id from subtree s WITHOUT freeing it: the node becomes private to the caller. */
  unlink(s: number, id: number): void {
    if (s < 0 || s >= this.n_subtrees) broken(`subtree ${s} out of range`);
    if (id < 0 || id >= this.nodes_max) broken(`unlink: bad node id ${id}`);
    const links = this.links;
    const off = this.off;
    const key = off[id];
    let slot = this.root_base + s;
    let t = links[slot];
    while (t !== id) {
      if (t === NIL) broken(`unlink: key ${id} (off ${key}) is not in subtree ${s}`);
      slot = key < off[t] ? 4 * t + 2 : 4 * t + 3;
      t = links[slot];
    }
    this.unlinkAt(s, slot, id);
  }

  /**
   * Delete up to `budget` stale keys of subtree s (GC's background prune). EMPTY keys are never
   * stale. Returns how many were deleted. Walks the subtree in order: O(n log n) at worst.
   */
  purgeStale(s: number, isStale: IsStale, budget: number): number {
    const off = this.off;
    const len = this.len;
    const flags = this.flags;
    let removed = 0;
    let t = this.first(s);
    while (t !== NIL && removed < budget) {
      const end = off[t] + len[t];
      if ((flags[t] & KEY_F_EMPTY) === 0 && isStale(t)) {
        this.remove(s, t);
        removed++;
      }
      t = this.ceiling(s, end);
    }
    return removed;
  }

  /**
   * Link `n` private nodes, keys.ids[0..n) sorted by offset and not overlapping, into the empty
   * subtree s in O(n): the treap that n links would build (its shape follows from keys and
   * priorities alone), made on the right spine with a stack. Replay uses it for subtrees whose
   * keys do not overlap; anything else goes through insert().
   *
   * keys.offs and keys.lens hold each node's offset and length in the same order (the caller has
   * them in key order; reading them from the scattered nodes was a cache miss per key), and each
   * node gets a fresh priority here (a write per node instead of a read). stack and stack_prio
   * are scratch space of at least n entries.
   */
  buildSorted(
    s: number,
    keys: SortedKeys,
    n: number,
    stack: Int32Array,
    stack_prio: Uint32Array,
  ): void {
    if (this.count(s) !== 0) broken(`buildSorted: subtree ${s} is not empty`);
    const { ids, offs, lens } = keys;
    if (n > ids.length || n > offs.length || n > lens.length || n > stack.length || n > stack_prio.length) {
      broken(`buildSorted: ${n} keys do not fit the arrays`);
    }
    const links = this.links;
    const ends = this.ends;
    const prio = this.prio;
    let top = -1;
    let prev_end = -1;
    for (let i = 0; i < n; i++) {
      const id = ids[i];
      const off = offs[i];
      if (off < prev_end || lens[i] === 0) broken(`buildSorted: key ${id} at ${off} is out of order or empty`);
      this.checkRange(s, off, lens[i]);
      prev_end = off + lens[i];
      ends[2 * id] = prev_end;
      const p = this.nextPriority();
      prio[id] = p;
      // Nodes of lower priority on the right spine become id's left subtree.
      let last = NIL;
      while (top >= 0 && stack_prio[top] < p) last = stack[top--];
      links[4 * id + 2] = last;
      links[4 * id + 3] = NIL;
      if (top >= 0) links[4 * stack[top] + 3] = id;
      stack[++top] = id;
      stack_prio[top] = p;
    }
    links[this.root_base + s] = top >= 0 ? stack[0] : NIL;
    this.sub[s * SUB_WORDS + SUB_COUNT] = n;
  }

  /**
   * Check subtree s completely: search-tree order, heap order, keys sorted and non-overlapping,
   * len > 0, inside the subtree, no free node linked, count right. Throws AssertionError; returns
   * the number of keys. O(n); tests and debug only.
   */
  checkInvariants(s: number): number {
    const links = this.links;
    const off = this.off;
    const len = this.len;
    const prio = this.prio;
    // Iterative in-order walk with an explicit stack; the visit bound catches cycles.
    if (s < 0 || s >= this.n_subtrees) broken(`subtree ${s} out of range`);
    const stack: number[] = [];
    let t = links[this.root_base + s];
    let visited = 0;
    let prev_end = -1;
    let prev = NIL;
    while (t !== NIL || stack.length > 0) {
      while (t !== NIL) {
        if (t < 0 || t >= this.nodes_max) broken(`subtree ${s}: bad link ${t}`);
        if (links[4 * t + 3] === FREE_MARK) broken(`subtree ${s}: free node ${t} is linked`);
        const l = links[4 * t + 2];
        const r = links[4 * t + 3];
        if (l !== NIL && prio[l] > prio[t]) broken(`subtree ${s}: heap order broken at ${t} (left ${l})`);
        if (r !== NIL && prio[r] > prio[t]) broken(`subtree ${s}: heap order broken at ${t} (right ${r})`);
        stack.push(t);
        if (stack.length > this.nodes_max) broken(`subtree ${s}: cycle in links`);
        t = l;
      }
      t = stack.pop()!;
      visited++;
      if (visited > this.nodes_max) broken(`subtree ${s}: more nodes than the pool holds (cycle?)`);
      if (len[t] === 0) broken(`subtree ${s}: key ${t} has length 0`);
      this.checkRange(s, off[t], len[t]);
      if (off[t] < prev_end) broken(`subtree ${s}: key ${t} [${off[t]}, ${off[t] + len[t]}) overlaps or precedes key ${prev} ending at ${prev_end}`);
      prev_end = off[t] + len[t];
      if (this.ends[2 * t] !== prev_end) broken(`subtree ${s}: key ${t} [${off[t]}, ${prev_end}) has end ${this.ends[2 * t]} in its record`);
      prev = t;
      t = links[4 * t + 3];
    }
    const count = this.sub[s * SUB_WORDS + SUB_COUNT];
    if (visited !== count) broken(`subtree ${s}: ${visited} keys linked, count says ${count}`);
    return visited;
  }

  // ---------------------------------------------------------------- internals

  /**
   * The overlap fixup of insert/removeRange for K = [ks, ke), then linking k (NIL: nothing to
   * link). Each pass searches again from the root (the tree changed), which also purges stale
   * keys on the new path.
   */
  private fixup(s: number, ks: number, ke: number, spare: number, isStale: IsStale | null, k: number): InsertResult {
    const off = this.off;
    const len = this.len;
    const flags = this.flags;
    // Every pass deletes or cuts a key, or stops; the bound turns a broken tree into an assertion
    // instead of a hang.
    const pass_max = this.count(s) + 2;
    for (let pass = 0; ; pass++) {
      if (pass > pass_max) broken(`fixup of [${ks}, ${ke}) in subtree ${s} did not finish`);
      const t = this.search(s, ks, isStale);
      const slot = this.found_slot;
      if (t === NIL || off[t] >= ke) break; // nothing (further) overlaps: T is "before"
      const ts = off[t];
      const te = ts + len[t];
      const empty = (flags[t] & KEY_F_EMPTY) !== 0;
      if (ts >= ks) {
        if (te >= ke) {
          // tail (T == K included): T's bytes up to K.end are overwritten.
          if (empty || te === ke) {
            if (k === NIL) {
              this.removeAt(s, slot, t);
              return INSERT_OK;
            }
            // K sorts exactly where T was (everything before T ends <= ks, everything after T
            // starts >= te >= ke), so K takes T's place in the tree: the common "overwrite the
            // same block" costs one search.
            this.replaceAt(slot, t, k);
            if (this.debug) this.checkNeighbours(s, k);
            return INSERT_OK;
          }
          this.setSpan(t, ke, te - ke); // still sorted: every earlier key now ends <= ks <= ke
          this.seg_off[t] += ke - ts;
          break;
        }
        this.removeAt(s, slot, t); // contain
        continue;
      }
      if (te > ke) {
        // contained: T is the only key overlapping K.
        if (empty) {
          this.setSpan(t, ts, ks - ts);
          break;
        }
        if (spare === NIL) return INSERT_NEED_SPARE;
        if (spare < 0 || spare >= this.nodes_max || this.isFree(spare)) broken(`insert: bad spare ${spare}`);
        this.copyKey(spare, t);
        this.setSpan(t, ts, ks - ts);
        off[spare] = ke; // private until linked below, which sets its end
        len[spare] = te - ke;
        this.seg_off[spare] += ke - ts;
        this.link(s, spare);
        if (k !== NIL) this.link(s, k);
        return INSERT_OK_SPARE_USED;
      }
      // head: ks < te <= ke, and ts < ks so T keeps a non-empty front.
      this.setSpan(t, ts, ks - ts);
    }
    if (k !== NIL) this.link(s, k);
    return INSERT_OK;
  }

  /**
   * ceiling(s, x), remembering in found_slot the slot holding the result. With isStale, a stale
   * result is deleted (where it hangs) and the search starts again.
   */
  private search(s: number, x: number, isStale: IsStale | null): number {
    const links = this.links;
    const ends = this.ends;
    for (;;) {
      let slot = this.root_base + s;
      let t = links[slot];
      let res = NIL;
      let res_slot = slot;
      // One 16-byte record per level (end and links): this walk was the largest part of a 4 KiB
      // write's CPU time while offset, length and links sat in three arrays (three misses a level).
      while (t !== NIL) {
        if (ends[2 * t] > x) {
          res = t;
          res_slot = slot;
          slot = 4 * t + 2;
        } else {
          slot = 4 * t + 3;
        }
        t = links[slot];
      }
      if (res === NIL || isStale === null || (this.flags[res] & KEY_F_EMPTY) !== 0 || !isStale(res)) {
        this.found_slot = res_slot;
        return res;
      }
      this.removeAt(s, res_slot, res);
    }
  }

  /** Unlink node id, which hangs from links[slot] in subtree s, and free it. */
  private removeAt(s: number, slot: number, id: number): void {
    this.unlinkAt(s, slot, id);
    this.freeNode(id);
  }

  /** Unlink node id, which hangs from links[slot] in subtree s: its children's merge replaces it. */
  private unlinkAt(s: number, slot: number, id: number): void {
    const links = this.links;
    const prio = this.prio;
    // Treap merge of the children: repeatedly hang the higher-priority root of the two and
    // continue down its inner side.
    let a = links[4 * id + 2];
    let b = links[4 * id + 3];
    while (a !== NIL && b !== NIL) {
      if (prio[a] > prio[b]) {
        links[slot] = a;
        slot = 4 * a + 3;
        a = links[slot];
      } else {
        links[slot] = b;
        slot = 4 * b + 2;
        b = links[slot];
      }
    }
    links[slot] = a !== NIL ? a : b;
    links[4 * id + 2] = NIL;
    links[4 * id + 3] = NIL;
    this.sub[s * SUB_WORDS + SUB_COUNT]--;
  }

  /** Put private node k where t hangs (links[slot]), with t's children and priority; free t. */
  private replaceAt(slot: number, t: number, k: number): void {
    const links = this.links;
    this.ends[2 * k] = this.off[k] + this.len[k];
    links[4 * k + 2] = links[4 * t + 2];
    links[4 * k + 3] = links[4 * t + 3];
    this.prio[k] = this.prio[t];
    links[slot] = k;
    links[4 * t + 2] = NIL;
    links[4 * t + 3] = NIL;
    this.freeNode(t);
  }

  /** Treap insert of node k by off[k]; the caller guarantees it overlaps nothing. */
  private link(s: number, k: number): void {
    const links = this.links;
    const ends = this.ends;
    const prio = this.prio;
    // Keys do not overlap, so ordering by end is ordering by offset (and reads k's own record).
    const k_end = this.off[k] + this.len[k];
    ends[2 * k] = k_end;
    const pk = prio[k];
    // Descend while the nodes outrank k; k takes the place of the first one that does not.
    let slot = this.root_base + s;
    let t = links[slot];
    while (t !== NIL && prio[t] > pk) {
      slot = k_end < ends[2 * t] ? 4 * t + 2 : 4 * t + 3;
      t = links[slot];
    }
    // Split the subtree we displace into keys below k (k's left) and above k (k's right).
    let ls = 4 * k + 2;
    let rs = 4 * k + 3;
    while (t !== NIL) {
      if (ends[2 * t] < k_end) {
        links[ls] = t;
        ls = 4 * t + 3;
        t = links[ls];
      } else {
        links[rs] = t;
        rs = 4 * t + 2;
        t = links[rs];
      }
    }
    links[ls] = NIL;
    links[rs] = NIL;
    links[slot] = k;
    this.sub[s * SUB_WORDS + SUB_COUNT]++;
    if (this.debug) this.checkNeighbours(s, k);
  }

  private checkNeighbours(s: number, k: number): void {
    const start = this.off[k];
    const end = start + this.len[k];
    const c = this.ceiling(s, start);
    if (c !== k) broken(`key ${k} [${start}, ${end}) overlaps key ${c} before it`);
    const n = this.ceiling(s, end);
    if (n !== NIL && this.off[n] < end) broken(`key ${k} [${start}, ${end}) overlaps key ${n} after it`);
  }

  private checkPrivateKey(s: number, k: number): void {
    if (k < 0 || k >= this.nodes_max) broken(`bad node id ${k}`);
    if (this.links[4 * k + 3] === FREE_MARK) broken(`node ${k} is free`);
    if (this.len[k] === 0) broken(`key ${k} has length 0`);
    this.checkRange(s, this.off[k], this.len[k]);
  }

  /**
   * A key never crosses a 4 MiB boundary, and lives in the subtree of its offset. An index with a
   * single subtree accepts any offset: it is either a backing device of at most 4 MiB or a
   * private tree (writeback's per-kset dedup tree holds keys from everywhere).
   */
  private checkRange(s: number, off: number, len: number): void {
    if (s < 0 || s >= this.n_subtrees) broken(`subtree ${s} out of range`);
    if (off < 0 || !Number.isSafeInteger(off + len)) broken(`key offset ${off} out of range`);
    const first = Math.floor(off / SUBTREE_SPAN);
    if (first !== Math.floor((off + len - 1) / SUBTREE_SPAN)) broken(`key [${off}, ${off + len}) crosses a 4 MiB boundary`);
    if (this.n_subtrees !== 1 && first !== s) broken(`key at ${off} belongs to subtree ${first}, not ${s}`);
  }
}
