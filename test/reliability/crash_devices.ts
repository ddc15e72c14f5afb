/**
 * The crash explorer's devices: one shared 512 MiB cache memory reused case after case, a sim
 * domain over it that records where it stores, and a backing device that loses power together
 * with the cache domain (and can be where the power fails).
 */
import { MemoryBacking } from "../../core/device/memory_backing.ts";
import { MiB } from "../../core/format/constants.ts";
import { SimCrash, SimDomain } from "../../core/persist/sim.ts";
import { CACHE_BYTES, pattern } from "../helpers/engine_harness.ts";

/** Granularity of the record of which parts of the shared cache memory a case wrote. */
const CHUNK_BYTES = MiB;

/**
 * One 512 MiB buffer serves every case in turn: allocating (and freeing) one per case costs far
 * more than the case. Stores are recorded per MiB so the next case zeroes only what was written.
 */
export class CacheMemory {
  private static shared: CacheMemory | null = null;
  readonly memory = new ArrayBuffer(CACHE_BYTES);
  readonly touched = new Uint8Array(CACHE_BYTES / CHUNK_BYTES);
  busy = false;

  /** Let the shared buffer go (after a run, so the rest of a test process does not keep it). */
  static release(): void {
    if (CacheMemory.shared !== null && !CacheMemory.shared.busy) CacheMemory.shared = null;
  }

  /** The shared buffer, zeroed; a private one when another case holds it. */
  static take(): CacheMemory {
    const m = CacheMemory.shared !== null && !CacheMemory.shared.busy ? CacheMemory.shared : new CacheMemory();
    CacheMemory.shared ??= m;
    const bytes = new Uint8Array(m.memory);
    for (let c = 0; c < m.touched.length; c++) {
      if (m.touched[c] === 0) continue;
      bytes.fill(0, c * CHUNK_BYTES, (c + 1) * CHUNK_BYTES);
      m.touched[c] = 0;
    }
    m.busy = true;
    return m;
  }

  mark(dev_off: number, len: number): void {
    if (len === 0) return;
    for (let c = Math.floor(dev_off / CHUNK_BYTES); c <= Math.floor((dev_off + len - 1) / CHUNK_BYTES); c++) this.touched[c] = 1;
  }
}

/** A sim domain over the shared cache memory that records where it stores. */
export class RecordingSim extends SimDomain {
  constructor(
    readonly mem: CacheMemory,
    opts: { seed: number; track: boolean },
  ) {
    super(CACHE_BYTES, { ...opts, memory: mem.memory });
  }

  override write(dev_off: number, src: Uint8Array): void {
    this.mem.mark(dev_off, src.length);
    super.write(dev_off, src);
  }

  override fill(dev_off: number, len: number, byte: number): void {
    this.mem.mark(dev_off, len);
    super.fill(dev_off, len, byte);
  }
}

/** A backing device that loses power with the cache: it can also be the place the crash happens. */
export class CrashBacking extends MemoryBacking {
  io_no = 0;
  crash_at_io = -1;

  constructor(
    private readonly dom: SimDomain,
    bytes: Uint8Array,
  ) {
    super(bytes.length, { bytes: bytes.slice(), name: "crash-backing" });
  }

  /** Power loss can strike at any write or flush (a flush that never completes keeps nothing). */
  private alive(is_io: boolean): void {
    if (this.dom.isCrashed) throw new SimCrash("power is off (backing device)");
    if (!is_io) return;
    this.io_no++;
    if (this.io_no === this.crash_at_io) this.dom.crashNow();
  }

  override read(off: number, dst: Uint8Array): Promise<void> {
    this.alive(false);
    return super.read(off, dst);
  }

  override write(off: number, src: Uint8Array): Promise<void> {
    this.alive(true);
    return super.write(off, src);
  }

  override writeZeroes(off: number, len: number): Promise<void> {
    this.alive(true);
    return super.writeZeroes(off, len);
  }

  override flush(): Promise<void> {
    this.alive(true);
    return super.flush();
  }
}

/** A seeded initial backing image: a pattern of a prime length repeated (cheap, never 4 KiB-periodic). */
export function tiled(len: number, seed: number): Uint8Array {
  const tile = pattern(65_521, seed);
  const out = new Uint8Array(len);
  for (let at = 0; at < len; at += tile.length) out.set(tile.subarray(0, Math.min(tile.length, len - at)), at);
  return out;
}
