/**
 * Zero a device range durably, writing only the 4 KiB blocks that are not zero already. Log
 * segments are zeroed before the log rolls into them; most of a reused segment's area often is
 * zero already, and on a page-cache file every written page costs an msync.
 */
import { isAllZero } from "../format/bytes.ts";
import type { PersistDomain } from "./domain.ts";

const BLOCK_BYTES = 4096;


/** Zero [dev_off, dev_off + len) and flush what was written; the caller fences. */
export function zeroRange(dom: PersistDomain, dev_off: number, len: number): void {
  let run_start = -1;
  const end = dev_off + len;
  for (let at = dev_off; at < end; at += BLOCK_BYTES) {
    const n = Math.min(BLOCK_BYTES, end - at);
    const dirty = !isAllZero(dom.view(at, n));
    if (dirty && run_start < 0) run_start = at;
    if (!dirty && run_start >= 0) {
      dom.fill(run_start, at - run_start, 0);
      dom.flush(run_start, at - run_start);
      run_start = -1;
    }
  }
  if (run_start >= 0) {
    dom.fill(run_start, end - run_start, 0);
    dom.flush(run_start, end - run_start);
  }
}
