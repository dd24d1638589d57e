/*
 * Attention over the cache.
 *
 * Sparse decode step (T == 1, 16-bit storage, head_dim 64/128/256, G <= 8), all on the device:
 *   fold    scoring queries q~ = U[:, :r*]^T (GQA-summed pre-RoPE query): split-K
 *           partials over many blocks (gemm.cuh skinny) and a fixed-order sum
 *   score   s_j = q~ . k~_j[:r*] over the candidates                            (score.cu)
 *   topk    radix select of the budget per sequence (or per KV head)            (select.cu)
 *   rebuild per (split, KV head, sequence): gather 128 listed tokens' latent rows, rebuild their
 *           keys on tensor cores (k = U_h k~, never written to memory), add the exact keys of
 *           sink/recent tokens, RoPE in registers, write the logits of the G query heads
 *   pv      per (split, KV head, sequence): online softmax over the logits, dequantise values
 *           and accumulate P.V for the G query heads; one partial per warp; the last block of
 *           each (sequence, KV head) merges the partials into the output rows.
 * Rebuild is tensor-core work and P.V streams values: as two kernels each runs at its own
 * occupancy, and the value gathers no longer stall the rebuild pipeline.
 * Dense decode (config.dense, T == 1) runs the same kernels over every token.
 * Quantised latent keys (key_bits < 16) are dequantised where they are read: in the scoring
 * loop (score.cu), in the rebuild's staging (registers, then shared memory) and in the general
 * kernel; those are separate instantiations, the 16-bit kernels are unchanged.
 * Everything else (T > 1, float32 storage, other head dims) runs the general kernel below,
 * which rebuilds keys tile by tile in shared memory on CUDA cores: simpler, exact, slower.
 * No host synchronisation and no allocation unless check_finite is set.
 *
 * Paged storage (paged.cu) runs the same kernels, instantiated with PG = true: a token's fields
 * are read from its slot through the block table, its exact copy (if any) from the caller's
 * window store, and the sequences of a call come from the plan kernel's arrays (AttnArgs).
 */
#include <math.h>

#include <type_traits>

#include "common.cuh"
#include "gemm.cuh"

namespace sals_cuda {
sals_status_t ensure_uh(sals_cache_t* c, cudaStream_t st);
sals_status_t cache_check_finite(sals_cache_t* c, const sals_view_t* x, int which, cudaStream_t st);
sals_status_t cache_report_finite(sals_cache_t* c);

namespace {

constexpr float kLog2e = 1.4426950408889634f;

/* ---- list of attended tokens of sequence b (shared by both attention kernels) ----------- */
struct TokList {
  int32_t S, n_sink_s, n_exact, total;
};
__device__ __forceinline__ TokList tok_list(int32_t S, int32_t n_sink, int32_t n_recent,
                                            int32_t n_sel) {
  TokList L;
  L.S = S;
  L.n_sink_s = S < n_sink ? S : n_sink;
  int32_t rest = S - L.n_sink_s;
  int32_t n_rec = rest < n_recent ? rest : n_recent;
  L.n_exact = L.n_sink_s + n_rec;
  L.total = L.n_exact + n_sel;
  return L;
}
/* slot of list entry i; kind: 1 sink (exact), 2 recent ring (exact), 0 rebuilt. */
__device__ __forceinline__ int32_t tok_slot(const TokList& L, int32_t i, const int32_t* sel,
                                            int32_t n_sink, int32_t* kind) {
  if (i < L.n_sink_s) {
    *kind = 1;
    return i;
  }
  if (i < L.n_exact) {
    *kind = 2;
    return L.S - (L.n_exact - i);
  }
  *kind = 0;
  return sel ? sel[i - L.n_exact] : n_sink + (i - L.n_exact);
}

/* List entry i of sequence b: token t, read from `src` as `kind` says: 1 a sink and 2 a recent
 * token in the cache's exact arrays (src = t), 3 a row src of paged storage's window store, 0
 * rebuilt from the token's latent row (src = t). Paged sinks and recent tokens without a copy
 * (window_rows -1, out of range, or no store) are rebuilt. */
struct Tok {
  int32_t t, kind, src;
};
template <bool PG>
__device__ __forceinline__ Tok tok_entry(const AttnArgs& a, int32_t b, const TokList& L, int32_t i,
                                         const int32_t* sel) {
  int32_t kind;
  const int32_t t = tok_slot(L, i, sel, a.n_sink, &kind);
  if constexpr (PG) {
    int32_t row = -1;
    if (kind != 0 && a.wrows)
      row = a.wrows[(int64_t)b * a.wrows_s0 + (kind == 1 ? t : a.n_sink + a.n_recent - L.S + t)];
    return row >= 0 && row < a.w_rows ? Tok{t, 3, row} : Tok{t, 0, t};
  }
  return Tok{t, kind, t};
}

/* The position of token t of sequence b: paged storage's tokens are at their index. */
template <bool PG>
__device__ __forceinline__ int32_t tok_pos(const AttnArgs& a, int32_t b, int32_t t) {
  if constexpr (PG) return t;
  return a.pos[(int64_t)b * a.max_tokens + t];
}

/* Where token t of sequence b keeps its value: codes or 16-bit elements, and the float16 scales
 * and zeros of its groups (value_bits < 16). */
template <bool PG>
__device__ __forceinline__ void value_row(const AttnArgs& a, int32_t b, int32_t t,
                                          const uint8_t** codes, const uint16_t** sc,
                                          const uint16_t** zr) {
  if constexpr (PG) {
    const uint8_t* p = a.pg.slot(b, t);
    *codes = p + a.pg.lay.val;
    *sc = (const uint16_t*)(p + a.pg.lay.val_scale);
    *zr = (const uint16_t*)(p + a.pg.lay.val_zero);
  } else {
    const int64_t row = (int64_t)b * a.max_tokens + t;
    *codes = (const uint8_t*)a.val + row * a.val_row_bytes;
    *sc = a.val_scale + row * a.n_groups;
    *zr = a.val_zero + row * a.n_groups;
  }
}

/* N consecutive 16-bit elements as floats, one vector load (p is N-element aligned). */
template <typename T, int N>
__device__ __forceinline__ void load_n(const T* p, float* dst) {
  if constexpr (N == 1) {
    dst[0] = to_f<T>(p[0]);
  } else {
    using V =
        typename std::conditional<N == 2, uint32_t,
                                  typename std::conditional<N == 4, uint2, uint4>::type>::type;
    const V u = *reinterpret_cast<const V*>(p);
    const T* h = reinterpret_cast<const T*>(&u);
#pragma unroll
    for (int e = 0; e < N; ++e) dst[e] = to_f<T>(h[e]);
  }
}

/* Value of entry `src` (kind and src as tok_entry gives them) at dims [e0, e0 + N) of KV head h,
 * as floats; e0 is a multiple of N. */
template <typename T, int N, bool PG>
__device__ __forceinline__ void load_value(const AttnArgs& a, int32_t b, int32_t h, int32_t D,
                                           int32_t src, int32_t kind, int32_t e0, float* dst) {
  const int64_t col = (int64_t)h * D + e0;
  if constexpr (PG) {
    if (kind == 3) { /* the window store row: key, then value */
      const int64_t o = (int64_t)src * a.w_s0 + a.w_s1 + (int64_t)h * a.w_s2 + e0;
#pragma unroll
      for (int e = 0; e < N; ++e) dst[e] = load_elem(a.window, a.w_elem, o + e);
      return;
    }
  } else if (kind == 1 || kind == 2) {
    const T* p = kind == 1
                     ? (const T*)a.sink_v + ((int64_t)b * a.n_sink + src) * a.dk
                     : (const T*)a.recent_v + ((int64_t)b * a.n_recent + src % a.n_recent) * a.dk;
    load_n<T, N>(p + col, dst);
    return;
  }
  const uint8_t* codes;
  const uint16_t *sc, *zr;
  value_row<PG>(a, b, src, &codes, &sc, &zr);
  if (a.bits == 16) {
    load_n<T, N>((const T*)codes + col, dst);
    return;
  }
  decode_codes<N>(codes, sc, zr, col, a.bits, a.group, dst);
}

/* Latent coordinates [c, c + N) of a token with quantised keys, as floats: c is a multiple of N
 * and [c, c + N) lies in one part (score or rest). `row`: the cache's row b * max_tokens + t, or
 * paged storage's slot offset from the pages (PagedSlots::offset). */
template <int N, bool PG>
__device__ __forceinline__ void load_latent_q(const AttnArgs& a, int64_t row, int32_t c,
                                              float* dst) {
  const bool score = c < a.rs;
  if constexpr (PG) {
    const uint8_t* p = a.pg.pages + row;
    const int part = score ? 0 : 1;
    decode_codes<N>(p + a.pg.lay.lat[part], (const uint16_t*)(p + a.pg.lay.lat_scale[part]),
                    (const uint16_t*)(p + a.pg.lay.lat_zero[part]), score ? c : c - a.rs,
                    a.key_bits, a.key_group, dst);
    return;
  }
  const int64_t bytes = score ? a.lat_score_bytes : a.lat_rest_bytes;
  const int64_t ng = (score ? a.rs : a.rank - a.rs) / a.key_group;
  decode_codes<N>((const uint8_t*)(score ? a.lat_score : a.lat_rest) + row * bytes,
                  (score ? a.lat_score_scale : a.lat_rest_scale) + row * ng,
                  (score ? a.lat_score_zero : a.lat_rest_zero) + row * ng, score ? c : c - a.rs,
                  a.key_bits, a.key_group, dst);
}

/* ---- scoring query ------------------------------------------------------------------------ */
/* Row b, input coordinate k of selection head hs: the GQA-summed pre-RoPE query at Dk row
 * row0 + k, with row0 = 0 (shared selection: all heads) or hs * D (per KV head), heads added in
 * order g = 0, 1, ... Typed loads; GM > 0 folds up to GM heads as GM predicated loads with no
 * loop, so that the skinny kernel's staging has all its loads in flight (gemm.cuh); GM = 0
 * loops over any number of heads. The host picks the smallest GM that covers G: the staging
 * inlines the loader 16 times, and a loader carrying every path overflowed the instruction
 * cache (half the kernel's stall samples). RM: sequence b's query is row row_of[b] of q (paged
 * storage; a valid row for every b), else row b.
 * The loads cover every element of q, so with `flag` (check_finite) a non-finite sum raises it:
 * a NaN or infinity in any folded element makes the sum NaN or infinite, and finite 16-bit or
 * float32 inputs cannot overflow a float32 sum of at most a few hundred heads. */
template <typename E, int GM, bool RM> struct QFoldLoad {
  DView q;
  const int32_t* row_of;
  int32_t G, D, per_head;
  int* flag;
  __device__ float operator()(int64_t b, int64_t k, int32_t hs) const {
    const int32_t row = (per_head ? hs * D : 0) + (int32_t)k;
    const int32_t kvh = row / D, e = row % D;
    int64_t qb = b;
    if constexpr (RM) qb = __ldg(row_of + b);
    const int64_t o = off4(q, qb, 0, (int64_t)kvh * G, e);
    float s = 0.f;
    if constexpr (GM == 0) {
      for (int32_t g = 0; g < G; ++g) s += load_as<E>(q.data, o + g * q.stride[2]);
    } else {
      float x[GM];
#pragma unroll
      for (int g = 0; g < GM; ++g) x[g] = g < G ? load_as<E>(q.data, o + g * q.stride[2]) : 0.f;
#pragma unroll
      for (int g = 0; g < GM; ++g)
        if (g < G) s += x[g];
    }
    if (flag && !isfinite(s)) *flag = 1;
    return s;
  }
};
template <typename E> struct ElemType {
  typedef E type;
};
/* Row r = b * H + hs of the scoring queries (skinny epilogue). */
struct QLatStore {
  float* qlat;
  int32_t R;
  __device__ void operator()(int64_t r, int64_t n, float x) const { qlat[r * R + n] = x; }
};

/* ---- sparse decode, part 1: rebuild + RoPE + logits (tensor cores) ------------------------ */
/* One block per (split, KV head, sequence) walks 128-token tiles of the sequence's list: gather
 * the tiles' latent rows, rebuild their keys for head h on tensor cores (k = U_h k~, never written
 * to memory), add the exact keys of sink/recent tokens, apply RoPE at each token's position and
 * write the logits of the G query heads (log2 domain, -inf where the token is after the query).
 * Latent rows and U_h stream through a cp.async pipeline (4 stages of 32 coordinates for
 * mma.sync, 3 of 64 for wgmma on sm_90a, which reads them from shared memory without ldmatrix).
 * Each thread's gather addresses are computed once per tile (rows) or per pass (U_h), so a pipeline
 * stage costs a handful of instructions per 16-byte copy. */
constexpr int kRWarps = 8, kRTile = 16 * kRWarps;
/* Pipeline geometry: K coordinates per stage and stage count of each MMA path. mma.sync reads
 * rows padded by 16 bytes with ldmatrix (conflict-free); wgmma (sm_90a) reads 128-byte rows in
 * the 128-byte swizzle layout straight from shared memory, 8-row atoms 1024-byte aligned. */
constexpr int kMmaKC = 32, kMmaStages = 4, kMmaStride = kMmaKC + 8;
constexpr int kWgKC = 64, kWgStages = 3;
#ifdef SALS_WGMMA
constexpr int kRKC = kWgKC, kRStages = kWgStages;
#else
constexpr int kRKC = kMmaKC, kRStages = kMmaStages;
#endif
constexpr int kRPieces = kRKC / 8;                              /* 16-byte copies per row */
constexpr int kRRowsPerThread = kRTile * kRPieces / (kRWarps * 32);

/* Element offset of (row, column) in one operand tile of a stage; column is a multiple of 8
 * or the offset of an element within its 16-byte chunk. */
__device__ __forceinline__ int rebuild_tile_offset(int row, int col) {
#ifdef SALS_WGMMA
  return row * kWgKC + ((((col >> 3) ^ row) & 7) << 3) + (col & 7);
#else
  return row * kMmaStride + col;
#endif
}
/* Element offset of query n (< 8), column c (< D, counted pass by pass) in the logits' B
 * operand: 8-row atoms of 64 columns in the 128-byte swizzle layout, one atom per 64 columns. */
__device__ __forceinline__ int rebuild_q_offset(int n, int c) {
  return ((c >> 6) * 8 + n) * 64 + ((((c >> 3) ^ n) & 7) << 3) + (c & 7);
}
/* Dynamic shared memory of either path (the host does not know which one the device runs):
 * the stages and the queries [8][D] (whole swizzle atoms, so they stay 1024-byte aligned after
 * the stages), plus 1 KB to align the atoms. */
template <typename T, int D>
constexpr size_t rebuild_smem_bytes() {
  constexpr size_t rows = kRTile + (D < 128 ? D : 128);
  constexpr size_t mma = sizeof(T) * (kMmaStages * rows * kMmaStride + 8 * D);
  constexpr size_t wg = sizeof(T) * (kWgStages * rows * kWgKC + 8 * D) + 1024;
  return mma > wg ? mma : wg;
}

/* Two blocks per SM up to D = 128 (the shared memory allows it): the quantised-key and paged
 * instantiations would otherwise take 150-170 registers and run one. */
template <typename T, int D, bool QK, bool PG>
__global__ void __launch_bounds__(kRWarps * 32, D <= 128 ? 2 : 1)
    rebuild_logits_kernel(AttnArgs a) {
  constexpr int W = D < 128 ? D : 128;   /* key columns per pass */
  constexpr int NPASS = D / W;
  constexpr int NT = W / 8;              /* n-tiles per warp */
  constexpr int kURowsPerThread = W * kRPieces / (kRWarps * 32);
  /* dynamic: kRStages stages of latent rows [kRTile][kRKC] and U_h rows [W][kRKC], then the
   * rotated queries (the logits' B operand, rebuild_q_offset) */
  extern __shared__ __align__(16) unsigned char rebuild_smem[];
#ifdef SALS_WGMMA
  constexpr int kRowElems = kWgKC;
  T* const as0 =
      reinterpret_cast<T*>(rebuild_smem + ((1024 - (smem_u32(rebuild_smem) & 1023)) & 1023));
#else
  constexpr int kRowElems = kMmaStride;
  T* const as0 = reinterpret_cast<T*>(rebuild_smem);
#endif
  T* const bs0 = as0 + kRStages * kRTile * kRowElems;
  auto As = [&](int buf) { return as0 + buf * (kRTile * kRowElems); };
  auto Bs = [&](int buf) { return bs0 + buf * (W * kRowElems); };
  T* const qt = bs0 + kRStages * W * kRowElems;
  __shared__ float s_freq[D / 2];
  __shared__ int32_t t_slot[kRTile], t_kind[kRTile], t_pos[kRTile];
  __shared__ int64_t t_base[PG ? kRTile : 1]; /* paged: slot offsets of rebuilt tokens */
  __shared__ int32_t s_any_rebuild;

  const int32_t b = blockIdx.z, h = blockIdx.y, split = blockIdx.x, nsplit = gridDim.x;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t4 = lane & 3;
  const int32_t G = a.G;
  int32_t qb = b, qp;
  if constexpr (PG) {
    qb = a.q_row[b];
    if (qb < 0) return; /* not a single-query sequence of this launch: nothing to write */
    qp = a.len[b] - 1;
  } else {
    qp = load_i32(a.qpos, off2(a.qpos, b, 0));
    if (qp < 0) return; /* padded query: merge writes zeros */
  }

  auto dim_of = [&](int c, int p) -> int {
    if (NPASS == 1) return c;
    return c < 64 ? p * 64 + c : 128 + p * 64 + (c - 64);
  };

  /* rotated queries in the storage type, rows G..7 zero: the logits are a 64 x 8 x W product
   * per warpgroup and pass, the rotated keys its A operand straight from the accumulators */
  for (int i = tid; i < 8 * D; i += blockDim.x) {
    const int gq = i / D, c = i % D;
    float x = 0.f;
    if (gq < G) {
      const int64_t o = off4(a.q, qb, 0, h * G + gq, 0);
      auto qe = [&](int32_t j) { return load_elem(a.q.data, a.q.elem, o + j); };
      x = rope_elem(qe, dim_of(c % W, c / W), qp, a.inv_freq, a.rotary_dim, a.inter, a.att);
    }
    qt[rebuild_q_offset(gq, c)] = from_f<T>(x);
  }
#ifdef SALS_WGMMA
  fence_proxy_async(); /* the queries are read by wgmma (the async proxy) */
#endif
  for (int i = tid; i < D / 2; i += blockDim.x)
    s_freq[i] = i < a.rotary_dim / 2 ? a.inv_freq[i] : 0.f;

  const int32_t S = a.len[b];
  const int32_t hs = a.n_sel_heads == 1 ? 0 : h;
  const int32_t* sel =
      a.sparse ? a.sel_idx + ((int64_t)b * a.n_sel_heads + hs) * a.sel_stride : nullptr;
  const int32_t n_sel =
      a.sparse ? a.sel_count[b] : (S - a.n_sink - a.n_recent > 0 ? S - a.n_sink - a.n_recent : 0);
  const TokList L = tok_list(S, a.n_sink, a.n_recent, n_sel);
  const int32_t n_tiles = (L.total + kRTile - 1) / kRTile;

  /* paged: both parts' element offsets count from the pages (slots are 16-byte aligned) */
  const T* lat_s = PG ? (const T*)(a.pg.pages + a.pg.lay.lat[0]) : (const T*)a.lat_score;
  const T* lat_r = PG ? (const T*)(a.pg.pages + a.pg.lay.lat[1]) : (const T*)a.lat_rest;
  const T* uh = (const T*)a.uh;
  const int32_t rr = a.rank - a.rs;
  /* this thread's 16-byte copies: rows tid / kRPieces + j * (threads / kRPieces), column ch */
  const int ch = (tid % kRPieces) * 8;
  const int row0 = tid / kRPieces;
  constexpr int kRowStep = kRWarps * 32 / kRPieces;

  for (int32_t tile = split; tile < n_tiles; tile += nsplit) {
    __syncthreads(); /* previous tile's smem reads are done */
    if (tid == 0) s_any_rebuild = 0;
    __syncthreads();
    if (tid < kRTile) {
      const int32_t i = tile * kRTile + tid;
      int32_t kind = -1, slot = 0, p = 0;
      int64_t base = 0;
      if (i < L.total) {
        const Tok tk = tok_entry<PG>(a, b, L, i, sel);
        kind = tk.kind;
        slot = tk.src;
        p = tok_pos<PG>(a, b, tk.t);
        if (kind == 0) s_any_rebuild = 1;
        if constexpr (PG) base = kind == 0 ? a.pg.offset(b, tk.t) : 0;
      }
      t_slot[tid] = slot;
      t_kind[tid] = kind;
      t_pos[tid] = p;
      if constexpr (PG) t_base[tid] = base;
    }
    __syncthreads();
    const bool any_rebuild = s_any_rebuild != 0;
    /* element offsets of this thread's latent rows (score part and rest part, each already
     * shifted so that adding the stage's first coordinate gives the copy's source) */
    int64_t off_s[kRRowsPerThread], off_r[kRRowsPerThread];
    int64_t qrow[kRRowsPerThread]; /* quantised keys: the cache rows (paged: slot offsets) */
    bool live[kRRowsPerThread];
#pragma unroll
    for (int j = 0; j < kRRowsPerThread; ++j) {
      const int row = row0 + j * kRowStep;
      live[j] = t_kind[row] == 0;
      if constexpr (PG) {
        const int64_t e0 = t_base[row] / (int64_t)sizeof(T);
        off_s[j] = e0 + ch;
        off_r[j] = e0 + ch - a.rs;
        if constexpr (QK) qrow[j] = t_base[row];
      } else {
        const int64_t srow = (int64_t)b * a.max_tokens + t_slot[row];
        off_s[j] = srow * a.rs + ch;
        off_r[j] = srow * rr + ch - a.rs;
        if constexpr (QK) qrow[j] = srow;
      }
    }

    /* logits of rows g, g + 8 of the warp's 16 tokens for queries 2 t4, 2 t4 + 1 */
    float logit[1][4] = {{0.f, 0.f, 0.f, 0.f}};

#pragma unroll
    for (int pass = 0; pass < NPASS; ++pass) {
      float acc[NT][4];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;

      if (any_rebuild) {
        int64_t off_u[kURowsPerThread];
#pragma unroll
        for (int j = 0; j < kURowsPerThread; ++j)
          off_u[j] = ((int64_t)h * D + dim_of(row0 + j * kRowStep, pass)) * a.rank + ch;
        /* a 16-byte copy lies in one of the two latent arrays (rs % 8 == 0); copies past the
         * rank are zero-filled, so any rank that is a multiple of 8 works. Quantised keys:
         * the 8 coordinates' codes are dequantised in registers and stored with a plain
         * shared-memory store to the same place; on sm_90a the fence.proxy.async that every
         * thread runs before the barrier ahead of the stage's wgmma orders these generic-proxy
         * stores too, as it does the cp.async data. */
        auto stage = [&](int buf, int32_t kc) {
          const int32_t col = kc + ch;
          const bool in_rank = col < a.rank, in_score = col < a.rs;
#pragma unroll
          for (int j = 0; j < kRRowsPerThread; ++j) {
            const bool ok = live[j] && in_rank;
            if constexpr (QK) {
              float f[8] = {};
              if (ok) load_latent_q<8, PG>(a, qrow[j], col, f);
              uint4 u;
              T* h8 = reinterpret_cast<T*>(&u);
#pragma unroll
              for (int e = 0; e < 8; ++e) h8[e] = from_f<T>(f[e]);
              *reinterpret_cast<uint4*>(&As(buf)[rebuild_tile_offset(row0 + j * kRowStep, ch)]) = u;
            } else {
              const T* src = !ok ? lat_s : in_score ? lat_s + off_s[j] + kc : lat_r + off_r[j] + kc;
              cp_async16(&As(buf)[rebuild_tile_offset(row0 + j * kRowStep, ch)], src, ok ? 16 : 0);
            }
          }
#pragma unroll
          for (int j = 0; j < kURowsPerThread; ++j)
            cp_async16(&Bs(buf)[rebuild_tile_offset(row0 + j * kRowStep, ch)],
                       in_rank ? (const void*)(uh + off_u[j] + kc) : (const void*)uh,
                       in_rank ? 16 : 0);
        };
#pragma unroll
        for (int st = 0; st < kRStages - 1; ++st) {
          if (st * kRKC < a.rank) stage(st, st * kRKC);
          cp_async_commit();
        }
        int it = 0;
        for (int32_t kc = 0; kc < a.rank; kc += kRKC, ++it) {
          /* stage `it` has landed; every warp is done with the buffer refilled below */
          cp_async_wait<kRStages - 2>();
#ifdef SALS_WGMMA
          fence_proxy_async(); /* cp.async data is read by wgmma (the async proxy) */
#endif
          __syncthreads();
          const int32_t next = kc + (kRStages - 1) * kRKC;
          if (next < a.rank) stage((it + kRStages - 1) % kRStages, next);
          cp_async_commit();
          const T* A = As(it % kRStages);
          const T* Bt = Bs(it % kRStages);
#ifdef SALS_WGMMA
          /* warpgroup wg: tokens [64 wg, +64) times all W columns */
          const T* Aw = A + (warp >> 2) * 64 * kWgKC;
          wgmma_fence_operands(acc);
          wgmma_fence();
#pragma unroll
          for (int ks = 0; ks < kRKC; ks += 16) {
            const uint64_t da = wgmma_desc_sw128(Aw + ks), db = wgmma_desc_sw128(Bt + ks);
            if constexpr (W == 128) wgmma_m64n128k16<T>(acc, da, db);
            else wgmma_m64n64k16<T>(acc, da, db);
          }
          wgmma_commit();
          wgmma_wait_all(); /* the stage is refilled two iterations later */
          wgmma_fence_operands(acc);
#else
#pragma unroll
          for (int ks = 0; ks < kRKC; ks += 16) {
            uint32_t af[4];
            ldmatrix_x4(af, &A[(warp * 16 + (lane % 16)) * kMmaStride + ks + (lane / 16) * 8]);
#pragma unroll
            for (int np = 0; np < NT / 2; ++np) {
              uint32_t bf[4];
              ldmatrix_x4(bf, &Bt[(np * 16 + (lane % 8) + (lane / 16) * 8) * kMmaStride + ks +
                                  ((lane / 8) % 2) * 8]);
              mma16816<T>(acc[2 * np], af, &bf[0]);
              mma16816<T>(acc[2 * np + 1], af, &bf[2]);
            }
          }
#endif
        }
        cp_async_wait<0>();
        __syncthreads(); /* the next pass or tile refills the stages */
      }

      /* exact keys of window tokens, then RoPE at each token's own position */
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const int row = warp * 16 + g + hr * 8;
        const int kind = t_kind[row];
        const int32_t p = t_pos[row];
        if (PG && kind == 3) {
          const int64_t o = (int64_t)t_slot[row] * a.w_s0 + (int64_t)h * a.w_s2;
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            const int c = nt * 8 + 2 * t4;
            acc[nt][hr * 2] += load_elem(a.window, a.w_elem, o + dim_of(c, pass));
            acc[nt][hr * 2 + 1] += load_elem(a.window, a.w_elem, o + dim_of(c + 1, pass));
          }
        } else if (!PG && (kind == 1 || kind == 2)) {
          const int32_t slot = t_slot[row];
          const T* kp = kind == 1 ? (const T*)a.sink_k + ((int64_t)b * a.n_sink + slot) * a.dk
                                  : (const T*)a.recent_k +
                                        ((int64_t)b * a.n_recent + slot % a.n_recent) * a.dk;
          kp += (int64_t)h * D;
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            const int c = nt * 8 + 2 * t4;
            acc[nt][hr * 2] += to_f<T>(kp[dim_of(c, pass)]);
            acc[nt][hr * 2 + 1] += to_f<T>(kp[dim_of(c + 1, pass)]);
          }
        }
        if (a.rotary_dim > 0 && kind >= 0) {
          if (a.inter) {
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
              const int dm = dim_of(nt * 8 + 2 * t4, pass);
              if (dm < a.rotary_dim) {
                float cs, sn;
                rope_cs(p, s_freq[dm / 2], a.att, &cs, &sn);
                const float xa = acc[nt][hr * 2], xb = acc[nt][hr * 2 + 1];
                acc[nt][hr * 2] = xa * cs - xb * sn;
                acc[nt][hr * 2 + 1] = xb * cs + xa * sn;
              }
            }
          } else {
            /* rotate-half with rotary_dim == D: the partner of local column c is c + W/2,
             * held by the same lane in n-tile nt + NT/2 */
#pragma unroll
            for (int nt = 0; nt < NT / 2; ++nt) {
#pragma unroll
              for (int j = 0; j < 2; ++j) {
                const int dm = dim_of(nt * 8 + 2 * t4 + j, pass);
                float cs, sn;
                rope_cs(p, s_freq[dm], a.att, &cs, &sn);
                const float xa = acc[nt][hr * 2 + j], xb = acc[nt + NT / 2][hr * 2 + j];
                acc[nt][hr * 2 + j] = xa * cs - xb * sn;
                acc[nt + NT / 2][hr * 2 + j] = xb * cs + xa * sn;
              }
            }
          }
        }
      }

      /* partial logits of this pass on tensor cores: k-step ks takes the rotated keys of
       * n-tiles 2 ks, 2 ks + 1 (rounded to T) as the A fragment */
#ifdef SALS_WGMMA
      wgmma_fence_operands(logit);
      wgmma_fence();
#endif
#pragma unroll
      for (int ks = 0; ks < W / 16; ++ks) {
        const uint32_t af[4] = {pack2<T>(acc[2 * ks][0], acc[2 * ks][1]),
                                pack2<T>(acc[2 * ks][2], acc[2 * ks][3]),
                                pack2<T>(acc[2 * ks + 1][0], acc[2 * ks + 1][1]),
                                pack2<T>(acc[2 * ks + 1][2], acc[2 * ks + 1][3])};
        const int c = pass * W + ks * 16;
#ifdef SALS_WGMMA
        wgmma_m64n8k16_rs<T>(logit[0], af, wgmma_desc_sw128(qt + rebuild_q_offset(0, c)));
#else
        const uint32_t bf[2] = {
            *reinterpret_cast<const uint32_t*>(&qt[rebuild_q_offset(g, c + 2 * t4)]),
            *reinterpret_cast<const uint32_t*>(&qt[rebuild_q_offset(g, c + 8 + 2 * t4)])};
        mma16816<T>(logit[0], af, bf);
#endif
      }
#ifdef SALS_WGMMA
      wgmma_commit();
      wgmma_wait_all();
      wgmma_fence_operands(logit);
#endif
    }

    /* scaled to the log2 domain (exp2 in the softmax); -inf after the query */
    const float sc = a.scale * kLog2e;
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int row = warp * 16 + g + hr * 8;
      const int32_t i = tile * kRTile + row;
      const bool vis = t_kind[row] >= 0 && t_pos[row] <= qp;
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int gq = 2 * t4 + j;
        if (gq < G && i < L.total)
          a.logits[((int64_t)b * a.hq + h * G + gq) * a.lmax + i] =
              vis ? logit[0][hr * 2 + j] * sc : -INFINITY;
      }
    }
  }
}

/* Combines the `parts` (<= kMaxParts) partials of the G (<= kMaxG) query heads hq0 .. hq0 + G - 1
 * of sequence b into their output rows (row ob of out); run by a whole block of kMergeThreads
 * threads. Warp w computes the partials' weights exp2(m_p - M) of heads w, w + 4, ... into
 * shared memory; then every output element (head, dimension) sums its column with independent
 * loads. A partial with l = 0 saw nothing visible and gets weight 0; a padded query (no
 * partials) gets zeros. Partials are read past L1 (__ldcg): other blocks of this launch wrote
 * them. */
constexpr int kMergeThreads = 128, kMaxParts = 256, kMaxG = 8;

__device__ void merge_group(const AttnArgs& a, int32_t b, int64_t ob, int32_t hq0, int32_t G,
                            int32_t D, int32_t parts, bool padded) {
  __shared__ float w_s[kMaxG][kMaxParts];
  __shared__ float l_s[kMaxG];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int32_t gq = warp; gq < G; gq += kMergeThreads / 32) {
    const float* ml = a.part_ml + ((int64_t)b * a.hq + hq0 + gq) * a.max_parts * 2;
    float mx = -INFINITY;
    if (!padded)
      for (int32_t p = lane; p < parts; p += 32)
        if (__ldcg(&ml[2 * p + 1]) > 0.f) mx = fmaxf(mx, __ldcg(&ml[2 * p]));
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    float ls = 0.f;
    if (!padded)
      for (int32_t p = lane; p < parts; p += 32) {
        const float l = __ldcg(&ml[2 * p + 1]);
        const float w = l > 0.f ? exp2f(__ldcg(&ml[2 * p]) - mx) : 0.f;
        w_s[gq][p] = w;
        ls += l * w;
      }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ls += __shfl_xor_sync(0xffffffffu, ls, o);
    if (lane == 0) l_s[gq] = ls;
  }
  __syncthreads();
  for (int32_t i = threadIdx.x; i < G * D; i += kMergeThreads) {
    const int32_t gq = i / D, e = i - gq * D;
    const float L = l_s[gq];
    float o = 0.f;
    if (L > 0.f) {
      const float* po = a.part_o + ((int64_t)b * a.hq + hq0 + gq) * a.max_parts * D + e;
#pragma unroll 4
      for (int32_t p = 0; p < parts; ++p) {
        const float w = w_s[gq][p];
        if (w != 0.f) o += w * __ldcg(&po[(int64_t)p * D]);
      }
      o /= L;
    }
    store_elem((void*)a.out.data, a.out.elem, off4(a.out, ob, 0, hq0 + gq, e), o);
  }
}

/* ---- sparse decode, part 2: softmax + dequantise + P.V ------------------------------------- */
/* One block per (split, KV head, sequence); each warp takes 32 list entries at a time: lane j
 * reads entry j's slot and logits, the warp updates its running max and sum (exp2 domain), then
 * every lane accumulates its D/32 value dimensions over the 32 entries, shared by the G query
 * heads. With quantised values the group's codes, scales and zeros (head h's slice of each row)
 * are first copied into the warp's shared memory with cp.async, one group ahead, so the P.V loop
 * reads shared memory instead of waiting on one dependent global gather per entry. Exact window
 * values (16-bit) and 16-bit storage are read from global memory. One partial per warp; the
 * last block of each (sequence, KV head) to finish (an arrival counter, reset by that block)
 * merges the partials of its G query heads into the output, so no merge launch follows. */
constexpr int kPWarps = 4;
static_assert(kPWarps * 32 == kMergeThreads, "the last softmax block runs the merge");

/* Shared bytes of one staged group of 32 entries (codes, then scales and zeros). */
__host__ __device__ inline int32_t pv_group_bytes(int32_t row_bytes, int32_t ngh) {
  return (32 * row_bytes + 32 * ngh * 4 + 15) / 16 * 16;
}

__device__ __forceinline__ void cp_async4(void* dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(smem_u32(dst)), "l"(src));
}

/* P.V over n staged entries of one group, all rebuilt (quantised): lane owns dims
 * [lane * DPL, +DPL), whose TB = DPL * bits code bits start at byte lane_byte of each row and
 * lie in quantisation group lane_g (group % DPL == 0). p holds the entries' probabilities as
 * [32][GM]. Compile-time code width: no per-entry branches. */
template <int DPL, int TB, int GM>
__device__ __forceinline__ void pv_staged_rows(const uint8_t* codes, const uint16_t* sc,
                                               const uint16_t* zr, int32_t rb, int32_t ngh,
                                               int32_t n, int32_t lane_byte, int32_t lane_shift,
                                               int32_t lane_g, const float* p, int32_t G,
                                               float (&o)[GM][DPL]) {
  constexpr int BITS = TB / DPL;
  constexpr uint32_t kMask = (1u << BITS) - 1u;
#pragma unroll 4
  for (int32_t r = 0; r < n; ++r) {
    const uint8_t* q = codes + r * rb + lane_byte;
    uint64_t w;
    if constexpr (TB <= 8) w = (uint64_t)(*q >> lane_shift);
    else if constexpr (TB == 16) w = *reinterpret_cast<const uint16_t*>(q);
    else if constexpr (TB == 32) w = *reinterpret_cast<const uint32_t*>(q);
    else w = *reinterpret_cast<const uint64_t*>(q);
    const float z = half_bits_to_f(zr[r * ngh + lane_g]), s = half_bits_to_f(sc[r * ngh + lane_g]);
    float v[DPL];
#pragma unroll
    for (int e = 0; e < DPL; ++e) v[e] = z + (float)((uint32_t)(w >> (e * BITS)) & kMask) * s;
#pragma unroll
    for (int gq = 0; gq < GM; ++gq) {
      if (gq >= G) continue;
      const float pr = p[r * GM + gq];
#pragma unroll
      for (int e = 0; e < DPL; ++e) o[gq][e] += pr * v[e];
    }
  }
}

template <typename T, int D, int GM, bool PG>
__global__ void __launch_bounds__(kPWarps * 32) softmax_pv_kernel(AttnArgs a, int32_t staged) {
  constexpr int DPL = D / 32; /* value dims per lane */
  extern __shared__ __align__(16) unsigned char pv_smem[];
  const int32_t b = blockIdx.z, h = blockIdx.y, split = blockIdx.x, nsplit = gridDim.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int32_t G = a.G;
  int64_t ob = b; /* the output row */
  if constexpr (PG) {
    ob = a.q_row[b];
    if (ob < 0) return; /* not a single-query sequence of this launch: nothing to write */
  } else if (load_i32(a.qpos, off2(a.qpos, b, 0)) < 0) { /* padded query: zeros, from one block */
    if (split == 0) merge_group(a, b, ob, h * G, G, D, 0, true);
    return;
  }

  const int32_t S = a.len[b];
  const int32_t hs = a.n_sel_heads == 1 ? 0 : h;
  const int32_t* sel =
      a.sparse ? a.sel_idx + ((int64_t)b * a.n_sel_heads + hs) * a.sel_stride : nullptr;
  const int32_t n_sel =
      a.sparse ? a.sel_count[b] : (S - a.n_sink - a.n_recent > 0 ? S - a.n_sink - a.n_recent : 0);
  const TokList L = tok_list(S, a.n_sink, a.n_recent, n_sel);
  /* this split's entries: whole 32-entry groups */
  const int32_t groups = (L.total + 31) / 32;
  const int32_t per = (groups + nsplit - 1) / nsplit * 32;
  const int32_t i0 = split * per;
  const int32_t i1 = i0 + per < L.total ? i0 + per : L.total;
  const float* lg_row = a.logits + ((int64_t)b * a.hq + h * G) * a.lmax;

  __shared__ __align__(16) float p_s[kPWarps][32][GM]; /* probabilities of the current group */
  /* staging buffers of this warp: two groups */
  const int32_t rb = staged ? D * a.bits / 8 : 0; /* code bytes of head h per token */
  const int32_t ngh = staged ? D / a.group : 0;
  /* staged entries decode with one load per lane when its DPL channels share a group */
  const bool fast = staged && a.group % DPL == 0;
  const int32_t lane_byte = lane * DPL * a.bits / 8, lane_shift = (lane * DPL * a.bits) % 8;
  const int32_t lane_g = fast ? lane * DPL / a.group : 0;
  const int32_t gb = pv_group_bytes(rb, ngh);
  unsigned char* const wbuf = pv_smem + (size_t)warp * 2 * gb;
  auto codes = [&](int k) { return wbuf + k * gb; };
  auto scales = [&](int k) { return reinterpret_cast<uint16_t*>(wbuf + k * gb + 32 * rb); };
  auto zeros = [&](int k) { return scales(k) + 32 * ngh; };
  /* copies of the group's rebuilt entries (kind 0); slot and kind of entry r are in lane r */
  auto stage = [&](int k, int32_t slot, int32_t kind) {
    const int32_t pieces = rb / 16; /* rb is a multiple of 16 (D >= 64, bits >= 2) */
    for (int c = lane; c < 32 * pieces; c += 32) {
      const int r = c / pieces, pc = c % pieces;
      const int32_t sr = __shfl_sync(0xffffffffu, slot, r);
      const int32_t kr = __shfl_sync(0xffffffffu, kind, r);
      if (kr == 0) {
        const uint8_t* vc;
        const uint16_t *vs, *vz;
        value_row<PG>(a, b, sr, &vc, &vs, &vz);
        cp_async16(codes(k) + r * rb + pc * 16, vc + (int64_t)h * rb + pc * 16, 16);
      }
    }
    /* scales and zeros: 4-byte words when ngh is even (then every offset is even) */
    const int32_t per_row = ngh % 2 == 0 ? ngh / 2 : ngh;
    for (int c = lane; c < 32 * per_row; c += 32) {
      const int r = c / per_row, w = c % per_row;
      const int32_t sr = __shfl_sync(0xffffffffu, slot, r);
      const int32_t kr = __shfl_sync(0xffffffffu, kind, r);
      if (kr != 0) continue;
      const uint8_t* vc;
      const uint16_t *vs, *vz;
      value_row<PG>(a, b, sr, &vc, &vs, &vz);
      vs += (int64_t)h * ngh;
      vz += (int64_t)h * ngh;
      if (ngh % 2 == 0) {
        cp_async4(scales(k) + r * ngh + 2 * w, vs + 2 * w);
        cp_async4(zeros(k) + r * ngh + 2 * w, vz + 2 * w);
      } else {
        scales(k)[r * ngh + w] = vs[w];
        zeros(k)[r * ngh + w] = vz[w];
      }
    }
    cp_async_commit();
  };
  auto entry = [&](int32_t i, int32_t* slot, int32_t* kind) {
    *kind = -1;
    *slot = 0;
    if (i < i1) {
      const Tok tk = tok_entry<PG>(a, b, L, i, sel);
      *slot = tk.src;
      *kind = tk.kind;
    }
  };

  float m_run[GM], l_run[GM], o_acc[GM][DPL];
#pragma unroll
  for (int gq = 0; gq < GM; ++gq) {
    m_run[gq] = -INFINITY;
    l_run[gq] = 0.f;
#pragma unroll
    for (int e = 0; e < DPL; ++e) o_acc[gq][e] = 0.f;
  }

  int32_t base = i0 + warp * 32;
  int32_t slot, kind;
  entry(base + lane, &slot, &kind);
  if (staged && base < i1) stage(0, slot, kind);
  for (int k = 0; base < i1; base += kPWarps * 32, k ^= 1) {
    /* next group's copies go out before this group's work */
    const int32_t nbase = base + kPWarps * 32;
    int32_t nslot, nkind;
    entry(nbase + lane, &nslot, &nkind);
    const bool more = nbase < i1;
    if (staged && more) stage(k ^ 1, nslot, nkind);

    const int32_t i = base + lane;
#pragma unroll
    for (int gq = 0; gq < GM; ++gq) {
      float pg = 0.f;
      if (gq < G) {
        const float x = i < i1 ? lg_row[(int64_t)gq * a.lmax + i] : -INFINITY;
        float mx = x;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
        const float m_new = fmaxf(m_run[gq], mx);
        if (m_new > -INFINITY) { /* else nothing visible yet */
          const float alpha = exp2f(m_run[gq] - m_new);
          pg = exp2f(x - m_new);
          float ps = pg;
#pragma unroll
          for (int o = 16; o > 0; o >>= 1) ps += __shfl_xor_sync(0xffffffffu, ps, o);
          l_run[gq] = l_run[gq] * alpha + ps;
          m_run[gq] = m_new;
#pragma unroll
          for (int e = 0; e < DPL; ++e) o_acc[gq][e] *= alpha;
        }
      }
      p_s[warp][lane][gq] = pg;
    }
    if (staged) {
      if (more) cp_async_wait<1>();
      else cp_async_wait<0>();
    }
    __syncwarp(); /* every lane's copies and probabilities of this group are visible */
    const int32_t n = i1 - base < 32 ? i1 - base : 32;
    const float* pw = &p_s[warp][0][0];
    if (fast && base >= L.n_exact) {
      /* every entry is rebuilt: codes from shared memory, code width fixed at compile time */
      const uint8_t* cd = codes(k);
      const uint16_t *sc = scales(k), *zr = zeros(k);
      switch (DPL * a.bits) {
        case DPL * 2:
          pv_staged_rows<DPL, DPL * 2, GM>(cd, sc, zr, rb, ngh, n, lane_byte, lane_shift, lane_g,
                                           pw, G, o_acc);
          break;
        case DPL * 4:
          pv_staged_rows<DPL, DPL * 4, GM>(cd, sc, zr, rb, ngh, n, lane_byte, lane_shift, lane_g,
                                           pw, G, o_acc);
          break;
        default:
          pv_staged_rows<DPL, DPL * 8, GM>(cd, sc, zr, rb, ngh, n, lane_byte, lane_shift, lane_g,
                                           pw, G, o_acc);
      }
    } else {
      /* window entries (exact 16-bit values), 16-bit storage or unstaged layouts */
      for (int32_t r = 0; r < n; ++r) {
        const int32_t kr = __shfl_sync(0xffffffffu, kind, r);
        float v[DPL];
        if (staged && kr == 0) {
          decode_codes<DPL>(codes(k) + r * rb, scales(k) + r * ngh, zeros(k) + r * ngh, lane * DPL,
                            a.bits, a.group, v);
        } else {
          const int32_t sr = __shfl_sync(0xffffffffu, slot, r);
          load_value<T, DPL, PG>(a, b, h, D, sr, kr, lane * DPL, v);
        }
#pragma unroll
        for (int gq = 0; gq < GM; ++gq) {
          if (gq >= G) continue;
          const float pr = pw[r * GM + gq];
#pragma unroll
          for (int e = 0; e < DPL; ++e) o_acc[gq][e] += pr * v[e];
        }
      }
    }
    __syncwarp(); /* this group's buffer is refilled two groups later */
    slot = nslot;
    kind = nkind;
  }

  /* the warps' partials combine into the block's (weights exp2(m_w - M) over the warps that
   * saw a visible entry), written as partial `split` of each head */
  __shared__ float ml_s[kPWarps][GM][2];
  __shared__ float o_s[GM][D];
  if (lane == 0)
#pragma unroll
    for (int gq = 0; gq < GM; ++gq) {
      ml_s[warp][gq][0] = m_run[gq];
      ml_s[warp][gq][1] = l_run[gq];
    }
  __syncthreads();
  float wsc[GM];
#pragma unroll
  for (int gq = 0; gq < GM; ++gq) {
    float mb = -INFINITY;
#pragma unroll
    for (int w = 0; w < kPWarps; ++w)
      if (ml_s[w][gq][1] > 0.f) mb = fmaxf(mb, ml_s[w][gq][0]);
    wsc[gq] = l_run[gq] > 0.f ? exp2f(m_run[gq] - mb) : 0.f;
  }
#pragma unroll
  for (int w = 0; w < kPWarps; ++w) {
    if (warp == w)
#pragma unroll
      for (int gq = 0; gq < GM; ++gq) {
        if (gq >= G) continue;
#pragma unroll
        for (int e = 0; e < DPL; ++e) {
          const float x = wsc[gq] * o_acc[gq][e];
          o_s[gq][lane * DPL + e] = w == 0 ? x : o_s[gq][lane * DPL + e] + x;
        }
      }
    __syncthreads();
  }
  for (int32_t i = threadIdx.x; i < G * D; i += kPWarps * 32) {
    const int32_t gq = i / D, e = i - gq * D;
    const int64_t ph = ((int64_t)b * a.hq + h * G + gq) * a.max_parts + split;
    a.part_o[ph * D + e] = o_s[gq][e];
    if (e == 0) {
      float m = -INFINITY, lb = 0.f;
#pragma unroll
      for (int w = 0; w < kPWarps; ++w)
        if (ml_s[w][gq][1] > 0.f) m = fmaxf(m, ml_s[w][gq][0]);
#pragma unroll
      for (int w = 0; w < kPWarps; ++w)
        if (ml_s[w][gq][1] > 0.f) lb += ml_s[w][gq][1] * exp2f(ml_s[w][gq][0] - m);
      a.part_ml[ph * 2] = m;
      a.part_ml[ph * 2 + 1] = lb;
    }
  }

  /* the last block of (b, h) merges: every block's partials are published (fence) before it
   * arrives, and the last one fences again before reading them */
  __shared__ bool last_s;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    uint32_t* done = a.pv_done + (int64_t)b * a.hkv + h;
    last_s = atomicAdd(done, 1u) == (uint32_t)nsplit - 1;
    if (last_s) *done = 0; /* every block of the pair has arrived: ready for the next launch */
  }
  __syncthreads();
  if (!last_s) return;
  __threadfence();
  merge_group(a, b, ob, h * G, G, D, nsplit, false);
}

/* ---- general kernel: any dtype, head dim, T; keys rebuilt in shared memory ------------ */
constexpr int kGThreads = 256, kGKT = 32, kGRC = 64;

template <typename T, bool QK, bool PG>
__global__ void __launch_bounds__(kGThreads)
    general_kernel(AttnArgs a, int32_t D, int32_t Tq, int32_t QT) {
  extern __shared__ float sm[];
  const int32_t R = QT * a.G;
  float* Q = sm;                  /* [R][D] */
  float* O = Q + R * D;           /* [R][D] */
  float* K = O + R * D;           /* [KT][D] */
  float* V = K + kGKT * D;        /* [KT][D] */
  float* Lt = V + kGKT * D;       /* [KT][RC + 1] (padded: no bank conflicts) */
  float* Sc = Lt + kGKT * (kGRC + 1); /* [R][KT] */
  float* mrow = Sc + R * kGKT;    /* [R] */
  float* lrow = mrow + R;         /* [R] */
  float* arow = lrow + R;         /* [R] */
  int32_t* qpos = (int32_t*)(arow + R);   /* [R] */
  int32_t* kslot = qpos + R;              /* [KT] */
  int32_t* kkind = kslot + kGKT;          /* [KT] */
  int32_t* kpos = kkind + kGKT;           /* [KT] */
  __shared__ int64_t kbase[PG ? kGKT : 1]; /* paged: slot offsets of rebuilt tokens */

  /* the cache: queries [t0, t0 + QT) of sequence blockIdx.z, as rows b of q and out, tokens
   * t0.. of dim 1; paged storage: those of the work item blockIdx.x, rows qr0 + t0.. */
  const int h = blockIdx.y;
  int32_t b, t0, nq;
  int64_t qr0 = 0;
  if constexpr (PG) {
    if ((int32_t)blockIdx.x >= *a.n_tiles) return;
    b = a.tiles[2 * blockIdx.x];
    t0 = a.tiles[2 * blockIdx.x + 1];
    nq = a.q_count[b];
    qr0 = a.q_first[b];
  } else {
    b = blockIdx.z;
    t0 = blockIdx.x * QT;
    nq = Tq;
  }
  auto q_at = [&](const DView& x, int32_t tq, int32_t hq, int32_t e) {
    return PG ? off4(x, qr0 + t0 + tq, 0, hq, e) : off4(x, b, t0 + tq, hq, e);
  };
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int32_t G = a.G;
  const int32_t half = a.rotary_dim / 2;
  const int32_t S = a.len[b];

  for (int i = tid; i < R; i += blockDim.x) {
    const int32_t tq = i / G;
    int32_t p = -1;
    if (t0 + tq < nq) p = PG ? S - nq + t0 + tq : load_i32(a.qpos, off2(a.qpos, b, t0 + tq));
    qpos[i] = p;
    mrow[i] = -INFINITY;
    lrow[i] = 0.f;
  }
  __syncthreads();
  for (int i = tid; i < R * D; i += blockDim.x) {
    const int32_t row = i / D, e = i % D, tq = row / G, gq = row % G;
    float x = 0.f;
    if (qpos[row] >= 0) {
      const int64_t o = q_at(a.q, tq, h * G + gq, 0);
      auto qe = [&](int32_t j) { return load_elem(a.q.data, a.q.elem, o + j); };
      x = rope_elem(qe, e, qpos[row], a.inv_freq, a.rotary_dim, a.inter, a.att) *
          (a.scale * kLog2e);
    }
    Q[i] = x;
    O[i] = 0.f;
  }

  const int32_t hs = a.n_sel_heads == 1 ? 0 : h;
  /* paged storage: a sparse layer's single-query sequences take sparse steps */
  const bool sparse = a.sparse != 0 && (!PG || nq == 1);
  const int32_t* sel =
      sparse ? a.sel_idx + ((int64_t)b * a.n_sel_heads + hs) * a.sel_stride : nullptr;
  const int32_t n_cand = S - a.n_sink - a.n_recent > 0 ? S - a.n_sink - a.n_recent : 0;
  const TokList L = tok_list(S, a.n_sink, a.n_recent, sparse ? a.sel_count[b] : n_cand);
  const T* lat_s = (const T*)a.lat_score;
  const T* lat_r = (const T*)a.lat_rest;
  const int32_t rr = a.rank - a.rs;

  for (int32_t j0 = 0; j0 < L.total; j0 += kGKT) {
    __syncthreads();
    if (tid < kGKT) {
      const int32_t i = j0 + tid;
      int32_t kind = -1, slot = 0, p = 0;
      int64_t base = 0;
      if (i < L.total) {
        const Tok tk = tok_entry<PG>(a, b, L, i, sel);
        kind = tk.kind;
        slot = tk.src;
        p = tok_pos<PG>(a, b, tk.t);
        if constexpr (PG) base = kind == 0 ? a.pg.offset(b, tk.t) : 0;
      }
      kslot[tid] = slot;
      kkind[tid] = kind;
      kpos[tid] = p;
      if constexpr (PG) kbase[tid] = base;
    }
    for (int i = tid; i < kGKT * D; i += blockDim.x) K[i] = 0.f;
    __syncthreads();
    /* rebuild: K[j][e] = sum_c U[h*D + e, c] * lat[j][c] */
    for (int32_t c0 = 0; c0 < a.rank; c0 += kGRC) {
      for (int i = tid; i < kGKT * kGRC; i += blockDim.x) {
        const int j = i / kGRC, cc = i % kGRC;
        const int32_t c = c0 + cc;
        float x = 0.f;
        if (kkind[j] == 0 && c < a.rank) {
          if constexpr (PG) {
            const uint8_t* p = a.pg.pages + kbase[j];
            if constexpr (QK) load_latent_q<1, PG>(a, kbase[j], c, &x);
            else
              x = c < a.rs ? to_f<T>(((const T*)(p + a.pg.lay.lat[0]))[c])
                           : to_f<T>(((const T*)(p + a.pg.lay.lat[1]))[c - a.rs]);
          } else {
            const int64_t row = (int64_t)b * a.max_tokens + kslot[j];
            if constexpr (QK) load_latent_q<1, PG>(a, row, c, &x);
            else
              x = c < a.rs ? to_f<T>(lat_s[row * a.rs + c]) : to_f<T>(lat_r[row * rr + c - a.rs]);
          }
        }
        Lt[j * (kGRC + 1) + cc] = x;
      }
      __syncthreads();
      const int32_t cn = a.rank - c0 < kGRC ? a.rank - c0 : kGRC;
      for (int i = tid; i < kGKT * D; i += blockDim.x) {
        const int j = i % kGKT, e = i / kGKT;
        if (kkind[j] != 0) continue;
        const float* u = a.proj + ((int64_t)h * D + e) * a.rank + c0;
        float s = 0.f;
        for (int32_t cc = 0; cc < cn; ++cc) s += u[cc] * Lt[j * (kGRC + 1) + cc];
        K[j * D + e] += s;
      }
      __syncthreads();
    }
    /* exact keys, values */
    for (int i = tid; i < kGKT * D; i += blockDim.x) {
      const int j = i / D, e = i % D;
      const int kind = kkind[j];
      if (PG && kind == 3) {
        K[i] = load_elem(a.window, a.w_elem, (int64_t)kslot[j] * a.w_s0 + (int64_t)h * a.w_s2 + e);
      } else if (!PG && (kind == 1 || kind == 2)) {
        const T* kp = kind == 1 ? (const T*)a.sink_k + ((int64_t)b * a.n_sink + kslot[j]) * a.dk
                                : (const T*)a.recent_k +
                                      ((int64_t)b * a.n_recent + kslot[j] % a.n_recent) * a.dk;
        K[i] = to_f<T>(kp[(int64_t)h * D + e]);
      }
      float v = 0.f;
      if (kind >= 0) load_value<T, 1, PG>(a, b, h, D, kslot[j], kind, e, &v);
      V[i] = v;
    }
    __syncthreads();
    /* RoPE at each key's position: one thread per (token, pair) */
    for (int i = tid; i < kGKT * half; i += blockDim.x) {
      const int j = i / half, pi = i % half;
      if (kkind[j] < 0) continue;
      int32_t ea, eb;
      rope_pair_index(pi, a.rotary_dim, a.inter, &ea, &eb);
      float cs, sn;
      rope_cs(kpos[j], a.inv_freq[pi], a.att, &cs, &sn);
      const float xa = K[j * D + ea], xb = K[j * D + eb];
      K[j * D + ea] = xa * cs - xb * sn;
      K[j * D + eb] = xb * cs + xa * sn;
    }
    __syncthreads();
    /* logits */
    for (int i = tid; i < R * kGKT; i += blockDim.x) {
      const int row = i / kGKT, j = i % kGKT;
      float s = -INFINITY;
      if (kkind[j] >= 0 && qpos[row] >= 0 && kpos[j] <= qpos[row]) {
        s = 0.f;
        for (int32_t e = 0; e < D; ++e) s += Q[row * D + e] * K[j * D + e];
      }
      Sc[i] = s;
    }
    __syncthreads();
    /* online softmax: one warp per row, lane = token */
    for (int row = warp; row < R; row += kGThreads / 32) {
      const float s = Sc[row * kGKT + lane];
      float mx = s;
      for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      const float m_old = mrow[row];
      const float m_new = fmaxf(m_old, mx);
      float p = 0.f, alpha = 1.f;
      if (m_new > -INFINITY) {
        p = exp2f(s - m_new);
        alpha = exp2f(m_old - m_new);
      }
      float ps = p;
      for (int o = 16; o > 0; o >>= 1) ps += __shfl_xor_sync(0xffffffffu, ps, o);
      Sc[row * kGKT + lane] = p;
      __syncwarp(); /* every lane has read mrow/lrow before lane 0 updates them */
      if (lane == 0) {
        mrow[row] = m_new;
        lrow[row] = lrow[row] * alpha + ps;
        arow[row] = alpha;
      }
    }
    __syncthreads();
    for (int i = tid; i < R * D; i += blockDim.x) {
      const int row = i / D, e = i % D;
      float o = O[i] * arow[row];
      for (int j = 0; j < kGKT; ++j) o += Sc[row * kGKT + j] * V[j * D + e];
      O[i] = o;
    }
  }
  __syncthreads();
  for (int i = tid; i < R * D; i += blockDim.x) {
    const int32_t row = i / D, e = i % D, tq = row / G, gq = row % G;
    if (t0 + tq >= nq) continue;
    const float l = lrow[row];
    const float o = (qpos[row] >= 0 && l > 0.f) ? O[i] / l : 0.f;
    store_elem((void*)a.out.data, a.out.elem, q_at(a.out, tq, h * G + gq, e), o);
  }
}

AttnArgs make_args(const sals_cache_t* c, const sals_view_t* q, const sals_view_t* q_pos,
                   const sals_view_t* out) {
  AttnArgs a{};
  const CacheState* s = state(c);
  a.lat_score = c->lat_score;
  a.lat_rest = c->lat_rest;
  a.val = c->val;
  a.val_scale = c->val_scale;
  a.val_zero = c->val_zero;
  a.sink_k = c->sink_k;
  a.sink_v = c->sink_v;
  a.recent_k = c->recent_k;
  a.recent_v = c->recent_v;
  a.pos = c->pos;
  a.len = c->len;
  a.sel_idx = c->sel_idx;
  a.sel_count = c->sel_count;
  a.sel_stride = c->cfg.max_tokens;
  a.uh = s->uh;
  a.proj = c->proj;
  a.inv_freq = c->inv_freq;
  a.n_sink = c->cfg.n_sink;
  a.n_recent = c->cfg.n_recent;
  a.max_tokens = c->cfg.max_tokens;
  a.rank = c->cfg.rank;
  a.rs = c->cfg.score_rank;
  a.dk = c->dk;
  a.hkv = c->cfg.n_head_kv;
  a.hq = c->cfg.n_head_q;
  a.G = a.hq / a.hkv;
  a.bits = c->cfg.value_bits;
  a.group = c->cfg.value_group;
  a.n_groups = c->n_groups;
  a.val_row_bytes = c->val_row_bytes;
  a.lat_score_scale = c->lat_score_scale;
  a.lat_score_zero = c->lat_score_zero;
  a.lat_rest_scale = c->lat_rest_scale;
  a.lat_rest_zero = c->lat_rest_zero;
  a.key_bits = c->cfg.key_bits;
  a.key_group = c->cfg.key_group;
  a.lat_score_bytes = c->lat_score_bytes;
  a.lat_rest_bytes = c->lat_rest_bytes;
  a.n_sel_heads = c->n_sel_heads;
  a.rotary_dim = c->rotary_dim;
  a.inter = c->interleaved;
  a.att = c->attention_scaling;
  a.scale = c->scale;
  a.q = dview(q);
  a.qpos = dview(q_pos);
  a.out = dview(out);
  a.logits = s->logits;
  a.lmax = attend_list_max(c->cfg);
  a.part_o = s->part_o;
  a.part_ml = s->part_ml;
  a.pv_done = s->pv_done;
  a.max_parts = s->max_parts;
  a.sparse = 0;
  return a;
}

/*
 * Splits of each (sequence, KV head) list of at most max_tiles 128-entry tiles, for the rebuild
 * and the softmax + P.V kernels. Blocks run in waves of `slots` (blocks resident on the device
 * at once); a wave lasts about the tiles of one block plus a fixed cost (query rotation, first
 * tile header: ~1/4 tile). The split minimising waves x (tiles per block + 1/4) avoids a last
 * wave that leaves most of the device idle; ties go to fewer blocks.
 */
int32_t pick_splits(int64_t pairs, int32_t max_tiles, int64_t slots) {
  int32_t best = 1;
  double best_cost = INFINITY;
  for (int32_t ns = 1; ns <= max_tiles; ++ns) {
    const double cost = (double)cdiv(ns * pairs, slots) * ((double)cdiv(max_tiles, ns) + 0.25);
    if (cost < best_cost) {
      best = ns;
      best_cost = cost;
    }
  }
  return best;
}

/* Resident blocks per SM of `kernel` (at least 1). */
template <typename K>
cudaError_t blocks_per_sm(K kernel, int threads, size_t smem, int* n) {
  *n = 0;
  const cudaError_t e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(n, kernel, threads, smem);
  if (*n < 1) *n = 1;
  return e;
}

/* rebuild_logits_kernel then softmax_pv_kernel (which merges the splits). */
template <typename T, int D, int GM, bool PG>
cudaError_t launch_decode_g(const AttnArgs& a, const DecodeGrid& dg, cudaStream_t st) {
  const int64_t pairs = (int64_t)dg.B * a.hkv;
  const size_t smem = rebuild_smem_bytes<T, D>();
  /* quantised latent keys: a second instantiation, the 16-bit kernel stays as it is */
  auto rebuild = a.key_bits < 16 ? rebuild_logits_kernel<T, D, true, PG>
                                 : rebuild_logits_kernel<T, D, false, PG>;
  cudaError_t e =
      cudaFuncSetAttribute(rebuild, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (e != cudaSuccess) return e;
  int per_sm = 0;
  e = blocks_per_sm(rebuild, kRWarps * 32, smem, &per_sm);
  if (e != cudaSuccess) return e;
  const int32_t ns = pick_splits(pairs, dg.max_tiles, (int64_t)dg.num_sms * per_sm);
  rebuild<<<dim3((unsigned)ns, (unsigned)a.hkv, (unsigned)dg.B), kRWarps * 32, smem, st>>>(a);
  e = cudaPeekAtLastError();
  if (e != cudaSuccess) return e;
  /* softmax + P.V streams the values, split by the same wave model (at most max_pv_split
   * parts: the merge's partials). Staging needs 2 groups per warp of shared memory;
   * configurations needing more than kPStageMax fall back to global reads. */
  constexpr size_t kPStageMax = 96 << 10;
  const size_t pv_smem =
      a.bits < 16 ? (size_t)kPWarps * 2 * pv_group_bytes(D * a.bits / 8, D / a.group) : 0;
  const int32_t staged = pv_smem > 0 && pv_smem <= kPStageMax;
  const size_t pv_dyn = staged ? pv_smem : 0;
  auto pv = softmax_pv_kernel<T, D, GM, PG>;
  e = cudaFuncSetAttribute(pv, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)pv_dyn);
  if (e != cudaSuccess) return e;
  e = blocks_per_sm(pv, kPWarps * 32, pv_dyn, &per_sm);
  if (e != cudaSuccess) return e;
  const int32_t pv_split =
      pick_splits(pairs, dg.max_tiles < dg.max_pv_split ? dg.max_tiles : dg.max_pv_split,
                  (int64_t)dg.num_sms * per_sm);
  pv<<<dim3((unsigned)pv_split, (unsigned)a.hkv, (unsigned)dg.B), kPWarps * 32, pv_dyn, st>>>(
      a, staged);
  return cudaPeekAtLastError();
}
template <typename T, int D, bool PG>
cudaError_t launch_decode_d(const AttnArgs& a, const DecodeGrid& dg, cudaStream_t st) {
  if (a.G <= 1) return launch_decode_g<T, D, 1, PG>(a, dg, st);
  if (a.G <= 2) return launch_decode_g<T, D, 2, PG>(a, dg, st);
  if (a.G <= 4) return launch_decode_g<T, D, 4, PG>(a, dg, st);
  return launch_decode_g<T, D, 8, PG>(a, dg, st);
}
template <typename T, bool PG>
cudaError_t launch_decode(const AttnArgs& a, int D, const DecodeGrid& dg, cudaStream_t st) {
  if (D == 64) return launch_decode_d<T, 64, PG>(a, dg, st);
  if (D == 128) return launch_decode_d<T, 128, PG>(a, dg, st);
  return launch_decode_d<T, 256, PG>(a, dg, st);
}

/* Dynamic shared memory of the general kernel for R = QT * G query rows. */
size_t general_smem(int32_t R, int32_t D) {
  return sizeof(float) *
             ((size_t)2 * R * D + 2 * kGKT * D + kGKT * (kGRC + 1) + (size_t)R * kGKT + 3 * R) +
         sizeof(int32_t) * (R + 3 * kGKT);
}

}  // namespace

/* Host copy of the budget rule, for sizing the grid (an upper bound over lengths <= S). */
static int32_t host_budget(const sals_config_t& cf, int32_t S) {
  int32_t n_cand = S - cf.n_sink - cf.n_recent;
  if (n_cand <= 0) return 0;
  int32_t k =
      cf.budget_tokens > 0 ? cf.budget_tokens : (int32_t)ceil((double)cf.budget_frac * (double)S);
  return k < n_cand ? k : n_cand;
}

int32_t most_selected(const sals_config_t& cf, int32_t S) { return host_budget(cf, S); }

/* Sinks + recent + the budget at max_tokens (the budget grows with the length), or every token
 * in dense mode. */
int64_t attend_list_max(const sals_config_t& cf) {
  if (cf.dense) return cf.max_tokens;
  return (int64_t)cf.n_sink + cf.n_recent + host_budget(cf, cf.max_tokens);
}

bool decode_kernels_fit(const sals_config_t& cf, int32_t rotary_dim, int32_t interleaved) {
  const int32_t D = cf.head_dim;
  const bool rot_ok = rotary_dim == 0 || interleaved || rotary_dim == D;
  return cf.dtype != SALS_DTYPE_FLOAT32 && (D == 64 || D == 128 || D == 256) &&
         cf.n_head_q / cf.n_head_kv <= 8 && cf.rank % 8 == 0 && cf.score_rank % 8 == 0 && rot_ok;
}

cudaError_t launch_decode_attention(const AttnArgs& a, bool paged, sals_dtype_t dtype, int32_t D,
                                    const DecodeGrid& dg, cudaStream_t st) {
  if (dtype == SALS_DTYPE_FLOAT16)
    return paged ? launch_decode<__half, true>(a, D, dg, st)
                 : launch_decode<__half, false>(a, D, dg, st);
  return paged ? launch_decode<__nv_bfloat16, true>(a, D, dg, st)
               : launch_decode<__nv_bfloat16, false>(a, D, dg, st);
}

int32_t general_rows(int32_t G) { return 32 / G > 1 ? 32 / G : 1; }

int decode_parts(int32_t n_head_kv, int num_sms) {
  int p = (2 * num_sms + n_head_kv - 1) / n_head_kv;
  if (p < 2) p = 2;
  if (p > 64) p = 64;
  return p;
}

cudaError_t launch_general_attention(const AttnArgs& a, bool paged, sals_dtype_t dtype, int32_t D,
                                     int32_t Tq, int32_t QT, dim3 grid, cudaStream_t st) {
  const size_t smem = general_smem(QT * a.G, D);
  cudaError_t e = cudaSuccess;
  SALS_DISPATCH_DTYPE(dtype, T, {
    auto general = a.key_bits < 16
                       ? (paged ? general_kernel<T, true, true> : general_kernel<T, true, false>)
                       : (paged ? general_kernel<T, false, true> : general_kernel<T, false, false>);
    e = cudaFuncSetAttribute(general, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e == cudaSuccess) {
      general<<<grid, kGThreads, smem, st>>>(a, D, Tq, QT);
      e = cudaPeekAtLastError();
    }
  });
  return e;
}

cudaError_t launch_fold(const DView& q, const int32_t* row_of, int32_t B, int32_t H, int32_t G,
                        int32_t D, int32_t dk, const float* proj, int32_t rank, int32_t score_rank,
                        void* work, int64_t work_rows, float* qlat, int* flag, cudaStream_t st) {
  const int32_t fold_k = H == 1 ? dk : D;
  const SkinnyWork w = skinny_work(work, work_rows, score_rank, H);
  const QLatStore qs{qlat, score_rank};
  const int32_t ph = H == 1 ? 0 : 1;
  auto fold = [&](auto load) {
    return skinny(B, score_rank, fold_k, H, proj, rank, (int64_t)D * rank, load, w, qs, st);
  };
  auto by_heads = [&](auto elem, auto rm) {
    typedef typename decltype(elem)::type E;
    constexpr bool RM = decltype(rm)::value;
    if (G == 1) return fold(QFoldLoad<E, 1, RM>{q, row_of, G, D, ph, flag});
    if (G <= 4) return fold(QFoldLoad<E, 4, RM>{q, row_of, G, D, ph, flag});
    if (G <= 8) return fold(QFoldLoad<E, 8, RM>{q, row_of, G, D, ph, flag});
    return fold(QFoldLoad<E, 0, RM>{q, row_of, G, D, ph, flag});
  };
  cudaError_t e = cudaSuccess;
  SALS_DISPATCH_FLOAT_ELEM(q.elem, E, {
    e = row_of ? by_heads(ElemType<E>{}, std::true_type{})
               : by_heads(ElemType<E>{}, std::false_type{});
  });
  return e;
}
}  // namespace sals_cuda

using namespace sals_cuda;

extern "C" sals_status_t sals_cuda_cache_attend(sals_cache_t* c, const sals_view_t* q,
                                                const sals_view_t* q_pos, const sals_view_t* out,
                                                void* stream) {
  DeviceGuard guard(c->cfg.device.device_id);
  cudaStream_t st = (cudaStream_t)stream;
  CacheState* s = state(c);
  const sals_config_t& cf = c->cfg;
  const int32_t B = (int32_t)q->shape[0], Tq = (int32_t)q->shape[1], D = cf.head_dim;
  if ((int64_t)B * Tq == 0) return SALS_OK;
  const bool decode = Tq == 1;
  const bool sparse = decode && !cf.dense;
  /* a sparse step checks q in the scoring query's fold (flag 2), which reads all of it */
  int* const q_flag = cf.check_finite && sparse ? s->flag + kFlagQ : nullptr;
  if (cf.check_finite)
    SALS_TRY(sparse ? cache_report_finite(c) : cache_check_finite(c, q, kFlagQ, st));
  SALS_TRY(ensure_uh(c, st));
  AttnArgs a = make_args(c, q, q_pos, out);
  a.sparse = sparse ? 1 : 0;
  const int32_t G = a.G;
  const bool fast = decode && decode_kernels_fit(cf, c->rotary_dim, c->interleaved);

  if (sparse) {
    const int32_t H = c->n_sel_heads;
    SALS_CUDA_TRY(launch_fold(dview(q), nullptr, B, H, G, D, c->dk, c->proj, cf.rank, cf.score_rank,
                              s->qpart, cf.max_batch, s->qlat, q_flag, st));
    if (cf.key_bits < 16) {
      const QuantRows kq{
          (const uint8_t*)c->lat_score, c->lat_score_scale, c->lat_score_zero, cf.max_tokens,
          c->lat_score_bytes,           cf.key_bits,        cf.key_group};
      SALS_CUDA_TRY(launch_scores(s->qlat, H, cf.score_rank, kq, c->len, cf.n_sink, cf.n_recent, B,
                                  s->scores, (int64_t)H * cf.max_tokens, s->num_sms, st));
    } else {
      DView kl;
      kl.data = c->lat_score;
      kl.elem = (int32_t)sals_dtype_elem(cf.dtype);
      kl.shape[0] = B;
      kl.shape[1] = cf.max_tokens;
      kl.shape[2] = cf.score_rank;
      kl.shape[3] = 1;
      kl.stride[0] = (int64_t)cf.max_tokens * cf.score_rank;
      kl.stride[1] = cf.score_rank;
      kl.stride[2] = 1;
      kl.stride[3] = 0;
      SALS_CUDA_TRY(launch_scores(s->qlat, H, cf.score_rank, kl, c->len, 0, cf.n_sink, cf.n_recent,
                                  B, s->scores, (int64_t)H * cf.max_tokens, s->num_sms, st));
    }
    RowSpec spec = budget_rows(cf, c->len, H, c->sel_count);
    spec.qpos = dview(q_pos);
    spec.has_qpos = true;
    spec.pos = c->pos;
    spec.pos_stride = cf.max_tokens;
    SALS_CUDA_TRY(launch_topk(s->scores, cf.max_tokens, B * H, spec, c->sel_idx,
                              (int64_t)H * cf.max_tokens, cf.max_tokens, 0, s->topk_ws, st));
  } else {
    SALS_CUDA_TRY(cudaMemsetAsync(c->sel_count, 0, (size_t)B * 4, st));
  }

  if (fast) {
    /* tiles per (sequence, head) bounded on the host from max_tokens: graph replays with
     * longer sequences stay covered, because blocks loop over tiles with a stride. */
    const int32_t max_tiles = (int32_t)cdiv(a.lmax, kRTile);
    const int32_t max_split = s->max_parts;
    const DecodeGrid dg{B, max_tiles > 0 ? max_tiles : 1, max_split > 0 ? max_split : 1,
                        s->num_sms};
    SALS_CUDA_TRY(launch_decode_attention(a, false, cf.dtype, D, dg, st));
    return SALS_OK;
  }

  int32_t QT = general_rows(G);
  if (QT > Tq) QT = Tq;
  const dim3 grid((unsigned)cdiv(Tq, QT), (unsigned)cf.n_head_kv, (unsigned)B);
  SALS_CUDA_TRY(launch_general_attention(a, false, cf.dtype, D, Tq, QT, grid, st));
  return SALS_OK;
}
