/**
 * Client side of the control socket: connect, send one request line, read one response line.
 * Every failure is a PcacheError with one line saying what to do next.
 */
import type { Socket } from "bun";
import { PcacheError } from "../errors.ts";
import { type ControlRequest, type ControlResponse, RESPONSE_MAX_BYTES } from "./protocol.ts";

/** How long a request may take unless the caller says otherwise. */
export const CONTROL_TIMEOUT_MS = 15_000;

export function noServerMessage(path: string): string {
  return `no server is listening on ${path} (is pcache serve running for this cache?)`;
}

function connectMessage(path: string, err: unknown): string {
  const code = (err as { code?: string })?.code;
  if (code === "ENOENT" || code === "ECONNREFUSED" || code === "ENOTSOCK") return noServerMessage(path);
  if (code === "EACCES" || code === "EPERM") return `permission denied on ${path} (the server runs as another user)`;
  return `cannot connect to ${path}: ${code ?? (err as Error)?.message ?? String(err)}`;
}

/** Send `req` to the server at `path` and return its result; the server's refusal is thrown. */
export async function controlRequest(path: string, req: ControlRequest, timeout_ms = CONTROL_TIMEOUT_MS): Promise<unknown> {
  const line = await exchange(path, `${JSON.stringify(req)}\n`, timeout_ms);
  let res: ControlResponse;
  try {
    res = JSON.parse(line) as ControlResponse;
  } catch {
    throw new PcacheError(`the server at ${path} sent an answer that is not JSON`);
  }
  if (res.ok !== true) throw new PcacheError(typeof res.error === "string" ? res.error : `the server at ${path} refused the request`);
  return res.result;
}

/** One round trip; resolves with the first line the server sends. */
function exchange(path: string, request: string, timeout_ms: number): Promise<string> {
  const done = Promise.withResolvers<string>();
  const decoder = new TextDecoder();
  let received = "";
  let out = new TextEncoder().encode(request);
  const timer = setTimeout(() => done.reject(new PcacheError(`the server at ${path} did not answer within ${timeout_ms / 1000} s`)), timeout_ms);
  const send = (s: Socket<undefined>) => {
    out = out.subarray(Math.max(0, s.write(out)));
  };
  let sock: Socket<undefined> | null = null;
  Bun.connect({
    unix: path,
    socket: {
      open: (s) => send(s),
      drain: (s) => send(s),
      data: (s, chunk) => {
        received += decoder.decode(chunk, { stream: true });
        const nl = received.indexOf("\n");
        if (nl >= 0) {
          done.resolve(received.slice(0, nl));
          s.end();
        }
        else if (received.length > RESPONSE_MAX_BYTES) done.reject(new PcacheError(`the answer from ${path} is longer than ${RESPONSE_MAX_BYTES} bytes`));
      },
      close: () => done.reject(new PcacheError(`the server at ${path} closed the connection without answering (is it stopping?)`)),
      connectError: (_s, err) => done.reject(new PcacheError(connectMessage(path, err))),
    },
  }).then(
    (s) => {
      sock = s;
    },
    (err) => done.reject(new PcacheError(connectMessage(path, err))),
  );
  return done.promise.finally(() => {
    clearTimeout(timer);
    sock?.end();
  });
}
