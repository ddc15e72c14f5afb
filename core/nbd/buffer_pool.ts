/**
 * Reuses large buffers (READ replies). A fresh 1 MiB Uint8Array is
 * page-faulted and zeroed on first touch: copying into it ran at about 5 GiB/s against
 * 18 GiB/s for a reused one (measured on this box), and it was the top cost of 1 MiB
 * reads and writes in a CPU profile of the server.
 *
 * A pooled buffer is not cleared between uses, so each pool must only ever hold one kind of
 * data: the server's pool holds READ replies only (bytes the export already shows every
 * client). WRITE payloads are not gathered: the export copies them from the receive chunks.
 */
export class BufferPool {
  /** Free buffers by size class. */
  private readonly free = new Map<number, Uint8Array[]>();
  /** Buffers this pool created and has handed out (weak: a buffer never returned is just collected). */
  private readonly out = new WeakSet<ArrayBufferLike>();
  private free_bytes = 0;

  constructor(
    /** Most bytes kept in free lists; beyond this, released buffers are left to the GC. */
    readonly free_bytes_max = 32 * 1024 * 1024,
    /**
     * Smaller requests are plain allocations (kept in the JS heap, which the GC sees). From 4 KiB
     * up, buffers live outside it: at tens of thousands of 4 KiB requests a second, fresh ones
     * piled up between collections (resident memory swung by 200 MiB in a 10-minute soak).
     */
    readonly pooled_bytes_min = 4096,
  ) {}

  /**
   * Size classes: powers of two from 4 KiB to 64 KiB, then multiples of 64 KiB, so a READ of N
   * plus its header mostly shares N's class.
   */
  static classBytes(n: number): number {
    if (n > 65536) return Math.ceil(n / 65536) * 65536;
    let cls = 4096;
    while (cls < n) cls *= 2;
    return cls;
  }

  /** A view of exactly `n` bytes. Contents are unspecified when it comes from the pool. */
  acquire(n: number): Uint8Array {
    if (n < this.pooled_bytes_min) return new Uint8Array(n);
    const cls = BufferPool.classBytes(n);
    const list = this.free.get(cls);
    let whole = list?.pop();
    if (whole) this.free_bytes -= cls;
    else whole = new Uint8Array(cls);
    this.out.add(whole.buffer);
    return whole.subarray(0, n);
  }

  /**
   * Returns the buffer behind `view` (any view of an acquired buffer). Views of other memory
   * and second releases are ignored, so callers may release anything they sent.
   */
  release(view: Uint8Array): void {
    const ab = view.buffer;
    if (ab.byteLength < this.pooled_bytes_min || !this.out.has(ab)) return;
    this.out.delete(ab);
    if (this.free_bytes + ab.byteLength > this.free_bytes_max) return;
    const cls = ab.byteLength;
    let list = this.free.get(cls);
    if (!list) this.free.set(cls, (list = []));
    list.push(new Uint8Array(ab));
    this.free_bytes += cls;
  }

  get pooled_free_bytes(): number {
    return this.free_bytes;
  }
}
