/*
 * CPU backend of paged storage: the tokens are slots of caller-owned pages, seen by layer.c as
 * fields of tokens (block, slot in the block). Scratch and worker threads are per call: the
 * settings are immutable, so calls may run concurrently.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "layer.h"

#define TOKEN_BLOCK 16 /* tokens per append task */
#define ATTN_ROWS 256  /* query rows per task on the multi-token path */
#define MAX_CHUNKS 64  /* token chunks per single-query work item */

static int64_t max_i64(int64_t a, int64_t b) { return a > b ? a : b; }

static sals_field_t field(const sals_view_t* pages, int64_t offset) {
  sals_field_t f = {NULL, pages->stride[0], pages->stride[1]};
  if (offset >= 0) f.base = (char*)pages->data + offset;
  return f;
}

/* The pages as one layer's fields (layer.h): token (block, slot in the block). */
static void describe_layer(const sals_paged_t* p, const sals_view_t* pages, sals_layer_t* L) {
  const sals_paged_layout_t* y = &p->layout;
  memset(L, 0, sizeof *L);
  L->cfg = &p->cfg;
  L->dk = p->dk;
  L->n_sel_heads = p->n_sel_heads;
  L->scale = p->scale;
  L->proj = p->proj;
  L->inv_freq = p->inv_freq;
  L->half = p->rotary_dim / 2;
  L->attention_scaling = p->attention_scaling;
  L->interleaved = p->interleaved;
  for (int i = 0; i < 2; ++i) {
    L->lat[i] = field(pages, y->lat[i]);
    L->lat_scale[i] = field(pages, y->lat_scale[i]);
    L->lat_zero[i] = field(pages, y->lat_zero[i]);
  }
  L->val = field(pages, y->val);
  L->val_scale = field(pages, y->val_scale);
  L->val_zero = field(pages, y->val_zero);
}

/* Per-call threads: all online cores when the work pays for starting them (sals_parallel_for's
 * rule), one pool for every stage of the call. NULL runs on the calling thread. */
static sals_pool_t* call_pool(int64_t n_tasks, double flops) {
  int64_t n = sals_online_cores();
  if (n > n_tasks) n = n_tasks;
  if (n > 1 && flops / (double)n < 2e6) n = 1;
  return n > 1 ? sals_pool_create((int32_t)n) : NULL;
}

/* ---- append -------------------------------------------------------------------------------- */

typedef struct {
  const sals_paged_t* p;
  const sals_layer_t* L;
  const sals_view_t *k, *v, *slots, *rows, *window; /* rows, window: NULL without a store */
  int64_t block_size;
  float* ws;
  int64_t ws_stride;
} append_ctx;

static int32_t slot_of(const sals_view_t* slots, int64_t n) {
  return ((const int32_t*)slots->data)[n * slots->stride[0]];
}

static void load_token(const sals_view_t* x, int64_t n, int64_t heads, int64_t d, float* dst) {
  for (int64_t h = 0; h < heads; ++h)
    sals_load_f32(dst + h * d, sals_view_at(x, n, h, 0, 0), x->elem, d);
}

static void append_task(void* ctx, int64_t task, int32_t thread) {
  const append_ctx* a = (const append_ctx*)ctx;
  const sals_config_t* g = &a->p->cfg;
  const int64_t dk = a->p->dk, r = g->rank, d = g->head_dim, N = a->k->shape[0];
  float* kf = a->ws + thread * a->ws_stride;
  float* lat = kf + TOKEN_BLOCK * dk;
  float* vf = lat + TOKEN_BLOCK * r;
  int32_t slots[TOKEN_BLOCK];
  int64_t n = 0;
  for (int64_t t = task * TOKEN_BLOCK; t < N && t < (task + 1) * TOKEN_BLOCK; ++t) {
    const int32_t s = slot_of(a->slots, t);
    if (s < 0) continue;
    load_token(a->k, t, g->n_head_kv, d, kf + n * dk);
    load_token(a->v, t, g->n_head_kv, d, vf);
    sals_layer_store_value(a->L, s / a->block_size, s % a->block_size, vf);
    const int32_t row = a->rows ? ((const int32_t*)a->rows->data)[t * a->rows->stride[0]] : -1;
    if (row >= 0) /* the exact copy: key then value, each [n_head_kv][head_dim] */
      for (int64_t h = 0; h < g->n_head_kv; ++h) {
        sals_store_f32(sals_view_at(a->window, row, 0, h, 0), a->window->elem, kf + n * dk + h * d,
                       d);
        sals_store_f32(sals_view_at(a->window, row, 1, h, 0), a->window->elem, vf + h * d, d);
      }
    slots[n++] = s;
  }
  if (n == 0) return;
  sals_gemm(n, r, dk, kf, dk, a->p->proj, r, lat, r, 0);
  for (int64_t i = 0; i < n; ++i)
    sals_layer_store_latent(a->L, slots[i] / a->block_size, slots[i] % a->block_size, lat + i * r);
}

/* Every stored token fits the storage (check_finite; the ABI layer checked finiteness). */
static sals_status_t check_storable(const sals_paged_t* p, const sals_view_t* k,
                                    const sals_view_t* v, const sals_view_t* slots, float* ws) {
  const sals_config_t* g = &p->cfg;
  float *kf = ws, *vf = kf + p->dk, *lat = vf + p->dk;
  char where[32];
  for (int64_t n = 0; n < k->shape[0]; ++n) {
    if (slot_of(slots, n) < 0) continue;
    load_token(k, n, g->n_head_kv, g->head_dim, kf);
    load_token(v, n, g->n_head_kv, g->head_dim, vf);
    snprintf(where, sizeof where, "token %lld", (long long)n);
    sals_status_t st = sals_check_storable(g, p->proj, kf, vf, lat, where);
    if (st != SALS_OK) return st;
  }
  return SALS_OK;
}

sals_status_t sals_cpu_paged_append(const sals_paged_t* p, const sals_view_t* k,
                                    const sals_view_t* v, const sals_view_t* slots,
                                    const sals_view_t* pages, const sals_view_t* window_rows,
                                    const sals_view_t* window) {
  const sals_config_t* g = &p->cfg;
  const int64_t N = k->shape[0], dk = p->dk, r = g->rank;
  const int64_t n_tasks = (N + TOKEN_BLOCK - 1) / TOKEN_BLOCK;
  sals_layer_t L;
  describe_layer(p, pages, &L);
  sals_pool_t* pool = call_pool(n_tasks, 2.0 * (double)N * dk * r);
  append_ctx a = {p, &L, k, v, slots, window_rows, window, pages->shape[1], NULL, 0};
  a.ws_stride = (TOKEN_BLOCK * (dk + r) + dk + 15) & ~(int64_t)15;
  a.ws = (float*)malloc((size_t)(a.ws_stride * sals_pool_size(pool)) * sizeof(float));
  sals_status_t st = SALS_OK;
  if (!a.ws) st = sals_set_error(SALS_ERR_OUT_OF_MEMORY, "out of host memory (append scratch)");
  if (st == SALS_OK && g->check_finite) st = check_storable(p, k, v, slots, a.ws);
  if (st == SALS_OK) sals_pool_run(pool, n_tasks, append_task, &a);
  free(a.ws);
  sals_pool_destroy(pool);
  return st;
}

/* ---- attend -------------------------------------------------------------------------------- */

static int32_t i32_at(const sals_view_t* v, int64_t i) {
  return ((const int32_t*)v->data)[i * v->stride[0]];
}

sals_status_t sals_cpu_paged_attend(const sals_paged_t* p, const sals_view_t* q,
                                    const sals_view_t* query_start, const sals_view_t* seq_lens,
                                    const sals_view_t* block_table, const sals_view_t* pages,
                                    const sals_view_t* window_rows, const sals_view_t* window,
                                    const sals_view_t* out, const sals_view_t* selected) {
  const sals_config_t* g = &p->cfg;
  const int64_t B = seq_lens->shape[0], G = g->n_head_q / g->n_head_kv, nsh = p->n_sel_heads;
  const int64_t q_block = max_i64(1, ATTN_ROWS / G);
  sals_layer_t L;
  describe_layer(p, pages, &L);

  /* The sequences, their work items and the sizes of the call's scratch. */
  /* most: the longest selection (the budget rule clamped to the candidates), at least 1. */
  int64_t max_len = 0, n_work = 0, most = 1, n_with_q = 0, n_single = 0;
  double flops = 0.0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n_q = i32_at(query_start, b + 1) - i32_at(query_start, b);
    const int64_t S = i32_at(seq_lens, b);
    max_len = max_i64(max_len, S);
    n_work += (n_q + q_block - 1) / q_block;
    n_with_q += n_q > 0;
    n_single += n_q == 1;
    int64_t ns, re;
    sals_windows(g, S, &ns, &re);
    const int64_t budget = sals_budget(g, S);
    most = max_i64(most, budget < re - ns ? budget : re - ns);
    flops += 4.0 * (double)g->n_head_q * g->head_dim * (double)S * (double)n_q;
  }
  /* One query per sequence: heads sharing a token list are handled together, and the list is
   * split in chunks (as the cache does for T == 1). */
  const int single = n_with_q > 0 && n_single == n_with_q;
  const int64_t hg_size = single && (g->dense || nsh == 1) ? g->n_head_kv : 1;
  const int64_t n_hg = g->n_head_kv / hg_size;

  sals_seq_t* seq = (sals_seq_t*)calloc((size_t)max_i64(B, 1), sizeof *seq);
  int64_t* work = (int64_t*)malloc((size_t)max_i64(2 * n_work, 1) * sizeof(int64_t));
  int32_t* sel = (int32_t*)malloc((size_t)(max_i64(B, 1) * nsh * most) * sizeof(int32_t));
  int32_t* sel_count = (int32_t*)calloc((size_t)max_i64(B, 1), sizeof(int32_t));
  sals_pool_t* pool = NULL;
  float *ws = NULL, *partial = NULL;
  sals_status_t st = SALS_OK;
  if (!seq || !work || !sel || !sel_count) {
    st = sals_set_error(SALS_ERR_OUT_OF_MEMORY, "out of host memory (attend scratch)");
    goto done;
  }
  for (int64_t b = 0, w = 0; b < B; ++b) {
    sals_seq_t* s = &seq[b];
    const int64_t q0 = i32_at(query_start, b), n_q = i32_at(query_start, b + 1) - q0;
    s->len = i32_at(seq_lens, b);
    s->blocks = (const int32_t*)block_table->data + b * block_table->stride[0];
    s->block_size = pages->shape[1];
    if (window) {
      s->window_rows = (const int32_t*)window_rows->data + b * window_rows->stride[0];
      s->window = (const char*)window->data;
      for (int i = 0; i < 3; ++i) s->window_stride[i] = window->stride[i];
      s->window_elem = window->elem;
    }
    s->q = (const char*)sals_view_at(q, q0, 0, 0, 0);
    s->q_st = q->stride[0];
    s->q_sh = q->stride[1];
    s->out = (char*)sals_view_at(out, q0, 0, 0, 0);
    s->o_st = out->stride[0];
    s->o_sh = out->stride[1];
    s->n_q = n_q;
    s->q_pos0 = (int32_t)(s->len - n_q);
    s->sparse = n_q == 1 && !g->dense;
    for (int64_t qb = 0; qb * q_block < n_q; ++qb, ++w) {
      work[2 * w] = b;
      work[2 * w + 1] = qb;
    }
  }

  sals_attend_t a;
  memset(&a, 0, sizeof a);
  a.L = &L;
  a.seq = seq;
  a.B = B;
  a.q_elem = q->elem;
  a.out_elem = out->elem;
  a.sel = sel;
  a.sel_stride = most;
  a.sel_count = sel_count;
  a.hg_size = hg_size;
  a.n_hg = n_hg;
  a.q_block = q_block;
  a.n_work = n_work;
  a.work = work;
  pool = call_pool(max_i64(n_work * n_hg, B * nsh), flops);
  const int64_t threads = sals_pool_size(pool);
  a.n_ch = 1;
  if (single) {
    const int64_t base = n_work * n_hg;
    a.n_ch = (2 * threads + base - 1) / base;
    if (a.n_ch > MAX_CHUNKS) a.n_ch = MAX_CHUNKS;
    if (a.n_ch < 1) a.n_ch = 1;
  }
  a.max_chunks = a.n_ch;
  a.ws_stride =
      (sals_attend_ws_floats(g, L.half, sals_attend_rows(g, q_block), max_len) + 15) & ~(int64_t)15;
  ws = (float*)malloc((size_t)(a.ws_stride * threads) * sizeof(float));
  if (a.n_ch > 1)
    partial =
        (float*)malloc((size_t)(B * a.n_ch * g->n_head_q * (g->head_dim + 2)) * sizeof(float));
  if (!ws || (a.n_ch > 1 && !partial)) {
    st = sals_set_error(SALS_ERR_OUT_OF_MEMORY, "out of host memory (attend workspace)");
    goto done;
  }
  a.ws = ws;
  a.partial = partial;
  if (!g->dense) sals_pool_run(pool, B * nsh, sals_select_task, &a);
  sals_pool_run(pool, n_work * n_hg * a.n_ch, sals_attend_task, &a);
  if (a.n_ch > 1) sals_pool_run(pool, B * g->n_head_q, sals_merge_task, &a);
  if (selected)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < nsh; ++h) {
        const int64_t cnt = seq[b].sparse ? sel_count[b] : 0;
        const int32_t* src = sel + (b * nsh + h) * most;
        int32_t* dst = (int32_t*)sals_view_at(selected, b, h, 0, 0);
        for (int64_t n = 0; n < selected->shape[2]; ++n) dst[n] = n < cnt ? src[n] : -1;
      }

done:
  sals_pool_destroy(pool);
  free(partial);
  free(ws);
  free(sel_count);
  free(sel);
  free(work);
  free(seq);
  return st;
}
