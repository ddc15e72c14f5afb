/**
 * Build: the native helper library, then the single executable.
 *
 *   bun scripts/build.ts               .so + dist/pcache
 *   bun scripts/build.ts --native-only .so only (what tests need)
 *
 * The .so is compiled for baseline x86-64 (no -m flags): the functions that use clwb,
 * clflushopt or SSE4.2 carry their own target attributes and are chosen at run time from
 * CPUID, so the binary loads and runs on any x86-64 CPU. Workers are extra entry points of the
 * compile (a compiled binary cannot load a worker file it was not given).
 */
import { existsSync, readdirSync, renameSync } from "node:fs";
import { join } from "node:path";

const root = join(import.meta.dir, "..");
const native_src = join(root, "ffi/native/pmhelpers.c");
const native_so = join(root, "ffi/native/libpmhelpers.so");

function run(cmd: string[], what: string): void {
  let r: ReturnType<typeof Bun.spawnSync>;
  try {
    r = Bun.spawnSync(cmd, { cwd: root, stdout: "inherit", stderr: "inherit" });
  } catch (e) {
    console.error(`build: ${what} could not be started: ${(e as Error).message}`);
    process.exit(1);
  }
  if (r.exitCode !== 0) {
    console.error(`build: ${what} failed (exit ${r.exitCode ?? r.signalCode}): ${cmd.join(" ")}`);
    process.exit(1);
  }
}

function buildNative(): void {
  if (process.arch !== "x64") {
    console.log(`build: skipping ${native_so}: the helpers are x86-64 only (this is ${process.arch}); pcache will use its fallback`);
    return;
  }
  // Compile to a temporary name and rename: rewriting a .so in place would crash (SIGBUS) any
  // process that has it mapped, e.g. a test run in progress.
  const tmp = `${native_so}.${process.pid}.tmp`;
  run(["gcc", "-O2", "-shared", "-fPIC", "-Wall", "-Wextra", "-Werror", "-o", tmp, native_src], "gcc");
  renameSync(tmp, native_so);
  console.log(`build: ${native_so}`);
}

function buildExecutable(): void {
  const main = join(root, "cli/main.ts");
  if (!existsSync(main)) {
    console.log("build: cli/main.ts does not exist yet; skipping the compile of dist/pcache");
    return;
  }
  const workers_dir = join(root, "workers");
  const workers = existsSync(workers_dir)
    ? readdirSync(workers_dir).filter((f) => f.endsWith(".ts") && !f.endsWith(".d.ts")).sort().map((f) => `workers/${f}`)
    : [];
  run(
    [process.execPath, "build", "--compile", "--minify", "--bytecode", "--format=esm", "cli/main.ts", ...workers, "--outfile", "dist/pcache"],
    "bun build --compile",
  );
  console.log(`build: dist/pcache (entry points: cli/main.ts${workers.map((w) => ` ${w}`).join("")})`);
}

const native_only = process.argv.includes("--native-only");
buildNative();
if (!native_only) buildExecutable();
