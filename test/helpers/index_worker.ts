/**
 * Worker for test/lock.test.ts: hammers shared locks, the shared key index and wait words from a
 * separate thread. One job per message; replies { ok: true, ... } or { ok: false, error }.
 */
import { assert } from "../../core/assert.ts";
import {
  INSERT_NEED_SPARE,
  INSERT_OK_SPARE_USED,
  KEY_F_CLEAN,
  KEY_F_EMPTY,
  KeyIndex,
  NIL,
  type KeyIndexShared,
} from "../../core/index/key_index.ts";
import { makeRng as rng } from "../../core/persist/sim.ts";
import { lock, tryLock, unlock } from "../../core/sync/lock.ts";
import { readWord, signal, waitChange, waitChangeAsync } from "../../core/sync/wait_word.ts";

export type IndexWorkerJob =
  | {
      /** cycles x (lock a random word, non-atomic read-modify-write of its counter, unlock). */
      kind: "locks";
      locks: SharedArrayBuffer;
      counters: SharedArrayBuffer;
      n_locks: number;
      cycles: number;
      seed: number;
    }
  | {
      /** cycles x (lock a subtree, insert/removeRange/remove/purge/fill, bump its counter, unlock). */
      kind: "index";
      shared: KeyIndexShared;
      /** Per subtree, incremented non-atomically under the subtree lock. */
      counters: SharedArrayBuffer;
      /** Per segment generation (Float64), bumped with a plain write under gen_lock. */
      gens: SharedArrayBuffer;
      gen_lock: SharedArrayBuffer;
      n_subtrees_used: number;
      /** Keys are placed in the first window_bytes of each subtree, so workers collide a lot. */
      window_bytes: number;
      cycles: number;
      seed: number;
    }
  | { kind: "signal"; words: SharedArrayBuffer; i: number; delay_ms: number }
  | { kind: "free_nodes"; shared: KeyIndexShared; ids: number[]; delay_ms: number }
  | { kind: "wait"; words: SharedArrayBuffer; i: number; seen: number; timeout_ms: number; async: boolean };

export type IndexWorkerReply =
  | { ok: true; kind: string; elapsed_ms: number; woken?: boolean; stats?: Record<string, number> }
  | { ok: false; error: string };

declare const self: Worker;


function sleepMs(ms: number): void {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
}

function runLocks(job: Extract<IndexWorkerJob, { kind: "locks" }>): Record<string, number> {
  const words = new Int32Array(job.locks);
  const counters = new Int32Array(job.counters);
  const r = rng(job.seed);
  let try_ok = 0;
  for (let c = 0; c < job.cycles; c++) {
    const j = Math.floor(r() * job.n_locks);
    if ((c & 7) === 0 && tryLock(words, j)) try_ok++;
    else lock(words, j);
    // Deliberately not atomic, with a gap between read and write: only the lock keeps it exact.
    const v = counters[j];
    for (let spin = (c & 3) * 8; spin > 0; spin--) counters[job.n_locks] ^= spin;
    counters[j] = v + 1;
    unlock(words, j);
  }
  return { try_ok };
}

function runIndex(job: Extract<IndexWorkerJob, { kind: "index" }>): Record<string, number> {
  const idx = new KeyIndex(job.shared);
  const counters = new Int32Array(job.counters);
  const gens = new Float64Array(job.gens);
  const gen_lock = new Int32Array(job.gen_lock);
  const n_segs = gens.length;
  const r = rng(job.seed);
  const int = (n: number): number => Math.floor(r() * n);
  const isStale = (id: number): boolean => idx.seg_gen[id] < gens[idx.cache_seg_id[id]];
  const stats = { inserts: 0, spare_used: 0, need_spare: 0, exhausted: 0, removes: 0, purged: 0, fills: 0, lost: 0, checks: 0 };
  const pending: { s: number; id: number; ver: number; off: number }[] = [];
  const SPAN = 4 * 1024 * 1024;

  for (let c = 0; c < job.cycles; c++) {
    const s = int(job.n_subtrees_used);
    const base = s * SPAN;
    idx.lockSubtree(s);
    try {
      const op = r();
      if (op < 0.75) {
        const k = idx.allocNode();
        if (k === NIL) {
          // Pool empty: make room like GC would, in the subtree we hold.
          stats.exhausted++;
          const t = idx.first(s);
          if (t !== NIL) idx.remove(s, t);
        } else {
          const len = 1 + int(r() < 0.97 ? 2048 : job.window_bytes);
          const off = base + int(job.window_bytes - len + 1);
          const empty = r() < 0.2;
          const seg = int(n_segs);
          idx.setKey(k, off, len, empty ? 0 : seg, int(1 << 20), empty ? 0 : gens[seg], empty ? KEY_F_EMPTY : 0);
          const spare = r() < 0.9 ? idx.allocNode() : NIL;
          const res = idx.insert(s, k, spare, isStale);
          if (res === INSERT_NEED_SPARE) {
            stats.need_spare++;
            idx.freeNode(k);
          } else {
            stats.inserts++;
            if (empty) pending.push({ s, id: k, ver: idx.ver[k], off });
          }
          if (res === INSERT_OK_SPARE_USED) stats.spare_used++;
          else if (spare !== NIL) idx.freeNode(spare);
        }
      } else if (op < 0.8) {
        const a = base + int(job.window_bytes);
        const b = Math.min(base + job.window_bytes, a + 1 + int(8192));
        const spare = idx.allocNode();
        const res = idx.removeRange(s, a, b, spare, isStale);
        if (res !== INSERT_OK_SPARE_USED && spare !== NIL) idx.freeNode(spare);
      } else if (op < 0.82) {
        const t = idx.ceiling(s, base + int(job.window_bytes));
        if (t !== NIL) {
          idx.remove(s, t);
          stats.removes++;
        }
      } else if (op < 0.85) {
        stats.purged += idx.purgeStale(s, isStale, 4);
      } else if (op < 0.853) {
        // Bump a segment generation (the real owner is the segment table, under its own lock,
        // which nests inside the subtree lock).
        lock(gen_lock, 0);
        const seg = int(n_segs);
        gens[seg] = gens[seg] + 1;
        unlock(gen_lock, 0);
      } else if (op < 0.86) {
        idx.checkInvariants(s);
        stats.checks++;
      }
      // Complete one of our placeholders in the subtree we hold (miss completion, §2.7).
      // Oldest first and not every time, so overlapping writes from other workers get a chance
      // to delete placeholders (and others to reuse their nodes) before they complete.
      for (let i = 0; i < pending.length && i < 4 && r() < 0.3; i++) {
        const p = pending[i];
        if (p.s !== s) continue;
        pending.splice(i, 1);
        if (idx.ver[p.id] !== p.ver) {
          stats.lost++;
          break;
        }
        // Same (id, ver): it must still be our placeholder, linked in s at its original offset.
        assert((idx.flags[p.id] & KEY_F_EMPTY) !== 0, `placeholder ${p.id} lost EMPTY but kept its ver`);
        assert(idx.off[p.id] === p.off && idx.ceiling(s, p.off) === p.id, `placeholder ${p.id} is not linked at ${p.off}`);
        const seg = int(n_segs);
        idx.cache_seg_id[p.id] = seg;
        idx.seg_gen[p.id] = gens[seg];
        idx.flags[p.id] = KEY_F_CLEAN;
        stats.fills++;
        break;
      }
      const v = counters[s];
      counters[s] = v + 1;
    } finally {
      idx.unlockSubtree(s);
    }
  }
  return stats;
}

async function run(job: IndexWorkerJob): Promise<IndexWorkerReply> {
  const t0 = performance.now();
  const done = (extra: Partial<{ woken: boolean; stats: Record<string, number> }> = {}): IndexWorkerReply => ({
    ok: true,
    kind: job.kind,
    elapsed_ms: performance.now() - t0,
    ...extra,
  });
  switch (job.kind) {
    case "locks":
      return done({ stats: runLocks(job) });
    case "index":
      return done({ stats: runIndex(job) });
    case "signal":
      sleepMs(job.delay_ms);
      signal(new Int32Array(job.words), job.i);
      return done();
    case "free_nodes": {
      sleepMs(job.delay_ms);
      const idx = new KeyIndex(job.shared);
      for (const id of job.ids) idx.freeNode(id);
      return done();
    }
    case "wait": {
      const words = new Int32Array(job.words);
      const woken = job.async
        ? await waitChangeAsync(words, job.i, job.seen, job.timeout_ms)
        : waitChange(words, job.i, job.seen, job.timeout_ms);
      return done({ woken, stats: { seq: readWord(words, job.i) } });
    }
  }
}

self.onmessage = (ev: MessageEvent<IndexWorkerJob>) => {
  run(ev.data).then(
    (reply) => self.postMessage(reply),
    (err: unknown) => self.postMessage({ ok: false, error: err instanceof Error ? `${err.message}\n${err.stack}` : String(err) }),
  );
};
