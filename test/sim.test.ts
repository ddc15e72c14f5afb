import { describe, expect, test } from "bun:test";
import { SimCrash, SimDomain } from "../core/persist/sim.ts";
import { SEGMENTS_OFF } from "../core/format/constants.ts";

const SIZE = SEGMENTS_OFF + 16 * 1024 * 1024;

describe("sim persistence domain", () => {
  test("flushed and fenced lines survive any crash; unflushed ones may go either way", () => {
    let kept = 0;
    let dropped = 0;
    for (let seed = 1; seed <= 40; seed++) {
      const dom = new SimDomain(SIZE, { seed });
      dom.write(SEGMENTS_OFF, new Uint8Array(64).fill(1));
      dom.flush(SEGMENTS_OFF, 64);
      dom.fence();
      dom.write(SEGMENTS_OFF + 64, new Uint8Array(64).fill(2)); // never flushed
      const after = dom.recover({ seed });
      expect(after.view(SEGMENTS_OFF, 64).every((b) => b === 1)).toBe(true);
      const line = after.view(SEGMENTS_OFF + 64, 64);
      expect(line.every((b) => b === 2) || line.every((b) => b === 0)).toBe(true);
      if (line[0] === 2) kept++;
      else dropped++;
    }
    expect(kept).toBeGreaterThan(0);
    expect(dropped).toBeGreaterThan(0);
  });

  test("a flush without a fence is not a guarantee", () => {
    let dropped = 0;
    for (let seed = 1; seed <= 30; seed++) {
      const dom = new SimDomain(SIZE, { seed });
      dom.write(0, new Uint8Array(8).fill(7));
      dom.flush(0, 8);
      const after = dom.recover({ seed });
      if (after.view(0, 1)[0] === 0) dropped++;
    }
    expect(dropped).toBeGreaterThan(0);
  });

  test("a write after the flush keeps the flushed content durable at the fence", () => {
    for (let seed = 1; seed <= 20; seed++) {
      const dom = new SimDomain(SIZE, { seed });
      dom.write(0, new Uint8Array([5]));
      dom.flush(0, 1);
      dom.write(0, new Uint8Array([6]));
      dom.fence();
      const v = dom.recover({ seed }).view(0, 1)[0];
      expect(v === 5 || v === 6).toBe(true);
    }
  });

  test("crash_at_fence stops the world at that barrier", () => {
    const dom = new SimDomain(SIZE, { seed: 3 });
    dom.crash_at_fence = 2;
    dom.write(0, new Uint8Array([1]));
    dom.flush(0, 1);
    dom.fence();
    dom.write(1, new Uint8Array([1]));
    dom.flush(1, 1);
    expect(() => dom.fence()).toThrow(SimCrash);
    expect(() => dom.write(2, new Uint8Array([1]))).toThrow(SimCrash);
    const after = dom.recover({ seed: 3 });
    expect(after.view(0, 1)[0]).toBe(1);
  });

  test("ranges may not cross a segment boundary or the metadata area", () => {
    const dom = new SimDomain(SIZE, { track: false });
    expect(() => dom.view(SEGMENTS_OFF - 4, 8)).toThrow(/crosses/);
    expect(() => dom.write(SIZE - 4, new Uint8Array(8))).toThrow(/past device end/);
  });
});
