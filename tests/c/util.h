/* Shared helpers of the C tests: counters, DLTensor construction, a float64 reference. */
#ifndef SALS_TEST_UTIL_H_
#define SALS_TEST_UTIL_H_

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <sals/sals.h>

static int g_passed, g_failed;

#define CHECK(cond, ...)                                              \
  do {                                                                \
    if (cond) {                                                       \
      ++g_passed;                                                     \
    } else {                                                          \
      ++g_failed;                                                     \
      fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      fprintf(stderr, __VA_ARGS__);                                   \
      fprintf(stderr, "\n");                                          \
    }                                                                 \
  } while (0)

/* A call that must fail with `status` and a last-error message containing `needle`. */
#define CHECK_ERR(call, status, needle)                                          \
  do {                                                                           \
    sals_status_t st_ = (call);                                                  \
    CHECK(st_ == (status) && strstr(sals_last_error(), (needle)) != NULL,        \
          "got %s \"%s\", wanted %s containing \"%s\"", sals_status_string(st_), \
          sals_last_error(), sals_status_string(status), (needle));              \
  } while (0)

#define CHECK_OK(call)                                                           \
  do {                                                                           \
    sals_status_t st_ = (call);                                                  \
    CHECK(st_ == SALS_OK, "%s: %s", sals_status_string(st_), sals_last_error()); \
  } while (0)

static int finish(void) {
  printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed != 0;
}

static const DLDataType F32 = {kDLFloat, 32, 1}, F16 = {kDLFloat, 16, 1}, BF16 = {kDLBfloat, 16, 1},
                        I32 = {kDLInt, 32, 1}, U8 = {kDLUInt, 8, 1};

/* A DLTensor with its own shape/stride storage; do not copy after tset. */
typedef struct {
  DLTensor t;
  int64_t shape[4];
  int64_t strides[4];
} tensor_t;

static void tset(tensor_t* x, void* data, DLDataType dt, int ndim, int64_t s0, int64_t s1,
                 int64_t s2, int64_t s3) {
  memset(x, 0, sizeof *x);
  const int64_t s[4] = {s0, s1, s2, s3};
  for (int i = 0; i < ndim; ++i) x->shape[i] = s[i];
  x->t.data = data;
  x->t.device.device_type = kDLCPU;
  x->t.ndim = ndim;
  x->t.dtype = dt;
  x->t.shape = x->shape;
  x->t.strides = NULL;
}

/* Explicit strides (elements). */
static void tstride(tensor_t* x, int64_t s0, int64_t s1, int64_t s2, int64_t s3) {
  const int64_t s[4] = {s0, s1, s2, s3};
  for (int i = 0; i < x->t.ndim; ++i) x->strides[i] = s[i];
  x->t.strides = x->strides;
}

/* Deterministic uniform [-1, 1) (xorshift). */
static uint64_t g_rng = 0x9e3779b97f4a7c15ull;
static double urand(void) {
  g_rng ^= g_rng << 13;
  g_rng ^= g_rng >> 7;
  g_rng ^= g_rng << 17;
  return (double)(g_rng >> 11) / 9007199254740992.0 * 2.0 - 1.0;
}
static void fill(float* x, int64_t n, double amp) {
  for (int64_t i = 0; i < n; ++i) x[i] = (float)(amp * urand());
}

/* float -> float16 bits, round to nearest even (reference, scalar). */
static uint16_t to_f16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7fffffffu;
  if (u > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);
  if (u >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);
  float a;
  memcpy(&a, &u, 4);
  if (u < 0x38800000u) { /* subnormal: multiples of 2^-24 */
    double q = nearbyint((double)a * 16777216.0);
    return (uint16_t)(sign | (uint16_t)q);
  }
  uint32_t e = (u >> 23) - 112, m = u & 0x7fffffu;
  uint32_t h = (e << 10) | (m >> 13);
  uint32_t rest = m & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
  return (uint16_t)(sign | h);
}
static float from_f16(uint16_t h) {
  int e = (h >> 10) & 31, m = h & 1023;
  double v = e == 0 ? ldexp(m, -24) : (e == 31 ? (m ? NAN : INFINITY) : ldexp(m + 1024, e - 25));
  return (float)((h & 0x8000u) ? -v : v);
}

/* Reference RoPE in float64 (theta in float32, as the library documents). */
static void rope_ref(double* x, int d, int32_t pos, const float* inv_freq, int rot, float scaling,
                     int interleaved) {
  for (int i = 0; i < rot / 2; ++i) {
    const float theta = (float)pos * inv_freq[i];
    const double c = scaling * cos((double)theta), s = scaling * sin((double)theta);
    const int a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + rot / 2;
    const double xa = x[a], xb = x[b];
    x[a] = xa * c - xb * s;
    x[b] = xb * c + xa * s;
  }
}

/*
 * Dense causal attention in float64 of one query row over the keys/values of one sequence.
 * q [d] pre-RoPE at qpos; k, v [S][Hkv][d] pre-RoPE at kpos[S]; kv head h; out [d].
 * keep[j] = 0 drops token j (NULL: every token).
 */
static void attend_ref(const float* q, int32_t qpos, const float* k, const float* v,
                       const int32_t* kpos, int S, int Hkv, int h, int d, const float* inv_freq,
                       int rot, float scaling, int interleaved, double scale, const char* keep,
                       double* out) {
  double* qr = (double*)malloc(sizeof(double) * (size_t)d * 2);
  double* kr = qr + d;
  double* w = (double*)malloc(sizeof(double) * (size_t)(S > 0 ? S : 1));
  for (int i = 0; i < d; ++i) qr[i] = q[i], out[i] = 0.0;
  rope_ref(qr, d, qpos, inv_freq, rot, scaling, interleaved);
  double mx = -INFINITY, sum = 0.0;
  for (int j = 0; j < S; ++j) {
    w[j] = -INFINITY;
    if (qpos < 0 || kpos[j] > qpos || (keep && !keep[j])) continue;
    for (int i = 0; i < d; ++i) kr[i] = k[((size_t)j * Hkv + h) * d + i];
    rope_ref(kr, d, kpos[j], inv_freq, rot, scaling, interleaved);
    double s = 0.0;
    for (int i = 0; i < d; ++i) s += qr[i] * kr[i];
    w[j] = s * scale;
    mx = w[j] > mx ? w[j] : mx;
  }
  if (mx > -INFINITY) {
    for (int j = 0; j < S; ++j) {
      if (w[j] == -INFINITY) continue;
      const double p = exp(w[j] - mx);
      sum += p;
      for (int i = 0; i < d; ++i) out[i] += p * v[((size_t)j * Hkv + h) * d + i];
    }
    for (int i = 0; i < d; ++i) out[i] /= sum;
  }
  free(w);
  free(qr);
}

/* Llama-style inverse frequencies for rotary_dim rot. */
static void make_inv_freq(float* inv_freq, int rot, double base) {
  for (int i = 0; i < rot / 2; ++i) inv_freq[i] = (float)pow(base, -2.0 * i / rot);
}

/* Dk = 16 (2 KV heads of 8), 4 query heads, full rank unless changed. */
static inline sals_config_t config16(sals_dtype_t dtype, int32_t value_bits) {
  sals_config_t c = sals_config_default();
  c.n_head_q = 4;
  c.n_head_kv = 2;
  c.head_dim = 8;
  c.rank = 16;
  c.score_rank = 8;
  c.value_bits = value_bits;
  c.value_group = 8;
  c.n_sink = 1;
  c.n_recent = 2;
  c.max_batch = 2;
  c.max_tokens = 8;
  c.dtype = dtype;
  return c;
}

#endif /* SALS_TEST_UTIL_H_ */
