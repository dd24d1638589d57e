/* Stateless stages: argument validation and dispatch to the backend of the tensors' device. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "cpu/cpu.h"
#include "tensor.h"

#define INVALID SALS_ERR_INVALID_ARGUMENT

/* Length of sequence b: lengths[b] from host-readable lengths, S when there are none. */
static int64_t length_of(const sals_view_t* lv, int64_t b, int64_t S) {
  return lv ? ((const int32_t*)lv->data)[b * lv->stride[0]] : S;
}

/* Host-readable optional lengths [B]: each in 0..S. */
static sals_status_t check_lengths(const sals_view_t* lv, DLDevice dev, int64_t S) {
  if (!lv || dev.device_type != kDLCPU) return SALS_OK;
  for (int64_t b = 0; b < lv->shape[0]; ++b) {
    const int64_t n = length_of(lv, b, S);
    if (n < 0 || n > S)
      return sals_set_error(INVALID, "lengths[%lld]: %lld not in 0..%lld", (long long)b,
                            (long long)n, (long long)S);
  }
  return SALS_OK;
}

sals_status_t sals_project(const DLTensor* x, const DLTensor* proj, DLTensor* out, void* stream) {
  sals_view_t xv, pv, ov;
  DLDevice dev;
  const sals_arg_t a[] = {{x, "x", 2, SALS_ACCEPT_FLOAT, &xv, 0, 0},
                          {proj, "proj", 2, SALS_ACCEPT_FLOAT, &pv, 0, 0},
                          {out, "out", 2, SALS_ACCEPT_FLOAT, &ov, 0, 1}};
  SALS_TRY(sals_arg_views(a, 3, &dev));
  SALS_TRY(sals_dim_eq(&pv, "proj", 0, &xv, "x", 1));
  SALS_TRY(sals_dim_eq(&ov, "out", 0, &xv, "x", 0));
  SALS_TRY(sals_dim_eq(&ov, "out", 1, &pv, "proj", 1));
  SALS_TRY(sals_arg_apart(a, 2));
  if (sals_view_numel(&ov) == 0) return SALS_OK;
  if (dev.device_type == kDLCPU) {
    SALS_TRY(sals_finite_all(&xv, "x"));
    SALS_TRY(sals_finite_all(&pv, "proj"));
  }
  return SALS_DISPATCH(dev, project, &xv, &pv, &ov, stream);
}

sals_status_t sals_rope_apply(const DLTensor* x, const DLTensor* pos, const sals_rope_t* rope,
                              DLTensor* out, void* stream) {
  sals_view_t xv, pv, ov;
  DLDevice dev;
  const sals_arg_t a[] = {{x, "x", 3, SALS_ACCEPT_FLOAT, &xv, 0, 0},
                          {pos, "pos", 1, SALS_ACCEPT_I32, &pv, 0, 0},
                          {out, "out", 3, SALS_ACCEPT_FLOAT, &ov, 0, 1}};
  SALS_TRY(sals_arg_views(a, 3, &dev));
  SALS_TRY(sals_dim_eq(&pv, "pos", 0, &xv, "x", 0));
  for (int32_t i = 0; i < 3; ++i) SALS_TRY(sals_dim_eq(&ov, "out", i, &xv, "x", i));
  SALS_TRY(sals_check_rope(rope, xv.shape[2]));
  if (!sals_views_same(&ov, &xv) && sals_views_overlap(&ov, &xv))
    return sals_set_error(INVALID, "out: overlaps x without being the same view");
  SALS_TRY(sals_no_overlap(&ov, "out", &pv, "pos"));
  if (sals_view_numel(&ov) == 0) return SALS_OK;
  if (dev.device_type == kDLCPU) SALS_TRY(sals_finite_all(&xv, "x"));
  return SALS_DISPATCH(dev, rope_apply, &xv, &pv, rope->inv_freq, rope->rotary_dim,
                       rope->attention_scaling, rope->interleaved, &ov, stream);
}

/* score_select reads q_lat[b, h, :score_rank] and k_lat[b, j, :score_rank] of the candidates j
 * in [n_sink, length_b - n_recent). */
static sals_status_t finite_scored(const sals_view_t* qv, const sals_view_t* kv,
                                   const sals_view_t* lv, int32_t score_rank, int32_t n_sink,
                                   int32_t n_recent) {
  SALS_TRY(sals_finite_rows(qv, "q_lat", score_rank));
  for (int64_t b = 0; b < kv->shape[0]; ++b) {
    const int64_t end = length_of(lv, b, kv->shape[1]) - n_recent;
    for (int64_t j = n_sink; j < end; ++j) {
      const int64_t ix[2] = {b, j};
      SALS_TRY(sals_finite_row(kv, "k_lat", ix, score_rank));
    }
  }
  return SALS_OK;
}

sals_status_t sals_score_select(const DLTensor* q_lat, const DLTensor* k_lat,
                                const DLTensor* lengths, int32_t score_rank, int32_t n_sink,
                                int32_t n_recent, int32_t budget, DLTensor* out, void* stream) {
  sals_view_t qv, kv, lv, iv;
  DLDevice dev;
  const sals_arg_t a[] = {{q_lat, "q_lat", 3, SALS_ACCEPT_FLOAT, &qv, 0, 0},
                          {k_lat, "k_lat", 3, SALS_ACCEPT_FLOAT, &kv, 0, 0},
                          {lengths, "lengths", 1, SALS_ACCEPT_I32, &lv, 1, 0},
                          {out, "out", 3, SALS_ACCEPT_I32, &iv, 0, 1}};
  SALS_TRY(sals_arg_views(a, 4, &dev));
  SALS_TRY(sals_dim_eq(&kv, "k_lat", 0, &qv, "q_lat", 0));
  if (lengths) SALS_TRY(sals_dim_eq(&lv, "lengths", 0, &qv, "q_lat", 0));
  const int64_t S = kv.shape[1];
  const int64_t rmax = qv.shape[2] < kv.shape[2] ? qv.shape[2] : kv.shape[2];
  if (score_rank < 1 || score_rank > rmax)
    return sals_set_error(INVALID,
                          "score_rank: %d not in 1..%lld (min of q_lat.shape[2], "
                          "k_lat.shape[2])",
                          (int)score_rank, (long long)rmax);
  if (n_sink < 0) return sals_set_error(INVALID, "n_sink: %d must be >= 0", (int)n_sink);
  if (n_recent < 0) return sals_set_error(INVALID, "n_recent: %d must be >= 0", (int)n_recent);
  const int64_t cand = S - n_sink - n_recent;
  if (budget < 1 || budget > cand)
    return sals_set_error(INVALID, "budget: %d not in 1..%lld (S - n_sink - n_recent candidates)",
                          (int)budget, (long long)cand);
  SALS_TRY(sals_dim_eq(&iv, "out", 0, &qv, "q_lat", 0));
  SALS_TRY(sals_dim_eq(&iv, "out", 1, &qv, "q_lat", 1));
  if (iv.shape[2] != budget)
    return sals_set_error(INVALID, "out: dim 2 is %lld, expected %d (budget)",
                          (long long)iv.shape[2], (int)budget);
  SALS_TRY(sals_arg_apart(a, 3));
  SALS_TRY(check_lengths(lengths ? &lv : NULL, dev, S));
  if (sals_view_numel(&iv) == 0) return SALS_OK;
  if (dev.device_type == kDLCPU)
    SALS_TRY(finite_scored(&qv, &kv, lengths ? &lv : NULL, score_rank, n_sink, n_recent));
  return SALS_DISPATCH(dev, score_select, &qv, &kv, lengths ? &lv : NULL, score_rank, n_sink,
                       n_recent, budget, &iv, stream);
}

sals_status_t sals_rebuild_rope(const DLTensor* k_lat, const DLTensor* proj, const DLTensor* pos,
                                const sals_rope_t* rope, DLTensor* out, void* stream) {
  sals_view_t kv, pv, posv, ov;
  DLDevice dev;
  const sals_arg_t a[] = {{k_lat, "k_lat", 2, SALS_ACCEPT_FLOAT, &kv, 0, 0},
                          {proj, "proj", 2, SALS_ACCEPT_FLOAT, &pv, 0, 0},
                          {pos, "pos", 1, SALS_ACCEPT_I32, &posv, 0, 0},
                          {out, "out", 3, SALS_ACCEPT_FLOAT, &ov, 0, 1}};
  SALS_TRY(sals_arg_views(a, 4, &dev));
  SALS_TRY(sals_dim_eq(&pv, "proj", 1, &kv, "k_lat", 1));
  SALS_TRY(sals_dim_eq(&posv, "pos", 0, &kv, "k_lat", 0));
  SALS_TRY(sals_dim_eq(&ov, "out", 0, &kv, "k_lat", 0));
  if (pv.shape[0] != ov.shape[1] * ov.shape[2])
    return sals_set_error(INVALID,
                          "proj: dim 0 is %lld, expected %lld (out.shape[1] * out.shape[2])",
                          (long long)pv.shape[0], (long long)(ov.shape[1] * ov.shape[2]));
  SALS_TRY(sals_check_rope(rope, ov.shape[2]));
  SALS_TRY(sals_arg_apart(a, 3));
  if (sals_view_numel(&ov) == 0) return SALS_OK;
  if (dev.device_type == kDLCPU) {
    SALS_TRY(sals_finite_all(&kv, "k_lat"));
    SALS_TRY(sals_finite_all(&pv, "proj"));
  }
  return SALS_DISPATCH(dev, rebuild_rope, &kv, &pv, &posv, rope->inv_freq, rope->rotary_dim,
                       rope->attention_scaling, rope->interleaved, &ov, stream);
}

/* k[b, t, h] and v[b, t, h] for the KV heads h0 .. h1 - 1 are finite. */
static sals_status_t finite_token(const sals_view_t* kv, const sals_view_t* vv, int64_t b,
                                  int64_t t, int64_t h0, int64_t h1) {
  for (int64_t h = h0; h < h1; ++h) {
    const int64_t ix[3] = {b, t, h};
    SALS_TRY(sals_finite_row(kv, "k", ix, kv->shape[3]));
    SALS_TRY(sals_finite_row(vv, "v", ix, vv->shape[3]));
  }
  return SALS_OK;
}

/* Host inputs of sparse_attention: every idx entry is -1 or a token below its sequence's
 * length, no token appears twice in one row, and what is read (q; k and v of the attended
 * tokens) is finite. */
static sals_status_t check_attended(const sals_view_t* qv, const sals_view_t* kv,
                                    const sals_view_t* vv, const sals_view_t* iv,
                                    const sals_view_t* lv) {
  const int64_t S = kv->shape[1], Hkv = kv->shape[2];
  /* seen[t]: the last row (b * H + h) that named token t, to find repeats in one pass. */
  int64_t* seen = NULL;
  if (iv && S > 0 && iv->shape[2] > 1) {
    seen = (int64_t*)malloc((size_t)S * sizeof *seen);
    if (!seen) return sals_set_error(SALS_ERR_OUT_OF_MEMORY, "out of host memory (idx check)");
    for (int64_t t = 0; t < S; ++t) seen[t] = -1;
  }
  sals_status_t st = SALS_OK;
  for (int64_t b = 0; b < qv->shape[0] && st == SALS_OK; ++b) {
    const int64_t len = length_of(lv, b, S);
    if (!iv) {
      for (int64_t t = 0; t < len && st == SALS_OK; ++t) st = finite_token(kv, vv, b, t, 0, Hkv);
      continue;
    }
    const int shared = iv->shape[1] == 1;
    for (int64_t h = 0; h < iv->shape[1] && st == SALS_OK; ++h)
      for (int64_t n = 0; n < iv->shape[2] && st == SALS_OK; ++n) {
        const int32_t t = ((const int32_t*)iv->data)[b * iv->stride[0] + h * iv->stride[1] + n];
        if (t < -1 || t >= len) {
          st = sals_set_error(INVALID,
                              "idx[%lld, %lld, %lld]: %d not a token of 0..%lld "
                              "(or -1)",
                              (long long)b, (long long)h, (long long)n, (int)t, (long long)len - 1);
        } else if (t >= 0 && seen && seen[t] == b * iv->shape[1] + h) {
          st = sals_set_error(INVALID,
                              "idx[%lld, %lld, %lld]: token %d appears twice in "
                              "idx[%lld, %lld] (each token may be attended once)",
                              (long long)b, (long long)h, (long long)n, (int)t, (long long)b,
                              (long long)h);
        } else if (t >= 0) {
          if (seen) seen[t] = b * iv->shape[1] + h;
          st = finite_token(kv, vv, b, t, shared ? 0 : h, shared ? Hkv : h + 1);
        }
      }
  }
  free(seen);
  return st != SALS_OK ? st : sals_finite_all(qv, "q");
}

sals_status_t sals_sparse_attention(const DLTensor* q, const DLTensor* k, const DLTensor* v,
                                    const DLTensor* idx, const DLTensor* lengths, float scale,
                                    DLTensor* out, void* stream) {
  sals_view_t qv, kv, vv, iv, lv, ov;
  DLDevice dev;
  const sals_arg_t a[] = {{q, "q", 3, SALS_ACCEPT_FLOAT, &qv, 0, 0},
                          {k, "k", 4, SALS_ACCEPT_FLOAT, &kv, 0, 0},
                          {v, "v", 4, SALS_ACCEPT_FLOAT, &vv, 0, 0},
                          {idx, "idx", 3, SALS_ACCEPT_I32, &iv, 1, 0},
                          {lengths, "lengths", 1, SALS_ACCEPT_I32, &lv, 1, 0},
                          {out, "out", 3, SALS_ACCEPT_FLOAT, &ov, 0, 1}};
  SALS_TRY(sals_arg_views(a, 6, &dev));
  SALS_TRY(sals_dim_eq(&kv, "k", 0, &qv, "q", 0));
  SALS_TRY(sals_dim_eq(&kv, "k", 3, &qv, "q", 2));
  for (int32_t i = 0; i < 4; ++i) SALS_TRY(sals_dim_eq(&vv, "v", i, &kv, "k", i));
  const int64_t Hq = qv.shape[1], Hkv = kv.shape[2], S = kv.shape[1];
  if (Hkv < 1 || Hq % Hkv != 0)
    return sals_set_error(INVALID, "q: dim 1 is %lld, not a multiple of k.shape[2] %lld",
                          (long long)Hq, (long long)Hkv);
  for (int32_t i = 0; i < 3; ++i) SALS_TRY(sals_dim_eq(&ov, "out", i, &qv, "q", i));
  if (idx) {
    SALS_TRY(sals_dim_eq(&iv, "idx", 0, &qv, "q", 0));
    if (iv.shape[1] != 1 && iv.shape[1] != Hkv)
      return sals_set_error(INVALID, "idx: dim 1 is %lld, expected 1 (shared) or %lld (k.shape[2])",
                            (long long)iv.shape[1], (long long)Hkv);
  }
  if (lengths) SALS_TRY(sals_dim_eq(&lv, "lengths", 0, &qv, "q", 0));
  if (!(scale >= 0.0f) || !isfinite(scale))
    return sals_set_error(INVALID, "scale: %g must be finite and >= 0", (double)scale);
  SALS_TRY(sals_arg_apart(a, 5));
  SALS_TRY(check_lengths(lengths ? &lv : NULL, dev, S));
  if (dev.device_type == kDLCPU)
    SALS_TRY(check_attended(&qv, &kv, &vv, idx ? &iv : NULL, lengths ? &lv : NULL));
  if (sals_view_numel(&ov) == 0) return SALS_OK;
  const float s = scale > 0.0f ? scale : 1.0f / sqrtf((float)qv.shape[2]);
  return SALS_DISPATCH(dev, sparse_attention, &qv, &kv, &vv, idx ? &iv : NULL, lengths ? &lv : NULL,
                       s, &ov, stream);
}

static sals_status_t check_quant(int32_t bits, int32_t group, int64_t D, const char* vn) {
  if (bits != 2 && bits != 4 && bits != 8)
    return sals_set_error(INVALID, "bits: %d not one of 2, 4, 8", (int)bits);
  if (group < 1 || D % group != 0)
    return sals_set_error(INVALID, "group: %d does not divide the row length %lld (%s.shape[1])",
                          (int)group, (long long)D, vn);
  if (group * bits % 8 != 0)
    return sals_set_error(INVALID, "group: %d groups of %d-bit codes do not fill whole bytes",
                          (int)group, (int)bits);
  return SALS_OK;
}

/* packed [N, D*bits/8], scale and zero [N, D/group] against values [N, D]. */
static sals_status_t check_packed(const sals_view_t* vv, const char* vn, const sals_view_t* pv,
                                  const sals_view_t* sv, const sals_view_t* zv, int32_t bits,
                                  int32_t group) {
  const int64_t D = vv->shape[1];
  SALS_TRY(check_quant(bits, group, D, vn));
  SALS_TRY(sals_dim_eq(pv, "packed", 0, vv, vn, 0));
  SALS_TRY(sals_check_dim(pv, "packed", 1, D * bits / 8, "D * bits / 8"));
  SALS_TRY(sals_dim_eq(sv, "scale", 0, vv, vn, 0));
  SALS_TRY(sals_check_dim(sv, "scale", 1, D / group, "D / group"));
  SALS_TRY(sals_dim_eq(zv, "zero", 0, vv, vn, 0));
  SALS_TRY(sals_check_dim(zv, "zero", 1, D / group, "D / group"));
  return SALS_OK;
}

/* Every group of the (finite, host) rows of v gets a finite float16 scale and zero. */
static sals_status_t quantizable(const sals_view_t* vv, int32_t bits, int32_t group) {
  const int64_t D = vv->shape[1];
  float* row = (float*)malloc((size_t)D * sizeof(float));
  if (!row) return sals_set_error(SALS_ERR_OUT_OF_MEMORY, "out of host memory (v check)");
  sals_status_t st = SALS_OK;
  for (int64_t n = 0; n < vv->shape[0] && st == SALS_OK; ++n) {
    sals_load_f32(row,
                  (const char*)vv->data + n * vv->stride[0] * (int64_t)sals_elem_size(vv->elem),
                  vv->elem, D);
    const int64_t g = sals_quantize_row_check(row, D, bits, group);
    if (g >= 0)
      st = sals_set_error(SALS_ERR_NOT_FINITE,
                          "v: row %lld, channels %lld..%lld span more than the float16 scale and "
                          "zero of %d-bit codes hold",
                          (long long)n, (long long)(g * group), (long long)((g + 1) * group - 1),
                          (int)bits);
  }
  free(row);
  return st;
}

sals_status_t sals_quantize_values(const DLTensor* v, int32_t bits, int32_t group, DLTensor* packed,
                                   DLTensor* scale, DLTensor* zero, void* stream) {
  sals_view_t vv, pv, sv, zv;
  DLDevice dev;
  const sals_arg_t a[] = {{v, "v", 2, SALS_ACCEPT_FLOAT, &vv, 0, 0},
                          {packed, "packed", 2, SALS_ACCEPT_U8, &pv, 0, 1},
                          {scale, "scale", 2, SALS_ACCEPT_F16, &sv, 0, 1},
                          {zero, "zero", 2, SALS_ACCEPT_F16, &zv, 0, 1}};
  SALS_TRY(sals_arg_views(a, 4, &dev));
  SALS_TRY(check_packed(&vv, "v", &pv, &sv, &zv, bits, group));
  for (int i = 1; i < 4; ++i) SALS_TRY(sals_arg_apart(a, i)); /* three outputs, all written */
  if (sals_view_numel(&vv) == 0) return SALS_OK;
  if (dev.device_type == kDLCPU) {
    SALS_TRY(sals_finite_all(&vv, "v"));
    SALS_TRY(quantizable(&vv, bits, group));
  }
  return SALS_DISPATCH(dev, quantize_values, &vv, bits, group, &pv, &sv, &zv, stream);
}

sals_status_t sals_dequantize_values(const DLTensor* packed, const DLTensor* scale,
                                     const DLTensor* zero, int32_t bits, int32_t group,
                                     DLTensor* out, void* stream) {
  sals_view_t pv, sv, zv, ov;
  DLDevice dev;
  const sals_arg_t a[] = {{packed, "packed", 2, SALS_ACCEPT_U8, &pv, 0, 0},
                          {scale, "scale", 2, SALS_ACCEPT_F16, &sv, 0, 0},
                          {zero, "zero", 2, SALS_ACCEPT_F16, &zv, 0, 0},
                          {out, "out", 2, SALS_ACCEPT_FLOAT, &ov, 0, 1}};
  SALS_TRY(sals_arg_views(a, 4, &dev));
  SALS_TRY(check_packed(&ov, "out", &pv, &sv, &zv, bits, group));
  SALS_TRY(sals_arg_apart(a, 3));
  if (sals_view_numel(&ov) == 0) return SALS_OK;
  if (dev.device_type == kDLCPU) {
    SALS_TRY(sals_finite_all(&sv, "scale"));
    SALS_TRY(sals_finite_all(&zv, "zero"));
  }
  return SALS_DISPATCH(dev, dequantize_values, &pv, &sv, &zv, bits, group, &ov, stream);
}
