/*
 * pmhelpers: the few CPU instructions JavaScript cannot issue, for the pmem persistence domain.
 *
 * Built with plain `gcc -O2 -shared -fPIC` (baseline x86-64). Functions that need clwb,
 * clflushopt or SSE4.2 carry a per-function target attribute, so the .so loads on any x86-64
 * CPU; which variant runs is decided once at load time from CPUID, and an instruction the CPU
 * lacks is never executed. SSE2 (movntdq, clflush, sfence) is part of baseline x86-64.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <cpuid.h>
#include <immintrin.h>

#define LINE 64u

enum {
  PM_F_CLWB = 1 << 0,
  PM_F_CLFLUSHOPT = 1 << 1,
  PM_F_SSE42 = 1 << 2,
};

static int features;
static uint32_t crc32c_table[256];

/* Software CRC32C (Castagnoli, reflected 0x82F63B78), only used when SSE4.2 is missing. */
static void crc32cTableInit(void) {
  for (uint32_t i = 0; i < 256; i++) {
    uint32_t c = i;
    for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1u)));
    crc32c_table[i] = c;
  }
}

__attribute__((constructor)) static void pmInit(void) {
  unsigned a, b, c, d;
  if (__get_cpuid(1, &a, &b, &c, &d) && (c & bit_SSE4_2)) features |= PM_F_SSE42;
  if (__get_cpuid_max(0, NULL) >= 7) {
    __cpuid_count(7, 0, a, b, c, d);
    if (b & bit_CLWB) features |= PM_F_CLWB;
    if (b & bit_CLFLUSHOPT) features |= PM_F_CLFLUSHOPT;
  }
  crc32cTableInit();
}

/** Bitmask of PM_F_*: what this CPU supports (and therefore what the helpers use). */
int pm_features(void) { return features; }

__attribute__((target("clwb"))) static void flushClwb(uintptr_t p, uintptr_t end) {
  for (; p < end; p += LINE) _mm_clwb((void *)p);
}

__attribute__((target("clflushopt"))) static void flushClflushopt(uintptr_t p, uintptr_t end) {
  for (; p < end; p += LINE) _mm_clflushopt((void *)p);
}

static void flushClflush(uintptr_t p, uintptr_t end) {
  for (; p < end; p += LINE) _mm_clflush((void *)p);
}

/*
 * Write back every cache line touching [addr, addr + len). clwb keeps the line cached (cheaper
 * when the data is read again soon); clflushopt/clflush evict it. clwb/clflushopt are weakly
 * ordered: durability needs pm_sfence() afterwards. clflush is ordered by itself.
 */
void pm_flush_range(void *addr, size_t len) {
  if (len == 0) return;
  uintptr_t p = (uintptr_t)addr & ~(uintptr_t)(LINE - 1);
  uintptr_t end = (uintptr_t)addr + len;
  if (features & PM_F_CLWB) flushClwb(p, end);
  else if (features & PM_F_CLFLUSHOPT) flushClflushopt(p, end);
  else flushClflush(p, end);
}

void pm_sfence(void) { _mm_sfence(); }

void pm_copy(void *dst, const void *src, size_t len) { memcpy(dst, src, len); }

/*
 * Durable copy: after pm_memcpy_nt + pm_sfence every byte of [dst, dst + len) is durable.
 * Whole 64-byte destination lines are written with non-temporal stores (they bypass the cache,
 * so no flush is needed: the fence drains them). The partial lines at the head and the tail
 * are copied normally and then flushed, because NT stores can only write whole aligned chunks
 * and must not overwrite the neighbouring bytes of a line.
 */
void pm_memcpy_nt(void *dst, const void *src, size_t len) {
  uint8_t *d = dst;
  const uint8_t *s = src;
  if (len == 0) return;
  size_t head = (LINE - ((uintptr_t)d & (LINE - 1))) & (LINE - 1);
  if (len < head + LINE) {
    /* No whole line to stream: a plain copy plus flush is all there is. */
    memcpy(d, s, len);
    pm_flush_range(d, len);
    return;
  }
  if (head) {
    memcpy(d, s, head);
    pm_flush_range(d, head);
    d += head;
    s += head;
    len -= head;
  }
  size_t lines = len / LINE;
  for (size_t i = 0; i < lines; i++) {
    __m128i x0 = _mm_loadu_si128((const __m128i *)(s + 0));
    __m128i x1 = _mm_loadu_si128((const __m128i *)(s + 16));
    __m128i x2 = _mm_loadu_si128((const __m128i *)(s + 32));
    __m128i x3 = _mm_loadu_si128((const __m128i *)(s + 48));
    _mm_stream_si128((__m128i *)(d + 0), x0);
    _mm_stream_si128((__m128i *)(d + 16), x1);
    _mm_stream_si128((__m128i *)(d + 32), x2);
    _mm_stream_si128((__m128i *)(d + 48), x3);
    d += LINE;
    s += LINE;
  }
  len -= lines * LINE;
  if (len) {
    memcpy(d, s, len);
    pm_flush_range(d, len);
  }
}

__attribute__((target("sse4.2"))) static uint32_t crc32cHw(uint32_t crc, const uint8_t *p, size_t len) {
  uint64_t c = crc;
  for (; len && ((uintptr_t)p & 7); len--) c = _mm_crc32_u8((uint32_t)c, *p++);
  for (; len >= 8; len -= 8, p += 8) {
    uint64_t v;
    memcpy(&v, p, 8);
    c = _mm_crc32_u64(c, v);
  }
  for (; len; len--) c = _mm_crc32_u8((uint32_t)c, *p++);
  return (uint32_t)c;
}

static uint32_t crc32cSw(uint32_t crc, const uint8_t *p, size_t len) {
  for (; len; len--) crc = (crc >> 8) ^ crc32c_table[(crc ^ *p++) & 0xff];
  return crc;
}

/*
 * CRC32C in the RAW form the kernel's crc32c(seed, data, len) uses: seed is the initial
 * register value, no inversion on entry or exit.
 */
uint32_t pm_crc32c_raw(uint32_t seed, const void *ptr, size_t len) {
  if (features & PM_F_SSE42) return crc32cHw(seed, ptr, len);
  return crc32cSw(seed, ptr, len);
}
