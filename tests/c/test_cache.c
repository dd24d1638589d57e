/*
 * Numerical tests of the cache against a float64 dense reference: dense equivalence at full
 * rank / full budget / 16-bit values, then each lossy knob on its own, GQA ratios, head dims,
 * odd sizes, ragged batches (batched == per sequence), non-contiguous inputs.
 */
#include "util.h"

typedef struct {
  int B, Hq, Hkv, d, rank, score_rank, bits, n_sink, n_recent, budget_tokens;
  float budget_frac;
  int per_head, dense, interleaved, rot, noncontig, n_threads;
  sals_dtype_t dtype;
  const int* lens; /* prompt length per sequence */
} scen_t;

/* Orthonormal columns by Gram–Schmidt on random vectors: U [dk, r]; r == dk gives identity. */
static void make_projection(float* U, int dk, int r, int identity) {
  double* col = (double*)malloc(sizeof(double) * (size_t)dk * r);
  for (int j = 0; j < r; ++j) {
    double* c = col + (size_t)j * dk;
    for (int i = 0; i < dk; ++i) c[i] = identity ? (i == j) : urand();
    for (int pass = 0; pass < 2; ++pass)
      for (int p = 0; p < j; ++p) {
        const double* o = col + (size_t)p * dk;
        double dot = 0;
        for (int i = 0; i < dk; ++i) dot += o[i] * c[i];
        for (int i = 0; i < dk; ++i) c[i] -= dot * o[i];
      }
    double n = 0;
    for (int i = 0; i < dk; ++i) n += c[i] * c[i];
    n = sqrt(n);
    for (int i = 0; i < dk; ++i) c[i] /= n;
  }
  for (int i = 0; i < dk; ++i)
    for (int j = 0; j < r; ++j) U[(size_t)i * r + j] = (float)col[(size_t)j * dk + i];
  free(col);
}

static float round_store(float x, sals_dtype_t t) {
  if (t == SALS_DTYPE_FLOAT16) return from_f16(to_f16(x));
  if (t == SALS_DTYPE_BFLOAT16) {
    uint32_t u;
    memcpy(&u, &x, 4);
    u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    memcpy(&x, &u, 4);
  }
  return x;
}

/*
 * Appends each sequence's prompt (ragged, right-padded) and one decode token, attends once
 * with T = 1 and once with the last 3 prompt positions (T = 3, dense path), and compares with
 * the reference built from what the cache is documented to keep: exact windows, rebuilt
 * latent keys U U^T k, values dequantised (16-bit: rounded to the storage dtype).
 * Returns the max error of the decode output; *sel_out receives the selection counts.
 */
/* Attend the first T query rows of each sequence of q [B, 4, Hq, d] (a strided view) at
 * pos [B, T] into the same rows of out [B, 4, Hq, d]. */
static sals_status_t attend_rows(sals_cache_t* cache, float* q, int32_t* pos, float* out, int B,
                                 int T, int Hq, int d) {
  tensor_t tq, tqp, to;
  tset(&tq, q, F32, 4, B, T, Hq, d);
  tstride(&tq, 4 * Hq * d, Hq * d, d, 1);
  tset(&tqp, pos, I32, 2, B, T, 0, 0);
  tset(&to, out, F32, 4, B, T, Hq, d);
  tstride(&to, 4 * Hq * d, Hq * d, d, 1);
  return sals_cache_attend(cache, &tq.t, &tqp.t, &to.t, NULL);
}

static double run_scenario(const scen_t* s, double tol, const char* label, float* out_decode) {
  const int B = s->B, Hq = s->Hq, Hkv = s->Hkv, d = s->d, dk = Hkv * d, G = Hq / Hkv;
  int maxS = 0;
  for (int b = 0; b < B; ++b) maxS = s->lens[b] > maxS ? s->lens[b] : maxS;
  const int T = maxS;
  sals_config_t cfg = sals_config_default();
  cfg.n_head_q = Hq;
  cfg.n_head_kv = Hkv;
  cfg.head_dim = d;
  cfg.rank = s->rank;
  cfg.score_rank = s->score_rank;
  cfg.value_bits = s->bits;
  cfg.value_group = 32 <= d ? 32 : d;
  cfg.n_sink = s->n_sink;
  cfg.n_recent = s->n_recent;
  cfg.budget_frac = s->budget_frac;
  cfg.budget_tokens = s->budget_tokens;
  cfg.select_per_head = s->per_head;
  cfg.dense = s->dense;
  cfg.max_batch = B;
  cfg.max_tokens = T + 1;
  cfg.dtype = s->dtype;
  cfg.n_threads = s->n_threads;
  float* inv_freq = (float*)malloc(sizeof(float) * (size_t)(s->rot / 2 + 1));
  make_inv_freq(inv_freq, s->rot, 10000.0);
  sals_rope_t rope = {inv_freq, s->rot, 1.0f, s->interleaved};
  float* U = (float*)malloc(sizeof(float) * (size_t)dk * s->rank);
  make_projection(U, dk, s->rank, s->rank == dk);
  tensor_t tu;
  tset(&tu, U, F32, 2, dk, s->rank, 0, 0);
  sals_cache_t* cache = NULL;
  sals_status_t st = sals_cache_create(&cfg, &rope, &tu.t, &cache);
  CHECK(st == SALS_OK, "%s: create: %s", label, sals_last_error());
  if (st != SALS_OK) return INFINITY;

  /* Keys/values [B][T+1][Hkv][d]; queries [B][4][Hq][d]; non-contiguous layouts hold the same
   * numbers in [B][H][T][d] order. */
  const size_t kvn = (size_t)B * (T + 1) * dk;
  float* k = (float*)malloc(sizeof(float) * kvn);
  float* v = (float*)malloc(sizeof(float) * kvn);
  float* q = (float*)malloc(sizeof(float) * (size_t)B * 4 * Hq * d);
  fill(k, (int64_t)kvn, 1.0);
  fill(v, (int64_t)kvn, 1.0);
  fill(q, (int64_t)B * 4 * Hq * d, 1.0);
  int32_t* pos = (int32_t*)malloc(sizeof(int32_t) * (size_t)B * (T + 1));
  for (int b = 0; b < B; ++b)
    for (int t = 0; t <= T; ++t) pos[b * (T + 1) + t] = t < s->lens[b] ? t : -1;

  /* Prompt: tokens [0, T) of each row. */
  float *kt = k, *vt = v;
  tensor_t tk, tv, tp;
  float *kperm = NULL, *vperm = NULL;
  if (s->noncontig) {
    kperm = (float*)malloc(sizeof(float) * kvn);
    vperm = (float*)malloc(sizeof(float) * kvn);
    for (int b = 0; b < B; ++b)
      for (int t = 0; t <= T; ++t)
        for (int h = 0; h < Hkv; ++h)
          for (int i = 0; i < d; ++i) {
            size_t src = (((size_t)b * (T + 1) + t) * Hkv + h) * d + i;
            size_t dst = (((size_t)b * Hkv + h) * (T + 1) + t) * d + i;
            kperm[dst] = k[src];
            vperm[dst] = v[src];
          }
    kt = kperm;
    vt = vperm;
  }
  const int64_t sb = s->noncontig ? (int64_t)Hkv * (T + 1) * d : (int64_t)(T + 1) * dk;
  const int64_t st_ = s->noncontig ? d : dk, sh = s->noncontig ? (int64_t)(T + 1) * d : d;
  tset(&tk, kt, F32, 4, B, T, Hkv, d);
  tstride(&tk, sb, st_, sh, 1);
  tset(&tv, vt, F32, 4, B, T, Hkv, d);
  tstride(&tv, sb, st_, sh, 1);
  tset(&tp, pos, I32, 2, B, T, 0, 0);
  tstride(&tp, T + 1, 1, 0, 0);
  CHECK_OK(sals_cache_append(cache, &tk.t, &tv.t, &tp.t, NULL));

  /* Decode token: slot T of each row, at position lens[b]. */
  int32_t* dpos = (int32_t*)malloc(sizeof(int32_t) * (size_t)B);
  for (int b = 0; b < B; ++b) dpos[b] = s->lens[b];
  tset(&tk, (char*)kt + (size_t)T * st_ * 4, F32, 4, B, 1, Hkv, d);
  tstride(&tk, sb, st_, sh, 1);
  tset(&tv, (char*)vt + (size_t)T * st_ * 4, F32, 4, B, 1, Hkv, d);
  tstride(&tv, sb, st_, sh, 1);
  tset(&tp, dpos, I32, 2, B, 1, 0, 0);
  CHECK_OK(sals_cache_append(cache, &tk.t, &tv.t, &tp.t, NULL));

  /* The values and keys as the cache keeps them, token by token (slot j of sequence b is
   * token j of the prompt, and slot lens[b] is the decode token). */
  const int n_slots = T + 1;
  float* kref = (float*)malloc(sizeof(float) * (size_t)B * n_slots * dk);
  float* vref = (float*)malloc(sizeof(float) * (size_t)B * n_slots * dk);
  int32_t* kpos = (int32_t*)malloc(sizeof(int32_t) * (size_t)B * n_slots);
  uint8_t* packed = (uint8_t*)malloc((size_t)dk);
  uint16_t* qs = (uint16_t*)malloc(sizeof(uint16_t) * (size_t)dk * 2);
  float* latref = (float*)malloc(sizeof(float) * (size_t)B * n_slots * s->rank);
  for (int b = 0; b < B; ++b) {
    const int S = s->lens[b] + 1;
    const int ns = S < s->n_sink ? S : s->n_sink;
    const int re = S - s->n_recent > ns ? S - s->n_recent : ns;
    for (int j = 0; j < S; ++j) {
      const int src_t = j < s->lens[b] ? j : T;
      const float* kr = k + ((size_t)b * (T + 1) + src_t) * dk;
      const float* vr = v + ((size_t)b * (T + 1) + src_t) * dk;
      float* ko = kref + ((size_t)b * n_slots + j) * dk;
      float* vo = vref + ((size_t)b * n_slots + j) * dk;
      kpos[b * n_slots + j] = j;
      const int exact = j < ns || j >= re;
      float* lat = latref + ((size_t)b * n_slots + j) * s->rank;
      if (exact) {
        for (int i = 0; i < dk; ++i) ko[i] = round_store(kr[i], s->dtype);
        for (int i = 0; i < dk; ++i) vo[i] = round_store(vr[i], s->dtype);
        continue;
      }
      for (int c = 0; c < s->rank; ++c) {
        double a = 0;
        for (int i = 0; i < dk; ++i) a += (double)U[(size_t)i * s->rank + c] * kr[i];
        lat[c] = round_store((float)a, s->dtype);
      }
      for (int i = 0; i < dk; ++i) {
        double a = 0;
        for (int c = 0; c < s->rank; ++c) a += (double)U[(size_t)i * s->rank + c] * lat[c];
        ko[i] = (float)a;
      }
      if (s->bits == 16) {
        for (int i = 0; i < dk; ++i) vo[i] = round_store(vr[i], s->dtype);
      } else {
        tensor_t tin, tpk, tsc, tz, tout;
        tset(&tin, (void*)vr, F32, 2, 1, dk, 0, 0);
        tset(&tpk, packed, U8, 2, 1, dk * s->bits / 8, 0, 0);
        tset(&tsc, qs, F16, 2, 1, dk / cfg.value_group, 0, 0);
        tset(&tz, qs + dk, F16, 2, 1, dk / cfg.value_group, 0, 0);
        tset(&tout, vo, F32, 2, 1, dk, 0, 0);
        CHECK_OK(
            sals_quantize_values(&tin.t, s->bits, cfg.value_group, &tpk.t, &tsc.t, &tz.t, NULL));
        CHECK_OK(
            sals_dequantize_values(&tpk.t, &tsc.t, &tz.t, s->bits, cfg.value_group, &tout.t, NULL));
      }
    }
  }

  /* Decode attend (T = 1). */
  float* out = (float*)malloc(sizeof(float) * (size_t)B * 4 * Hq * d);
  CHECK_OK(attend_rows(cache, q, dpos, out, B, 1, Hq, d));

  /* The selection, as sets. */
  const int nsel = s->per_head ? Hkv : 1;
  int32_t* idx = (int32_t*)malloc(sizeof(int32_t) * (size_t)B * nsel * n_slots);
  int32_t* cnt = (int32_t*)malloc(sizeof(int32_t) * (size_t)B);
  tensor_t ti, tc;
  tset(&ti, idx, I32, 3, B, nsel, n_slots, 0);
  tset(&tc, cnt, I32, 1, B, 0, 0, 0);
  CHECK_OK(sals_cache_selected(cache, &ti.t, &tc.t, NULL));

  double err = 0.0;
  double* ref = (double*)malloc(sizeof(double) * (size_t)d);
  char* keep = (char*)malloc((size_t)n_slots);
  const double scale = 1.0 / sqrt((double)d);
  for (int b = 0; b < B; ++b) {
    const int S = s->lens[b] + 1;
    const int ns = S < s->n_sink ? S : s->n_sink;
    const int re = S - s->n_recent > ns ? S - s->n_recent : ns;
    const int n_cand = re - ns;
    int budget = s->budget_tokens > 0 ? s->budget_tokens : (int)ceil((double)s->budget_frac * S);
    if (budget > n_cand) budget = n_cand;
    const int sparse = !s->dense;
    if (sparse)
      CHECK(cnt[b] == budget, "%s: seq %d selected %d, budget %d", label, b, cnt[b], budget);
    else CHECK(cnt[b] == 0, "%s: dense attend reports %d selected", label, cnt[b]);
    for (int h = 0; h < Hkv; ++h) {
      for (int j = 0; j < S; ++j) keep[j] = !sparse || j < ns || j >= re;
      if (sparse) {
        const int32_t* row = idx + ((size_t)b * nsel + (s->per_head ? h : 0)) * n_slots;
        /* The set is the top `budget` by the documented score: the group-summed pre-RoPE
         * query projected on U (the head's rows for per-head selection) . the leading
         * score_rank latent coordinates. */
        double worst_in = INFINITY, best_out = -INFINITY;
        char* in = (char*)calloc((size_t)n_slots, 1);
        for (int n = 0; n < cnt[b]; ++n)
          if (row[n] >= 0 && row[n] < n_slots) in[row[n]] = 1;
        for (int j = ns; j < re; ++j) {
          double sc = 0;
          for (int c = 0; c < s->score_rank; ++c) {
            double qt = 0;
            for (int hh = 0; hh < Hkv; ++hh) {
              if (s->per_head && hh != h) continue;
              for (int i = 0; i < d; ++i) {
                double qg = 0;
                for (int g = 0; g < G; ++g) qg += q[((size_t)b * 4 * Hq + hh * G + g) * d + i];
                qt += qg * U[(size_t)(hh * d + i) * s->rank + c];
              }
            }
            sc += qt * latref[((size_t)b * n_slots + j) * s->rank + c];
          }
          if (in[j]) worst_in = fmin(worst_in, sc);
          else best_out = fmax(best_out, sc);
        }
        free(in);
        CHECK(worst_in >= best_out - 1e-4 * fmax(1.0, fabs(best_out)),
              "%s: seq %d head %d selection not the top %d (worst in %g < best out %g)", label, b,
              h, budget, worst_in, best_out);
        for (int n = 0; n < n_slots; ++n) {
          if (n < cnt[b]) {
            CHECK(row[n] >= ns && row[n] < re, "%s: selected slot %d outside candidates", label,
                  row[n]);
            if (row[n] >= ns && row[n] < re) keep[row[n]] = 1;
          } else {
            CHECK(row[n] == -1, "%s: unused idx entry %d is %d", label, n, row[n]);
          }
        }
      }
      for (int g = 0; g < G; ++g) {
        const int qh = h * G + g;
        attend_ref(q + ((size_t)b * 4 * Hq + qh) * d, dpos[b], kref + (size_t)b * n_slots * dk,
                   vref + (size_t)b * n_slots * dk, kpos + (size_t)b * n_slots, S, Hkv, h, d,
                   inv_freq, s->rot, 1.0f, s->interleaved, scale, keep, ref);
        for (int i = 0; i < d; ++i) {
          const double e = fabs(out[((size_t)b * 4 * Hq + qh) * d + i] - ref[i]);
          err = e > err ? e : err;
        }
      }
    }
  }
  CHECK(err <= tol, "%s: decode max error %.3g > %.3g", label, err, tol);
  if (out_decode)
    for (int b = 0; b < B; ++b)
      memcpy(out_decode + (size_t)b * Hq * d, out + (size_t)b * 4 * Hq * d, sizeof(float) * Hq * d);

  /* Multi-token attend over the whole cache (dense path, causal): queries at the last three
   * prompt positions of each sequence (padding where the prompt is shorter). */
  int32_t* mpos = (int32_t*)malloc(sizeof(int32_t) * (size_t)B * 3);
  for (int b = 0; b < B; ++b)
    for (int t = 0; t < 3; ++t) mpos[b * 3 + t] = s->lens[b] - 3 + t; /* < 0 = padding */
  CHECK_OK(attend_rows(cache, q, mpos, out, B, 3, Hq, d));
  double err_m = 0.0;
  for (int b = 0; b < B; ++b) {
    const int S = s->lens[b] + 1;
    for (int j = 0; j < S; ++j) keep[j] = 1;
    for (int t = 0; t < 3; ++t)
      for (int qh = 0; qh < Hq; ++qh) {
        attend_ref(q + (((size_t)b * 4 + t) * Hq + qh) * d, mpos[b * 3 + t],
                   kref + (size_t)b * n_slots * dk, vref + (size_t)b * n_slots * dk,
                   kpos + (size_t)b * n_slots, S, Hkv, qh / G, d, inv_freq, s->rot, 1.0f,
                   s->interleaved, scale, keep, ref);
        for (int i = 0; i < d; ++i) {
          const double e = fabs(out[(((size_t)b * 4 + t) * Hq + qh) * d + i] - ref[i]);
          err_m = e > err_m ? e : err_m;
        }
      }
  }
  CHECK(err_m <= tol, "%s: multi-token max error %.3g > %.3g", label, err_m, tol);
  CHECK_OK(sals_cache_selected(cache, &ti.t, &tc.t, NULL));
  for (int b = 0; b < B; ++b) CHECK(cnt[b] == 0, "%s: count after T>1 attend is %d", label, cnt[b]);

  sals_cache_destroy(cache);
  free(mpos);
  free(keep);
  free(ref);
  free(cnt);
  free(idx);
  free(out);
  free(latref);
  free(qs);
  free(packed);
  free(kpos);
  free(vref);
  free(kref);
  free(dpos);
  free(kperm);
  free(vperm);
  free(pos);
  free(q);
  free(v);
  free(k);
  free(U);
  free(inv_freq);
  printf("  %-48s decode err %.2e, multi-token err %.2e\n", label, err, err_m);
  return err > err_m ? err : err_m;
}

static scen_t base(int B, int Hq, int Hkv, int d, const int* lens) {
  scen_t s;
  memset(&s, 0, sizeof s);
  s.B = B;
  s.Hq = Hq;
  s.Hkv = Hkv;
  s.d = d;
  s.rank = s.score_rank = Hkv * d;
  s.bits = 16;
  s.n_sink = 4;
  s.n_recent = 8;
  s.budget_frac = 1.0f;
  s.rot = d;
  s.dtype = SALS_DTYPE_FLOAT32;
  s.lens = lens;
  return s;
}

/*
 * A ragged batch (right-padded prompts of 130, 33 and 77 tokens) in one cache gives the same
 * decode outputs and the same selections as each sequence alone in its own cache, with latent
 * keys of key_bits (16, or quantised in groups of 16).
 */
static void test_batched_equals_single(int key_bits) {
  enum { B = 3, HQ = 8, HKV = 2, D = 64, DK = HKV * D, T = 130, R = 64 };
  static const int lens[B] = {130, 33, 77};
  sals_config_t cfg = sals_config_default();
  cfg.n_head_q = HQ;
  cfg.n_head_kv = HKV;
  cfg.head_dim = D;
  cfg.rank = R;
  cfg.score_rank = R / 2;
  cfg.value_bits = 4;
  cfg.n_sink = 4;
  cfg.n_recent = 8;
  cfg.max_batch = B;
  cfg.max_tokens = T + 1;
  cfg.key_bits = key_bits;
  cfg.key_group = 16;
  float inv_freq[D / 2];
  make_inv_freq(inv_freq, D, 10000.0);
  sals_rope_t rope = {inv_freq, D, 1.0f, 0};
  static float U[DK * R], k[B * (T + 1) * DK], v[B * (T + 1) * DK], q[B * HQ * D];
  static float out_b[B * HQ * D], out_1[HQ * D];
  static int32_t pos[B * (T + 1)], idx_b[B * (T + 1)], idx_1[T + 1], dpos[B];
  make_projection(U, DK, R, 0);
  fill(k, B * (T + 1) * DK, 1.0);
  fill(v, B * (T + 1) * DK, 1.0);
  fill(q, B * HQ * D, 1.0);
  for (int b = 0; b < B; ++b) {
    for (int t = 0; t <= T; ++t) pos[b * (T + 1) + t] = t < lens[b] ? t : -1;
    dpos[b] = lens[b];
  }
  tensor_t tu, tk, tv, tp, tq, to, ti, tc;
  tset(&tu, U, F32, 2, DK, R, 0, 0);
  int32_t cnt_b[B], cnt_1;
  for (int single = -1; single < B; ++single) {
    /* single = -1: the batch; else sequence `single` alone, sliced out of the same buffers. */
    const int b0 = single < 0 ? 0 : single, nb = single < 0 ? B : 1;
    const int tlen = single < 0 ? T : lens[single];
    cfg.max_batch = nb;
    sals_cache_t* c = NULL;
    CHECK_OK(sals_cache_create(&cfg, &rope, &tu.t, &c));
    if (!c) return;
    tset(&tk, k + (size_t)b0 * (T + 1) * DK, F32, 4, nb, tlen, HKV, D);
    tstride(&tk, (T + 1) * DK, DK, D, 1);
    tset(&tv, v + (size_t)b0 * (T + 1) * DK, F32, 4, nb, tlen, HKV, D);
    tstride(&tv, (T + 1) * DK, DK, D, 1);
    tset(&tp, pos + b0 * (T + 1), I32, 2, nb, tlen, 0, 0);
    tstride(&tp, T + 1, 1, 0, 0);
    CHECK_OK(sals_cache_append(c, &tk.t, &tv.t, &tp.t, NULL));
    tset(&tk, k + (size_t)b0 * (T + 1) * DK + (size_t)T * DK, F32, 4, nb, 1, HKV, D);
    tstride(&tk, (T + 1) * DK, DK, D, 1);
    tset(&tv, v + (size_t)b0 * (T + 1) * DK + (size_t)T * DK, F32, 4, nb, 1, HKV, D);
    tstride(&tv, (T + 1) * DK, DK, D, 1);
    tset(&tp, dpos + b0, I32, 2, nb, 1, 0, 0);
    CHECK_OK(sals_cache_append(c, &tk.t, &tv.t, &tp.t, NULL));
    tset(&tq, q + (size_t)b0 * HQ * D, F32, 4, nb, 1, HQ, D);
    tset(&to, single < 0 ? out_b : out_1, F32, 4, nb, 1, HQ, D);
    CHECK_OK(sals_cache_attend(c, &tq.t, &tp.t, &to.t, NULL));
    tset(&ti, single < 0 ? idx_b : idx_1, I32, 3, nb, 1, T + 1, 0);
    tset(&tc, single < 0 ? cnt_b : &cnt_1, I32, 1, nb, 0, 0, 0);
    CHECK_OK(sals_cache_selected(c, &ti.t, &tc.t, NULL));
    sals_cache_destroy(c);
    if (single < 0) continue;
    double err = 0;
    for (int i = 0; i < HQ * D; ++i) err = fmax(err, fabs(out_1[i] - out_b[single * HQ * D + i]));
    CHECK(err < 1e-6, "sequence %d alone differs from the batch by %g", single, err);
    int same = cnt_1 == cnt_b[single];
    for (int n = 0; same && n < cnt_1; ++n) same = idx_1[n] == idx_b[single * (T + 1) + n];
    CHECK(same, "sequence %d: selection alone differs from the batch", single);
    printf(
        "  batched == alone, %d-bit keys, sequence %d (%d tokens): max diff %.2e, %d "
        "selected\n",
        key_bits, single, lens[single] + 1, err, cnt_1);
  }
}

int main(void) {
  char label[128];
  /* Dense equivalence: identity projection, full budget, 16-bit float32 storage. */
  {
    static const int lens[] = {40, 17, 97};
    for (int gi = 0; gi < 4; ++gi) {
      static const int ratios[] = {1, 3, 4, 8};
      static const int dims[] = {64, 128, 256, 64};
      const int r = ratios[gi], d = dims[gi], hkv = r == 8 ? 1 : 2;
      scen_t s = base(3, hkv * r, hkv, d, lens);
      snprintf(label, sizeof label, "dense-equiv f32 G=%d d=%d", r, d);
      run_scenario(&s, 1e-5, label, NULL);
    }
    scen_t s = base(3, 8, 2, 128, lens);
    s.dtype = SALS_DTYPE_FLOAT16;
    run_scenario(&s, 2e-5, "dense-equiv f16 storage", NULL);
    s.dtype = SALS_DTYPE_BFLOAT16;
    run_scenario(&s, 2e-5, "dense-equiv bf16 storage", NULL);
    s.dtype = SALS_DTYPE_FLOAT32;
    s.noncontig = 1;
    run_scenario(&s, 1e-5, "dense-equiv non-contiguous", NULL);
    s.noncontig = 0;
    s.interleaved = 1;
    s.rot = 64;
    run_scenario(&s, 1e-5, "dense-equiv interleaved, partial rotary", NULL);
    s = base(3, 8, 2, 128, lens);
    s.dense = 1;
    run_scenario(&s, 1e-5, "dense layer", NULL);
    s = base(3, 8, 2, 128, lens);
    s.n_sink = 200;
    s.n_recent = 300;
    run_scenario(&s, 1e-5, "windows larger than the sequence", NULL);
  }
  /* Each lossy knob on its own, against the reference built from what the cache keeps. */
  {
    static const int lens[] = {300, 97, 4};
    scen_t s = base(3, 12, 4, 64, lens);
    s.rank = 64;
    s.score_rank = 64;
    run_scenario(&s, 1e-5, "low rank r=64 of 256", NULL);
    s.score_rank = 24;
    s.budget_frac = 0.125f;
    run_scenario(&s, 1e-5, "r=64, r*=24, budget 1/8 (shared)", NULL);
    s.per_head = 1;
    run_scenario(&s, 1e-5, "r=64, r*=24, budget 1/8 (per head)", NULL);
    s.per_head = 0;
    s.budget_tokens = 5;
    run_scenario(&s, 1e-5, "budget 5 tokens", NULL);
    for (int bits = 8; bits >= 2; bits /= 2) {
      scen_t q = base(3, 12, 4, 64, lens);
      q.bits = bits;
      snprintf(label, sizeof label, "values %d-bit", bits);
      run_scenario(&q, 1e-5, label, NULL);
    }
    scen_t p = base(3, 12, 4, 64, lens);
    p.rank = 128;
    p.score_rank = 64;
    p.bits = 4;
    p.budget_frac = 0.125f;
    p.dtype = SALS_DTYPE_FLOAT16;
    run_scenario(&p, 3e-5, "SALS-25%-like, float16 storage", NULL);
  }
  test_batched_equals_single(16);
  test_batched_equals_single(4);
  return finish();
}
