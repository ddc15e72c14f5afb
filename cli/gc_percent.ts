import { defineCommand } from "citty";
import { controlRequest } from "../core/control/client.ts";
import { GC_PERCENT_MAX, GC_PERCENT_MIN } from "../core/format/constants.ts";
import { fail, parseIntInRange, runCommand } from "./run.ts";
import { controlArgs, controlPathOf } from "./status.ts";

export const gcPercentCommand = defineCommand({
  meta: {
    name: "gc-percent",
    description: `Change a running server's GC threshold at once and persist it in cache_info (${GC_PERCENT_MIN}..${GC_PERCENT_MAX}).\nExample: pcache gc-percent 50 --cache /dev/shm/cache.img`,
  },
  args: {
    // Not `required`: citty would answer a missing or negative value ("-1" parses as a flag) with
    // its whole usage text instead of one line.
    percent: { type: "positional", description: `new threshold: used-segment percentage at which GC reclaims, ${GC_PERCENT_MIN}..${GC_PERCENT_MAX} (required)`, required: false },
    ...controlArgs,
  },
  run: ({ args, rawArgs }) =>
    runCommand(async () => {
      const text = args.percent ?? rawArgs.find((a) => /^-\d/.test(a));
      if (text === undefined) fail(`gc-percent: give the new threshold (${GC_PERCENT_MIN}..${GC_PERCENT_MAX}), e.g. pcache gc-percent 50 --cache DEV`);
      const value = parseIntInRange(String(text), "gc-percent", GC_PERCENT_MIN, GC_PERCENT_MAX);
      const path = controlPathOf(args);
      const r = (await controlRequest(path, { op: "gc_percent", value })) as { gc_percent: number; previous: number };
      process.stdout.write(`gc_percent ${r.gc_percent} (was ${r.previous}), persisted\n`);
    }),
});
