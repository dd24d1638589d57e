/* Paged storage's C ABI: the slot layout, settings, argument validation and dispatch. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu/layer.h"
#include "tensor.h"

#define INVALID SALS_ERR_INVALID_ARGUMENT

static int64_t max_i64(int64_t a, int64_t b) { return a > b ? a : b; }

void sals_paged_layout(const sals_config_t* g, sals_paged_layout_t* L) {
  const int64_t e = (int64_t)sals_dtype_size(g->dtype), dk = (int64_t)g->n_head_kv * g->head_dim;
  const int64_t r = g->rank, rs = g->score_rank;
  int64_t at = 0, align = 1;
  for (int i = 0; i < 2; ++i) L->lat[i] = L->lat_scale[i] = L->lat_zero[i] = -1;
  L->val = L->val_scale = L->val_zero = -1;
  /* Widest elements first, so that every field is aligned to its element size. */
  if (g->key_bits == 16) {
    L->lat[0] = at;
    L->lat[1] = at + rs * e;
    at += r * e;
    align = e;
  }
  if (g->value_bits == 16) {
    L->val = at;
    at += dk * e;
    align = e;
  }
  if (g->key_bits < 16) {
    const int64_t ng[2] = {rs / g->key_group, (r - rs) / g->key_group};
    for (int i = 0; i < 2; ++i) {
      L->lat_scale[i] = at;
      L->lat_zero[i] = at + 2 * ng[i];
      at += 4 * ng[i];
    }
    align = max_i64(align, 2);
  }
  if (g->value_bits < 16) {
    const int64_t nv = dk / g->value_group;
    L->val_scale = at;
    L->val_zero = at + 2 * nv;
    at += 4 * nv;
    align = max_i64(align, 2);
  }
  if (g->key_bits < 16) {
    L->lat[0] = at;
    L->lat[1] = at + rs * g->key_bits / 8;
    at += r * g->key_bits / 8;
  }
  if (g->value_bits < 16) {
    L->val = at;
    at += dk * g->value_bits / 8;
  }
  L->slot_bytes = (at + align - 1) / align * align;
  L->align = align;
}

sals_status_t sals_paged_slot_bytes(const sals_config_t* config, int64_t* out) {
  if (config == NULL) return sals_set_error(INVALID, "config: is NULL");
  if (out == NULL) return sals_set_error(INVALID, "out: is NULL");
  SALS_TRY(sals_check_method(config));
  sals_paged_layout_t L;
  sals_paged_layout(config, &L);
  *out = L.slot_bytes;
  return SALS_OK;
}

sals_status_t sals_paged_create(const sals_config_t* config, const sals_rope_t* rope,
                                const DLTensor* projection, sals_paged_t** out) {
  if (out == NULL) return sals_set_error(INVALID, "out: is NULL");
  if (config == NULL) return sals_set_error(INVALID, "config: is NULL");
  SALS_TRY(sals_check_method(config));
  SALS_TRY(sals_check_config_device(config));
  SALS_TRY(sals_check_backend("config.device", config->device));
  SALS_TRY(sals_check_rope(rope, config->head_dim));
  const int32_t dk = config->n_head_kv * config->head_dim, half = rope->rotary_dim / 2;
  sals_view_t pv;
  DLDevice pdev;
  SALS_TRY(sals_view_make(projection, "projection", 2, SALS_ACCEPT_FLOAT, &pv, &pdev));
  SALS_TRY(sals_check_dim(&pv, "projection", 0, dk, "Dk = n_head_kv * head_dim"));
  SALS_TRY(sals_check_dim(&pv, "projection", 1, config->rank, "config.rank"));
  float* proj = NULL;
  SALS_TRY(sals_projection_host(&pv, pdev, &proj));
  sals_paged_t* p = (sals_paged_t*)calloc(1, sizeof *p);
  float* inv_freq = (float*)calloc((size_t)(half > 0 ? half : 1), sizeof(float));
  if (!p || !inv_freq) {
    free(p);
    free(inv_freq);
    free(proj);
    return sals_set_error(SALS_ERR_OUT_OF_MEMORY, "out of host memory (paged settings)");
  }
  p->cfg = *config;
  p->dk = dk;
  p->n_sel_heads = config->select_per_head ? config->n_head_kv : 1;
  p->scale = config->scale > 0.0f ? config->scale : 1.0f / sqrtf((float)config->head_dim);
  p->rotary_dim = rope->rotary_dim;
  p->attention_scaling = rope->attention_scaling;
  p->interleaved = rope->interleaved;
  if (half > 0) memcpy(inv_freq, rope->inv_freq, (size_t)half * sizeof(float));
  p->inv_freq = inv_freq;
  p->proj = proj;
  sals_paged_layout(config, &p->layout);
#if defined(SALS_WITH_CUDA)
  if (config->device.device_type == kDLCUDA) {
    const sals_status_t st = sals_cuda_paged_init(p);
    if (st != SALS_OK) {
      sals_paged_destroy(p);
      return st;
    }
  }
#endif
  *out = p;
  return SALS_OK;
}

void sals_paged_destroy(sals_paged_t* paged) {
  if (paged == NULL) return;
#if defined(SALS_WITH_CUDA)
  sals_cuda_paged_free(paged);
#endif
  free(paged->inv_freq);
  free(paged->proj);
  free(paged);
}

/*
 * A call runs where its tensors are: on the CPU with any settings; on a GPU with settings made
 * for it (config.device), which hold the device copies, and within the CUDA kernels' grid
 * limits (`batch` sequences, `rows` token rows).
 */
static sals_status_t check_call_device(const sals_paged_t* p, DLDevice dev, const char* name,
                                       int64_t batch, const char* batch_name, int64_t rows) {
  char a[32], b[32];
  if (dev.device_type == kDLCPU) return SALS_OK;
  if (dev.device_type != p->cfg.device.device_type || dev.device_id != p->cfg.device.device_id)
    return sals_set_error(INVALID,
                          "%s: on %s but the paged settings were made for %s (config.device)", name,
                          sals_device_str(dev, a), sals_device_str(p->cfg.device, b));
  if (batch > 65535)
    return sals_set_error(SALS_ERR_UNSUPPORTED, "%s: %lld sequences, more than 65535 on CUDA",
                          batch_name, (long long)batch);
  if (rows > INT32_MAX)
    return sals_set_error(SALS_ERR_UNSUPPORTED, "%s: %lld rows, more than %d on CUDA", name,
                          (long long)rows, INT32_MAX);
  return SALS_OK;
}

/* pages [num_blocks, block_size, slot_bytes]: every slot's fields aligned to their elements. */
static sals_status_t check_pages(const sals_paged_t* p, const sals_view_t* pv) {
  SALS_TRY(sals_check_dim(pv, "pages", 2, p->layout.slot_bytes, "slot_bytes of the config"));
  const int64_t a = p->layout.align;
  if (sals_view_numel(pv) > 0 &&
      ((uintptr_t)pv->data % (uintptr_t)a != 0 || pv->stride[0] % a != 0 || pv->stride[1] % a != 0))
    return sals_set_error(INVALID,
                          "pages: data + byte_offset and the strides of dims 0 and 1 "
                          "(%lld, %lld bytes) must be multiples of %lld, the slot's widest "
                          "element",
                          (long long)pv->stride[0], (long long)pv->stride[1], (long long)a);
  return SALS_OK;
}

static int cmp_i32(const void* a, const void* b) {
  const int32_t x = *(const int32_t*)a, y = *(const int32_t*)b;
  return (x > y) - (x < y);
}

/*
 * The entries of `iv` [N] (argument `name`, a `noun` each) below `bound`, the size of `of`, and
 * none twice. With slot_mapping `sv` (checking window_rows), only the tokens stored count and
 * their entries may be -1 (no copy); without (checking slot_mapping), negatives skip a token.
 */
static sals_status_t check_distinct(const sals_view_t* iv, const char* name, const char* noun,
                                    const sals_view_t* sv, int64_t bound, const char* of) {
  const int64_t N = iv->shape[0];
  int32_t* sorted = (int32_t*)malloc((size_t)(N > 0 ? N : 1) * sizeof(int32_t));
  if (!sorted) return sals_set_error(SALS_ERR_OUT_OF_MEMORY, "out of host memory (%s check)", name);
  int64_t m = 0;
  for (int64_t n = 0; n < N; ++n) {
    if (sv && ((const int32_t*)sv->data)[n * sv->stride[0]] < 0) continue;
    const int32_t s = ((const int32_t*)iv->data)[n * iv->stride[0]];
    if (s >= bound || (sv && s < -1)) {
      free(sorted);
      return sals_set_error(INVALID, "%s[%lld]: %s %d beyond the %s %lld %ss%s", name, (long long)n,
                            noun, (int)s, of, (long long)bound, noun,
                            sv ? " (-1: no copy)" : " (num_blocks * block_size)");
    }
    if (s >= 0) sorted[m++] = s;
  }
  qsort(sorted, (size_t)m, sizeof(int32_t), cmp_i32);
  for (int64_t i = 1; i < m; ++i)
    if (sorted[i] == sorted[i - 1]) {
      const int32_t s = sorted[i];
      free(sorted);
      return sals_set_error(INVALID, "%s: %s %d appears twice (a %s holds one token)", name, noun,
                            (int)s, noun);
    }
  free(sorted);
  return SALS_OK;
}

/* window [rows, 2, n_head_kv, head_dim]: exact copies of tokens, key then value. */
static sals_status_t check_window(const sals_paged_t* p, const sals_view_t* wv) {
  SALS_TRY(sals_check_dim(wv, "window", 1, 2, "a key and a value per row"));
  SALS_TRY(sals_check_dim(wv, "window", 2, p->cfg.n_head_kv, "n_head_kv"));
  return sals_check_dim(wv, "window", 3, p->cfg.head_dim, "head_dim");
}

/* window_rows and window come together. */
static sals_status_t both_or_neither(const DLTensor* rows, const DLTensor* window) {
  if ((rows == NULL) == (window == NULL)) return SALS_OK;
  return sals_set_error(INVALID, rows ? "window: is NULL but window_rows is given"
                                      : "window_rows: is NULL but window is given");
}

sals_status_t sals_paged_append(const sals_paged_t* paged, const DLTensor* k, const DLTensor* v,
                                const DLTensor* slot_mapping, DLTensor* pages,
                                const DLTensor* window_rows, DLTensor* window, void* stream) {
  if (paged == NULL) return sals_set_error(INVALID, "paged: is NULL");
  SALS_TRY(both_or_neither(window_rows, window));
  const sals_config_t* g = &paged->cfg;
  sals_view_t kv, vv, sv, rv, pv, wv;
  DLDevice dev;
  const sals_arg_t a[] = {{k, "k", 3, SALS_ACCEPT_FLOAT, &kv, 0, 0},
                          {v, "v", 3, SALS_ACCEPT_FLOAT, &vv, 0, 0},
                          {slot_mapping, "slot_mapping", 1, SALS_ACCEPT_I32, &sv, 0, 0},
                          {window_rows, "window_rows", 1, SALS_ACCEPT_I32, &rv, 1, 0},
                          {pages, "pages", 3, SALS_ACCEPT_U8, &pv, 0, 1},
                          {window, "window", 4, SALS_ACCEPT_FLOAT, &wv, 1, 1}};
  SALS_TRY(sals_arg_views(a, 6, &dev));
  SALS_TRY(check_call_device(paged, dev, "k", 0, NULL, kv.shape[0]));
  SALS_TRY(sals_check_dim(&kv, "k", 1, g->n_head_kv, "n_head_kv"));
  SALS_TRY(sals_check_dim(&kv, "k", 2, g->head_dim, "head_dim"));
  for (int32_t i = 0; i < 3; ++i) SALS_TRY(sals_dim_eq(&vv, "v", i, &kv, "k", i));
  SALS_TRY(sals_dim_eq(&sv, "slot_mapping", 0, &kv, "k", 0));
  SALS_TRY(check_pages(paged, &pv));
  SALS_TRY(sals_arg_apart(a, 4));
  if (window) {
    SALS_TRY(sals_dim_eq(&rv, "window_rows", 0, &kv, "k", 0));
    SALS_TRY(check_window(paged, &wv));
    SALS_TRY(sals_arg_apart(a, 5));
  }
#if defined(SALS_WITH_CUDA)
  if (dev.device_type == kDLCUDA) /* indices and values are checked on the device */
    return sals_cuda_paged_append(paged, &kv, &vv, &sv, &pv, window ? &rv : NULL,
                                  window ? &wv : NULL, stream);
#endif
  SALS_TRY(check_distinct(&sv, "slot_mapping", "slot", NULL, pv.shape[0] * pv.shape[1], "pages'"));
  if (window) SALS_TRY(check_distinct(&rv, "window_rows", "row", &sv, wv.shape[0], "window's"));
  if (g->check_finite)
    for (int64_t n = 0; n < kv.shape[0]; ++n) {
      if (((const int32_t*)sv.data)[n * sv.stride[0]] < 0) continue;
      for (int64_t h = 0; h < g->n_head_kv; ++h) {
        const int64_t ix[2] = {n, h};
        SALS_TRY(sals_finite_row(&kv, "k", ix, g->head_dim));
        SALS_TRY(sals_finite_row(&vv, "v", ix, g->head_dim));
      }
    }
  if (sals_view_numel(&kv) == 0) return SALS_OK;
  return sals_cpu_paged_append(paged, &kv, &vv, &sv, &pv, window ? &rv : NULL, window ? &wv : NULL);
}

static int32_t i32_at(const sals_view_t* v, int64_t i) {
  return ((const int32_t*)v->data)[i * v->stride[0]];
}

/* Host checks of an attend's indices (sals.h) and, with check_finite, of the queries read. */
static sals_status_t check_attend(const sals_paged_t* p, const sals_view_t* qv,
                                  const sals_view_t* qsv, const sals_view_t* lv,
                                  const sals_view_t* tv, const sals_view_t* pv,
                                  const sals_view_t* selv) {
  const sals_config_t* g = &p->cfg;
  const int64_t B = lv->shape[0], N = qv->shape[0], bs = pv->shape[1], nb = pv->shape[0];
  const int64_t cap = tv->shape[1] * bs;
  int64_t prev = 0;
  for (int64_t b = 0; b <= B; ++b) {
    const int64_t s = i32_at(qsv, b);
    if (s < prev || s > N)
      return sals_set_error(INVALID,
                            "query_start[%lld]: %lld not in %lld..%lld (non-decreasing, "
                            "rows of q)",
                            (long long)b, (long long)s, (long long)prev, (long long)N);
    prev = s;
  }
  int64_t most = 0; /* the most a sparse step may select, over the sequences */
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n_q = i32_at(qsv, b + 1) - i32_at(qsv, b), S = i32_at(lv, b);
    if (S < n_q || S > cap)
      return sals_set_error(INVALID,
                            "seq_lens[%lld]: %lld not in %lld..%lld (its queries .. the "
                            "block table's capacity, block_table.shape[1] * block_size)",
                            (long long)b, (long long)S, (long long)n_q, (long long)cap);
    const int32_t* row = (const int32_t*)tv->data + b * tv->stride[0];
    for (int64_t j = 0; j < (bs > 0 ? (S + bs - 1) / bs : 0); ++j)
      if (row[j] < 0 || row[j] >= nb)
        return sals_set_error(INVALID,
                              "block_table[%lld, %lld]: %d not a block of pages "
                              "(0..%lld)",
                              (long long)b, (long long)j, (int)row[j], (long long)nb - 1);
    if (n_q == 1 && !g->dense) {
      int64_t ns, re;
      sals_windows(g, S, &ns, &re);
      const int64_t budget = sals_budget(g, S);
      most = max_i64(most, budget < re - ns ? budget : re - ns);
    }
    if (g->check_finite)
      for (int64_t t = i32_at(qsv, b); t < i32_at(qsv, b + 1); ++t)
        for (int64_t h = 0; h < g->n_head_q; ++h) {
          const int64_t ix[2] = {t, h};
          SALS_TRY(sals_finite_row(qv, "q", ix, g->head_dim));
        }
  }
  if (selv && selv->shape[2] < most)
    return sals_set_error(INVALID,
                          "selected: dim 2 is %lld, fewer than the %lld tokens a sparse "
                          "step may select here (the budget rule at the longest sequence)",
                          (long long)selv->shape[2], (long long)most);
  return SALS_OK;
}

sals_status_t sals_paged_attend(const sals_paged_t* paged, const DLTensor* q,
                                const DLTensor* query_start, const DLTensor* seq_lens,
                                const DLTensor* block_table, const DLTensor* pages,
                                const DLTensor* window_rows, const DLTensor* window, DLTensor* out,
                                DLTensor* selected, void* stream) {
  if (paged == NULL) return sals_set_error(INVALID, "paged: is NULL");
  SALS_TRY(both_or_neither(window_rows, window));
  const sals_config_t* g = &paged->cfg;
  sals_view_t qv, qsv, lv, tv, pv, rv, wv, ov, selv;
  DLDevice dev;
  const sals_arg_t a[] = {{q, "q", 3, SALS_ACCEPT_FLOAT, &qv, 0, 0},
                          {query_start, "query_start", 1, SALS_ACCEPT_I32, &qsv, 0, 0},
                          {seq_lens, "seq_lens", 1, SALS_ACCEPT_I32, &lv, 0, 0},
                          {block_table, "block_table", 2, SALS_ACCEPT_I32, &tv, 0, 0},
                          {pages, "pages", 3, SALS_ACCEPT_U8, &pv, 0, 0},
                          {window_rows, "window_rows", 2, SALS_ACCEPT_I32, &rv, 1, 0},
                          {window, "window", 4, SALS_ACCEPT_FLOAT, &wv, 1, 0},
                          {out, "out", 3, SALS_ACCEPT_FLOAT, &ov, 0, 1},
                          {selected, "selected", 3, SALS_ACCEPT_I32, &selv, 1, 1}};
  SALS_TRY(sals_arg_views(a, 9, &dev));
  SALS_TRY(check_call_device(paged, dev, "q", lv.shape[0], "seq_lens", qv.shape[0]));
  SALS_TRY(sals_check_dim(&qv, "q", 1, g->n_head_q, "n_head_q"));
  SALS_TRY(sals_check_dim(&qv, "q", 2, g->head_dim, "head_dim"));
  const int64_t B = lv.shape[0];
  SALS_TRY(sals_check_dim(&qsv, "query_start", 0, B + 1, "seq_lens.shape[0] + 1"));
  SALS_TRY(sals_dim_eq(&tv, "block_table", 0, &lv, "seq_lens", 0));
  SALS_TRY(check_pages(paged, &pv));
  for (int32_t i = 0; i < 3; ++i) SALS_TRY(sals_dim_eq(&ov, "out", i, &qv, "q", i));
  if (window) {
    SALS_TRY(sals_dim_eq(&rv, "window_rows", 0, &lv, "seq_lens", 0));
    SALS_TRY(sals_check_dim(&rv, "window_rows", 1, (int64_t)g->n_sink + g->n_recent,
                            "n_sink + n_recent"));
    SALS_TRY(check_window(paged, &wv));
  }
  if (selected) {
    SALS_TRY(sals_dim_eq(&selv, "selected", 0, &lv, "seq_lens", 0));
    SALS_TRY(sals_check_dim(
        &selv, "selected", 1, paged->n_sel_heads,
        paged->n_sel_heads == 1 ? "1: shared selection" : "n_head_kv: per-head selection"));
  }
  SALS_TRY(sals_arg_apart(a, 7));
  if (selected) SALS_TRY(sals_arg_apart(a, 8));
  if (B == 0) return SALS_OK;
#if defined(SALS_WITH_CUDA)
  if (dev.device_type == kDLCUDA) /* indices and values are checked on the device */
    return sals_cuda_paged_attend(paged, &qv, &qsv, &lv, &tv, &pv, window ? &rv : NULL,
                                  window ? &wv : NULL, &ov, selected ? &selv : NULL, stream);
#endif
  SALS_TRY(check_attend(paged, &qv, &qsv, &lv, &tv, &pv, selected ? &selv : NULL));
  if (window)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = 0; j < rv.shape[1]; ++j) {
        const int32_t row = ((const int32_t*)rv.data)[b * rv.stride[0] + j];
        if (row < -1 || row >= wv.shape[0])
          return sals_set_error(INVALID,
                                "window_rows[%lld, %lld]: %d not a row of window "
                                "(-1..%lld)",
                                (long long)b, (long long)j, (int)row, (long long)wv.shape[0] - 1);
      }
  return sals_cpu_paged_attend(paged, &qv, &qsv, &lv, &tv, &pv, window ? &rv : NULL,
                               window ? &wv : NULL, &ov, selected ? &selv : NULL);
}

sals_status_t sals_paged_check(const sals_paged_t* paged, int32_t wait, void* stream) {
  if (paged == NULL) return sals_set_error(INVALID, "paged: is NULL");
  if (wait != 0 && wait != 1) return sals_set_error(INVALID, "wait: %d must be 0 or 1", (int)wait);
#if defined(SALS_WITH_CUDA)
  if (paged->backend) return sals_cuda_paged_check(paged, wait, stream);
#endif
  (void)stream;
  return SALS_OK;
}
