/* Paged storage (sals_paged_*): the slot layout, dense equivalence against the float64
 * reference of util.h with sequences scattered over shuffled blocks, and bad input. */
#include "util.h"

/* Calls without a window store (the test of the window store names its arguments). */
#define APPEND(paged, k, v, slots, pages) \
  sals_paged_append(paged, k, v, slots, pages, NULL, NULL, NULL)
#define ATTEND(paged, q, qs, lens, table, pages, out, sel) \
  sals_paged_attend(paged, q, qs, lens, table, pages, NULL, NULL, out, sel, NULL)

/* sals.h's slot layout, summed independently of the library. */
static int64_t documented_slot_bytes(const sals_config_t* g) {
  const int64_t e = g->dtype == SALS_DTYPE_FLOAT32 ? 4 : 2, dk = g->n_head_kv * g->head_dim;
  int64_t size = 0, align = 1;
  if (g->key_bits == 16) size += g->rank * e, align = e;
  if (g->value_bits == 16) size += dk * e, align = e;
  if (g->key_bits < 16) {
    size += 4 * g->rank / g->key_group + g->rank * g->key_bits / 8;
    align = align > 2 ? align : 2;
  }
  if (g->value_bits < 16) {
    size += 4 * dk / g->value_group + dk * g->value_bits / 8;
    align = align > 2 ? align : 2;
  }
  return (size + align - 1) / align * align;
}

static void test_slot_bytes(void) {
  sals_config_t g = config16(SALS_DTYPE_FLOAT32, 16);
  int64_t bytes = 0;
  CHECK_OK(sals_paged_slot_bytes(&g, &bytes));
  CHECK(bytes == 16 * 4 + 16 * 4 && bytes == documented_slot_bytes(&g), "dense f32: %lld",
        (long long)bytes);
  g = config16(SALS_DTYPE_FLOAT16, 4);
  g.rank = 8;
  g.score_rank = 4;
  g.key_bits = 4;
  g.key_group = 2;
  CHECK_OK(sals_paged_slot_bytes(&g, &bytes));
  CHECK(bytes == documented_slot_bytes(&g), "4-bit keys and values: %lld, documented %lld",
        (long long)bytes, (long long)documented_slot_bytes(&g));
  g = config16(SALS_DTYPE_BFLOAT16, 2);
  g.rank = 3;
  g.score_rank = 1;
  CHECK_OK(sals_paged_slot_bytes(&g, &bytes));
  CHECK(bytes == documented_slot_bytes(&g) && bytes % 2 == 0, "padded: %lld", (long long)bytes);
  /* A cache's max_batch and max_tokens are not used. */
  g.max_batch = 0;
  g.max_tokens = -1;
  CHECK_OK(sals_paged_slot_bytes(&g, &bytes));
  g.rank = 17;
  CHECK_ERR(sals_paged_slot_bytes(&g, &bytes), SALS_ERR_INVALID_ARGUMENT,
            "config.rank: 17 > Dk 16");
  CHECK_ERR(sals_paged_slot_bytes(NULL, &bytes), SALS_ERR_INVALID_ARGUMENT, "config: is NULL");
}

enum { HQ = 4, HKV = 2, D = 8, DK = HKV * D, BS = 4, NB = 12, B = 2 };

typedef struct {
  sals_paged_t* paged;
  float inv_freq[D / 2];
  float U[DK * DK];
  int32_t len[B];
  float k[B][40][DK], v[B][40][DK];
  int32_t table[B][6];
  uint8_t* pages;
  int64_t slot_bytes;
} problem_t;

/* Two sequences of 23 and 9 tokens in shuffled blocks of 4, appended in one call, under the
 * dense-equivalent settings (identity projection, full budget, float32 16-bit values). */
static void setup(problem_t* p) {
  memset(p, 0, sizeof *p);
  sals_config_t g = config16(SALS_DTYPE_FLOAT32, 16);
  g.budget_frac = 1.0f;
  g.score_rank = 16;
  make_inv_freq(p->inv_freq, D, 10000.0);
  for (int i = 0; i < DK; ++i) p->U[i * DK + i] = 1.0f;
  sals_rope_t rope = {p->inv_freq, D, 1.0f, 0};
  tensor_t tu;
  tset(&tu, p->U, F32, 2, DK, DK, 0, 0);
  CHECK_OK(sals_paged_create(&g, &rope, &tu.t, &p->paged));
  CHECK_OK(sals_paged_slot_bytes(&g, &p->slot_bytes));
  p->pages = calloc((size_t)(NB * BS * p->slot_bytes), 1);
  p->len[0] = 23;
  p->len[1] = 9;
  static const int32_t order[] = {7, 2, 10, 0, 5, 11, 3, 8, 1};
  int at = 0;
  for (int b = 0; b < B; ++b)
    for (int j = 0; j < (p->len[b] + BS - 1) / BS; ++j) p->table[b][j] = order[at++];
  float k[32][DK], v[32][DK];
  int32_t slots[32];
  int n = 0;
  for (int b = 0; b < B; ++b) {
    fill(&p->k[b][0][0], p->len[b] * DK, 1.0);
    fill(&p->v[b][0][0], p->len[b] * DK, 1.0);
    for (int t = 0; t < p->len[b]; ++t, ++n) {
      memcpy(k[n], p->k[b][t], sizeof k[n]);
      memcpy(v[n], p->v[b][t], sizeof v[n]);
      slots[n] = p->table[b][t / BS] * BS + t % BS;
    }
  }
  tensor_t tk, tv, ts, tp;
  tset(&tk, k, F32, 3, n, HKV, D, 0);
  tset(&tv, v, F32, 3, n, HKV, D, 0);
  tset(&ts, slots, I32, 1, n, 0, 0, 0);
  tset(&tp, p->pages, U8, 3, NB, BS, p->slot_bytes, 0);
  CHECK_OK(APPEND(p->paged, &tk.t, &tv.t, &ts.t, &tp.t));
}

static void teardown(problem_t* p) {
  sals_paged_destroy(p->paged);
  free(p->pages);
}

/* Sequence 0 takes a decode step (its last token), sequence 1 a prefill chunk of its last 3:
 * both equal causal dense attention over the exact keys. */
static void test_dense_equivalence(void) {
  static problem_t p;
  setup(&p);
  float q[4][HQ][D], out[4][HQ][D];
  fill(&q[0][0][0], 4 * HQ * D, 1.0);
  int32_t qs[B + 1] = {0, 1, 4}, sel[B][1][20];
  tensor_t tq, tqs, tl, tt, tp, to, tsel;
  tset(&tq, q, F32, 3, 4, HQ, D, 0);
  tset(&tqs, qs, I32, 1, B + 1, 0, 0, 0);
  tset(&tl, p.len, I32, 1, B, 0, 0, 0);
  tset(&tt, p.table, I32, 2, B, 6, 0, 0);
  tset(&tp, p.pages, U8, 3, NB, BS, p.slot_bytes, 0);
  tset(&to, out, F32, 3, 4, HQ, D, 0);
  tset(&tsel, sel, I32, 3, B, 1, 20, 0);
  CHECK_OK(ATTEND(p.paged, &tq.t, &tqs.t, &tl.t, &tt.t, &tp.t, &to.t, &tsel.t));
  double err = 0.0, ref[D];
  int32_t kpos[40];
  for (int t = 0; t < 40; ++t) kpos[t] = t;
  for (int b = 0; b < B; ++b)
    for (int r = qs[b]; r < qs[b + 1]; ++r) {
      const int32_t qpos = p.len[b] - (qs[b + 1] - qs[b]) + (r - qs[b]);
      for (int h = 0; h < HQ; ++h) {
        attend_ref(q[r][h], qpos, &p.k[b][0][0], &p.v[b][0][0], kpos, p.len[b], HKV, h / (HQ / HKV),
                   D, p.inv_freq, D, 1.0f, 0, 1.0 / sqrt((double)D), NULL, ref);
        for (int i = 0; i < D; ++i) err = fmax(err, fabs(ref[i] - out[r][h][i]));
      }
    }
  CHECK(err < 1e-5, "paged dense equivalence error %g", err);
  /* The decode step selected every candidate (23 - 1 sink - 2 recent), the prefill none. */
  int chosen = 0, none = 1;
  for (int i = 0; i < 20; ++i) chosen += sel[0][0][i] >= 1 && sel[0][0][i] < 21;
  for (int i = 0; i < 20; ++i) none &= sel[1][0][i] == -1;
  CHECK(chosen == 20 && none, "selection: %d candidates in sequence 0, sequence 1 empty %d", chosen,
        none);
  teardown(&p);
}

static void test_bad_input(void) {
  static problem_t p;
  setup(&p);
  const size_t bytes = (size_t)(NB * BS * p.slot_bytes);
  uint8_t* before = malloc(bytes);
  memcpy(before, p.pages, bytes);
  float k[2][DK] = {{0}}, q[1][HQ][D] = {{{0}}}, out[1][HQ][D];
  int32_t slots[2] = {3, 3};
  tensor_t tk, ts, tp;
  tset(&tk, k, F32, 3, 2, HKV, D, 0);
  tset(&ts, slots, I32, 1, 2, 0, 0, 0);
  tset(&tp, p.pages, U8, 3, NB, BS, p.slot_bytes, 0);
  const sals_status_t INV = SALS_ERR_INVALID_ARGUMENT;
  CHECK_ERR(APPEND(NULL, &tk.t, &tk.t, &ts.t, &tp.t), INV, "paged: is NULL");
  CHECK_ERR(APPEND(p.paged, &tk.t, &tk.t, &ts.t, &tp.t), INV, "slot_mapping: slot 3 appears twice");
  slots[1] = NB * BS;
  CHECK_ERR(APPEND(p.paged, &tk.t, &tk.t, &ts.t, &tp.t), INV,
            "slot_mapping[1]: slot 48 beyond the pages' 48 slots");
  slots[1] = 5;
  k[1][3] = NAN;
  CHECK_ERR(APPEND(p.paged, &tk.t, &tk.t, &ts.t, &tp.t), SALS_ERR_NOT_FINITE,
            "k: holds NaN or infinity at row [1, 0]");
  k[1][3] = 0.0f;
  tensor_t tf;
  tset(&tf, p.pages, F32, 3, NB, BS, p.slot_bytes / 4, 0);
  CHECK_ERR(APPEND(p.paged, &tk.t, &tk.t, &ts.t, &tf.t), INV,
            "pages: dtype float32 not supported (uint8)");
  tset(&tf, p.pages, U8, 3, NB, BS, p.slot_bytes - 1, 0);
  CHECK_ERR(APPEND(p.paged, &tk.t, &tk.t, &ts.t, &tf.t), INV,
            "pages: dim 2 is 127, expected 128 (slot_bytes of the config)");
  /* Tensors claimed to be on a GPU, with settings made for the CPU: no CUDA backend
   * (unsupported), no usable GPU (a device error), or settings made for another device. */
  tensor_t tg[4] = {tk, tk, ts, tp};
  for (int i = 0; i < 4; ++i) {
    tg[i].t.shape = tg[i].shape;
    tg[i].t.strides = NULL;
    tg[i].t.device.device_type = kDLCUDA;
  }
  const sals_status_t st = APPEND(p.paged, &tg[0].t, &tg[1].t, &tg[2].t, &tg[3].t);
  CHECK((st == SALS_ERR_UNSUPPORTED || st == SALS_ERR_DEVICE ||
         (st == SALS_ERR_INVALID_ARGUMENT &&
          strstr(sals_last_error(), "the paged settings were made for cpu"))) &&
            strncmp(sals_last_error(), "k: on cuda", 10) == 0,
        "a CUDA k: %s \"%s\"", sals_status_string(st), sals_last_error());
  CHECK(memcmp(before, p.pages, bytes) == 0, "a refused append changed the pages");
  /* the deferred checks of CUDA calls: nothing to report for settings made for the CPU */
  CHECK_OK(sals_paged_check(p.paged, 1, NULL));
  CHECK_OK(sals_paged_check(p.paged, 0, NULL));
  CHECK_ERR(sals_paged_check(p.paged, 2, NULL), INV, "wait: 2 must be 0 or 1");
  CHECK_ERR(sals_paged_check(NULL, 1, NULL), INV, "paged: is NULL");

  int32_t qs[B + 1] = {0, 1, 1}, lens[B] = {23, 9}, table[B][6];
  memcpy(table, p.table, sizeof table);
  tensor_t tq, tqs, tl, tt, to;
  tset(&tq, q, F32, 3, 1, HQ, D, 0);
  tset(&tqs, qs, I32, 1, B + 1, 0, 0, 0);
  tset(&tl, lens, I32, 1, B, 0, 0, 0);
  tset(&tt, table, I32, 2, B, 6, 0, 0);
  tset(&to, out, F32, 3, 1, HQ, D, 0);
  CHECK_OK(ATTEND(p.paged, &tq.t, &tqs.t, &tl.t, &tt.t, &tp.t, &to.t, NULL));
  table[1][2] = NB;
  CHECK_ERR(ATTEND(p.paged, &tq.t, &tqs.t, &tl.t, &tt.t, &tp.t, &to.t, NULL), INV,
            "block_table[1, 2]: 12 not a block of pages (0..11)");
  table[1][2] = p.table[1][2];
  table[1][5] = -7; /* past sequence 1's 3 blocks: never read */
  CHECK_OK(ATTEND(p.paged, &tq.t, &tqs.t, &tl.t, &tt.t, &tp.t, &to.t, NULL));
  qs[2] = 0;
  CHECK_ERR(ATTEND(p.paged, &tq.t, &tqs.t, &tl.t, &tt.t, &tp.t, &to.t, NULL), INV,
            "query_start[2]: 0 not in 1..1");
  qs[2] = 1;
  lens[0] = 0;
  CHECK_ERR(ATTEND(p.paged, &tq.t, &tqs.t, &tl.t, &tt.t, &tp.t, &to.t, NULL), INV,
            "seq_lens[0]: 0 not in 1..24");
  lens[0] = 23;
  CHECK_ERR(ATTEND(p.paged, &tq.t, &tqs.t, &tl.t, &tt.t, &tp.t, &tq.t, NULL), INV,
            "out: overlaps q");
  int32_t sel[B][1][3];
  tensor_t tsel;
  tset(&tsel, sel, I32, 3, B, 1, 3, 0);
  CHECK_ERR(ATTEND(p.paged, &tq.t, &tqs.t, &tl.t, &tt.t, &tp.t, &to.t, &tsel.t), INV,
            "selected: dim 2 is 3, fewer than the 20 tokens");
  /* pages of empty blocks: sequences of no tokens, without queries */
  int32_t qs0[B + 1] = {0, 0, 0}, lens0[B] = {0, 0};
  tensor_t tqs0, tl0, tp0;
  tset(&tqs0, qs0, I32, 1, B + 1, 0, 0, 0);
  tset(&tl0, lens0, I32, 1, B, 0, 0, 0);
  tset(&tp0, p.pages, U8, 3, NB, 0, p.slot_bytes, 0);
  CHECK_OK(ATTEND(p.paged, &tq.t, &tqs0.t, &tl0.t, &tt.t, &tp0.t, &to.t, NULL));
  sals_paged_destroy(NULL);
  free(before);
  teardown(&p);
}

/*
 * A window store holding the sink and the recent tokens makes paged storage attend as the cache
 * does, which keeps those exact itself: rank 8 of Dk 16 and 4-bit values, a decode step over 23
 * tokens in shuffled blocks against sals_cache_attend; then bad window arguments.
 */
static void test_window_store_matches_the_cache(void) {
  enum { S = 23 };
  sals_config_t g = config16(SALS_DTYPE_FLOAT32, 4);
  g.rank = 8;
  g.score_rank = 8;
  g.budget_frac = 0.5f;
  g.max_batch = 1;
  g.max_tokens = 40;
  float inv_freq[D / 2], U[DK * 8] = {0}, k[S][DK], v[S][DK], q[HQ][D];
  make_inv_freq(inv_freq, D, 10000.0);
  for (int c = 0; c < 8; ++c) U[(2 * c + 1) * 8 + c] = 1.0f; /* orthonormal columns */
  fill(&k[0][0], S * DK, 1.0);
  fill(&v[0][0], S * DK, 1.0);
  fill(&q[0][0], HQ * D, 1.0);
  sals_rope_t rope = {inv_freq, D, 1.0f, 0};
  tensor_t tu;
  tset(&tu, U, F32, 2, DK, 8, 0, 0);

  sals_cache_t* cache = NULL;
  CHECK_OK(sals_cache_create(&g, &rope, &tu.t, &cache));
  int32_t pos[S];
  for (int t = 0; t < S; ++t) pos[t] = t;
  tensor_t ck, cv, cp, cq, cqp, co;
  float cache_out[HQ][D], paged_out[HQ][D];
  int32_t qpos = S - 1;
  tset(&ck, k, F32, 4, 1, S, HKV, D);
  tset(&cv, v, F32, 4, 1, S, HKV, D);
  tset(&cp, pos, I32, 2, 1, S, 0, 0);
  tset(&cq, q, F32, 4, 1, 1, HQ, D);
  tset(&cqp, &qpos, I32, 2, 1, 1, 0, 0);
  tset(&co, cache_out, F32, 4, 1, 1, HQ, D);
  CHECK_OK(sals_cache_append(cache, &ck.t, &cv.t, &cp.t, NULL));
  CHECK_OK(sals_cache_attend(cache, &cq.t, &cqp.t, &co.t, NULL));
  sals_cache_destroy(cache);

  sals_paged_t* paged = NULL;
  int64_t sb = 0;
  CHECK_OK(sals_paged_create(&g, &rope, &tu.t, &paged));
  CHECK_OK(sals_paged_slot_bytes(&g, &sb));
  uint8_t* pages = calloc((size_t)(NB * BS * sb), 1);
  float window[5][2][DK];
  /* Token 0 (the sink) to row 3, tokens 21 and 22 (the recent window) to rows 0 and 4. */
  int32_t table[6] = {9, 4, 0, 11, 6, 2}, slots[S], rows[S], wrows[1][3] = {{3, 0, 4}};
  for (int t = 0; t < S; ++t) {
    slots[t] = table[t / BS] * BS + t % BS;
    rows[t] = t == 0 ? 3 : (t == 21 ? 0 : (t == 22 ? 4 : -1));
  }
  tensor_t tk, tv, ts, tr, tp, tw;
  tset(&tk, k, F32, 3, S, HKV, D, 0);
  tset(&tv, v, F32, 3, S, HKV, D, 0);
  tset(&ts, slots, I32, 1, S, 0, 0, 0);
  tset(&tr, rows, I32, 1, S, 0, 0, 0);
  tset(&tp, pages, U8, 3, NB, BS, sb, 0);
  tset(&tw, window, F32, 4, 5, 2, HKV, D);
  CHECK_OK(sals_paged_append(paged, &tk.t, &tv.t, &ts.t, &tp.t, &tr.t, &tw.t, NULL));
  CHECK(memcmp(window[4][1], v[22], sizeof v[22]) == 0 &&
            memcmp(window[3][0], k[0], sizeof k[0]) == 0,
        "the window rows hold the exact key and value");
  int32_t qs[2] = {0, 1}, lens[1] = {S};
  tensor_t tq, tqs, tl, tt, twr, to;
  tset(&tq, q, F32, 3, 1, HQ, D, 0);
  tset(&tqs, qs, I32, 1, 2, 0, 0, 0);
  tset(&tl, lens, I32, 1, 1, 0, 0, 0);
  tset(&tt, table, I32, 2, 1, 6, 0, 0);
  tset(&twr, wrows, I32, 2, 1, 3, 0, 0);
  tset(&to, paged_out, F32, 3, 1, HQ, D, 0);
  CHECK_OK(sals_paged_attend(paged, &tq.t, &tqs.t, &tl.t, &tt.t, &tp.t, &twr.t, &tw.t, &to.t, NULL,
                             NULL));
  double err = 0.0;
  for (int h = 0; h < HQ; ++h)
    for (int i = 0; i < D; ++i) err = fmax(err, fabs(cache_out[h][i] - paged_out[h][i]));
  CHECK(err < 1e-5, "paged with a window store vs the cache: error %g", err);
  /* Without the store the same step attends rebuilt sinks and recent tokens: it differs. */
  CHECK_OK(ATTEND(paged, &tq.t, &tqs.t, &tl.t, &tt.t, &tp.t, &to.t, NULL));
  err = 0.0;
  for (int h = 0; h < HQ; ++h)
    for (int i = 0; i < D; ++i) err = fmax(err, fabs(cache_out[h][i] - paged_out[h][i]));
  CHECK(err > 1e-3, "rebuilt windows should differ from exact ones (error %g)", err);

  const sals_status_t INV = SALS_ERR_INVALID_ARGUMENT;
  CHECK_ERR(sals_paged_append(paged, &tk.t, &tv.t, &ts.t, &tp.t, &tr.t, NULL, NULL), INV,
            "window: is NULL but window_rows is given");
  CHECK_ERR(
      sals_paged_attend(paged, &tq.t, &tqs.t, &tl.t, &tt.t, &tp.t, NULL, &tw.t, &to.t, NULL, NULL),
      INV, "window_rows: is NULL but window is given");
  rows[5] = 3;
  CHECK_ERR(sals_paged_append(paged, &tk.t, &tv.t, &ts.t, &tp.t, &tr.t, &tw.t, NULL), INV,
            "window_rows: row 3 appears twice");
  rows[5] = 5;
  CHECK_ERR(sals_paged_append(paged, &tk.t, &tv.t, &ts.t, &tp.t, &tr.t, &tw.t, NULL), INV,
            "window_rows[5]: row 5 beyond the window's 5 rows");
  rows[5] = -1;
  wrows[0][1] = 7;
  CHECK_ERR(sals_paged_attend(paged, &tq.t, &tqs.t, &tl.t, &tt.t, &tp.t, &twr.t, &tw.t, &to.t, NULL,
                              NULL),
            INV, "window_rows[0, 1]: 7 not a row of window (-1..4)");
  tensor_t tw3;
  tset(&tw3, window, F32, 4, 5, 2, HKV + 1, D);
  CHECK_ERR(sals_paged_append(paged, &tk.t, &tv.t, &ts.t, &tp.t, &tr.t, &tw3.t, NULL), INV,
            "window: dim 2 is 3, expected 2 (n_head_kv)");
  free(pages);
  sals_paged_destroy(paged);
}

int main(void) {
  test_slot_bytes();
  test_dense_equivalence();
  test_bad_input();
  test_window_store_matches_the_cache();
  return finish();
}
