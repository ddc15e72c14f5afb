/**
 * Invariant checks. An AssertionError means pcache itself is wrong (a bug), never that an input
 * was bad: inputs get the specific errors of core/errors.ts.
 */
export class AssertionError extends Error {
  override name = "AssertionError";
}

export function assert(condition: unknown, message: string): asserts condition {
  if (!condition) throw new AssertionError(`assertion failed: ${message}`);
}

/**
 * For hot paths: `if (!cond) fail(\`...\`)` builds its message only when the check fails, where
 * assert(cond, \`...\`) would build the template string on every call.
 */
export function fail(message: string): never {
  throw new AssertionError(`assertion failed: ${message}`);
}
