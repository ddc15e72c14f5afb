/**
 * Plays one fuzz transcript (fuzz_gen.ts) against a server and checks every answer: the
 * greeting; each option's replies (echoed option, final ACK or error as the frame expects); the
 * export-name reply; every request's reply (known cookie, exactly one completion, error or not
 * as expected, structured READ replies once structured replies were acknowledged); and that the
 * server hangs up after a frame it must drop the connection for, and closes after DISC or
 * after our half-close. Returns the first problem as a one-line string with its frame number.
 */
import * as W from "../../core/nbd/wire.ts";
import { ByteStream, StreamClosed, type NbdTarget } from "./nbd_client.ts";
import type { ConnScript, Frame, OptExpect, ReqExpect } from "./fuzz_gen.ts";

/** Waits for the server to react (close, reply) before calling it hung. */
const REACT_TIMEOUT_MS = 10_000;
/** A reply bigger than this is nonsense from our requests (largest READ is 32 MiB). */
const REPLY_BYTES_MAX = W.PAYLOAD_BYTES_MAX + 64;
/** Errors the server may give a request that must fail (never EIO: that would be an internal fault). */
const REFUSAL_ERRNOS = new Set([W.NBD_EPERM, W.NBD_EINVAL, W.NBD_ENOSPC, W.NBD_EOVERFLOW, W.NBD_ENOTSUP]);

export interface ConnOutcome {
  /** Frames handed to the socket (a truncated frame counts). */
  frames_sent: number;
  failure: string | null;
}

type OptionFrame = Extract<Frame, { phase: "option" }>;
type RequestFrame = Extract<Frame, { phase: "request" }>;

interface PendingRequest {
  frame: RequestFrame;
  /** An error chunk arrived (structured replies). */
  errored: boolean;
  errno: number;
}

class ReplyChecker {
  private readonly options: OptionFrame[] = [];
  private readonly requests = new Map<number, PendingRequest>();
  private phase: "greeting" | "options" | "transmission" = "greeting";
  private sr = false;
  private no_zeroes = true;
  failure: string | null = null;
  /** Bytes of an incomplete reply left when the server closed. */
  cut_reply_bytes = 0;
  /** Frame numbers of frames whose answer has been fully seen. */
  answered = 0;

  constructor(private readonly s: ByteStream) {}

  expectOption(f: OptionFrame): void {
    this.options.push(f);
  }

  expectRequest(f: RequestFrame): void {
    if (f.expect === "disc" || f.expect === "fatal") return;
    this.requests.set(f.cookie_lo, { frame: f, errored: false, errno: 0 });
  }

  clientFlags(no_zeroes: boolean): void {
    this.no_zeroes = no_zeroes;
  }

  /** Whatever is still waiting for an answer. */
  outstanding(): string | null {
    const o = this.options[0];
    if (o) return `frame ${o.no} (${o.note}): no final option reply`;
    for (const r of this.requests.values()) return `frame ${r.frame.no} (${r.frame.note}): no reply`;
    return null;
  }

  private fail(msg: string): void {
    this.failure ??= msg;
  }

  /** Parses replies until the stream closes or something is wrong. */
  async run(): Promise<void> {
    try {
      // Bounded by the stream: every pass consumes at least one message or ends.
      for (;;) {
        if (this.phase === "greeting") await this.greeting();
        else if (this.phase === "options") await this.optionReply();
        else await this.transmissionReply();
        if (this.failure !== null) return;
      }
    } catch (e) {
      // A hard disconnect may cut a reply short; finish() decides whether one was allowed.
      if (e instanceof StreamClosed) {
        this.cut_reply_bytes = this.s.buffered;
        return;
      }
      this.fail(e instanceof Error ? e.message : String(e));
    }
  }

  private read(n: number): Promise<Uint8Array> {
    return this.s.read(n, 60_000);
  }

  private async greeting(): Promise<void> {
    const g = W.dataViewOf((await this.read(W.GREETING_BYTES)).slice());
    const ok = g.getUint32(0) === W.NBD_MAGIC_HI && g.getUint32(4) === W.NBD_MAGIC_LO && g.getUint32(8) === W.IHAVEOPT_HI && g.getUint32(12) === W.IHAVEOPT_LO;
    if (!ok || (g.getUint16(16) & W.FLAG_FIXED_NEWSTYLE) === 0) return this.fail("bad greeting");
    this.phase = "options";
  }

  /** Returns once a byte is buffered (or throws StreamClosed): then the frame it answers is registered. */
  private async someBytes(): Promise<void> {
    // Bounded by the stream: it either delivers bytes or closes; the caller's deadline ends it.
    while (this.s.buffered === 0) {
      if (this.s.is_closed) throw new StreamClosed("closed");
      await this.s.waitChange(60_000);
    }
  }

  private async optionReply(): Promise<void> {
    await this.someBytes();
    const head = this.options[0];
    if (head && head.expect === "export_name") {
      await this.read(W.EXPORT_NAME_REPLY_BYTES);
      if (!this.no_zeroes) {
        const z = await this.read(W.EXPORT_NAME_ZEROES_BYTES);
        if (z.some((b) => b !== 0)) return this.fail(`frame ${head.no} (${head.note}): the 124 padding bytes are not zero`);
      }
      this.options.shift();
      this.phase = "transmission";
      return;
    }
    const h = W.dataViewOf((await this.read(W.OPTION_REPLY_HEADER_BYTES)).slice());
    if (!head) return this.fail("option reply with no option outstanding");
    if (head.expect === "fatal") return this.fail(`frame ${head.no} (${head.note}): answered, but the server must hang up`);
    if (h.getUint32(0) !== W.OPT_REPLY_MAGIC_HI || h.getUint32(4) !== W.OPT_REPLY_MAGIC_LO) return this.fail(`frame ${head.no}: bad option reply magic`);
    if (h.getUint32(8) !== head.option) return this.fail(`frame ${head.no} (${head.note}): reply echoes option ${h.getUint32(8)}`);
    const type = h.getUint32(12);
    const len = h.getUint32(16);
    if (len > 64 * 1024) return this.fail(`frame ${head.no} (${head.note}): option reply of ${len} bytes`);
    await this.read(len);
    const is_error = (type & 0x80000000) !== 0;
    const intermediate = type === W.REP_SERVER || type === W.REP_INFO || type === W.REP_META_CONTEXT;
    if (intermediate) {
      const allowed = head.option === W.OPT_LIST ? W.REP_SERVER : head.option === W.OPT_INFO || head.option === W.OPT_GO ? W.REP_INFO : W.REP_META_CONTEXT;
      if (type !== allowed) return this.fail(`frame ${head.no} (${head.note}): unexpected reply type ${type}`);
      return;
    }
    if (type !== W.REP_ACK && !is_error) return this.fail(`frame ${head.no} (${head.note}): unknown reply type 0x${type.toString(16)}`);
    const verdict = optionVerdict(head.expect, is_error);
    if (verdict !== null) return this.fail(`frame ${head.no} (${head.note}): ${verdict}, got ${is_error ? `error 0x${type.toString(16)}` : "ACK"}`);
    this.options.shift();
    this.answered = head.no;
    if (head.option === W.OPT_STRUCTURED_REPLY && !is_error) this.sr = true;
    if (head.expect === "go") this.phase = "transmission";
  }

  private async transmissionReply(): Promise<void> {
    const first = W.dataViewOf((await this.read(4)).slice()).getUint32(0);
    if (first === W.SIMPLE_REPLY_MAGIC) return this.simpleReply();
    if (first === W.STRUCTURED_REPLY_MAGIC) return this.chunk();
    this.fail(`bad reply magic 0x${first.toString(16)}`);
  }

  private lookup(hi: number, lo: number): PendingRequest | null {
    const p = this.requests.get(lo);
    if (!p || p.frame.cookie_hi !== hi) {
      this.fail(`reply for cookie ${hi}:${lo}, which has no request outstanding`);
      return null;
    }
    return p;
  }

  private async simpleReply(): Promise<void> {
    const h = W.dataViewOf((await this.read(12)).slice());
    const p = this.lookup(h.getUint32(4), h.getUint32(8));
    if (!p) return;
    const error = h.getUint32(0);
    const f = p.frame;
    if (f.type === W.CMD_READ && this.sr) return this.fail(`frame ${f.no} (${f.note}): simple reply to a READ after structured replies were negotiated`);
    if (f.type === W.CMD_READ && error === 0) await this.read(f.length);
    this.complete(p, error !== 0, error);
  }

  private async chunk(): Promise<void> {
    const h = W.dataViewOf((await this.read(16)).slice());
    const flags = h.getUint16(0);
    const type = h.getUint16(2);
    const len = h.getUint32(12);
    if (!this.sr) return this.fail(`structured chunk without structured replies negotiated`);
    const p = this.lookup(h.getUint32(4), h.getUint32(8));
    if (!p) return;
    if (len > REPLY_BYTES_MAX) return this.fail(`frame ${p.frame.no}: chunk of ${len} bytes`);
    const payload = await this.read(len);
    const problem = chunkProblem(type, len, p.frame.type);
    if (problem !== null) return this.fail(`frame ${p.frame.no} (${p.frame.note}): ${problem}`);
    if ((type & 0x8000) !== 0) {
      p.errored = true;
      p.errno = W.dataViewOf(payload.slice(0, 4)).getUint32(0);
    }
    if ((flags & W.REPLY_FLAG_DONE) !== 0) this.complete(p, p.errored, p.errno);
  }

  private complete(p: PendingRequest, is_error: boolean, errno: number): void {
    this.requests.delete(p.frame.cookie_lo);
    this.answered = Math.max(this.answered, p.frame.no);
    const verdict = requestVerdict(p.frame.expect, is_error, errno);
    if (verdict !== null) this.fail(`frame ${p.frame.no} (${p.frame.note}): ${verdict}`);
  }
}

function optionVerdict(expect: OptExpect, is_error: boolean): string | null {
  switch (expect) {
    case "ack":
    case "go":
    case "abort":
      return is_error ? "expected ACK" : null;
    case "err":
      return is_error ? null : "expected an error reply";
    case "ack_or_err":
      return null;
    default:
      return `no option reply expected (${expect})`;
  }
}

function requestVerdict(expect: ReqExpect, is_error: boolean, errno: number): string | null {
  if (expect === "ok" && is_error) return `failed with error ${errno}, expected success`;
  if (expect === "err" && !is_error) return "succeeded, expected an error";
  if (expect === "err" && !REFUSAL_ERRNOS.has(errno)) return `refused with error ${errno}, expected EINVAL/ENOSPC/EPERM/EOVERFLOW`;
  return null;
}

function chunkProblem(type: number, len: number, cmd: number): string | null {
  switch (type) {
    case W.REPLY_TYPE_NONE:
      return len === 0 ? null : "NONE chunk with a payload";
    case W.REPLY_TYPE_OFFSET_DATA:
      return cmd !== W.CMD_READ ? "OFFSET_DATA for a non-READ" : len < 9 ? "short OFFSET_DATA" : null;
    case W.REPLY_TYPE_OFFSET_HOLE:
      return cmd !== W.CMD_READ ? "OFFSET_HOLE for a non-READ" : len !== 12 ? "bad OFFSET_HOLE length" : null;
    case W.REPLY_TYPE_BLOCK_STATUS:
      return cmd !== W.CMD_BLOCK_STATUS ? "BLOCK_STATUS chunk for another command" : len < 12 || (len - 4) % 8 !== 0 ? "bad BLOCK_STATUS length" : null;
    case W.REPLY_TYPE_ERROR:
      return len >= 6 ? null : "short error chunk";
    case W.REPLY_TYPE_ERROR_OFFSET:
      return len >= 14 ? null : "short error-offset chunk";
    default:
      return `unknown chunk type ${type}`;
  }
}

/** Sends the transcript (maybe in pieces, maybe cut short), then leaves as the script says. */
export async function playConnection(target: NbdTarget, script: ConnScript, rng: () => number): Promise<ConnOutcome> {
  let s: ByteStream;
  try {
    s = await ByteStream.connect(target);
  } catch (e) {
    return { frames_sent: 0, failure: `connect failed: ${e instanceof Error ? e.message : String(e)}` };
  }
  const checker = new ReplyChecker(s);
  const checking = checker.run();
  let frames_sent = 0;
  let sent_bytes = 0;
  let fatal: Frame | null = null;
  let truncated = false;
  let disc = false;
  for (const f of script.frames) {
    if (s.is_closed || checker.failure !== null) break;
    let bytes = f.bytes;
    if (script.cut_at_bytes !== null && sent_bytes + bytes.length > script.cut_at_bytes) {
      bytes = bytes.subarray(0, script.cut_at_bytes - sent_bytes);
      truncated = true;
    } else if (f.phase === "option") checker.expectOption(f);
    else if (f.phase === "request") checker.expectRequest(f);
    else if (f.phase === "flags") checker.clientFlags(f.no_zeroes);
    await send(s, bytes, script.split, rng);
    sent_bytes += bytes.length;
    frames_sent++;
    if (truncated) break;
    if (isFatal(f)) {
      fatal = f;
      break;
    }
    if (f.phase === "request" && f.expect === "disc") disc = true;
  }
  const failure = await finish(s, script, checker, checking, { fatal, truncated, disc });
  return { frames_sent, failure };
}

function isFatal(f: Frame): boolean {
  if (f.phase === "option") return f.expect === "fatal" || f.expect === "abort";
  if (f.phase === "request") return f.expect === "fatal";
  return f.fatal;
}

async function send(s: ByteStream, bytes: Uint8Array, split: boolean, rng: () => number): Promise<void> {
  if (!split || bytes.length < 2) return s.send(bytes);
  // Up to four pieces cut at random points, with a pause between some, so the server sees
  // every frame boundary land anywhere inside its reads.
  const cuts = Array.from({ length: 1 + Math.floor(rng() * 3) }, () => 1 + Math.floor(rng() * (bytes.length - 1))).sort((a, b) => a - b);
  let at = 0;
  for (const cut of [...cuts, bytes.length]) {
    if (cut <= at) continue;
    s.send(bytes.subarray(at, cut));
    at = cut;
    if (rng() < 0.3) await Bun.sleep(rng() < 0.5 ? 0 : 1);
  }
}

/** Ends the connection as scripted and decides what the server's behaviour means. */
async function finish(
  s: ByteStream,
  script: ConnScript,
  checker: ReplyChecker,
  checking: Promise<void>,
  how: { fatal: Frame | null; truncated: boolean; disc: boolean },
): Promise<string | null> {
  let problem: string | null = null;
  // The server hung up while we were still sending, though nothing we sent asked for it.
  const closed_early = s.is_closed && how.fatal === null && !how.disc && !how.truncated && checker.failure === null;
  if (how.fatal !== null) {
    if (!(await s.waitClosed(REACT_TIMEOUT_MS))) problem = `frame ${how.fatal.no} (${how.fatal.note}): the server did not hang up`;
  } else if (how.disc && !how.truncated) {
    if (!(await s.waitClosed(REACT_TIMEOUT_MS))) problem = "the server did not close the connection after DISC";
  } else if (script.ending === "rst") {
    s.terminate();
  } else {
    await s.sent(REACT_TIMEOUT_MS);
    s.end();
    if (!(await s.waitClosed(REACT_TIMEOUT_MS))) problem = "the server did not close the connection after our half-close";
  }
  if (!s.is_closed) s.terminate();
  await checking;
  if (checker.failure !== null) return checker.failure;
  if (problem !== null) return problem;
  if (closed_early) return `the server hung up after frame ${checker.answered} though no frame asked for it (${checker.outstanding() ?? "nothing outstanding"})`;
  if (how.disc && !how.truncated) {
    // After DISC the server finishes what is in flight: every reply complete, then close.
    if (checker.cut_reply_bytes > 0) return `after DISC the server closed in the middle of a reply (${checker.cut_reply_bytes} bytes of it arrived)`;
    const left = checker.outstanding();
    if (left !== null) return `after DISC: ${left}`;
  }
  return null;
}
