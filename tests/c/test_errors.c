/* Status strings, versions, configuration checks and bad inputs for every function. */
#include "util.h"

#define INV SALS_ERR_INVALID_ARGUMENT

static sals_config_t good_config(void) { return config16(SALS_DTYPE_FLOAT32, 4); }

static float g_inv_freq[4] = {1.0f, 0.1f, 0.01f, 0.001f};
static float g_eye[16 * 16];

static sals_status_t create(const sals_config_t* c, sals_cache_t** out) {
  sals_rope_t rope = {g_inv_freq, 8, 1.0f, 0};
  tensor_t p;
  tset(&p, g_eye, F32, 2, c->n_head_kv * c->head_dim, c->rank, 0, 0);
  return sals_cache_create(c, &rope, &p.t, out);
}

/* Set one field to a bad value and expect a message naming it. */
#define BAD_FIELD(field, value, needle)             \
  do {                                              \
    sals_config_t c_ = good_config();               \
    c_.field = value;                               \
    sals_cache_t* h_ = NULL;                        \
    CHECK_ERR(create(&c_, &h_), INV, needle);       \
    CHECK(h_ == NULL, "handle written on failure"); \
    CHECK_ERR(sals_config_check(&c_), INV, needle); \
  } while (0)

#define NF SALS_ERR_NOT_FINITE

/* 1 if all n floats equal `value` (an output a failed call must not have touched). */
static int untouched(const float* x, int n, float value) {
  for (int i = 0; i < n; ++i)
    if (x[i] != value) return 0;
  return 1;
}

/* NaN and infinity in every float input of every stateless function (CPU tensors). */
static void test_stateless_not_finite(void) {
  const float bad[2] = {NAN, INFINITY};
  for (int which = 0; which < 2; ++which) {
    const float nf = bad[which];
    { /* project: x [4, 16], proj [16, 8] */
      float x[4 * 16] = {0}, pr[16 * 8] = {0}, out[4 * 8];
      tensor_t tx, tpr, tout;
      tset(&tx, x, F32, 2, 4, 16, 0, 0);
      tset(&tpr, pr, F32, 2, 16, 8, 0, 0);
      tset(&tout, out, F32, 2, 4, 8, 0, 0);
      for (int i = 0; i < 32; ++i) out[i] = 7.0f;
      x[2 * 16 + 15] = nf;
      CHECK_ERR(sals_project(&tx.t, &tpr.t, &tout.t, NULL), NF,
                "x: holds NaN or infinity at row 2");
      x[2 * 16 + 15] = 0.0f;
      pr[5 * 8] = nf;
      CHECK_ERR(sals_project(&tx.t, &tpr.t, &tout.t, NULL), NF,
                "proj: holds NaN or infinity at row 5");
      CHECK(untouched(out, 32, 7.0f), "project wrote out before failing");
      pr[5 * 8] = 0.0f;
      CHECK_OK(sals_project(&tx.t, &tpr.t, &tout.t, NULL));
    }
    { /* rope_apply: x [4, 2, 8], in place */
      float x[4 * 2 * 8];
      int32_t p4[4] = {0, 1, 2, 3};
      sals_rope_t rope = {g_inv_freq, 8, 1.0f, 0};
      tensor_t tx, tpos;
      tset(&tx, x, F32, 3, 4, 2, 8, 0);
      tset(&tpos, p4, I32, 1, 4, 0, 0, 0);
      for (int i = 0; i < 64; ++i) x[i] = 7.0f;
      x[(1 * 2 + 1) * 8 + 3] = nf;
      CHECK_ERR(sals_rope_apply(&tx.t, &tpos.t, &rope, &tx.t, NULL), NF,
                "x: holds NaN or infinity at row [1, 1]");
      x[(1 * 2 + 1) * 8 + 3] = 7.0f;
      CHECK(untouched(x, 64, 7.0f), "rope_apply rotated x in place before failing");
    }
    { /* rebuild_rope: k_lat [3, 4], proj [16, 4] -> out [3, 2, 8] */
      float kl[3 * 4] = {0}, pr[16 * 4] = {0}, out[3 * 2 * 8];
      int32_t p3[3] = {0, 1, 2};
      sals_rope_t rope = {g_inv_freq, 8, 1.0f, 0};
      tensor_t tkl, tpr, tpos, tout;
      tset(&tkl, kl, F32, 2, 3, 4, 0, 0);
      tset(&tpr, pr, F32, 2, 16, 4, 0, 0);
      tset(&tpos, p3, I32, 1, 3, 0, 0, 0);
      tset(&tout, out, F32, 3, 3, 2, 8, 0);
      for (int i = 0; i < 48; ++i) out[i] = 7.0f;
      kl[2 * 4 + 1] = nf;
      CHECK_ERR(sals_rebuild_rope(&tkl.t, &tpr.t, &tpos.t, &rope, &tout.t, NULL), NF,
                "k_lat: holds NaN or infinity at row 2");
      kl[2 * 4 + 1] = 0.0f;
      pr[11 * 4 + 3] = nf;
      CHECK_ERR(sals_rebuild_rope(&tkl.t, &tpr.t, &tpos.t, &rope, &tout.t, NULL), NF,
                "proj: holds NaN or infinity at row 11");
      CHECK(untouched(out, 48, 7.0f), "rebuild_rope wrote out before failing");
    }
    { /* sparse_attention: q [1, 4, 8], k, v [1, 5, 2, 8] */
      float q[4 * 8] = {0}, k[5 * 2 * 8] = {0}, v[5 * 2 * 8] = {0}, out[4 * 8];
      int32_t shared[2] = {1, 3}, per_head[2 * 1] = {1, 3}, len1[1] = {4};
      tensor_t tq, tk, tv, ti, tl, tout;
      tset(&tq, q, F32, 3, 1, 4, 8, 0);
      tset(&tk, k, F32, 4, 1, 5, 2, 8);
      tset(&tv, v, F32, 4, 1, 5, 2, 8);
      tset(&ti, shared, I32, 3, 1, 1, 2, 0);
      tset(&tl, len1, I32, 1, 1, 0, 0, 0);
      tset(&tout, out, F32, 3, 1, 4, 8, 0);
      for (int i = 0; i < 32; ++i) out[i] = 7.0f;
      q[2 * 8 + 7] = nf;
      CHECK_ERR(sals_sparse_attention(&tq.t, &tk.t, &tv.t, &ti.t, NULL, 0.0f, &tout.t, NULL), NF,
                "q: holds NaN or infinity at row [0, 2]");
      q[2 * 8 + 7] = 0.0f;
      k[(3 * 2 + 1) * 8] = nf; /* token 3, head 1: selected (shared) */
      CHECK_ERR(sals_sparse_attention(&tq.t, &tk.t, &tv.t, &ti.t, NULL, 0.0f, &tout.t, NULL), NF,
                "k: holds NaN or infinity at row [0, 3, 1]");
      k[(3 * 2 + 1) * 8] = 0.0f;
      v[(1 * 2 + 0) * 8 + 2] = nf; /* token 1, head 0 */
      CHECK_ERR(sals_sparse_attention(&tq.t, &tk.t, &tv.t, &ti.t, NULL, 0.0f, &tout.t, NULL), NF,
                "v: holds NaN or infinity at row [0, 1, 0]");
      CHECK_ERR(sals_sparse_attention(&tq.t, &tk.t, &tv.t, NULL, &tl.t, 0.0f, &tout.t, NULL), NF,
                "v: holds NaN or infinity at row [0, 1, 0]");
      CHECK(untouched(out, 32, 7.0f), "sparse_attention wrote out before failing");
      v[(1 * 2 + 0) * 8 + 2] = 0.0f;
      /* Not read: a token outside idx, one past the length, a head that did not select it. */
      k[(0 * 2 + 0) * 8] = v[(4 * 2 + 1) * 8] = nf;
      CHECK_OK(sals_sparse_attention(&tq.t, &tk.t, &tv.t, &ti.t, NULL, 0.0f, &tout.t, NULL));
      k[(0 * 2 + 0) * 8] = 0.0f;
      CHECK_OK(sals_sparse_attention(&tq.t, &tk.t, &tv.t, NULL, &tl.t, 0.0f, &tout.t, NULL));
      tset(&ti, per_head, I32, 3, 1, 2, 1, 0); /* head 0 reads token 1, head 1 token 3 */
      k[(1 * 2 + 1) * 8] = v[(3 * 2 + 0) * 8] = nf;
      CHECK_OK(sals_sparse_attention(&tq.t, &tk.t, &tv.t, &ti.t, NULL, 0.0f, &tout.t, NULL));
      k[(3 * 2 + 1) * 8 + 5] = nf;
      CHECK_ERR(sals_sparse_attention(&tq.t, &tk.t, &tv.t, &ti.t, NULL, 0.0f, &tout.t, NULL), NF,
                "k: holds NaN or infinity at row [0, 3, 1]");
    }
    { /* quantize_values / dequantize_values: v [3, 8], 4 bits, groups of 8 */
      float vq[3 * 8] = {0}, out[3 * 8];
      uint16_t vh[3 * 8] = {0}, sc[3], zr[3];
      uint8_t pk[3 * 4];
      tensor_t tv, tpk, tsc, tzr, tout;
      tset(&tv, vq, F32, 2, 3, 8, 0, 0);
      tset(&tpk, pk, U8, 2, 3, 4, 0, 0);
      tset(&tsc, sc, F16, 2, 3, 1, 0, 0);
      tset(&tzr, zr, F16, 2, 3, 1, 0, 0);
      tset(&tout, out, F32, 2, 3, 8, 0, 0);
      vq[1 * 8 + 6] = nf;
      CHECK_ERR(sals_quantize_values(&tv.t, 4, 8, &tpk.t, &tsc.t, &tzr.t, NULL), NF,
                "v: holds NaN or infinity at row 1");
      vh[2 * 8] = which ? 0x7c00u : 0x7e00u; /* float16 inf / NaN */
      tset(&tv, vh, F16, 2, 3, 8, 0, 0);
      CHECK_ERR(sals_quantize_values(&tv.t, 4, 8, &tpk.t, &tsc.t, &tzr.t, NULL), NF,
                "v: holds NaN or infinity at row 2");
      vh[2 * 8] = 0;
      CHECK_OK(sals_quantize_values(&tv.t, 4, 8, &tpk.t, &tsc.t, &tzr.t, NULL));
      for (int i = 0; i < 24; ++i) out[i] = 7.0f;
      sc[1] = which ? 0x7c00u : 0x7e00u;
      CHECK_ERR(sals_dequantize_values(&tpk.t, &tsc.t, &tzr.t, 4, 8, &tout.t, NULL), NF,
                "scale: holds NaN or infinity at row 1");
      sc[1] = 0;
      zr[2] = which ? 0xfc00u : 0xfe00u; /* negative */
      CHECK_ERR(sals_dequantize_values(&tpk.t, &tsc.t, &tzr.t, 4, 8, &tout.t, NULL), NF,
                "zero: holds NaN or infinity at row 2");
      CHECK(untouched(out, 24, 7.0f), "dequantize_values wrote out before failing");
      zr[2] = 0;
      CHECK_OK(sals_dequantize_values(&tpk.t, &tsc.t, &tzr.t, 4, 8, &tout.t, NULL));
    }
  }
}

static sals_status_t create_unprojected(const sals_config_t* c, sals_cache_t** out) {
  sals_rope_t rope = {g_inv_freq, 8, 1.0f, 0};
  return sals_cache_create(c, &rope, NULL, out);
}

/* Config fields so large that sizes overflow or no device could hold the cache: refused, or
 * out of memory, naming the fields responsible. */
static void test_huge_config(void) {
  /* No projection: a config the checks let through fails on it, reading no memory. */
  sals_config_t c = good_config();
  sals_cache_t* h = NULL;
  c.max_batch = 1 << 20;
  c.max_tokens = INT32_MAX;
  CHECK_ERR(create_unprojected(&c, &h), INV,
            "config.max_batch, config.max_tokens: max_batch "
            "1048576 * max_tokens 2147483647 token slots would take about");
  c = good_config();
  c.max_batch = 1 << 20;
  c.n_recent = INT32_MAX - 1;
  CHECK_ERR(create_unprojected(&c, &h), INV,
            "config.max_batch, config.n_sink, config.n_recent: "
            "max_batch 1048576 * (n_sink 1 + n_recent 2147483646) exact window slots");
  c.n_sink = 2;
  CHECK_ERR(create_unprojected(&c, &h), INV,
            "config.n_sink, config.n_recent: n_sink 2 + "
            "n_recent 2147483646 is more than 2147483647");
  c = good_config();
  c.n_head_q = 1 << 30;
  CHECK_ERR(create_unprojected(&c, &h), INV,
            "config.max_batch, config.n_head_q: max_batch 2 * "
            "n_head_q 1073741824 query rows are more than 2147483647");
  c.max_batch = 1;
  c.n_head_q = 1 << 30;
  c.head_dim = 1 << 16;
  c.rank = c.score_rank = 1;
  c.value_bits = 16;
  CHECK_ERR(create_unprojected(&c, &h), INV,
            "config.max_batch, config.n_head_q, config.head_dim: "
            "max_batch 1 * n_head_q 1073741824 query heads of head_dim 65536");
  c = good_config();
  c.head_dim = 1 << 24;
  c.rank = 1 << 25;
  c.score_rank = 1;
  c.value_bits = 16;
  CHECK_ERR(create_unprojected(&c, &h), INV,
            "config.rank, config.n_head_kv, config.head_dim: a "
            "projection of Dk 33554432 * rank 33554432");
  c = good_config();
  c.n_head_kv = 1 << 16;
  c.n_head_q = 1 << 16;
  c.head_dim = 1 << 8;
  c.rank = 1 << 24;
  c.score_rank = 1;
  c.value_bits = 16;
  c.max_batch = 1 << 13;
  c.max_tokens = 1;
  c.select_per_head = 1;
  CHECK_ERR(create_unprojected(&c, &h), INV,
            "config.max_batch, config.rank, config.n_head_kv, "
            "config.head_dim: max_batch 8192 * rank 16777216 * Dk 16777216 projection sums");
  c = good_config();
  c.n_head_kv = INT32_MAX / 2;
  c.n_head_q = c.n_head_kv;
  CHECK_ERR(create_unprojected(&c, &h), INV,
            "config.n_head_kv, config.head_dim: Dk = n_head_kv "
            "1073741823 * head_dim 8 is more than 1073741823");
  /* Below the bound, but a buffer of 2^49 bytes (val) exceeds every address space: out of
   * memory, naming the part that made it so large. */
  c = good_config();
  c.max_batch = 1 << 13;
  c.max_tokens = 1 << 30;
  CHECK_ERR(create(&c, &h), SALS_ERR_OUT_OF_MEMORY,
            "config.max_batch, config.max_tokens: out "
            "of host memory allocating the cache (");
  CHECK(strstr(sals_last_error(),
               "the largest part is max_batch 8192 * max_tokens 1073741824 "
               "token slots (about") != NULL,
        "%s", sals_last_error());
  CHECK(h == NULL, "handle written on failure");
}

int main(void) {
  for (int i = 0; i < 16; ++i) g_eye[i * 16 + i] = 1.0f;
  CHECK(strcmp(sals_status_string(SALS_OK), "SALS_OK") == 0, "ok");
  CHECK(strcmp(sals_status_string(SALS_ERR_CAPACITY), "SALS_ERR_CAPACITY") == 0, "capacity");
  CHECK(strcmp(sals_status_string(SALS_ERR_DEVICE), "SALS_ERR_DEVICE") == 0, "device");
  CHECK(strcmp(sals_status_string((sals_status_t)99), "SALS_ERR_UNKNOWN") == 0, "unknown");
  CHECK(strcmp(sals_version(), SALS_VERSION_STRING) == 0, "version %s", sals_version());
  CHECK(sals_abi_version() == SALS_ABI_VERSION, "abi");
  CHECK(sals_cuda_available() == 0 || sals_cuda_available() == 1, "cuda_available");
  sals_cache_destroy(NULL);

  /* Configuration. */
  BAD_FIELD(n_head_q, 0, "config.n_head_q");
  BAD_FIELD(n_head_q, 3, "config.n_head_q: 3 is not a multiple of n_head_kv 2");
  BAD_FIELD(n_head_kv, -1, "config.n_head_kv");
  BAD_FIELD(head_dim, 0, "config.head_dim");
  BAD_FIELD(rank, 0, "config.rank");
  BAD_FIELD(rank, 17, "config.rank: 17 > Dk 16");
  BAD_FIELD(score_rank, 0, "config.score_rank");
  BAD_FIELD(score_rank, 17, "config.score_rank: 17 > rank 16");
  BAD_FIELD(value_bits, 3, "config.value_bits");
  BAD_FIELD(value_group, 3, "config.value_group: 3 does not divide head_dim 8");
  BAD_FIELD(value_group, 0, "config.value_group");
  BAD_FIELD(key_bits, 2, "config.key_bits: 2 not one of 16, 8, 4");
  BAD_FIELD(key_bits, 0, "config.key_bits");
  {
    /* key_group only matters when the latent keys are quantised (score_rank 8, rank 16). */
    sals_config_t c = good_config();
    sals_cache_t* h = NULL;
    c.key_group = 3;
    CHECK_OK(create(&c, &h));
    sals_cache_destroy(h);
    h = NULL;
    c.key_bits = 8;
    CHECK_ERR(create(&c, &h), INV, "config.key_group: 3 does not divide score_rank 8");
    c.key_group = 0;
    CHECK_ERR(create(&c, &h), INV, "config.key_group: 0 must be >= 1");
    c.rank = 12;
    c.key_group = 8;
    CHECK_ERR(create(&c, &h), INV, "config.key_group: 8 does not divide rank - score_rank 4");
    c.rank = 16;
    c.key_bits = 4;
    c.key_group = 1;
    CHECK_ERR(create(&c, &h), INV,
              "config.key_group: 1 groups of 4-bit codes do not fill whole bytes");
    c.key_group = 2;
    CHECK_OK(create(&c, &h));
    sals_cache_destroy(h);
    h = NULL;
  }
  {
    const sals_config_t good = good_config();
    CHECK_OK(sals_config_check(&good));
    CHECK_ERR(sals_config_check(NULL), INV, "config: is NULL");
  }
  BAD_FIELD(n_sink, -1, "config.n_sink");
  BAD_FIELD(n_recent, -2, "config.n_recent");
  BAD_FIELD(budget_frac, 0.0f, "config.budget_frac");
  BAD_FIELD(budget_frac, 1.5f, "config.budget_frac");
  BAD_FIELD(budget_frac, NAN, "config.budget_frac");
  BAD_FIELD(budget_tokens, -1, "config.budget_tokens");
  BAD_FIELD(select_per_head, 2, "config.select_per_head");
  BAD_FIELD(dense, -1, "config.dense");
  BAD_FIELD(max_batch, 0, "config.max_batch");
  BAD_FIELD(max_tokens, 0, "config.max_tokens");
  BAD_FIELD(dtype, (sals_dtype_t)7, "config.dtype");
  BAD_FIELD(scale, -1.0f, "config.scale");
  BAD_FIELD(scale, INFINITY, "config.scale");
  BAD_FIELD(check_finite, 5, "config.check_finite");
  BAD_FIELD(n_threads, -1, "config.n_threads");
  BAD_FIELD(n_threads, SALS_MAX_THREADS + 1, "config.n_threads");
  BAD_FIELD(n_threads, INT32_MAX, "config.n_threads");
  BAD_FIELD(device.device_id, 1, "config.device");
  {
    sals_config_t c = good_config();
    c.device.device_type = kDLOpenCL;
    sals_cache_t* h = NULL;
    CHECK_ERR(create(&c, &h), SALS_ERR_UNSUPPORTED, "config.device");
    c = good_config();
    c.device.device_type = kDLCUDA;
    if (!sals_cuda_available())
      CHECK(create(&c, &h) != SALS_OK && h == NULL, "cuda cache without CUDA");
    c = good_config();
    CHECK_ERR(sals_cache_create(NULL, NULL, NULL, &h), INV, "config: is NULL");
    CHECK_ERR(sals_cache_create(&c, NULL, NULL, NULL), INV, "out: is NULL");
    tensor_t p;
    tset(&p, g_eye, F32, 2, 16, 16, 0, 0);
    CHECK_ERR(sals_cache_create(&c, NULL, &p.t, &h), INV, "rope: is NULL");
    sals_rope_t rope = {g_inv_freq, 10, 1.0f, 0};
    CHECK_ERR(sals_cache_create(&c, &rope, &p.t, &h), INV, "rope.rotary_dim: 10 > head_dim 8");
    rope.rotary_dim = 3;
    CHECK_ERR(sals_cache_create(&c, &rope, &p.t, &h), INV, "rope.rotary_dim");
    rope.rotary_dim = 8;
    rope.inv_freq = NULL;
    CHECK_ERR(sals_cache_create(&c, &rope, &p.t, &h), INV, "rope.inv_freq");
    rope.inv_freq = g_inv_freq;
    rope.interleaved = 2;
    CHECK_ERR(sals_cache_create(&c, &rope, &p.t, &h), INV, "rope.interleaved");
    rope.interleaved = 0;
    CHECK_ERR(sals_cache_create(&c, &rope, NULL, &h), INV, "projection: is NULL");
    tset(&p, g_eye, F32, 2, 16, 8, 0, 0);
    CHECK_ERR(sals_cache_create(&c, &rope, &p.t, &h), INV, "projection: dim 1 is 8, expected 16");
    tset(&p, g_eye, I32, 2, 16, 16, 0, 0);
    CHECK_ERR(sals_cache_create(&c, &rope, &p.t, &h), INV, "projection: dtype int32 not supported");
    float bad[16 * 16] = {0};
    bad[5] = NAN;
    tset(&p, bad, F32, 2, 16, 16, 0, 0);
    CHECK_ERR(sals_cache_create(&c, &rope, &p.t, &h), SALS_ERR_NOT_FINITE, "projection");
    CHECK(h == NULL, "no handle after failures");
  }

  /* Cache calls. */
  sals_config_t cfg = good_config();
  sals_cache_t* cache = NULL;
  CHECK_OK(create(&cfg, &cache));
  if (!cache) return finish();
  float k[2 * 8 * 2 * 8] = {0}, v[2 * 8 * 2 * 8] = {0}, q[2 * 8 * 4 * 8] = {0}, o[2 * 8 * 4 * 8];
  int32_t pos[2 * 8] = {0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7};
  tensor_t tk, tv, tp, tq, to;
  tset(&tk, k, F32, 4, 2, 3, 2, 8);
  tset(&tv, v, F32, 4, 2, 3, 2, 8);
  tset(&tp, pos, I32, 2, 2, 3, 0, 0);
  CHECK_ERR(sals_cache_append(NULL, &tk.t, &tv.t, &tp.t, NULL), INV, "cache: is NULL");
  CHECK_ERR(sals_cache_append(cache, NULL, &tv.t, &tp.t, NULL), INV, "k: is NULL");
  tset(&tk, k, F32, 3, 2, 3, 16, 0);
  CHECK_ERR(sals_cache_append(cache, &tk.t, &tv.t, &tp.t, NULL), INV, "k: expected 4 dims, got 3");
  tset(&tk, k, I32, 4, 2, 3, 2, 8);
  CHECK_ERR(sals_cache_append(cache, &tk.t, &tv.t, &tp.t, NULL), INV,
            "k: dtype int32 not supported (float32/float16/bfloat16)");
  tset(&tk, k, F32, 4, 2, 3, 2, 8);
  tk.t.dtype.lanes = 4;
  CHECK_ERR(sals_cache_append(cache, &tk.t, &tv.t, &tp.t, NULL), INV, "k: vector dtype");
  tset(&tk, k, F32, 4, 2, 3, 2, 4);
  tstride(&tk, 48, 16, 8, 1);
  CHECK_ERR(sals_cache_append(cache, &tk.t, &tv.t, &tp.t, NULL), INV, "k: dim 3 is 4, expected 8");
  tset(&tk, k, F32, 4, 2, 3, 2, 8);
  tstride(&tk, 96, 32, 16, 2);
  CHECK_ERR(sals_cache_append(cache, &tk.t, &tv.t, &tp.t, NULL), INV,
            "k: last dimension must be contiguous (stride 1), got 2");
  tset(&tk, k, F32, 4, 2, 3, 2, 8);
  tk.t.device.device_type = kDLCUDA;
  CHECK_ERR(sals_cache_append(cache, &tk.t, &tv.t, &tp.t, NULL), INV,
            "k: on cuda:0 but the cache is on cpu");
  tk.t.device.device_type = kDLVulkan;
  CHECK_ERR(sals_cache_append(cache, &tk.t, &tv.t, &tp.t, NULL), SALS_ERR_UNSUPPORTED,
            "k: on device type 7");
  tset(&tk, NULL, F32, 4, 2, 3, 2, 8);
  CHECK_ERR(sals_cache_append(cache, &tk.t, &tv.t, &tp.t, NULL), INV, "k: data is NULL");
  tset(&tk, k, F32, 4, 2, 3, 2, 8);
  tset(&tv, v, F32, 4, 2, 2, 2, 8);
  CHECK_ERR(sals_cache_append(cache, &tk.t, &tv.t, &tp.t, NULL), INV, "v: dim 1 is 2, expected 3");
  tset(&tv, v, F32, 4, 2, 3, 2, 8);
  tset(&tp, pos, F32, 2, 2, 3, 0, 0);
  CHECK_ERR(sals_cache_append(cache, &tk.t, &tv.t, &tp.t, NULL), INV,
            "positions: dtype float32 not supported (int32)");
  tset(&tp, pos, I32, 2, 2, 4, 0, 0);
  CHECK_ERR(sals_cache_append(cache, &tk.t, &tv.t, &tp.t, NULL), INV,
            "positions: dim 1 is 4, expected 3");
  tset(&tp, pos, I32, 2, 2, 3, 0, 0);
  tstride(&tp, 8, 1, 0, 0);
  k[3] = NAN;
  CHECK_ERR(sals_cache_append(cache, &tk.t, &tv.t, &tp.t, NULL), SALS_ERR_NOT_FINITE,
            "k: holds NaN");
  k[3] = 0.0f;
  v[60] = INFINITY; /* sequence 1, token 0, head 1 */
  CHECK_ERR(sals_cache_append(cache, &tk.t, &tv.t, &tp.t, NULL), SALS_ERR_NOT_FINITE,
            "v: holds NaN");
  v[60] = 0.0f;
  {
    int32_t lens[2] = {-1, -1};
    tensor_t tl;
    tset(&tl, lens, I32, 1, 2, 0, 0, 0);
    CHECK_OK(sals_cache_lengths(cache, &tl.t, NULL));
    CHECK(lens[0] == 0 && lens[1] == 0, "nothing stored by failed appends: %d %d", lens[0],
          lens[1]);
  }
  {
    float big[3 * 3 * 16] = {0};
    int32_t bp[9] = {0};
    tensor_t bk, bv, bpp;
    tset(&bk, big, F32, 4, 3, 3, 2, 8);
    tset(&bv, big, F32, 4, 3, 3, 2, 8);
    tset(&bpp, bp, I32, 2, 3, 3, 0, 0);
    CHECK_ERR(sals_cache_append(cache, &bk.t, &bv.t, &bpp.t, NULL), SALS_ERR_CAPACITY,
              "k: batch 3 > max_batch 2");
  }
  CHECK_OK(sals_cache_append(cache, &tk.t, &tv.t, &tp.t, NULL));
  CHECK_OK(sals_cache_append(cache, &tk.t, &tv.t, &tp.t, NULL));
  CHECK_ERR(sals_cache_append(cache, &tk.t, &tv.t, &tp.t, NULL), SALS_ERR_CAPACITY, "max_tokens 8");

  tset(&tq, q, F32, 4, 2, 1, 4, 8);
  tset(&tp, pos, I32, 2, 2, 1, 0, 0);
  tstride(&tp, 8, 1, 0, 0);
  tset(&to, o, F32, 4, 2, 1, 4, 8);
  CHECK_ERR(sals_cache_attend(NULL, &tq.t, &tp.t, &to.t, NULL), INV, "cache: is NULL");
  CHECK_ERR(sals_cache_attend(cache, &tq.t, &tp.t, NULL, NULL), INV, "out: is NULL");
  CHECK_ERR(sals_cache_attend(cache, &tq.t, &tp.t, &tq.t, NULL), INV, "out: overlaps q");
  tset(&tq, q, F32, 4, 2, 1, 2, 8);
  CHECK_ERR(sals_cache_attend(cache, &tq.t, &tp.t, &to.t, NULL), INV,
            "q: dim 2 is 2, expected 4 (n_head_q)");
  tset(&tq, q, BF16, 4, 2, 1, 4, 8); /* q and out may differ in float dtype */
  CHECK_OK(sals_cache_attend(cache, &tq.t, &tp.t, &to.t, NULL));
  tset(&tq, q, F32, 4, 2, 1, 4, 8);
  tset(&to, o, F32, 4, 2, 2, 4, 8);
  CHECK_ERR(sals_cache_attend(cache, &tq.t, &tp.t, &to.t, NULL), INV,
            "out: dim 1 is 2, expected 1");
  tset(&to, o, F32, 4, 2, 1, 4, 8);
  q[9] = NAN;
  CHECK_ERR(sals_cache_attend(cache, &tq.t, &tp.t, &to.t, NULL), SALS_ERR_NOT_FINITE,
            "q: holds NaN");
  q[9] = 0.0f;
  CHECK_OK(sals_cache_attend(cache, &tq.t, &tp.t, &to.t, NULL));
  {
    int32_t idx[2 * 1 * 8], cnt[2];
    tensor_t ti, tc;
    tset(&ti, idx, I32, 3, 2, 2, 8, 0);
    tset(&tc, cnt, I32, 1, 2, 0, 0, 0);
    CHECK_ERR(sals_cache_selected(cache, &ti.t, &tc.t, NULL), INV, "idx: dim 1 is 2, expected 1");
    tset(&ti, idx, I32, 3, 2, 1, 0, 0);
    CHECK_ERR(sals_cache_selected(cache, &ti.t, &tc.t, NULL), INV, "idx: dim 2 is 0, fewer than");
    tset(&ti, idx, I32, 3, 2, 1, 8, 0);
    tset(&tc, cnt, I32, 1, 3, 0, 0, 0);
    CHECK_ERR(sals_cache_selected(cache, &ti.t, &tc.t, NULL), INV, "count: dim 0 is 3, expected 2");
    tset(&tc, cnt, I32, 1, 2, 0, 0, 0);
    CHECK_OK(sals_cache_selected(cache, &ti.t, &tc.t, NULL));
    /* 6 tokens per sequence: 1 sink, 2 recent, 3 candidates; budget ceil(6/8) = 1. */
    CHECK(cnt[0] == 1 && cnt[1] == 1, "counts %d %d", cnt[0], cnt[1]);
    int32_t lens[3];
    tensor_t tl;
    tset(&tl, lens, I32, 1, 3, 0, 0, 0);
    CHECK_ERR(sals_cache_lengths(cache, &tl.t, NULL), INV,
              "out: dim 0 is 3, more than max_batch 2");
    CHECK_ERR(sals_cache_lengths(NULL, &tl.t, NULL), INV, "cache: is NULL");
    CHECK_ERR(sals_cache_selected(NULL, &ti.t, &tc.t, NULL), INV, "cache: is NULL");
  }
  sals_memory_t m;
  CHECK_ERR(sals_cache_memory(cache, NULL, NULL), INV, "out: is NULL");
  CHECK_ERR(sals_cache_memory(NULL, &m, NULL), INV, "cache: is NULL");
  CHECK_OK(sals_cache_memory(cache, &m, NULL));
  /* 12 tokens of Dk 16: latent 16 float32, values 4-bit (8 bytes) + 2 groups of scale+zero. */
  CHECK(m.latent_keys == 12 * 16 * 4, "latent %llu", (unsigned long long)m.latent_keys);
  CHECK(m.values == 12 * 8 && m.value_scales == 12 * 2 * 4, "values %llu %llu",
        (unsigned long long)m.values, (unsigned long long)m.value_scales);
  CHECK(m.positions == 48 && m.dense_fp16 == 2 * 12 * 16 * 2, "positions/dense");
  CHECK(m.exact_window == 2 * (1 + 2) * 16 * 4 * 2, "exact %llu",
        (unsigned long long)m.exact_window);
  CHECK(m.total ==
            m.latent_keys + m.values + m.value_scales + m.exact_window + m.positions + m.projection,
        "total");
  CHECK(m.allocated >= m.total, "allocated");
  sals_config_t got;
  CHECK_ERR(sals_cache_get_config(NULL, &got), INV, "cache: is NULL");
  CHECK_ERR(sals_cache_get_config(cache, NULL), INV, "out: is NULL");
  CHECK_OK(sals_cache_get_config(cache, &got));
  CHECK(memcmp(&got, &cfg, sizeof cfg) == 0, "config round trip");
  CHECK_ERR(sals_cache_reset(NULL, NULL), INV, "cache: is NULL");
  CHECK_OK(sals_cache_reset(cache, NULL));
  tset(&tk, k, F32, 4, 2, 3, 2, 8);
  tset(&tp, pos, I32, 2, 2, 3, 0, 0);
  tstride(&tp, 8, 1, 0, 0);
  CHECK_OK(sals_cache_append(cache, &tk.t, &tv.t, &tp.t, NULL));
  sals_cache_destroy(cache);

  /* Stateless functions. */
  {
    float x[4 * 16] = {0}, pr[16 * 8] = {0}, out[4 * 8];
    tensor_t tx, tpr, tout;
    tset(&tx, x, F32, 2, 4, 16, 0, 0);
    tset(&tpr, pr, F32, 2, 16, 8, 0, 0);
    tset(&tout, out, F32, 2, 4, 8, 0, 0);
    CHECK_ERR(sals_project(NULL, &tpr.t, &tout.t, NULL), INV, "x: is NULL");
    tset(&tpr, pr, F32, 2, 12, 8, 0, 0);
    CHECK_ERR(sals_project(&tx.t, &tpr.t, &tout.t, NULL), INV,
              "proj: dim 0 is 12, expected 16 (x.shape[1])");
    tset(&tpr, pr, F32, 2, 16, 8, 0, 0);
    tpr.t.device.device_type = kDLCUDA;
    CHECK_ERR(sals_project(&tx.t, &tpr.t, &tout.t, NULL), INV, "proj: on cuda:0 but x is on cpu");
    tx.t.device.device_type = kDLCUDA;
    tout.t.device.device_type = kDLCUDA;
    if (!sals_cuda_available()) {
      /* Built without CUDA, or built with it on a machine with no driver or GPU. */
      sals_status_t st = sals_project(&tx.t, &tpr.t, &tout.t, NULL);
      CHECK((st == SALS_ERR_UNSUPPORTED && strstr(sals_last_error(), "built without CUDA")) ||
                (st == SALS_ERR_DEVICE && strstr(sals_last_error(), "no usable CUDA device")),
            "CUDA tensors without a usable device: got %s \"%s\"", sals_status_string(st),
            sals_last_error());
    }
    tset(&tx, x, F32, 2, 4, 16, 0, 0);
    tset(&tout, x, F32, 2, 4, 8, 0, 0);
    tset(&tpr, pr, F32, 2, 16, 8, 0, 0);
    CHECK_ERR(sals_project(&tx.t, &tpr.t, &tout.t, NULL), INV, "out: overlaps x");

    int32_t p4[4] = {0, 1, 2, 3};
    tensor_t t3, tpos;
    tset(&t3, x, F32, 3, 4, 2, 8, 0);
    tset(&tpos, p4, I32, 1, 4, 0, 0, 0);
    sals_rope_t rope = {g_inv_freq, 8, 1.0f, 0};
    CHECK_OK(sals_rope_apply(&t3.t, &tpos.t, &rope, &t3.t, NULL)); /* in place */
    CHECK_ERR(sals_rope_apply(&t3.t, &tpos.t, NULL, &t3.t, NULL), INV, "rope: is NULL");
    tensor_t t3b;
    tset(&t3b, x + 1, F32, 3, 4, 2, 8, 0);
    CHECK_ERR(sals_rope_apply(&t3.t, &tpos.t, &rope, &t3b.t, NULL), INV,
              "out: overlaps x without being the same view");
    tset(&tpos, p4, I32, 1, 3, 0, 0, 0);
    CHECK_ERR(sals_rope_apply(&t3.t, &tpos.t, &rope, &t3.t, NULL), INV,
              "pos: dim 0 is 3, expected 4");

    float ql[2 * 1 * 8] = {0}, kl[2 * 20 * 8] = {0};
    int32_t idx[2 * 1 * 4], lens[2] = {20, 21};
    tensor_t tql, tkl, ti, tl;
    tset(&tql, ql, F32, 3, 2, 1, 8, 0);
    tset(&tkl, kl, F32, 3, 2, 20, 8, 0);
    tset(&ti, idx, I32, 3, 2, 1, 4, 0);
    tset(&tl, lens, I32, 1, 2, 0, 0, 0);
    CHECK_ERR(sals_score_select(&tql.t, &tkl.t, NULL, 9, 2, 2, 4, &ti.t, NULL), INV,
              "score_rank: 9 not in 1..8");
    CHECK_ERR(sals_score_select(&tql.t, &tkl.t, NULL, 8, 10, 8, 4, &ti.t, NULL), INV,
              "budget: 4 not in 1..2");
    CHECK_ERR(sals_score_select(&tql.t, &tkl.t, NULL, 8, -1, 8, 4, &ti.t, NULL), INV, "n_sink");
    CHECK_ERR(sals_score_select(&tql.t, &tkl.t, NULL, 8, 2, 2, 5, &ti.t, NULL), INV,
              "out: dim 2 is 4, expected 5 (budget)");
    CHECK_ERR(sals_score_select(&tql.t, &tkl.t, &tl.t, 8, 2, 2, 4, &ti.t, NULL), INV,
              "lengths[1]: 21 not in 0..20");
    lens[1] = 12;
    for (int which = 0; which < 2; ++which) { /* NaN, then infinity */
      const float nf = which ? INFINITY : NAN;
      ql[8 + 3] = nf;
      CHECK_ERR(sals_score_select(&tql.t, &tkl.t, &tl.t, 4, 2, 2, 4, &ti.t, NULL),
                SALS_ERR_NOT_FINITE, "q_lat: holds NaN or infinity at row [1, 0]");
      ql[8 + 3] = 0.0f;
      ql[8 + 4] = nf; /* past score_rank 4: not read */
      CHECK_OK(sals_score_select(&tql.t, &tkl.t, &tl.t, 4, 2, 2, 4, &ti.t, NULL));
      kl[(20 + 5) * 8] = nf; /* sequence 1, candidate 5 */
      CHECK_ERR(sals_score_select(&tql.t, &tkl.t, &tl.t, 4, 2, 2, 4, &ti.t, NULL),
                SALS_ERR_NOT_FINITE, "k_lat: holds NaN or infinity at row [1, 5]");
      kl[(20 + 5) * 8] = 0.0f;
      /* Not read: a sink, a recent token, a row past the length, coordinates past score_rank. */
      kl[(20 + 1) * 8] = kl[(20 + 10) * 8] = kl[(20 + 15) * 8] = kl[(0 + 7) * 8 + 6] = nf;
      CHECK_OK(sals_score_select(&tql.t, &tkl.t, &tl.t, 4, 2, 2, 4, &ti.t, NULL));
    }

    float kk[1 * 4 * 2 * 8] = {0}, vv[1 * 4 * 2 * 8] = {0}, qq[1 * 4 * 8] = {0}, oo[1 * 4 * 8];
    int32_t sidx[1 * 1 * 2] = {0, 4};
    tensor_t tqq, tkk, tvv, tsi, too;
    tset(&tqq, qq, F32, 3, 1, 4, 8, 0);
    tset(&tkk, kk, F32, 4, 1, 4, 2, 8);
    tset(&tvv, vv, F32, 4, 1, 4, 2, 8);
    tset(&tsi, sidx, I32, 3, 1, 1, 2, 0);
    tset(&too, oo, F32, 3, 1, 4, 8, 0);
    CHECK_ERR(sals_sparse_attention(&tqq.t, &tkk.t, &tvv.t, &tsi.t, NULL, 0.0f, &too.t, NULL), INV,
              "idx[0, 0, 1]: 4 not a token");
    sidx[1] = -2;
    CHECK_ERR(sals_sparse_attention(&tqq.t, &tkk.t, &tvv.t, &tsi.t, NULL, 0.0f, &too.t, NULL), INV,
              "idx[0, 0, 1]: -2");
    sidx[1] = -1;
    CHECK_OK(sals_sparse_attention(&tqq.t, &tkk.t, &tvv.t, &tsi.t, NULL, 0.0f, &too.t, NULL));
    CHECK_ERR(sals_sparse_attention(&tqq.t, &tkk.t, &tvv.t, &tsi.t, NULL, -1.0f, &too.t, NULL), INV,
              "scale");
    tset(&tqq, qq, F32, 3, 1, 3, 8, 0);
    tset(&too, oo, F32, 3, 1, 3, 8, 0);
    CHECK_ERR(sals_sparse_attention(&tqq.t, &tkk.t, &tvv.t, NULL, NULL, 0.0f, &too.t, NULL), INV,
              "not a multiple of k.shape[2]");

    float vq[2 * 8] = {0};
    uint8_t pk[2 * 4];
    uint16_t sc[2], zr[2];
    tensor_t tvq, tpk, tsc, tzr;
    tset(&tvq, vq, F32, 2, 2, 8, 0, 0);
    tset(&tpk, pk, U8, 2, 2, 4, 0, 0);
    tset(&tsc, sc, F16, 2, 2, 1, 0, 0);
    tset(&tzr, zr, F16, 2, 2, 1, 0, 0);
    CHECK_ERR(sals_quantize_values(&tvq.t, 3, 8, &tpk.t, &tsc.t, &tzr.t, NULL), INV, "bits: 3");
    CHECK_ERR(sals_quantize_values(&tvq.t, 4, 3, &tpk.t, &tsc.t, &tzr.t, NULL), INV,
              "group: 3 does not divide");
    CHECK_ERR(sals_quantize_values(&tvq.t, 4, 1, &tpk.t, &tsc.t, &tzr.t, NULL), INV,
              "group: 1 groups of 4-bit");
    CHECK_ERR(sals_quantize_values(&tvq.t, 2, 8, &tpk.t, &tsc.t, &tzr.t, NULL), INV,
              "packed: dim 1 is 4, expected 2");
    tset(&tsc, sc, F32, 2, 2, 1, 0, 0);
    CHECK_ERR(sals_quantize_values(&tvq.t, 4, 8, &tpk.t, &tsc.t, &tzr.t, NULL), INV,
              "scale: dtype float32 not supported (float16)");
    tset(&tsc, sc, F16, 2, 2, 1, 0, 0);
    CHECK_ERR(sals_dequantize_values(&tpk.t, &tsc.t, &tzr.t, 4, 8, NULL, NULL), INV,
              "out: is NULL");
  }
  test_stateless_not_finite();
  test_huge_config();
  return finish();
}
