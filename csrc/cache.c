/* The cache's C ABI: configuration checks, argument validation, capacity, dispatch. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cpu/cpu.h"
#include "tensor.h"

#define INVALID SALS_ERR_INVALID_ARGUMENT

sals_config_t sals_config_default(void) {
  sals_config_t c;
  memset(&c, 0, sizeof c);
  c.value_bits = 16;
  c.value_group = 32;
  c.key_bits = 16;
  c.key_group = 32;
  c.n_sink = 16;
  c.n_recent = 64;
  c.budget_frac = 0.125f;
  c.dtype = SALS_DTYPE_FLOAT16;
  c.check_finite = 1;
  c.device.device_type = kDLCPU;
  c.device.device_id = 0;
  return c;
}

static sals_status_t check_flag(const char* name, int32_t v) {
  if (v == 0 || v == 1) return SALS_OK;
  return sals_set_error(INVALID, "config.%s: %d must be 0 or 1", name, (int)v);
}

static sals_status_t check_min(const char* name, int32_t v, int32_t lo) {
  if (v >= lo) return SALS_OK;
  return sals_set_error(INVALID, "config.%s: %d must be >= %d", name, (int)v, (int)lo);
}

/*
 * One cache, one thread at a time: every call that reads or writes the cache's state holds
 * `busy` for its duration, and a second call arriving meanwhile fails instead of racing
 * (sals.h). An atomic exchange, so two threads cannot both take it.
 */
#if defined(_MSC_VER)
#include <intrin.h>
#define BUSY_TAKE(p) _InterlockedExchange((volatile long*)(p), 1)
#define BUSY_DROP(p) _InterlockedExchange((volatile long*)(p), 0)
#else
#define BUSY_TAKE(p) __atomic_exchange_n((p), 1, __ATOMIC_ACQUIRE)
#define BUSY_DROP(p) __atomic_store_n((p), 0, __ATOMIC_RELEASE)
#endif

static sals_status_t enter(const sals_cache_t* cache, const char* fn) {
  if (cache == NULL) return sals_set_error(INVALID, "cache: is NULL");
  /* `busy` is the one field a const call may change: the cache is never a const object. */
  if (BUSY_TAKE(&((sals_cache_t*)cache)->busy) != 0)
    return sals_set_error(INVALID,
                          "cache: %s called while another call is using the cache "
                          "(one cache may be used by one thread at a time)",
                          fn);
  return SALS_OK;
}

static sals_status_t leave(const sals_cache_t* cache, sals_status_t st) {
  BUSY_DROP(&((sals_cache_t*)cache)->busy);
  return st;
}

/*
 * The most bytes a config may ask for. Far beyond any host or GPU, so only a mistaken field
 * reaches it; and far enough below 2^63 that no size the backends compute from a config that
 * passes (each within a small factor of the estimates below) can overflow int64.
 */
#define MAX_CACHE_BYTES 0x1p52

/*
 * The parts of a cache that grow with products of config fields, each with an upper estimate
 * of its bytes on either backend (4 bytes an element, the largest storage type): a config too
 * large, or an allocation that fails, is reported naming the fields of the largest part.
 */
#define N_CACHE_PARTS 5
typedef struct {
  const char* fields; /* the config fields it grows with */
  char what[128];     /* what they count, with their values */
  double bytes;
} cache_part_t;

/* Fills parts[N_CACHE_PARTS] and returns the largest. */
static const cache_part_t* cache_parts(const sals_config_t* g, cache_part_t* p) {
  const double B = g->max_batch, T = g->max_tokens, hq = g->n_head_q, d = g->head_dim;
  const double dk = (double)g->n_head_kv * g->head_dim, r = g->rank;
  const double sel = g->select_per_head ? g->n_head_kv : 1;
  const double window = (double)g->n_sink + g->n_recent;
  /* Per token slot: latent key, value, position; selection, scores, top-k state and logits. */
  p[0].fields = "config.max_batch, config.max_tokens";
  snprintf(p[0].what, sizeof p[0].what, "max_batch %d * max_tokens %d token slots",
           (int)g->max_batch, (int)g->max_tokens);
  p[0].bytes = B * T * 4.0 * (r + dk + hq + 3.0 * sel + 3.0);
  /* Exact sink and recent keys and values, and their logits. */
  p[1].fields = "config.max_batch, config.n_sink, config.n_recent";
  snprintf(p[1].what, sizeof p[1].what,
           "max_batch %d * (n_sink %d + n_recent %d) exact window "
           "slots",
           (int)g->max_batch, (int)g->n_sink, (int)g->n_recent);
  p[1].bytes = B * window * 4.0 * (2.0 * dk + hq);
  /* Partial attention states: up to 64 token chunks per query head. */
  p[2].fields = "config.max_batch, config.n_head_q, config.head_dim";
  snprintf(p[2].what, sizeof p[2].what, "max_batch %d * n_head_q %d query heads of head_dim %d",
           (int)g->max_batch, (int)g->n_head_q, (int)g->head_dim);
  p[2].bytes = B * hq * 64.0 * 4.0 * (d + 2.0);
  /* The projection and its 16-bit copies. */
  p[3].fields = "config.rank, config.n_head_kv, config.head_dim";
  snprintf(p[3].what, sizeof p[3].what, "a projection of Dk %.0f * rank %d", dk, (int)g->rank);
  p[3].bytes = dk * r * 16.0;
  /* Split-K partial sums of each step's query and key projections: up to 16 + Dk splits. */
  p[4].fields = "config.max_batch, config.rank, config.n_head_kv, config.head_dim";
  snprintf(p[4].what, sizeof p[4].what, "max_batch %d * rank %d * Dk %.0f projection sums",
           (int)g->max_batch, (int)g->rank, dk);
  p[4].bytes = B * sel * r * 4.0 * (16.0 + dk);
  const cache_part_t* big = &p[0];
  for (int32_t i = 1; i < N_CACHE_PARTS; ++i)
    if (p[i].bytes > big->bytes) big = &p[i];
  return big;
}

sals_status_t sals_check_method(const sals_config_t* g) {
  SALS_TRY(check_min("n_head_q", g->n_head_q, 1));
  SALS_TRY(check_min("n_head_kv", g->n_head_kv, 1));
  if (g->n_head_q % g->n_head_kv != 0)
    return sals_set_error(INVALID, "config.n_head_q: %d is not a multiple of n_head_kv %d",
                          (int)g->n_head_q, (int)g->n_head_kv);
  SALS_TRY(check_min("head_dim", g->head_dim, 1));
  if ((int64_t)g->n_head_kv * g->head_dim > INT32_MAX / 2)
    return sals_set_error(INVALID,
                          "config.n_head_kv, config.head_dim: Dk = n_head_kv %d * "
                          "head_dim %d is more than %d",
                          (int)g->n_head_kv, (int)g->head_dim, INT32_MAX / 2);
  const int32_t dk = g->n_head_kv * g->head_dim;
  SALS_TRY(check_min("rank", g->rank, 1));
  if (g->rank > dk)
    return sals_set_error(INVALID, "config.rank: %d > Dk %d (n_head_kv * head_dim)", (int)g->rank,
                          (int)dk);
  SALS_TRY(check_min("score_rank", g->score_rank, 1));
  if (g->score_rank > g->rank)
    return sals_set_error(INVALID, "config.score_rank: %d > rank %d", (int)g->score_rank,
                          (int)g->rank);
  if (g->value_bits != 16 && g->value_bits != 8 && g->value_bits != 4 && g->value_bits != 2)
    return sals_set_error(INVALID, "config.value_bits: %d not one of 16, 8, 4, 2",
                          (int)g->value_bits);
  if (g->value_bits < 16) {
    SALS_TRY(check_min("value_group", g->value_group, 1));
    if (g->head_dim % g->value_group != 0)
      return sals_set_error(INVALID, "config.value_group: %d does not divide head_dim %d",
                            (int)g->value_group, (int)g->head_dim);
    if ((int64_t)g->value_group * g->value_bits % 8 != 0)
      return sals_set_error(INVALID,
                            "config.value_group: %d groups of %d-bit codes do not fill whole bytes",
                            (int)g->value_group, (int)g->value_bits);
  }
  if (g->key_bits != 16 && g->key_bits != 8 && g->key_bits != 4)
    return sals_set_error(INVALID, "config.key_bits: %d not one of 16, 8, 4", (int)g->key_bits);
  if (g->key_bits < 16) {
    SALS_TRY(check_min("key_group", g->key_group, 1));
    if (g->score_rank % g->key_group != 0)
      return sals_set_error(INVALID, "config.key_group: %d does not divide score_rank %d",
                            (int)g->key_group, (int)g->score_rank);
    if ((g->rank - g->score_rank) % g->key_group != 0)
      return sals_set_error(INVALID, "config.key_group: %d does not divide rank - score_rank %d",
                            (int)g->key_group, (int)(g->rank - g->score_rank));
    if ((int64_t)g->key_group * g->key_bits % 8 != 0)
      return sals_set_error(INVALID,
                            "config.key_group: %d groups of %d-bit codes do not fill whole bytes",
                            (int)g->key_group, (int)g->key_bits);
  }
  SALS_TRY(check_min("n_sink", g->n_sink, 0));
  SALS_TRY(check_min("n_recent", g->n_recent, 0));
  /* The backends count candidates as S - n_sink - n_recent in int32. */
  if ((int64_t)g->n_sink + g->n_recent > INT32_MAX)
    return sals_set_error(INVALID,
                          "config.n_sink, config.n_recent: n_sink %d + n_recent %d is "
                          "more than %d",
                          (int)g->n_sink, (int)g->n_recent, INT32_MAX);
  if (!(g->budget_frac > 0.0f && g->budget_frac <= 1.0f))
    return sals_set_error(INVALID, "config.budget_frac: %g not in (0, 1]", (double)g->budget_frac);
  SALS_TRY(check_min("budget_tokens", g->budget_tokens, 0));
  SALS_TRY(check_flag("select_per_head", g->select_per_head));
  SALS_TRY(check_flag("dense", g->dense));
  if (g->dtype != SALS_DTYPE_FLOAT32 && g->dtype != SALS_DTYPE_FLOAT16 &&
      g->dtype != SALS_DTYPE_BFLOAT16)
    return sals_set_error(INVALID, "config.dtype: %d not a sals_dtype_t", (int)g->dtype);
  if (!(g->scale >= 0.0f) || !isfinite(g->scale))
    return sals_set_error(INVALID,
                          "config.scale: %g must be finite and >= 0 (0 = 1/sqrt(head_dim))",
                          (double)g->scale);
  SALS_TRY(check_flag("check_finite", g->check_finite));
  return SALS_OK;
}

sals_status_t sals_check_config_device(const sals_config_t* g) {
  char buf[32];
  if (g->device.device_type != kDLCPU && g->device.device_type != kDLCUDA)
    return sals_set_error(SALS_ERR_UNSUPPORTED, "config.device: %s not supported (cpu, cuda)",
                          sals_device_str(g->device, buf));
  if (g->device.device_type == kDLCPU && g->device.device_id != 0)
    return sals_set_error(INVALID, "config.device: cpu device_id must be 0, got %d",
                          (int)g->device.device_id);
  if (g->device.device_type == kDLCUDA && g->device.device_id < 0)
    return sals_set_error(INVALID, "config.device: invalid CUDA ordinal %d",
                          (int)g->device.device_id);
  return SALS_OK;
}

/* The method's fields, then those of a cache: sizes, threads and device. */
static sals_status_t check_config(const sals_config_t* g) {
  SALS_TRY(sals_check_method(g));
  SALS_TRY(check_min("max_batch", g->max_batch, 1));
  SALS_TRY(check_min("max_tokens", g->max_tokens, 1));
  SALS_TRY(check_min("n_threads", g->n_threads, 0));
  if (g->n_threads > SALS_MAX_THREADS)
    return sals_set_error(INVALID, "config.n_threads: %d must be <= %d (0 = one per online core)",
                          (int)g->n_threads, SALS_MAX_THREADS);
  SALS_TRY(sals_check_config_device(g));
  /* The backends index a step's query rows (and the selection rows, fewer) in int32. */
  if ((int64_t)g->max_batch * g->n_head_q > INT32_MAX)
    return sals_set_error(INVALID,
                          "config.max_batch, config.n_head_q: max_batch %d * n_head_q "
                          "%d query rows are more than %d",
                          (int)g->max_batch, (int)g->n_head_q, INT32_MAX);
  cache_part_t parts[N_CACHE_PARTS];
  const cache_part_t* big = cache_parts(g, parts);
  if (big->bytes > MAX_CACHE_BYTES)
    return sals_set_error(INVALID,
                          "%s: %s would take about %.3g bytes, more than the 2^52 a "
                          "cache may take (no device holds that)",
                          big->fields, big->what, big->bytes);
  return SALS_OK;
}

/*
 * The columns of U [R, C] (row-major float32) are orthonormal within tol: every column's
 * squared norm is within tol of 1 (exact), and for PROBES fixed pseudo-random +-1 vectors x,
 * every entry of (U^T U - I) x is within tol * sqrt(C) (a probe costs 2 R C, where the whole
 * Gram matrix would cost R C^2). tol is 1e-3, or 4 units of roundoff of a 16-bit input
 * (2^-9 for float16, 2^-6 for bfloat16), which rounding an orthonormal matrix stays within.
 */
#define PROBES 4
static sals_status_t check_orthonormal(const float* U, int64_t R, int64_t C, sals_elem_t elem) {
  const double tol = elem == SALS_ELEM_BF16 ? 0x1p-6 : (elem == SALS_ELEM_F16 ? 0x1p-9 : 1e-3);
  double* x = (double*)malloc((size_t)C * 3 * PROBES * sizeof(double));
  if (!x) return sals_set_error(SALS_ERR_OUT_OF_MEMORY, "out of host memory (projection check)");
  double *z = x + C * PROBES, *norm = z + C * PROBES, y[PROBES];
  uint64_t rng = 0x9e3779b97f4a7c15ull;
  for (int64_t k = 0; k < C * PROBES; ++k) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    x[k] = (rng >> 63) ? 1.0 : -1.0;
    z[k] = 0.0;
  }
  for (int64_t k = 0; k < C; ++k) norm[k] = 0.0;
  /* One pass over the rows: y = U[i, :] x, then z += U[i, :]^T y, for all probes at once. */
  for (int64_t i = 0; i < R; ++i) {
    const float* u = U + i * C;
    for (int32_t p = 0; p < PROBES; ++p) y[p] = 0.0;
    for (int64_t k = 0; k < C; ++k) {
      norm[k] += (double)u[k] * u[k];
      for (int32_t p = 0; p < PROBES; ++p) y[p] += (double)u[k] * x[k * PROBES + p];
    }
    for (int64_t k = 0; k < C; ++k)
      for (int32_t p = 0; p < PROBES; ++p) z[k * PROBES + p] += (double)u[k] * y[p];
  }
  sals_status_t st = SALS_OK;
  const double off_tol = tol * sqrt((double)C);
  for (int64_t k = 0; k < C && st == SALS_OK; ++k) {
    if (fabs(norm[k] - 1.0) > tol) {
      st = sals_set_error(INVALID,
                          "projection: column %lld has squared norm %.6g, not 1 "
                          "(U_r needs orthonormal columns, within %.3g)",
                          (long long)k, norm[k], tol);
      break;
    }
    for (int32_t p = 0; p < PROBES; ++p)
      if (fabs(z[k * PROBES + p] - x[k * PROBES + p]) > off_tol) {
        st = sals_set_error(INVALID,
                            "projection: columns are not orthogonal (|(U^T U - I) x| "
                            "reaches %.3g at column %lld for a random +-1 vector x, more than "
                            "%.3g)",
                            fabs(z[k * PROBES + p] - x[k * PROBES + p]), (long long)k, off_tol);
        break;
      }
  }
  free(x);
  return st;
}

void sals_cache_release_buffers(sals_cache_t* c, void (*release)(void* p)) {
  void* bufs[] = {c->proj,
                  c->inv_freq,
                  c->lat_score,
                  c->lat_rest,
                  c->lat_score_scale,
                  c->lat_score_zero,
                  c->lat_rest_scale,
                  c->lat_rest_zero,
                  c->val,
                  c->val_scale,
                  c->val_zero,
                  c->sink_k,
                  c->sink_v,
                  c->recent_k,
                  c->recent_v,
                  c->pos,
                  c->len,
                  c->sel_idx,
                  c->sel_count};
  for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; ++i)
    if (bufs[i]) release(bufs[i]);
  c->proj = c->inv_freq = NULL;
  c->lat_score = c->lat_rest = c->val = c->sink_k = c->sink_v = c->recent_k = c->recent_v = NULL;
  c->lat_score_scale = c->lat_score_zero = c->lat_rest_scale = c->lat_rest_zero = NULL;
  c->val_scale = c->val_zero = NULL;
  c->pos = c->len = c->sel_idx = c->sel_count = NULL;
}

sals_status_t sals_projection_host(const sals_view_t* pv, DLDevice pdev, float** out) {
  const int64_t R = pv->shape[0], C = pv->shape[1];
  const size_t es = sals_elem_size(pv->elem);
  const void* base = pv->data;
  void* staged = NULL;
  int64_t lo = 0;
  if (pdev.device_type == kDLCUDA) {
#if defined(SALS_WITH_CUDA)
    /* Copy the span the view covers, then read it with the view's strides. */
    int64_t hi = 0;
    for (int32_t i = 0; i < 2; ++i) {
      const int64_t reach = (pv->shape[i] - 1) * pv->stride[i];
      if (reach < 0) lo += reach;
      else hi += reach;
    }
    const size_t bytes = (size_t)(hi - lo + 1) * es;
    staged = malloc(bytes);
    if (!staged) return sals_set_error(SALS_ERR_OUT_OF_MEMORY, "out of host memory (projection)");
    sals_status_t st = sals_cuda_download(staged, (const char*)pv->data + lo * (int64_t)es, bytes);
    if (st != SALS_OK) {
      free(staged);
      return st;
    }
    base = staged;
#else
    return sals_check_backend("projection", pdev);
#endif
  }
  float* p = (float*)malloc((size_t)(R * C) * sizeof(float) + 1);
  if (!p) {
    free(staged);
    return sals_set_error(SALS_ERR_OUT_OF_MEMORY, "out of host memory (projection)");
  }
  sals_view_t hv = *pv;
  hv.data = (char*)base - lo * (int64_t)es;
  for (int64_t i = 0; i < R; ++i)
    sals_load_f32(p + i * C, (const char*)hv.data + i * hv.stride[0] * (int64_t)es, hv.elem, C);
  free(staged);
  for (int64_t i = 0; i < R * C; ++i)
    if (!isfinite(p[i])) {
      free(p);
      return sals_set_error(SALS_ERR_NOT_FINITE, "projection: holds NaN or infinity");
    }
  sals_status_t st = check_orthonormal(p, R, C, pv->elem);
  if (st != SALS_OK) {
    free(p);
    return st;
  }
  *out = p;
  return SALS_OK;
}

static void free_host(sals_cache_t* c) {
  free(c->inv_freq_host);
  free(c->reserved);
  free(c);
}

sals_status_t sals_config_check(const sals_config_t* config) {
  if (config == NULL) return sals_set_error(INVALID, "config: is NULL");
  return check_config(config);
}

/* The backend's out-of-memory error, led by the config fields of the cache's largest part. */
static sals_status_t name_largest_part(const sals_config_t* g) {
  char backend[256];
  snprintf(backend, sizeof backend, "%s", sals_last_error());
  cache_part_t parts[N_CACHE_PARTS];
  const cache_part_t* big = cache_parts(g, parts);
  return sals_set_error(SALS_ERR_OUT_OF_MEMORY,
                        "%s: %s; the largest part is %s (about %.3g "
                        "bytes)",
                        big->fields, backend, big->what, big->bytes);
}

sals_status_t sals_cache_create(const sals_config_t* config, const sals_rope_t* rope,
                                const DLTensor* projection, sals_cache_t** out) {
  if (out == NULL) return sals_set_error(INVALID, "out: is NULL");
  if (config == NULL) return sals_set_error(INVALID, "config: is NULL");
  SALS_TRY(check_config(config));
  SALS_TRY(sals_check_rope(rope, config->head_dim));
  SALS_TRY(sals_check_backend("config.device", config->device));
  const int32_t dk = config->n_head_kv * config->head_dim;
  sals_view_t pv;
  DLDevice pdev;
  SALS_TRY(sals_view_make(projection, "projection", 2, SALS_ACCEPT_FLOAT, &pv, &pdev));
  SALS_TRY(sals_check_dim(&pv, "projection", 0, dk, "Dk = n_head_kv * head_dim"));
  SALS_TRY(sals_check_dim(&pv, "projection", 1, config->rank, "config.rank"));
  if (pdev.device_type != kDLCPU)
    SALS_TRY(sals_check_device("projection", pdev, config->device, "the cache"));
  float* proj = NULL;
  SALS_TRY(sals_projection_host(&pv, pdev, &proj));

  sals_cache_t* c = (sals_cache_t*)calloc(1, sizeof *c);
  const int32_t half = rope->rotary_dim / 2;
  if (c) {
    c->inv_freq_host = (float*)calloc((size_t)(half > 0 ? half : 1), sizeof(float));
    c->reserved = (int32_t*)calloc((size_t)config->max_batch, sizeof(int32_t));
  }
  if (!c || !c->inv_freq_host || !c->reserved) {
    if (c) free_host(c);
    free(proj);
    sals_set_error(SALS_ERR_OUT_OF_MEMORY, "out of host memory (cache)");
    return name_largest_part(config);
  }
  const sals_config_t* g = config;
  c->cfg = *g;
  c->dk = dk;
  c->n_sel_heads = g->select_per_head ? g->n_head_kv : 1;
  c->n_groups = g->value_bits < 16 ? dk / g->value_group : 0;
  const int64_t e = (int64_t)sals_dtype_size(g->dtype);
  c->val_row_bytes = g->value_bits < 16 ? (int64_t)dk * g->value_bits / 8 : (int64_t)dk * e;
  const int64_t key_coord_bits = g->key_bits < 16 ? g->key_bits : 8 * e;
  c->lat_score_bytes = (int64_t)g->score_rank * key_coord_bits / 8;
  c->lat_rest_bytes = (int64_t)(g->rank - g->score_rank) * key_coord_bits / 8;
  c->scale = g->scale > 0.0f ? g->scale : 1.0f / sqrtf((float)g->head_dim);
  c->rotary_dim = rope->rotary_dim;
  c->attention_scaling = rope->attention_scaling;
  c->interleaved = rope->interleaved;
  if (half > 0) memcpy(c->inv_freq_host, rope->inv_freq, (size_t)half * sizeof(float));

  const size_t proj_bytes = (size_t)dk * (size_t)g->rank * sizeof(float);
  sals_status_t st = SALS_DISPATCH(g->device, cache_init, c);
  if (st == SALS_OK) {
#if defined(SALS_WITH_CUDA)
    if (g->device.device_type == kDLCUDA) {
      st = sals_cuda_upload(c->proj, proj, proj_bytes);
      if (st == SALS_OK && half > 0)
        st = sals_cuda_upload(c->inv_freq, c->inv_freq_host, (size_t)half * sizeof(float));
    } else
#endif
    {
      memcpy(c->proj, proj, proj_bytes);
      if (half > 0) memcpy(c->inv_freq, c->inv_freq_host, (size_t)half * sizeof(float));
    }
    if (st == SALS_OK) st = SALS_DISPATCH(g->device, cache_reset, c, g->max_batch, NULL);
    if (st != SALS_OK) SALS_DISPATCH(g->device, cache_free, c);
  }
  free(proj);
  if (st != SALS_OK) {
    free_host(c);
    if (st == SALS_ERR_OUT_OF_MEMORY) return name_largest_part(g);
    return st;
  }
  *out = c;
  return SALS_OK;
}

void sals_cache_destroy(sals_cache_t* cache) {
  if (cache == NULL) return;
  SALS_DISPATCH(cache->cfg.device, cache_free, cache);
  free_host(cache);
}

static void* skip(void* p, int64_t bytes) { return p ? (char*)p + bytes : NULL; }

/*
 * The cache as seen from sequence `first` on: every per-sequence pointer (the host's
 * reservations included) moved `first` sequences ahead, so that a backend, which indexes
 * sequences from 0, works on sequences first.. unchanged. A shallow copy sharing the buffers,
 * cfg and the backend state, whose workspace is sized for max_batch sequences and so holds any
 * range; the backends write through these pointers, never into the struct itself.
 */
static sals_cache_t from_sequence(const sals_cache_t* c, int64_t first) {
  const sals_config_t* g = &c->cfg;
  const int64_t T = g->max_tokens, e = (int64_t)sals_dtype_size(g->dtype);
  /* float16 scale/zero groups per token of each latent part (quantised keys only) */
  const int64_t ks = g->key_bits < 16 ? g->score_rank / g->key_group : 0;
  const int64_t kr = g->key_bits < 16 ? (g->rank - g->score_rank) / g->key_group : 0;
  sals_cache_t r = *c;
  r.lat_score = skip(c->lat_score, first * T * c->lat_score_bytes);
  r.lat_rest = skip(c->lat_rest, first * T * c->lat_rest_bytes);
  r.lat_score_scale = (uint16_t*)skip(c->lat_score_scale, first * T * ks * 2);
  r.lat_score_zero = (uint16_t*)skip(c->lat_score_zero, first * T * ks * 2);
  r.lat_rest_scale = (uint16_t*)skip(c->lat_rest_scale, first * T * kr * 2);
  r.lat_rest_zero = (uint16_t*)skip(c->lat_rest_zero, first * T * kr * 2);
  r.val = skip(c->val, first * T * c->val_row_bytes);
  r.val_scale = (uint16_t*)skip(c->val_scale, first * T * c->n_groups * 2);
  r.val_zero = (uint16_t*)skip(c->val_zero, first * T * c->n_groups * 2);
  r.sink_k = skip(c->sink_k, first * g->n_sink * c->dk * e);
  r.sink_v = skip(c->sink_v, first * g->n_sink * c->dk * e);
  r.recent_k = skip(c->recent_k, first * g->n_recent * c->dk * e);
  r.recent_v = skip(c->recent_v, first * g->n_recent * c->dk * e);
  r.pos = c->pos + first * T;
  r.len = c->len + first;
  r.sel_idx = c->sel_idx + first * c->n_sel_heads * T;
  r.sel_count = c->sel_count + first;
  r.reserved = c->reserved + first;
  return r;
}

/*
 * Sequences first..first+batch-1 within the cache's, else an error naming `first`; when first
 * is 0 and the batch alone is too large, the error names the tensor whose dim 0 it is (`tensor`),
 * or the argument `batch` (tensor NULL).
 */
static sals_status_t check_range(const sals_cache_t* c, int64_t first, int64_t batch,
                                 const char* tensor) {
  const int32_t max_batch = c->cfg.max_batch;
  if (first < 0) return sals_set_error(INVALID, "first: %lld must be >= 0", (long long)first);
  if (first + batch <= max_batch) return SALS_OK;
  if (first == 0 && tensor)
    return sals_set_error(SALS_ERR_CAPACITY, "%s: batch %lld > max_batch %d", tensor,
                          (long long)batch, (int)max_batch);
  if (first == 0)
    return sals_set_error(SALS_ERR_CAPACITY, "batch: %lld > max_batch %d", (long long)batch,
                          (int)max_batch);
  return sals_set_error(SALS_ERR_CAPACITY, "first: %lld + batch %lld%s%s > max_batch %d",
                        (long long)first, (long long)batch, tensor ? " of " : "",
                        tensor ? tensor : "", (int)max_batch);
}

static sals_status_t cache_reset(sals_cache_t* cache, int64_t first, int64_t batch, void* stream) {
  if (batch < 0) return sals_set_error(INVALID, "batch: %lld must be >= 0", (long long)batch);
  SALS_TRY(check_range(cache, first, batch, NULL));
  if (batch == 0) return SALS_OK;
  sals_cache_t r = from_sequence(cache, first);
  SALS_TRY(SALS_DISPATCH(cache->cfg.device, cache_reset, &r, batch, stream));
  memset(r.reserved, 0, (size_t)batch * sizeof(int32_t));
  return SALS_OK;
}

sals_status_t sals_cache_reset(sals_cache_t* cache, void* stream) {
  SALS_TRY(enter(cache, "sals_cache_reset"));
  return leave(cache, cache_reset(cache, 0, cache->cfg.max_batch, stream));
}

sals_status_t sals_cache_reset_range(sals_cache_t* cache, int64_t first, int64_t batch,
                                     void* stream) {
  SALS_TRY(enter(cache, "sals_cache_reset_range"));
  return leave(cache, cache_reset(cache, first, batch, stream));
}

sals_status_t sals_cache_get_config(const sals_cache_t* cache, sals_config_t* out) {
  if (cache == NULL) return sals_set_error(INVALID, "cache: is NULL");
  if (out == NULL) return sals_set_error(INVALID, "out: is NULL");
  *out = cache->cfg;
  return SALS_OK;
}

/* A tensor handed to the cache: checked and on the cache's device. */
static sals_status_t cache_view(const sals_cache_t* c, const DLTensor* t, const char* name,
                                int32_t ndim, uint32_t accept, sals_view_t* v) {
  DLDevice dev;
  SALS_TRY(sals_view_make(t, name, ndim, accept, v, &dev));
  return sals_check_device(name, dev, c->cfg.device, "the cache");
}

/* b's extent matches a's over the first n dims. */
static sals_status_t same_dims(const sals_view_t* b, const char* bn, const sals_view_t* a,
                               const char* an, int32_t n) {
  for (int32_t i = 0; i < n; ++i)
    if (b->shape[i] != a->shape[i])
      return sals_set_error(INVALID, "%s: dim %d is %lld, expected %lld (%s.shape[%d])", bn, (int)i,
                            (long long)b->shape[i], (long long)a->shape[i], an, (int)i);
  return SALS_OK;
}

/*
 * The token tensors of append (k, v, positions) and attend (q, out, positions) of sequences
 * first..:
 * x [B, T, n_heads, head_dim] float with first + B <= max_batch, `like` of x's shape (any float
 * dtype), positions [B, T] int32.
 */
static sals_status_t token_views(const sals_cache_t* c, int64_t first, const DLTensor* x,
                                 const char* xn, int32_t n_heads, const char* heads_what,
                                 const DLTensor* like, const char* ln, const DLTensor* pos,
                                 const char* pn, sals_view_t* xv, sals_view_t* lv,
                                 sals_view_t* pv) {
  const sals_config_t* g = &c->cfg;
  SALS_TRY(check_range(c, first, 0, xn)); /* a negative first, before the tensors */
  SALS_TRY(cache_view(c, x, xn, 4, SALS_ACCEPT_FLOAT, xv));
  SALS_TRY(cache_view(c, like, ln, 4, SALS_ACCEPT_FLOAT, lv));
  SALS_TRY(cache_view(c, pos, pn, 2, SALS_ACCEPT_I32, pv));
  SALS_TRY(sals_check_dim(xv, xn, 2, n_heads, heads_what));
  SALS_TRY(sals_check_dim(xv, xn, 3, g->head_dim, "head_dim"));
  SALS_TRY(same_dims(lv, ln, xv, xn, 4));
  SALS_TRY(same_dims(pv, pn, xv, xn, 2));
  return check_range(c, first, xv->shape[0], xn);
}

static sals_status_t cache_append(sals_cache_t* cache, int64_t first, const DLTensor* k,
                                  const DLTensor* v, const DLTensor* positions, void* stream) {
  const sals_config_t* g = &cache->cfg;
  sals_view_t kv, vv, pv;
  SALS_TRY(token_views(cache, first, k, "k", g->n_head_kv, "n_head_kv", v, "v", positions,
                       "positions", &kv, &vv, &pv));
  const int64_t B = kv.shape[0], T = kv.shape[1];
  sals_cache_t r = from_sequence(cache, first);
  for (int64_t b = 0; b < B; ++b)
    if (r.reserved[b] + T > g->max_tokens)
      return sals_set_error(SALS_ERR_CAPACITY,
                            "k: %lld more tokens for sequence %lld would reserve %lld > "
                            "max_tokens %d (each append reserves T slots until reset)",
                            (long long)T, (long long)(first + b), (long long)(r.reserved[b] + T),
                            (int)g->max_tokens);
  if (B == 0 || T == 0) return SALS_OK;
  SALS_TRY(SALS_DISPATCH(g->device, cache_append, &r, &kv, &vv, &pv, stream));
  for (int64_t b = 0; b < B; ++b) r.reserved[b] += (int32_t)T;
  return SALS_OK;
}

sals_status_t sals_cache_append(sals_cache_t* cache, const DLTensor* k, const DLTensor* v,
                                const DLTensor* positions, void* stream) {
  SALS_TRY(enter(cache, "sals_cache_append"));
  return leave(cache, cache_append(cache, 0, k, v, positions, stream));
}

sals_status_t sals_cache_append_range(sals_cache_t* cache, int64_t first, const DLTensor* k,
                                      const DLTensor* v, const DLTensor* positions, void* stream) {
  SALS_TRY(enter(cache, "sals_cache_append_range"));
  return leave(cache, cache_append(cache, first, k, v, positions, stream));
}

static sals_status_t cache_attend(sals_cache_t* cache, int64_t first, const DLTensor* q,
                                  const DLTensor* positions, DLTensor* out, void* stream) {
  const sals_config_t* g = &cache->cfg;
  sals_view_t qv, pv, ov;
  SALS_TRY(token_views(cache, first, q, "q", g->n_head_q, "n_head_q", out, "out", positions,
                       "positions", &qv, &ov, &pv));
  SALS_TRY(sals_check_output(&ov, "out"));
  if (sals_views_overlap(&ov, &qv))
    return sals_set_error(INVALID, "out: overlaps q (out may not alias q)");
  if (sals_views_overlap(&ov, &pv))
    return sals_set_error(INVALID, "out: overlaps positions (out may not alias an input)");
  if (sals_view_numel(&qv) == 0) return SALS_OK;
  sals_cache_t r = from_sequence(cache, first);
  return SALS_DISPATCH(g->device, cache_attend, &r, &qv, &pv, &ov, stream);
}

sals_status_t sals_cache_attend(sals_cache_t* cache, const DLTensor* q, const DLTensor* positions,
                                DLTensor* out, void* stream) {
  SALS_TRY(enter(cache, "sals_cache_attend"));
  return leave(cache, cache_attend(cache, 0, q, positions, out, stream));
}

sals_status_t sals_cache_attend_range(sals_cache_t* cache, int64_t first, const DLTensor* q,
                                      const DLTensor* positions, DLTensor* out, void* stream) {
  SALS_TRY(enter(cache, "sals_cache_attend_range"));
  return leave(cache, cache_attend(cache, first, q, positions, out, stream));
}

static sals_status_t cache_reserve(sals_cache_t* cache, int64_t batch, int32_t tokens) {
  const sals_config_t* g = &cache->cfg;
  if (batch < 0 || batch > g->max_batch)
    return sals_set_error(SALS_ERR_CAPACITY, "batch: %lld outside 0..max_batch %d",
                          (long long)batch, (int)g->max_batch);
  if (tokens < 0) return sals_set_error(INVALID, "tokens: %d must be >= 0", (int)tokens);
  for (int64_t b = 0; b < batch; ++b)
    if ((int64_t)cache->reserved[b] + tokens > g->max_tokens)
      return sals_set_error(
          SALS_ERR_CAPACITY, "tokens: %d more for sequence %lld would reserve %lld > max_tokens %d",
          (int)tokens, (long long)b, (long long)cache->reserved[b] + tokens, (int)g->max_tokens);
  for (int64_t b = 0; b < batch; ++b) cache->reserved[b] += tokens;
  return SALS_OK;
}

sals_status_t sals_cache_reserve(sals_cache_t* cache, int64_t batch, int32_t tokens) {
  SALS_TRY(enter(cache, "sals_cache_reserve"));
  return leave(cache, cache_reserve(cache, batch, tokens));
}

sals_status_t sals_cache_check(sals_cache_t* cache, int32_t wait, void* stream) {
  SALS_TRY(enter(cache, "sals_cache_check"));
  if (wait != 0 && wait != 1)
    return leave(cache, sals_set_error(INVALID, "wait: %d must be 0 or 1", (int)wait));
  return leave(cache, SALS_DISPATCH(cache->cfg.device, cache_check, cache, wait, stream));
}

static sals_status_t cache_lengths(const sals_cache_t* cache, DLTensor* out, void* stream) {
  sals_view_t ov;
  SALS_TRY(cache_view(cache, out, "out", 1, SALS_ACCEPT_I32, &ov));
  SALS_TRY(sals_check_output(&ov, "out"));
  if (ov.shape[0] > cache->cfg.max_batch)
    return sals_set_error(INVALID, "out: dim 0 is %lld, more than max_batch %d",
                          (long long)ov.shape[0], (int)cache->cfg.max_batch);
  if (ov.shape[0] == 0) return SALS_OK;
  return SALS_DISPATCH(cache->cfg.device, cache_lengths, cache, &ov, stream);
}

sals_status_t sals_cache_lengths(const sals_cache_t* cache, DLTensor* out, void* stream) {
  SALS_TRY(enter(cache, "sals_cache_lengths"));
  return leave(cache, cache_lengths(cache, out, stream));
}

static sals_status_t cache_selected(const sals_cache_t* cache, DLTensor* idx, DLTensor* count,
                                    void* stream) {
  sals_view_t iv, cv;
  SALS_TRY(cache_view(cache, idx, "idx", 3, SALS_ACCEPT_I32, &iv));
  SALS_TRY(cache_view(cache, count, "count", 1, SALS_ACCEPT_I32, &cv));
  SALS_TRY(sals_check_output(&iv, "idx"));
  SALS_TRY(sals_check_output(&cv, "count"));
  if (iv.shape[0] > cache->cfg.max_batch)
    return sals_set_error(INVALID, "idx: dim 0 is %lld, more than max_batch %d",
                          (long long)iv.shape[0], (int)cache->cfg.max_batch);
  SALS_TRY(sals_check_dim(
      &iv, "idx", 1, cache->n_sel_heads,
      cache->n_sel_heads == 1 ? "1: shared selection" : "n_head_kv: per-head selection"));
  SALS_TRY(same_dims(&cv, "count", &iv, "idx", 1));
  if (sals_views_overlap(&iv, &cv)) return sals_set_error(INVALID, "count: overlaps idx");
  if (cache->cfg.device.device_type == kDLCPU)
    for (int64_t b = 0; b < iv.shape[0]; ++b)
      if (cache->sel_count[b] > iv.shape[2])
        return sals_set_error(INVALID,
                              "idx: dim 2 is %lld, fewer than the %d tokens selected "
                              "for sequence %lld",
                              (long long)iv.shape[2], (int)cache->sel_count[b], (long long)b);
  if (iv.shape[0] == 0) return SALS_OK;
  return SALS_DISPATCH(cache->cfg.device, cache_selected, cache, &iv, &cv, stream);
}

sals_status_t sals_cache_selected(const sals_cache_t* cache, DLTensor* idx, DLTensor* count,
                                  void* stream) {
  SALS_TRY(enter(cache, "sals_cache_selected"));
  return leave(cache, cache_selected(cache, idx, count, stream));
}

static sals_status_t cache_memory(const sals_cache_t* cache, sals_memory_t* out, void* stream) {
  if (out == NULL) return sals_set_error(INVALID, "out: is NULL");
  const sals_config_t* g = &cache->cfg;
  int32_t* len = (int32_t*)malloc((size_t)g->max_batch * sizeof(int32_t));
  if (!len) return sals_set_error(SALS_ERR_OUT_OF_MEMORY, "out of host memory");
  sals_status_t st = SALS_DISPATCH(g->device, cache_lengths_host, cache, len, stream);
  if (st != SALS_OK) {
    free(len);
    return st;
  }
  const uint64_t e = sals_dtype_size(g->dtype), dk = (uint64_t)cache->dk;
  /* A float16 scale and zero per group of quantised latent coordinates. */
  const uint64_t key_params = g->key_bits < 16 ? (uint64_t)(g->rank / g->key_group) * 2 * 2 : 0;
  sals_memory_t m;
  memset(&m, 0, sizeof m);
  for (int32_t b = 0; b < g->max_batch; ++b) {
    const uint64_t S = (uint64_t)len[b];
    const uint64_t sinks = S < (uint64_t)g->n_sink ? S : (uint64_t)g->n_sink;
    const uint64_t recent = S < (uint64_t)g->n_recent ? S : (uint64_t)g->n_recent;
    m.latent_keys += S * (uint64_t)(cache->lat_score_bytes + cache->lat_rest_bytes + key_params);
    m.values += S * (uint64_t)cache->val_row_bytes;
    m.value_scales += S * (uint64_t)cache->n_groups * 2 * 2;
    m.exact_window += (sinks + recent) * dk * e * 2;
    m.positions += S * 4;
    m.dense_fp16 += 2 * S * dk * 2;
  }
  free(len);
  m.projection = dk * (uint64_t)g->rank * 4;
  m.total = m.latent_keys + m.values + m.value_scales + m.exact_window + m.positions + m.projection;
  m.allocated = cache->allocated;
  *out = m;
  return SALS_OK;
}

sals_status_t sals_cache_memory(const sals_cache_t* cache, sals_memory_t* out, void* stream) {
  SALS_TRY(enter(cache, "sals_cache_memory"));
  return leave(cache, cache_memory(cache, out, stream));
}
