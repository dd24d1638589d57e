/*
 * sals: Sparse Attention in Latent Space (arXiv 2510.24273), public C ABI.
 *
 * This header is the whole contract: what is not declared here is not API.
 *
 * The method, per attention layer and decode step:
 *   1. every appended pre-RoPE key k (all KV heads concatenated, Dk = n_head_kv * head_dim)
 *      is stored as a latent vector k~ = U^T k of `rank` coordinates (U: [Dk, rank], from
 *      calibration), optionally group-quantised (key_bits); its value is group-quantised;
 *      the first `n_sink` tokens and the last `n_recent` tokens are also kept exact;
 *   2. the pre-RoPE query is folded per GQA group, projected (q~ = U^T q), and scored against
 *      the leading `score_rank` latent coordinates of every candidate token (no RoPE);
 *   3. the top `budget` candidates are selected; only their keys are rebuilt (U k~), rotated
 *      at their own positions, and attended exactly, together with the sinks and the recent
 *      window.
 *
 * Conventions
 *   - Every fallible function returns a sals_status_t. On failure sals_last_error() gives a
 *     message naming the argument ("k: expected 4 dims, got 3"); nothing is modified.
 *   - Tensors are DLTensor views (strides count elements, NULL strides = compact). The last
 *     dimension must be contiguous (stride 1); other dimensions may have any stride, with a
 *     span below 2^48 elements. data + byte_offset must be aligned to the element size;
 *     byte_offset is at most 2^48 elements, and no element's address may wrap around the
 *     address space. A tensor without elements (an extent 0) is accepted whatever its strides
 *     and data.
 *     Accepted float dtypes: float32, float16, bfloat16 (arithmetic accumulates in float32).
 *     Index tensors are int32.
 *   - Outputs: every element must have its own memory (no zero strides or overlapping rows on
 *     dimensions of extent > 1), and an output may not overlap an input unless a function
 *     says so. Results are rounded to the output's dtype like a cast (beyond its range: inf).
 *   - A function borrows its tensors for the duration of the call and keeps no pointer to them.
 *   - Device: a cache lives on the device named in its config; every tensor passed to it must
 *     be on that device. Stateless functions run where their tensors are (all on one device).
 *   - `stream` is a cudaStream_t for CUDA tensors (NULL = legacy default stream) and is ignored
 *     on the CPU. CUDA work is only enqueued on that stream: no host synchronisation and no
 *     allocation happens inside sals_cache_append / sals_cache_attend unless a comment says so.
 *   - Positions are int32 token positions as the model's RoPE sees them. A position < 0 marks
 *     a padding slot (left or right padding): it is not stored and its output row is zero.
 *   - Thread safety: the stateless functions are thread-safe, and distinct caches may be used
 *     from distinct threads. One cache is used by one thread at a time: a cache call that
 *     arrives while another call is inside the same cache fails with
 *     SALS_ERR_INVALID_ARGUMENT ("cache: ... while another call is using the cache") and
 *     changes nothing, instead of racing. sals_cache_destroy cannot fail, so it must not run
 *     while another call uses the cache.
 */
#ifndef SALS_SALS_H_
#define SALS_SALS_H_

#include <stddef.h>
#include <stdint.h>

#include "sals/dlpack.h"

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#if defined(SALS_BUILDING_LIBRARY)
#define SALS_API __declspec(dllexport)
#else
#define SALS_API __declspec(dllimport)
#endif
#else
#define SALS_API __attribute__((visibility("default")))
#endif

/* ------------------------------------------------------------------------------------------ */
/* Versions                                                                                    */
/* ------------------------------------------------------------------------------------------ */

/** The minor version grows when functions or types are added (the ABI stays); see ABI below. */
#define SALS_VERSION_MAJOR 0
#define SALS_VERSION_MINOR 3
#define SALS_VERSION_PATCH 0
#define SALS_VERSION_STRING "0.3.0"
/**
 * Bumped whenever a struct layout, enum value or function signature in this header changes;
 * added functions leave it as it is (a library without them fails to load, by their name).
 */
#define SALS_ABI_VERSION 2

/** Largest sals_config_t.n_threads: CPU worker threads of one cache. */
#define SALS_MAX_THREADS 1024

/** The library's version string, e.g. "0.3.0". */
SALS_API const char* sals_version(void);
/** The library's ABI version; compare with SALS_ABI_VERSION to detect a header/library mismatch. */
SALS_API int32_t sals_abi_version(void);
/** 1 if the library was built with CUDA kernels and a CUDA device is usable now, else 0. */
SALS_API int32_t sals_cuda_available(void);

/* ------------------------------------------------------------------------------------------ */
/* Status and errors                                                                           */
/* ------------------------------------------------------------------------------------------ */

/** Result of every fallible call. New values are only ever added at the end. */
typedef enum sals_status {
  SALS_OK = 0,
  SALS_ERR_INVALID_ARGUMENT = 1, /**< a NULL, a wrong shape, dtype, stride or value */
  SALS_ERR_UNSUPPORTED = 2,      /**< valid, but not implemented for this device/dtype/size */
  SALS_ERR_OUT_OF_MEMORY = 3,    /**< host or device allocation failed */
  SALS_ERR_CAPACITY = 4,         /**< max_batch or max_tokens of the cache would be exceeded */
  SALS_ERR_NOT_FINITE = 5,       /**< an input holds NaN or infinity, or a value that would
                                      become infinity where the cache stores it */
  SALS_ERR_DEVICE = 6,           /**< a CUDA runtime error */
} sals_status_t;

/** A static string naming a status ("SALS_ERR_CAPACITY"); never NULL. */
SALS_API const char* sals_status_string(sals_status_t status);
/**
 * The message of the last failed call on this thread ("" if none). Thread-local; valid until
 * the next sals call on the same thread.
 */
SALS_API const char* sals_last_error(void);

/* ------------------------------------------------------------------------------------------ */
/* Configuration                                                                               */
/* ------------------------------------------------------------------------------------------ */

/** Storage type of 16-bit latent keys, the exact windows and 16-bit values. */
typedef enum sals_dtype {
  SALS_DTYPE_FLOAT32 = 0,
  SALS_DTYPE_FLOAT16 = 1,
  SALS_DTYPE_BFLOAT16 = 2,
} sals_dtype_t;

/**
 * One attention layer's cache settings. Start from sals_config_default() and set the shape
 * fields; the defaults are the paper's (16 sinks, 64 recent, budget 1/8, shared selection).
 */
typedef struct sals_config {
  int32_t n_head_q;        /**< query heads (Hq); a multiple of n_head_kv */
  int32_t n_head_kv;       /**< key/value heads (Hkv) */
  int32_t head_dim;        /**< d; Dk = n_head_kv * head_dim */
  int32_t rank;            /**< latent rank r, 1..Dk; columns of the projection */
  int32_t score_rank;      /**< r*, 1..rank: leading latent coordinates used for scoring */
  int32_t value_bits;      /**< 16 (stored in `dtype`), 8, 4 or 2 (group-quantised) */
  int32_t value_group;     /**< channels per quantisation group; divides head_dim; default 32 */
  /**
   * Latent key storage: 16 (each coordinate in `dtype`), 8 or 4: group-quantised like values
   * (sals_quantize_values: asymmetric, a float16 scale and zero per group, whatever `dtype`),
   * the score_rank leading coordinates and the rank - score_rank others quantised apart, so
   * scoring reads only the former. Scores and rebuilt keys use the dequantised coordinates.
   * Both backends; the CUDA backend's codes, scales and zeros are the CPU's for the same
   * latent coordinates. Default 16.
   */
  int32_t key_bits;
  /**
   * Latent coordinates per key quantisation group (key_bits < 16): >= 1, divides score_rank
   * and rank - score_rank, and key_group * key_bits / 8 is whole. Default 32.
   */
  int32_t key_group;
  int32_t n_sink;          /**< first tokens always attended and kept exact; default 16 */
  int32_t n_recent;        /**< last tokens always attended and kept exact; default 64 */
  /**
   * Tokens selected per step among the candidates (tokens that are neither sinks nor recent):
   * budget_tokens if > 0, else ceil(budget_frac * S) with S the sequence's length. Clamped to
   * the number of candidates, so a budget covering the sequence selects every token.
   */
  float budget_frac;       /**< in (0, 1]; default 0.125 */
  int32_t budget_tokens;   /**< fixed count, >= 0; 0 = use budget_frac; default 0 */
  int32_t select_per_head; /**< 0: one selection shared by all heads (the paper); 1: per KV head */
  int32_t dense; /**< 1: attend every token with rebuilt keys (dense layers) */
  int32_t max_batch; /**< sequences held, >= 1 */
  int32_t max_tokens; /**< tokens held per sequence, >= 1 */
  sals_dtype_t dtype; /**< storage type; default SALS_DTYPE_FLOAT16 */
  float scale; /**< softmax scale; 0 = 1/sqrt(head_dim) */
  /**
   * 1: report NaN/inf inputs with SALS_ERR_NOT_FINITE, naming the argument. On the CPU the
   * call is refused before anything changes, and this includes appended values the storage
   * cannot hold: a k or v element, or a latent coordinate of U^T k, beyond the largest finite
   * value of `dtype` (65504 for float16), or a group whose float16 scale or zero would be
   * infinite (value_bits < 16: |v| must stay within float16's range; key_bits < 16: the same
   * for the latent coordinates, refused naming k); with 0, or on CUDA, such values are
   * stored as infinity. On CUDA the NaN/inf check is a kernel on the call's stream that
   * raises a flag in mapped host memory, with no host synchronisation (graph capturable), and
   * with key_bits < 16 the quantisation of the latent coordinates raises one for an infinite
   * scale or zero (reported naming k):
   * the error is returned by the first later append or attend of the cache (which read the
   * flag without waiting) or by sals_cache_check; the cache then holds the offending token
   * (reset it). Default 1.
   */
  int32_t check_finite;
  int32_t n_threads; /**< CPU worker threads, 0..SALS_MAX_THREADS; 0 = one per online core */
  /** where the cache lives (paged storage: its settings): {kDLCPU, 0} or {kDLCUDA, ordinal} */
  DLDevice device;
} sals_config_t;

/** Paper defaults with zero shape fields; the caller must set n_head_q .. max_tokens. */
SALS_API sals_config_t sals_config_default(void);

/**
 * Check a config as sals_cache_create does, without allocating anything: every field's
 * range, the relations between fields (n_head_q a multiple of n_head_kv, rank <= Dk, groups
 * dividing their dimensions, ...) and the size limits, with the same status and message
 * naming the field ("config.n_sink: -1 must be >= 0"). The projection, the rope and whether
 * the device's backend is built are not checked: sals_cache_create checks them. For a front
 * end that validates settings early, before it knows everything a cache needs.
 */
SALS_API sals_status_t sals_config_check(const sals_config_t* config);

/**
 * Rotary position embedding, as HF models describe it. Scalings (Llama-3, linear, YaRN, ...)
 * are folded into inv_freq. A key or query x at position p becomes, for i < rotary_dim/2 and
 * theta = p * inv_freq[i], c = attention_scaling * cos(theta), s = attention_scaling * sin(theta):
 *   rotate-half (interleaved = 0): pairs (i, i + rotary_dim/2)
 *   interleaved (interleaved = 1): pairs (2i, 2i + 1)
 *   (x_a, x_b) -> (x_a c - x_b s, x_b c + x_a s);  dims >= rotary_dim are left unchanged.
 * theta, cos and sin are computed in float32.
 */
typedef struct sals_rope {
  const float* inv_freq; /**< host memory, rotary_dim/2 entries; borrowed (copied by a cache) */
  int32_t rotary_dim; /**< even, <= head_dim; 0 = no rotary embedding (inv_freq unused) */
  float attention_scaling; /**< multiplies cos and sin; 1 for most models */
  int32_t interleaved; /**< 0 rotate-half (Llama, Mistral, Qwen, Gemma), 1 interleaved */
} sals_rope_t;

/* ------------------------------------------------------------------------------------------ */
/* The cache: one attention layer, up to max_batch sequences                                   */
/* ------------------------------------------------------------------------------------------ */

/** Opaque per-layer cache. */
typedef struct sals_cache sals_cache_t;

/**
 * Create a cache and allocate all of its memory (cache, workspace) on config->device.
 * projection: [Dk, rank] float (U_r, orthonormal columns; an identity gives full rank), on any
 *   device; copied (as float32) into the cache, so the caller may free it afterwards. Columns
 *   that are not orthonormal fail with SALS_ERR_INVALID_ARGUMENT: every squared column norm
 *   must be within tol of 1, and (U^T U - I) x within tol * sqrt(rank) for 4 fixed random
 *   +-1 vectors x (a check costing 8 Dk rank, where the whole Gram matrix would cost
 *   Dk rank^2); tol = 1e-3 for float32, 2^-9 for float16 and 2^-6 for bfloat16 projections
 *   (4 units of their roundoff, which rounding an orthonormal matrix stays within).
 * rope: copied. Creation synchronises the device (it is not on the hot path).
 * A config whose sizes would pass 2^52 bytes (or whose counts overflow int32) fails with
 * SALS_ERR_INVALID_ARGUMENT, and a failed allocation with SALS_ERR_OUT_OF_MEMORY; both messages
 * name the config fields that make the cache large ("config.max_batch, config.max_tokens: ...").
 * On success *out owns the cache: release it with sals_cache_destroy.
 */
SALS_API sals_status_t sals_cache_create(const sals_config_t* config, const sals_rope_t* rope,
                                         const DLTensor* projection, sals_cache_t** out);

/** Free the cache and all its memory. NULL is a no-op. */
SALS_API void sals_cache_destroy(sals_cache_t* cache);

/** Empty every sequence (lengths to 0); memory stays allocated. */
SALS_API sals_status_t sals_cache_reset(sals_cache_t* cache, void* stream);

/**
 * Empty sequences first..first+batch-1 (lengths and reservations to 0, no selection), leaving
 * the others as they are: a serving engine frees the slot of a finished sequence this way and
 * admits the next one into it (sals_cache_append_range). Fails with SALS_ERR_INVALID_ARGUMENT
 * (first < 0 or batch < 0) or SALS_ERR_CAPACITY (first + batch > max_batch), naming the
 * argument and resetting nothing. Work only on `stream`.
 */
SALS_API sals_status_t sals_cache_reset_range(sals_cache_t* cache, int64_t first, int64_t batch,
                                              void* stream);

/** Copy the cache's configuration to *out. */
SALS_API sals_status_t sals_cache_get_config(const sals_cache_t* cache, sals_config_t* out);

/**
 * Append a chunk of tokens (a prefill chunk, or one decode token: T = 1) to sequences 0..B-1.
 * k, v: [B, T, n_head_kv, head_dim] pre-RoPE keys and values (after any k_norm).
 * positions: [B, T] int32; a slot at a position < 0 is padding and is skipped, so each
 *       sequence grows by its count of non-negative positions (ragged batches).
 * Capacity is reserved conservatively and checked on the host without reading positions: each call
 * reserves T slots for each sequence it appends to, kept per sequence until that sequence is
 * reset, and fails with SALS_ERR_CAPACITY (changing nothing) if that would pass max_tokens, or
 * if B > max_batch. sals_cache_append_range with first = 0.
 */
SALS_API sals_status_t sals_cache_append(sals_cache_t* cache, const DLTensor* k, const DLTensor* v,
                                         const DLTensor* positions, void* stream);

/**
 * sals_cache_append to sequences first..first+B-1: row b of k, v and positions goes to sequence
 * first + b; no other sequence is read or changed. Sequences may so be filled one (or a few)
 * at a time, each in chunks of tokens, in any order, each reserving only its own slots, and end
 * as after appending the whole batch at once: byte for byte on the CPU; on CUDA the values and
 * windows alike, the latent keys within float32 rounding (the projection's kernel depends on
 * the rows appended per call). A prefill then needs the activations of one group of
 * sequences, not of the batch.
 * first < 0 fails with SALS_ERR_INVALID_ARGUMENT, first + B > max_batch with
 * SALS_ERR_CAPACITY; both messages name `first`, and nothing is changed.
 */
SALS_API sals_status_t sals_cache_append_range(sals_cache_t* cache, int64_t first,
                                               const DLTensor* k, const DLTensor* v,
                                               const DLTensor* positions, void* stream);

/**
 * Attention of new queries over everything the cache holds (append the step's own key first).
 * q:         [B, T, n_head_q, head_dim] pre-RoPE queries (after any q_norm), rotated here at
 *            their positions.
 * positions: [B, T] int32; a query row at a position < 0 is padding and its output row is 0.
 * out:       [B, T, n_head_q, head_dim], any float dtype; may not overlap q or positions.
 * A key is visible to a query when its position is <= the query's position (causal).
 * With T == 1 and config.dense == 0 the step is sparse: sinks, recent window and the selected
 * candidates. Otherwise (T > 1 or dense) every visible token is attended, with rebuilt keys and
 * dequantised values outside the exact windows. sals_cache_attend_range with first = 0.
 */
SALS_API sals_status_t sals_cache_attend(sals_cache_t* cache, const DLTensor* q,
                                         const DLTensor* positions, DLTensor* out, void* stream);

/**
 * sals_cache_attend of sequences first..first+B-1: row b of q, positions and out belongs to
 * sequence first + b. A sequence gets the selection a whole-batch attend makes for it and its
 * output up to float32 rounding (how a step's work is split depends on B); the selections of
 * the other sequences are kept (sals_cache_selected). Errors on `first` as in
 * sals_cache_append_range.
 */
SALS_API sals_status_t sals_cache_attend_range(sals_cache_t* cache, int64_t first,
                                               const DLTensor* q, const DLTensor* positions,
                                               DLTensor* out, void* stream);

/**
 * Reserve `tokens` more slots for each of sequences 0..batch-1 without appending: for appends
 * the host does not see (replays of a captured CUDA graph, which re-run the kernels but not
 * this library's host code; a captured *_range call replays on the same sequences). Fails
 * with SALS_ERR_CAPACITY, reserving nothing, if a sequence would pass max_tokens. No device
 * work.
 */
SALS_API sals_status_t sals_cache_reserve(sals_cache_t* cache, int64_t batch, int32_t tokens);

/**
 * Report what the deferred finite checks of earlier calls found (config.check_finite on CUDA):
 * SALS_ERR_NOT_FINITE naming the argument, once, then the flag is clear. wait = 1 first waits
 * for `stream` (skipped while it is being captured), so every earlier call is covered; wait = 0
 * reads the flag as it stands, without synchronising. Always SALS_OK on the CPU, whose checks
 * are immediate.
 */
SALS_API sals_status_t sals_cache_check(sals_cache_t* cache, int32_t wait, void* stream);

/** Tokens held per sequence. out: [B] int32 on the cache's device, B <= max_batch. */
SALS_API sals_status_t sals_cache_lengths(const sals_cache_t* cache, DLTensor* out, void* stream);

/**
 * The candidates selected for sequences 0..B-1 by the last attend of each (for inspection and
 * tests): the last sals_cache_attend, or sals_cache_attend_range covering the sequence.
 * idx:   [B, H, N] int32 token indices (0-based slots in the sequence, not positions), where
 *        H = 1 for a shared selection or n_head_kv per head, N >= the largest count; unused
 *        entries are -1; order within a row is unspecified (compare as sets).
 * count: [B] int32, tokens selected per sequence (0 after a dense or T > 1 attend, and for a
 *        sequence not attended since it was reset).
 */
SALS_API sals_status_t sals_cache_selected(const sals_cache_t* cache, DLTensor* idx,
                                           DLTensor* count, void* stream);

/** Bytes held, per component, for the tokens stored now (sum over sequences). */
typedef struct sals_memory {
  uint64_t latent_keys; /**< rank coordinates per token (key_bits < 16: codes, scales, zeros) */
  uint64_t values; /**< quantised (or 16-bit) values */
  uint64_t value_scales; /**< scales and zeros of the quantisation groups */
  uint64_t exact_window; /**< exact keys and values of the sinks and the recent window */
  uint64_t positions; /**< one int32 per token */
  uint64_t projection; /**< U_r */
  uint64_t total; /**< sum of the above */
  uint64_t dense_fp16; /**< what dense fp16 K and V would need: 2 * S * Dk * 2 per sequence */
  uint64_t allocated; /**< everything the cache allocated, workspace included */
} sals_memory_t;

/** Fill *out. For a CUDA cache this reads the lengths back (synchronises `stream`). */
SALS_API sals_status_t sals_cache_memory(const sals_cache_t* cache, sals_memory_t* out,
                                         void* stream);

/* ------------------------------------------------------------------------------------------ */
/* Stateless stages on caller-provided tensors (framework-managed memory, experiments)         */
/* All tensors of one call live on one device. Outputs are written, never allocated.           */
/* ------------------------------------------------------------------------------------------ */

/*
 * NaN and infinity: CPU inputs are checked for NaN/inf; CUDA inputs are not (a check would
 * cost a device pass and a host synchronisation). On the CPU every float element a function
 * reads is checked before anything is written, and a non-finite one fails the call with
 * SALS_ERR_NOT_FINITE and a message naming the argument and the row ("v: holds NaN or
 * infinity at row 3", "k: holds NaN or infinity at row [0, 5, 1]"). Elements a call does not
 * read (k and v rows outside idx or past lengths, k_lat rows outside the candidates, latent
 * coordinates past score_rank) are not looked at. On CUDA, non-finite inputs propagate into
 * the outputs.
 */

/** out[n, :] = x[n, :] @ proj.  x: [N, Dk], proj: [Dk, R], out: [N, R]. */
SALS_API sals_status_t sals_project(const DLTensor* x, const DLTensor* proj, DLTensor* out,
                                    void* stream);

/**
 * Rotate x at pos (sals_rope_t describes the rotation).
 * x: [N, H, head_dim], pos: [N] int32, out: like x; out may alias x (in place).
 */
SALS_API sals_status_t sals_rope_apply(const DLTensor* x, const DLTensor* pos,
                                       const sals_rope_t* rope, DLTensor* out, void* stream);

/**
 * Score and select. For each sequence b and selection head h, scores
 *   s[j] = q_lat[b, h, :score_rank] . k_lat[b, j, :score_rank]
 * over the candidates j in [n_sink, length_b - n_recent) and writes the indices of the
 * `budget` largest to out[b, h, :] (any order; -1 where a sequence has fewer candidates).
 * q_lat: [B, H, R], k_lat: [B, S, R'] with score_rank <= min(R, R'),
 * lengths: [B] int32 (length_b <= S) or NULL (every sequence has S tokens),
 * out: [B, H, budget] int32. budget must be in 1 .. S - n_sink - n_recent.
 */
SALS_API sals_status_t sals_score_select(const DLTensor* q_lat, const DLTensor* k_lat,
                                         const DLTensor* lengths, int32_t score_rank,
                                         int32_t n_sink, int32_t n_recent, int32_t budget,
                                         DLTensor* out, void* stream);

/**
 * Rebuild keys from latent vectors and rotate them at their own positions:
 *   out[n] = RoPE(reshape(proj @ k_lat[n], [H, head_dim]), pos[n]).
 * k_lat: [N, R], proj: [H * head_dim, R], pos: [N] int32, out: [N, H, head_dim].
 */
SALS_API sals_status_t sals_rebuild_rope(const DLTensor* k_lat, const DLTensor* proj,
                                         const DLTensor* pos, const sals_rope_t* rope,
                                         DLTensor* out, void* stream);

/**
 * Exact softmax attention of one query per sequence over a subset of tokens.
 * q: [B, Hq, d] (already rotated), k, v: [B, S, Hkv, d] (k already rotated),
 * idx: [B, H, N] int32 token indices with H = 1 (shared) or Hkv, -1 entries ignored;
 *      NULL attends tokens 0 .. length_b - 1,
 * lengths: [B] int32 or NULL (= S); out: [B, Hq, d]. scale: softmax scale (0 = 1/sqrt(d)).
 * Any other index outside [0, length_b) is an error (SALS_ERR_INVALID_ARGUMENT); on CUDA the
 * check waits for the stream, except while the stream is being captured into a graph, where
 * such indices are skipped. A token may appear at most once in a row idx[b, h, :] (-1 any
 * number of times): on the CPU a repeat is an error (SALS_ERR_INVALID_ARGUMENT); on CUDA it
 * is not checked and the token is attended twice, so the caller must not pass one
 * (sals_score_select never does). A sequence with no token to attend gets a zero output row.
 */
SALS_API sals_status_t sals_sparse_attention(const DLTensor* q, const DLTensor* k,
                                             const DLTensor* v, const DLTensor* idx,
                                             const DLTensor* lengths, float scale, DLTensor* out,
                                             void* stream);

/**
 * Asymmetric group quantisation of rows (KIVI style): for each group of `group` channels,
 * zero = min rounded down to float16, scale = (max - zero) / (2^bits - 1) rounded up to float16
 * (so the codes cover [min, max] and every element is within scale/2 of its reconstruction),
 * code = round((x - zero) / scale) clamped to [0, 2^bits - 1]; codes packed little-endian
 * within each byte (first channel in the low bits).
 * v: [N, D] float, bits in {2, 4, 8}, group divides D and group * bits / 8 is whole,
 * packed: [N, D * bits / 8] uint8, scale, zero: [N, D / group] float16.
 * On the CPU a group whose scale or zero would be infinite in float16 (a minimum beyond
 * float16's range, or (max - zero) / (2^bits - 1) beyond 65504) fails with SALS_ERR_NOT_FINITE.
 */
SALS_API sals_status_t sals_quantize_values(const DLTensor* v, int32_t bits, int32_t group,
                                            DLTensor* packed, DLTensor* scale, DLTensor* zero,
                                            void* stream);

/** Inverse of sals_quantize_values: out[n, c] = zero + code * scale. out: [N, D] float. */
SALS_API sals_status_t sals_dequantize_values(const DLTensor* packed, const DLTensor* scale,
                                              const DLTensor* zero, int32_t bits, int32_t group,
                                              DLTensor* out, void* stream);

/* ------------------------------------------------------------------------------------------ */
/* Paged storage: one layer's tokens in caller-owned pages (serving engines such as vLLM)      */
/* ------------------------------------------------------------------------------------------ */

/*
 * The caller owns the memory and the bookkeeping: a layer's tokens live in pages
 * [num_blocks, block_size, slot_bytes] uint8 (one slot per token; the last dimension contiguous,
 * the others any stride), and a sequence is a row of a block table: its token i is in block
 * block_table[b][i / block_size], slot i % block_size. A slot is addressed in a slot mapping as
 * block * block_size + slot (vLLM's convention). Token i of a sequence is at RoPE position i.
 *
 * What a slot holds is the cache's compressed token (sals_config_t: latent key of `rank`
 * coordinates, `key_bits` and `value_bits` quantisation). The exact copies of the sinks and the
 * recent window, which the cache keeps itself, cannot live in the slots (a slot cannot grow for
 * a few tokens, and the recent window moves as a sequence grows): the caller may keep them in
 * a window store of its own, `window` [rows, 2, n_head_kv, head_dim] float (a row holds one
 * token's pre-RoPE key, then its value), naming rows with `window_rows`:
 *   - sals_paged_append copies token n into row window_rows[n] (-1: no copy);
 *   - sals_paged_attend reads sequence b's copies from rows window_rows[b, :]: sink t at
 *     [b, t], recent token t (t >= seq_lens[b] - n_recent) at
 *     [b, n_sink + n_recent - seq_lens[b] + t]; -1 (or no window store) means no copy: the
 *     token is rebuilt from its slot and dequantised, like every token outside the windows.
 * Which tokens keep copies is the caller's choice (a serving engine: those in the windows of
 * the sequences it runs); sinks and recent tokens are always attended either way, and full
 * rank, a full budget and 16-bit values equal dense attention up to rounding with or without.
 *
 * Slot layout, in this order (e = bytes of config.dtype, Dk = n_head_kv * head_dim; a field of
 * a setting not in use is absent):
 *   key_bits == 16:   latent coordinates [0, rank) in `dtype`             rank * e
 *   value_bits == 16: the value [Dk] in `dtype`                           Dk * e
 *   key_bits < 16:    float16 scales, then zeros, of the key groups of [0, score_rank), then
 *                     scales and zeros of [score_rank, rank)              4 * rank / key_group
 *   value_bits < 16:  float16 scales, then zeros, of the value groups     4 * Dk / value_group
 *   key_bits < 16:    codes of [0, score_rank), then of [score_rank, rank) rank * key_bits / 8
 *   value_bits < 16:  value codes                                         Dk * value_bits / 8
 *   padding to a multiple of the largest element size above (the pages' address and their
 *   strides of dims 0 and 1 must be multiples of it too).
 * Codes, scales and zeros are those of sals_quantize_values over each part.
 *
 * A sals_paged_t holds one layer's settings, rotary embedding and projection, checked once; it
 * holds no tokens and its settings never change, so any number of threads may use it at once.
 * The functions run where their tensors are (all on one device): on the CPU with any settings,
 * on a GPU with settings made for it (config.device {kDLCUDA, n}: sals_paged_create copies the
 * projection there); other settings are refused (SALS_ERR_INVALID_ARGUMENT naming the first
 * tensor). Config fields max_batch, max_tokens and n_threads are not used (the calls size their
 * scratch from their arguments, and thread over the online cores).
 *
 * On the CPU every host-readable index is checked before anything is written, and with
 * config.check_finite every float a call reads (and what an append stores) as the cache does.
 *
 * On CUDA the host reads no index tensor (that would synchronise): shapes, dtypes, strides,
 * devices and overlaps are checked as on the CPU, index values on the device, where an entry
 * out of range is skipped and nothing outside the tensors is read or written:
 *   - append: a token whose slot_mapping entry is >= num_blocks * block_size is not stored; a
 *     window_rows entry < -1 or >= rows makes no copy;
 *   - attend: a sequence whose query_start[b] .. query_start[b + 1] is not a range of 0..N, whose
 *     seq_lens entry is not in n_b..capacity, or whose used block_table entries are not blocks
 *     of pages is not attended (its output rows are not written, its selection row is -1); a
 *     window_rows entry out of range counts as -1; a selection longer than selected.shape[2] is
 *     cut there (the attention still uses all of it).
 * Each is reported, like the NaN and infinity config.check_finite looks for (in k, v, the rows
 * of q the call reads, and a quantised latent group's float16 scale or zero, reported naming
 * k), by a flag the kernels raise in mapped host memory, with no host synchronisation (graph
 * capturable): the first later append or attend with these settings, or sals_paged_check,
 * returns SALS_ERR_INVALID_ARGUMENT or SALS_ERR_NOT_FINITE naming the argument, once (with
 * several threads: whichever call looks first), and does nothing else; what the reported call
 * stored stays in the pages. Not checked on CUDA: a slot or window row named twice in one append
 * (it then holds either token, or a mix of both), query ranges of sequences that overlap (their
 * rows are written twice), values beyond the storage type (stored as infinity, as the CUDA
 * cache does). CUDA calls enqueue their work on `stream` only, and take their scratch
 * stream-ordered (cudaMallocAsync from the device's current memory pool, released before they
 * return; a stream capture records it as graph memory nodes): on a sparse layer about
 * 12 * B * H * capacity bytes (capacity = block_table.shape[1] * block_size, H the selection
 * heads), plus 4 * B * n_head_q * the attended list for the decode kernels. Calls with the same
 * settings may run at once on any streams.
 */

/** Immutable per-layer settings of paged storage. */
typedef struct sals_paged sals_paged_t;

/** Bytes of one token's slot (*out) for `config`'s method fields (checked as a cache's). */
SALS_API sals_status_t sals_paged_slot_bytes(const sals_config_t* config, int64_t* out);

/**
 * Check and copy one layer's settings. projection: [Dk, rank] float with orthonormal columns
 * (sals_cache_create's rule), host or device memory, copied as float32; rope: copied. With
 * config.device on a GPU the settings also get device copies there (allocated, and the device
 * synchronised, here). On success *out owns the settings: release them with sals_paged_destroy.
 */
SALS_API sals_status_t sals_paged_create(const sals_config_t* config, const sals_rope_t* rope,
                                         const DLTensor* projection, sals_paged_t** out);

/** Free the settings. NULL is a no-op. */
SALS_API void sals_paged_destroy(sals_paged_t* paged);

/**
 * Store tokens into their slots (project, quantise), and exact copies into a window store.
 * k, v: [N, n_head_kv, head_dim] pre-RoPE keys (after any k_norm) and values.
 * slot_mapping: [N] int32, token n goes to slot slot_mapping[n] (block * block_size + slot),
 *   each slot at most once per call; a negative entry skips the token (padding).
 * pages: [num_blocks, block_size, slot_bytes] uint8, written only at the mapped slots.
 * window_rows, window: both NULL, or [N] int32 and [rows, 2, n_head_kv, head_dim] float: token
 *   n's key and value are also copied into row window_rows[n] (-1: none; each row at most
 *   once; rows of skipped tokens are ignored).
 * The outputs (pages, window) may not overlap each other or an input.
 */
SALS_API sals_status_t sals_paged_append(const sals_paged_t* paged, const DLTensor* k,
                                         const DLTensor* v, const DLTensor* slot_mapping,
                                         DLTensor* pages, const DLTensor* window_rows,
                                         DLTensor* window, void* stream);

/**
 * Attention of new queries over their sequences' stored tokens (append their own first).
 * q:           [N, n_head_q, head_dim] pre-RoPE queries (after any q_norm), rotated here.
 * query_start: [B + 1] int32, non-decreasing within 0..N: sequence b's queries are rows
 *              query_start[b] .. query_start[b + 1] - 1 of q, and are its last n_b tokens, at
 *              positions seq_lens[b] - n_b .. seq_lens[b] - 1. Rows outside these ranges are
 *              neither read nor written.
 * seq_lens:    [B] int32, tokens stored per sequence, n_b <= seq_lens[b] <= the block table's
 *              capacity (block_table.shape[1] * block_size).
 * block_table: [B, max_blocks] int32; the entries of each sequence's first
 *              ceil(seq_lens[b] / block_size) blocks must be blocks of `pages`.
 * pages:       [num_blocks, block_size, slot_bytes] uint8.
 * window_rows, window: both NULL (no exact copies), or [B, n_sink + n_recent] int32 rows
 *              (-1 or 0 .. rows - 1) of the window store [rows, 2, n_head_kv, head_dim] float.
 * out:         [N, n_head_q, head_dim], any float dtype; may not overlap an input.
 * selected:    NULL, or [B, H, K] int32 (H = 1 for a shared selection, n_head_kv per head;
 *              K at least the budget rule's count at the longest sparse sequence; on CUDA a
 *              shorter K is reported later, see above): the token indices each sparse step
 *              selected among the candidates (any order, -1 padded; rows of sequences without
 *              a sparse step are all -1).
 * A key is visible to a query when its position is <= the query's (causal). A sequence with one
 * query on a layer with config.dense == 0 takes a sparse step (sinks, recent window and the
 * selected candidates, as sals_cache_attend); otherwise its queries attend every visible token.
 */
SALS_API sals_status_t sals_paged_attend(const sals_paged_t* paged, const DLTensor* q,
                                         const DLTensor* query_start, const DLTensor* seq_lens,
                                         const DLTensor* block_table, const DLTensor* pages,
                                         const DLTensor* window_rows, const DLTensor* window,
                                         DLTensor* out, DLTensor* selected, void* stream);

/**
 * Report what the deferred checks of earlier CUDA calls with these settings found (see "On
 * CUDA" above): SALS_ERR_NOT_FINITE or SALS_ERR_INVALID_ARGUMENT naming the argument, once,
 * then the flags are clear. wait = 1 first waits for `stream` (skipped while it is being
 * captured), so that every earlier call on it is covered; wait = 0 reads the flags as they
 * stand, without synchronising. Always SALS_OK for settings made for the CPU, whose checks are
 * immediate.
 */
SALS_API sals_status_t sals_paged_check(const sals_paged_t* paged, int32_t wait, void* stream);

#ifdef __cplusplus
}
#endif
#endif /* SALS_SALS_H_ */
