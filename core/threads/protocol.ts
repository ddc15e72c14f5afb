/**
 * Messages between the main thread and the workers (postMessage; control only — the data path
 * goes through the shared state). Every worker gets one `start`, answers `ready` (or `fatal`),
 * and on `stop` finishes its work and answers `stopped`.
 */
import type { AttachOptions } from "../device/cache_device.ts";
import type { BackingAttach } from "../device/file_backing.ts";
import type { EngineShared } from "../engine/engine.ts";

export type WorkerRole = "request" | "writeback" | "gc";

/** How a request worker takes connections. */
export type RequestListen =
  /** Adopt this listening socket (a dup made for this worker; the worker owns it). */
  | { kind: "fd"; fd: number }
  /** Serve the one client already connected on this fd (stdin mode), then report `client_gone`. */
  | { kind: "connected"; fd: number }
  /** Take no connections (e.g. extra workers in stdin mode). */
  | { kind: "none" };

export interface RequestOptions {
  listen: RequestListen;
  export_name: string;
  description?: string;
  read_only: boolean;
  max_connections: number;
  /** Longest busy-poll after a reply, µs (0: off); see core/nbd/busy_poll.ts. */
  busy_poll_us: number;
}

export interface StartMessage {
  type: "start";
  role: WorkerRole;
  /** Statistics slot (and data head for request workers). */
  slot: number;
  /** Human name for logs: "request worker 1", "writeback". */
  name: string;
  shared: EngineShared;
  cache: AttachOptions;
  backing: BackingAttach;
  log_level: "error" | "warn" | "info" | "debug";
  request?: RequestOptions;
}

export interface StopMessage {
  type: "stop";
  /** In-flight NBD requests get this long before their connections are closed. */
  timeout_ms: number;
}

export type ToWorker = StartMessage | StopMessage;

export type FromWorker =
  | { type: "ready" }
  | { type: "log"; level: "error" | "warn" | "info" | "debug"; msg: string }
  /** The one stdin-mode client disconnected. */
  | { type: "client_gone" }
  | { type: "stopped" }
  /** The worker cannot go on; the server must stop. */
  | { type: "fatal"; msg: string; stack?: string };
