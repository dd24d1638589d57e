/*
 * CPU backend of the cache: append (project, quantise, keep exact windows), sparse decode
 * (fold, score, select, rebuild, attend) and the dense path for prefill chunks and dense layers.
 * Layouts are those of struct sals_cache (csrc/internal.h); all memory is host memory.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu.h"

#define TOKEN_BLOCK 16   /* tokens per append task */
#define SCORE_BLOCK 64   /* latent rows converted at a time when scoring */
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
} cpu_state_t;

static size_t esz(const sals_cache_t* c) { return sals_dtype_size(c->cfg.dtype); }
static sals_elem_t eel(const sals_cache_t* c) { return sals_dtype_elem(c->cfg.dtype); }
static int64_t max_i64(int64_t a, int64_t b) { return a > b ? a : b; }
static int64_t clamp_i64(int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : (x > hi ? hi : x); }

#define TRY(expr)                    \
  do {                               \
    sals_status_t st_ = (expr);      \
    if (st_ != SALS_OK) return st_;  \
  } while (0)

/* ---- init / free / reset ------------------------------------------------------------------- */

static void* track(sals_cache_t* c, size_t bytes, int* failed) {
  if (bytes == 0) return NULL;
  void* p = calloc(1, bytes);
  if (!p) *failed = 1;
  c->allocated += bytes;
  return p;
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
  s->rows_max = max_i64(Hq, s->q_block * G);

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

  const int64_t select_ws = dk + r + SCORE_BLOCK * rs + 2 * T + d;
  const int64_t append_ws = TOKEN_BLOCK * (dk + r) + dk;
  const int64_t R = s->rows_max;
  const int64_t attend_ws = sals_attn_ws_floats(R, d) + (r + 2 * half + 2) * SALS_KEY_BLOCK +
                            max_i64(dk, r) + 2 * half + R;
  s->ws_stride = (max_i64(select_ws, max_i64(append_ws, attend_ws)) + 15) & ~(int64_t)15;
  s->ws = (float*)track(c, (size_t)(s->ws_stride * s->n_threads) * 4, &failed);
  s->partial = (float*)track(c, (size_t)(B * s->max_chunks * Hq * (d + 2)) * 4, &failed);
  s->blk_base = (int32_t*)track(c, (size_t)(B * ((T + TOKEN_BLOCK - 1) / TOKEN_BLOCK)) * 4,
                                &failed);
  s->final_len = (int32_t*)track(c, (size_t)B * 4, &failed);
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
    free(s);
  }
  void* bufs[] = {c->proj,           c->inv_freq,       c->lat_score,     c->lat_rest,
                  c->lat_score_scale, c->lat_score_zero, c->lat_rest_scale, c->lat_rest_zero,
                  c->val,            c->val_scale,      c->val_zero,      c->sink_k,
                  c->sink_v,         c->recent_k,       c->recent_v,      c->pos,
                  c->len,            c->sel_idx,        c->sel_count};
  for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; ++i) free(bufs[i]);
  c->backend = NULL;
  c->proj = c->inv_freq = NULL;
  c->lat_score = c->lat_rest = c->val = c->sink_k = c->sink_v = c->recent_k = c->recent_v = NULL;
  c->lat_score_scale = c->lat_score_zero = c->lat_rest_scale = c->lat_rest_zero = NULL;
  c->val_scale = c->val_zero = NULL;
  c->pos = c->len = c->sel_idx = c->sel_count = NULL;
}

sals_status_t sals_cpu_cache_reset(sals_cache_t* c, int64_t batch, void* stream) {
  (void)stream;
  memset(c->len, 0, (size_t)batch * 4);
  memset(c->sel_count, 0, (size_t)batch * 4);
  return SALS_OK;
}

/* ---- latent keys --------------------------------------------------------------------------- */

/*
 * The latent cache holds two parts per token, stored apart so that scoring streams only the
 * first: part 0 is coordinates [0, score_rank), part 1 [score_rank, rank). Each is either
 * `dtype` (key_bits 16) or the value path's group quantisation (codes, float16 scale and zero).
 */
static int64_t lat_width(const sals_cache_t* c, int part) {
  return part ? c->cfg.rank - c->cfg.score_rank : c->cfg.score_rank;
}

/* Part `part` of the n consecutive token rows from `row` (b * max_tokens + slot), as float32
 * into dst [n][width]. */
static void load_latent(const sals_cache_t* c, int part, int64_t row, int64_t n, float* dst) {
  const sals_config_t* g = &c->cfg;
  const int64_t w = lat_width(c, part), bytes = part ? c->lat_rest_bytes : c->lat_score_bytes;
  const char* src = (const char*)(part ? c->lat_rest : c->lat_score) + row * bytes;
  if (g->key_bits == 16) {
    sals_load_f32(dst, src, eel(c), n * w);
    return;
  }
  const int64_t ng = w / g->key_group;
  const uint16_t* sc = (part ? c->lat_rest_scale : c->lat_score_scale) + row * ng;
  const uint16_t* zr = (part ? c->lat_rest_zero : c->lat_score_zero) + row * ng;
  for (int64_t i = 0; i < n; ++i)
    sals_dequantize_row((const uint8_t*)src + i * bytes, sc + i * ng, zr + i * ng, w,
                        g->key_bits, g->key_group, dst + i * w);
}

/* Store part `part` (x [width]) of token row `row`. */
static void store_latent(sals_cache_t* c, int part, int64_t row, const float* x) {
  const sals_config_t* g = &c->cfg;
  const int64_t w = lat_width(c, part), bytes = part ? c->lat_rest_bytes : c->lat_score_bytes;
  char* dst = (char*)(part ? c->lat_rest : c->lat_score) + row * bytes;
  if (g->key_bits == 16) {
    sals_store_f32(dst, eel(c), x, w);
    return;
  }
  const int64_t ng = w / g->key_group;
  sals_quantize_row(x, w, g->key_bits, g->key_group, (uint8_t*)dst,
                    (part ? c->lat_rest_scale : c->lat_score_scale) + row * ng,
                    (part ? c->lat_rest_zero : c->lat_score_zero) + row * ng);
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

static const char* dtype_name(sals_elem_t e) {
  return e == SALS_ELEM_F32 ? "float32" : (e == SALS_ELEM_F16 ? "float16" : "bfloat16");
}

/*
 * What append stores must fit the storage dtype: k and v rows (the exact windows, 16-bit values),
 * the latent coordinates U^T k (in `dtype`, or through the float16 scale and zero of quantised
 * keys), and the float16 scale and zero of quantised values. Each token's k row is loaded into
 * kf [Dk] and v into vf [Dk]; the latent (lat [rank]) is only computed when |k| could reach the
 * limit: |U^T k|_j <= |u_j| |k| and the columns u_j have norm within 1% of 1 (checked at
 * creation). Quantised coordinates below float16's 65504 in magnitude always get a finite zero
 * (their minimum rounded down) and scale (at most 2 * 65504 / 15). Returns SALS_ERR_NOT_FINITE
 * naming the argument.
 */
static sals_status_t check_storable(const sals_cache_t* c, const sals_view_t* k,
                                    const sals_view_t* v, int64_t b, int64_t t, float* kf,
                                    float* vf, float* lat) {
  const sals_config_t* g = &c->cfg;
  const sals_elem_t el = eel(c);
  const int64_t d = g->head_dim, dk = c->dk, r = g->rank;
  const double limit = el == SALS_ELEM_F16 ? 65504.0 : (el == SALS_ELEM_BF16 ? 0x1.fep127 : 0x1.fffffep127);
  for (int64_t h = 0; h < g->n_head_kv; ++h) {
    sals_load_f32(kf + h * d, sals_view_at(k, b, t, h, 0), k->elem, d);
    sals_load_f32(vf + h * d, sals_view_at(v, b, t, h, 0), v->elem, d);
  }
  const char* dt = dtype_name(el);
  int64_t i = sals_first_overflow(kf, el, dk);
  if (i >= 0)
    return sals_set_error(SALS_ERR_NOT_FINITE,
                          "k: %g (sequence %lld, token %lld, head %lld) overflows the %s storage",
                          (double)kf[i], (long long)b, (long long)t, (long long)(i / d), dt);
  if ((i = sals_first_overflow(vf, el, dk)) >= 0)
    return sals_set_error(SALS_ERR_NOT_FINITE,
                          "v: %g (sequence %lld, token %lld, head %lld) overflows the %s storage",
                          (double)vf[i], (long long)b, (long long)t, (long long)(i / d), dt);
  double norm = 0.0;
  for (int64_t j = 0; j < dk; ++j) norm += (double)kf[j] * kf[j];
  const int quant_keys = g->key_bits < 16;
  if (sqrt(norm) * 1.02 >= (quant_keys ? 65504.0 : limit)) {
    sals_gemm(1, r, dk, kf, dk, c->proj, r, lat, r, 0);
    if (!quant_keys && (i = sals_first_overflow(lat, el, r)) >= 0)
      return sals_set_error(SALS_ERR_NOT_FINITE,
                            "k: latent coordinate %lld of (sequence %lld, token %lld) is %g, "
                            "beyond the %s storage", (long long)i, (long long)b, (long long)t,
                            (double)lat[i], dt);
    /* key_group divides score_rank, so the whole row's groups are those of both parts. */
    if (quant_keys && (i = sals_quantize_row_check(lat, r, g->key_bits, g->key_group)) >= 0)
      return sals_set_error(SALS_ERR_NOT_FINITE,
                            "k: latent coordinates %lld..%lld of (sequence %lld, token %lld) "
                            "span more than the float16 scale and zero of %d-bit keys hold",
                            (long long)(i * g->key_group),
                            (long long)((i + 1) * g->key_group - 1), (long long)b, (long long)t,
                            (int)g->key_bits);
  }
  if (g->value_bits < 16 && (i = sals_quantize_row_check(vf, dk, g->value_bits,
                                                         g->value_group)) >= 0)
    return sals_set_error(SALS_ERR_NOT_FINITE,
                          "v: channels %lld..%lld of (sequence %lld, token %lld) span more than "
                          "the float16 scale and zero of %d-bit values hold",
                          (long long)(i * g->value_group), (long long)((i + 1) * g->value_group - 1),
                          (long long)b, (long long)t, (int)g->value_bits);
  return SALS_OK;
}

/* Every non-padding token of an append: finite k and v, and storable (check_storable). */
static sals_status_t check_append(const sals_cache_t* c, const sals_view_t* k,
                                  const sals_view_t* v, const sals_view_t* pos) {
  sals_status_t st = check_rows("k", k, pos);
  if (st == SALS_OK) st = check_rows("v", v, pos);
  if (st != SALS_OK) return st;
  const cpu_state_t* s = (const cpu_state_t*)c->backend;
  float* kf = s->ws; /* thread 0's workspace: no task runs yet */
  float* vf = kf + c->dk;
  float* lat = vf + c->dk;
  for (int64_t b = 0; b < k->shape[0]; ++b)
    for (int64_t t = 0; t < k->shape[1]; ++t) {
      if (*(const int32_t*)sals_view_at(pos, b, t, 0, 0) < 0) continue;
      TRY(check_storable(c, k, v, b, t, kf, vf, lat));
    }
  return SALS_OK;
}

/* ---- append -------------------------------------------------------------------------------- */

typedef struct {
  sals_cache_t* c;
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
  const int64_t rs = g->score_rank, maxT = g->max_tokens, n_blocks_max = (maxT + TOKEN_BLOCK - 1) / TOKEN_BLOCK;
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
    const int64_t row = b * maxT + slot;
    float* kr = kf + n * dk;
    for (int64_t h = 0; h < Hkv; ++h) {
      sals_load_f32(kr + h * d, sals_view_at(a->k, b, t, h, 0), a->k->elem, d);
      sals_load_f32(vf + h * d, sals_view_at(a->v, b, t, h, 0), a->v->elem, d);
    }
    if (g->value_bits == 16)
      sals_store_f32((char*)c->val + row * c->val_row_bytes, el, vf, dk);
    else
      sals_quantize_row(vf, dk, g->value_bits, g->value_group,
                        (uint8_t*)c->val + row * c->val_row_bytes, c->val_scale + row * c->n_groups,
                        c->val_zero + row * c->n_groups);
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
    c->pos[row] = pos;
    slots[n++] = slot++;
  }
  if (n == 0) return;
  sals_gemm(n, r, dk, kf, dk, c->proj, r, lat, r, 0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t row = b * maxT + slots[i];
    store_latent(c, 0, row, lat + i * r);
    if (r > rs) store_latent(c, 1, row, lat + i * r + rs);
  }
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
  append_ctx a = {c, k, v, pos, n_blk};
  sals_pool_run(s->pool, B * n_blk, append_task, &a);
  for (int64_t b = 0; b < B; ++b) c->len[b] = s->final_len[b];
  return SALS_OK;
}

/* ---- attend -------------------------------------------------------------------------------- */

typedef struct {
  sals_cache_t* c;
  const sals_view_t *q, *q_pos, *out;
  int64_t B, T;
  int sparse;
  int64_t n_hg, hg_size; /* head groups per task and KV heads per group */
  int64_t n_qb;          /* query blocks */
  int64_t n_ch;          /* token chunks per (sequence, head group) */
} attend_ctx;

/* Exact window bounds of a sequence of S tokens: sinks [0, ns), recent [re, S). */
static void windows(const sals_config_t* g, int64_t S, int64_t* ns, int64_t* re) {
  *ns = S < g->n_sink ? S : g->n_sink;
  *re = max_i64(*ns, S - g->n_recent);
}

static int64_t budget_of(const sals_config_t* g, int64_t S) {
  if (g->budget_tokens > 0) return g->budget_tokens;
  return (int64_t)ceil((double)g->budget_frac * (double)S);
}

static void select_task(void* p, int64_t task, int32_t thread) {
  const attend_ctx* a = (const attend_ctx*)p;
  sals_cache_t* c = a->c;
  cpu_state_t* s = (cpu_state_t*)c->backend;
  const sals_config_t* g = &c->cfg;
  const int64_t nsh = c->n_sel_heads, b = task / nsh, sh = task % nsh;
  const int64_t d = g->head_dim, G = g->n_head_q / g->n_head_kv, r = g->rank;
  const int64_t rs = g->score_rank, maxT = g->max_tokens, S = c->len[b];
  int32_t* sel = c->sel_idx + (b * nsh + sh) * maxT;
  const int32_t qp = *(const int32_t*)sals_view_at(a->q_pos, b, 0, 0, 0);
  int64_t ns, re;
  windows(g, S, &ns, &re);
  if (qp < 0 || re <= ns) {
    if (sh == 0) c->sel_count[b] = 0;
    return;
  }
  float* qg = s->ws + thread * s->ws_stride;
  float* qt = qg + c->dk;
  float* kb = qt + r;
  float* score = kb + SCORE_BLOCK * rs;
  int32_t* perm = (int32_t*)(score + maxT);
  /* Fold the group's query heads (pre-RoPE) by summing, then project on the heads' rows. */
  const int64_t h0 = c->n_sel_heads == 1 ? 0 : sh, nh = c->n_sel_heads == 1 ? g->n_head_kv : 1;
  float* row = (float*)(perm + maxT);
  for (int64_t h = 0; h < nh; ++h) {
    float* qh = qg + h * d;
    memset(qh, 0, (size_t)d * 4);
    for (int64_t j = 0; j < G; ++j) {
      sals_load_f32(row, sals_view_at(a->q, b, 0, (h0 + h) * G + j, 0), a->q->elem, d);
      for (int64_t i = 0; i < d; ++i) qh[i] += row[i];
    }
  }
  sals_gemm(1, rs, nh * d, qg, nh * d, c->proj + h0 * d * r, r, qt, rs, 0);
  const int64_t n = re - ns;
  const int32_t* kpos = c->pos + b * maxT;
  for (int64_t j0 = 0; j0 < n; j0 += SCORE_BLOCK) {
    const int64_t nb = n - j0 < SCORE_BLOCK ? n - j0 : SCORE_BLOCK;
    load_latent(c, 0, b * maxT + ns + j0, nb, kb);
    for (int64_t j = 0; j < nb; ++j) {
      float sc = sals_dot(qt, kb + j * rs, rs);
      /* Invisible tokens are not candidates (NaN); a NaN from the data ranks last. */
      sc = isnan(sc) ? -INFINITY : sc;
      score[j0 + j] = kpos[ns + j0 + j] <= qp ? sc : NAN;
    }
  }
  const int64_t cnt = sals_topk(score, n, budget_of(g, S), perm, sel);
  for (int64_t i = 0; i < cnt; ++i) sel[i] += (int32_t)ns;
  if (sh == 0) c->sel_count[b] = (int32_t)cnt;
}

/* Attention of one (sequence, head group, query block, token chunk). */
static void attend_task(void* p, int64_t task, int32_t thread) {
  const attend_ctx* a = (const attend_ctx*)p;
  sals_cache_t* c = a->c;
  cpu_state_t* s = (cpu_state_t*)c->backend;
  const sals_config_t* g = &c->cfg;
  const int64_t ch = task % a->n_ch, qb = (task / a->n_ch) % a->n_qb;
  const int64_t hg = (task / (a->n_ch * a->n_qb)) % a->n_hg, b = task / (a->n_ch * a->n_qb * a->n_hg);
  const int64_t d = g->head_dim, G = g->n_head_q / g->n_head_kv, r = g->rank, rs = g->score_rank;
  const int64_t maxT = g->max_tokens, dk = c->dk, half = c->rotary_dim / 2, S = c->len[b];
  const size_t e = esz(c);
  const sals_elem_t el = eel(c);
  const int64_t h0 = hg * a->hg_size, t0 = qb * s->q_block;
  const int64_t tqn = a->T - t0 < s->q_block ? a->T - t0 : s->q_block;
  const int64_t Rh = tqn * G, R = Rh * a->hg_size; /* rows per head, rows in all */

  sals_attn_ws_t w;
  float* lt = sals_attn_ws_carve(s->ws + thread * s->ws_stride, R, d, &w);
  float *q = w.q, *m = w.m, *l = w.l, *acc = w.acc, *sc = w.s, *kt = w.kt, *vb = w.v;
  float* ccos = lt + r * SALS_KEY_BLOCK;
  float* csin = ccos + half * SALS_KEY_BLOCK;
  float* row = csin + half * SALS_KEY_BLOCK;
  float* qc = row + max_i64(dk, r);
  float* qs = qc + half;
  int32_t* kpos = (int32_t*)(qs + half);
  int32_t* slots = kpos + SALS_KEY_BLOCK;
  int32_t* qpos = slots + SALS_KEY_BLOCK;

  /* Rotated, scaled query rows, ordered [head][query][group member]. */
  int32_t qmax = -1;
  for (int64_t t = 0; t < tqn; ++t) {
    const int32_t qp = *(const int32_t*)sals_view_at(a->q_pos, b, t0 + t, 0, 0);
    qmax = qp > qmax ? qp : qmax;
    if (qp >= 0) sals_rope_pos(qp, c->inv_freq, (int32_t)half, c->attention_scaling, qc, qs);
    for (int64_t hh = 0; hh < a->hg_size; ++hh)
      for (int64_t j = 0; j < G; ++j) {
        const int64_t ri = (hh * tqn + t) * G + j;
        float* qr = q + ri * d;
        qpos[ri] = qp;
        sals_load_f32(qr, sals_view_at(a->q, b, t0 + t, (h0 + hh) * G + j, 0), a->q->elem, d);
        if (qp >= 0) sals_rope_row(qr, (int32_t)half, c->interleaved, qc, qs);
        for (int64_t i = 0; i < d; ++i) qr[i] *= c->scale;
      }
  }
  sals_attn_init(R, d, m, l, acc);

  /* The token list: sinks, then latent tokens (selected or all candidates), then recent. */
  int64_t ns, re;
  windows(g, S, &ns, &re);
  const int32_t* sel = NULL;
  int64_t lat_hi = re;
  if (a->sparse) {
    sel = c->sel_idx + (b * c->n_sel_heads + (c->n_sel_heads == 1 ? 0 : hg)) * maxT;
    lat_hi = ns + c->sel_count[b];
  }
  const int64_t L = lat_hi + (S - re);
  const int64_t i0 = L * ch / a->n_ch, i1 = L * (ch + 1) / a->n_ch;
  const int32_t* spos = c->pos + b * maxT;

  for (int64_t j0 = i0; j0 < i1 && qmax >= 0; j0 += SALS_KEY_BLOCK) {
    const int64_t nk = i1 - j0 < SALS_KEY_BLOCK ? i1 - j0 : SALS_KEY_BLOCK;
    int32_t kmin = INT32_MAX;
    for (int64_t n = 0; n < nk; ++n) {
      const int64_t i = j0 + n;
      slots[n] = (int32_t)(i < ns ? i : (i < lat_hi ? (sel ? sel[i - ns] : i) : re + i - lat_hi));
      kpos[n] = spos[slots[n]];
      kmin = kpos[n] < kmin ? kpos[n] : kmin;
    }
    if (kmin > qmax) continue; /* causal: nothing here is visible to these queries */
    if (half > 0)
      sals_rope_table(kpos, nk, c->inv_freq, (int32_t)half, c->attention_scaling, ccos, csin);
    /* Latent keys of this block are the list entries in [ns, lat_hi): gather them once. */
    const int64_t la = clamp_i64(ns - j0, 0, nk), lb = clamp_i64(lat_hi - j0, la, nk);
    for (int64_t n = la; n < lb; ++n) {
      const int64_t srow = b * maxT + slots[n];
      load_latent(c, 0, srow, 1, row);
      if (r > rs) load_latent(c, 1, srow, 1, row + rs);
      for (int64_t i = 0; i < r; ++i) lt[i * SALS_KEY_BLOCK + (n - la)] = row[i];
    }
    for (int64_t hh = 0; hh < a->hg_size; ++hh) {
      const int64_t h = h0 + hh;
      if (lb > la)
        sals_gemm(d, lb - la, r, c->proj + h * d * r, r, lt, SALS_KEY_BLOCK, kt + la, SALS_KEY_BLOCK, 0);
      for (int64_t n = 0; n < nk; ++n) {
        const int64_t slot = slots[n];
        float* vr = vb + n * d;
        if (n >= la && n < lb) {
          const int64_t srow = b * maxT + slot;
          if (g->value_bits == 16)
            sals_load_f32(vr, (const char*)c->val + srow * c->val_row_bytes + h * d * e, el, d);
          else
            sals_dequantize_row((const uint8_t*)c->val + srow * c->val_row_bytes +
                                    h * d * g->value_bits / 8,
                                c->val_scale + srow * c->n_groups + h * d / g->value_group,
                                c->val_zero + srow * c->n_groups + h * d / g->value_group, d,
                                g->value_bits, g->value_group, vr);
          continue;
        }
        const int64_t xrow = slot < ns ? b * g->n_sink + slot : b * g->n_recent + slot % g->n_recent;
        const char* ksrc = (const char*)(slot < ns ? c->sink_k : c->recent_k);
        const char* vsrc = (const char*)(slot < ns ? c->sink_v : c->recent_v);
        sals_load_f32(row, ksrc + (xrow * dk + h * d) * e, el, d);
        for (int64_t i = 0; i < d; ++i) kt[i * SALS_KEY_BLOCK + n] = row[i];
        sals_load_f32(vr, vsrc + (xrow * dk + h * d) * e, el, d);
      }
      if (half > 0) sals_rope_cols(kt, SALS_KEY_BLOCK, nk, (int32_t)half, c->interleaved, ccos, csin);
      sals_attn_block(Rh, d, nk, q + hh * Rh * d, kt, SALS_KEY_BLOCK, vb, kpos, qpos + hh * Rh, sc,
                      m + hh * Rh, l + hh * Rh, acc + hh * Rh * d);
    }
  }

  if (a->n_ch > 1) {
    /* Partial state per query head of this chunk, merged by merge_task. */
    for (int64_t hh = 0; hh < a->hg_size; ++hh)
      for (int64_t j = 0; j < G; ++j) {
        const int64_t ri = hh * Rh + j, qh = (h0 + hh) * G + j;
        float* dst = s->partial + ((b * s->max_chunks + ch) * g->n_head_q + qh) * (d + 2);
        dst[0] = m[ri];
        dst[1] = l[ri];
        memcpy(dst + 2, acc + ri * d, (size_t)d * 4);
      }
    return;
  }
  for (int64_t hh = 0; hh < a->hg_size; ++hh)
    for (int64_t t = 0; t < tqn; ++t)
      for (int64_t j = 0; j < G; ++j) {
        const int64_t ri = (hh * tqn + t) * G + j;
        const float inv = l[ri] > 0.0f ? 1.0f / l[ri] : 0.0f;
        for (int64_t i = 0; i < d; ++i) row[i] = acc[ri * d + i] * inv;
        sals_store_f32(sals_view_at(a->out, b, t0 + t, (h0 + hh) * G + j, 0), a->out->elem, row,
                       d);
      }
}

static void merge_task(void* p, int64_t task, int32_t thread) {
  const attend_ctx* a = (const attend_ctx*)p;
  const sals_cache_t* c = a->c;
  const cpu_state_t* s = (const cpu_state_t*)c->backend;
  const int64_t Hq = c->cfg.n_head_q, d = c->cfg.head_dim;
  const int64_t b = task / Hq, qh = task % Hq;
  float* row = s->ws + thread * s->ws_stride;
  float mx = -INFINITY;
  for (int64_t ch = 0; ch < a->n_ch; ++ch) {
    const float mc = s->partial[((b * s->max_chunks + ch) * Hq + qh) * (d + 2)];
    mx = mc > mx ? mc : mx;
  }
  float lsum = 0.0f;
  memset(row, 0, (size_t)d * 4);
  if (mx > -INFINITY)
    for (int64_t ch = 0; ch < a->n_ch; ++ch) {
      const float* src = s->partial + ((b * s->max_chunks + ch) * Hq + qh) * (d + 2);
      if (src[1] == 0.0f) continue;
      const float w = expf(src[0] - mx);
      lsum += w * src[1];
      for (int64_t i = 0; i < d; ++i) row[i] += w * src[2 + i];
    }
  const float inv = lsum > 0.0f ? 1.0f / lsum : 0.0f;
  for (int64_t i = 0; i < d; ++i) row[i] *= inv;
  sals_store_f32(sals_view_at(a->out, b, 0, qh, 0), a->out->elem, row, d);
}

sals_status_t sals_cpu_cache_attend(sals_cache_t* c, const sals_view_t* q,
                                    const sals_view_t* q_pos, const sals_view_t* out,
                                    void* stream) {
  (void)stream;
  cpu_state_t* s = (cpu_state_t*)c->backend;
  const sals_config_t* g = &c->cfg;
  if (g->check_finite) {
    sals_status_t st = check_rows("q", q, q_pos);
    if (st != SALS_OK) return st;
  }
  attend_ctx a;
  memset(&a, 0, sizeof a);
  a.c = c;
  a.q = q;
  a.q_pos = q_pos;
  a.out = out;
  a.B = q->shape[0];
  a.T = q->shape[1];
  a.sparse = a.T == 1 && !g->dense;
  if (a.B == 0 || a.T == 0) return SALS_OK;
  if (a.sparse)
    sals_pool_run(s->pool, a.B * c->n_sel_heads, select_task, &a);
  else
    memset(c->sel_count, 0, (size_t)a.B * 4);
  /* One query: heads sharing a token list are handled together (shared RoPE tables and
   * latent gathers), and the list is split in chunks to occupy every thread. Several
   * queries: one task per KV head and query block, whole list. */
  const int shared_list = a.T == 1 && (!a.sparse || c->n_sel_heads == 1);
  a.hg_size = shared_list ? g->n_head_kv : 1;
  a.n_hg = g->n_head_kv / a.hg_size;
  a.n_qb = (a.T + s->q_block - 1) / s->q_block;
  a.n_ch = 1;
  if (a.T == 1) {
    const int64_t base = a.B * a.n_hg;
    a.n_ch = (2 * s->n_threads + base - 1) / base;
    if (a.n_ch > s->max_chunks) a.n_ch = s->max_chunks;
    if (a.n_ch < 1) a.n_ch = 1;
  }
  sals_pool_run(s->pool, a.B * a.n_hg * a.n_qb * a.n_ch, attend_task, &a);
  if (a.n_ch > 1) sals_pool_run(s->pool, a.B * g->n_head_q, merge_task, &a);
  return SALS_OK;
}

/* ---- inspection ---------------------------------------------------------------------------- */

sals_status_t sals_cpu_cache_lengths(const sals_cache_t* c, const sals_view_t* out, void* stream) {
  (void)stream;
  for (int64_t b = 0; b < out->shape[0]; ++b)
    *(int32_t*)sals_view_at(out, b, 0, 0, 0) = c->len[b];
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
