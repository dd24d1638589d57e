/*
 * Times one SALS decode step (append one token + sparse attend) of a Llama-3.1-8B-shaped layer
 * (32 query / 8 KV heads, head dim 128) on the CPU.
 *   cc -O2 -I csrc/include examples/c/bench_decode.c -L build -lsals -lm -o bench_decode
 *   LD_LIBRARY_PATH=build ./bench_decode [tokens=4096] [steps=20] [threads=0]
 * [which=all|25|12.5|dense]
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <sals/sals.h>

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void tensor(DLTensor* t, int64_t* shape, void* data, DLDataType dt, int ndim) {
  t->data = data;
  t->device.device_type = kDLCPU;
  t->device.device_id = 0;
  t->ndim = ndim;
  t->dtype = dt;
  t->shape = shape;
  t->strides = NULL;
  t->byte_offset = 0;
}

#define CK(call)                                                               \
  do {                                                                         \
    sals_status_t st_ = (call);                                                \
    if (st_ != SALS_OK) {                                                      \
      fprintf(stderr, "%s: %s\n", sals_status_string(st_), sals_last_error()); \
      exit(1);                                                                 \
    }                                                                          \
  } while (0)

static void run(const char* name, int rank, int score_rank, int bits, int S, int steps,
                int threads) {
  const int Hq = 32, Hkv = 8, d = 128, dk = Hkv * d;
  const DLDataType f32 = {kDLFloat, 32, 1}, i32 = {kDLInt, 32, 1};
  sals_config_t cfg = sals_config_default();
  cfg.n_head_q = Hq;
  cfg.n_head_kv = Hkv;
  cfg.head_dim = d;
  cfg.rank = rank;
  cfg.score_rank = score_rank;
  cfg.value_bits = bits;
  cfg.max_batch = 1;
  cfg.max_tokens = S + steps;
  cfg.n_threads = threads;
  float inv_freq[64];
  for (int i = 0; i < 64; ++i) inv_freq[i] = powf(500000.0f, -2.0f * (float)i / 128.0f);
  sals_rope_t rope = {inv_freq, 128, 1.0f, 0};
  /* Any orthonormal columns serve for timing: the leading coordinate axes. */
  float* U = calloc((size_t)dk * rank, sizeof(float));
  for (int i = 0; i < rank; ++i) U[(size_t)i * rank + i] = 1.0f;
  int64_t us[2] = {dk, rank};
  DLTensor tu;
  tensor(&tu, us, U, f32, 2);
  sals_cache_t* c;
  CK(sals_cache_create(&cfg, &rope, &tu, &c));
  free(U);

  const int chunk = 512;
  float* k = malloc(sizeof(float) * (size_t)chunk * dk);
  float* v = malloc(sizeof(float) * (size_t)chunk * dk);
  int32_t* pos = malloc(sizeof(int32_t) * chunk);
  srand(1);
  for (size_t i = 0; i < (size_t)chunk * dk; ++i) {
    k[i] = (float)rand() / RAND_MAX - 0.5f;
    v[i] = (float)rand() / RAND_MAX - 0.5f;
  }
  double t0 = now();
  for (int s0 = 0; s0 < S; s0 += chunk) {
    const int n = S - s0 < chunk ? S - s0 : chunk;
    for (int t = 0; t < n; ++t) pos[t] = s0 + t;
    int64_t ks[4] = {1, n, Hkv, d}, ps[2] = {1, n};
    DLTensor tk, tv, tp;
    tensor(&tk, ks, k, f32, 4);
    tensor(&tv, ks, v, f32, 4);
    tensor(&tp, ps, pos, i32, 2);
    CK(sals_cache_append(c, &tk, &tv, &tp, NULL));
  }
  const double t_prefill = now() - t0;

  float* q = malloc(sizeof(float) * Hq * d);
  float* out = malloc(sizeof(float) * Hq * d);
  for (int i = 0; i < Hq * d; ++i) q[i] = (float)rand() / RAND_MAX - 0.5f;
  int64_t ks[4] = {1, 1, Hkv, d}, qs[4] = {1, 1, Hq, d}, ps[2] = {1, 1};
  DLTensor tk, tv, tp, tq, to;
  tensor(&tk, ks, k, f32, 4);
  tensor(&tv, ks, v, f32, 4);
  tensor(&tp, ps, pos, i32, 2);
  tensor(&tq, qs, q, f32, 4);
  tensor(&to, qs, out, f32, 4);
  double t_append = 0, t_attend = 0, best = 1e9;
  for (int step = 0; step < steps; ++step) {
    pos[0] = S + step;
    double a = now();
    CK(sals_cache_append(c, &tk, &tv, &tp, NULL));
    double b = now();
    CK(sals_cache_attend(c, &tq, &tp, &to, NULL));
    double e = now();
    if (step > 0) { /* the first step warms caches and pages */
      t_append += b - a;
      t_attend += e - b;
    }
    best = e - b < best ? e - b : best;
  }
  sals_memory_t m;
  CK(sals_cache_memory(c, &m, NULL));
  printf(
      "%-10s S=%6d  append %.3f ms  attend %.3f ms (best %.3f)  prefill %.1f tok/ms  "
      "kv bytes %.3f of dense fp16\n",
      name, S, 1e3 * t_append / (steps - 1), 1e3 * t_attend / (steps - 1), 1e3 * best,
      S / (1e3 * t_prefill), (double)m.total / (double)m.dense_fp16);
  sals_cache_destroy(c);
  free(q);
  free(out);
  free(k);
  free(v);
  free(pos);
}

int main(int argc, char** argv) {
  const int S = argc > 1 ? atoi(argv[1]) : 4096;
  const int steps = argc > 2 ? atoi(argv[2]) : 20;
  const int threads = argc > 3 ? atoi(argv[3]) : 0;
  if (S < 1 || steps < 2) {
    fprintf(stderr, "usage: bench_decode [tokens >= 1] [steps >= 2] [threads]\n");
    return 2;
  }
  const char* which = argc > 4 ? argv[4] : "all";
  const int all = !strcmp(which, "all");
  if (all || !strcmp(which, "25")) run("SALS-25%", 256, 128, 4, S, steps, threads);
  if (all || !strcmp(which, "12.5")) run("SALS-12.5%", 128, 64, 2, S, steps, threads);
  if (all || !strcmp(which, "dense")) run("dense-eq", 1024, 1024, 16, S, steps, threads);
  return 0;
}
