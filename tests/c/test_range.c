/*
 * The *_range functions: a cache filled sequence by sequence (in any order, in chunks of
 * tokens) or in groups of sequences holds, byte for byte, the state of one filled with the
 * whole batch at once, and attends identically; a range attend equals the whole-batch one up to
 * rounding and keeps the other sequences' selections; reservations are per sequence; a range
 * reset empties its sequences only, ready for new ones; a bad `first` is refused, naming it,
 * with nothing changed.
 *
 * The state is compared through the library's internal struct (csrc/internal.h): the public
 * API exposes lengths and selections, not the stored bytes this test is about.
 */
#include "internal.h"
#include "util.h"

enum { B = 4, HQ = 8, HKV = 2, D = 16, DK = HKV * D, R = 16, T = 50, MAXT = T + 2 };
/* `first` of the helpers below meaning the plain call (sals_cache_append / attend) */
enum { PLAIN = -100 };

/* Real tokens per sequence (one shorter than the sinks, one shorter than the recent window)
 * and the padding before them in the [B, T] buffers: left-padded like HF batches (sequence 1)
 * or right-padded (the others). */
static const int lens[B] = {37, 3, 50, 6};
static const int pad_left[B] = {0, T - 3, 0, 0};

static float U[DK * R], k[B * T * DK], v[B * T * DK], kd[B * DK], vd[B * DK];
static float q[B * HQ * D], q3[B * 3 * HQ * D];
static int32_t pos[B * T], dpos[B], qpos3[B * 3];

typedef struct {
  const char* label;
  sals_dtype_t dtype;
  int value_bits, key_bits, per_head, dense, budget_tokens, rank, n_threads;
} variant_t;

static sals_cache_t* make(const variant_t* x) {
  sals_config_t c = sals_config_default();
  c.n_head_q = HQ;
  c.n_head_kv = HKV;
  c.head_dim = D;
  c.rank = x->rank;
  c.score_rank = x->rank / 2;
  c.value_bits = x->value_bits;
  c.value_group = 16;
  c.key_bits = x->key_bits;
  c.key_group = 8;
  c.n_sink = 4;
  c.n_recent = 8;
  c.budget_frac = 0.25f;
  c.budget_tokens = x->budget_tokens;
  c.select_per_head = x->per_head;
  c.dense = x->dense;
  c.max_batch = B;
  c.max_tokens = MAXT;
  c.dtype = x->dtype;
  c.n_threads = x->n_threads;
  static float inv_freq[D / 2];
  make_inv_freq(inv_freq, D, 10000.0);
  sals_rope_t rope = {inv_freq, D, 1.0f, 0};
  tensor_t tu;
  tset(&tu, U, F32, 2, DK, R, 0, 0);
  tu.t.shape[1] = x->rank; /* the leading columns of U: still orthonormal */
  tstride(&tu, R, 1, 0, 0);
  sals_cache_t* cache = NULL;
  CHECK_OK(sals_cache_create(&c, &rope, &tu.t, &cache));
  return cache;
}

/* Tokens i0..i0+n-1 of sequences b0..b0+nb-1, columns from col0 of the [B, T] buffers. */
static sals_status_t append_cols(sals_cache_t* c, int64_t first, int b0, int nb, int col0, int n) {
  tensor_t tk, tv, tp;
  tset(&tk, k + ((size_t)b0 * T + col0) * DK, F32, 4, nb, n, HKV, D);
  tstride(&tk, T * DK, DK, D, 1);
  tset(&tv, v + ((size_t)b0 * T + col0) * DK, F32, 4, nb, n, HKV, D);
  tstride(&tv, T * DK, DK, D, 1);
  tset(&tp, pos + b0 * T + col0, I32, 2, nb, n, 0, 0);
  tstride(&tp, T, 1, 0, 0);
  return first == PLAIN ? sals_cache_append(c, &tk.t, &tv.t, &tp.t, NULL)
                        : sals_cache_append_range(c, first, &tk.t, &tv.t, &tp.t, NULL);
}

/* The decode token of sequences b0..b0+nb-1. */
static sals_status_t append_decode(sals_cache_t* c, int64_t first, int b0, int nb) {
  tensor_t tk, tv, tp;
  tset(&tk, kd + (size_t)b0 * DK, F32, 4, nb, 1, HKV, D);
  tset(&tv, vd + (size_t)b0 * DK, F32, 4, nb, 1, HKV, D);
  tset(&tp, dpos + b0, I32, 2, nb, 1, 0, 0);
  return first == PLAIN ? sals_cache_append(c, &tk.t, &tv.t, &tp.t, NULL)
                        : sals_cache_append_range(c, first, &tk.t, &tv.t, &tp.t, NULL);
}

/* Queries of sequences b0..b0+nb-1 (T = 1 at the decode position, or the 3 of q3) into out. */
static sals_status_t attend(sals_cache_t* c, int64_t first, int b0, int nb, int three, float* out) {
  const int tq = three ? 3 : 1;
  tensor_t tq_, tp, to;
  tset(&tq_, (three ? q3 : q) + (size_t)b0 * tq * HQ * D, F32, 4, nb, tq, HQ, D);
  tset(&tp, (three ? qpos3 : dpos) + b0 * tq, I32, 2, nb, tq, 0, 0);
  tset(&to, out + (size_t)b0 * tq * HQ * D, F32, 4, nb, tq, HQ, D);
  return first == PLAIN ? sals_cache_attend(c, &tq_.t, &tp.t, &to.t, NULL)
                        : sals_cache_attend_range(c, first, &tq_.t, &tp.t, &to.t, NULL);
}

/*
 * Whether a and b hold the same bytes for sequences b0..b0+nb-1: in every buffer with
 * `held_only` = 0, else only where the sequence's tokens are (slots below its length, its
 * sinks, the ring entries of its last n_recent slots), which is all that a sequence admitted
 * into a reset slot overwrites.
 */
static int same_state(const sals_cache_t* a, const sals_cache_t* b, int b0, int nb, int held_only) {
  const sals_config_t* g = &a->cfg;
  const int64_t e = g->dtype == SALS_DTYPE_FLOAT32 ? 4 : 2, S = g->max_tokens;
  const int64_t kg = g->key_bits < 16 ? g->key_group : 0;
  const int64_t ks = kg ? g->score_rank / kg * 2 : 0,
                kr = kg ? (g->rank - g->score_rank) / kg * 2 : 0;
  enum { TOKEN, SINK, RING, LEN };
  struct {
    const void *x, *y;
    int kind;
    int64_t row; /* bytes per token slot, sink or ring entry */
  } parts[] = {
      {a->lat_score, b->lat_score, TOKEN, a->lat_score_bytes},
      {a->lat_rest, b->lat_rest, TOKEN, a->lat_rest_bytes},
      {a->lat_score_scale, b->lat_score_scale, TOKEN, ks},
      {a->lat_score_zero, b->lat_score_zero, TOKEN, ks},
      {a->lat_rest_scale, b->lat_rest_scale, TOKEN, kr},
      {a->lat_rest_zero, b->lat_rest_zero, TOKEN, kr},
      {a->val, b->val, TOKEN, a->val_row_bytes},
      {a->val_scale, b->val_scale, TOKEN, a->n_groups * 2},
      {a->val_zero, b->val_zero, TOKEN, a->n_groups * 2},
      {a->pos, b->pos, TOKEN, 4},
      {a->sink_k, b->sink_k, SINK, a->dk * e},
      {a->sink_v, b->sink_v, SINK, a->dk * e},
      {a->recent_k, b->recent_k, RING, a->dk * e},
      {a->recent_v, b->recent_v, RING, a->dk * e},
      {a->len, b->len, LEN, 4},
  };
  for (int s = b0; s < b0 + nb; ++s) {
    const int64_t len = a->len[s];
    for (size_t i = 0; i < sizeof parts / sizeof parts[0]; ++i) {
      if (parts[i].x == NULL || parts[i].row == 0) continue;
      const int kind = parts[i].kind;
      const int64_t rows = kind == TOKEN  ? S
                           : kind == SINK ? g->n_sink
                           : kind == RING ? g->n_recent
                                          : 1;
      for (int64_t r = 0; r < rows; ++r) {
        /* slots and sinks below the length are held; so is ring entry r then, as it holds
         * the slot congruent to r among the last n_recent */
        if (held_only && kind != LEN && r >= len) continue;
        const int64_t off = (s * rows + r) * parts[i].row;
        if (memcmp((const char*)parts[i].x + off, (const char*)parts[i].y + off,
                   (size_t)parts[i].row) != 0) {
          fprintf(stderr, "  sequence %d: state part %d differs at row %lld\n", s, (int)i,
                  (long long)r);
          return 0;
        }
      }
    }
  }
  return 1;
}

/* Selections of every sequence: counts, and each row as a sorted set. */
static void selection(sals_cache_t* c, int32_t* idx, int32_t* cnt) {
  tensor_t ti, tc;
  tset(&ti, idx, I32, 3, B, HKV, MAXT, 0);
  tset(&tc, cnt, I32, 1, B, 0, 0, 0);
  ti.t.shape[1] = c->n_sel_heads;
  memset(idx, 0, sizeof(int32_t) * B * HKV * MAXT); /* rows past n_sel_heads compare equal */
  CHECK_OK(sals_cache_selected(c, &ti.t, &tc.t, NULL));
  for (int r = 0; r < B * c->n_sel_heads; ++r) { /* insertion sort: rows are short */
    int32_t* row = idx + (size_t)r * MAXT;
    for (int i = 1; i < MAXT; ++i)
      for (int j = i; j > 0 && (uint32_t)row[j - 1] > (uint32_t)row[j]; --j) {
        const int32_t t = row[j];
        row[j] = row[j - 1];
        row[j - 1] = t;
      }
  }
}

static void test_fill_orders(const variant_t* x) {
  sals_cache_t* whole = make(x);    /* the batch at once */
  sals_cache_t* single = make(x);   /* sequence by sequence, in chunks of tokens */
  sals_cache_t* pairs = make(x);    /* two groups of two sequences, the second group first */
  if (!whole || !single || !pairs) return;
  CHECK_OK(append_cols(whole, PLAIN, 0, B, 0, T));
  static const int order[B] = {2, 0, 3, 1}, chunks[3] = {7, 1, 13};
  for (int i = 0; i < B; ++i) {
    const int b = order[i];
    for (int done = 0, c = 0; done < lens[b]; ++c) {
      const int n = chunks[c % 3] < lens[b] - done ? chunks[c % 3] : lens[b] - done;
      CHECK_OK(append_cols(single, b, b, 1, pad_left[b] + done, n));
      done += n;
    }
    /* each sequence reserved its own tokens, and only those */
    CHECK(single->reserved[b] == lens[b], "%s: sequence %d reserved %d for %d tokens", x->label, b,
          single->reserved[b], lens[b]);
  }
  CHECK_OK(append_cols(pairs, 2, 2, 2, 0, T));
  CHECK_OK(append_cols(pairs, 0, 0, 2, 0, T));
  CHECK(same_state(whole, single, 0, B, 0), "%s: sequence by sequence differs from the batch",
        x->label);
  CHECK(same_state(whole, pairs, 0, B, 0), "%s: groups differ from the batch", x->label);

  /* the decode token: the batch, one sequence at a time (backwards), the batch */
  CHECK_OK(append_decode(whole, PLAIN, 0, B));
  for (int b = B - 1; b >= 0; --b) CHECK_OK(append_decode(single, b, b, 1));
  CHECK_OK(append_decode(pairs, 0, 0, B));
  CHECK(same_state(whole, single, 0, B, 0), "%s: decode token differs", x->label);
  CHECK(same_state(whole, pairs, 0, B, 0), "%s: decode token differs (groups)", x->label);

  /* the same state attends identically; per-sequence range attends agree up to rounding */
  static float out_w[B * 3 * HQ * D], out_s[B * 3 * HQ * D], out_r[B * 3 * HQ * D];
  static int32_t idx_w[B * HKV * MAXT], idx_r[B * HKV * MAXT], cnt_w[B], cnt_r[B];
  CHECK_OK(attend(whole, PLAIN, 0, B, 0, out_w));
  CHECK_OK(attend(single, PLAIN, 0, B, 0, out_s));
  CHECK(memcmp(out_w, out_s, sizeof(float) * B * HQ * D) == 0, "%s: attend differs", x->label);
  selection(whole, idx_w, cnt_w);
  for (int b = 0; b < B; ++b) CHECK_OK(attend(pairs, b, b, 1, 0, out_r));
  double err_decode = 0.0;
  for (int i = 0; i < B * HQ * D; ++i)
    err_decode = fmax(err_decode, fabs((double)out_r[i] - out_w[i]));
  CHECK(err_decode < 1e-5, "%s: range attend differs by %g", x->label, err_decode);
  selection(pairs, idx_r, cnt_r);
  CHECK(memcmp(cnt_w, cnt_r, sizeof cnt_w) == 0 && memcmp(idx_w, idx_r, sizeof idx_w) == 0,
        "%s: range attends selected other tokens", x->label);
  if (!x->dense) CHECK(cnt_w[0] > 0 && cnt_w[2] > 0, "%s: nothing selected", x->label);

  /* a multi-token range attend of sequence 2 clears its selection and no other */
  CHECK_OK(attend(whole, PLAIN, 0, B, 1, out_w));
  CHECK_OK(attend(pairs, 2, 2, 1, 1, out_r));
  double err_multi = 0.0;
  for (int i = 0; i < 3 * HQ * D; ++i)
    err_multi =
        fmax(err_multi, fabs((double)out_r[2 * 3 * HQ * D + i] - out_w[2 * 3 * HQ * D + i]));
  CHECK(err_multi < 1e-5, "%s: multi-token range attend differs by %g", x->label, err_multi);
  selection(pairs, idx_r, cnt_r);
  for (int b = 0; b < B; ++b)
    CHECK(cnt_r[b] == (b == 2 ? 0 : cnt_w[b]), "%s: sequence %d count %d", x->label, b, cnt_r[b]);
  sals_cache_destroy(whole);
  sals_cache_destroy(single);
  sals_cache_destroy(pairs);
  printf("  %-46s range attend err: decode %.2e, multi-token %.2e\n", x->label, err_decode,
         err_multi);
}

/* A bad first, or a range past max_batch: refused naming it, nothing changed. */
static void test_bad_first(void) {
  const variant_t x = {"bad first", SALS_DTYPE_FLOAT16, 4, 16, 0, 0, 0, R, 1};
  sals_cache_t* c = make(&x);
  sals_cache_t* ref = make(&x);
  if (!c || !ref) return;
  CHECK_OK(append_cols(c, PLAIN, 0, B, 0, T));
  CHECK_OK(append_cols(ref, PLAIN, 0, B, 0, T));
  static float out[B * 3 * HQ * D];
  tensor_t tk, tv, tp; /* one token of sequence 0 */
  tset(&tk, k, F32, 4, 1, 1, HKV, D);
  tset(&tv, v, F32, 4, 1, 1, HKV, D);
  tset(&tp, pos, I32, 2, 1, 1, 0, 0);
  CHECK_ERR(sals_cache_append_range(c, -1, &tk.t, &tv.t, &tp.t, NULL), SALS_ERR_INVALID_ARGUMENT,
            "first: -1 must be >= 0");
  CHECK_ERR(sals_cache_append_range(c, B, &tk.t, &tv.t, &tp.t, NULL), SALS_ERR_CAPACITY,
            "first: 4 + batch 1 of k > max_batch 4");
  CHECK_ERR(append_cols(c, 3, 0, 2, 0, 1), SALS_ERR_CAPACITY,
            "first: 3 + batch 2 of k > max_batch 4");
  CHECK_ERR(sals_cache_append_range(NULL, 0, &tk.t, &tv.t, &tp.t, NULL), SALS_ERR_INVALID_ARGUMENT,
            "cache: is NULL");
  CHECK_ERR(attend(c, -2, 0, 1, 0, out), SALS_ERR_INVALID_ARGUMENT, "first: -2 must be >= 0");
  CHECK_ERR(attend(c, 2, 0, 3, 0, out), SALS_ERR_CAPACITY, "first: 2 + batch 3 of q > max_batch 4");
  CHECK_ERR(attend(c, 5, 0, 0, 0, out), SALS_ERR_CAPACITY, "first: 5 + batch 0 of q > max_batch 4");
  CHECK_ERR(sals_cache_reset_range(c, -1, 1, NULL), SALS_ERR_INVALID_ARGUMENT,
            "first: -1 must be >= 0");
  CHECK_ERR(sals_cache_reset_range(c, 1, -1, NULL), SALS_ERR_INVALID_ARGUMENT,
            "batch: -1 must be >= 0");
  CHECK_ERR(sals_cache_reset_range(c, 2, 3, NULL), SALS_ERR_CAPACITY,
            "first: 2 + batch 3 > max_batch 4");
  CHECK_ERR(sals_cache_reset_range(c, 0, 5, NULL), SALS_ERR_CAPACITY, "batch: 5 > max_batch 4");
  CHECK_ERR(sals_cache_reset_range(NULL, 0, 1, NULL), SALS_ERR_INVALID_ARGUMENT, "cache: is NULL");
  CHECK(same_state(c, ref, 0, B, 0), "a refused call changed the state");
  for (int b = 0; b < B; ++b)
    CHECK(c->reserved[b] == ref->reserved[b], "a refused call reserved %d for sequence %d",
          c->reserved[b] - ref->reserved[b], b);
  /* an empty range is valid anywhere up to max_batch, and changes nothing */
  CHECK_OK(sals_cache_reset_range(c, B, 0, NULL));
  CHECK_OK(attend(c, B, 0, 0, 0, out));
  CHECK(same_state(c, ref, 0, B, 0), "an empty range changed the state");
  sals_cache_destroy(c);
  sals_cache_destroy(ref);
}

/* Reservations are per sequence: a full sequence refuses more, naming itself, while the others
 * take theirs; a range reset empties its sequences only, and a sequence admitted into a reset
 * slot holds what it would in a fresh cache. */
static void test_reserve_and_reset(void) {
  const variant_t x = {"reset", SALS_DTYPE_FLOAT16, 4, 16, 0, 0, 0, R, 1};
  sals_cache_t* c = make(&x);
  sals_cache_t* fresh = make(&x);
  if (!c || !fresh) return;
  for (int b = 0; b < B; ++b) CHECK_OK(append_cols(c, b, b, 1, 0, T));
  CHECK_OK(append_cols(c, 2, 2, 1, 0, MAXT - T));
  CHECK_ERR(append_cols(c, 1, 1, 2, 0, 1), SALS_ERR_CAPACITY,
            "1 more tokens for sequence 2 would reserve 53 > max_tokens 52");
  CHECK_OK(append_cols(c, 3, 3, 1, 0, MAXT - T)); /* sequence 3 still has room */
  CHECK_ERR(append_cols(c, PLAIN, 0, B, 0, 1), SALS_ERR_CAPACITY, "for sequence 2");
  static float out[B * 3 * HQ * D];
  static int32_t idx[B * HKV * MAXT], cnt[B];
  CHECK_OK(attend(c, PLAIN, 0, B, 0, out));
  selection(c, idx, cnt);
  const int32_t cnt0 = cnt[0], cnt3 = cnt[3]; /* sequence 3 is too short to have candidates */
  CHECK(cnt0 > 0 && cnt[2] > 0, "nothing selected");

  CHECK_OK(sals_cache_reset_range(c, 1, 2, NULL));
  int32_t len[B];
  tensor_t tl;
  tset(&tl, len, I32, 1, B, 0, 0, 0);
  CHECK_OK(sals_cache_lengths(c, &tl.t, NULL));
  CHECK(len[0] == lens[0] && len[1] == 0 && len[2] == 0 && len[3] == lens[3] + MAXT - T,
        "lengths after reset_range: %d %d %d %d", len[0], len[1], len[2], len[3]);
  CHECK(c->reserved[0] == T && c->reserved[1] == 0 && c->reserved[2] == 0 && c->reserved[3] == MAXT,
        "reservations after reset_range: %d %d %d %d", c->reserved[0], c->reserved[1],
        c->reserved[2], c->reserved[3]);
  selection(c, idx, cnt);
  CHECK(cnt[0] == cnt0 && cnt[1] == 0 && cnt[2] == 0 && cnt[3] == cnt3,
        "counts after reset_range: %d %d %d %d", cnt[0], cnt[1], cnt[2], cnt[3]);
  /* admit sequence 0's prompt into slot 2: the slot holds what slot 2 of a fresh cache does */
  CHECK_OK(append_cols(c, 2, 0, 1, 0, T));
  CHECK_OK(append_cols(fresh, 2, 0, 1, 0, T));
  CHECK(same_state(c, fresh, 2, 1, 1), "a sequence admitted into a reset slot differs");
  sals_cache_destroy(c);
  sals_cache_destroy(fresh);
}

int main(void) {
  /* U: orthonormal columns by Gram-Schmidt; its leading columns serve smaller ranks. */
  {
    double col[R][DK];
    for (int j = 0; j < R; ++j) {
      for (int i = 0; i < DK; ++i) col[j][i] = urand();
      for (int pass = 0; pass < 2; ++pass)
        for (int p = 0; p < j; ++p) {
          double dot = 0;
          for (int i = 0; i < DK; ++i) dot += col[p][i] * col[j][i];
          for (int i = 0; i < DK; ++i) col[j][i] -= dot * col[p][i];
        }
      double n = 0;
      for (int i = 0; i < DK; ++i) n += col[j][i] * col[j][i];
      for (int i = 0; i < DK; ++i) col[j][i] /= sqrt(n);
      for (int i = 0; i < DK; ++i) U[i * R + j] = (float)col[j][i];
    }
  }
  fill(k, B * T * DK, 1.0);
  fill(v, B * T * DK, 1.0);
  fill(kd, B * DK, 1.0);
  fill(vd, B * DK, 1.0);
  fill(q, B * HQ * D, 1.0);
  fill(q3, B * 3 * HQ * D, 1.0);
  for (int b = 0; b < B; ++b) {
    for (int t = 0; t < T; ++t) {
      const int i = t - pad_left[b];
      pos[b * T + t] = i >= 0 && i < lens[b] ? i : -1;
    }
    dpos[b] = lens[b];
    for (int t = 0; t < 3; ++t)
      qpos3[b * 3 + t] = lens[b] - 2 + t; /* the last two and the decode */
  }
  static const variant_t variants[] = {
      {"float16, 4-bit values, shared selection", SALS_DTYPE_FLOAT16, 4, 16, 0, 0, 0, R / 2, 3},
      {"bfloat16, 2-bit values, 4-bit keys, per head", SALS_DTYPE_BFLOAT16, 2, 4, 1, 0, 5, R, 1},
      {"float32, 16-bit values, dense", SALS_DTYPE_FLOAT32, 16, 16, 0, 1, 0, R, 2},
  };
  for (size_t i = 0; i < sizeof variants / sizeof variants[0]; ++i) test_fill_orders(&variants[i]);
  test_bad_first();
  test_reserve_and_reset();
  return finish();
}
