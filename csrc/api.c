/* Stateless stages: argument validation and dispatch to the backend of the tensors' device. */
#include <math.h>

#include "tensor.h"

#define INVALID SALS_ERR_INVALID_ARGUMENT

#define TRY(expr)                    \
  do {                               \
    sals_status_t st_ = (expr);      \
    if (st_ != SALS_OK) return st_;  \
  } while (0)

/* A tensor of a stateless call: checked, and on the device of the call's first tensor. */
static sals_status_t arg(const DLTensor* t, const char* name, int32_t ndim, uint32_t accept,
                         sals_view_t* v, const DLDevice* first, const char* first_name) {
  DLDevice dev;
  TRY(sals_view_make(t, name, ndim, accept, v, &dev));
  return sals_check_device(name, dev, *first, first_name);
}

static sals_status_t first_arg(const DLTensor* t, const char* name, int32_t ndim, uint32_t accept,
                               sals_view_t* v, DLDevice* dev) {
  TRY(sals_view_make(t, name, ndim, accept, v, dev));
  return sals_check_backend(name, *dev);
}

static sals_status_t dim_eq(const sals_view_t* v, const char* name, int32_t axis,
                            const sals_view_t* ref, const char* ref_name, int32_t ref_axis) {
  if (v->shape[axis] == ref->shape[ref_axis]) return SALS_OK;
  return sals_set_error(INVALID, "%s: dim %d is %lld, expected %lld (%s.shape[%d])", name,
                        (int)axis, (long long)v->shape[axis], (long long)ref->shape[ref_axis],
                        ref_name, (int)ref_axis);
}

static sals_status_t no_overlap(const sals_view_t* out, const char* on, const sals_view_t* in,
                                const char* in_name) {
  if (!sals_views_overlap(out, in)) return SALS_OK;
  return sals_set_error(INVALID, "%s: overlaps %s", on, in_name);
}

/* Host-readable optional lengths [B]: each in 0..S. */
static sals_status_t check_lengths(const sals_view_t* lv, DLDevice dev, int64_t S) {
  if (!lv || dev.device_type != kDLCPU) return SALS_OK;
  for (int64_t b = 0; b < lv->shape[0]; ++b) {
    const int32_t n = ((const int32_t*)lv->data)[b * lv->stride[0]];
    if (n < 0 || n > S)
      return sals_set_error(INVALID, "lengths[%lld]: %d not in 0..%lld", (long long)b, (int)n,
                            (long long)S);
  }
  return SALS_OK;
}

sals_status_t sals_project(const DLTensor* x, const DLTensor* proj, DLTensor* out, void* stream) {
  sals_view_t xv, pv, ov;
  DLDevice dev;
  TRY(first_arg(x, "x", 2, SALS_ACCEPT_FLOAT, &xv, &dev));
  TRY(arg(proj, "proj", 2, SALS_ACCEPT_FLOAT, &pv, &dev, "x"));
  TRY(arg(out, "out", 2, SALS_ACCEPT_FLOAT, &ov, &dev, "x"));
  TRY(dim_eq(&pv, "proj", 0, &xv, "x", 1));
  TRY(dim_eq(&ov, "out", 0, &xv, "x", 0));
  TRY(dim_eq(&ov, "out", 1, &pv, "proj", 1));
  TRY(no_overlap(&ov, "out", &xv, "x"));
  TRY(no_overlap(&ov, "out", &pv, "proj"));
  if (sals_view_numel(&ov) == 0) return SALS_OK;
  return SALS_DISPATCH(dev, project, &xv, &pv, &ov, stream);
}

sals_status_t sals_rope_apply(const DLTensor* x, const DLTensor* pos, const sals_rope_t* rope,
                              DLTensor* out, void* stream) {
  sals_view_t xv, pv, ov;
  DLDevice dev;
  TRY(first_arg(x, "x", 3, SALS_ACCEPT_FLOAT, &xv, &dev));
  TRY(arg(pos, "pos", 1, SALS_ACCEPT_I32, &pv, &dev, "x"));
  TRY(arg(out, "out", 3, SALS_ACCEPT_FLOAT, &ov, &dev, "x"));
  TRY(dim_eq(&pv, "pos", 0, &xv, "x", 0));
  for (int32_t i = 0; i < 3; ++i) TRY(dim_eq(&ov, "out", i, &xv, "x", i));
  TRY(sals_check_rope(rope, xv.shape[2]));
  if (!sals_views_same(&ov, &xv) && sals_views_overlap(&ov, &xv))
    return sals_set_error(INVALID, "out: overlaps x without being the same view");
  TRY(no_overlap(&ov, "out", &pv, "pos"));
  if (sals_view_numel(&ov) == 0) return SALS_OK;
  return SALS_DISPATCH(dev, rope_apply, &xv, &pv, rope->inv_freq, rope->rotary_dim,
                       rope->attention_scaling, rope->interleaved, &ov, stream);
}

sals_status_t sals_score_select(const DLTensor* q_lat, const DLTensor* k_lat,
                                const DLTensor* lengths, int32_t score_rank, int32_t n_sink,
                                int32_t n_recent, int32_t budget, DLTensor* idx, void* stream) {
  sals_view_t qv, kv, lv, iv;
  DLDevice dev;
  TRY(first_arg(q_lat, "q_lat", 3, SALS_ACCEPT_FLOAT, &qv, &dev));
  TRY(arg(k_lat, "k_lat", 3, SALS_ACCEPT_FLOAT, &kv, &dev, "q_lat"));
  if (lengths) TRY(arg(lengths, "lengths", 1, SALS_ACCEPT_I32, &lv, &dev, "q_lat"));
  TRY(arg(idx, "idx", 3, SALS_ACCEPT_I32, &iv, &dev, "q_lat"));
  TRY(dim_eq(&kv, "k_lat", 0, &qv, "q_lat", 0));
  if (lengths) TRY(dim_eq(&lv, "lengths", 0, &qv, "q_lat", 0));
  const int64_t S = kv.shape[1];
  const int64_t rmax = qv.shape[2] < kv.shape[2] ? qv.shape[2] : kv.shape[2];
  if (score_rank < 1 || score_rank > rmax)
    return sals_set_error(INVALID, "score_rank: %d not in 1..%lld (min of q_lat.shape[2], "
                          "k_lat.shape[2])", (int)score_rank, (long long)rmax);
  if (n_sink < 0) return sals_set_error(INVALID, "n_sink: %d must be >= 0", (int)n_sink);
  if (n_recent < 0) return sals_set_error(INVALID, "n_recent: %d must be >= 0", (int)n_recent);
  const int64_t cand = S - n_sink - n_recent;
  if (budget < 1 || budget > cand)
    return sals_set_error(INVALID, "budget: %d not in 1..%lld (S - n_sink - n_recent candidates)",
                          (int)budget, (long long)cand);
  TRY(dim_eq(&iv, "idx", 0, &qv, "q_lat", 0));
  TRY(dim_eq(&iv, "idx", 1, &qv, "q_lat", 1));
  if (iv.shape[2] != budget)
    return sals_set_error(INVALID, "idx: dim 2 is %lld, expected %d (budget)",
                          (long long)iv.shape[2], (int)budget);
  TRY(no_overlap(&iv, "idx", &qv, "q_lat"));
  TRY(no_overlap(&iv, "idx", &kv, "k_lat"));
  if (lengths) TRY(no_overlap(&iv, "idx", &lv, "lengths"));
  TRY(check_lengths(lengths ? &lv : NULL, dev, S));
  if (sals_view_numel(&iv) == 0) return SALS_OK;
  return SALS_DISPATCH(dev, score_select, &qv, &kv, lengths ? &lv : NULL, score_rank, n_sink,
                       n_recent, budget, &iv, stream);
}

sals_status_t sals_rebuild_rope(const DLTensor* k_lat, const DLTensor* proj, const DLTensor* pos,
                                const sals_rope_t* rope, DLTensor* out, void* stream) {
  sals_view_t kv, pv, posv, ov;
  DLDevice dev;
  TRY(first_arg(k_lat, "k_lat", 2, SALS_ACCEPT_FLOAT, &kv, &dev));
  TRY(arg(proj, "proj", 2, SALS_ACCEPT_FLOAT, &pv, &dev, "k_lat"));
  TRY(arg(pos, "pos", 1, SALS_ACCEPT_I32, &posv, &dev, "k_lat"));
  TRY(arg(out, "out", 3, SALS_ACCEPT_FLOAT, &ov, &dev, "k_lat"));
  TRY(dim_eq(&pv, "proj", 1, &kv, "k_lat", 1));
  TRY(dim_eq(&posv, "pos", 0, &kv, "k_lat", 0));
  TRY(dim_eq(&ov, "out", 0, &kv, "k_lat", 0));
  if (pv.shape[0] != ov.shape[1] * ov.shape[2])
    return sals_set_error(INVALID, "proj: dim 0 is %lld, expected %lld (out.shape[1] * out.shape[2])",
                          (long long)pv.shape[0], (long long)(ov.shape[1] * ov.shape[2]));
  TRY(sals_check_rope(rope, ov.shape[2]));
  TRY(no_overlap(&ov, "out", &kv, "k_lat"));
  TRY(no_overlap(&ov, "out", &pv, "proj"));
  TRY(no_overlap(&ov, "out", &posv, "pos"));
  if (sals_view_numel(&ov) == 0) return SALS_OK;
  return SALS_DISPATCH(dev, rebuild_rope, &kv, &pv, &posv, rope->inv_freq, rope->rotary_dim,
                       rope->attention_scaling, rope->interleaved, &ov, stream);
}

sals_status_t sals_sparse_attention(const DLTensor* q, const DLTensor* k, const DLTensor* v,
                                    const DLTensor* idx, const DLTensor* lengths, float scale,
                                    DLTensor* out, void* stream) {
  sals_view_t qv, kv, vv, iv, lv, ov;
  DLDevice dev;
  TRY(first_arg(q, "q", 3, SALS_ACCEPT_FLOAT, &qv, &dev));
  TRY(arg(k, "k", 4, SALS_ACCEPT_FLOAT, &kv, &dev, "q"));
  TRY(arg(v, "v", 4, SALS_ACCEPT_FLOAT, &vv, &dev, "q"));
  if (idx) TRY(arg(idx, "idx", 3, SALS_ACCEPT_I32, &iv, &dev, "q"));
  if (lengths) TRY(arg(lengths, "lengths", 1, SALS_ACCEPT_I32, &lv, &dev, "q"));
  TRY(arg(out, "out", 3, SALS_ACCEPT_FLOAT, &ov, &dev, "q"));
  TRY(dim_eq(&kv, "k", 0, &qv, "q", 0));
  TRY(dim_eq(&kv, "k", 3, &qv, "q", 2));
  for (int32_t i = 0; i < 4; ++i) TRY(dim_eq(&vv, "v", i, &kv, "k", i));
  const int64_t Hq = qv.shape[1], Hkv = kv.shape[2], S = kv.shape[1];
  if (Hkv < 1 || Hq % Hkv != 0)
    return sals_set_error(INVALID, "q: dim 1 is %lld, not a multiple of k.shape[2] %lld",
                          (long long)Hq, (long long)Hkv);
  for (int32_t i = 0; i < 3; ++i) TRY(dim_eq(&ov, "out", i, &qv, "q", i));
  if (idx) {
    TRY(dim_eq(&iv, "idx", 0, &qv, "q", 0));
    if (iv.shape[1] != 1 && iv.shape[1] != Hkv)
      return sals_set_error(INVALID, "idx: dim 1 is %lld, expected 1 (shared) or %lld (k.shape[2])",
                            (long long)iv.shape[1], (long long)Hkv);
    TRY(no_overlap(&ov, "out", &iv, "idx"));
  }
  if (lengths) {
    TRY(dim_eq(&lv, "lengths", 0, &qv, "q", 0));
    TRY(no_overlap(&ov, "out", &lv, "lengths"));
  }
  if (!(scale >= 0.0f) || !isfinite(scale))
    return sals_set_error(INVALID, "scale: %g must be finite and >= 0", (double)scale);
  TRY(no_overlap(&ov, "out", &qv, "q"));
  TRY(no_overlap(&ov, "out", &kv, "k"));
  TRY(no_overlap(&ov, "out", &vv, "v"));
  TRY(check_lengths(lengths ? &lv : NULL, dev, S));
  if (idx && dev.device_type == kDLCPU)
    for (int64_t b = 0; b < iv.shape[0]; ++b) {
      const int64_t len = lengths ? ((const int32_t*)lv.data)[b * lv.stride[0]] : S;
      for (int64_t h = 0; h < iv.shape[1]; ++h)
        for (int64_t n = 0; n < iv.shape[2]; ++n) {
          const int32_t t = ((const int32_t*)iv.data)[b * iv.stride[0] + h * iv.stride[1] + n];
          if (t < -1 || t >= len)
            return sals_set_error(INVALID, "idx[%lld, %lld, %lld]: %d not a token of 0..%lld "
                                  "(or -1)", (long long)b, (long long)h, (long long)n, (int)t,
                                  (long long)len - 1);
        }
    }
  if (sals_view_numel(&ov) == 0) return SALS_OK;
  const float s = scale > 0.0f ? scale : 1.0f / sqrtf((float)qv.shape[2]);
  return SALS_DISPATCH(dev, sparse_attention, &qv, &kv, &vv, idx ? &iv : NULL,
                       lengths ? &lv : NULL, s, &ov, stream);
}

static sals_status_t check_quant(int32_t bits, int32_t group, int64_t D) {
  if (bits != 2 && bits != 4 && bits != 8)
    return sals_set_error(INVALID, "bits: %d not one of 2, 4, 8", (int)bits);
  if (group < 1 || D % group != 0)
    return sals_set_error(INVALID, "group: %d does not divide the row length %lld", (int)group,
                          (long long)D);
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
  TRY(check_quant(bits, group, D));
  TRY(dim_eq(pv, "packed", 0, vv, vn, 0));
  TRY(sals_check_dim(pv, "packed", 1, D * bits / 8, "D * bits / 8"));
  TRY(dim_eq(sv, "scale", 0, vv, vn, 0));
  TRY(sals_check_dim(sv, "scale", 1, D / group, "D / group"));
  TRY(dim_eq(zv, "zero", 0, vv, vn, 0));
  TRY(sals_check_dim(zv, "zero", 1, D / group, "D / group"));
  return SALS_OK;
}

sals_status_t sals_quantize_values(const DLTensor* v, int32_t bits, int32_t group,
                                   DLTensor* packed, DLTensor* scale, DLTensor* zero,
                                   void* stream) {
  sals_view_t vv, pv, sv, zv;
  DLDevice dev;
  TRY(first_arg(v, "v", 2, SALS_ACCEPT_FLOAT, &vv, &dev));
  TRY(arg(packed, "packed", 2, SALS_ACCEPT_U8, &pv, &dev, "v"));
  TRY(arg(scale, "scale", 2, SALS_ACCEPT_F16, &sv, &dev, "v"));
  TRY(arg(zero, "zero", 2, SALS_ACCEPT_F16, &zv, &dev, "v"));
  TRY(check_packed(&vv, "v", &pv, &sv, &zv, bits, group));
  TRY(no_overlap(&pv, "packed", &vv, "v"));
  TRY(no_overlap(&sv, "scale", &vv, "v"));
  TRY(no_overlap(&zv, "zero", &vv, "v"));
  TRY(no_overlap(&sv, "scale", &pv, "packed"));
  TRY(no_overlap(&zv, "zero", &pv, "packed"));
  TRY(no_overlap(&zv, "zero", &sv, "scale"));
  if (sals_view_numel(&vv) == 0) return SALS_OK;
  return SALS_DISPATCH(dev, quantize_values, &vv, bits, group, &pv, &sv, &zv, stream);
}

sals_status_t sals_dequantize_values(const DLTensor* packed, const DLTensor* scale,
                                     const DLTensor* zero, int32_t bits, int32_t group,
                                     DLTensor* out, void* stream) {
  sals_view_t pv, sv, zv, ov;
  DLDevice dev;
  TRY(first_arg(packed, "packed", 2, SALS_ACCEPT_U8, &pv, &dev));
  TRY(arg(scale, "scale", 2, SALS_ACCEPT_F16, &sv, &dev, "packed"));
  TRY(arg(zero, "zero", 2, SALS_ACCEPT_F16, &zv, &dev, "packed"));
  TRY(arg(out, "out", 2, SALS_ACCEPT_FLOAT, &ov, &dev, "packed"));
  TRY(check_packed(&ov, "out", &pv, &sv, &zv, bits, group));
  TRY(no_overlap(&ov, "out", &pv, "packed"));
  TRY(no_overlap(&ov, "out", &sv, "scale"));
  TRY(no_overlap(&ov, "out", &zv, "zero"));
  if (sals_view_numel(&ov) == 0) return SALS_OK;
  return SALS_DISPATCH(dev, dequantize_values, &pv, &sv, &zv, bits, group, &ov, stream);
}
