/*
 * CPU backend of the cache: append (project, quantise, keep exact windows) and attend, whose
 * steps (layer.c) see the cache's arrays as one layer's fields addressed by (sequence, slot).
 * Layouts are those of struct sals_cache (csrc/internal.h); all memory is host memory.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "layer.h"

#define TOKEN_BLOCK 16   /* tokens per append task */
#define ATTN_ROWS 256    /* query rows per task on the multi-token path */

typedef struct {
  sals_pool_t* pool;
  int32_t n_threads;
  int32_t max_chunks;  /* token chunks per sequence on the single-query path */
  int64_t q_block;     /* queries per task on the multi-token path */
  int64_t rows_max;    /* query rows a task holds */
  float* ws;           /* per-thread workspace, ws_stride floats each */
  int64_t ws_stride;
  float* partial;      /* [max_batch][max_chunks][n_head_q][head_dim + 2]: m, l, acc */
  int32_t* blk_base;   /* [max_batch][append blocks]: first slot of each append block */
  int32_t* final_len;  /* [max_batch] lengths after the running append */
  sals_seq_t* seq;     /* [max_batch]: the sequences of the running attend */
} cpu_state_t;

static size_t esz(const sals_cache_t* c) { return sals_dtype_size(c->cfg.dtype); }
static sals_elem_t eel(const sals_cache_t* c) { return sals_dtype_elem(c->cfg.dtype); }
static int64_t max_i64(int64_t a, int64_t b) { return a > b ? a : b; }

/* ---- init / free / reset ------------------------------------------------------------------- */

static void* track(sals_cache_t* c, size_t bytes, int* failed) {
  if (bytes == 0) return NULL;
  void* p = calloc(1, bytes);
  if (!p) *failed = 1;
  c->allocated += bytes;
  return p;
}

/* A field of rows of `bytes` each, max_tokens slots per sequence. */
static sals_field_t rows(const sals_cache_t* c, void* base, int64_t bytes) {
  sals_field_t f = {(char*)base, bytes * c->cfg.max_tokens, bytes};
  return f;
}

/* The cache's arrays as one layer's fields (layer.h), token (sequence, slot). Described at each
 * call from the cache it is given: a range call's copy starts its arrays at sequence `first`. */
static void describe_layer(const sals_cache_t* c, sals_layer_t* L) {
  const sals_config_t* g = &c->cfg;
  memset(L, 0, sizeof *L);
  L->cfg = g;
  L->dk = c->dk;
  L->n_sel_heads = c->n_sel_heads;
  L->scale = c->scale;
  L->proj = c->proj;
  L->inv_freq = c->inv_freq;
  L->half = c->rotary_dim / 2;
  L->attention_scaling = c->attention_scaling;
  L->interleaved = c->interleaved;
  L->lat[0] = rows(c, c->lat_score, c->lat_score_bytes);
  L->lat[1] = rows(c, c->lat_rest, c->lat_rest_bytes);
  if (g->key_bits < 16) {
    const int64_t ng0 = g->score_rank / g->key_group;
    const int64_t ng1 = (g->rank - g->score_rank) / g->key_group;
    L->lat_scale[0] = rows(c, c->lat_score_scale, ng0 * 2);
    L->lat_zero[0] = rows(c, c->lat_score_zero, ng0 * 2);
    L->lat_scale[1] = rows(c, c->lat_rest_scale, ng1 * 2);
    L->lat_zero[1] = rows(c, c->lat_rest_zero, ng1 * 2);
  }
  L->val = rows(c, c->val, c->val_row_bytes);
  L->val_scale = rows(c, c->val_scale, (int64_t)c->n_groups * 2);
  L->val_zero = rows(c, c->val_zero, (int64_t)c->n_groups * 2);
}

sals_status_t sals_cpu_cache_init(sals_cache_t* c) {
  const sals_config_t* g = &c->cfg;
  const int64_t B = g->max_batch, T = g->max_tokens, dk = c->dk, r = g->rank;
  const int64_t rs = g->score_rank, d = g->head_dim, Hq = g->n_head_q;
  const int64_t G = g->n_head_q / g->n_head_kv, half = c->rotary_dim / 2;
  const size_t e = esz(c);
  int failed = 0;
  cpu_state_t* s = (cpu_state_t*)calloc(1, sizeof *s);
  if (!s) return sals_set_error(SALS_ERR_OUT_OF_MEMORY, "out of host memory (cache state)");
  c->backend = s;
  s->n_threads = g->n_threads > 0 ? g->n_threads : sals_online_cores();
  s->max_chunks = s->n_threads > 1 ? 2 * s->n_threads : 1;
  if (s->max_chunks > 64) s->max_chunks = 64;
  s->q_block = max_i64(1, ATTN_ROWS / G);
  s->rows_max = sals_attend_rows(g, s->q_block);

  c->proj = (float*)track(c, (size_t)(dk * r) * 4, &failed);
  c->inv_freq = (float*)track(c, (size_t)max_i64(half, 1) * 4, &failed);
  c->lat_score = track(c, (size_t)(B * T * c->lat_score_bytes), &failed);
  c->lat_rest = r > rs ? track(c, (size_t)(B * T * c->lat_rest_bytes), &failed) : NULL;
  if (g->key_bits < 16) {
    const int64_t kg = g->key_group;
    c->lat_score_scale = (uint16_t*)track(c, (size_t)(B * T * (rs / kg)) * 2, &failed);
    c->lat_score_zero = (uint16_t*)track(c, (size_t)(B * T * (rs / kg)) * 2, &failed);
    c->lat_rest_scale = (uint16_t*)track(c, (size_t)(B * T * ((r - rs) / kg)) * 2, &failed);
    c->lat_rest_zero = (uint16_t*)track(c, (size_t)(B * T * ((r - rs) / kg)) * 2, &failed);
  }
  c->val = track(c, (size_t)(B * T * c->val_row_bytes), &failed);
  if (g->value_bits < 16) {
    c->val_scale = (uint16_t*)track(c, (size_t)(B * T * c->n_groups) * 2, &failed);
    c->val_zero = (uint16_t*)track(c, (size_t)(B * T * c->n_groups) * 2, &failed);
  }
  c->sink_k = track(c, (size_t)(B * g->n_sink * dk) * e, &failed);
  c->sink_v = track(c, (size_t)(B * g->n_sink * dk) * e, &failed);
  c->recent_k = track(c, (size_t)(B * g->n_recent * dk) * e, &failed);
  c->recent_v = track(c, (size_t)(B * g->n_recent * dk) * e, &failed);
  c->pos = (int32_t*)track(c, (size_t)(B * T) * 4, &failed);
  c->len = (int32_t*)track(c, (size_t)B * 4, &failed);
  c->sel_idx = (int32_t*)track(c, (size_t)(B * c->n_sel_heads * T) * 4, &failed);
  c->sel_count = (int32_t*)track(c, (size_t)B * 4, &failed);

  const int64_t append_ws = TOKEN_BLOCK * (dk + r) + dk;
  const int64_t attend_ws = sals_attend_ws_floats(g, (int32_t)half, s->rows_max, T);
  s->ws_stride = (max_i64(append_ws, attend_ws) + 15) & ~(int64_t)15;
  s->ws = (float*)track(c, (size_t)(s->ws_stride * s->n_threads) * 4, &failed);
  s->partial = (float*)track(c, (size_t)(B * s->max_chunks * Hq * (d + 2)) * 4, &failed);
  s->blk_base =
      (int32_t*)track(c, (size_t)(B * ((T + TOKEN_BLOCK - 1) / TOKEN_BLOCK)) * 4, &failed);
  s->final_len = (int32_t*)track(c, (size_t)B * 4, &failed);
  s->seq = (sals_seq_t*)track(c, (size_t)B * sizeof(sals_seq_t), &failed);
  if (!failed) {
    s->pool = sals_pool_create(s->n_threads);
    failed = s->pool == NULL;
  }
  if (failed) {
    sals_cpu_cache_free(c);
    return sals_set_error(SALS_ERR_OUT_OF_MEMORY,
                          "out of host memory allocating the cache (%llu bytes)",
                          (unsigned long long)c->allocated);
  }
  s->n_threads = sals_pool_size(s->pool);
  return SALS_OK;
}

void sals_cpu_cache_free(sals_cache_t* c) {
  if (!c) return;
  cpu_state_t* s = (cpu_state_t*)c->backend;
  if (s) {
    sals_pool_destroy(s->pool);
    free(s->ws);
    free(s->partial);
    free(s->blk_base);
    free(s->final_len);
    free(s->seq);
    free(s);
  }
  c->backend = NULL;
  sals_cache_release_buffers(c, free);
}

sals_status_t sals_cpu_cache_reset(sals_cache_t* c, int64_t batch, void* stream) {
  (void)stream;
  memset(c->len, 0, (size_t)batch * 4);
  memset(c->sel_count, 0, (size_t)batch * 4);
  return SALS_OK;
}

/* ---- finiteness of the rows that will be used ---------------------------------------------- */

/* x: [B, T, H, d]; rows with pos < 0 are padding and not looked at. */
static sals_status_t check_rows(const char* name, const sals_view_t* x, const sals_view_t* pos) {
  for (int64_t b = 0; b < x->shape[0]; ++b)
    for (int64_t t = 0; t < x->shape[1]; ++t) {
      if (*(const int32_t*)sals_view_at(pos, b, t, 0, 0) < 0) continue;
      for (int64_t h = 0; h < x->shape[2]; ++h)
        if (!sals_all_finite(sals_view_at(x, b, t, h, 0), x->elem, x->shape[3]))
          return sals_set_error(SALS_ERR_NOT_FINITE,
                                "%s: holds NaN or infinity (sequence %lld, token %lld, head %lld)",
                                name, (long long)b, (long long)t, (long long)h);
    }
  return SALS_OK;
}

/* Every non-padding token of an append: finite k and v, and storable (sals_check_storable). */
static sals_status_t check_append(const sals_cache_t* c, const sals_view_t* k, const sals_view_t* v,
                                  const sals_view_t* pos) {
  sals_status_t st = check_rows("k", k, pos);
  if (st == SALS_OK) st = check_rows("v", v, pos);
  if (st != SALS_OK) return st;
  const cpu_state_t* s = (const cpu_state_t*)c->backend;
  const int64_t d = c->cfg.head_dim;
  float* kf = s->ws; /* thread 0's workspace: no task runs yet */
  float* vf = kf + c->dk;
  float* lat = vf + c->dk;
  char where[64];
  for (int64_t b = 0; b < k->shape[0]; ++b)
    for (int64_t t = 0; t < k->shape[1]; ++t) {
      if (*(const int32_t*)sals_view_at(pos, b, t, 0, 0) < 0) continue;
      for (int64_t h = 0; h < c->cfg.n_head_kv; ++h) {
        sals_load_f32(kf + h * d, sals_view_at(k, b, t, h, 0), k->elem, d);
        sals_load_f32(vf + h * d, sals_view_at(v, b, t, h, 0), v->elem, d);
      }
      snprintf(where, sizeof where, "sequence %lld, token %lld", (long long)b, (long long)t);
      SALS_TRY(sals_check_storable(&c->cfg, c->proj, kf, vf, lat, where));
    }
  return SALS_OK;
}

/* ---- append -------------------------------------------------------------------------------- */

typedef struct {
  sals_cache_t* c;
  const sals_layer_t* L;
  const sals_view_t *k, *v, *pos;
  int64_t n_blk;
} append_ctx;

static void append_task(void* p, int64_t task, int32_t thread) {
  const append_ctx* a = (const append_ctx*)p;
  sals_cache_t* c = a->c;
  cpu_state_t* s = (cpu_state_t*)c->backend;
  const sals_config_t* g = &c->cfg;
  const int64_t b = task / a->n_blk, blk = task % a->n_blk, T = a->k->shape[1];
  const int64_t Hkv = g->n_head_kv, d = g->head_dim, dk = c->dk, r = g->rank;
  const int64_t maxT = g->max_tokens, n_blocks_max = (maxT + TOKEN_BLOCK - 1) / TOKEN_BLOCK;
  const size_t e = esz(c);
  const sals_elem_t el = eel(c);
  float* kf = s->ws + thread * s->ws_stride;
  float* lat = kf + TOKEN_BLOCK * dk;
  float* vf = lat + TOKEN_BLOCK * r;
  int32_t slot = s->blk_base[b * n_blocks_max + blk];
  const int32_t final_len = s->final_len[b];
  int32_t slots[TOKEN_BLOCK];
  int64_t n = 0;
  for (int64_t t = blk * TOKEN_BLOCK; t < T && t < (blk + 1) * TOKEN_BLOCK; ++t) {
    const int32_t pos = *(const int32_t*)sals_view_at(a->pos, b, t, 0, 0);
    if (pos < 0) continue;
    float* kr = kf + n * dk;
    for (int64_t h = 0; h < Hkv; ++h) {
      sals_load_f32(kr + h * d, sals_view_at(a->k, b, t, h, 0), a->k->elem, d);
      sals_load_f32(vf + h * d, sals_view_at(a->v, b, t, h, 0), a->v->elem, d);
    }
    sals_layer_store_value(a->L, b, slot, vf);
    if (slot < g->n_sink) {
      sals_store_f32((char*)c->sink_k + (b * g->n_sink + slot) * dk * e, el, kr, dk);
      sals_store_f32((char*)c->sink_v + (b * g->n_sink + slot) * dk * e, el, vf, dk);
    }
    /* Only the last n_recent tokens of the final length enter the ring, so each ring slot is
     * written once per call whatever the order of the tasks. */
    if (g->n_recent > 0 && slot >= final_len - g->n_recent) {
      const int64_t ring = b * g->n_recent + slot % g->n_recent;
      sals_store_f32((char*)c->recent_k + ring * dk * e, el, kr, dk);
      sals_store_f32((char*)c->recent_v + ring * dk * e, el, vf, dk);
    }
    c->pos[b * maxT + slot] = pos;
    slots[n++] = slot++;
  }
  if (n == 0) return;
  sals_gemm(n, r, dk, kf, dk, c->proj, r, lat, r, 0);
  for (int64_t i = 0; i < n; ++i) sals_layer_store_latent(a->L, b, slots[i], lat + i * r);
}

sals_status_t sals_cpu_cache_append(sals_cache_t* c, const sals_view_t* k, const sals_view_t* v,
                                    const sals_view_t* pos, void* stream) {
  (void)stream;
  cpu_state_t* s = (cpu_state_t*)c->backend;
  const int64_t B = k->shape[0], T = k->shape[1];
  const int64_t n_blk = (T + TOKEN_BLOCK - 1) / TOKEN_BLOCK;
  const int64_t n_blocks_max = (c->cfg.max_tokens + TOKEN_BLOCK - 1) / TOKEN_BLOCK;
  if (c->cfg.check_finite) {
    sals_status_t st = check_append(c, k, v, pos);
    if (st != SALS_OK) return st;
  }
  for (int64_t b = 0; b < B; ++b) {
    int32_t slot = c->len[b];
    for (int64_t blk = 0; blk < n_blk; ++blk) {
      s->blk_base[b * n_blocks_max + blk] = slot;
      for (int64_t t = blk * TOKEN_BLOCK; t < T && t < (blk + 1) * TOKEN_BLOCK; ++t)
        slot += *(const int32_t*)sals_view_at(pos, b, t, 0, 0) >= 0;
    }
    s->final_len[b] = slot;
  }
  sals_layer_t L;
  describe_layer(c, &L);
  append_ctx a = {c, &L, k, v, pos, n_blk};
  sals_pool_run(s->pool, B * n_blk, append_task, &a);
  for (int64_t b = 0; b < B; ++b) c->len[b] = s->final_len[b];
  return SALS_OK;
}

/* ---- attend -------------------------------------------------------------------------------- */

sals_status_t sals_cpu_cache_attend(sals_cache_t* c, const sals_view_t* q, const sals_view_t* q_pos,
                                    const sals_view_t* out, void* stream) {
  (void)stream;
  cpu_state_t* s = (cpu_state_t*)c->backend;
  const sals_config_t* g = &c->cfg;
  if (g->check_finite) {
    sals_status_t st = check_rows("q", q, q_pos);
    if (st != SALS_OK) return st;
  }
  const int64_t B = q->shape[0], T = q->shape[1];
  if (B == 0 || T == 0) return SALS_OK;
  const int sparse = T == 1 && !g->dense;
  const size_t e = esz(c);
  const int64_t dk = c->dk, maxT = g->max_tokens;
  for (int64_t b = 0; b < B; ++b) {
    sals_seq_t* sq = &s->seq[b];
    memset(sq, 0, sizeof *sq);
    sq->len = c->len[b];
    sq->major = b;
    sq->pos = c->pos + b * maxT;
    sq->sink_k = (const char*)c->sink_k + (size_t)(b * g->n_sink * dk) * e;
    sq->sink_v = (const char*)c->sink_v + (size_t)(b * g->n_sink * dk) * e;
    sq->recent_k = (const char*)c->recent_k + (size_t)(b * g->n_recent * dk) * e;
    sq->recent_v = (const char*)c->recent_v + (size_t)(b * g->n_recent * dk) * e;
    sq->q = (const char*)sals_view_at(q, b, 0, 0, 0);
    sq->q_st = q->stride[1];
    sq->q_sh = q->stride[2];
    sq->out = (char*)sals_view_at(out, b, 0, 0, 0);
    sq->o_st = out->stride[1];
    sq->o_sh = out->stride[2];
    sq->n_q = T;
    sq->q_pos = (const int32_t*)sals_view_at(q_pos, b, 0, 0, 0);
    sq->q_pos_st = q_pos->stride[1];
    sq->sparse = sparse;
  }
  sals_layer_t L;
  describe_layer(c, &L);
  sals_attend_t a;
  memset(&a, 0, sizeof a);
  a.L = &L;
  a.seq = s->seq;
  a.B = B;
  a.q_elem = q->elem;
  a.out_elem = out->elem;
  a.sel = c->sel_idx;
  a.sel_stride = maxT;
  a.sel_count = c->sel_count;
  a.q_block = s->q_block;
  a.max_chunks = s->max_chunks;
  a.ws = s->ws;
  a.ws_stride = s->ws_stride;
  a.partial = s->partial;
  if (sparse) sals_pool_run(s->pool, B * c->n_sel_heads, sals_select_task, &a);
  else memset(c->sel_count, 0, (size_t)B * 4);
  /* One query: heads sharing a token list are handled together (shared RoPE tables and
   * latent gathers), and the list is split in chunks to occupy every thread. Several
   * queries: one task per KV head and query block, whole list. */
  const int shared_list = T == 1 && (!sparse || c->n_sel_heads == 1);
  a.hg_size = shared_list ? g->n_head_kv : 1;
  a.n_hg = g->n_head_kv / a.hg_size;
  a.n_qb = (T + s->q_block - 1) / s->q_block;
  a.n_work = B * a.n_qb;
  a.n_ch = 1;
  if (T == 1) {
    const int64_t base = B * a.n_hg;
    a.n_ch = (2 * s->n_threads + base - 1) / base;
    if (a.n_ch > s->max_chunks) a.n_ch = s->max_chunks;
    if (a.n_ch < 1) a.n_ch = 1;
  }
  sals_pool_run(s->pool, a.n_work * a.n_hg * a.n_ch, sals_attend_task, &a);
  if (a.n_ch > 1) sals_pool_run(s->pool, B * g->n_head_q, sals_merge_task, &a);
  return SALS_OK;
}

/* ---- inspection ---------------------------------------------------------------------------- */

sals_status_t sals_cpu_cache_lengths(const sals_cache_t* c, const sals_view_t* out, void* stream) {
  (void)stream;
  for (int64_t b = 0; b < out->shape[0]; ++b) *(int32_t*)sals_view_at(out, b, 0, 0, 0) = c->len[b];
  return SALS_OK;
}

sals_status_t sals_cpu_cache_lengths_host(const sals_cache_t* c, int32_t* out, void* stream) {
  (void)stream;
  memcpy(out, c->len, (size_t)c->cfg.max_batch * 4);
  return SALS_OK;
}

sals_status_t sals_cpu_cache_selected(const sals_cache_t* c, const sals_view_t* idx,
                                      const sals_view_t* count, void* stream) {
  (void)stream;
  const int64_t B = idx->shape[0], H = idx->shape[1], N = idx->shape[2];
  for (int64_t b = 0; b < B; ++b) {
    const int64_t cnt = c->sel_count[b];
    *(int32_t*)sals_view_at(count, b, 0, 0, 0) = (int32_t)cnt;
    for (int64_t h = 0; h < H; ++h) {
      const int32_t* src = c->sel_idx + (b * c->n_sel_heads + h) * c->cfg.max_tokens;
      int32_t* dst = (int32_t*)sals_view_at(idx, b, h, 0, 0);
      for (int64_t n = 0; n < N; ++n) dst[n] = n < cnt ? src[n] : -1;
    }
  }
  return SALS_OK;
}

/* The CPU checks inputs before using them: nothing is ever pending. */
sals_status_t sals_cpu_cache_check(sals_cache_t* c, int32_t wait, void* stream) {
  (void)c;
  (void)wait;
  (void)stream;
  return SALS_OK;
}
