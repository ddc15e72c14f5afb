/**
 * Fill a formatted cache's key log offline, with the real engine and no writeback or GC, so the
 * benchmark can time replay (many keys) and writeback (a known amount of dirty data) without
 * first pushing every write through NBD. Run in its own process by bench/extra.ts:
 *
 *   bun bench/build_log.ts --cache C --backing B --keys N --len-bytes L
 *
 * Prints one JSON line: { keys, len_bytes, elapsed_ms, key_head: [cache_seg_id, seg_off] }.
 * Offsets are distinct (slot i goes to (i * STRIDE) mod slots, STRIDE odd and slots a power of
 * two, so no key overlaps another and replay keeps all of them in the index).
 */
import { openCacheDevice } from "../core/device/cache_device.ts";
import { openBackingFile } from "../core/device/file_backing.ts";
import { Engine } from "../core/engine/engine.ts";
import { POS_KEY_HEAD } from "../core/engine/shared_state.ts";

/** An odd multiplier: consecutive writes land far apart, like random writes. */
const STRIDE = 2_654_435_761;
/** Writes in flight at once (the engine is in-process, so this only hides await overhead). */
const BATCH = 64;
const KEYS_MAX = 16 * 1024 * 1024;

interface BuildArgs {
  cache: string;
  backing: string;
  keys: number;
  len_bytes: number;
}

function parseArgs(argv: string[]): BuildArgs {
  const get = (name: string): string => {
    const i = argv.indexOf(`--${name}`);
    if (i < 0 || i + 1 >= argv.length) throw new Error(`build_log: --${name} is required`);
    return argv[i + 1];
  };
  const keys = Number(get("keys"));
  const len_bytes = Number(get("len-bytes"));
  if (!Number.isInteger(keys) || keys < 1 || keys > KEYS_MAX) throw new Error(`build_log: --keys must be 1..${KEYS_MAX}`);
  if (!Number.isInteger(len_bytes) || len_bytes < 512 || len_bytes % 512 !== 0 || len_bytes > 1 << 20) {
    throw new Error("build_log: --len-bytes must be a multiple of 512 up to 1 MiB");
  }
  return { cache: get("cache"), backing: get("backing"), keys, len_bytes };
}

/** Largest power of two <= n. */
function floorPow2(n: number): number {
  return 2 ** Math.floor(Math.log2(n));
}

async function build(a: BuildArgs): Promise<void> {
  const cache = openCacheDevice(a.cache);
  const backing = openBackingFile(a.backing);
  try {
    const slots = floorPow2(Math.floor(backing.size_bytes / a.len_bytes));
    if (slots < a.keys) throw new Error(`build_log: backing holds ${slots} slots of ${a.len_bytes} bytes, fewer than ${a.keys} keys`);
    const engine = Engine.open(cache.domain, backing);
    const data = new Uint8Array(a.len_bytes).fill(0xa5);
    const t0 = performance.now();
    for (let i = 0; i < a.keys; i += BATCH) {
      const batch: Promise<void>[] = [];
      for (let j = i; j < Math.min(i + BATCH, a.keys); j++) {
        const slot = Number((BigInt(j) * BigInt(STRIDE)) % BigInt(slots));
        batch.push(engine.write(slot * a.len_bytes, data, false));
      }
      await Promise.all(batch);
    }
    await engine.close();
    const elapsed_ms = performance.now() - t0;
    const s = engine.ctx.s;
    const key_head = [s.pos[POS_KEY_HEAD], s.pos[POS_KEY_HEAD + 1]];
    process.stdout.write(`${JSON.stringify({ keys: a.keys, len_bytes: a.len_bytes, elapsed_ms, key_head })}\n`);
  } finally {
    cache.close();
    backing.close();
  }
}

try {
  await build(parseArgs(process.argv.slice(2)));
  process.exit(0);
} catch (err) {
  process.stderr.write(`${(err as Error).message}\n`);
  process.exit(1);
}
