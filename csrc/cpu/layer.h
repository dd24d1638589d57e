/*
 * One attention layer's compressed tokens and the SALS steps over them (store, select, attend),
 * independent of where the tokens live: the cache's per-sequence arrays (cache.c) or pages in
 * caller-owned memory (paged.c). Not API.
 *
 * A stored token is addressed by two indices (major, minor): the cache uses (sequence, slot),
 * paged storage (block, offset in the block). Every field of a token is at
 * base + major * s_major + minor * s_minor bytes, so one description covers both the cache's
 * structure of arrays and a page's array of structures.
 */
#ifndef SALS_CPU_LAYER_H_
#define SALS_CPU_LAYER_H_

#include "cpu.h"

/** Where one field of every stored token is (byte strides). */
typedef struct {
  char* base;
  int64_t s_major, s_minor;
} sals_field_t;

static inline char* sals_field_at(const sals_field_t* f, int64_t major, int64_t minor) {
  return f->base + major * f->s_major + minor * f->s_minor;
}

/**
 * A layer: its method parameters and the fields of its stored tokens.
 *   lat[0]  latent coordinates [0, score_rank), lat[1] [score_rank, rank): `dtype`, or packed
 *           key_bits codes; lat_scale/lat_zero: their float16 group parameters (key_bits < 16)
 *   val     the value [Dk]: `dtype`, or packed value_bits codes; val_scale/val_zero: float16
 *           group parameters (value_bits < 16)
 */
typedef struct {
  const sals_config_t* cfg;
  int64_t dk;
  int32_t n_sel_heads;    /* 1 (shared selection) or n_head_kv */
  float scale;            /* resolved softmax scale */
  const float* proj;      /* [Dk, rank] float32 */
  const float* inv_freq;  /* [half] */
  int32_t half;           /* rotary_dim / 2 */
  float attention_scaling;
  int32_t interleaved;
  sals_field_t lat[2], lat_scale[2], lat_zero[2];
  sals_field_t val, val_scale, val_zero;
} sals_layer_t;

/** Bytes of one token's latent part (0: score coordinates, 1: the rest) and value, as stored. */
int64_t sals_latent_bytes(const sals_config_t* g, int part);
int64_t sals_value_bytes(const sals_config_t* g);

/** Part `part` of the n tokens (major, minor .. minor + n - 1) as float32 into dst [n][width]. */
void sals_layer_load_latent(const sals_layer_t* L, int part, int64_t major, int64_t minor,
                            int64_t n, float* dst);
/** Store a token's latent vector x [rank] (both parts). */
void sals_layer_store_latent(const sals_layer_t* L, int64_t major, int64_t minor, const float* x);
/** Store a token's value vf [Dk]. */
void sals_layer_store_value(const sals_layer_t* L, int64_t major, int64_t minor, const float* vf);
/** KV head h of a token's value as float32 into dst [head_dim]. */
void sals_layer_load_value(const sals_layer_t* L, int64_t major, int64_t minor, int64_t h,
                           float* dst);

/**
 * What an append stores must fit the storage dtype (config.check_finite): kf [Dk] and vf [Dk]
 * (one token's finite key and value), the latent coordinates U^T k (computed into lat [rank]
 * only when |k| could reach the limit) and the float16 group parameters of quantised keys and
 * values. `where` names the token in messages ("sequence 0, token 3"). SALS_ERR_NOT_FINITE
 * naming the argument otherwise.
 */
sals_status_t sals_check_storable(const sals_config_t* g, const float* proj, const float* kf,
                                  const float* vf, float* lat, const char* where);

/** Exact window bounds of a sequence of S tokens: sinks [0, ns), recent [re, S). */
void sals_windows(const sals_config_t* g, int64_t S, int64_t* ns, int64_t* re);
/** Candidates a sparse step selects for a sequence of S tokens, before clamping. */
int64_t sals_budget(const sals_config_t* g, int64_t S);

/** One sequence of an attend call: its stored tokens and its queries. */
typedef struct {
  int64_t len;            /* tokens stored */
  int64_t major;          /* blocks == NULL: token t is (major, t) */
  const int32_t* blocks;  /* paged: token t is (blocks[t / block_size], t % block_size) */
  int64_t block_size;
  const int32_t* pos;     /* position of token t; NULL: t */
  /*
   * Exact pre-RoPE keys and values of the sinks [0, ns) and the recent window [re, S), read
   * instead of the compressed fields (sals_windows gives ns and re). Two forms:
   *   the cache's: sink_k/sink_v [n_sink][Dk] and the ring recent_k/recent_v [n_recent][Dk]
   *     (token t at t % n_recent), in `dtype`;
   *   paged storage's: window_rows [n_sink + n_recent] name rows of `window` (sink t at
   *     window_rows[t], recent token t at window_rows[n_sink + n_recent - len + t]; -1: no copy,
   *     the token is rebuilt), element (row, 0 key / 1 value, head, 0) at
   *     window + row * window_stride[0] + kv * window_stride[1] + head * window_stride[2]
   *     elements of window_elem.
   * Neither (sink_k and window_rows NULL): every token is rebuilt.
   */
  const char *sink_k, *sink_v, *recent_k, *recent_v;
  const int32_t* window_rows;
  const char* window;
  int64_t window_stride[3];
  sals_elem_t window_elem;
  /* n_q queries: query t, head h at q + (t * q_st + h * q_sh) elements; out alike. */
  const char* q;
  int64_t q_st, q_sh;
  char* out;
  int64_t o_st, o_sh;
  int64_t n_q;
  const int32_t* q_pos;   /* query positions (stride q_pos_st); NULL: q_pos0 + t */
  int64_t q_pos_st;
  int32_t q_pos0;
  int sparse;             /* select, then attend sinks, selection and recent window */
} sals_seq_t;

static inline void sals_seq_token(const sals_seq_t* s, int64_t t, int64_t* major, int64_t* minor) {
  if (s->blocks) {
    *major = s->blocks[t / s->block_size];
    *minor = t % s->block_size;
  } else {
    *major = s->major;
    *minor = t;
  }
}

/* Tokens t .. t + n - 1 that share a major index (one block, or the whole sequence). */
static inline int64_t sals_seq_run(const sals_seq_t* s, int64_t t, int64_t n) {
  if (!s->blocks) return n;
  const int64_t left = s->block_size - t % s->block_size;
  return n < left ? n : left;
}

static inline int32_t sals_seq_qpos(const sals_seq_t* s, int64_t t) {
  return s->q_pos ? s->q_pos[t * s->q_pos_st] : s->q_pos0 + (int32_t)t;
}

/**
 * One attend call over B sequences. Tasks (run with sals_pool_run or sals_parallel_for):
 *   sals_select_task:  B * n_sel_heads, for sequences with `sparse` set (others are skipped);
 *   sals_attend_task:  n_work * n_hg * n_ch;
 *   sals_merge_task:   B * n_head_q, only when n_ch > 1 (then every sequence has one query).
 */
typedef struct {
  const sals_layer_t* L;
  const sals_seq_t* seq;
  int64_t B;
  sals_elem_t q_elem, out_elem;
  int32_t* sel;          /* [B][n_sel_heads][sel_stride]: selected token indices */
  int64_t sel_stride;
  int32_t* sel_count;    /* [B] */
  int64_t hg_size, n_hg; /* KV heads handled together (sharing a token list) and their groups */
  int64_t q_block;       /* queries per work item */
  /* Work items (sequence, query block): item w is (w / n_qb, w % n_qb) when `work` is NULL,
   * else (work[2w], work[2w + 1]). */
  int64_t n_work, n_qb;
  const int64_t* work;
  int64_t n_ch;          /* token chunks per work item and head group (partial softmax states) */
  int64_t max_chunks;    /* partial's chunk dimension */
  float* ws;             /* per-thread workspace, ws_stride floats each */
  int64_t ws_stride;
  float* partial;        /* [B][max_chunks][n_head_q][head_dim + 2]: m, l, acc */
} sals_attend_t;

/** Query rows of a work item: at most max(n_head_q, q_block * G). */
int64_t sals_attend_rows(const sals_config_t* g, int64_t q_block);
/** Floats of one thread's workspace for select, attend and merge tasks over rows_max query rows
 * and sequences of at most max_len tokens. */
int64_t sals_attend_ws_floats(const sals_config_t* g, int32_t half, int64_t rows_max,
                              int64_t max_len);

void sals_select_task(void* ctx, int64_t task, int32_t thread);
void sals_attend_task(void* ctx, int64_t task, int32_t thread);
void sals_merge_task(void* ctx, int64_t task, int32_t thread);

#endif /* SALS_CPU_LAYER_H_ */
