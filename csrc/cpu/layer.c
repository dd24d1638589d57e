/*
 * The SALS steps over one layer's compressed tokens, wherever they are stored (layer.h): the
 * latent and value fields, the storability check of appended tokens, and the decode (fold,
 * score, select, rebuild, attend) and dense (rebuilt keys, causal) attention tasks.
 */
#include "layer.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#define SCORE_BLOCK 64 /* latent rows converted at a time when scoring */

static int64_t max_i64(int64_t a, int64_t b) { return a > b ? a : b; }

/* ---- fields -------------------------------------------------------------------------------- */

static int64_t lat_width(const sals_config_t* g, int part) {
  return part ? g->rank - g->score_rank : g->score_rank;
}

int64_t sals_latent_bytes(const sals_config_t* g, int part) {
  const int64_t w = lat_width(g, part);
  return g->key_bits < 16 ? w * g->key_bits / 8 : w * (int64_t)sals_dtype_size(g->dtype);
}

int64_t sals_value_bytes(const sals_config_t* g) {
  const int64_t dk = (int64_t)g->n_head_kv * g->head_dim;
  return g->value_bits < 16 ? dk * g->value_bits / 8 : dk * (int64_t)sals_dtype_size(g->dtype);
}

void sals_layer_load_latent(const sals_layer_t* L, int part, int64_t major, int64_t minor,
                            int64_t n, float* dst) {
  const sals_config_t* g = L->cfg;
  const int64_t w = lat_width(g, part);
  const sals_field_t* f = &L->lat[part];
  const char* src = sals_field_at(f, major, minor);
  if (g->key_bits == 16) {
    const sals_elem_t el = sals_dtype_elem(g->dtype);
    if (f->s_minor == w * (int64_t)sals_elem_size(el)) { /* rows back to back: one conversion */
      sals_load_f32(dst, src, el, n * w);
      return;
    }
    for (int64_t i = 0; i < n; ++i) sals_load_f32(dst + i * w, src + i * f->s_minor, el, w);
    return;
  }
  const sals_field_t *fs = &L->lat_scale[part], *fz = &L->lat_zero[part];
  for (int64_t i = 0; i < n; ++i)
    sals_dequantize_row((const uint8_t*)src + i * f->s_minor,
                        (const uint16_t*)sals_field_at(fs, major, minor + i),
                        (const uint16_t*)sals_field_at(fz, major, minor + i), w, g->key_bits,
                        g->key_group, dst + i * w);
}

void sals_layer_store_latent(const sals_layer_t* L, int64_t major, int64_t minor, const float* x) {
  const sals_config_t* g = L->cfg;
  for (int part = 0; part < 2; ++part) {
    const int64_t w = lat_width(g, part);
    if (w == 0) continue;
    const float* xp = x + (part ? g->score_rank : 0);
    char* dst = sals_field_at(&L->lat[part], major, minor);
    if (g->key_bits == 16) {
      sals_store_f32(dst, sals_dtype_elem(g->dtype), xp, w);
      continue;
    }
    sals_quantize_row(xp, w, g->key_bits, g->key_group, (uint8_t*)dst,
                      (uint16_t*)sals_field_at(&L->lat_scale[part], major, minor),
                      (uint16_t*)sals_field_at(&L->lat_zero[part], major, minor));
  }
}

void sals_layer_store_value(const sals_layer_t* L, int64_t major, int64_t minor, const float* vf) {
  const sals_config_t* g = L->cfg;
  char* dst = sals_field_at(&L->val, major, minor);
  if (g->value_bits == 16) {
    sals_store_f32(dst, sals_dtype_elem(g->dtype), vf, L->dk);
    return;
  }
  sals_quantize_row(vf, L->dk, g->value_bits, g->value_group, (uint8_t*)dst,
                    (uint16_t*)sals_field_at(&L->val_scale, major, minor),
                    (uint16_t*)sals_field_at(&L->val_zero, major, minor));
}

void sals_layer_load_value(const sals_layer_t* L, int64_t major, int64_t minor, int64_t h,
                           float* dst) {
  const sals_config_t* g = L->cfg;
  const int64_t d = g->head_dim;
  const char* src = sals_field_at(&L->val, major, minor);
  if (g->value_bits == 16) {
    const sals_elem_t el = sals_dtype_elem(g->dtype);
    sals_load_f32(dst, src + h * d * (int64_t)sals_elem_size(el), el, d);
    return;
  }
  const int64_t g0 = h * d / g->value_group;
  sals_dequantize_row((const uint8_t*)src + h * d * g->value_bits / 8,
                      (const uint16_t*)sals_field_at(&L->val_scale, major, minor) + g0,
                      (const uint16_t*)sals_field_at(&L->val_zero, major, minor) + g0, d,
                      g->value_bits, g->value_group, dst);
}

/* ---- storability of appended tokens -------------------------------------------------------- */

static const char* dtype_name(sals_elem_t e) {
  return e == SALS_ELEM_F32 ? "float32" : (e == SALS_ELEM_F16 ? "float16" : "bfloat16");
}

/*
 * The latent coordinates are only computed when |k| could reach the limit: |U^T k|_j <= |u_j| |k|
 * and the columns u_j have norm within 1% of 1 (checked at creation). Quantised coordinates
 * below float16's 65504 in magnitude always get a finite zero (their minimum rounded down) and
 * scale (at most 2 * 65504 / 15).
 */
sals_status_t sals_check_storable(const sals_config_t* g, const float* proj, const float* kf,
                                  const float* vf, float* lat, const char* where) {
  const sals_elem_t el = sals_dtype_elem(g->dtype);
  const int64_t d = g->head_dim, dk = (int64_t)g->n_head_kv * d, r = g->rank;
  const double limit =
      el == SALS_ELEM_F16 ? 65504.0 : (el == SALS_ELEM_BF16 ? 0x1.fep127 : 0x1.fffffep127);
  const char* dt = dtype_name(el);
  int64_t i = sals_first_overflow(kf, el, dk);
  if (i >= 0)
    return sals_set_error(SALS_ERR_NOT_FINITE, "k: %g (%s, head %lld) overflows the %s storage",
                          (double)kf[i], where, (long long)(i / d), dt);
  if ((i = sals_first_overflow(vf, el, dk)) >= 0)
    return sals_set_error(SALS_ERR_NOT_FINITE, "v: %g (%s, head %lld) overflows the %s storage",
                          (double)vf[i], where, (long long)(i / d), dt);
  double norm = 0.0;
  for (int64_t j = 0; j < dk; ++j) norm += (double)kf[j] * kf[j];
  const int quant_keys = g->key_bits < 16;
  if (sqrt(norm) * 1.02 >= (quant_keys ? 65504.0 : limit)) {
    sals_gemm(1, r, dk, kf, dk, proj, r, lat, r, 0);
    if (!quant_keys && (i = sals_first_overflow(lat, el, r)) >= 0)
      return sals_set_error(SALS_ERR_NOT_FINITE,
                            "k: latent coordinate %lld of (%s) is %g, beyond the %s storage",
                            (long long)i, where, (double)lat[i], dt);
    /* key_group divides score_rank, so the whole row's groups are those of both parts. */
    if (quant_keys && (i = sals_quantize_row_check(lat, r, g->key_bits, g->key_group)) >= 0)
      return sals_set_error(SALS_ERR_NOT_FINITE,
                            "k: latent coordinates %lld..%lld of (%s) span more than the float16 "
                            "scale and zero of %d-bit keys hold",
                            (long long)(i * g->key_group), (long long)((i + 1) * g->key_group - 1),
                            where, (int)g->key_bits);
  }
  if (g->value_bits < 16 &&
      (i = sals_quantize_row_check(vf, dk, g->value_bits, g->value_group)) >= 0)
    return sals_set_error(SALS_ERR_NOT_FINITE,
                          "v: channels %lld..%lld of (%s) span more than the float16 scale and "
                          "zero of %d-bit values hold",
                          (long long)(i * g->value_group),
                          (long long)((i + 1) * g->value_group - 1), where, (int)g->value_bits);
  return SALS_OK;
}

/* ---- attention ----------------------------------------------------------------------------- */

void sals_windows(const sals_config_t* g, int64_t S, int64_t* ns, int64_t* re) {
  *ns = S < g->n_sink ? S : g->n_sink;
  *re = max_i64(*ns, S - g->n_recent);
}

int64_t sals_budget(const sals_config_t* g, int64_t S) {
  if (g->budget_tokens > 0) return g->budget_tokens;
  return (int64_t)ceil((double)g->budget_frac * (double)S);
}

int64_t sals_attend_rows(const sals_config_t* g, int64_t q_block) {
  return max_i64(g->n_head_q, q_block * (g->n_head_q / g->n_head_kv));
}

int64_t sals_attend_ws_floats(const sals_config_t* g, int32_t half, int64_t rows_max,
                              int64_t max_len) {
  const int64_t dk = (int64_t)g->n_head_kv * g->head_dim, r = g->rank, d = g->head_dim;
  const int64_t select_ws = dk + r + SCORE_BLOCK * g->score_rank + 2 * max_len + d;
  const int64_t R = rows_max;
  const int64_t attend_ws = sals_attn_ws_floats(R, d) + (r + 2 * half + 2) * SALS_KEY_BLOCK +
                            max_i64(dk, r) + 2 * half + R;
  return max_i64(select_ws, max_i64(attend_ws, d));
}

static const char* elem_at(const char* base, sals_elem_t el, int64_t off) {
  return base + off * (int64_t)sals_elem_size(el);
}

/* Fold the pre-RoPE query's heads per GQA group, project, score the candidates on the
 * leading score_rank latent coordinates and keep the best `budget`. */
void sals_select_task(void* p, int64_t task, int32_t thread) {
  const sals_attend_t* a = (const sals_attend_t*)p;
  const sals_layer_t* L = a->L;
  const sals_config_t* g = L->cfg;
  const int64_t nsh = L->n_sel_heads, b = task / nsh, sh = task % nsh;
  const sals_seq_t* seq = &a->seq[b];
  if (!seq->sparse) return;
  const int64_t d = g->head_dim, G = g->n_head_q / g->n_head_kv, r = g->rank;
  const int64_t rs = g->score_rank, S = seq->len;
  int32_t* sel = a->sel + (b * nsh + sh) * a->sel_stride;
  const int32_t qp = sals_seq_qpos(seq, 0);
  int64_t ns, re;
  sals_windows(g, S, &ns, &re);
  if (qp < 0 || re <= ns) {
    if (sh == 0) a->sel_count[b] = 0;
    return;
  }
  float* qg = a->ws + thread * a->ws_stride;
  float* qt = qg + L->dk;
  float* kb = qt + r;
  float* score = kb + SCORE_BLOCK * rs;
  int32_t* perm = (int32_t*)(score + S);
  float* row = (float*)(perm + S);
  /* Fold the group's query heads (pre-RoPE) by summing, then project on the heads' rows. */
  const int64_t h0 = nsh == 1 ? 0 : sh, nh = nsh == 1 ? g->n_head_kv : 1;
  for (int64_t h = 0; h < nh; ++h) {
    float* qh = qg + h * d;
    memset(qh, 0, (size_t)d * 4);
    for (int64_t j = 0; j < G; ++j) {
      sals_load_f32(row, elem_at(seq->q, a->q_elem, ((h0 + h) * G + j) * seq->q_sh), a->q_elem, d);
      for (int64_t i = 0; i < d; ++i) qh[i] += row[i];
    }
  }
  sals_gemm(1, rs, nh * d, qg, nh * d, L->proj + h0 * d * r, r, qt, rs, 0);
  const int64_t n = re - ns;
  for (int64_t j0 = 0; j0 < n;) {
    const int64_t nb = sals_seq_run(seq, ns + j0, n - j0 < SCORE_BLOCK ? n - j0 : SCORE_BLOCK);
    int64_t major, minor;
    sals_seq_token(seq, ns + j0, &major, &minor);
    sals_layer_load_latent(L, 0, major, minor, nb, kb);
    for (int64_t j = 0; j < nb; ++j) {
      float sc = sals_dot(qt, kb + j * rs, rs);
      /* Invisible tokens are not candidates (NaN); a NaN from the data ranks last. */
      sc = isnan(sc) ? -INFINITY : sc;
      const int64_t t = ns + j0 + j;
      score[j0 + j] = (seq->pos ? seq->pos[t] : t) <= qp ? sc : NAN;
    }
    j0 += nb;
  }
  const int64_t cnt = sals_topk(score, n, sals_budget(g, S), perm, sel);
  for (int64_t i = 0; i < cnt; ++i) sel[i] += (int32_t)ns;
  if (sh == 0) a->sel_count[b] = (int32_t)cnt;
}

/* The exact copy of token t of a sequence (a sink [0, ns) or recent [re, S)): head 0 of its key
 * and value, the elements from one head to the next, their type; 0 when the token has none
 * and is rebuilt from its slot. */
static int exact_copy(const sals_config_t* g, const sals_seq_t* s, int64_t t, int64_t ns,
                      int64_t re, const char** k, const char** v, int64_t* head_stride,
                      sals_elem_t* el) {
  if (t >= ns && t < re) return 0;
  if (s->sink_k) {
    *el = sals_dtype_elem(g->dtype);
    *head_stride = g->head_dim;
    const int64_t row = (t < ns ? t : t % g->n_recent) * g->n_head_kv * g->head_dim;
    *k = (t < ns ? s->sink_k : s->recent_k) + row * (int64_t)sals_elem_size(*el);
    *v = (t < ns ? s->sink_v : s->recent_v) + row * (int64_t)sals_elem_size(*el);
    return 1;
  }
  if (!s->window_rows) return 0;
  const int32_t row = s->window_rows[t < ns ? t : g->n_sink + g->n_recent - s->len + t];
  if (row < 0) return 0;
  *el = s->window_elem;
  *head_stride = s->window_stride[2];
  *k = s->window + row * s->window_stride[0] * (int64_t)sals_elem_size(*el);
  *v = *k + s->window_stride[1] * (int64_t)sals_elem_size(*el);
  return 1;
}

/* Attention of one (work item, head group, token chunk). */
void sals_attend_task(void* p, int64_t task, int32_t thread) {
  const sals_attend_t* a = (const sals_attend_t*)p;
  const sals_layer_t* L = a->L;
  const sals_config_t* g = L->cfg;
  const int64_t ch = task % a->n_ch, hg = (task / a->n_ch) % a->n_hg;
  const int64_t w = task / (a->n_ch * a->n_hg);
  const int64_t b = a->work ? a->work[2 * w] : w / a->n_qb;
  const int64_t qb = a->work ? a->work[2 * w + 1] : w % a->n_qb;
  const sals_seq_t* seq = &a->seq[b];
  const int64_t d = g->head_dim, G = g->n_head_q / g->n_head_kv, r = g->rank, rs = g->score_rank;
  const int64_t dk = L->dk, half = L->half, S = seq->len;
  const int64_t h0 = hg * a->hg_size, t0 = qb * a->q_block;
  const int64_t tqn = seq->n_q - t0 < a->q_block ? seq->n_q - t0 : a->q_block;
  const int64_t Rh = tqn * G, R = Rh * a->hg_size; /* rows per head, rows in all */

  sals_attn_ws_t ws;
  float* lt = sals_attn_ws_carve(a->ws + thread * a->ws_stride, R, d, &ws);
  float *q = ws.q, *m = ws.m, *l = ws.l, *acc = ws.acc, *sc = ws.s, *kt = ws.kt, *vb = ws.v;
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
    const int32_t qp = sals_seq_qpos(seq, t0 + t);
    qmax = qp > qmax ? qp : qmax;
    if (qp >= 0) sals_rope_pos(qp, L->inv_freq, (int32_t)half, L->attention_scaling, qc, qs);
    for (int64_t hh = 0; hh < a->hg_size; ++hh)
      for (int64_t j = 0; j < G; ++j) {
        const int64_t ri = (hh * tqn + t) * G + j;
        float* qr = q + ri * d;
        qpos[ri] = qp;
        const int64_t at = (t0 + t) * seq->q_st + ((h0 + hh) * G + j) * seq->q_sh;
        sals_load_f32(qr, elem_at(seq->q, a->q_elem, at), a->q_elem, d);
        if (qp >= 0) sals_rope_row(qr, (int32_t)half, L->interleaved, qc, qs);
        for (int64_t i = 0; i < d; ++i) qr[i] *= L->scale;
      }
  }
  sals_attn_init(R, d, m, l, acc);

  /* The token list: sinks, then the selected candidates (all of them when dense), then the
   * recent window. Tokens with an exact copy (exact_copy) are read from it, the others are
   * rebuilt from their latents. */
  int64_t ns, re;
  sals_windows(g, S, &ns, &re);
  const int32_t* sel = NULL;
  int64_t lat_hi = re;
  if (seq->sparse) {
    sel = a->sel + (b * L->n_sel_heads + (L->n_sel_heads == 1 ? 0 : hg)) * a->sel_stride;
    lat_hi = ns + a->sel_count[b];
  }
  const int64_t list = lat_hi + (S - re);
  const int64_t i0 = list * ch / a->n_ch, i1 = list * (ch + 1) / a->n_ch;
  /* Per block entry: its exact key and value (NULL when rebuilt); the rebuilt entries' columns. */
  const char* xk[SALS_KEY_BLOCK];
  const char* xv[SALS_KEY_BLOCK];
  int64_t xhs[SALS_KEY_BLOCK];
  sals_elem_t xel[SALS_KEY_BLOCK];
  int32_t lat_col[SALS_KEY_BLOCK];

  for (int64_t j0 = i0; j0 < i1 && qmax >= 0; j0 += SALS_KEY_BLOCK) {
    const int64_t nk = i1 - j0 < SALS_KEY_BLOCK ? i1 - j0 : SALS_KEY_BLOCK;
    int32_t kmin = INT32_MAX;
    for (int64_t n = 0; n < nk; ++n) {
      const int64_t i = j0 + n;
      slots[n] = (int32_t)(i < ns ? i : (i < lat_hi ? (sel ? sel[i - ns] : i) : re + i - lat_hi));
      kpos[n] = seq->pos ? seq->pos[slots[n]] : slots[n];
      kmin = kpos[n] < kmin ? kpos[n] : kmin;
    }
    if (kmin > qmax) continue; /* causal: nothing here is visible to these queries */
    if (half > 0)
      sals_rope_table(kpos, nk, L->inv_freq, (int32_t)half, L->attention_scaling, ccos, csin);
    /* Latent keys of this block: gathered once for all heads, into columns [0, nl). */
    int64_t nl = 0;
    for (int64_t n = 0; n < nk; ++n) {
      if (exact_copy(g, seq, slots[n], ns, re, &xk[n], &xv[n], &xhs[n], &xel[n])) continue;
      xk[n] = NULL;
      int64_t major, minor;
      sals_seq_token(seq, slots[n], &major, &minor);
      sals_layer_load_latent(L, 0, major, minor, 1, row);
      if (r > rs) sals_layer_load_latent(L, 1, major, minor, 1, row + rs);
      for (int64_t i = 0; i < r; ++i) lt[i * SALS_KEY_BLOCK + nl] = row[i];
      lat_col[nl++] = (int32_t)n;
    }
    for (int64_t hh = 0; hh < a->hg_size; ++hh) {
      const int64_t h = h0 + hh;
      if (nl > 0) {
        sals_gemm(d, nl, r, L->proj + h * d * r, r, lt, SALS_KEY_BLOCK, kt, SALS_KEY_BLOCK, 0);
        /* To their entries' columns, last first: column lat_col[c] >= c is never a column
         * still to be moved. */
        for (int64_t c = nl - 1; c >= 0; --c)
          if (lat_col[c] != c)
            for (int64_t i = 0; i < d; ++i)
              kt[i * SALS_KEY_BLOCK + lat_col[c]] = kt[i * SALS_KEY_BLOCK + c];
      }
      for (int64_t n = 0; n < nk; ++n) {
        float* vr = vb + n * d;
        if (xk[n] == NULL) {
          int64_t major, minor;
          sals_seq_token(seq, slots[n], &major, &minor);
          sals_layer_load_value(L, major, minor, h, vr);
          continue;
        }
        const int64_t off = h * xhs[n] * (int64_t)sals_elem_size(xel[n]);
        sals_load_f32(row, xk[n] + off, xel[n], d);
        for (int64_t i = 0; i < d; ++i) kt[i * SALS_KEY_BLOCK + n] = row[i];
        sals_load_f32(vr, xv[n] + off, xel[n], d);
      }
      if (half > 0)
        sals_rope_cols(kt, SALS_KEY_BLOCK, nk, (int32_t)half, L->interleaved, ccos, csin);
      sals_attn_block(Rh, d, nk, q + hh * Rh * d, kt, SALS_KEY_BLOCK, vb, kpos, qpos + hh * Rh, sc,
                      m + hh * Rh, l + hh * Rh, acc + hh * Rh * d);
    }
  }

  if (a->n_ch > 1) {
    /* Partial state per query head of this chunk, merged by sals_merge_task. */
    for (int64_t hh = 0; hh < a->hg_size; ++hh)
      for (int64_t j = 0; j < G; ++j) {
        const int64_t ri = hh * Rh + j, qh = (h0 + hh) * G + j;
        float* dst = a->partial + ((b * a->max_chunks + ch) * g->n_head_q + qh) * (d + 2);
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
        sals_store_f32(seq->out + ((t0 + t) * seq->o_st + ((h0 + hh) * G + j) * seq->o_sh) *
                                      (int64_t)sals_elem_size(a->out_elem),
                       a->out_elem, row, d);
      }
}

void sals_merge_task(void* p, int64_t task, int32_t thread) {
  const sals_attend_t* a = (const sals_attend_t*)p;
  const int64_t Hq = a->L->cfg->n_head_q, d = a->L->cfg->head_dim;
  const int64_t b = task / Hq, qh = task % Hq;
  const sals_seq_t* seq = &a->seq[b];
  if (seq->n_q == 0) return; /* paged storage: a sequence without queries this call */
  float* row = a->ws + thread * a->ws_stride;
  float mx = -INFINITY;
  for (int64_t ch = 0; ch < a->n_ch; ++ch) {
    const float mc = a->partial[((b * a->max_chunks + ch) * Hq + qh) * (d + 2)];
    mx = mc > mx ? mc : mx;
  }
  float lsum = 0.0f;
  memset(row, 0, (size_t)d * 4);
  if (mx > -INFINITY)
    for (int64_t ch = 0; ch < a->n_ch; ++ch) {
      const float* src = a->partial + ((b * a->max_chunks + ch) * Hq + qh) * (d + 2);
      if (src[1] == 0.0f) continue;
      const float w = expf(src[0] - mx);
      lsum += w * src[1];
      for (int64_t i = 0; i < d; ++i) row[i] += w * src[2 + i];
    }
  const float inv = lsum > 0.0f ? 1.0f / lsum : 0.0f;
  for (int64_t i = 0; i < d; ++i) row[i] *= inv;
  sals_store_f32(seq->out + qh * seq->o_sh * (int64_t)sals_elem_size(a->out_elem), a->out_elem, row,
                 d);
}
