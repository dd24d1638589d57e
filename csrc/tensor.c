/* DLTensor -> sals_view_t validation; messages name the argument. */
#include "tensor.h"

#include "cpu/cpu.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

int64_t sals_view_numel(const sals_view_t* v) {
  int64_t n = 1;
  for (int32_t i = 0; i < v->ndim; ++i) n *= v->shape[i];
  return n;
}

const char* sals_device_str(DLDevice dev, char* buf) {
  switch ((int)dev.device_type) {
    case kDLCPU: snprintf(buf, 24, "cpu"); break;
    case kDLCUDA: snprintf(buf, 24, "cuda:%d", (int)dev.device_id); break;
    case kDLCUDAHost: snprintf(buf, 24, "cuda_host"); break;
    case kDLCUDAManaged: snprintf(buf, 24, "cuda_managed:%d", (int)dev.device_id); break;
    case kDLROCM: snprintf(buf, 24, "rocm:%d", (int)dev.device_id); break;
    case kDLMetal: snprintf(buf, 24, "metal:%d", (int)dev.device_id); break;
    default: snprintf(buf, 24, "device type %d", (int)dev.device_type); break;
  }
  return buf;
}

static const char* dtype_str(DLDataType t, char* buf) {
  static const char* const kinds[] = {"int",    "uint",    "float", "handle",
                                      "bfloat", "complex", "bool"};
  if (t.code <= kDLBool) snprintf(buf, 32, "%s%u", kinds[t.code], (unsigned)t.bits);
  else snprintf(buf, 32, "type code %u (%u bits)", (unsigned)t.code, (unsigned)t.bits);
  return buf;
}

static int elem_of(DLDataType t, sals_elem_t* out) {
  if (t.code == kDLFloat && t.bits == 32) *out = SALS_ELEM_F32;
  else if (t.code == kDLFloat && t.bits == 16) *out = SALS_ELEM_F16;
  else if (t.code == kDLBfloat && t.bits == 16) *out = SALS_ELEM_BF16;
  else if (t.code == kDLInt && t.bits == 32) *out = SALS_ELEM_I32;
  else if (t.code == kDLUInt && t.bits == 8) *out = SALS_ELEM_U8;
  else return 0;
  return 1;
}

static const char* accepted_str(uint32_t accept) {
  if (accept == SALS_ACCEPT_FLOAT) return "float32/float16/bfloat16";
  if (accept == SALS_ACCEPT_I32) return "int32";
  if (accept == SALS_ACCEPT_U8) return "uint8";
  if (accept == SALS_ACCEPT_F16) return "float16";
  return "see sals.h";
}

sals_status_t sals_view_make(const DLTensor* t, const char* name, int32_t ndim, uint32_t accept,
                             sals_view_t* v, DLDevice* dev) {
  char buf[32];
  if (t == NULL) return sals_set_error(SALS_ERR_INVALID_ARGUMENT, "%s: is NULL", name);
  if (t->ndim != ndim)
    return sals_set_error(SALS_ERR_INVALID_ARGUMENT, "%s: expected %d dims, got %d", name,
                          (int)ndim, (int)t->ndim);
  if (t->dtype.lanes != 1)
    return sals_set_error(SALS_ERR_INVALID_ARGUMENT,
                          "%s: vector dtype with %u lanes not supported (lanes must be 1)", name,
                          (unsigned)t->dtype.lanes);
  sals_elem_t elem;
  if (!elem_of(t->dtype, &elem) || !(accept & (1u << elem)))
    return sals_set_error(SALS_ERR_INVALID_ARGUMENT, "%s: dtype %s not supported (%s)", name,
                          dtype_str(t->dtype, buf), accepted_str(accept));
  DLDevice d = t->device;
  if (d.device_type == kDLCUDAHost) d.device_type = kDLCPU; /* host-accessible pinned memory */
  if (d.device_type == kDLCPU) d.device_id = 0;
  if (d.device_type != kDLCPU && d.device_type != kDLCUDA)
    return sals_set_error(SALS_ERR_UNSUPPORTED, "%s: on %s, not supported (cpu, cuda)", name,
                          sals_device_str(t->device, buf));
  if (d.device_type == kDLCUDA && d.device_id < 0)
    return sals_set_error(SALS_ERR_INVALID_ARGUMENT, "%s: invalid CUDA device ordinal %d", name,
                          (int)d.device_id);
  if (ndim > 0 && t->shape == NULL)
    return sals_set_error(SALS_ERR_INVALID_ARGUMENT, "%s: shape is NULL", name);
  /* Elements (and so byte offsets) must fit comfortably in 63 bits. */
  const int64_t limit = (int64_t)1 << 48;
  int64_t numel = 1;
  for (int32_t i = 0; i < ndim; ++i) {
    if (t->shape[i] < 0)
      return sals_set_error(SALS_ERR_INVALID_ARGUMENT, "%s: dim %d has negative extent %lld", name,
                            (int)i, (long long)t->shape[i]);
    if (t->shape[i] > limit || (numel > 0 && t->shape[i] > limit / numel))
      return sals_set_error(SALS_ERR_INVALID_ARGUMENT, "%s: too many elements", name);
    numel *= t->shape[i];
  }
  /* Element 0 is at data + byte_offset: bound the offset like the strides, so that it can
   * neither overflow the address arithmetic below nor point far past any allocation. */
  const size_t es = sals_elem_size(elem);
  if (t->byte_offset > (uint64_t)limit * es)
    return sals_set_error(SALS_ERR_INVALID_ARGUMENT,
                          "%s: byte_offset %llu points past the data (more than 2^48 elements "
                          "beyond data)",
                          name, (unsigned long long)t->byte_offset);
  memset(v, 0, sizeof *v);
  v->elem = elem;
  v->ndim = ndim;
  int64_t compact = 1;
  for (int32_t i = ndim - 1; i >= 0; --i) {
    v->shape[i] = t->shape[i];
    v->stride[i] = compact;
    compact *= t->shape[i];
  }
  if (numel == 0) {
    /* Nothing is read or written: any strides and any data pointer are fine (numpy gives
     * empty arrays zero strides), and the view gets compact ones. */
    v->data = t->data == NULL ? NULL : (void*)((char*)t->data + t->byte_offset);
    if (dev) *dev = d;
    return SALS_OK;
  }
  if (t->strides != NULL) {
    int64_t span = 0;
    for (int32_t i = 0; i < ndim; ++i) {
      const int64_t s = t->strides[i];
      if (s > limit || s < -limit)
        return sals_set_error(SALS_ERR_INVALID_ARGUMENT, "%s: stride %lld of dim %d too large",
                              name, (long long)s, (int)i);
      const int64_t reach = t->shape[i] - 1, mag = s < 0 ? -s : s;
      if (reach > 0 && mag > (limit - span) / reach)
        return sals_set_error(SALS_ERR_INVALID_ARGUMENT, "%s: strides span more than 2^48 elements",
                              name);
      span += reach * mag;
      v->stride[i] = s;
    }
  }
  if (ndim > 0 && v->shape[ndim - 1] > 1 && v->stride[ndim - 1] != 1)
    return sals_set_error(SALS_ERR_INVALID_ARGUMENT,
                          "%s: last dimension must be contiguous (stride 1), got %lld", name,
                          (long long)v->stride[ndim - 1]);
  if (ndim > 0) v->stride[ndim - 1] = 1;
  if (t->data == NULL)
    return sals_set_error(SALS_ERR_INVALID_ARGUMENT, "%s: data is NULL but it has %lld elements",
                          name, (long long)numel);
  /* The bytes the view reaches, relative to data: [lo, hi). Both fit int64 (bounded above). */
  int64_t lo = (int64_t)t->byte_offset, hi = lo + (int64_t)es;
  for (int32_t i = 0; i < ndim; ++i) {
    const int64_t reach = (v->shape[i] - 1) * v->stride[i] * (int64_t)es;
    if (reach < 0) lo += reach;
    else hi += reach;
  }
  const uintptr_t base = (uintptr_t)t->data;
  if ((lo < 0 && base < (uintptr_t)-lo) || (uintptr_t)hi > UINTPTR_MAX - base)
    return sals_set_error(SALS_ERR_INVALID_ARGUMENT,
                          "%s: data %#llx + byte_offset %llu and the strides reach outside "
                          "the address space",
                          name, (unsigned long long)base, (unsigned long long)t->byte_offset);
  const uintptr_t addr = base + (uintptr_t)t->byte_offset;
  if (addr % es != 0)
    return sals_set_error(SALS_ERR_INVALID_ARGUMENT,
                          "%s: data + byte_offset (byte_offset %llu) is not aligned to the %zu "
                          "bytes of a %s element",
                          name, (unsigned long long)t->byte_offset, es, dtype_str(t->dtype, buf));
  v->data = (void*)addr;
  if (dev) *dev = d;
  return SALS_OK;
}

sals_status_t sals_check_device(const char* name, DLDevice dev, DLDevice want,
                                const char* want_name) {
  char a[32], b[32];
  if (dev.device_type == want.device_type && dev.device_id == want.device_id) return SALS_OK;
  return sals_set_error(SALS_ERR_INVALID_ARGUMENT, "%s: on %s but %s is on %s", name,
                        sals_device_str(dev, a), want_name, sals_device_str(want, b));
}

sals_status_t sals_check_dim(const sals_view_t* v, const char* name, int32_t axis, int64_t want,
                             const char* what) {
  if (v->shape[axis] == want) return SALS_OK;
  return sals_set_error(SALS_ERR_INVALID_ARGUMENT, "%s: dim %d is %lld, expected %lld (%s)", name,
                        (int)axis, (long long)v->shape[axis], (long long)want, what);
}

/* Byte range [lo, hi) touched by a non-empty view. */
static void view_span(const sals_view_t* v, uintptr_t* lo, uintptr_t* hi) {
  int64_t first = 0, last = 0;
  for (int32_t i = 0; i < v->ndim; ++i) {
    int64_t reach = (v->shape[i] - 1) * v->stride[i];
    if (reach < 0) first += reach;
    else last += reach;
  }
  size_t es = sals_elem_size(v->elem);
  *lo = (uintptr_t)v->data + (intptr_t)(first * (int64_t)es);
  *hi = (uintptr_t)v->data + (intptr_t)((last + 1) * (int64_t)es);
}

int sals_views_overlap(const sals_view_t* a, const sals_view_t* b) {
  if (sals_view_numel(a) == 0 || sals_view_numel(b) == 0) return 0;
  uintptr_t alo, ahi, blo, bhi;
  view_span(a, &alo, &ahi);
  view_span(b, &blo, &bhi);
  return alo < bhi && blo < ahi;
}

sals_status_t sals_check_output(const sals_view_t* v, const char* name) {
  if (sals_view_numel(v) == 0) return SALS_OK;
  /* Dims of extent > 1 by increasing |stride|: each must step past everything the smaller
   * ones reach, so no two elements share memory (zero strides, expand, overlapping rows). */
  int32_t order[SALS_MAX_DIMS], n = 0;
  for (int32_t i = 0; i < v->ndim; ++i)
    if (v->shape[i] > 1) order[n++] = i;
  for (int32_t i = 1; i < n; ++i)
    for (int32_t j = i; j > 0; --j) {
      const int64_t a = v->stride[order[j - 1]], b = v->stride[order[j]];
      if ((a < 0 ? -a : a) <= (b < 0 ? -b : b)) break;
      const int32_t tmp = order[j];
      order[j] = order[j - 1];
      order[j - 1] = tmp;
    }
  int64_t reach = 0;
  for (int32_t i = 0; i < n; ++i) {
    const int64_t s = v->stride[order[i]], mag = s < 0 ? -s : s;
    if (mag <= reach)
      return sals_set_error(SALS_ERR_INVALID_ARGUMENT,
                            "%s: elements overlap in memory (dim %d has stride %lld): an output "
                            "needs a distinct element for every index",
                            name, (int)order[i], (long long)s);
    reach += (v->shape[order[i]] - 1) * mag;
  }
  return SALS_OK;
}

int sals_views_same(const sals_view_t* a, const sals_view_t* b) {
  if (a->data != b->data || a->elem != b->elem || a->ndim != b->ndim) return 0;
  for (int32_t i = 0; i < a->ndim; ++i)
    if (a->shape[i] != b->shape[i] || (a->shape[i] > 1 && a->stride[i] != b->stride[i])) return 0;
  return 1;
}

sals_status_t sals_check_rope(const sals_rope_t* rope, int64_t head_dim) {
  if (rope == NULL) return sals_set_error(SALS_ERR_INVALID_ARGUMENT, "rope: is NULL");
  if (rope->rotary_dim < 0 || rope->rotary_dim % 2 != 0)
    return sals_set_error(SALS_ERR_INVALID_ARGUMENT, "rope.rotary_dim: %d must be even and >= 0",
                          (int)rope->rotary_dim);
  if (rope->rotary_dim > head_dim)
    return sals_set_error(SALS_ERR_INVALID_ARGUMENT, "rope.rotary_dim: %d > head_dim %lld",
                          (int)rope->rotary_dim, (long long)head_dim);
  if (rope->interleaved != 0 && rope->interleaved != 1)
    return sals_set_error(SALS_ERR_INVALID_ARGUMENT, "rope.interleaved: %d must be 0 or 1",
                          (int)rope->interleaved);
  if (!isfinite(rope->attention_scaling))
    return sals_set_error(SALS_ERR_INVALID_ARGUMENT, "rope.attention_scaling: not finite");
  if (rope->rotary_dim > 0) {
    if (rope->inv_freq == NULL)
      return sals_set_error(SALS_ERR_INVALID_ARGUMENT,
                            "rope.inv_freq: is NULL but rotary_dim is %d", (int)rope->rotary_dim);
    for (int32_t i = 0; i < rope->rotary_dim / 2; ++i)
      if (!isfinite(rope->inv_freq[i]))
        return sals_set_error(SALS_ERR_INVALID_ARGUMENT, "rope.inv_freq[%d]: not finite", (int)i);
  }
  return SALS_OK;
}

sals_status_t sals_check_backend(const char* name, DLDevice dev) {
  char buf[32];
  if (dev.device_type != kDLCUDA) return SALS_OK;
#if defined(SALS_WITH_CUDA)
  /* A CUDA build runs on machines without a driver or GPU: say so instead of a runtime code. */
  if (sals_cuda_device_usable()) return SALS_OK;
  return sals_set_error(SALS_ERR_DEVICE,
                        "%s: on %s but no usable CUDA device (driver or GPU missing)", name,
                        sals_device_str(dev, buf));
#else
  return sals_set_error(SALS_ERR_UNSUPPORTED, "%s: on %s but the library was built without CUDA",
                        name, sals_device_str(dev, buf));
#endif
}

/* ---- a call's tensor arguments -------------------------------------------------------------- */

#define INVALID SALS_ERR_INVALID_ARGUMENT

static int absent(const sals_arg_t* a) { return a->optional && a->t == NULL; }

/* Check a call's tensors in order and fill their views: the first decides the device (which
 * needs a backend), every other one must be on it. */
sals_status_t sals_arg_views(const sals_arg_t* a, int n, DLDevice* dev) {
  SALS_TRY(sals_view_make(a[0].t, a[0].name, a[0].ndim, a[0].accept, a[0].v, dev));
  SALS_TRY(sals_check_backend(a[0].name, *dev));
  for (int i = 1; i < n; ++i) {
    if (absent(&a[i])) continue;
    DLDevice d;
    SALS_TRY(sals_view_make(a[i].t, a[i].name, a[i].ndim, a[i].accept, a[i].v, &d));
    SALS_TRY(sals_check_device(a[i].name, d, *dev, a[0].name));
    if (a[i].output) SALS_TRY(sals_check_output(a[i].v, a[i].name));
  }
  return SALS_OK;
}

sals_status_t sals_dim_eq(const sals_view_t* v, const char* name, int32_t axis,
                          const sals_view_t* ref, const char* ref_name, int32_t ref_axis) {
  if (v->shape[axis] == ref->shape[ref_axis]) return SALS_OK;
  return sals_set_error(INVALID, "%s: dim %d is %lld, expected %lld (%s.shape[%d])", name,
                        (int)axis, (long long)v->shape[axis], (long long)ref->shape[ref_axis],
                        ref_name, (int)ref_axis);
}

sals_status_t sals_no_overlap(const sals_view_t* out, const char* on, const sals_view_t* in,
                              const char* in_name) {
  if (!sals_views_overlap(out, in)) return SALS_OK;
  return sals_set_error(INVALID, "%s: overlaps %s", on, in_name);
}

/* The output a[i] overlaps none of the tensors listed before it. */
sals_status_t sals_arg_apart(const sals_arg_t* a, int i) {
  for (int j = 0; j < i; ++j)
    if (!absent(&a[j])) SALS_TRY(sals_no_overlap(a[i].v, a[i].name, a[j].v, a[j].name));
  return SALS_OK;
}

/*
 * Finiteness of float inputs in host memory: the first `n` elements of the row of `v` at the
 * leading indices ix[0 .. ndim-2] must be finite ("k: holds NaN or infinity at row [0, 3, 1]").
 * Only the elements a function reads are checked, so padding beyond `lengths` may hold anything.
 * CUDA inputs are not checked here (that would need a device pass and a host synchronisation).
 */
sals_status_t sals_finite_row(const sals_view_t* v, const char* name, const int64_t* ix,
                              int64_t n) {
  int64_t off = 0;
  for (int32_t i = 0; i + 1 < v->ndim; ++i) off += ix[i] * v->stride[i];
  if (sals_all_finite((const char*)v->data + off * (int64_t)sals_elem_size(v->elem), v->elem, n))
    return SALS_OK;
  if (v->ndim == 2)
    return sals_set_error(SALS_ERR_NOT_FINITE, "%s: holds NaN or infinity at row %lld", name,
                          (long long)ix[0]);
  char at[96];
  int len = snprintf(at, sizeof at, "[%lld", (long long)ix[0]);
  for (int32_t i = 1; i + 1 < v->ndim; ++i)
    len += snprintf(at + len, sizeof at - (size_t)len, ", %lld", (long long)ix[i]);
  return sals_set_error(SALS_ERR_NOT_FINITE, "%s: holds NaN or infinity at row %s]", name, at);
}

/* The first `n` elements of every row of a host view are finite. */
sals_status_t sals_finite_rows(const sals_view_t* v, const char* name, int64_t n) {
  int64_t rows = 1, ix[SALS_MAX_DIMS] = {0};
  for (int32_t i = 0; i + 1 < v->ndim; ++i) rows *= v->shape[i];
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = v->ndim - 2, rest = r; i >= 0; --i) {
      ix[i] = rest % v->shape[i];
      rest /= v->shape[i];
    }
    SALS_TRY(sals_finite_row(v, name, ix, n));
  }
  return SALS_OK;
}

sals_status_t sals_finite_all(const sals_view_t* v, const char* name) {
  return sals_finite_rows(v, name, v->shape[v->ndim - 1]);
}
