/**
 * The engine behind the NBD server's export interface. The NBD layer has already validated
 * ranges and flags; the engine checks again (both sides of the boundary).
 */
import type { NbdExport, WriteData } from "../nbd/export.ts";
import type { Engine } from "./engine.ts";

export class EngineExport implements NbdExport {
  constructor(
    private readonly engine: Engine,
    readonly read_only: boolean,
  ) {}

  get size_bytes(): number {
    return this.engine.size_bytes;
  }

  read(off: number, len: number, dst: Uint8Array): Promise<void> | undefined {
    return this.engine.readNow(off, len, dst);
  }

  write(off: number, data: WriteData, fua: boolean): Promise<void> | undefined {
    return this.engine.writeNow(off, data, fua);
  }

  flush(): Promise<void> {
    return this.engine.flush();
  }

  trim(off: number, len: number, fua: boolean): Promise<void> {
    return this.engine.trim(off, len, fua);
  }

  /** Zeroing is always fast here (a key pointing at the zero extent), so FAST_ZERO never fails. */
  writeZeroes(off: number, len: number, opts: { fua: boolean; no_hole: boolean; fast_zero: boolean }): Promise<void> {
    return this.engine.writeZeroes(off, len, { fua: opts.fua });
  }

  cache(off: number, len: number): Promise<void> {
    return this.engine.cache(off, len);
  }

  blockStatus(off: number, len: number): Promise<Array<{ length: number; flags: number }>> {
    return this.engine.blockStatus(off, len);
  }
}
