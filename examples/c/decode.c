/*
 * A decode step with the sals C library: a GQA layer (8 query / 2 KV heads, head dim 64),
 * a random orthonormal projection of rank Dk/4 (Gram–Schmidt), a 1000-token prompt, one
 * decode token. Build against an installed or built library:
 *   cc -O2 -I csrc/include examples/c/decode.c -L build -lsals -lm -o decode
 *   LD_LIBRARY_PATH=build ./decode
 * (installed: cc decode.c $(pkg-config --cflags --libs sals) -lm)
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include <sals/sals.h>

#define HQ 8
#define HKV 2
#define D 64
#define DK (HKV * D)
#define RANK (DK / 4)
#define PROMPT 1000

#define CK(call)                                                                                 \
  do {                                                                                           \
    sals_status_t st_ = (call);                                                                  \
    if (st_ != SALS_OK) {                                                                        \
      fprintf(stderr, "%s failed: %s: %s\n", #call, sals_status_string(st_), sals_last_error()); \
      return 1;                                                                                  \
    }                                                                                            \
  } while (0)

static float frand(void) { return (float)rand() / (float)RAND_MAX * 2.0f - 1.0f; }

static DLTensor view(void* data, DLDataType dt, int ndim, int64_t* shape) {
  DLTensor t = {data, {kDLCPU, 0}, ndim, dt, shape, NULL, 0};
  return t;
}

int main(void) {
  const DLDataType f32 = {kDLFloat, 32, 1}, i32 = {kDLInt, 32, 1};
  srand(7);
  /* U [DK, RANK]: orthonormal columns from random vectors (two Gram–Schmidt passes). */
  static float U[DK * RANK];
  for (int j = 0; j < RANK; ++j) {
    double col[DK];
    for (int i = 0; i < DK; ++i) col[i] = frand();
    for (int pass = 0; pass < 2; ++pass)
      for (int p = 0; p < j; ++p) {
        double dot = 0;
        for (int i = 0; i < DK; ++i) dot += col[i] * U[i * RANK + p];
        for (int i = 0; i < DK; ++i) col[i] -= dot * U[i * RANK + p];
      }
    double n = 0;
    for (int i = 0; i < DK; ++i) n += col[i] * col[i];
    for (int i = 0; i < DK; ++i) U[i * RANK + j] = (float)(col[i] / sqrt(n));
  }

  sals_config_t cfg = sals_config_default();
  cfg.n_head_q = HQ;
  cfg.n_head_kv = HKV;
  cfg.head_dim = D;
  cfg.rank = RANK;
  cfg.score_rank = RANK / 2;
  cfg.value_bits = 4;
  cfg.max_batch = 1;
  cfg.max_tokens = PROMPT + 16;
  float inv_freq[D / 2];
  for (int i = 0; i < D / 2; ++i) inv_freq[i] = powf(10000.0f, -2.0f * (float)i / D);
  sals_rope_t rope = {inv_freq, D, 1.0f, 0};
  int64_t ushape[2] = {DK, RANK};
  DLTensor proj = view(U, f32, 2, ushape);
  sals_cache_t* cache = NULL;
  CK(sals_cache_create(&cfg, &rope, &proj, &cache));

  /* Prefill: keys, values [1, PROMPT, HKV, D] at positions 0..PROMPT-1. */
  float* k = malloc(sizeof(float) * (PROMPT + 1) * DK);
  float* v = malloc(sizeof(float) * (PROMPT + 1) * DK);
  int32_t* pos = malloc(sizeof(int32_t) * (PROMPT + 1));
  for (int i = 0; i < (PROMPT + 1) * DK; ++i) k[i] = frand(), v[i] = frand();
  for (int t = 0; t <= PROMPT; ++t) pos[t] = t;
  int64_t kshape[4] = {1, PROMPT, HKV, D}, pshape[2] = {1, PROMPT};
  DLTensor tk = view(k, f32, 4, kshape), tv = view(v, f32, 4, kshape),
           tp = view(pos, i32, 2, pshape);
  CK(sals_cache_append(cache, &tk, &tv, &tp, NULL));

  /* Decode: append the new token's key and value, then attend with its query. */
  int64_t kshape1[4] = {1, 1, HKV, D}, qshape[4] = {1, 1, HQ, D}, pshape1[2] = {1, 1};
  DLTensor tk1 = view(k + PROMPT * DK, f32, 4, kshape1),
           tv1 = view(v + PROMPT * DK, f32, 4, kshape1);
  DLTensor tp1 = view(pos + PROMPT, i32, 2, pshape1);
  CK(sals_cache_append(cache, &tk1, &tv1, &tp1, NULL));
  float q[HQ * D], out[HQ * D];
  for (int i = 0; i < HQ * D; ++i) q[i] = frand();
  DLTensor tq = view(q, f32, 4, qshape), to = view(out, f32, 4, qshape);
  CK(sals_cache_attend(cache, &tq, &tp1, &to, NULL));

  double norm = 0;
  for (int i = 0; i < HQ * D; ++i) norm += (double)out[i] * out[i];
  static int32_t idx[PROMPT + 16];
  int32_t count;
  int64_t ishape[3] = {1, 1, PROMPT + 16}, cshape[1] = {1};
  DLTensor ti = view(idx, i32, 3, ishape), tc = view(&count, i32, 1, cshape);
  CK(sals_cache_selected(cache, &ti, &tc, NULL));
  sals_memory_t m;
  CK(sals_cache_memory(cache, &m, NULL));
  printf("sals %s: output norm %.6f, %d of %d candidate tokens selected\n", sals_version(),
         sqrt(norm), count, PROMPT + 1 - cfg.n_sink - cfg.n_recent);
  printf(
      "memory: latent keys %llu, values %llu, scales %llu, exact windows %llu, positions %llu,\n"
      "        projection %llu, total %llu bytes = %.3f of dense fp16 (%llu); allocated %llu\n",
      (unsigned long long)m.latent_keys, (unsigned long long)m.values,
      (unsigned long long)m.value_scales, (unsigned long long)m.exact_window,
      (unsigned long long)m.positions, (unsigned long long)m.projection,
      (unsigned long long)m.total, (double)m.total / (double)m.dense_fp16,
      (unsigned long long)m.dense_fp16, (unsigned long long)m.allocated);
  sals_cache_destroy(cache);
  free(k);
  free(v);
  free(pos);
  return !(norm > 0 && count == (int)ceil(0.125 * (PROMPT + 1)));
}
