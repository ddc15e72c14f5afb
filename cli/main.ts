#!/usr/bin/env bun
/** pcache: a persistent-memory write-back block cache (Linux dm-pcache format), served over NBD. */
import { defineCommand, runMain } from "citty";
import { drainCommand } from "./drain.ts";
import { dumpKsetsCommand } from "./dump_ksets.ts";
import { formatCommand } from "./format.ts";
import { gcPercentCommand } from "./gc_percent.ts";
import { infoCommand } from "./info.ts";
import { serveCommand } from "./serve.ts";
import { statusCommand } from "./status.ts";

export const VERSION = "0.1.0";

const main = defineCommand({
  meta: {
    name: "pcache",
    version: VERSION,
    description: "Persistent write-back block cache (dm-pcache format) exported over NBD.\nExample: pcache serve   (uses a data folder and listens on nbd://127.0.0.1:10809/pcache)",
  },
  subCommands: {
    format: formatCommand,
    info: infoCommand,
    "dump-ksets": dumpKsetsCommand,
    serve: serveCommand,
    status: statusCommand,
    "gc-percent": gcPercentCommand,
    drain: drainCommand,
  },
});

runMain(main);
