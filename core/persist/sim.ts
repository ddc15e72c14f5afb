/**
 * The `sim` persistence domain: an in-memory cache device that knows which bytes are durable.
 *
 * It follows the strictest reading of the PersistDomain contract: a 64-byte line becomes durable
 * only when it was flushed and a fence followed. For every line written since it was last durable
 * the simulator keeps the durable content (and, once flushed, the content at flush time), so a
 * "crash" can keep or drop each unpersisted line at random (seeded) and hand back the image a real
 * machine might have had after power loss.
 *
 * Crash points: `crash_at_fence` stops the world at the Nth fence (before it takes effect);
 * `crash_at_write` at the Nth write or fill. From then on every call throws SimCrash, so the code
 * under test unwinds and the test reopens the image with recover().
 */
import { assert } from "../assert.ts";
import { SEG_SIZE, SEGMENTS_OFF } from "../format/constants.ts";
import { CACHE_LINE_BYTES, type PersistDomain } from "./domain.ts";

/** Thrown by every call of a crashed SimDomain. */
export class SimCrash extends Error {
  override name = "SimCrash";
}

export interface SimOptions {
  /** Seed of the generator that decides which unpersisted lines survive a crash. */
  seed?: number;
  /** Existing memory (e.g. the image after a crash, or a SharedArrayBuffer shared with workers). */
  memory?: ArrayBuffer | SharedArrayBuffer;
  /** Track durability (off = a plain memory device, for tests that never crash). Default on. */
  track?: boolean;
}

const LINE_DIRTY = 1;
const LINE_FLUSHED = 2;

/** Small seeded generator (xorshift32); deterministic across runs. */
export function makeRng(seed: number): () => number {
  // Scramble the seed first so that small neighbouring seeds give unrelated sequences.
  let x = Math.imul((seed >>> 0) ^ 0x9e3779b9, 0x85ebca6b) >>> 0;
  x = Math.imul(x ^ (x >>> 13), 0xc2b2ae35) >>> 0;
  x = (x ^ (x >>> 16)) >>> 0 || 0x9e3779b9;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x / 0x1_0000_0000;
  };
}

export class SimDomain implements PersistDomain {
  readonly name = "sim" as const;
  readonly size_bytes: number;
  readonly memory: ArrayBuffer | SharedArrayBuffer;
  private readonly bytes: Uint8Array;
  private readonly track: boolean;
  private readonly rng: () => number;
  /** Per line: 0 clean (durable = current), LINE_DIRTY, LINE_FLUSHED. */
  private readonly line_state: Uint8Array;
  /** Durable content of every non-clean line. */
  private readonly durable = new Map<number, Uint8Array>();
  /** Content at flush time of every LINE_FLUSHED line. */
  private readonly snapshot = new Map<number, Uint8Array>();
  private crashed = false;

  fence_count = 0;
  write_count = 0;
  crash_at_fence = -1;
  crash_at_write = -1;

  constructor(size_bytes: number, opts: SimOptions = {}) {
    assert(Number.isSafeInteger(size_bytes) && size_bytes > 0, "sim size must be a positive integer");
    this.size_bytes = size_bytes;
    this.memory = opts.memory ?? new ArrayBuffer(size_bytes);
    assert(this.memory.byteLength >= size_bytes, "sim memory smaller than the device");
    this.bytes = new Uint8Array(this.memory, 0, size_bytes);
    this.track = opts.track ?? true;
    this.rng = makeRng(opts.seed ?? 1);
    this.line_state = new Uint8Array(this.track ? Math.ceil(size_bytes / CACHE_LINE_BYTES) : 0);
  }

  view(dev_off: number, len: number): Uint8Array {
    this.checkRange(dev_off, len);
    return this.bytes.subarray(dev_off, dev_off + len);
  }

  write(dev_off: number, src: Uint8Array): void {
    this.beforeStore(dev_off, src.length);
    this.bytes.set(src, dev_off);
  }

  fill(dev_off: number, len: number, byte: number): void {
    this.beforeStore(dev_off, len);
    this.bytes.fill(byte, dev_off, dev_off + len);
  }

  flush(dev_off: number, len: number): void {
    this.alive();
    this.checkRange(dev_off, len);
    if (!this.track || len === 0) return;
    const first = Math.floor(dev_off / CACHE_LINE_BYTES);
    const last = Math.floor((dev_off + len - 1) / CACHE_LINE_BYTES);
    for (let line = first; line <= last; line++) {
      if (this.line_state[line] === 0) continue;
      this.snapshot.set(line, this.lineCopy(line));
      this.line_state[line] = LINE_FLUSHED;
    }
  }

  fence(): void {
    this.alive();
    this.fence_count++;
    if (this.fence_count === this.crash_at_fence) this.crashNow();
    if (!this.track) return;
    for (const [line, snap] of this.snapshot) {
      if (equalBytes(snap, this.lineView(line))) {
        this.durable.delete(line);
        this.line_state[line] = 0;
      } else {
        // Written again after the flush: the flushed content is durable, the newer is not.
        this.durable.set(line, snap);
        this.line_state[line] = LINE_DIRTY;
      }
    }
    this.snapshot.clear();
  }

  describe(): string {
    return this.track ? "sim: simulated persistence (crash testing)" : "sim: plain memory";
  }

  close(): void {
    // Nothing to release: the memory belongs to the test, which may recover() it.
  }

  /** Lines written but not yet durable. */
  unpersistedLines(): number {
    return this.durable.size;
  }

  /** Stop the world now: every later call throws SimCrash. */
  crashNow(): never {
    this.crashed = true;
    throw new SimCrash(`simulated crash at fence ${this.fence_count}, write ${this.write_count}`);
  }

  get isCrashed(): boolean {
    return this.crashed;
  }

  /**
   * The image after power loss: every line that was not durable keeps its current content, its
   * durable content or (if it was flushed) its content at flush time, chosen at random. Applied to
   * the memory in place; returns a fresh domain over it with nothing unpersisted.
   */
  recover(opts: { seed?: number; keep_all?: boolean } = {}): SimDomain {
    assert(this.track, "recover() needs a tracking sim domain");
    const rng = opts.seed === undefined ? this.rng : makeRng(opts.seed);
    for (const [line, old] of this.durable) {
      if (opts.keep_all) continue;
      const choice = rng();
      const snap = this.snapshot.get(line);
      if (snap !== undefined && choice < 1 / 3) this.bytes.set(snap, line * CACHE_LINE_BYTES);
      else if (choice < 2 / 3) this.bytes.set(old, line * CACHE_LINE_BYTES);
      // else: the current content reached the media.
    }
    this.durable.clear();
    this.snapshot.clear();
    this.line_state.fill(0);
    this.crashed = true;
    return new SimDomain(this.size_bytes, { memory: this.memory, seed: Math.floor(rng() * 0xffffffff), track: true });
  }

  private beforeStore(dev_off: number, len: number): void {
    this.alive();
    this.checkRange(dev_off, len);
    this.write_count++;
    if (this.write_count === this.crash_at_write) this.crashNow();
    if (!this.track || len === 0) return;
    const first = Math.floor(dev_off / CACHE_LINE_BYTES);
    const last = Math.floor((dev_off + len - 1) / CACHE_LINE_BYTES);
    for (let line = first; line <= last; line++) {
      if (this.line_state[line] === 0) {
        this.durable.set(line, this.lineCopy(line));
        this.line_state[line] = LINE_DIRTY;
      }
    }
  }

  private lineView(line: number): Uint8Array {
    const start = line * CACHE_LINE_BYTES;
    return this.bytes.subarray(start, Math.min(start + CACHE_LINE_BYTES, this.size_bytes));
  }

  private lineCopy(line: number): Uint8Array {
    return this.lineView(line).slice();
  }

  private alive(): void {
    if (this.crashed) throw new SimCrash("sim domain has crashed");
  }

  /** Same rule as the mapped domains: ranges stay inside the metadata area or one segment. */
  private checkRange(dev_off: number, len: number): void {
    assert(Number.isSafeInteger(dev_off) && Number.isSafeInteger(len) && dev_off >= 0 && len >= 0, `bad range ${dev_off}+${len}`);
    assert(dev_off + len <= this.size_bytes, `range ${dev_off}+${len} past device end ${this.size_bytes}`);
    if (len === 0) return;
    if (dev_off < SEGMENTS_OFF) {
      assert(dev_off + len <= SEGMENTS_OFF, `range ${dev_off}+${len} crosses into the segment area`);
      return;
    }
    const seg = Math.floor((dev_off - SEGMENTS_OFF) / SEG_SIZE);
    const seg_end = SEGMENTS_OFF + (seg + 1) * SEG_SIZE;
    assert(dev_off + len <= seg_end, `range ${dev_off}+${len} crosses the end of segment ${seg}`);
  }
}

function equalBytes(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}
