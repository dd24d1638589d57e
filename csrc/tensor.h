/*
 * DLTensor validation for the ABI layer (csrc/api.c, csrc/cache.c). Not API.
 * Every check records a message naming the argument and returns a status.
 */
#ifndef SALS_TENSOR_H_
#define SALS_TENSOR_H_

#include "internal.h"

/* Bit masks of accepted element types (1u << sals_elem_t). */
#define SALS_ACCEPT_FLOAT ((1u << SALS_ELEM_F32) | (1u << SALS_ELEM_F16) | (1u << SALS_ELEM_BF16))
#define SALS_ACCEPT_I32 (1u << SALS_ELEM_I32)
#define SALS_ACCEPT_U8 (1u << SALS_ELEM_U8)
#define SALS_ACCEPT_F16 (1u << SALS_ELEM_F16)

/** Elements of a view (product of its shape). */
int64_t sals_view_numel(const sals_view_t* v);

/** "cpu" or "cuda:N" into buf (at least 24 bytes); returns buf. */
const char* sals_device_str(DLDevice dev, char* buf);

/**
 * Check `t` (named `name` in messages) and fill *v and *dev: not NULL, `ndim` dims, an accepted
 * dtype with one lane, a supported device (pinned host memory counts as cpu), non-negative
 * extents and, when there are elements, data present and aligned to the element size, strides
 * spanning less than 2^48 elements, last dimension contiguous. A view without elements accepts
 * any strides and gets compact ones.
 */
sals_status_t sals_view_make(const DLTensor* t, const char* name, int32_t ndim, uint32_t accept,
                             sals_view_t* v, DLDevice* dev);

/** Fail unless `dev` equals `want` ("k: on cuda:0 but the cache is on cpu"). */
sals_status_t sals_check_device(const char* name, DLDevice dev, DLDevice want,
                                const char* want_name);

/** Fail unless v->shape[axis] == want ("v: dim 2 is 4, expected 8 (n_head_kv)"). */
sals_status_t sals_check_dim(const sals_view_t* v, const char* name, int32_t axis, int64_t want,
                             const char* what);

/** 1 if the memory spanned by the two views intersects (both non-empty). */
int sals_views_overlap(const sals_view_t* a, const sals_view_t* b);

/**
 * Fail unless every element of the output view has its own memory: no zero strides on dims of
 * extent > 1 and no overlapping rows ("out: elements overlap in memory ...").
 */
sals_status_t sals_check_output(const sals_view_t* v, const char* name);

/** 1 if a and b describe exactly the same elements (same data, type, shape and strides). */
int sals_views_same(const sals_view_t* a, const sals_view_t* b);

/** Check a rope description ("rope.rotary_dim: 130 > head_dim 128"). */
sals_status_t sals_check_rope(const sals_rope_t* rope, int64_t head_dim);

/**
 * Fail with SALS_ERR_UNSUPPORTED when `dev` is a CUDA device and the library was built
 * without CUDA ("q: on cuda:0 but the library was built without CUDA").
 */
sals_status_t sals_check_backend(const char* name, DLDevice dev);

/* One tensor of a stateless call; an `optional` one may be NULL (absent); an `output` is
 * written, so its elements may not share memory. */
typedef struct {
  const DLTensor* t;
  const char* name;
  int32_t ndim;
  uint32_t accept;
  sals_view_t* v;
  int optional;
  int output;
} sals_arg_t;

/**
 * Check a call's tensors in order and fill their views: the first decides the device (which
 * needs a backend), every other one must be on it; outputs get sals_check_output.
 */
sals_status_t sals_arg_views(const sals_arg_t* a, int n, DLDevice* dev);

/** Fail unless v->shape[axis] == ref->shape[ref_axis] ("k: dim 0 is 3, expected 2
 * (q.shape[0])"). */
sals_status_t sals_dim_eq(const sals_view_t* v, const char* name, int32_t axis,
                          const sals_view_t* ref, const char* ref_name, int32_t ref_axis);

/** Fail if the output `out` overlaps the input `in` ("out: overlaps q"). */
sals_status_t sals_no_overlap(const sals_view_t* out, const char* on, const sals_view_t* in,
                              const char* in_name);

/** The output a[i] overlaps none of the tensors listed before it (absent ones skipped). */
sals_status_t sals_arg_apart(const sals_arg_t* a, int i);

/**
 * Finiteness of float inputs in host memory: the first `n` elements of the row of `v` at the
 * leading indices ix[0 .. ndim-2] are finite, else SALS_ERR_NOT_FINITE ("k: holds NaN or
 * infinity at row [0, 3, 1]"). sals_finite_rows checks every row, sals_finite_all every element.
 */
sals_status_t sals_finite_row(const sals_view_t* v, const char* name, const int64_t* ix, int64_t n);
sals_status_t sals_finite_rows(const sals_view_t* v, const char* name, int64_t n);
sals_status_t sals_finite_all(const sals_view_t* v, const char* name);

/** Call the backend entry point `fn` of device `dev`. */
#if defined(SALS_WITH_CUDA)
#define SALS_DISPATCH(dev, fn, ...) \
  ((dev).device_type == kDLCUDA ? sals_cuda_##fn(__VA_ARGS__) : sals_cpu_##fn(__VA_ARGS__))
#else
#define SALS_DISPATCH(dev, fn, ...) sals_cpu_##fn(__VA_ARGS__)
#endif

#endif /* SALS_TENSOR_H_ */
