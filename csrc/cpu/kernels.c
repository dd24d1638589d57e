/* float32 compute kernels shared by the cache and the stateless functions. */
#include <math.h>
#include <string.h>

#include "cpu.h"

/* Register tile of the matrix product: 4 rows x 16 columns of accumulators. */
#define MR 4
#define NR 16

/* One full MR x NR tile: the accumulators live in registers across the whole K loop. */
static inline void tile_full(int64_t K, const float* restrict A, int64_t lda,
                             const float* restrict B, int64_t ldb, float* restrict C, int64_t ldc,
                             int accumulate) {
  float c0[NR], c1[NR], c2[NR], c3[NR];
  for (int j = 0; j < NR; ++j) c0[j] = c1[j] = c2[j] = c3[j] = 0.0f;
  const float *a0 = A, *a1 = A + lda, *a2 = A + 2 * lda, *a3 = A + 3 * lda;
  for (int64_t k = 0; k < K; ++k) {
    const float* restrict b = B + k * ldb;
    const float x0 = a0[k], x1 = a1[k], x2 = a2[k], x3 = a3[k];
    for (int j = 0; j < NR; ++j) {
      c0[j] += x0 * b[j];
      c1[j] += x1 * b[j];
      c2[j] += x2 * b[j];
      c3[j] += x3 * b[j];
    }
  }
  float* restrict r0 = C;
  float* restrict r1 = C + ldc;
  float* restrict r2 = C + 2 * ldc;
  float* restrict r3 = C + 3 * ldc;
  if (accumulate) {
    for (int j = 0; j < NR; ++j) r0[j] += c0[j], r1[j] += c1[j], r2[j] += c2[j], r3[j] += c3[j];
  } else {
    for (int j = 0; j < NR; ++j) r0[j] = c0[j], r1[j] = c1[j], r2[j] = c2[j], r3[j] = c3[j];
  }
}

SALS_HOT void sals_gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                        const float* B, int64_t ldb, float* C, int64_t ldc, int accumulate) {
  for (int64_t i0 = 0; i0 < M; i0 += MR) {
    const int64_t mr = M - i0 < MR ? M - i0 : MR;
    for (int64_t j0 = 0; j0 < N; j0 += NR) {
      const int64_t nr = N - j0 < NR ? N - j0 : NR;
      if (mr == MR && nr == NR) {
        tile_full(K, A + i0 * lda, lda, B + j0, ldb, C + i0 * ldc + j0, ldc, accumulate);
        continue;
      }
      float acc[MR][NR];
      memset(acc, 0, sizeof acc);
      for (int64_t k = 0; k < K; ++k) {
        const float* b = B + k * ldb + j0;
        for (int64_t i = 0; i < mr; ++i) {
          const float a = A[(i0 + i) * lda + k];
          for (int64_t j = 0; j < nr; ++j) acc[i][j] += a * b[j];
        }
      }
      for (int64_t i = 0; i < mr; ++i) {
        float* c = C + (i0 + i) * ldc + j0;
        if (accumulate)
          for (int64_t j = 0; j < nr; ++j) c[j] += acc[i][j];
        else
          for (int64_t j = 0; j < nr; ++j) c[j] = acc[i][j];
      }
    }
  }
}

SALS_HOT float sals_dot(const float* a, const float* b, int64_t n) {
  /* Independent partial sums: vectorisable without reassociating a single sum. */
  float part[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) part[j] += a[i + j] * b[i + j];
  float s = 0.0f;
  for (int j = 0; j < 16; ++j) s += part[j];
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

void sals_rope_pos(int32_t pos, const float* inv_freq, int32_t half, float attention_scaling,
                   float* c, float* s) {
  for (int32_t i = 0; i < half; ++i) {
    const float theta = (float)pos * inv_freq[i];
    c[i] = attention_scaling * cosf(theta);
    s[i] = attention_scaling * sinf(theta);
  }
}

void sals_rope_table(const int32_t* pos, int64_t n, const float* inv_freq, int32_t half,
                     float attention_scaling, float* cs_cos, float* cs_sin) {
  for (int32_t i = 0; i < half; ++i)
    for (int64_t j = 0; j < n; ++j) {
      const float theta = (float)pos[j] * inv_freq[i];
      cs_cos[i * n + j] = attention_scaling * cosf(theta);
      cs_sin[i * n + j] = attention_scaling * sinf(theta);
    }
}

SALS_HOT void sals_rope_cols(float* xt, int64_t ldx, int64_t n, int32_t half, int32_t interleaved,
                             const float* cs_cos, const float* cs_sin) {
  for (int32_t i = 0; i < half; ++i) {
    float* xa = xt + (interleaved ? 2 * i : i) * ldx;
    float* xb = xt + (interleaved ? 2 * i + 1 : i + half) * ldx;
    const float* c = cs_cos + i * n;
    const float* s = cs_sin + i * n;
    for (int64_t j = 0; j < n; ++j) {
      const float a = xa[j], b = xb[j];
      xa[j] = a * c[j] - b * s[j];
      xb[j] = b * c[j] + a * s[j];
    }
  }
}

void sals_rope_row(float* x, int32_t half, int32_t interleaved, const float* c, const float* s) {
  for (int32_t i = 0; i < half; ++i) {
    const int32_t ia = interleaved ? 2 * i : i, ib = interleaved ? 2 * i + 1 : i + half;
    const float a = x[ia], b = x[ib];
    x[ia] = a * c[i] - b * s[i];
    x[ib] = b * c[i] + a * s[i];
  }
}

void sals_attn_init(int64_t R, int64_t d, float* m, float* l, float* acc) {
  for (int64_t i = 0; i < R; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.0f;
  }
  memset(acc, 0, (size_t)(R * d) * sizeof(float));
}

SALS_HOT void sals_attn_block(int64_t R, int64_t d, int64_t nk, const float* q, const float* kt,
                              int64_t ldk, const float* v, const int32_t* kpos, const int32_t* qpos,
                              float* s, float* m, float* l, float* acc) {
  sals_gemm(R, nk, d, q, d, kt, ldk, s, nk, 0);
  for (int64_t i = 0; i < R; ++i) {
    float* si = s + i * nk;
    const int32_t qp = qpos[i];
    float bmax = -INFINITY;
    for (int64_t j = 0; j < nk; ++j) {
      si[j] = kpos[j] <= qp ? si[j] : -INFINITY;
      bmax = si[j] > bmax ? si[j] : bmax;
    }
    if (bmax == -INFINITY) {
      memset(si, 0, (size_t)nk * sizeof(float));
      continue;
    }
    const float mnew = bmax > m[i] ? bmax : m[i];
    const float corr = expf(m[i] - mnew); /* 0 on the first visible block (m = -inf) */
    float sum = 0.0f;
    for (int64_t j = 0; j < nk; ++j) {
      si[j] = expf(si[j] - mnew);
      sum += si[j];
    }
    l[i] = l[i] * corr + sum;
    m[i] = mnew;
    if (corr != 1.0f)
      for (int64_t c = 0; c < d; ++c) acc[i * d + c] *= corr;
  }
  sals_gemm(R, d, nk, s, nk, v, d, acc, d, 1);
}

/* ---- value quantisation -------------------------------------------------------------------- */

/* One group's float16 zero and scale: zero rounded down and scale rounded up, so that
 * [zero, zero + levels*scale] covers [min, max] and every element is within scale/2 of its
 * code. */
static void group_params(const float* x, int32_t group, int32_t levels, uint16_t* zh,
                         uint16_t* sh) {
  float lo = x[0], hi = x[0];
  for (int32_t c = 1; c < group; ++c) {
    lo = x[c] < lo ? x[c] : lo;
    hi = x[c] > hi ? x[c] : hi;
  }
  *zh = sals_f32_to_f16_directed(lo, -1);
  *sh = sals_f32_to_f16_directed((hi - sals_f16_to_f32(*zh)) / (float)levels, +1);
}

void sals_quantize_row(const float* x, int64_t D, int32_t bits, int32_t group, uint8_t* packed,
                       uint16_t* scale, uint16_t* zero) {
  const int32_t levels = (1 << bits) - 1;
  memset(packed, 0, (size_t)(D * bits / 8));
  for (int64_t g0 = 0; g0 < D; g0 += group) {
    uint16_t zh, sh;
    group_params(x + g0, group, levels, &zh, &sh);
    const float z = sals_f16_to_f32(zh);
    const float sc = sals_f16_to_f32(sh);
    const float inv = sc > 0.0f ? 1.0f / sc : 0.0f;
    scale[g0 / group] = sh;
    zero[g0 / group] = zh;
    for (int32_t c = 0; c < group; ++c) {
      float t = (x[g0 + c] - z) * inv + 0.5f;
      t = t < 0.0f ? 0.0f : (t > (float)levels ? (float)levels : t);
      const uint32_t code = (uint32_t)t;
      const int64_t bit = (g0 + c) * bits;
      packed[bit >> 3] |= (uint8_t)(code << (bit & 7));
    }
  }
}

int64_t sals_quantize_row_check(const float* x, int64_t D, int32_t bits, int32_t group) {
  const int32_t levels = (1 << bits) - 1;
  for (int64_t g0 = 0; g0 < D; g0 += group) {
    uint16_t zh, sh;
    group_params(x + g0, group, levels, &zh, &sh);
    if ((zh & 0x7c00u) == 0x7c00u || (sh & 0x7c00u) == 0x7c00u) return g0 / group;
  }
  return -1;
}

SALS_HOT void sals_dequantize_row(const uint8_t* packed, const uint16_t* scale,
                                  const uint16_t* zero, int64_t D, int32_t bits, int32_t group,
                                  float* out) {
  const int32_t per_byte = 8 / bits;
  const int64_t group_bytes = (int64_t)group / per_byte;
  for (int64_t g = 0; g < D / group; ++g) {
    const float sc = sals_f16_to_f32(scale[g]), z = sals_f16_to_f32(zero[g]);
    const uint8_t* p = packed + g * group_bytes;
    float* o = out + g * group;
    switch (bits) {
      case 8:
        for (int64_t i = 0; i < group_bytes; ++i) o[i] = z + (float)p[i] * sc;
        break;
      case 4:
        for (int64_t i = 0; i < group_bytes; ++i) {
          o[2 * i] = z + (float)(p[i] & 15u) * sc;
          o[2 * i + 1] = z + (float)(p[i] >> 4) * sc;
        }
        break;
      default: /* 2 */
        for (int64_t i = 0; i < group_bytes; ++i) {
          o[4 * i] = z + (float)(p[i] & 3u) * sc;
          o[4 * i + 1] = z + (float)((p[i] >> 2) & 3u) * sc;
          o[4 * i + 2] = z + (float)((p[i] >> 4) & 3u) * sc;
          o[4 * i + 3] = z + (float)(p[i] >> 6) * sc;
        }
        break;
    }
  }
}

/* ---- top-k --------------------------------------------------------------------------------- */

/* Strict total order: higher score first, lower index on ties. */
static inline int better(const float* sc, int32_t a, int32_t b) {
  return sc[a] > sc[b] || (sc[a] == sc[b] && a < b);
}

int64_t sals_topk(const float* score, int64_t n, int64_t k, int32_t* perm, int32_t* out) {
  int64_t nv = 0;
  for (int64_t i = 0; i < n; ++i)
    if (!isnan(score[i])) perm[nv++] = (int32_t)i;
  if (k <= 0) return 0;
  if (k >= nv) {
    memcpy(out, perm, (size_t)nv * sizeof(int32_t));
    return nv;
  }
  /* Quickselect (Hoare partition, median-of-three pivot) until perm[k-1] is the k-th best. */
  int64_t lo = 0, hi = nv - 1;
  const int64_t nth = k - 1;
  while (lo < hi) {
    int32_t t;
    if (hi - lo == 1) { /* two left: the median-of-three below needs mid distinct from lo */
      if (better(score, perm[hi], perm[lo])) {
        t = perm[lo];
        perm[lo] = perm[hi];
        perm[hi] = t;
      }
      break;
    }
    int64_t mid = lo + (hi - lo) / 2;
    int32_t a = perm[lo], b = perm[mid], c = perm[hi];
    if (better(score, b, a)) {
      t = a;
      a = b;
      b = t;
    }
    if (better(score, c, b)) {
      t = b;
      b = c;
      c = t;
    }
    if (better(score, b, a)) {
      t = a;
      a = b;
      b = t;
    }
    perm[lo] = a;
    perm[mid] = b;
    perm[hi] = c;
    const int32_t pivot = b;
    int64_t i = lo, j = hi;
    while (i <= j) {
      while (better(score, perm[i], pivot)) ++i;
      while (better(score, pivot, perm[j])) --j;
      if (i <= j) {
        t = perm[i];
        perm[i] = perm[j];
        perm[j] = t;
        ++i;
        --j;
      }
    }
    if (nth <= j) hi = j;
    else if (nth >= i) lo = i;
    else break;
  }
  /* Emit in index order: everything not worse than the k-th best. */
  const int32_t kth = perm[nth];
  int64_t m = 0;
  for (int64_t i = 0; i < n; ++i)
    if (!isnan(score[i]) && !better(score, kth, (int32_t)i)) out[m++] = (int32_t)i;
  return m;
}
