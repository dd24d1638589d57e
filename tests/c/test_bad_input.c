/*
 * Inputs that used to be accepted with a wrong result, or refused though valid: misaligned
 * byte_offset, strides spanning too much, outputs whose elements share memory, repeated
 * sparse_attention indices, values the cache's storage cannot hold, projections without
 * orthonormal columns, empty tensors with any strides, and one cache used by two threads.
 */
#include <pthread.h>
#include <sched.h>

#include "util.h"

#define INV SALS_ERR_INVALID_ARGUMENT
#define NF SALS_ERR_NOT_FINITE

static float g_inv_freq[4] = {1.0f, 0.1f, 0.01f, 0.001f};

/* U [16, 16] = the Sylvester Hadamard matrix / 4: orthonormal, every entry +-1/4. */
static void hadamard16(float* U) {
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j)
      U[i * 16 + j] = (__builtin_popcount((unsigned)(i & j)) & 1) ? -0.25f : 0.25f;
}

static sals_status_t create_with(const sals_config_t* c, const float* U, sals_cache_t** out) {
  sals_rope_t rope = {g_inv_freq, 8, 1.0f, 0};
  tensor_t p;
  tset(&p, (void*)U, F32, 2, 16, c->rank, 0, 0);
  return sals_cache_create(c, &rope, &p.t, out);
}

static int32_t length0(const sals_cache_t* cache) {
  int32_t lens[2] = {-1, -1};
  tensor_t tl;
  tset(&tl, lens, I32, 1, 2, 0, 0, 0);
  if (sals_cache_lengths(cache, &tl.t, NULL) != SALS_OK) return -1;
  return lens[0];
}

static void test_alignment_and_spans(void) {
  float x[4 * 16 + 1] = {0}, pr[16 * 8] = {0}, out[4 * 8];
  tensor_t tx, tpr, tout;
  tset(&tx, x, F32, 2, 4, 16, 0, 0);
  tset(&tpr, pr, F32, 2, 16, 8, 0, 0);
  tset(&tout, out, F32, 2, 4, 8, 0, 0);
  tx.t.byte_offset = 4; /* one float in: aligned */
  CHECK_OK(sals_project(&tx.t, &tpr.t, &tout.t, NULL));
  tx.t.byte_offset = 2;
  CHECK_ERR(sals_project(&tx.t, &tpr.t, &tout.t, NULL), INV,
            "x: data + byte_offset (byte_offset 2) is not aligned to the 4 bytes of a float32");
  tx.t.byte_offset = 0;
  tout.t.byte_offset = 1;
  CHECK_ERR(sals_project(&tx.t, &tpr.t, &tout.t, NULL), INV, "out: data + byte_offset");
  tout.t.byte_offset = 0;
  tx.t.data = (char*)x + 1; /* a misaligned data pointer is the same fault */
  CHECK_ERR(sals_project(&tx.t, &tpr.t, &tout.t, NULL), INV, "x: data + byte_offset");
  tx.t.data = x;
  /* int32 positions at an odd offset, through the cache. */
  sals_config_t c = config16(SALS_DTYPE_FLOAT32, 16);
  float U[256];
  hadamard16(U);
  sals_cache_t* cache = NULL;
  CHECK_OK(create_with(&c, U, &cache));
  float k[2 * 16] = {0};
  int32_t pos[3] = {0, 1, 2};
  tensor_t tk, tp;
  tset(&tk, k, F32, 4, 1, 2, 2, 8);
  tset(&tp, pos, I32, 2, 1, 2, 0, 0);
  tp.t.byte_offset = 2;
  CHECK_ERR(sals_cache_append(cache, &tk.t, &tk.t, &tp.t, NULL), INV,
            "positions: data + byte_offset");
  tp.t.byte_offset = 4;
  CHECK_OK(sals_cache_append(cache, &tk.t, &tk.t, &tp.t, NULL));
  sals_cache_destroy(cache);

  /* Extents and strides each below 2^48 whose span is not. */
  int64_t shape[2] = {(int64_t)1 << 40, 2}, strides[2] = {(int64_t)1 << 47, 1};
  DLTensor huge = {x, {kDLCPU, 0}, 2, F32, shape, strides, 0};
  tset(&tpr, pr, F32, 2, 2, 8, 0, 0);
  CHECK_ERR(sals_project(&huge, &tpr.t, &tout.t, NULL), INV, "x: strides span more than 2^48");
}

/* byte_offset beyond any tensor's reach, or an address range that wraps: refused, never
 * dereferenced (the data pointers below are fake). */
static void test_byte_offset_bounds(void) {
  float x[4 * 16] = {0}, pr[16 * 8] = {0}, out[4 * 8];
  tensor_t tx, tpr, tout;
  tset(&tx, x, F32, 2, 4, 16, 0, 0);
  tset(&tpr, pr, F32, 2, 16, 8, 0, 0);
  tset(&tout, out, F32, 2, 4, 8, 0, 0);
  /* 2^48 floats in: the bound, accepted (empty tensors, so nothing is read). */
  tx.shape[0] = tout.shape[0] = 0;
  tx.t.byte_offset = ((uint64_t)1 << 48) * 4;
  CHECK_OK(sals_project(&tx.t, &tpr.t, &tout.t, NULL));
  tx.t.byte_offset += 4;
  CHECK_ERR(sals_project(&tx.t, &tpr.t, &tout.t, NULL), INV,
            "x: byte_offset 1125899906842628 points past the data (more than 2^48 elements "
            "beyond data)");
  tx.shape[0] = tout.shape[0] = 4;
  tx.t.byte_offset = UINT64_MAX - 3; /* data - 4 once the address wraps */
  CHECK_ERR(sals_project(&tx.t, &tpr.t, &tout.t, NULL), INV,
            "x: byte_offset 18446744073709551612 points past the data");
  tout.t.byte_offset = (uint64_t)1 << 62;
  tx.t.byte_offset = 0;
  CHECK_ERR(sals_project(&tx.t, &tpr.t, &tout.t, NULL), INV,
            "out: byte_offset 4611686018427387904 points past the data");
  tout.t.byte_offset = 0;
  /* Addresses that wrap: the last element past UINTPTR_MAX, or a negative stride below 0. */
  tx.t.data = (void*)(UINTPTR_MAX - 255);
  tx.t.byte_offset = 64;
  CHECK_ERR(sals_project(&tx.t, &tpr.t, &tout.t, NULL), INV,
            "the strides reach outside the address space");
  tx.t.data = (void*)(uintptr_t)64;
  tx.t.byte_offset = 0;
  tstride(&tx, -16, 1, 0, 0);
  CHECK_ERR(sals_project(&tx.t, &tpr.t, &tout.t, NULL), INV,
            "x: data 0x40 + byte_offset 0 and the strides reach outside the address space");
}

static void test_empty_tensors_any_strides(void) {
  /* numpy exports empty arrays with zero strides; any strides describe no element. */
  float x[16], pr[16 * 8] = {0}, out[8];
  tensor_t tx, tpr, tout;
  tset(&tx, x, F32, 2, 0, 16, 0, 0);
  tstride(&tx, 0, 0, 0, 0);
  tset(&tpr, pr, F32, 2, 16, 8, 0, 0);
  tset(&tout, out, F32, 2, 0, 8, 0, 0);
  tstride(&tout, 0, 0, 0, 0);
  CHECK_OK(sals_project(&tx.t, &tpr.t, &tout.t, NULL));
  tset(&tx, NULL, F32, 2, 0, 16, 0, 0); /* and no data at all */
  tstride(&tx, 7, 3, 0, 0);
  CHECK_OK(sals_project(&tx.t, &tpr.t, &tout.t, NULL));

  sals_config_t c = config16(SALS_DTYPE_FLOAT16, 4);
  float U[256];
  hadamard16(U);
  sals_cache_t* cache = NULL;
  CHECK_OK(create_with(&c, U, &cache));
  float k[16] = {0};
  int32_t pos[1] = {0};
  tensor_t tk, tp, tq, to;
  tset(&tk, k, F32, 4, 1, 0, 2, 8);
  tstride(&tk, 0, 0, 0, 0);
  tset(&tp, pos, I32, 2, 1, 0, 0, 0);
  tstride(&tp, 0, 0, 0, 0);
  CHECK_OK(sals_cache_append(cache, &tk.t, &tk.t, &tp.t, NULL));
  tset(&tq, k, F32, 4, 0, 1, 4, 8);
  tstride(&tq, 0, 0, 0, 0);
  tset(&to, k, F32, 4, 0, 1, 4, 8);
  tstride(&to, 0, 0, 0, 0);
  tset(&tp, pos, I32, 2, 0, 1, 0, 0);
  tstride(&tp, 0, 0, 0, 0);
  CHECK_OK(sals_cache_attend(cache, &tq.t, &tp.t, &to.t, NULL));
  CHECK(length0(cache) == 0, "an empty append stored tokens");
  sals_cache_destroy(cache);

  float v[8];
  uint8_t pk[4];
  uint16_t sc[1], zr[1];
  tensor_t tv, tpk, tsc, tzr;
  tset(&tv, v, F32, 2, 0, 8, 0, 0);
  tstride(&tv, 0, 0, 0, 0);
  tset(&tpk, pk, U8, 2, 0, 4, 0, 0);
  tstride(&tpk, 0, 0, 0, 0);
  tset(&tsc, sc, F16, 2, 0, 1, 0, 0);
  tstride(&tsc, 0, 0, 0, 0);
  tset(&tzr, zr, F16, 2, 0, 1, 0, 0);
  tstride(&tzr, 0, 0, 0, 0);
  CHECK_OK(sals_quantize_values(&tv.t, 4, 8, &tpk.t, &tsc.t, &tzr.t, NULL));
  CHECK_OK(sals_dequantize_values(&tpk.t, &tsc.t, &tzr.t, 4, 8, &tv.t, NULL));
}

static void test_outputs_need_distinct_elements(void) {
  float x[4 * 16], pr[16 * 8], out[64], want[32];
  fill(x, 64, 1.0);
  fill(pr, 128, 1.0);
  tensor_t tx, tpr, tout;
  tset(&tx, x, F32, 2, 4, 16, 0, 0);
  tset(&tpr, pr, F32, 2, 16, 8, 0, 0);
  tset(&tout, want, F32, 2, 4, 8, 0, 0);
  CHECK_OK(sals_project(&tx.t, &tpr.t, &tout.t, NULL));
  tset(&tout, out, F32, 2, 4, 8, 0, 0);
  tstride(&tout, 0, 1, 0, 0); /* expand: every row is the same memory */
  CHECK_ERR(sals_project(&tx.t, &tpr.t, &tout.t, NULL), INV,
            "out: elements overlap in memory (dim 0 has stride 0)");
  tstride(&tout, 4, 1, 0, 0); /* rows of 8 every 4 floats */
  CHECK_ERR(sals_project(&tx.t, &tpr.t, &tout.t, NULL), INV, "out: elements overlap in memory");
  /* Reversed rows with padding: distinct elements, so fine, and written where they belong. */
  for (int i = 0; i < 64; ++i) out[i] = 7.0f;
  tset(&tout, out + 3 * 16, F32, 2, 4, 8, 0, 0);
  tstride(&tout, -16, 1, 0, 0);
  CHECK_OK(sals_project(&tx.t, &tpr.t, &tout.t, NULL));
  int same = 1;
  for (int r = 0; r < 4; ++r)
    for (int j = 0; j < 8; ++j) same &= out[(3 - r) * 16 + j] == want[r * 8 + j];
  CHECK(same && out[8] == 7.0f, "negative-stride output written wrongly");

  uint8_t pk[2 * 4];
  uint16_t sc[2], zr[2];
  float v[16];
  fill(v, 16, 1.0);
  tensor_t tv, tpk, tsc, tzr;
  tset(&tv, v, F32, 2, 2, 8, 0, 0);
  tset(&tpk, pk, U8, 2, 2, 4, 0, 0);
  tset(&tsc, sc, F16, 2, 2, 1, 0, 0);
  tstride(&tsc, 0, 1, 0, 0);
  tset(&tzr, zr, F16, 2, 2, 1, 0, 0);
  CHECK_ERR(sals_quantize_values(&tv.t, 4, 8, &tpk.t, &tsc.t, &tzr.t, NULL), INV,
            "scale: elements overlap in memory");

  /* The cache's outputs: attend's out, lengths' out, selected's idx and count. */
  sals_config_t c = config16(SALS_DTYPE_FLOAT32, 16);
  float U[256];
  hadamard16(U);
  sals_cache_t* cache = NULL;
  CHECK_OK(create_with(&c, U, &cache));
  float k[2 * 3 * 16];
  fill(k, 96, 1.0);
  int32_t pos[2 * 3] = {0, 1, 2, 0, 1, 2};
  tensor_t tk, tp;
  tset(&tk, k, F32, 4, 2, 3, 2, 8);
  tset(&tp, pos, I32, 2, 2, 3, 0, 0);
  CHECK_OK(sals_cache_append(cache, &tk.t, &tk.t, &tp.t, NULL));
  float q[2 * 32], o[2 * 32 + 8];
  fill(q, 64, 1.0);
  tensor_t tq, to, tqp;
  tset(&tq, q, F32, 4, 2, 1, 4, 8);
  tset(&tqp, pos + 2, I32, 2, 2, 1, 0, 0);
  tstride(&tqp, 3, 1, 0, 0);
  tset(&to, o, F32, 4, 2, 1, 4, 8);
  tstride(&to, 0, 32, 8, 1);
  CHECK_ERR(sals_cache_attend(cache, &tq.t, &tqp.t, &to.t, NULL), INV, "out: elements overlap");
  /* out over the memory of positions (C used to compare out with q only). */
  int32_t shared[2 * 32 + 8];
  tset(&tqp, shared, I32, 2, 2, 1, 0, 0);
  shared[0] = shared[1] = 2;
  tset(&to, shared, F32, 4, 2, 1, 4, 8);
  CHECK_ERR(sals_cache_attend(cache, &tq.t, &tqp.t, &to.t, NULL), INV, "out: overlaps positions");
  int32_t lens[2];
  tensor_t tl;
  tset(&tl, lens, I32, 1, 2, 0, 0, 0);
  tstride(&tl, 0, 0, 0, 0);
  CHECK_ERR(sals_cache_lengths(cache, &tl.t, NULL), INV, "out: last dimension must be contiguous");
  int32_t idx[2 * 8], cnt[2];
  tensor_t ti, tc;
  tset(&ti, idx, I32, 3, 2, 1, 8, 0);
  tstride(&ti, 0, 8, 1, 0);
  tset(&tc, cnt, I32, 1, 2, 0, 0, 0);
  CHECK_ERR(sals_cache_selected(cache, &ti.t, &tc.t, NULL), INV, "idx: elements overlap");
  sals_cache_destroy(cache);
}

static void test_repeated_indices(void) {
  float kk[1 * 4 * 2 * 8], vv[1 * 4 * 2 * 8], qq[1 * 4 * 8], oo[1 * 4 * 8];
  fill(kk, 64, 1.0);
  fill(vv, 64, 1.0);
  fill(qq, 32, 1.0);
  int32_t sidx[1 * 2 * 3] = {0, 2, 0, 1, 2, 3};
  tensor_t tq, tk, tv, ti, to;
  tset(&tq, qq, F32, 3, 1, 4, 8, 0);
  tset(&tk, kk, F32, 4, 1, 4, 2, 8);
  tset(&tv, vv, F32, 4, 1, 4, 2, 8);
  tset(&to, oo, F32, 3, 1, 4, 8, 0);
  tset(&ti, sidx, I32, 3, 1, 1, 3, 0);
  CHECK_ERR(sals_sparse_attention(&tq.t, &tk.t, &tv.t, &ti.t, NULL, 0.0f, &to.t, NULL), INV,
            "idx[0, 0, 2]: token 0 appears twice in idx[0, 0]");
  sidx[2] = -1;
  sidx[1] = -1; /* -1 may repeat */
  CHECK_OK(sals_sparse_attention(&tq.t, &tk.t, &tv.t, &ti.t, NULL, 0.0f, &to.t, NULL));
  /* Per KV head: the same token in two heads' rows is fine. */
  int32_t hidx[1 * 2 * 2] = {1, 3, 1, 3};
  tset(&ti, hidx, I32, 3, 1, 2, 2, 0);
  CHECK_OK(sals_sparse_attention(&tq.t, &tk.t, &tv.t, &ti.t, NULL, 0.0f, &to.t, NULL));
  hidx[3] = 1;
  CHECK_ERR(sals_sparse_attention(&tq.t, &tk.t, &tv.t, &ti.t, NULL, 0.0f, &to.t, NULL), INV,
            "idx[0, 1, 1]: token 1 appears twice");
}

/* One append of a single token (sequence 0) with k = kval everywhere but k[0] = k0, v likewise. */
/* One token at position 0 of sequence 0 (Dk = 16). */
static sals_status_t append_row(sals_cache_t* cache, float* k, float* v) {
  int32_t pos[1] = {0};
  tensor_t tk, tv, tp;
  tset(&tk, k, F32, 4, 1, 1, 2, 8);
  tset(&tv, v, F32, 4, 1, 1, 2, 8);
  tset(&tp, pos, I32, 2, 1, 1, 0, 0);
  return sals_cache_append(cache, &tk.t, &tv.t, &tp.t, NULL);
}

static sals_status_t append_one(sals_cache_t* cache, float k0, float kval, float v0, float vval) {
  float k[16], v[16];
  for (int i = 0; i < 16; ++i) k[i] = kval, v[i] = vval;
  k[0] = k0;
  v[0] = v0;
  return append_row(cache, k, v);
}

static void test_storage_overflow(void) {
  float U[256];
  hadamard16(U);
  sals_cache_t* cache = NULL;
  sals_config_t c = config16(SALS_DTYPE_FLOAT16, 16);
  CHECK_OK(create_with(&c, U, &cache));
  CHECK_ERR(append_one(cache, 70000.0f, 1.0f, 1.0f, 1.0f), NF,
            "k: 70000 (sequence 0, token 0, head 0) overflows the float16 storage");
  CHECK_ERR(append_one(cache, 1.0f, 1.0f, -1e5f, 1.0f), NF, "v: -100000");
  /* Every element fits float16, but the latent coordinate sum(k) / 4 = 240000 does not. */
  CHECK_ERR(append_one(cache, 60000.0f, 60000.0f, 1.0f, 1.0f), NF,
            "k: latent coordinate 0 of (sequence 0, token 0) is 240000");
  CHECK_OK(append_one(cache, 65504.0f, 1.0f, -65504.0f, 1.0f)); /* the largest values fit */
  CHECK(length0(cache) == 1, "failed appends stored tokens");
  sals_cache_destroy(cache);

  /* Quantised values: the float16 scale and zero must be finite, whatever the storage. */
  c = config16(SALS_DTYPE_FLOAT32, 2);
  CHECK_OK(create_with(&c, U, &cache));
  CHECK_ERR(append_one(cache, 1.0f, 1.0f, 1e6f, 0.0f), NF,
            "v: channels 0..7 of (sequence 0, token 0) span more than the float16 scale and zero");
  CHECK_ERR(append_one(cache, 1.0f, 1.0f, -7e4f, 0.0f), NF, "v: channels 0..7");
  CHECK_ERR(append_one(cache, 1.0f, 1.0f, 1e5f, 1e5f), NF, "v: channels 0..7");
  CHECK_OK(append_one(cache, 1.0f, 1.0f, 6e4f, -6e4f)); /* scale 4e4 fits */
  CHECK(length0(cache) == 1, "failed appends stored tokens");
  sals_cache_destroy(cache);

  /* Quantised latent keys: every group's float16 scale and zero must be finite, whatever the
   * storage. With the Hadamard U, append_one's latent coordinate j is
   * (k0 - kval + 16 kval [j == 0]) / 4, and k = a e_0 + b e_8 gives (a + b) / 4 for j < 8 and
   * (a - b) / 4 for j >= 8 (the rest part, past score_rank 8). */
  c = config16(SALS_DTYPE_FLOAT32, 16);
  c.key_bits = 4;
  c.key_group = 4;
  CHECK_OK(create_with(&c, U, &cache));
  CHECK_ERR(append_one(cache, -3e5f, 0.0f, 1.0f, 1.0f), NF,
            "k: latent coordinates 0..3 of (sequence 0, token 0) span more than the float16 "
            "scale and zero of 4-bit keys hold");                    /* zero -75000 */
  CHECK_ERR(append_one(cache, 5e6f, 0.0f, 1.0f, 1.0f), NF,
            "k: latent coordinates 0..3");                            /* scale 78966 */
  {
    float k[16] = {0}, v[16] = {0};
    k[0] = -2e5f;
    k[8] = 2e5f;
    CHECK_ERR(append_row(cache, k, v), NF, "k: latent coordinates 8..11 of (sequence 0, token 0)");
  }
  CHECK_OK(append_one(cache, 2.4e5f, 0.0f, 1.0f, 1.0f)); /* 60000 is within float16's range */
  CHECK_OK(append_one(cache, -2.4e5f, 0.0f, 1.0f, 1.0f));
  CHECK(length0(cache) == 2, "failed appends stored tokens");
  sals_cache_destroy(cache);

  /* float32 storage takes any finite float; check_finite = 0 checks nothing (documented). */
  c = config16(SALS_DTYPE_FLOAT32, 16);
  CHECK_OK(create_with(&c, U, &cache));
  CHECK_OK(append_one(cache, 3e38f, 1.0f, -3e38f, 1.0f));
  sals_cache_destroy(cache);
  c = config16(SALS_DTYPE_FLOAT16, 16);
  c.check_finite = 0;
  CHECK_OK(create_with(&c, U, &cache));
  CHECK_OK(append_one(cache, 70000.0f, 1.0f, 1.0f, 1.0f));
  sals_cache_destroy(cache);

  /* The stateless quantiser: its float16 scale and zero, too. */
  float v[2 * 8] = {0};
  v[8 + 3] = 1e6f;
  uint8_t pk[2 * 2];
  uint16_t sc[2], zr[2];
  tensor_t tv, tpk, tsc, tzr;
  tset(&tv, v, F32, 2, 2, 8, 0, 0);
  tset(&tpk, pk, U8, 2, 2, 2, 0, 0);
  tset(&tsc, sc, F16, 2, 2, 1, 0, 0);
  tset(&tzr, zr, F16, 2, 2, 1, 0, 0);
  CHECK_ERR(sals_quantize_values(&tv.t, 2, 8, &tpk.t, &tsc.t, &tzr.t, NULL), NF,
            "v: row 1, channels 0..7 span more than the float16 scale and zero of 2-bit codes");
}

static void test_projection_orthonormal(void) {
  float U[256];
  hadamard16(U);
  sals_config_t c = config16(SALS_DTYPE_FLOAT32, 16);
  sals_cache_t* cache = NULL;
  for (int i = 0; i < 256; ++i) U[i] *= 2.0f;
  CHECK_ERR(create_with(&c, U, &cache), INV, "projection: column 0 has squared norm 4");
  hadamard16(U);
  c.rank = 8;
  float V[16 * 8];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 8; ++j) V[i * 8 + j] = U[i * 16 + j];
  CHECK_OK(create_with(&c, V, &cache));
  sals_cache_destroy(cache);
  cache = NULL;
  for (int i = 0; i < 16; ++i) V[i * 8 + 5] = V[i * 8 + 2]; /* a repeated column */
  CHECK_ERR(create_with(&c, V, &cache), INV, "projection: columns are not orthogonal");
  for (int i = 0; i < 16; ++i) V[i * 8 + 5] = U[i * 16 + 5];
  V[0] += 0.0005f; /* float32 rounding-size noise passes */
  CHECK_OK(create_with(&c, V, &cache));
  sals_cache_destroy(cache);
  cache = NULL;
  /* 16-bit copies of random orthonormal columns pass: the tolerance covers their rounding. */
  double G[16 * 8];
  for (int j = 0; j < 8; ++j) {
    for (int i = 0; i < 16; ++i) G[i * 8 + j] = urand();
    for (int pass = 0; pass < 2; ++pass)
      for (int p = 0; p < j; ++p) {
        double dot = 0;
        for (int i = 0; i < 16; ++i) dot += G[i * 8 + p] * G[i * 8 + j];
        for (int i = 0; i < 16; ++i) G[i * 8 + j] -= dot * G[i * 8 + p];
      }
    double n = 0;
    for (int i = 0; i < 16; ++i) n += G[i * 8 + j] * G[i * 8 + j];
    for (int i = 0; i < 16; ++i) G[i * 8 + j] /= sqrt(n);
  }
  uint16_t h[16 * 8], b[16 * 8];
  for (int i = 0; i < 128; ++i) {
    const float f = (float)G[i];
    uint32_t u;
    memcpy(&u, &f, 4);
    h[i] = to_f16(f);
    b[i] = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
  sals_rope_t rope = {g_inv_freq, 8, 1.0f, 0};
  tensor_t p;
  tset(&p, h, F16, 2, 16, 8, 0, 0);
  CHECK_OK(sals_cache_create(&c, &rope, &p.t, &cache));
  sals_cache_destroy(cache);
  tset(&p, b, BF16, 2, 16, 8, 0, 0);
  CHECK_OK(sals_cache_create(&c, &rope, &p.t, &cache));
  sals_cache_destroy(cache);
  cache = NULL;
  for (int i = 0; i < 16; ++i) b[i * 8 + 3] = b[i * 8 + 1]; /* still refused in bfloat16 */
  CHECK_ERR(sals_cache_create(&c, &rope, &p.t, &cache), INV,
            "projection: columns are not orthogonal");
  CHECK(cache == NULL, "handle written on failure");
}

/* ---- one cache, two threads ------------------------------------------------------------ */

typedef struct {
  sals_cache_t* cache;
  tensor_t q, qp, out;
  volatile int done;
  volatile int main_busy; /* refusals the other thread saw */
  int calls, busy, other;
} worker_t;

static int is_busy_error(sals_status_t st) {
  return st == INV && strstr(sals_last_error(), "while another call is using the cache") != NULL;
}

static void* attend_worker(void* p) {
  worker_t* w = (worker_t*)p;
  /* Until 200 calls went through and either thread saw a refusal (each refused call returns
   * at once), or a million calls. */
  for (int ok = 0; (ok < 200 || (w->busy == 0 && w->main_busy == 0)) && w->calls < 1000000;) {
    sals_status_t st = sals_cache_attend(w->cache, &w->q.t, &w->qp.t, &w->out.t, NULL);
    w->calls++;
    if (st == SALS_OK) ok++;
    else if (is_busy_error(st)) w->busy++, sched_yield(); /* let the holder finish */
    else w->other++;
  }
  w->done = 1;
  return NULL;
}

static void test_two_threads(void) {
  sals_config_t c = config16(SALS_DTYPE_FLOAT32, 16);
  c.max_tokens = 2048;
  c.max_batch = 1;
  c.n_threads = 1;
  float U[256];
  hadamard16(U);
  sals_cache_t* cache = NULL;
  CHECK_OK(create_with(&c, U, &cache));
  if (!cache) return;
  const int T = 2048;
  float* k = (float*)malloc(sizeof(float) * T * 16);
  int32_t* pos = (int32_t*)malloc(sizeof(int32_t) * T);
  fill(k, T * 16, 1.0);
  for (int t = 0; t < T; ++t) pos[t] = t;
  tensor_t tk, tp;
  tset(&tk, k, F32, 4, 1, T, 2, 8);
  tset(&tp, pos, I32, 2, 1, T, 0, 0);
  CHECK_OK(sals_cache_append(cache, &tk.t, &tk.t, &tp.t, NULL));
  worker_t w;
  memset(&w, 0, sizeof w);
  w.cache = cache;
  float q[32], out[32], want[32];
  fill(q, 32, 1.0);
  int32_t qpos[1] = {T - 1};
  tset(&w.q, q, F32, 4, 1, 1, 4, 8);
  tset(&w.qp, qpos, I32, 2, 1, 1, 0, 0);
  tset(&w.out, want, F32, 4, 1, 1, 4, 8);
  CHECK_OK(sals_cache_attend(cache, &w.q.t, &w.qp.t, &w.out.t, NULL));
  tset(&w.out, out, F32, 4, 1, 1, 4, 8);
  pthread_t th;
  CHECK(pthread_create(&th, NULL, attend_worker, &w) == 0, "pthread_create");
  int calls = 0, busy = 0, other = 0;
  int32_t lens[1];
  tensor_t tl;
  tset(&tl, lens, I32, 1, 1, 0, 0, 0);
  /* A long call: 64 queries attending densely over the 2048 tokens (a thread switch lands
   * inside it even under valgrind, which runs one thread at a time). */
  enum { NQ = 64 };
  float* q64 = (float*)malloc(sizeof(float) * NQ * 32);
  float* out64 = (float*)malloc(sizeof(float) * NQ * 32);
  int32_t pos64[NQ];
  fill(q64, NQ * 32, 1.0);
  for (int t = 0; t < NQ; ++t) pos64[t] = T - NQ + t;
  tensor_t tq64, tp64, to64;
  tset(&tq64, q64, F32, 4, 1, NQ, 4, 8);
  tset(&tp64, pos64, I32, 2, 1, NQ, 0, 0);
  tset(&to64, out64, F32, 4, 1, NQ, 4, 8);
  while (!w.done) {
    /* This thread appends nothing (that would change the other's answer): it reads lengths
     * and attends without storing. */
    sals_status_t st = sals_cache_lengths(cache, &tl.t, NULL);
    calls++;
    if (is_busy_error(st)) busy++;
    else if (st != SALS_OK || lens[0] != T) other++;
    if (busy == 0 && w.busy == 0) { /* the long call, until either thread saw a refusal */
      st = sals_cache_attend(cache, &tq64.t, &tp64.t, &to64.t, NULL);
      calls++;
      if (is_busy_error(st)) busy++;
      else if (st != SALS_OK) other++;
    }
    /* after every call: a refusal of the lengths call alone must also end the worker's loop */
    w.main_busy = busy;
    /* between calls, so that the worker also runs outside this thread's calls */
    sched_yield();
  }
  free(q64);
  free(out64);
  pthread_join(th, NULL);
  CHECK(other == 0 && w.other == 0, "unexpected failures: %d here, %d in the worker", other,
        w.other);
  CHECK(busy + w.busy > 0, "no concurrent use detected in %d + %d calls", calls, w.calls);
  CHECK(w.calls - w.busy - w.other >= 200, "the worker got %d calls through",
        w.calls - w.busy - w.other);
  CHECK(memcmp(out, want, sizeof out) == 0, "the worker's answer changed under concurrent use");
  CHECK_OK(sals_cache_attend(cache, &w.q.t, &w.qp.t, &w.out.t, NULL)); /* free again */
  sals_cache_destroy(cache);
  free(k);
  free(pos);
}

int main(void) {
  test_alignment_and_spans();
  test_byte_offset_bounds();
  test_empty_tensors_any_strides();
  test_outputs_need_distinct_elements();
  test_repeated_indices();
  test_storage_overflow();
  test_projection_orthonormal();
  test_two_threads();
  return finish();
}
