/**
 * The control protocol: one request per connection, one JSON object on one line each way.
 *
 *   -> {"op":"status"}
 *   <- {"ok":true,"result":{...}}        or {"ok":false,"error":"one line"}
 *
 * Requests:
 *   status                               the status snapshot (core/control/status.ts)
 *   gc_percent {value}                   set GC's threshold now and persist it (0..90)
 *   drain_start                          close every kset, wake writeback; the drain target is
 *                                        the key_head after that close
 *   drain_progress {target}              whether dirty_tail has reached target, bytes left
 *   writeback_pause {paused}             TEST HOOK: hold writeback (CTL_WRITEBACK_PAUSED) so
 *                                        tests can see drain time out; not a user feature
 */
import type { CachePos } from "../log/position.ts";
import { gcPercentProblem } from "../gc/gc_percent.ts";

/** A request line longer than this is refused (requests are tiny). */
export const REQUEST_MAX_BYTES = 4096;
/** A response line longer than this is refused by the client (a status is a few KiB). */
export const RESPONSE_MAX_BYTES = 1024 * 1024;

export type ControlRequest =
  | { op: "status" }
  | { op: "gc_percent"; value: number }
  | { op: "drain_start" }
  | { op: "drain_progress"; target: CachePos }
  | { op: "writeback_pause"; paused: boolean };

export type ControlResponse = { ok: true; result: unknown } | { ok: false; error: string };

export interface DrainStartResult {
  target: CachePos;
  left_bytes: number | null;
}

export interface DrainProgress {
  /** dirty_tail has reached (or passed) the target. */
  reached: boolean;
  /** Dirty bytes logged before the target; null when the log moved too fast to count. */
  left_bytes: number | null;
  dirty_tail: string;
  key_head: string;
  /** errno of the failing backing write, 0 when healthy. */
  writeback_error: number;
  writeback_paused: boolean;
  /** State of the writeback worker ("running" unless it stopped or failed). */
  writeback_state: string;
  /** How long the log walk behind this answer took (the client polls less often when it is slow). */
  scan_ms: number;
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

function isPos(v: unknown): v is CachePos {
  return isObject(v) && Number.isSafeInteger(v.cache_seg_id) && Number.isSafeInteger(v.seg_off) && (v.cache_seg_id as number) >= 0 && (v.seg_off as number) >= 0;
}

/** Parse and validate one request line; a string is the error to send back. */
export function parseRequest(line: string): ControlRequest | string {
  let v: unknown;
  try {
    v = JSON.parse(line);
  } catch {
    return "the request is not JSON";
  }
  if (!isObject(v) || typeof v.op !== "string") return 'the request needs an "op"';
  switch (v.op) {
    case "status":
    case "drain_start":
      return { op: v.op };
    case "gc_percent": {
      const problem = gcPercentProblem(v.value);
      return problem ?? { op: "gc_percent", value: v.value as number };
    }
    case "drain_progress":
      if (!isPos(v.target)) return "drain_progress needs a target {cache_seg_id, seg_off}";
      return { op: "drain_progress", target: { cache_seg_id: v.target.cache_seg_id, seg_off: v.target.seg_off } };
    case "writeback_pause":
      if (typeof v.paused !== "boolean") return "writeback_pause needs paused: true or false";
      return { op: "writeback_pause", paused: v.paused };
    default:
      return `unknown op ${JSON.stringify(v.op).slice(0, 40)}`;
  }
}
