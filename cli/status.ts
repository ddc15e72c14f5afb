import { defineCommand } from "citty";
import { controlRequest } from "../core/control/client.ts";
import { resolveControlPath } from "../core/control/paths.ts";
import { toPrometheus } from "../core/control/prometheus.ts";
import type { StatusSnapshot } from "../core/control/status.ts";
import { formatStatusText } from "../core/control/text.ts";
import { dataDirCache } from "./data_dir.ts";
import { fail, runCommand } from "./run.ts";

/** How the client commands find a server: its control socket, or the cache it serves. */
export const controlArgs = {
  cache: { type: "string", description: "the cache device the server uses (finds its default control socket; default: the data folder's, if there is one)" },
  control: { type: "string", description: "the server's control socket, as printed by serve after control:" },
} as const;

/** The control socket named by --control or --cache, else the one of a server on the data folder. */
export function controlPathOf(args: { control?: string; cache?: string }): string {
  const cache = args.cache || dataDirCache();
  if (!args.control && !cache) fail("name the server: --cache DEV (the cache it serves) or --control PATH (its control socket); the data folder holds no cache");
  return resolveControlPath({ control: args.control, cache });
}

export const statusCommand = defineCommand({
  meta: {
    name: "status",
    description:
      "Show a running server's state: dm-pcache's status fields, dirty bytes, hits and misses, writeback, GC, errors, workers.\nExample: pcache status --cache /dev/shm/cache.img --format prometheus",
  },
  args: {
    ...controlArgs,
    json: { type: "boolean", description: "one JSON document (same as --format json)", default: false },
    format: { type: "string", description: "text, json or prometheus (text exposition format)", default: "text" },
  },
  run: ({ args }) =>
    runCommand(async () => {
      const format = args.json ? "json" : args.format;
      if (format !== "text" && format !== "json" && format !== "prometheus") fail(`--format must be text, json or prometheus, not "${format}"`);
      const path = controlPathOf(args);
      const st = (await controlRequest(path, { op: "status" })) as StatusSnapshot;
      if (format === "json") process.stdout.write(`${JSON.stringify(st, null, 2)}\n`);
      else if (format === "prometheus") process.stdout.write(toPrometheus(st));
      else process.stdout.write(formatStatusText(st));
    }),
});
