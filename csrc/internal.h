/*
 * Internal interface between the validating C ABI layer (csrc/api.c, csrc/cache.c) and the
 * backends (csrc/cpu/ for the host, cuda/ for NVIDIA GPUs). Not installed, not API.
 *
 * The ABI layer checks every argument, converts DLTensors to sals_view_t (byte_offset applied,
 * strides filled in, last dim contiguous) and calls the backend of the tensors' device. Backends
 * trust their arguments.
 */
#ifndef SALS_INTERNAL_H_
#define SALS_INTERNAL_H_

#include <stddef.h>
#include <stdint.h>

#include "sals/sals.h"

#ifdef __cplusplus
extern "C" {
#endif

#define SALS_MAX_DIMS 4

/** Element types a view may hold. */
typedef enum sals_elem {
  SALS_ELEM_F32 = 0,
  SALS_ELEM_F16 = 1,
  SALS_ELEM_BF16 = 2,
  SALS_ELEM_I32 = 3,
  SALS_ELEM_U8 = 4,
} sals_elem_t;

/** A validated tensor view: data points at element 0; strides in elements; stride[ndim-1] == 1. */
typedef struct sals_view {
  void* data;
  sals_elem_t elem;
  int32_t ndim;
  int64_t shape[SALS_MAX_DIMS];
  int64_t stride[SALS_MAX_DIMS];
} sals_view_t;

/** Bytes of one element of type `elem`. */
static inline size_t sals_elem_size(sals_elem_t elem) {
  return elem == SALS_ELEM_U8 ? 1 : (elem == SALS_ELEM_F16 || elem == SALS_ELEM_BF16) ? 2 : 4;
}

/** Bytes and view element type of a cache storage type. */
static inline size_t sals_dtype_size(sals_dtype_t t) { return t == SALS_DTYPE_FLOAT32 ? 4 : 2; }
static inline sals_elem_t sals_dtype_elem(sals_dtype_t t) {
  return t == SALS_DTYPE_FLOAT32 ? SALS_ELEM_F32
                                 : (t == SALS_DTYPE_FLOAT16 ? SALS_ELEM_F16 : SALS_ELEM_BF16);
}

/**
 * The cache. The struct lives in host memory; every pointer below points at memory on
 * cfg.device. Layouts (all compact row-major, `b` = sequence slot, `t` = token slot):
 *   proj        float32 [Dk, rank]
 *   lat_score   key_bits == 16: dtype [max_batch, max_tokens, score_rank]   leading latent
 *               else      uint8 [max_batch, max_tokens, score_rank * key_bits / 8]
 *                                                   coordinates, so the scoring pass streams them
 *   lat_rest    key_bits == 16: dtype [max_batch, max_tokens, rank - score_rank]
 *               else      uint8 [max_batch, max_tokens, (rank - score_rank) * key_bits / 8]
 *                                                   (NULL when rank == score_rank)
 *   lat_score_scale,
 *   lat_score_zero  float16 bits [max_batch, max_tokens, score_rank / key_group]
 *   lat_rest_scale,
 *   lat_rest_zero   float16 bits [max_batch, max_tokens, (rank - score_rank) / key_group]
 *                                                   (all NULL at 16 bits; rest ones NULL when
 *                                                   rank == score_rank)
 *   val         value_bits == 16: dtype [max_batch, max_tokens, Dk]
 *               else      uint8 [max_batch, max_tokens, Dk * value_bits / 8]
 *   val_scale,
 *   val_zero    float16 bits [max_batch, max_tokens, Dk / value_group] (NULL at 16 bits)
 *   sink_k/v    dtype   [max_batch, n_sink, Dk]     exact pre-RoPE keys/values of slots < n_sink
 *   recent_k/v  dtype   [max_batch, n_recent, Dk]   ring: token slot t lives at t % n_recent
 *   pos         int32   [max_batch, max_tokens]     position of each stored token
 *   len         int32   [max_batch]                 tokens stored per sequence
 *   sel_idx     int32   [max_batch, n_sel_heads, max_tokens]  last selection, -1 padded
 *   sel_count   int32   [max_batch]
 *   inv_freq    float32 [rotary_dim / 2]
 * Every token is in the latent cache and the value store; sinks and recent tokens are also
 * kept exact, and attention reads them from the exact copies.
 */
struct sals_cache {
  sals_config_t cfg;
  int32_t dk;             /* n_head_kv * head_dim */
  int32_t n_sel_heads;    /* 1 (shared selection) or n_head_kv */
  int32_t n_groups;       /* Dk / value_group */
  int64_t val_row_bytes;  /* bytes of one token's stored value */
  int64_t lat_score_bytes; /* bytes of one token's lat_score row */
  int64_t lat_rest_bytes;  /* bytes of one token's lat_rest row */
  float scale;            /* resolved softmax scale */
  int32_t rotary_dim;
  float attention_scaling;
  int32_t interleaved;
  float* inv_freq;
  float* inv_freq_host;

  float* proj;
  void* lat_score;
  void* lat_rest;
  uint16_t* lat_score_scale;
  uint16_t* lat_score_zero;
  uint16_t* lat_rest_scale;
  uint16_t* lat_rest_zero;
  void* val;
  uint16_t* val_scale;
  uint16_t* val_zero;
  void* sink_k;
  void* sink_v;
  void* recent_k;
  void* recent_v;
  int32_t* pos;
  int32_t* len;
  int32_t* sel_idx;
  int32_t* sel_count;

  int32_t* reserved;      /* host [max_batch]: slots reserved per sequence (capacity check) */
  int32_t busy;           /* host: 1 while a call is inside (atomic; see csrc/cache.c) */
  uint64_t allocated;     /* bytes allocated on cfg.device */
  void* backend;          /* backend-private state (workspace, streams, flags) */
};

/* ---- errors (csrc/error.c) ---------------------------------------------------------------- */

/** Evaluate `expr`, a sals_status_t, and return it from the calling function unless SALS_OK. */
#define SALS_TRY(expr)                        \
  do {                                        \
    sals_status_t sals_st_ = (expr);          \
    if (sals_st_ != SALS_OK) return sals_st_; \
  } while (0)

/** Record a printf-style message as this thread's last error and return `status`. */
sals_status_t sals_set_error(sals_status_t status, const char* fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

/* ---- shared by the cache and paged storage (csrc/cache.c) -------------------------------- */

/**
 * The config fields of the method (shapes, rank, quantisation, windows, budget, selection,
 * dtype, scale, check_finite), each refused naming it ("config.rank: 300 > Dk 256"). The cache
 * also checks its sizes, threads and device.
 */
sals_status_t sals_check_method(const sals_config_t* g);

/** config.device: cpu (device_id 0) or cuda with an ordinal >= 0, refused naming it. */
sals_status_t sals_check_config_device(const sals_config_t* g);

/**
 * A compact float32 host copy (malloc'd, *out) of the projection view [Dk, rank] on `pdev`
 * (host or a GPU), refused unless finite with orthonormal columns (sals_cache_create's rule).
 */
sals_status_t sals_projection_host(const sals_view_t* pv, DLDevice pdev, float** out);

/**
 * Release every buffer listed in struct sals_cache that a backend allocates (those not NULL)
 * with `release` (free, or the CUDA backend's cudaFree), then set them to NULL.
 */
void sals_cache_release_buffers(sals_cache_t* c, void (*release)(void* p));

/* ---- paged storage (csrc/paged.c) ---------------------------------------------------------- */

/** Byte offsets of a paged slot's fields (sals.h's slot layout); -1 where a field is absent. */
typedef struct {
  int64_t slot_bytes;
  int64_t align; /* the widest element of the slot: pages' address and strides are multiples */
  int64_t lat[2], lat_scale[2], lat_zero[2]; /* latent coordinates [0, score_rank), the rest */
  int64_t val, val_scale, val_zero;
} sals_paged_layout_t;

/** The slot layout of a config whose method fields passed sals_check_method. */
void sals_paged_layout(const sals_config_t* g, sals_paged_layout_t* out);

/**
 * Immutable settings of one layer's paged storage; the pointers below are host memory. With
 * cfg.device on CUDA, `backend` holds the CUDA backend's device copies (cuda/paged.cu), else
 * NULL.
 */
struct sals_paged {
  sals_config_t cfg;
  int32_t dk;
  int32_t n_sel_heads;    /* 1 (shared selection) or n_head_kv */
  float scale;            /* resolved softmax scale */
  int32_t rotary_dim;
  float attention_scaling;
  int32_t interleaved;
  float* inv_freq;        /* [max(rotary_dim / 2, 1)] */
  float* proj;            /* [Dk, rank] float32 */
  sals_paged_layout_t layout;
  void* backend;
};

/*
 * The CPU backend of paged storage (csrc/cpu/paged.c), on validated views: slot_mapping entries
 * are below num_blocks * block_size and distinct; query_start, seq_lens and the used block
 * table entries are in range; window rows are -1 or rows of `window`; `selected`, window_rows
 * and window are NULL when absent. The CUDA backend (below) takes the same views with only
 * their shapes, dtypes, strides and devices checked: it checks index values on the device.
 */
sals_status_t sals_cpu_paged_append(const sals_paged_t* p, const sals_view_t* k,
                                    const sals_view_t* v, const sals_view_t* slots,
                                    const sals_view_t* pages, const sals_view_t* window_rows,
                                    const sals_view_t* window);
sals_status_t sals_cpu_paged_attend(const sals_paged_t* p, const sals_view_t* q,
                                    const sals_view_t* query_start, const sals_view_t* seq_lens,
                                    const sals_view_t* block_table, const sals_view_t* pages,
                                    const sals_view_t* window_rows, const sals_view_t* window,
                                    const sals_view_t* out, const sals_view_t* selected);

/* ---- backends ----------------------------------------------------------------------------- */
/* Each backend implements the same entry points; `stream` is ignored on the CPU.            */

#define SALS_BACKEND_DECLARE(prefix)                                                               \
  sals_status_t prefix##_cache_init(sals_cache_t* c);                                              \
  void prefix##_cache_free(sals_cache_t* c);                                                       \
  sals_status_t prefix##_cache_reset(sals_cache_t* c, int64_t batch, void* stream);                \
  sals_status_t prefix##_cache_append(sals_cache_t* c, const sals_view_t* k, const sals_view_t* v, \
                                      const sals_view_t* pos, void* stream);                       \
  sals_status_t prefix##_cache_attend(sals_cache_t* c, const sals_view_t* q,                       \
                                      const sals_view_t* q_pos, const sals_view_t* out,            \
                                      void* stream);                                               \
  sals_status_t prefix##_cache_lengths(const sals_cache_t* c, const sals_view_t* out,              \
                                       void* stream);                                              \
  sals_status_t prefix##_cache_selected(const sals_cache_t* c, const sals_view_t* idx,             \
                                        const sals_view_t* count, void* stream);                   \
  sals_status_t prefix##_cache_lengths_host(const sals_cache_t* c, int32_t* out, void* stream);    \
  sals_status_t prefix##_cache_check(sals_cache_t* c, int32_t wait, void* stream);                 \
  sals_status_t prefix##_project(const sals_view_t* x, const sals_view_t* proj,                    \
                                 const sals_view_t* out, void* stream);                            \
  sals_status_t prefix##_rope_apply(                                                               \
      const sals_view_t* x, const sals_view_t* pos, const float* inv_freq, int32_t rotary_dim,     \
      float attention_scaling, int32_t interleaved, const sals_view_t* out, void* stream);         \
  sals_status_t prefix##_score_select(const sals_view_t* q_lat, const sals_view_t* k_lat,          \
                                      const sals_view_t* lengths, int32_t score_rank,              \
                                      int32_t n_sink, int32_t n_recent, int32_t budget,            \
                                      const sals_view_t* idx, void* stream);                       \
  sals_status_t prefix##_rebuild_rope(const sals_view_t* k_lat, const sals_view_t* proj,           \
                                      const sals_view_t* pos, const float* inv_freq,               \
                                      int32_t rotary_dim, float attention_scaling,                 \
                                      int32_t interleaved, const sals_view_t* out, void* stream);  \
  sals_status_t prefix##_sparse_attention(                                                         \
      const sals_view_t* q, const sals_view_t* k, const sals_view_t* v, const sals_view_t* idx,    \
      const sals_view_t* lengths, float scale, const sals_view_t* out, void* stream);              \
  sals_status_t prefix##_quantize_values(const sals_view_t* v, int32_t bits, int32_t group,        \
                                         const sals_view_t* packed, const sals_view_t* scale,      \
                                         const sals_view_t* zero, void* stream);                   \
  sals_status_t prefix##_dequantize_values(const sals_view_t* packed, const sals_view_t* scale,    \
                                           const sals_view_t* zero, int32_t bits, int32_t group,   \
                                           const sals_view_t* out, void* stream);

/*
 * Notes binding on both backends:
 * - cache_init allocates every buffer listed in struct sals_cache (and the workspace) on
 *   cfg.device, copies nothing else; cache_free releases them (NULL-safe). The ABI layer fills
 *   cfg, the derived ints, inv_freq_host and `proj` contents via the backend after init.
 * - cache_reset, cache_append and cache_attend act on sequences 0..B-1 of the cache they are
 *   given (B: `batch`, or dim 0 of the tensors), which for the *_range calls is a copy whose
 *   per-sequence pointers start at sequence `first` (csrc/cache.c from_sequence): they reach
 *   sequences through those pointers only, index their workspace from sequence 0, and never
 *   write the struct itself.
 * - In stateless functions, rope inv_freq is host memory (the CUDA backend passes the values
 *   to kernels by copying them into kernel parameters or a workspace: no allocation).
 * - Optional views (lengths, idx) arrive as NULL pointers when absent.
 */
SALS_BACKEND_DECLARE(sals_cpu)
#if defined(SALS_WITH_CUDA)
SALS_BACKEND_DECLARE(sals_cuda)
/** Copy `bytes` from host `src` into the cache's device memory at `dst` (synchronous). */
sals_status_t sals_cuda_upload(void* dst, const void* src, size_t bytes);
/** Copy `bytes` from device memory `src` (any CUDA device) to host `dst_host` (synchronous). */
sals_status_t sals_cuda_download(void* dst_host, const void* src_dev, size_t bytes);
int32_t sals_cuda_device_usable(void);
/*
 * Paged storage on CUDA (cuda/paged.cu). paged_init makes the settings' device copies on
 * cfg.device (synchronous); paged_free releases them (NULL-safe). append and attend take the
 * views of the CPU backend's functions, on the settings' device; paged_check reports the
 * deferred checks (sals_paged_check).
 */
sals_status_t sals_cuda_paged_init(sals_paged_t* p);
void sals_cuda_paged_free(sals_paged_t* p);
sals_status_t sals_cuda_paged_append(const sals_paged_t* p, const sals_view_t* k,
                                     const sals_view_t* v, const sals_view_t* slots,
                                     const sals_view_t* pages, const sals_view_t* window_rows,
                                     const sals_view_t* window, void* stream);
sals_status_t sals_cuda_paged_attend(const sals_paged_t* p, const sals_view_t* q,
                                     const sals_view_t* query_start, const sals_view_t* seq_lens,
                                     const sals_view_t* block_table, const sals_view_t* pages,
                                     const sals_view_t* window_rows, const sals_view_t* window,
                                     const sals_view_t* out, const sals_view_t* selected,
                                     void* stream);
sals_status_t sals_cuda_paged_check(const sals_paged_t* p, int32_t wait, void* stream);
#endif

#ifdef __cplusplus
}
#endif
#endif /* SALS_INTERNAL_H_ */
