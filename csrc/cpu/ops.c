/* CPU backend: stateless stages on caller-provided tensors. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu.h"

/* Scratch of a stateless call: ws_stride floats for every thread it may use. */
typedef struct {
  float* ws;
  int64_t ws_stride;
} scratch_t;

static float* thread_scratch(const scratch_t* s, int32_t thread) {
  return s->ws + thread * s->ws_stride;
}

/* Allocate the scratch (per call: not a hot path), run fn over n_tasks with ctx, free it. */
static sals_status_t run_tasks(scratch_t* s, int64_t n_tasks, double flops, sals_task_fn fn,
                               void* ctx) {
  s->ws = (float*)malloc((size_t)(s->ws_stride * sals_online_cores()) * sizeof(float));
  if (!s->ws) return sals_set_error(SALS_ERR_OUT_OF_MEMORY, "out of host memory (scratch)");
  sals_parallel_for(n_tasks, flops, fn, ctx);
  free(s->ws);
  s->ws = NULL;
  return SALS_OK;
}

/* A compact float32 copy of a 2-D view, transposed when `transpose`. */
static float* dense_f32(const sals_view_t* m, int transpose, sals_status_t* st) {
  const int64_t R = m->shape[0], C = m->shape[1];
  float* p = (float*)malloc((size_t)(R * C + C) * sizeof(float));
  if (!p) {
    *st = sals_set_error(SALS_ERR_OUT_OF_MEMORY, "out of host memory (projection copy)");
    return NULL;
  }
  float* row = p + R * C;
  for (int64_t i = 0; i < R; ++i) {
    sals_load_f32(transpose ? row : p + i * C, sals_view_at(m, i, 0, 0, 0), m->elem, C);
    if (transpose)
      for (int64_t j = 0; j < C; ++j) p[j * R + i] = row[j];
  }
  *st = SALS_OK;
  return p;
}

#define ROW_BLOCK 32

/* Tasks of ROW_BLOCK rows covering n rows. */
static int64_t row_blocks(int64_t n) { return (n + ROW_BLOCK - 1) / ROW_BLOCK; }

/* ---- project ------------------------------------------------------------------------------- */

typedef struct {
  const sals_view_t *x, *out;
  const float* proj;
  int64_t dk, r;
  scratch_t s;
} project_ctx;

static void project_task(void* p, int64_t task, int32_t thread) {
  const project_ctx* c = (const project_ctx*)p;
  const int64_t n0 = task * ROW_BLOCK, N = c->x->shape[0];
  const int64_t nb = N - n0 < ROW_BLOCK ? N - n0 : ROW_BLOCK;
  float* xb = thread_scratch(&c->s, thread);
  float* ob = xb + ROW_BLOCK * c->dk;
  for (int64_t i = 0; i < nb; ++i)
    sals_load_f32(xb + i * c->dk, sals_view_at(c->x, n0 + i, 0, 0, 0), c->x->elem, c->dk);
  sals_gemm(nb, c->r, c->dk, xb, c->dk, c->proj, c->r, ob, c->r, 0);
  for (int64_t i = 0; i < nb; ++i)
    sals_store_f32(sals_view_at(c->out, n0 + i, 0, 0, 0), c->out->elem, ob + i * c->r, c->r);
}

sals_status_t sals_cpu_project(const sals_view_t* x, const sals_view_t* proj,
                               const sals_view_t* out, void* stream) {
  (void)stream;
  sals_status_t st;
  project_ctx c = {x, out, NULL, x->shape[1], proj->shape[1], {NULL, 0}};
  c.s.ws_stride = ROW_BLOCK * (c.dk + c.r);
  float* pf = dense_f32(proj, 0, &st);
  if (!pf) return st;
  c.proj = pf;
  const int64_t N = x->shape[0];
  st = run_tasks(&c.s, row_blocks(N), 2.0 * (double)N * c.dk * c.r, project_task, &c);
  free(pf);
  return st;
}

/* ---- rope ---------------------------------------------------------------------------------- */

typedef struct {
  const sals_view_t *x, *pos, *out;
  const float* inv_freq;
  int32_t half, interleaved;
  float scaling;
  scratch_t s;
} rope_ctx;

static void rope_task(void* p, int64_t task, int32_t thread) {
  const rope_ctx* c = (const rope_ctx*)p;
  const int64_t H = c->x->shape[1], d = c->x->shape[2], N = c->x->shape[0];
  float* row = thread_scratch(&c->s, thread);
  float* cs = row + d;
  float* sn = cs + c->half;
  for (int64_t n = task * ROW_BLOCK; n < N && n < (task + 1) * ROW_BLOCK; ++n) {
    const int32_t pos = *(const int32_t*)sals_view_at(c->pos, n, 0, 0, 0);
    sals_rope_pos(pos, c->inv_freq, c->half, c->scaling, cs, sn);
    for (int64_t h = 0; h < H; ++h) {
      sals_load_f32(row, sals_view_at(c->x, n, h, 0, 0), c->x->elem, d);
      sals_rope_row(row, c->half, c->interleaved, cs, sn);
      sals_store_f32(sals_view_at(c->out, n, h, 0, 0), c->out->elem, row, d);
    }
  }
}

sals_status_t sals_cpu_rope_apply(const sals_view_t* x, const sals_view_t* pos,
                                  const float* inv_freq, int32_t rotary_dim,
                                  float attention_scaling, int32_t interleaved,
                                  const sals_view_t* out, void* stream) {
  (void)stream;
  rope_ctx c = {x, pos, out, inv_freq, rotary_dim / 2, interleaved, attention_scaling, {NULL, 0}};
  c.s.ws_stride = x->shape[2] + rotary_dim;
  const int64_t N = x->shape[0];
  return run_tasks(&c.s, row_blocks(N), 40.0 * (double)N * x->shape[1] * x->shape[2], rope_task,
                   &c);
}

/* ---- score + select ------------------------------------------------------------------------ */

typedef struct {
  const sals_view_t *q_lat, *k_lat, *lengths, *idx;
  int32_t score_rank, n_sink, n_recent, budget;
  scratch_t s;
} select_ctx;

static void select_task(void* p, int64_t task, int32_t thread) {
  const select_ctx* c = (const select_ctx*)p;
  const int64_t H = c->q_lat->shape[1], S = c->k_lat->shape[1];
  const int64_t b = task / H, h = task % H, rs = c->score_rank;
  float* qv = thread_scratch(&c->s, thread);
  float* krow = qv + rs;
  float* score = krow + rs;
  int32_t* perm = (int32_t*)(score + S);
  int32_t* chosen = perm + S;
  const int64_t len = c->lengths ? *(const int32_t*)sals_view_at(c->lengths, b, 0, 0, 0) : S;
  const int64_t c0 = c->n_sink, c1 = len - c->n_recent;
  const int64_t n = c1 > c0 ? c1 - c0 : 0;
  sals_load_f32(qv, sals_view_at(c->q_lat, b, h, 0, 0), c->q_lat->elem, rs);
  for (int64_t j = 0; j < n; ++j) {
    sals_load_f32(krow, sals_view_at(c->k_lat, b, c0 + j, 0, 0), c->k_lat->elem, rs);
    score[j] = sals_dot(qv, krow, rs);
  }
  const int64_t m = sals_topk(score, n, c->budget, perm, chosen);
  int32_t* dst = (int32_t*)sals_view_at(c->idx, b, h, 0, 0);
  for (int64_t i = 0; i < c->budget; ++i) dst[i] = i < m ? (int32_t)(c0 + chosen[i]) : -1;
}

sals_status_t sals_cpu_score_select(const sals_view_t* q_lat, const sals_view_t* k_lat,
                                    const sals_view_t* lengths, int32_t score_rank, int32_t n_sink,
                                    int32_t n_recent, int32_t budget, const sals_view_t* idx,
                                    void* stream) {
  (void)stream;
  select_ctx c = {q_lat, k_lat, lengths, idx, score_rank, n_sink, n_recent, budget, {NULL, 0}};
  const int64_t S = k_lat->shape[1];
  c.s.ws_stride = 2 * (int64_t)score_rank + 3 * S; /* int32 scratch shares the float slots */
  const int64_t tasks = q_lat->shape[0] * q_lat->shape[1];
  return run_tasks(&c.s, tasks, 4.0 * (double)tasks * S * score_rank, select_task, &c);
}

/* ---- rebuild + rope ------------------------------------------------------------------------ */

typedef struct {
  const sals_view_t *k_lat, *pos, *out;
  const float* proj_t; /* [R, Dk] */
  const float* inv_freq;
  int32_t half, interleaved;
  float scaling;
  scratch_t s;
} rebuild_ctx;

static void rebuild_task(void* p, int64_t task, int32_t thread) {
  const rebuild_ctx* c = (const rebuild_ctx*)p;
  const int64_t N = c->k_lat->shape[0], R = c->k_lat->shape[1];
  const int64_t H = c->out->shape[1], d = c->out->shape[2], dk = H * d;
  const int64_t n0 = task * ROW_BLOCK, nb = N - n0 < ROW_BLOCK ? N - n0 : ROW_BLOCK;
  float* lat = thread_scratch(&c->s, thread);
  float* keys = lat + ROW_BLOCK * R;
  float* cs = keys + ROW_BLOCK * dk;
  float* sn = cs + c->half;
  for (int64_t i = 0; i < nb; ++i)
    sals_load_f32(lat + i * R, sals_view_at(c->k_lat, n0 + i, 0, 0, 0), c->k_lat->elem, R);
  sals_gemm(nb, dk, R, lat, R, c->proj_t, dk, keys, dk, 0);
  for (int64_t i = 0; i < nb; ++i) {
    const int32_t pos = *(const int32_t*)sals_view_at(c->pos, n0 + i, 0, 0, 0);
    sals_rope_pos(pos, c->inv_freq, c->half, c->scaling, cs, sn);
    for (int64_t h = 0; h < H; ++h) {
      float* row = keys + i * dk + h * d;
      sals_rope_row(row, c->half, c->interleaved, cs, sn);
      sals_store_f32(sals_view_at(c->out, n0 + i, h, 0, 0), c->out->elem, row, d);
    }
  }
}

sals_status_t sals_cpu_rebuild_rope(const sals_view_t* k_lat, const sals_view_t* proj,
                                    const sals_view_t* pos, const float* inv_freq,
                                    int32_t rotary_dim, float attention_scaling,
                                    int32_t interleaved, const sals_view_t* out, void* stream) {
  (void)stream;
  sals_status_t st;
  rebuild_ctx c = {
      k_lat, pos, out, NULL, inv_freq, rotary_dim / 2, interleaved, attention_scaling, {NULL, 0}};
  const int64_t R = k_lat->shape[1], dk = proj->shape[0], N = k_lat->shape[0];
  float* pt = dense_f32(proj, 1, &st);
  if (!pt) return st;
  c.proj_t = pt;
  c.s.ws_stride = ROW_BLOCK * (R + dk) + rotary_dim;
  st = run_tasks(&c.s, row_blocks(N), 2.0 * (double)N * R * dk, rebuild_task, &c);
  free(pt);
  return st;
}

/* ---- sparse attention ---------------------------------------------------------------------- */

typedef struct {
  const sals_view_t *q, *k, *v, *idx, *lengths, *out;
  float scale;
  scratch_t s;
} attn_ctx;

static void attn_task(void* p, int64_t task, int32_t thread) {
  const attn_ctx* c = (const attn_ctx*)p;
  const int64_t Hq = c->q->shape[1], d = c->q->shape[2], S = c->k->shape[1];
  const int64_t Hkv = c->k->shape[2], G = Hq / Hkv;
  const int64_t b = task / Hkv, h = task % Hkv;
  sals_attn_ws_t w;
  float* row = sals_attn_ws_carve(thread_scratch(&c->s, thread), G, d, &w);
  float *q = w.q, *kt = w.kt, *v = w.v;
  int32_t* zeros = (int32_t*)(row + d); /* key and query positions: all visible */
  memset(zeros, 0, SALS_KEY_BLOCK * sizeof(int32_t));
  for (int64_t g = 0; g < G; ++g) {
    sals_load_f32(q + g * d, sals_view_at(c->q, b, h * G + g, 0, 0), c->q->elem, d);
    for (int64_t i = 0; i < d; ++i) q[g * d + i] *= c->scale;
  }
  sals_attn_init(G, d, w.m, w.l, w.acc);
  const int64_t len = c->lengths ? *(const int32_t*)sals_view_at(c->lengths, b, 0, 0, 0) : S;
  const int32_t* list = NULL;
  int64_t n = len;
  if (c->idx) {
    list = (const int32_t*)sals_view_at(c->idx, b, c->idx->shape[1] == 1 ? 0 : h, 0, 0);
    n = c->idx->shape[2];
  }
  for (int64_t j0 = 0; j0 < n;) {
    int64_t nk = 0;
    for (; j0 < n && nk < SALS_KEY_BLOCK; ++j0) {
      const int64_t t = list ? list[j0] : j0;
      if (t < 0) continue;
      sals_load_f32(row, sals_view_at(c->k, b, t, h, 0), c->k->elem, d);
      for (int64_t i = 0; i < d; ++i) kt[i * SALS_KEY_BLOCK + nk] = row[i];
      sals_load_f32(v + nk * d, sals_view_at(c->v, b, t, h, 0), c->v->elem, d);
      ++nk;
    }
    if (nk > 0)
      sals_attn_block(G, d, nk, q, kt, SALS_KEY_BLOCK, v, zeros, zeros, w.s, w.m, w.l, w.acc);
  }
  for (int64_t g = 0; g < G; ++g) {
    const float inv = w.l[g] > 0.0f ? 1.0f / w.l[g] : 0.0f;
    for (int64_t i = 0; i < d; ++i) row[i] = w.acc[g * d + i] * inv;
    sals_store_f32(sals_view_at(c->out, b, h * G + g, 0, 0), c->out->elem, row, d);
  }
}

sals_status_t sals_cpu_sparse_attention(const sals_view_t* q, const sals_view_t* k,
                                        const sals_view_t* v, const sals_view_t* idx,
                                        const sals_view_t* lengths, float scale,
                                        const sals_view_t* out, void* stream) {
  (void)stream;
  const int64_t Hq = q->shape[1], d = q->shape[2], Hkv = k->shape[2], G = Hq / Hkv;
  attn_ctx c = {q, k, v, idx, lengths, out, scale, {NULL, 0}};
  c.s.ws_stride = sals_attn_ws_floats(G, d) + d + SALS_KEY_BLOCK;
  const double n = idx ? (double)idx->shape[2] : (double)k->shape[1];
  return run_tasks(&c.s, q->shape[0] * Hkv, 4.0 * (double)q->shape[0] * Hq * d * n, attn_task, &c);
}

/* ---- value quantisation -------------------------------------------------------------------- */

typedef struct {
  const sals_view_t *v, *packed, *scale, *zero;
  int32_t bits, group;
  scratch_t s;
} quant_ctx;

static void quant_task(void* p, int64_t task, int32_t thread) {
  const quant_ctx* c = (const quant_ctx*)p;
  const int64_t N = c->v->shape[0], D = c->v->shape[1];
  float* row = thread_scratch(&c->s, thread);
  for (int64_t n = task * ROW_BLOCK; n < N && n < (task + 1) * ROW_BLOCK; ++n) {
    sals_load_f32(row, sals_view_at(c->v, n, 0, 0, 0), c->v->elem, D);
    sals_quantize_row(row, D, c->bits, c->group, (uint8_t*)sals_view_at(c->packed, n, 0, 0, 0),
                      (uint16_t*)sals_view_at(c->scale, n, 0, 0, 0),
                      (uint16_t*)sals_view_at(c->zero, n, 0, 0, 0));
  }
}

static void dequant_task(void* p, int64_t task, int32_t thread) {
  const quant_ctx* c = (const quant_ctx*)p;
  const int64_t N = c->v->shape[0], D = c->v->shape[1];
  float* row = thread_scratch(&c->s, thread);
  for (int64_t n = task * ROW_BLOCK; n < N && n < (task + 1) * ROW_BLOCK; ++n) {
    sals_dequantize_row((const uint8_t*)sals_view_at(c->packed, n, 0, 0, 0),
                        (const uint16_t*)sals_view_at(c->scale, n, 0, 0, 0),
                        (const uint16_t*)sals_view_at(c->zero, n, 0, 0, 0), D, c->bits, c->group,
                        row);
    sals_store_f32(sals_view_at(c->v, n, 0, 0, 0), c->v->elem, row, D);
  }
}

static sals_status_t run_quant(quant_ctx* c, sals_task_fn fn) {
  c->s.ws_stride = c->v->shape[1];
  const int64_t N = c->v->shape[0];
  return run_tasks(&c->s, row_blocks(N), 8.0 * (double)N * c->v->shape[1], fn, c);
}

sals_status_t sals_cpu_quantize_values(const sals_view_t* v, int32_t bits, int32_t group,
                                       const sals_view_t* packed, const sals_view_t* scale,
                                       const sals_view_t* zero, void* stream) {
  (void)stream;
  quant_ctx c = {v, packed, scale, zero, bits, group, {NULL, 0}};
  return run_quant(&c, quant_task);
}

sals_status_t sals_cpu_dequantize_values(const sals_view_t* packed, const sals_view_t* scale,
                                         const sals_view_t* zero, int32_t bits, int32_t group,
                                         const sals_view_t* out, void* stream) {
  (void)stream;
  quant_ctx c = {out, packed, scale, zero, bits, group, {NULL, 0}};
  return run_quant(&c, dequant_task);
}
