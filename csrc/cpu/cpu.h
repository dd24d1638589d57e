/*
 * Private interface of the CPU backend (csrc/cpu/). Not API.
 * Data moves through float32 blocks: stored 16-bit rows are converted a block at a time, the
 * arithmetic runs in float32 loops the compiler vectorises, results are converted back.
 */
#ifndef SALS_CPU_H_
#define SALS_CPU_H_

#include <stddef.h>
#include <stdint.h>

#include "internal.h"

/*
 * Hot loops are compiled twice on x86-64 with GCC (AVX2+FMA and baseline) and picked at load
 * time, so one portable library still uses the wide units of the machine it runs on.
 */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    !defined(__SANITIZE_ADDRESS__) && !defined(SALS_NO_CLONES)
#define SALS_HOT __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define SALS_HOT
#endif

/* ---- element conversion (half.c) --------------------------------------------------------- */

/** dst[i] = float(src[i]) for n elements of type `elem` (float or int types are not mixed). */
void sals_load_f32(float* dst, const void* src, sals_elem_t elem, int64_t n);
/** dst[i] = elem(src[i]), round to nearest even. */
void sals_store_f32(void* dst, sals_elem_t elem, const float* src, int64_t n);
uint16_t sals_f32_to_f16(float f);
float sals_f16_to_f32(uint16_t h);
uint16_t sals_f32_to_bf16(float f);
/** The float16 nearest to f in the given direction (dir < 0: largest <= f; > 0: smallest >= f). */
uint16_t sals_f32_to_f16_directed(float f, int dir);
/** 1 if all n elements are finite. */
int sals_all_finite(const void* src, sals_elem_t elem, int64_t n);
/**
 * Index of the first of n finite floats that becomes infinity when stored as `elem` (float16
 * beyond 65504 after rounding, bfloat16 beyond its largest finite value), -1 if none.
 */
int64_t sals_first_overflow(const float* src, sals_elem_t elem, int64_t n);

/* ---- thread pool (parallel.c) ------------------------------------------------------------ */

typedef struct sals_pool sals_pool_t;
/** task in [0, n_tasks); thread in [0, pool size). */
typedef void (*sals_task_fn)(void* ctx, int64_t task, int32_t thread);
/** Online cores (>= 1). */
int32_t sals_online_cores(void);
/** A pool of n_threads (the caller counts as one); NULL on failure. */
sals_pool_t* sals_pool_create(int32_t n_threads);
void sals_pool_destroy(sals_pool_t* pool);
int32_t sals_pool_size(const sals_pool_t* pool);
/** Run fn over every task and return when all are done. pool NULL = on the calling thread. */
void sals_pool_run(sals_pool_t* pool, int64_t n_tasks, sals_task_fn fn, void* ctx);
/**
 * For stateless functions: run on up to all online cores with threads started for this call
 * only (these functions are not on a hot path); on the calling thread alone when `flops` is too
 * small to pay for starting threads, or when threads cannot be started.
 */
void sals_parallel_for(int64_t n_tasks, double flops, sals_task_fn fn, void* ctx);

/* ---- kernels (kernels.c) ----------------------------------------------------------------- */

/** C[M,N] = A[M,K] B[K,N] (+ C if accumulate); all row-major float32 with leading dims. */
void sals_gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
               int64_t ldb, float* C, int64_t ldc, int accumulate);
/** sum a[i] * b[i]. */
float sals_dot(const float* a, const float* b, int64_t n);
/** cs_cos/cs_sin [half][n] (row stride n) for n positions: attention_scaling * cos/sin(pos * f). */
void sals_rope_table(const int32_t* pos, int64_t n, const float* inv_freq, int32_t half,
                     float attention_scaling, float* cs_cos, float* cs_sin);
/**
 * Rotate columns of xt [dim][n] (keys transposed, row stride ldx) by the table of
 * sals_rope_table (row stride n).
 */
void sals_rope_cols(float* xt, int64_t ldx, int64_t n, int32_t half, int32_t interleaved,
                    const float* cs_cos, const float* cs_sin);
/** Rotate one row x[head_dim] with per-pair cos/sin c[half], s[half]. */
void sals_rope_row(float* x, int32_t half, int32_t interleaved, const float* c, const float* s);
/** cos/sin of one position: c[i], s[i] for i < half. */
void sals_rope_pos(int32_t pos, const float* inv_freq, int32_t half, float attention_scaling,
                   float* c, float* s);

/** Keys per attention block: a transposed key block [d][SALS_KEY_BLOCK] stays in L1/L2. */
#define SALS_KEY_BLOCK 64

/**
 * The part of an attention task's workspace that every attention path lays out alike, for R
 * query rows of d dims over blocks of SALS_KEY_BLOCK keys: q [R][d] (scaled, rotated), the
 * online-softmax state m, l [R] and acc [R][d], scores s [R][SALS_KEY_BLOCK], one key block
 * transposed kt [d][SALS_KEY_BLOCK] and its values v [SALS_KEY_BLOCK][d].
 */
typedef struct {
  float *q, *m, *l, *acc, *s, *kt, *v;
} sals_attn_ws_t;

/** Floats a sals_attn_ws_t takes. */
static inline int64_t sals_attn_ws_floats(int64_t R, int64_t d) {
  return 2 * R * d + 2 * R + R * SALS_KEY_BLOCK + 2 * d * SALS_KEY_BLOCK;
}

/** Lay a sals_attn_ws_t out from ws; returns the first float after it. */
static inline float* sals_attn_ws_carve(float* ws, int64_t R, int64_t d, sals_attn_ws_t* w) {
  w->q = ws;
  w->m = w->q + R * d;
  w->l = w->m + R;
  w->acc = w->l + R;
  w->s = w->acc + R * d;
  w->kt = w->s + R * SALS_KEY_BLOCK;
  w->v = w->kt + d * SALS_KEY_BLOCK;
  return w->v + SALS_KEY_BLOCK * d;
}

/**
 * Online-softmax update of R query rows with one block of nk keys.
 * q [R][d] (scaled, rotated), kt [d][nk] (row stride ldk), v [nk][d], kpos [nk], qpos [R]
 * (a key is visible to row i when kpos <= qpos[i]); s [R][nk] scratch; state m, l [R], acc [R][d].
 */
void sals_attn_block(int64_t R, int64_t d, int64_t nk, const float* q, const float* kt, int64_t ldk,
                     const float* v, const int32_t* kpos, const int32_t* qpos, float* s, float* m,
                     float* l, float* acc);
/** Reset an online-softmax state of R rows. */
void sals_attn_init(int64_t R, int64_t d, float* m, float* l, float* acc);

/**
 * Quantise one row of D channels in groups (see sals_quantize_values): packed D*bits/8 bytes,
 * scale/zero D/group float16 bits.
 */
void sals_quantize_row(const float* x, int64_t D, int32_t bits, int32_t group, uint8_t* packed,
                       uint16_t* scale, uint16_t* zero);
/**
 * First group of a row of D finite floats whose float16 zero or scale (as sals_quantize_row
 * computes them) would be infinite, -1 if none.
 */
int64_t sals_quantize_row_check(const float* x, int64_t D, int32_t bits, int32_t group);
/** Inverse of sals_quantize_row for D channels starting at a group boundary. */
void sals_dequantize_row(const uint8_t* packed, const uint16_t* scale, const uint16_t* zero,
                         int64_t D, int32_t bits, int32_t group, float* out);

/**
 * Top-k selection among n candidates by score (NaN = not a candidate), best first by score
 * and then by lower index. Writes the chosen candidate numbers to out in ascending order and
 * returns how many (min(k, valid candidates)). perm: scratch of n entries. Average O(n).
 */
int64_t sals_topk(const float* score, int64_t n, int64_t k, int32_t* perm, int32_t* out);

/* ---- views ------------------------------------------------------------------------------- */

static inline void* sals_view_at(const sals_view_t* v, int64_t i0, int64_t i1, int64_t i2,
                                 int64_t i3) {
  int64_t off = i0 * v->stride[0];
  if (v->ndim > 1) off += i1 * v->stride[1];
  if (v->ndim > 2) off += i2 * v->stride[2];
  if (v->ndim > 3) off += i3 * v->stride[3];
  return (char*)v->data + off * (int64_t)sals_elem_size(v->elem);
}

#endif /* SALS_CPU_H_ */
