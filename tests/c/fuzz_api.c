/*
 * A deterministic fuzz driver over every sals_* function: random DLTensor descriptions close to
 * a valid call (so that many calls pass validation and run the kernels) with random faults:
 * NULL tensors, shapes and data, absurd ndim, wrong dtypes and lanes, huge or negative extents,
 * zero, negative, padded, huge or non-unit last strides, misaligned byte_offset, foreign
 * devices, NaN/infinity/huge values, out-of-range indices; random configs, ropes and
 * projections for caches. Every call must return a status (no crash: run it under
 * tests/c/run_sanitized.sh) and a failed call must leave a message in sals_last_error().
 *   fuzz_api [iterations] [seed]     (default 3000 iterations per function group, seed 1)
 * Memory described by a tensor is always backed (allocated for the span its strides reach)
 * unless it is too large, in which case the tensor has no data (so a valid-looking huge tensor
 * must be refused, never read).
 */
#include "util.h"

#define MAX_T 8 /* tensors per call */

static uint64_t g_state = 1;
static uint64_t next_u64(void) {
  g_state ^= g_state << 13;
  g_state ^= g_state >> 7;
  g_state ^= g_state << 17;
  return g_state;
}
static int64_t rnd(int64_t n) { return n > 0 ? (int64_t)(next_u64() % (uint64_t)n) : 0; }
static int chance(int percent) { return rnd(100) < percent; }

/* What a tensor's values should look like when it is backed. */
typedef enum { V_FLOAT, V_INDEX, V_LENGTH, V_POS, V_BYTES } values_t;

typedef struct {
  DLTensor t;
  int64_t shape[8];
  int64_t strides[8];
  void* buf;     /* owned backing memory */
  int is_null;   /* the call gets a NULL pointer */
} ftensor_t;

typedef struct {
  ftensor_t x[MAX_T];
  int n;
  int fault; /* percentage of fault injection for this call */
} call_t;

static DLTensor* P(ftensor_t* f) { return f->is_null ? NULL : &f->t; }

static size_t dtype_bytes(DLDataType d) {
  return (size_t)(d.bits + 7) / 8 * (d.lanes ? d.lanes : 1);
}

static float rand_float(void) {
  const int64_t r = rnd(1000);
  if (r < 2) return NAN;
  if (r < 4) return r == 2 ? INFINITY : -INFINITY;
  if (r < 8) return (float)(urand() * 1e6);  /* beyond float16 */
  if (r < 9) return (float)(urand() * 3e38);
  return (float)urand();
}

/* Values through memcpy: a misaligned byte_offset leaves the elements misaligned. */
static void fill_values(void* p, DLDataType d, int64_t n, values_t kind, int64_t bound) {
  char* at = (char*)p;
  for (int64_t i = 0; i < n; ++i) {
    if (d.code == kDLFloat && d.bits == 32 && d.lanes == 1) {
      const float f = rand_float();
      memcpy(at + 4 * i, &f, 4);
    } else if ((d.code == kDLFloat || d.code == kDLBfloat) && d.bits == 16 && d.lanes == 1) {
      const float f = rand_float();
      uint32_t u;
      memcpy(&u, &f, 4);
      const uint16_t h = d.code == kDLFloat ? to_f16(f) : (uint16_t)(u >> 16);
      memcpy(at + 2 * i, &h, 2);
    } else if (d.code == kDLInt && d.bits == 32 && d.lanes == 1) {
      int32_t v;
      switch (kind) {
        case V_INDEX: v = (int32_t)(rnd(bound + 3) - 2); break;         /* -2 .. bound */
        case V_LENGTH: v = (int32_t)(rnd(bound + 2) - (chance(3) ? 1 : 0)); break;
        case V_POS: v = chance(10) ? -1 : (int32_t)rnd(bound + 1); break;
        default: v = (int32_t)rnd(256); break;
      }
      if (chance(1)) v = chance(50) ? INT32_MAX : INT32_MIN;
      memcpy(at + 4 * i, &v, 4);
    } else {
      const size_t es = dtype_bytes(d);
      for (size_t b = 0; b < es; ++b) at[i * (int64_t)es + (int64_t)b] = (char)rnd(256);
    }
  }
}

/*
 * Describe a tensor like a valid argument (ndim dims of `shape`, dtype `dt`, on the CPU) and,
 * with the call's fault rate, break one or more of its fields; back it with memory when the
 * description is sane enough to have a span.
 */
static void make(call_t* c, ftensor_t* f, int ndim, const int64_t* shape, DLDataType dt,
                 values_t kind, int64_t bound) {
  memset(f, 0, sizeof *f);
  const int p = c->fault;
  f->is_null = chance(p / 8);
  DLTensor* t = &f->t;
  t->ndim = ndim;
  t->dtype = dt;
  t->device.device_type = kDLCPU;
  for (int i = 0; i < ndim; ++i) f->shape[i] = shape[i];
  t->shape = f->shape;
  t->strides = NULL;
  if (chance(p / 4)) { /* a wrong ndim: the library must not read past what the call expects */
    static const int32_t odd[] = {-1, -1000, 0, 1, 2, 3, 4, 5, 6, 8, 65, 1 << 30};
    t->ndim = odd[rnd(sizeof odd / sizeof odd[0])];
    if (t->ndim > 0 && t->ndim <= 8)
      for (int i = ndim; i < t->ndim; ++i) f->shape[i] = 1 + rnd(3);
  }
  if (chance(p / 3)) {
    static const DLDataType dts[] = {{kDLFloat, 32, 1}, {kDLFloat, 16, 1}, {kDLBfloat, 16, 1},
                                     {kDLInt, 32, 1},   {kDLUInt, 8, 1},   {kDLInt, 64, 1},
                                     {kDLFloat, 64, 1}, {kDLFloat, 32, 4}, {kDLBool, 8, 1},
                                     {99, 32, 1},       {kDLFloat, 32, 0}};
    t->dtype = dts[rnd(sizeof dts / sizeof dts[0])];
  }
  if (ndim > 0 && chance(p / 3)) { /* one extent wrong */
    static const int64_t ext[] = {0, -1, 1, 2, 3, 7, (int64_t)1 << 40, (int64_t)1 << 62, INT64_MAX};
    f->shape[rnd(ndim)] = ext[rnd(sizeof ext / sizeof ext[0])];
  }
  const int sane_ndim = t->ndim >= 0 && t->ndim <= 8;
  const int nd = sane_ndim ? t->ndim : 0;
  if (chance(30 + p / 2) && sane_ndim) { /* explicit strides */
    int64_t acc = 1;
    const int mode = (int)rnd(8);
    for (int i = nd - 1; i >= 0; --i) {
      const int64_t ext = f->shape[i] > 0 && f->shape[i] < 1000000 ? f->shape[i] : 1;
      f->strides[i] = acc;
      acc *= ext + (mode == 1 ? 1 + rnd(3) : 0); /* padded */
    }
    if (nd > 0) {
      const int d = (int)rnd(nd);
      switch (mode) {
        case 2: f->strides[d] = -f->strides[d]; break;               /* reversed */
        case 3: f->strides[d] = 0; break;                            /* broadcast */
        case 4: f->strides[nd - 1] = 2; break;                       /* not contiguous */
        case 5: f->strides[d] = (int64_t)1 << (40 + rnd(23)); break; /* huge */
        case 6:
          if (nd > 1) f->strides[0] = 1;
          break;                /* overlapping rows */
        default: break;
      }
    }
    t->strides = f->strides;
  }
  if (chance(p / 4)) {
    static const int32_t devs[] = {kDLCUDAHost, kDLVulkan, kDLOpenCL, kDLMetal, 77, kDLCUDA};
    t->device.device_type = (DLDeviceType)devs[rnd(sizeof devs / sizeof devs[0])];
    t->device.device_id = (int32_t)(rnd(3) - 1);
    /* Host memory claimed to be on a GPU would be handed to CUDA kernels by a CUDA build with
     * a usable device: only claim CUDA where the library cannot run it. */
    if (t->device.device_type == kDLCUDA && sals_cuda_available()) t->device.device_type = kDLCPU;
  }
  const size_t es = dtype_bytes(t->dtype);
  uint64_t offset =
      chance(p / 4) ? (uint64_t)(1 + rnd(3)) : (chance(20) ? es * (uint64_t)rnd(4) : 0);
  const int shape_null = nd > 0 && chance(p / 8);

  /* The span the description reaches, when it is small enough to back. */
  int backed = sane_ndim && es > 0;
  int64_t lo = 0, hi = 0, numel = 1;
  for (int i = 0; i < nd && backed; ++i) {
    const int64_t ext = f->shape[i];
    if (ext < 0 || ext > (1 << 20)) {
      backed = 0;
      break;
    }
    numel *= ext;
    if (numel > (1 << 22)) backed = 0;
    const int64_t s = t->strides ? f->strides[i] : 0;
    if (t->strides && (s > (1 << 24) || s < -(1 << 24))) backed = 0;
  }
  if (backed && numel > 0) {
    if (t->strides) {
      for (int i = 0; i < nd; ++i) {
        const int64_t reach = (f->shape[i] - 1) * f->strides[i];
        if (reach < 0) lo += reach;
        else hi += reach;
      }
    } else {
      hi = numel - 1;
    }
  }
  if (backed) {
    const int64_t n = numel > 0 ? hi - lo + 1 : 0;
    if (n * (int64_t)es > (16 << 20)) backed = 0;
    if (backed) {
      const size_t bytes = (size_t)n * es + offset + 16;
      f->buf = malloc(bytes);
      if (!f->buf) backed = 0;
    }
    if (backed) {
      fill_values((char*)f->buf + offset, t->dtype, n, kind, bound);
      /* data + byte_offset + lo * es is the lowest element. */
      t->data = (char*)f->buf - lo * (int64_t)es;
      t->byte_offset = offset;
    }
  }
  if (!backed) {
    /* Nothing real to point at: a tensor that might pass validation must not be read. */
    t->data = NULL;
    t->byte_offset = offset;
  }
  if (chance(p / 8)) t->data = NULL;
  if (shape_null) t->shape = NULL;
}

static void release(call_t* c) {
  for (int i = 0; i < c->n; ++i) free(c->x[i].buf);
  c->n = 0;
}

static ftensor_t* arg(call_t* c, int ndim, int64_t s0, int64_t s1, int64_t s2, int64_t s3,
                      DLDataType dt, values_t kind, int64_t bound) {
  const int64_t s[4] = {s0, s1, s2, s3};
  ftensor_t* f = &c->x[c->n++];
  make(c, f, ndim, s, dt, kind, bound);
  return f;
}

/*
 * Set a known last error before a call, so that a failure that forgets its message is caught:
 * "x: is NULL" before the calls that take `packed`, "packed: is NULL" before the others.
 */
static const char* sentinel(int has_packed) {
  static char copy[512];
  if (has_packed) sals_project(NULL, NULL, NULL, NULL);
  else sals_dequantize_values(NULL, NULL, NULL, 4, 32, NULL, NULL);
  snprintf(copy, sizeof copy, "%s", sals_last_error());
  return copy;
}

static int g_calls, g_ok;

/* Calls and successes per function, reported at the end. */
#define MAX_FNS 32
static const char* g_fn[MAX_FNS];
static int g_fn_calls[MAX_FNS], g_fn_ok[MAX_FNS], g_n_fns;

static void count(const char* fn, int ok) {
  int i = 0;
  while (i < g_n_fns && strcmp(g_fn[i], fn) != 0) ++i;
  if (i == g_n_fns && g_n_fns < MAX_FNS) g_fn[g_n_fns++] = fn;
  if (i < MAX_FNS) {
    g_fn_calls[i]++;
    g_fn_ok[i] += ok;
  }
}

static void check_status(const char* fn, sals_status_t st, const char* before, int may_repeat) {
  ++g_calls;
  count(fn, st == SALS_OK);
  CHECK(st >= SALS_OK && st <= SALS_ERR_DEVICE, "%s: status %d out of range", fn, (int)st);
  if (st == SALS_OK) {
    ++g_ok;
    return;
  }
  const char* msg = sals_last_error();
  CHECK(msg != NULL && msg[0] != '\0', "%s failed with %s and no message", fn,
        sals_status_string(st));
  CHECK(may_repeat || strcmp(msg, before) != 0,
        "%s failed with %s but left the previous message "
        "\"%s\"",
        fn, sals_status_string(st), msg);
}

static DLDataType any_float(void) {
  const int r = (int)rnd(3);
  return r == 0 ? F32 : (r == 1 ? F16 : BF16);
}

static float g_inv_freq[64];

static sals_rope_t make_rope(int fault, int64_t head_dim) {
  sals_rope_t r;
  r.rotary_dim = (int32_t)(2 * rnd(head_dim / 2 + 1));
  r.inv_freq = g_inv_freq;
  r.attention_scaling = 1.0f;
  r.interleaved = (int32_t)rnd(2);
  if (chance(fault / 4)) r.rotary_dim = (int32_t)(rnd(3) == 0 ? -2 : (rnd(2) ? 3 : head_dim + 2));
  if (r.rotary_dim > 128) r.rotary_dim = 128; /* g_inv_freq holds 64 */
  if (chance(fault / 6)) r.inv_freq = NULL;
  if (chance(fault / 6)) r.attention_scaling = NAN;
  if (chance(fault / 6)) r.interleaved = 2;
  return r;
}

/* ---- stateless functions ------------------------------------------------------------------ */

static void fuzz_stateless(int fault) {
  call_t c = {.n = 0, .fault = fault};
  const int64_t N = rnd(6), D = 1 + rnd(12), R = 1 + rnd(6);
  const char* before;
  switch ((int)rnd(7)) {
    case 0: {
      ftensor_t* x = arg(&c, 2, N, D, 0, 0, any_float(), V_FLOAT, 0);
      ftensor_t* p = arg(&c, 2, D, R, 0, 0, any_float(), V_FLOAT, 0);
      ftensor_t* o = arg(&c, 2, N, R, 0, 0, any_float(), V_FLOAT, 0);
      before = sentinel(0);
      check_status("sals_project", sals_project(P(x), P(p), P(o), NULL), before, 0);
    } break;
    case 1: {
      const int64_t H = 1 + rnd(3), d = 2 * (1 + rnd(5));
      ftensor_t* x = arg(&c, 3, N, H, d, 0, any_float(), V_FLOAT, 0);
      ftensor_t* ps = arg(&c, 1, N, 0, 0, 0, I32, V_POS, 100);
      const int in_place = chance(30);
      ftensor_t* o = in_place ? x : arg(&c, 3, N, H, d, 0, any_float(), V_FLOAT, 0);
      sals_rope_t rope = make_rope(fault, d);
      before = sentinel(0);
      check_status("sals_rope_apply",
                   sals_rope_apply(P(x), P(ps), chance(fault / 8) ? NULL : &rope, P(o), NULL),
                   before, 0);
    } break;
    case 2: {
      const int64_t B = rnd(3), H = 1 + rnd(2), S = rnd(20);
      const int32_t n_sink = (int32_t)rnd(3) - (chance(fault / 8) ? 3 : 0),
                    n_recent = (int32_t)rnd(3);
      const int32_t budget = (int32_t)(rnd(S + 2)) - (chance(fault / 8) ? 1 : 0);
      const int32_t score_rank = (int32_t)(1 + rnd(R + 1)) - (chance(fault / 8) ? 2 : 0);
      ftensor_t* q = arg(&c, 3, B, H, R, 0, any_float(), V_FLOAT, 0);
      ftensor_t* k = arg(&c, 3, B, S, R, 0, any_float(), V_FLOAT, 0);
      ftensor_t* l = chance(50) ? arg(&c, 1, B, 0, 0, 0, I32, V_LENGTH, S) : NULL;
      ftensor_t* i = arg(&c, 3, B, H, budget > 0 ? budget : 1, 0, I32, V_BYTES, 0);
      before = sentinel(0);
      check_status("sals_score_select",
                   sals_score_select(P(q), P(k), l ? P(l) : NULL, score_rank, n_sink, n_recent,
                                     budget, P(i), NULL),
                   before, 0);
    } break;
    case 3: {
      const int64_t H = 1 + rnd(3), d = 2 * (1 + rnd(4));
      ftensor_t* k = arg(&c, 2, N, R, 0, 0, any_float(), V_FLOAT, 0);
      ftensor_t* p = arg(&c, 2, H * d, R, 0, 0, any_float(), V_FLOAT, 0);
      ftensor_t* ps = arg(&c, 1, N, 0, 0, 0, I32, V_POS, 100);
      ftensor_t* o = arg(&c, 3, N, H, d, 0, any_float(), V_FLOAT, 0);
      sals_rope_t rope = make_rope(fault, d);
      before = sentinel(0);
      check_status(
          "sals_rebuild_rope",
          sals_rebuild_rope(P(k), P(p), P(ps), chance(fault / 8) ? NULL : &rope, P(o), NULL),
          before, 0);
    } break;
    case 4: {
      const int64_t B = rnd(3), Hkv = 1 + rnd(2), G = 1 + rnd(2), S = rnd(10), d = 1 + rnd(8);
      const int64_t Hi = chance(50) ? 1 : Hkv, Ni = rnd(6);
      ftensor_t* q = arg(&c, 3, B, Hkv * G, d, 0, any_float(), V_FLOAT, 0);
      ftensor_t* k = arg(&c, 4, B, S, Hkv, d, any_float(), V_FLOAT, 0);
      ftensor_t* v = arg(&c, 4, B, S, Hkv, d, any_float(), V_FLOAT, 0);
      ftensor_t* i = chance(60) ? arg(&c, 3, B, Hi, Ni, 0, I32, V_INDEX, S) : NULL;
      ftensor_t* l = chance(50) ? arg(&c, 1, B, 0, 0, 0, I32, V_LENGTH, S) : NULL;
      ftensor_t* o = arg(&c, 3, B, Hkv * G, d, 0, any_float(), V_FLOAT, 0);
      const float scale = chance(fault / 8) ? (chance(50) ? -1.0f : NAN) : (float)rnd(2) * 0.25f;
      before = sentinel(0);
      check_status("sals_sparse_attention",
                   sals_sparse_attention(P(q), P(k), P(v), i ? P(i) : NULL, l ? P(l) : NULL, scale,
                                         P(o), NULL),
                   before, 0);
    } break;
    case 5:
    case 6: {
      static const int32_t bitss[] = {2, 4, 8, 3, 16, 0};
      const int32_t bits = bitss[chance(fault / 4) ? rnd(6) : rnd(3)];
      const int32_t group = chance(fault / 4) ? (int32_t)rnd(9) - 1 : 8 * (int32_t)(1 + rnd(2));
      const int64_t Dv = 16 * (1 + rnd(2));
      const int64_t W = bits > 0 && bits <= 8 ? Dv * bits / 8 : Dv;
      const int64_t Gn = group > 0 ? Dv / group : 1;
      ftensor_t* v = arg(&c, 2, N, Dv, 0, 0, any_float(), V_FLOAT, 0);
      ftensor_t* pk = arg(&c, 2, N, W, 0, 0, U8, V_BYTES, 0);
      ftensor_t* sc = arg(&c, 2, N, Gn, 0, 0, F16, V_FLOAT, 0);
      ftensor_t* zr = arg(&c, 2, N, Gn, 0, 0, F16, V_FLOAT, 0);
      before = sentinel(1);
      check_status("sals_quantize_values",
                   sals_quantize_values(P(v), bits, group, P(pk), P(sc), P(zr), NULL), before, 0);
      before = sentinel(1);
      check_status("sals_dequantize_values",
                   sals_dequantize_values(P(pk), P(sc), P(zr), bits, group, P(v), NULL), before, 0);
    } break;
  }
  release(&c);
}

/* ---- caches -------------------------------------------------------------------------------- */

static sals_config_t make_config(int fault, float** U, DLTensor* proj, int64_t* pshape,
                                 DLDataType* pdt) {
  sals_config_t g = sals_config_default();
  g.n_head_kv = (int32_t)(1 + rnd(2));
  g.n_head_q = g.n_head_kv * (int32_t)(1 + rnd(2));
  g.head_dim = 8 * (int32_t)(1 + rnd(2));
  const int32_t dk = g.n_head_kv * g.head_dim;
  g.rank = (int32_t)(1 + rnd(dk));
  g.score_rank = (int32_t)(1 + rnd(g.rank));
  static const int32_t vb[] = {16, 8, 4, 2};
  g.value_bits = vb[rnd(4)];
  g.value_group = 8;
  static const int32_t kb[] = {16, 16, 8, 4};
  g.key_bits = kb[rnd(4)];
  g.key_group = 1;
  if (g.key_bits == 4) { /* 4-bit codes fill bytes in pairs: even parts, groups of 2 */
    g.rank += g.rank & 1;
    g.score_rank += g.score_rank & 1;
    g.key_group = 2;
  }
  g.n_sink = (int32_t)rnd(3);
  g.n_recent = (int32_t)rnd(4);
  g.budget_frac = 0.25f + 0.25f * (float)rnd(4);
  g.budget_tokens = chance(20) ? (int32_t)rnd(4) : 0;
  g.select_per_head = (int32_t)rnd(2);
  g.dense = chance(20);
  g.max_batch = (int32_t)(1 + rnd(2));
  g.max_tokens = (int32_t)(4 + rnd(24));
  g.dtype = (sals_dtype_t)rnd(3);
  g.check_finite = !chance(15);
  g.n_threads = (int32_t)rnd(3);
  if (chance(fault / 2)) { /* one bad field */
    switch ((int)rnd(14)) {
      case 0: g.n_head_q = (int32_t)rnd(5) - 1; break;
      case 1: g.n_head_kv = 0; break;
      case 2: g.rank = dk + 1; break;
      case 3: g.score_rank = g.rank + 1; break;
      case 4: g.value_bits = 3; break;
      case 5: g.value_group = 3; break;
      case 6: g.budget_frac = chance(50) ? 0.0f : NAN; break;
      case 7: g.max_tokens = chance(50) ? 0 : -5; break; /* (a huge one would be allocated) */
      case 8: g.dtype = (sals_dtype_t)7; break;
      case 9: g.device.device_type = kDLVulkan; break;
      case 10: g.scale = -1.0f; break;
      case 11: g.key_bits = 2; break;
      case 12: g.key_bits = 8, g.key_group = g.score_rank + 1; break;
      default: g.head_dim = INT32_MAX; break;
    }
  }
  /* The projection: the first `rank` coordinate axes (orthonormal), sometimes not. */
  const int64_t rows = g.n_head_kv > 0 && g.head_dim > 0 && g.head_dim < 4096 ? dk : 8;
  const int64_t cols = g.rank > 0 && g.rank <= rows ? g.rank : 1;
  *pdt = chance(fault / 4) ? F16 : F32;
  *U = (float*)calloc((size_t)(rows * cols), sizeof(float));
  for (int64_t j = 0; j < cols; ++j) (*U)[j * cols + j] = 1.0f;
  if (chance(fault / 4)) (*U)[0] = 2.0f;                          /* not unit norm */
  if (chance(fault / 6) && rows > 1) (*U)[cols] = 1.0f;            /* not orthogonal */
  if (chance(fault / 8)) (*U)[0] = NAN;
  if (pdt->bits == 16) {
    uint16_t* h = (uint16_t*)*U;
    for (int64_t i = 0; i < rows * cols; ++i) h[i] = to_f16((*U)[i]); /* in place, front first */
  }
  pshape[0] = rows;
  pshape[1] = cols;
  memset(proj, 0, sizeof *proj);
  proj->data = *U;
  proj->device.device_type = kDLCPU;
  proj->ndim = 2;
  proj->dtype = *pdt;
  proj->shape = pshape;
  return g;
}

static void fuzz_cache(int fault) {
  float* U = NULL;
  DLTensor proj;
  int64_t pshape[2];
  DLDataType pdt;
  sals_config_t g = make_config(fault, &U, &proj, pshape, &pdt);
  sals_rope_t rope = make_rope(fault, g.head_dim);
  sals_cache_t* cache = NULL;
  const char* before = sentinel(0);
  sals_status_t st =
      sals_cache_create(chance(fault / 10) ? NULL : &g, chance(fault / 10) ? NULL : &rope,
                        chance(fault / 10) ? NULL : &proj, &cache);
  check_status("sals_cache_create", st, before, 0);
  free(U);
  CHECK((st == SALS_OK) == (cache != NULL), "create: status %d with handle %p", (int)st,
        (void*)cache);
  if (cache == NULL) {
    /* NULL handles everywhere. */
    before = sentinel(0);
    check_status("sals_cache_reset", sals_cache_reset(NULL, NULL), before, 0);
    sals_cache_destroy(NULL);
    return;
  }
  const int64_t Hq = g.n_head_q, Hkv = g.n_head_kv, d = g.head_dim;
  for (int step = 0; step < 6; ++step) {
    call_t c = {.n = 0, .fault = fault};
    const int64_t B = rnd(g.max_batch + 1) + (chance(fault / 8) ? g.max_batch : 0);
    const int64_t T = rnd(5);
    sals_cache_t* h = chance(fault / 10) ? NULL : cache;
    /* half the appends and attends act on a range: first in 0..max_batch - B, or out of it */
    const int range = chance(50);
    const int64_t first =
        chance(fault / 8) ? rnd(2 * g.max_batch + 2) - g.max_batch - 1 : rnd(g.max_batch - B + 1);
    switch ((int)rnd(7)) {
      case 0:
      case 1: {
        ftensor_t* k = arg(&c, 4, B, T, Hkv, d, any_float(), V_FLOAT, 0);
        ftensor_t* v = arg(&c, 4, B, T, Hkv, d, any_float(), V_FLOAT, 0);
        ftensor_t* p = arg(&c, 2, B, T, 0, 0, I32, V_POS, 40);
        before = sentinel(0);
        if (range)
          check_status("sals_cache_append_range",
                       sals_cache_append_range(h, first, P(k), P(v), P(p), NULL), before, 0);
        else
          check_status("sals_cache_append", sals_cache_append(h, P(k), P(v), P(p), NULL), before,
                       0);
      } break;
      case 2:
      case 3: {
        const int64_t Tq = chance(60) ? 1 : T;
        ftensor_t* q = arg(&c, 4, B, Tq, Hq, d, any_float(), V_FLOAT, 0);
        ftensor_t* p = arg(&c, 2, B, Tq, 0, 0, I32, V_POS, 40);
        ftensor_t* o = chance(5) ? q : arg(&c, 4, B, Tq, Hq, d, any_float(), V_FLOAT, 0);
        before = sentinel(0);
        if (range)
          check_status("sals_cache_attend_range",
                       sals_cache_attend_range(h, first, P(q), P(p), P(o), NULL), before, 0);
        else
          check_status("sals_cache_attend", sals_cache_attend(h, P(q), P(p), P(o), NULL), before,
                       0);
      } break;
      case 4: {
        ftensor_t* o = arg(&c, 1, rnd(g.max_batch + 2), 0, 0, 0, I32, V_BYTES, 0);
        before = sentinel(0);
        check_status("sals_cache_lengths", sals_cache_lengths(h, P(o), NULL), before, 0);
      } break;
      case 5: {
        const int64_t Hs = g.select_per_head ? Hkv : 1;
        ftensor_t* i = arg(&c, 3, rnd(g.max_batch + 1), Hs + (chance(fault / 8) ? 1 : 0),
                           rnd(g.max_tokens + 1), 0, I32, V_BYTES, 0);
        ftensor_t* n = arg(&c, 1, i->shape[0], 0, 0, 0, I32, V_BYTES, 0);
        before = sentinel(0);
        check_status("sals_cache_selected", sals_cache_selected(h, P(i), P(n), NULL), before, 0);
      } break;
      default: {
        sals_memory_t m;
        sals_config_t got;
        before = sentinel(0);
        check_status("sals_cache_memory", sals_cache_memory(h, chance(fault / 8) ? NULL : &m, NULL),
                     before, 0);
        before = sentinel(0);
        check_status("sals_cache_get_config",
                     sals_cache_get_config(h, chance(fault / 8) ? NULL : &got), before, 0);
        if (chance(30)) {
          before = sentinel(0);
          check_status("sals_cache_reset", sals_cache_reset(h, NULL), before, 0);
        } else if (chance(30)) {
          before = sentinel(0);
          check_status(
              "sals_cache_reset_range",
              sals_cache_reset_range(h, first, rnd(g.max_batch + 2) - (range ? 0 : 1), NULL),
              before, 0);
        }
      } break;
    }
    release(&c);
  }
  sals_cache_destroy(cache);
}

/* ---- paged storage ------------------------------------------------------------------------ */

/* Element (i, j) of a backed int32 tensor of 1 or 2 dims (through its strides), or NULL. */
static char* i32_elem(ftensor_t* f, int64_t i, int64_t j) {
  DLTensor* t = &f->t;
  if (f->is_null || t->data == NULL || t->dtype.code != kDLInt || t->dtype.bits != 32 ||
      t->dtype.lanes != 1 || t->shape == NULL || (t->ndim != 1 && t->ndim != 2))
    return NULL;
  if (i >= t->shape[0] || (t->ndim == 2 && j >= t->shape[1])) return NULL;
  const int64_t s0 = t->strides ? t->strides[0] : (t->ndim == 2 ? t->shape[1] : 1);
  const int64_t s1 = t->ndim == 2 ? (t->strides ? t->strides[1] : 1) : 0;
  return (char*)t->data + t->byte_offset + (i * s0 + j * s1) * 4;
}

static void set_i32(ftensor_t* f, int64_t i, int64_t j, int32_t v) {
  char* at = i32_elem(f, i, j);
  if (at) memcpy(at, &v, 4); /* the offset may misalign it */
}

static void fuzz_paged(int fault) {
  float* U = NULL;
  DLTensor proj;
  int64_t pshape[2];
  DLDataType pdt;
  sals_config_t g = make_config(fault, &U, &proj, pshape, &pdt);
  sals_rope_t rope = make_rope(fault, g.head_dim);
  int64_t slot_bytes = 0;
  const char* before = sentinel(0);
  check_status("sals_paged_slot_bytes",
               sals_paged_slot_bytes(chance(fault / 10) ? NULL : &g,
                                     chance(fault / 10) ? NULL : &slot_bytes),
               before, 0);
  sals_paged_t* paged = NULL;
  before = sentinel(0);
  sals_status_t st =
      sals_paged_create(chance(fault / 10) ? NULL : &g, chance(fault / 10) ? NULL : &rope,
                        chance(fault / 10) ? NULL : &proj, &paged);
  check_status("sals_paged_create", st, before, 0);
  free(U);
  CHECK((st == SALS_OK) == (paged != NULL), "paged create: status %d with handle %p", (int)st,
        (void*)paged);
  if (paged == NULL) {
    before = sentinel(0);
    check_status("sals_paged_append",
                 sals_paged_append(NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL), before, 0);
    sals_paged_destroy(NULL);
    return;
  }
  sals_paged_slot_bytes(&g, &slot_bytes);
  const int64_t Hq = g.n_head_q, Hkv = g.n_head_kv, d = g.head_dim;
  const int64_t nb = 1 + rnd(6), bs = 1 + rnd(5), sb = slot_bytes + (chance(fault / 8) ? 1 : 0);
  const int64_t rows = 1 + rnd(8); /* rows of a call's window store */
  call_t pc = {.n = 0, .fault = fault / 4}; /* the pages outlive the steps */
  ftensor_t* pages = arg(&pc, 3, nb, bs, sb, 0, U8, V_BYTES, 0);
  for (int step = 0; step < 6; ++step) {
    call_t c = {.n = 0, .fault = fault};
    const sals_paged_t* h = chance(fault / 10) ? NULL : paged;
    if (rnd(2) == 0) {
      const int64_t N = rnd(5);
      ftensor_t* k = arg(&c, 3, N, Hkv, d, 0, any_float(), V_FLOAT, 0);
      ftensor_t* v = arg(&c, 3, N, Hkv, d, 0, any_float(), V_FLOAT, 0);
      ftensor_t* sm = arg(&c, 1, N, 0, 0, 0, I32, V_INDEX, nb * bs);
      const int store = chance(50); /* a window store of `rows` rows, or none */
      ftensor_t* wr = store ? arg(&c, 1, N, 0, 0, 0, I32, V_INDEX, rows) : NULL;
      ftensor_t* w = store ? arg(&c, 4, rows, 2, Hkv, d, any_float(), V_FLOAT, 0) : NULL;
      if (!chance(fault)) /* distinct slots and rows: most calls reach the kernels */
        for (int64_t n = 0; n < N; ++n) {
          set_i32(sm, n, 0, (int32_t)((n * 7 + step) % (nb * bs)));
          if (wr) set_i32(wr, n, 0, n < rows && chance(70) ? (int32_t)n : -1);
        }
      before = sentinel(0);
      check_status("sals_paged_append",
                   sals_paged_append(h, P(k), P(v), P(sm), P(pages), wr ? P(wr) : NULL,
                                     w ? P(w) : NULL, NULL),
                   before, 0);
    } else {
      const int64_t B = rnd(4), M = 1 + rnd(4), N = rnd(6);
      ftensor_t* q = arg(&c, 3, N, Hq, d, 0, any_float(), V_FLOAT, 0);
      ftensor_t* qs = arg(&c, 1, B + 1, 0, 0, 0, I32, V_LENGTH, N);
      ftensor_t* lens = arg(&c, 1, B, 0, 0, 0, I32, V_LENGTH, M * bs);
      ftensor_t* table = arg(&c, 2, B, M, 0, 0, I32, V_INDEX, nb);
      ftensor_t* out = chance(5) ? q : arg(&c, 3, N, Hq, d, 0, any_float(), V_FLOAT, 0);
      ftensor_t* sel = chance(50) ? NULL
                                  : arg(&c, 3, B, g.select_per_head ? Hkv : 1, rnd(M * bs + 1), 0,
                                        I32, V_BYTES, 0);
      const int store = chance(50);
      ftensor_t* wr = store ? arg(&c, 2, B, g.n_sink + g.n_recent, 0, 0, I32, V_INDEX, rows) : NULL;
      ftensor_t* w = store ? arg(&c, 4, rows, 2, Hkv, d, any_float(), V_FLOAT, 0) : NULL;
      if (!chance(fault)) { /* a consistent batch: most calls reach the kernels */
        int64_t at = 0;
        set_i32(qs, 0, 0, 0);
        for (int64_t b = 0; b < B; ++b) {
          const int64_t n_q = at < N ? rnd(N - at + 1) : 0;
          at += n_q;
          set_i32(qs, b + 1, 0, (int32_t)at);
          set_i32(lens, b, 0, (int32_t)(n_q + rnd(M * bs - n_q + 1)));
          for (int64_t j = 0; j < M; ++j) set_i32(table, b, j, (int32_t)rnd(nb));
        }
      }
      before = sentinel(0);
      check_status("sals_paged_attend",
                   sals_paged_attend(h, P(q), P(qs), P(lens), P(table), P(pages), wr ? P(wr) : NULL,
                                     w ? P(w) : NULL, P(out), sel ? P(sel) : NULL, NULL),
                   before, 0);
    }
    release(&c);
  }
  release(&pc);
  sals_paged_destroy(paged);
}

int main(int argc, char** argv) {
  const long iters = argc > 1 ? atol(argv[1]) : 3000;
  g_state = argc > 2 ? (uint64_t)atoll(argv[2]) * 0x9e3779b97f4a7c15ull + 1 : 0x2545f4914f6cdd1dull;
  for (int i = 0; i < 64; ++i) g_inv_freq[i] = (float)pow(10000.0, -2.0 * i / 128.0);
  /* Versions, status strings and defaults never fail. */
  for (int s = -3; s < 12; ++s)
    CHECK(sals_status_string((sals_status_t)s) != NULL, "status string");
  CHECK(sals_version() != NULL && sals_abi_version() == SALS_ABI_VERSION, "versions");
  CHECK(sals_cuda_available() == 0 || sals_cuda_available() == 1, "cuda_available");
  CHECK(sals_config_default().check_finite == 1, "defaults");
  for (long i = 0; i < iters; ++i) {
    const int fault = i % 4 == 0 ? 0 : (int)(10 + rnd(60)); /* a quarter of calls unharmed */
    fuzz_stateless(fault);
    if (i % 3 == 0) fuzz_cache(fault);
    if (i % 3 == 1) fuzz_paged(fault);
  }
  printf("%d calls, %d succeeded\n", g_calls, g_ok);
  for (int i = 0; i < g_n_fns; ++i) {
    printf("  %-24s %6d calls, %6d succeeded\n", g_fn[i], g_fn_calls[i], g_fn_ok[i]);
    CHECK(g_fn_ok[i] > 0, "%s never succeeded: the driver does not reach its kernels", g_fn[i]);
  }
  CHECK(g_ok > g_calls / 20, "too few calls passed validation (%d of %d): the driver is off", g_ok,
        g_calls);
  return finish();
}
