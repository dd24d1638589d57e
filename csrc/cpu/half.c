/*
 * float16 / bfloat16 <-> float32 in portable C. The conversions are branch-free (selects, not
 * jumps) so that the block loops below vectorise.
 */
#include <math.h>
#include <string.h>

#include "cpu.h"

static inline uint32_t f2u(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}
static inline float u2f(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

static inline float h2f(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t em = h & 0x7fffu;
  /* Shifting exponent+mantissa into place and multiplying by 2^112 rebiases the exponent and
   * turns float16 subnormals into float32 normals; inf/NaN get the all-ones exponent. */
  uint32_t bits = f2u(u2f(em << 13) * 0x1p112f);
  bits |= em >= 0x7c00u ? 0x7f800000u : 0u;
  return u2f(bits | sign);
}

static inline uint16_t f2h(float f) {
  uint32_t u = f2u(f);
  uint32_t sign = u & 0x80000000u;
  u ^= sign;
  /* Overflow and inf map to inf, NaN to a quiet NaN. */
  uint32_t big = u > 0x7f800000u ? 0x7e00u : 0x7c00u;
  /* Below 2^-14 the result is subnormal: adding 0.5 lets the FPU round to nearest even. */
  uint32_t sub = f2u(u2f(u) + 0.5f) - f2u(0.5f);
  /* Normal: rebias and round to nearest even on the 13 dropped bits. */
  uint32_t norm = (u + 0xc8000fffu + ((u >> 13) & 1u)) >> 13;
  uint32_t o = u >= 0x47800000u ? big : (u < 0x38800000u ? sub : norm);
  return (uint16_t)(o | (sign >> 16));
}

static inline float b2f(uint16_t b) { return u2f((uint32_t)b << 16); }

static inline uint16_t f2b(float f) {
  uint32_t u = f2u(f);
  uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  uint32_t nan = (u >> 16) | 0x40u;
  return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
}

float sals_f16_to_f32(uint16_t h) { return h2f(h); }
uint16_t sals_f32_to_f16(float f) { return f2h(f); }
uint16_t sals_f32_to_bf16(float f) { return f2b(f); }

uint16_t sals_f32_to_f16_directed(float f, int dir) {
  uint16_t h = f2h(f);
  float back = h2f(h);
  if (isnan(f) || isinf(back) || back == f) return h;
  int up = dir > 0;
  if ((back < f) != up) return h;
  /* Step one float16 towards the requested side. */
  if (back == 0.0f) return up ? 0x0001u : 0x8001u;
  int positive = !(h & 0x8000u);
  return (uint16_t)(positive == up ? h + 1 : h - 1);
}

SALS_HOT void sals_load_f32(float* dst, const void* src, sals_elem_t elem, int64_t n) {
  switch (elem) {
    case SALS_ELEM_F32: memcpy(dst, src, (size_t)n * 4); break;
    case SALS_ELEM_F16: {
      const uint16_t* s = (const uint16_t*)src;
      for (int64_t i = 0; i < n; ++i) dst[i] = h2f(s[i]);
    } break;
    case SALS_ELEM_BF16: {
      const uint16_t* s = (const uint16_t*)src;
      for (int64_t i = 0; i < n; ++i) dst[i] = b2f(s[i]);
    } break;
    case SALS_ELEM_I32: {
      const int32_t* s = (const int32_t*)src;
      for (int64_t i = 0; i < n; ++i) dst[i] = (float)s[i];
    } break;
    case SALS_ELEM_U8: {
      const uint8_t* s = (const uint8_t*)src;
      for (int64_t i = 0; i < n; ++i) dst[i] = (float)s[i];
    } break;
  }
}

SALS_HOT void sals_store_f32(void* dst, sals_elem_t elem, const float* src, int64_t n) {
  switch (elem) {
    case SALS_ELEM_F32: memcpy(dst, src, (size_t)n * 4); break;
    case SALS_ELEM_F16: {
      uint16_t* d = (uint16_t*)dst;
      for (int64_t i = 0; i < n; ++i) d[i] = f2h(src[i]);
    } break;
    case SALS_ELEM_BF16: {
      uint16_t* d = (uint16_t*)dst;
      for (int64_t i = 0; i < n; ++i) d[i] = f2b(src[i]);
    } break;
    case SALS_ELEM_I32:
    case SALS_ELEM_U8: break; /* never a destination of float data */
  }
}

int sals_all_finite(const void* src, sals_elem_t elem, int64_t n) {
  /* Non-finite means an all-ones exponent; OR-reduce a flag so the loops vectorise. */
  uint32_t bad = 0;
  switch (elem) {
    case SALS_ELEM_F32: {
      const uint32_t* s = (const uint32_t*)src;
      for (int64_t i = 0; i < n; ++i) bad |= (s[i] & 0x7f800000u) == 0x7f800000u;
    } break;
    case SALS_ELEM_F16: {
      const uint16_t* s = (const uint16_t*)src;
      for (int64_t i = 0; i < n; ++i) bad |= (s[i] & 0x7c00u) == 0x7c00u;
    } break;
    case SALS_ELEM_BF16: {
      const uint16_t* s = (const uint16_t*)src;
      for (int64_t i = 0; i < n; ++i) bad |= (s[i] & 0x7f80u) == 0x7f80u;
    } break;
    case SALS_ELEM_I32:
    case SALS_ELEM_U8: break;
  }
  return !bad;
}

int64_t sals_first_overflow(const float* src, sals_elem_t elem, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float x = src[i];
    int bad;
    switch (elem) {
      case SALS_ELEM_F16: bad = (f2h(x) & 0x7c00u) == 0x7c00u; break;
      case SALS_ELEM_BF16: bad = (f2b(x) & 0x7f80u) == 0x7f80u; break;
      default: bad = !isfinite(x); break;
    }
    if (bad) return i;
  }
  return -1;
}
