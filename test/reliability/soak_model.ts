/**
 * The durability model of the kill soak, per 4 KiB block, and the data it writes.
 *
 * Every write has an id (1, 2, ...; 0 is "never written", i.e. zeroes) and its bytes are a pure
 * function of (seed, id, block), so nothing but ids is stored. Per block the model keeps:
 *   floor: the write whose value is guaranteed (acknowledged before a completed FLUSH, or an
 *          acknowledged FUA write, or the value read back after the last restart);
 *   cand:  ids of the writes issued to the block since the floor, in issue order.
 * After a crash a block may read the floor's value or any candidate's. The contract is per byte,
 * so a block whose bytes mix those values (a write split over two ksets) is legal too: it is
 * reported as torn and the caller rewrites it. The writer never has two overlapping writes in
 * flight, so per block issue order is also completion order, and promoting a write drops every
 * older candidate.
 */

export const BLOCK_BYTES = 4096;
const BLOCK_WORDS = BLOCK_BYTES / 4;
/** "soak" — first word of every block the soak writes. */
const BLOCK_MAGIC = 0x6b616f73;

/** Fills one block's words with the content of write `id` at `block` (id 0 = zeroes). */
export function fillBlock(dst: Uint32Array, seed: number, id: number, block: number): void {
  if (id === 0) {
    dst.fill(0);
    return;
  }
  dst[0] = BLOCK_MAGIC;
  dst[1] = id;
  dst[2] = block;
  dst[3] = seed >>> 0;
  let x = (Math.imul(id, 0x9e3779b1) ^ Math.imul(block + 1, 0x85ebca6b) ^ seed) >>> 0 || 1;
  for (let i = 4; i < BLOCK_WORDS; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    dst[i] = x;
  }
}

export type BlockVerdict = { kind: "ok"; id: number } | { kind: "torn" } | { kind: "bad"; why: string };

export class DurabilityModel {
  readonly floor: Uint32Array;
  private readonly cand: Array<number[] | undefined>;
  private readonly scratch = new Uint32Array(BLOCK_WORDS);

  constructor(
    readonly blocks: number,
    readonly seed: number,
  ) {
    this.floor = new Uint32Array(blocks);
    this.cand = new Array(blocks);
  }

  /** The bytes of write `id` over blocks [first, first + n). */
  data(id: number, first: number, n: number): Uint8Array {
    const words = new Uint32Array(n * BLOCK_WORDS);
    for (let i = 0; i < n; i++) fillBlock(words.subarray(i * BLOCK_WORDS, (i + 1) * BLOCK_WORDS), this.seed, id, first + i);
    return new Uint8Array(words.buffer);
  }

  /** A write was sent: its value becomes possible for its blocks. */
  issue(id: number, first: number, n: number): void {
    for (let b = first; b < first + n; b++) (this.cand[b] ??= []).push(id);
  }

  /** The write is now guaranteed (covered by a completed FLUSH, or an acknowledged FUA write). */
  promote(id: number, first: number, n: number): void {
    for (let b = first; b < first + n; b++) {
      const c = this.cand[b];
      const i = c ? c.indexOf(id) : -1;
      // Absent: a newer write to the block was promoted first; it already supersedes this one.
      if (i < 0) continue;
      this.floor[b] = id;
      this.cand[b] = i + 1 === c!.length ? undefined : c!.slice(i + 1);
    }
  }

  /** After a restart: what the block holds now is its floor, with nothing pending. */
  settle(block: number, id: number): void {
    this.floor[block] = id;
    this.cand[block] = undefined;
  }

  allowed(block: number): number[] {
    return [this.floor[block]!, ...(this.cand[block] ?? [])];
  }

  /** Checks one block read back after a restart. `data` must be 4-byte aligned. */
  check(block: number, data: Uint8Array): BlockVerdict {
    const w = new Uint32Array(data.buffer, data.byteOffset, BLOCK_WORDS);
    const allowed = this.allowed(block);
    const id = this.identify(block, w);
    if (id !== null && allowed.includes(id)) {
      fillBlock(this.scratch, this.seed, id, block);
      if (wordsEqual(this.scratch, w)) return { kind: "ok", id };
    }
    // Slow path: every byte must still come from one of the allowed values.
    const values = allowed.map((a) => {
      const v = new Uint32Array(BLOCK_WORDS);
      fillBlock(v, this.seed, a, block);
      return new Uint8Array(v.buffer);
    });
    for (let i = 0; i < BLOCK_BYTES; i++) {
      if (!values.some((v) => v[i] === data[i])) {
        const seen = id === null ? "unrecognised data" : `data of write ${id}`;
        return { kind: "bad", why: `byte ${i} is 0x${data[i]!.toString(16)} (${seen}); allowed writes ${describeIds(allowed)}` };
      }
    }
    return { kind: "torn" };
  }

  private identify(block: number, w: Uint32Array): number | null {
    if (w[0] === BLOCK_MAGIC && w[2] === block && w[3] === this.seed >>> 0) return w[1]!;
    for (let i = 0; i < BLOCK_WORDS; i++) if (w[i] !== 0) return null;
    return 0;
  }
}

function wordsEqual(a: Uint32Array, b: Uint32Array): boolean {
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

function describeIds(ids: number[]): string {
  const shown = ids.length > 8 ? [...ids.slice(0, 4), "...", ...ids.slice(-3)] : ids;
  return `[${shown.join(", ")}] (0 = zeroes)`;
}
