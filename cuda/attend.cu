/*
 * Attention over the cache.
 *
 * Sparse decode step (T == 1, 16-bit storage, head_dim 64/128/256, G <= 8), all on the device:
 *   fold    scoring queries q~ = U[:, :r*]^T (GQA-summed pre-RoPE query): split-K
 *           partials over many blocks (gemm.cuh skinny) and a fixed-order sum
 *   score   s_j = q~ . k~_j[:r*] over the candidates                            (score.cu)
 *   topk    radix select of the budget per sequence (or per KV head)            (select.cu)
 *   fused   per (split, KV head, sequence): gather 64 listed tokens' latent rows, rebuild their
 *           keys on tensor cores (k = U_h k~, never written to memory), add the exact keys of
 *           sink/recent tokens, RoPE in registers, logits for the G query heads, online softmax,
 *           dequantise values and accumulate P.V; one partial per warp
 *   merge   combines the partials of each (sequence, query head) into the output row.
 * Dense decode (config.dense, T == 1) uses the same fused kernel over every token.
 * Everything else (T > 1, float32 storage, other head dims) runs the general kernel below,
 * which rebuilds keys tile by tile in shared memory on CUDA cores: simpler, exact, slower.
 * No host synchronisation and no allocation unless check_finite is set.
 */
#include <math.h>

#include <type_traits>

#include "common.cuh"
#include "gemm.cuh"

namespace sals_cuda {
sals_status_t ensure_uh(sals_cache_t* c, cudaStream_t st);
sals_status_t cache_check_finite(sals_cache_t* c, const sals_view_t* a, const sals_view_t* b,
                                 cudaStream_t st);

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

struct AttnArgs {
  /* cache */
  const void* lat_score;
  const void* lat_rest;
  const void* val;
  const uint16_t* val_scale;
  const uint16_t* val_zero;
  const void* sink_k;
  const void* sink_v;
  const void* recent_k;
  const void* recent_v;
  const int32_t* pos;
  const int32_t* len;
  const int32_t* sel_idx;
  const int32_t* sel_count;
  const void* uh;      /* storage-type projection (fused kernel) */
  const float* proj;   /* float32 projection (general kernel) */
  const float* inv_freq;
  int32_t n_sink, n_recent, max_tokens, rank, rs, dk, hkv, hq, G, bits, group, n_groups;
  int64_t val_row_bytes;
  int32_t n_sel_heads, sparse, rotary_dim, inter;
  float att, scale;
  /* call */
  DView q, qpos, out;
  float* part_o;
  float* part_ml;
  int32_t max_parts;
};

/* N consecutive 16-bit elements as floats, one vector load (p is N-element aligned). */
template <typename T, int N>
__device__ __forceinline__ void load_n(const T* p, float* dst) {
  if constexpr (N == 1) {
    dst[0] = to_f<T>(p[0]);
  } else {
    using V = typename std::conditional<N == 2, uint32_t,
                                        typename std::conditional<N == 4, uint2, uint4>::type>::type;
    const V u = *reinterpret_cast<const V*>(p);
    const T* h = reinterpret_cast<const T*>(&u);
#pragma unroll
    for (int e = 0; e < N; ++e) dst[e] = to_f<T>(h[e]);
  }
}

/* Value of token `slot` (kind as above) at dims [e0, e0 + N) of KV head h, as floats; e0 is a
 * multiple of N. N channels of one quantisation group come from one load of their codes. */
template <typename T, int N>
__device__ __forceinline__ void load_value(const AttnArgs& a, int32_t b, int32_t h, int32_t D,
                                           int32_t slot, int32_t kind, int32_t e0, float* dst) {
  const int64_t col = (int64_t)h * D + e0;
  if (kind == 1 || kind == 2) {
    const T* p = kind == 1 ? (const T*)a.sink_v + ((int64_t)b * a.n_sink + slot) * a.dk
                           : (const T*)a.recent_v + ((int64_t)b * a.n_recent + slot % a.n_recent) * a.dk;
    load_n<T, N>(p + col, dst);
    return;
  }
  const int64_t row = (int64_t)b * a.max_tokens + slot;
  if (a.bits == 16) {
    load_n<T, N>((const T*)a.val + row * a.dk + col, dst);
    return;
  }
  const uint8_t* p = (const uint8_t*)a.val + row * a.val_row_bytes;
  const uint16_t* sc = a.val_scale + row * a.n_groups;
  const uint16_t* zr = a.val_zero + row * a.n_groups;
  const uint32_t mask = (1u << a.bits) - 1u;
  if (N > 1 && a.group % N == 0) {
    /* N * bits is 4, 8, 16, 32 or 64 bits, aligned to its own size */
    const int64_t bit0 = col * a.bits;
    const uint8_t* q = p + (bit0 >> 3);
    const int tb = N * a.bits;
    uint64_t w;
    if (tb <= 8) w = (uint64_t)(*q >> (bit0 & 7));
    else if (tb == 16) w = *reinterpret_cast<const uint16_t*>(q);
    else if (tb == 32) w = *reinterpret_cast<const uint32_t*>(q);
    else w = *reinterpret_cast<const uint64_t*>(q);
    const int64_t g = col / a.group;
    const float z = half_bits_to_f(zr[g]), s = half_bits_to_f(sc[g]);
#pragma unroll
    for (int e = 0; e < N; ++e) dst[e] = z + (float)((uint32_t)(w >> (e * a.bits)) & mask) * s;
    return;
  }
  for (int32_t e = 0; e < N; ++e) {
    const int64_t ch = col + e;
    const int64_t bit = ch * a.bits;
    const uint32_t code = (p[bit >> 3] >> (bit & 7)) & mask;
    const int64_t g = ch / a.group;
    dst[e] = half_bits_to_f(zr[g]) + (float)code * half_bits_to_f(sc[g]);
  }
}

/* Dequantised value of tile row `row` at dims [e0, e0 + N) from the codes, scales and zeros
 * staged in shared memory (codes: cb = D * bits / 8 bytes per row; ngh = D / group scales and
 * zeros per row); the same arithmetic as load_value. */
template <int N>
__device__ __forceinline__ void load_value_staged(const AttnArgs& a, const uint8_t* codes,
                                                  const uint16_t* sc, const uint16_t* zr,
                                                  int32_t cb, int32_t ngh, int32_t row,
                                                  int32_t e0, float* dst) {
  const uint8_t* p = codes + row * cb;
  sc += row * ngh;
  zr += row * ngh;
  const uint32_t mask = (1u << a.bits) - 1u;
  if (N > 1 && a.group % N == 0) {
    const int32_t bit0 = e0 * a.bits;
    const uint8_t* q = p + (bit0 >> 3);
    const int tb = N * a.bits;
    uint64_t w;
    if (tb <= 8) w = (uint64_t)(*q >> (bit0 & 7));
    else if (tb == 16) w = *reinterpret_cast<const uint16_t*>(q);
    else if (tb == 32) w = *reinterpret_cast<const uint32_t*>(q);
    else w = *reinterpret_cast<const uint64_t*>(q);
    const int32_t g = e0 / a.group;
    const float z = half_bits_to_f(zr[g]), s = half_bits_to_f(sc[g]);
#pragma unroll
    for (int e = 0; e < N; ++e) dst[e] = z + (float)((uint32_t)(w >> (e * a.bits)) & mask) * s;
    return;
  }
  for (int32_t e = 0; e < N; ++e) {
    const int32_t bit = (e0 + e) * a.bits;
    const uint32_t code = (p[bit >> 3] >> (bit & 7)) & mask;
    const int32_t g = (e0 + e) / a.group;
    dst[e] = half_bits_to_f(zr[g]) + (float)code * half_bits_to_f(sc[g]);
  }
}

__device__ __forceinline__ void cp_async4(void* dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(smem_u32(dst)), "l"(src));
}

/* ---- scoring query ------------------------------------------------------------------------ */
/* Row b, input coordinate k of selection head hs: the GQA-summed pre-RoPE query at Dk row
 * row0 + k, with row0 = 0 (shared selection: all heads) or hs * D (per KV head). */
struct QFoldLoad {
  DView q;
  int32_t G, D, per_head;
  __device__ float operator()(int64_t b, int64_t k, int32_t hs) const {
    const int32_t row = (per_head ? hs * D : 0) + (int32_t)k;
    const int32_t kvh = row / D, e = row % D;
    float s = 0.f;
    for (int32_t g = 0; g < G; ++g) s += load_elem(q.data, q.elem, off4(q, b, 0, kvh * G + g, e));
    return s;
  }
};
/* out[i] = sum over splits of part[z * n + i], in a fixed order (deterministic). */
__global__ void sum_splits_kernel(const float* __restrict__ part, int32_t splits, int64_t n,
                                  float* __restrict__ out) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    float s = 0.f;
    for (int32_t z = 0; z < splits; ++z) s += part[z * n + i];
    out[i] = s;
  }
}

/* ---- fused gather + rebuild + RoPE + attention (tensor cores) ----------------------------- */
/* 8 warps x 16 tokens: every U_h chunk staged in shared memory feeds 128 tokens; 64 latent
 * coordinates per pipeline stage (rows padded by 16 bytes: conflict-free ldmatrix).
 * With quantised values, the codes, scales and zeros of the tile's rebuilt tokens are copied
 * into shared memory (cp.async) while the keys are rebuilt, so P.V no longer waits on
 * dependent global gathers (the kernel's largest stall). */
constexpr int kFWarps = 8, kFTile = 16 * kFWarps, kFKC = 64, kFStride = kFKC + 8;

template <typename T, int D, int GM>
__global__ void __launch_bounds__(kFWarps * 32)
    fused_kernel(AttnArgs a) {
  constexpr int W = D < 128 ? D : 128;   /* columns per pass */
  constexpr int NPASS = D / W;
  constexpr int NT = W / 8;              /* n-tiles per warp */
  constexpr int DPL = D / 32;            /* value dims per lane */
  /* dynamic: two stages of latent rows [kFTile][kFKC] and U_h rows [W][kFKC] (padded rows);
   * then, when bits < 16, the tile's value codes [kFTile][cb] and scales, zeros [kFTile][ngh] */
  extern __shared__ __align__(16) unsigned char fused_smem[];
  T* const as0 = reinterpret_cast<T*>(fused_smem);
  T* const bs0 = as0 + 2 * kFTile * kFStride;
  const bool staged = a.bits < 16;
  const int32_t cb = staged ? D * a.bits / 8 : 0;   /* a multiple of 16 bytes */
  const int32_t ngh = D / a.group;
  uint8_t* const v_codes = reinterpret_cast<uint8_t*>(bs0 + 2 * W * kFStride);
  uint16_t* const v_sc = reinterpret_cast<uint16_t*>(v_codes + kFTile * cb);
  uint16_t* const v_zr = v_sc + kFTile * ngh;
  auto As = [&](int buf) { return as0 + buf * (kFTile * kFStride); };
  auto Bs = [&](int buf) { return bs0 + buf * (W * kFStride); };
  __shared__ float qs[GM][D];
  __shared__ int32_t t_slot[kFTile], t_kind[kFTile], t_pos[kFTile];
  __shared__ int32_t s_any_rebuild;

  const int32_t b = blockIdx.z, h = blockIdx.y, split = blockIdx.x, nsplit = gridDim.x;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t4 = lane & 3;
  const int32_t G = a.G;
  const int32_t qp = load_i32(a.qpos, off2(a.qpos, b, 0));
  if (qp < 0) return; /* padded query: merge writes zeros */

  /* rotated, scaled queries (log2 domain for exp2) */
  for (int i = tid; i < GM * D; i += blockDim.x) {
    const int gq = i / D, e = i % D;
    float x = 0.f;
    if (gq < G) {
      const int64_t o = off4(a.q, b, 0, h * G + gq, 0);
      x = load_elem(a.q.data, a.q.elem, o + e);
      const int32_t half = a.rotary_dim / 2;
      int32_t pi = -1, ea = 0, eb = 0;
      if (a.inter) {
        if (e < a.rotary_dim) { pi = e / 2; ea = e & ~1; eb = ea + 1; }
      } else if (e < a.rotary_dim) {
        pi = e < half ? e : e - half; ea = pi; eb = pi + half;
      }
      if (pi >= 0) {
        float cs, sn;
        rope_cs(qp, a.inv_freq[pi], a.att, &cs, &sn);
        const float xa = load_elem(a.q.data, a.q.elem, o + ea);
        const float xb = load_elem(a.q.data, a.q.elem, o + eb);
        x = (e == ea) ? xa * cs - xb * sn : xb * cs + xa * sn;
      }
      x *= a.scale * kLog2e;
    }
    qs[gq][e] = x;
  }

  const int32_t S = a.len[b];
  const int32_t hs = a.n_sel_heads == 1 ? 0 : h;
  const int32_t* sel = a.sparse ? a.sel_idx + ((int64_t)b * a.n_sel_heads + hs) * a.max_tokens : nullptr;
  const int32_t n_sel = a.sparse ? a.sel_count[b] : (S - a.n_sink - a.n_recent > 0 ? S - a.n_sink - a.n_recent : 0);
  const TokList L = tok_list(S, a.n_sink, a.n_recent, n_sel);
  const int32_t n_tiles = (L.total + kFTile - 1) / kFTile;

  float m_run[GM], l_run[GM], o_acc[GM][DPL];
#pragma unroll
  for (int gq = 0; gq < GM; ++gq) {
    m_run[gq] = -INFINITY;
    l_run[gq] = 0.f;
#pragma unroll
    for (int e = 0; e < DPL; ++e) o_acc[gq][e] = 0.f;
  }

  const T* lat_s = (const T*)a.lat_score;
  const T* lat_r = (const T*)a.lat_rest;
  const T* uh = (const T*)a.uh;
  const int32_t rr = a.rank - a.rs;

  auto dim_of = [&](int c, int p) -> int {
    if (NPASS == 1) return c;
    return c < 64 ? p * 64 + c : 128 + p * 64 + (c - 64);
  };

  for (int32_t tile = split; tile < n_tiles; tile += nsplit) {
    __syncthreads(); /* previous tile's smem reads are done */
    if (tid == 0) s_any_rebuild = 0;
    __syncthreads();
    if (tid < kFTile) {
      const int32_t i = tile * kFTile + tid;
      int32_t kind = -1, slot = 0, p = 0;
      if (i < L.total) {
        slot = tok_slot(L, i, sel, a.n_sink, &kind);
        p = a.pos[(int64_t)b * a.max_tokens + slot];
        if (kind == 0) s_any_rebuild = 1;
      }
      t_slot[tid] = slot;
      t_kind[tid] = kind;
      t_pos[tid] = p;
    }
    __syncthreads();
    const bool any_rebuild = s_any_rebuild != 0;
    if (staged && any_rebuild) {
      /* 16-byte pieces of codes (cb and the row offsets are multiples of 16); scales and zeros
       * in 4-byte words when ngh is even (then every offset is even), else one by one */
      const int32_t pieces = cb / 16;
      for (int c = tid; c < kFTile * pieces; c += blockDim.x) {
        const int row = c / pieces, pc = c % pieces;
        if (t_kind[row] != 0) continue;
        const int64_t srow = (int64_t)b * a.max_tokens + t_slot[row];
        cp_async16(v_codes + row * cb + pc * 16,
                   (const uint8_t*)a.val + srow * a.val_row_bytes + (int64_t)h * cb + pc * 16, 16);
      }
      if (ngh % 2 == 0) {
        const int32_t words = ngh / 2;
        for (int c = tid; c < kFTile * words; c += blockDim.x) {
          const int row = c / words, wd = c % words;
          if (t_kind[row] != 0) continue;
          const int64_t o = ((int64_t)b * a.max_tokens + t_slot[row]) * a.n_groups +
                            (int64_t)h * ngh + 2 * wd;
          cp_async4(v_sc + row * ngh + 2 * wd, a.val_scale + o);
          cp_async4(v_zr + row * ngh + 2 * wd, a.val_zero + o);
        }
      } else {
        for (int c = tid; c < kFTile * ngh; c += blockDim.x) {
          const int row = c / ngh, gi = c % ngh;
          if (t_kind[row] != 0) continue;
          const int64_t o = ((int64_t)b * a.max_tokens + t_slot[row]) * a.n_groups +
                            (int64_t)h * ngh + gi;
          v_sc[row * ngh + gi] = a.val_scale[o];
          v_zr[row * ngh + gi] = a.val_zero[o];
        }
      }
      /* committed before the first rebuild stage: the rebuild loop's first wait covers it,
       * and its last wait<0> + barrier makes the staged values visible to P.V */
      cp_async_commit();
    }

    float logit[GM][2];
#pragma unroll
    for (int gq = 0; gq < GM; ++gq) logit[gq][0] = logit[gq][1] = 0.f;

#pragma unroll
    for (int pass = 0; pass < NPASS; ++pass) {
      float acc[NT][4];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;

      if (any_rebuild) {
        auto stage = [&](int buf, int32_t kc) {
          /* 16-byte pieces; a piece lies in one of the two latent arrays (rs % 8 == 0) and
           * pieces past the rank are zero-filled, so any rank that is a multiple of 8 works */
          constexpr int kPieces = kFKC / 8;
          for (int c = tid; c < kFTile * kPieces; c += blockDim.x) {
            const int row = c / kPieces, ch = (c % kPieces) * 8;
            const int32_t col = kc + ch;
            const bool live = t_kind[row] == 0 && col < a.rank;
            const int64_t srow = (int64_t)b * a.max_tokens + t_slot[row];
            const T* src = col < a.rs ? lat_s + srow * a.rs + col : lat_r + srow * rr + (col - a.rs);
            cp_async16(&As(buf)[row * kFStride + ch], live ? (const void*)src : (const void*)lat_s,
                       live ? 16 : 0);
          }
          for (int c = tid; c < W * kPieces; c += blockDim.x) {
            const int n = c / kPieces, ch = (c % kPieces) * 8;
            const bool live = kc + ch < a.rank;
            const T* src = uh + ((int64_t)h * D + dim_of(n, pass)) * a.rank + kc + ch;
            cp_async16(&Bs(buf)[n * kFStride + ch], live ? (const void*)src : (const void*)uh,
                       live ? 16 : 0);
          }
          cp_async_commit();
        };
        stage(0, 0);
        int buf = 0;
        for (int32_t kc = 0; kc < a.rank; kc += kFKC) {
          const bool more = kc + kFKC < a.rank;
          if (more) stage(buf ^ 1, kc + kFKC);
          if (more) cp_async_wait<1>(); else cp_async_wait<0>();
          __syncthreads();
#pragma unroll
          for (int ks = 0; ks < kFKC; ks += 16) {
            uint32_t af[4];
            ldmatrix_x4(af, &As(buf)[(warp * 16 + (lane % 16)) * kFStride + ks + (lane / 16) * 8]);
#pragma unroll
            for (int np = 0; np < NT / 2; ++np) {
              uint32_t bf[4];
              ldmatrix_x4(bf, &Bs(buf)[(np * 16 + (lane % 8) + (lane / 16) * 8) * kFStride + ks +
                                       ((lane / 8) % 2) * 8]);
              mma16816<T>(acc[2 * np], af, &bf[0]);
              mma16816<T>(acc[2 * np + 1], af, &bf[2]);
            }
          }
          __syncthreads();
          buf ^= 1;
        }
      }

      /* exact keys of window tokens, then RoPE at each token's own position */
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const int row = warp * 16 + g + hr * 8;
        const int kind = t_kind[row];
        const int32_t p = t_pos[row];
        if (kind == 1 || kind == 2) {
          const int32_t slot = t_slot[row];
          const T* kp = kind == 1
                            ? (const T*)a.sink_k + ((int64_t)b * a.n_sink + slot) * a.dk
                            : (const T*)a.recent_k + ((int64_t)b * a.n_recent + slot % a.n_recent) * a.dk;
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
                rope_cs(p, a.inv_freq[dm / 2], a.att, &cs, &sn);
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
                rope_cs(p, a.inv_freq[dm], a.att, &cs, &sn);
                const float xa = acc[nt][hr * 2 + j], xb = acc[nt + NT / 2][hr * 2 + j];
                acc[nt][hr * 2 + j] = xa * cs - xb * sn;
                acc[nt + NT / 2][hr * 2 + j] = xb * cs + xa * sn;
              }
            }
          }
        }
      }

      /* partial logits of this pass */
#pragma unroll
      for (int gq = 0; gq < GM; ++gq) {
        if (gq < G) {
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            const int c = nt * 8 + 2 * t4;
            const float q0 = qs[gq][dim_of(c, pass)], q1 = qs[gq][dim_of(c + 1, pass)];
            logit[gq][0] += acc[nt][0] * q0 + acc[nt][1] * q1;
            logit[gq][1] += acc[nt][2] * q0 + acc[nt][3] * q1;
          }
        }
      }
    }

    /* complete logits across the quad, mask, online softmax, P.V */
    bool vis[2];
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int row = warp * 16 + g + hr * 8;
      vis[hr] = t_kind[row] >= 0 && t_pos[row] <= qp;
    }
#pragma unroll
    for (int gq = 0; gq < GM; ++gq) {
      if (gq >= G) continue;
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        float x = logit[gq][hr];
        x += __shfl_xor_sync(0xffffffffu, x, 1);
        x += __shfl_xor_sync(0xffffffffu, x, 2);
        logit[gq][hr] = vis[hr] ? x : -INFINITY;
      }
      float mx = fmaxf(logit[gq][0], logit[gq][1]);
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 8));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
      const float m_new = fmaxf(m_run[gq], mx);
      if (m_new == -INFINITY) {
        logit[gq][0] = logit[gq][1] = 0.f;
        continue;
      }
      const float alpha = exp2f(m_run[gq] - m_new);
      const float p0 = exp2f(logit[gq][0] - m_new), p1 = exp2f(logit[gq][1] - m_new);
      float ps = p0 + p1;
      ps += __shfl_xor_sync(0xffffffffu, ps, 4);
      ps += __shfl_xor_sync(0xffffffffu, ps, 8);
      ps += __shfl_xor_sync(0xffffffffu, ps, 16);
      /* the xor 4/8/16 reduction spans the 8 row groups of one quad position: each of the
       * 16 rows is counted once */
      l_run[gq] = l_run[gq] * alpha + ps;
      m_run[gq] = m_new;
#pragma unroll
      for (int e = 0; e < DPL; ++e) o_acc[gq][e] *= alpha;
      logit[gq][0] = p0;
      logit[gq][1] = p1;
    }
#pragma unroll 4
    for (int r16 = 0; r16 < 16; ++r16) {
      const int row = warp * 16 + r16;
      const int kind = t_kind[row];
      if (kind < 0) continue;
      float v[DPL];
      if (staged && kind == 0)
        load_value_staged<DPL>(a, v_codes, v_sc, v_zr, cb, ngh, row, lane * DPL, v);
      else
        load_value<T, DPL>(a, b, h, D, t_slot[row], kind, lane * DPL, v);
      const int src = (r16 & 7) * 4;
#pragma unroll
      for (int gq = 0; gq < GM; ++gq) {
        if (gq >= G) continue;
        const float p = __shfl_sync(0xffffffffu, r16 < 8 ? logit[gq][0] : logit[gq][1], src);
#pragma unroll
        for (int e = 0; e < DPL; ++e) o_acc[gq][e] += p * v[e];
      }
    }
  }

  const int32_t part = split * kFWarps + warp;
#pragma unroll
  for (int gq = 0; gq < GM; ++gq) {
    if (gq >= G) continue;
    const int64_t ph = ((int64_t)b * a.hq + h * G + gq) * a.max_parts + part;
#pragma unroll
    for (int e = 0; e < DPL; ++e) a.part_o[ph * D + lane * DPL + e] = o_acc[gq][e];
    if (lane == 0) {
      a.part_ml[ph * 2] = m_run[gq];
      a.part_ml[ph * 2 + 1] = l_run[gq];
    }
  }
}

__global__ void merge_kernel(AttnArgs a, int32_t D, int32_t parts) {
  const int32_t b = blockIdx.x / a.hq, hq = blockIdx.x % a.hq;
  const int32_t qp = load_i32(a.qpos, off2(a.qpos, b, 0));
  const int64_t base = ((int64_t)b * a.hq + hq) * a.max_parts;
  float M = -INFINITY;
  if (qp >= 0)
    for (int32_t p = 0; p < parts; ++p)
      if (a.part_ml[(base + p) * 2 + 1] > 0.f) M = fmaxf(M, a.part_ml[(base + p) * 2]);
  float L = 0.f;
  if (M > -INFINITY)
    for (int32_t p = 0; p < parts; ++p) {
      const float l = a.part_ml[(base + p) * 2 + 1];
      if (l > 0.f) L += l * exp2f(a.part_ml[(base + p) * 2] - M);
    }
  for (int32_t e = threadIdx.x; e < D; e += blockDim.x) {
    float o = 0.f;
    if (L > 0.f) {
      for (int32_t p = 0; p < parts; ++p) {
        const float l = a.part_ml[(base + p) * 2 + 1];
        if (l > 0.f) o += a.part_o[(base + p) * D + e] * exp2f(a.part_ml[(base + p) * 2] - M);
      }
      o /= L;
    }
    store_elem((void*)a.out.data, a.out.elem, off4(a.out, b, 0, hq, e), o);
  }
}

/* ---- general kernel: any dtype, head dim, T; keys rebuilt in shared memory ------------ */
constexpr int kGThreads = 256, kGKT = 32, kGRC = 64;

template <typename T>
__global__ void __launch_bounds__(kGThreads) general_kernel(AttnArgs a, int32_t D, int32_t Tq,
                                                            int32_t QT) {
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

  const int32_t b = blockIdx.z, h = blockIdx.y, t0 = blockIdx.x * QT;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int32_t G = a.G;
  const int32_t half = a.rotary_dim / 2;

  for (int i = tid; i < R; i += blockDim.x) {
    const int32_t tq = i / G;
    qpos[i] = t0 + tq < Tq ? load_i32(a.qpos, off2(a.qpos, b, t0 + tq)) : -1;
    mrow[i] = -INFINITY;
    lrow[i] = 0.f;
  }
  __syncthreads();
  for (int i = tid; i < R * D; i += blockDim.x) {
    const int32_t row = i / D, e = i % D, tq = row / G, gq = row % G;
    float x = 0.f;
    if (qpos[row] >= 0) {
      const int64_t o = off4(a.q, b, t0 + tq, h * G + gq, 0);
      x = load_elem(a.q.data, a.q.elem, o + e);
      int32_t pi = -1, ea = 0, eb = 0;
      if (a.inter) {
        if (e < a.rotary_dim) { pi = e / 2; ea = e & ~1; eb = ea + 1; }
      } else if (e < a.rotary_dim) {
        pi = e < half ? e : e - half; ea = pi; eb = pi + half;
      }
      if (pi >= 0) {
        float cs, sn;
        rope_cs(qpos[row], a.inv_freq[pi], a.att, &cs, &sn);
        const float xa = load_elem(a.q.data, a.q.elem, o + ea);
        const float xb = load_elem(a.q.data, a.q.elem, o + eb);
        x = (e == ea) ? xa * cs - xb * sn : xb * cs + xa * sn;
      }
      x *= a.scale * kLog2e;
    }
    Q[i] = x;
    O[i] = 0.f;
  }

  const int32_t S = a.len[b];
  const int32_t hs = a.n_sel_heads == 1 ? 0 : h;
  const bool sparse = a.sparse != 0;
  const int32_t* sel = sparse ? a.sel_idx + ((int64_t)b * a.n_sel_heads + hs) * a.max_tokens : nullptr;
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
      if (i < L.total) {
        slot = tok_slot(L, i, sel, a.n_sink, &kind);
        p = a.pos[(int64_t)b * a.max_tokens + slot];
      }
      kslot[tid] = slot;
      kkind[tid] = kind;
      kpos[tid] = p;
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
          const int64_t row = (int64_t)b * a.max_tokens + kslot[j];
          x = c < a.rs ? to_f<T>(lat_s[row * a.rs + c]) : to_f<T>(lat_r[row * rr + c - a.rs]);
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
      if (kind == 1 || kind == 2) {
        const T* kp = kind == 1 ? (const T*)a.sink_k + ((int64_t)b * a.n_sink + kslot[j]) * a.dk
                                : (const T*)a.recent_k + ((int64_t)b * a.n_recent + kslot[j] % a.n_recent) * a.dk;
        K[i] = to_f<T>(kp[(int64_t)h * D + e]);
      }
      float v = 0.f;
      if (kind >= 0) load_value<T, 1>(a, b, h, D, kslot[j], kind, e, &v);
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
    if (t0 + tq >= Tq) continue;
    const float l = lrow[row];
    const float o = (qpos[row] >= 0 && l > 0.f) ? O[i] / l : 0.f;
    store_elem((void*)a.out.data, a.out.elem, off4(a.out, b, t0 + tq, h * G + gq, e), o);
  }
}

AttnArgs make_args(const sals_cache_t* c, const sals_view_t* q, const sals_view_t* q_pos,
                   const sals_view_t* out) {
  AttnArgs a;
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
  a.n_sel_heads = c->n_sel_heads;
  a.rotary_dim = c->rotary_dim;
  a.inter = c->interleaved;
  a.att = c->attention_scaling;
  a.scale = c->scale;
  a.q = dview(q);
  a.qpos = dview(q_pos);
  a.out = dview(out);
  a.part_o = s->part_o;
  a.part_ml = s->part_ml;
  a.max_parts = s->max_parts;
  a.sparse = 0;
  return a;
}

/*
 * Splits of each (sequence, KV head) tile list. Blocks run in waves of `slots` (blocks resident
 * on the device at once); a wave lasts about the tiles of one block plus a fixed cost (query
 * rotation, partial write, share of the merge: ~1/4 tile). The split minimising waves x
 * (tiles per block + 1/4) avoids a last wave that leaves most of the device idle; ties go to
 * fewer partials.
 */
int32_t pick_splits(int64_t pairs, int32_t max_tiles, int32_t max_split, int64_t slots) {
  const int32_t hi = max_tiles < max_split ? max_tiles : max_split;
  int32_t best = 1;
  double best_cost = INFINITY;
  for (int32_t ns = 1; ns <= hi; ++ns) {
    const double cost = (double)cdiv(ns * pairs, slots) * ((double)cdiv(max_tiles, ns) + 0.25);
    if (cost < best_cost) {
      best = ns;
      best_cost = cost;
    }
  }
  return best;
}

/* Launches the fused kernel over B x n_head_kv tile lists of at most max_tiles tiles, split
 * in at most max_split parts (pick_splits); *nsplit gets the split used. */
struct FusedGrid {
  int32_t B, max_tiles, max_split, num_sms;
};
template <typename T, int D, int GM>
cudaError_t launch_fused_g(const AttnArgs& a, const FusedGrid& fg, int32_t* nsplit,
                           cudaStream_t st) {
  constexpr int W = D < 128 ? D : 128;
  const size_t staged = a.bits < 16 ? (size_t)kFTile * (D * a.bits / 8 + 4 * (D / a.group)) : 0;
  const size_t smem = sizeof(T) * 2 * (kFTile + W) * kFStride + staged;
  cudaError_t e = cudaFuncSetAttribute(fused_kernel<T, D, GM>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (e != cudaSuccess) return e;
  int per_sm = 0;
  e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, fused_kernel<T, D, GM>,
                                                    kFWarps * 32, smem);
  if (e != cudaSuccess) return e;
  const int64_t pairs = (int64_t)fg.B * a.hkv;
  *nsplit = pick_splits(pairs, fg.max_tiles, fg.max_split,
                        (int64_t)fg.num_sms * (per_sm > 0 ? per_sm : 1));
  dim3 grid((unsigned)*nsplit, (unsigned)a.hkv, (unsigned)fg.B);
  fused_kernel<T, D, GM><<<grid, kFWarps * 32, smem, st>>>(a);
  return cudaPeekAtLastError();
}
template <typename T, int D>
cudaError_t launch_fused_d(const AttnArgs& a, const FusedGrid& fg, int32_t* ns, cudaStream_t st) {
  if (a.G <= 1) return launch_fused_g<T, D, 1>(a, fg, ns, st);
  if (a.G <= 2) return launch_fused_g<T, D, 2>(a, fg, ns, st);
  if (a.G <= 4) return launch_fused_g<T, D, 4>(a, fg, ns, st);
  return launch_fused_g<T, D, 8>(a, fg, ns, st);
}
template <typename T>
cudaError_t launch_fused(const AttnArgs& a, int D, const FusedGrid& fg, int32_t* ns,
                         cudaStream_t st) {
  if (D == 64) return launch_fused_d<T, 64>(a, fg, ns, st);
  if (D == 128) return launch_fused_d<T, 128>(a, fg, ns, st);
  return launch_fused_d<T, 256>(a, fg, ns, st);
}

/* Host copy of the budget rule, for sizing the grid (an upper bound over lengths <= S). */
int32_t host_budget(const sals_config_t& cf, int32_t S) {
  int32_t n_cand = S - cf.n_sink - cf.n_recent;
  if (n_cand <= 0) return 0;
  int32_t k = cf.budget_tokens > 0 ? cf.budget_tokens
                                   : (int32_t)ceil((double)cf.budget_frac * (double)S);
  return k < n_cand ? k : n_cand;
}

}  // namespace
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
  if (cf.check_finite) SALS_STATUS_TRY(cache_check_finite(c, q, nullptr, st));
  SALS_STATUS_TRY(ensure_uh(c, st));
  AttnArgs a = make_args(c, q, q_pos, out);
  const bool decode = Tq == 1;
  const bool sparse = decode && !cf.dense;
  a.sparse = sparse ? 1 : 0;
  const int32_t G = a.G;
  const int32_t rot = c->rotary_dim;
  const bool rot_ok = rot == 0 || c->interleaved || rot == D;
  const bool fast = decode && cf.dtype != SALS_DTYPE_FLOAT32 && (D == 64 || D == 128 || D == 256) &&
                    G <= 8 && cf.rank % 8 == 0 && cf.score_rank % 8 == 0 && rot_ok;

  if (sparse) {
    const int32_t H = c->n_sel_heads;
    const int32_t fold_k = H == 1 ? c->dk : D;
    SALS_CUDA_TRY(skinny(B, cf.score_rank, fold_k, H, c->proj, cf.rank, (int64_t)D * cf.rank,
                         QFoldLoad{dview(q), G, D, H == 1 ? 0 : 1}, s->qpart, st));
    const int64_t nq = (int64_t)B * H * cf.score_rank;
    sum_splits_kernel<<<(unsigned)cdiv(nq, 256), 256, 0, st>>>(s->qpart, skinny_splits(fold_k),
                                                               nq, s->qlat);
    SALS_CUDA_LAUNCHED("sum_splits");
    DView kl;
    kl.data = c->lat_score;
    kl.elem = (int32_t)(cf.dtype == SALS_DTYPE_FLOAT32 ? SALS_ELEM_F32
                        : cf.dtype == SALS_DTYPE_FLOAT16 ? SALS_ELEM_F16 : SALS_ELEM_BF16);
    kl.shape[0] = B; kl.shape[1] = cf.max_tokens; kl.shape[2] = cf.score_rank; kl.shape[3] = 1;
    kl.stride[0] = (int64_t)cf.max_tokens * cf.score_rank; kl.stride[1] = cf.score_rank;
    kl.stride[2] = 1; kl.stride[3] = 0;
    SALS_CUDA_TRY(launch_scores(s->qlat, H, cf.score_rank, kl, c->len, 0, cf.n_sink, cf.n_recent,
                                B, s->scores, (int64_t)H * cf.max_tokens, s->num_sms, st));
    RowSpec spec;
    spec.lengths = c->len;
    spec.fixed_len = 0;
    spec.rows_per_seq = H;
    spec.n_sink = cf.n_sink;
    spec.n_recent = cf.n_recent;
    spec.budget_tokens = cf.budget_tokens;
    spec.budget_frac = cf.budget_frac;
    spec.count = c->sel_count;
    spec.qpos = dview(q_pos);
    spec.has_qpos = true;
    spec.pos = c->pos;
    spec.pos_stride = cf.max_tokens;
    SALS_CUDA_TRY(launch_topk(s->scores, cf.max_tokens, B * H, spec, c->sel_idx,
                              (int64_t)H * cf.max_tokens, cf.max_tokens, 0, st));
  } else {
    SALS_CUDA_TRY(cudaMemsetAsync(c->sel_count, 0, (size_t)B * 4, st));
  }

  if (fast) {
    /* tiles per (sequence, head) bounded on the host from max_tokens: graph replays with
     * longer sequences stay covered, because blocks loop over tiles with a stride. */
    const int32_t max_list = cf.n_sink + cf.n_recent +
                             (sparse ? host_budget(cf, cf.max_tokens) : cf.max_tokens);
    const int32_t max_tiles = (int32_t)cdiv(max_list, kFTile);
    const int32_t max_split = s->max_parts / kFWarps;
    const FusedGrid fg{B, max_tiles > 0 ? max_tiles : 1, max_split > 0 ? max_split : 1,
                       s->num_sms};
    int32_t nsplit = 1;
    if (cf.dtype == SALS_DTYPE_FLOAT16)
      SALS_CUDA_TRY(launch_fused<__half>(a, D, fg, &nsplit, st));
    else
      SALS_CUDA_TRY(launch_fused<__nv_bfloat16>(a, D, fg, &nsplit, st));
    merge_kernel<<<(unsigned)(B * cf.n_head_q), 128, 0, st>>>(a, D, nsplit * kFWarps);
    SALS_CUDA_LAUNCHED("merge");
    return SALS_OK;
  }

  int32_t QT = 32 / G;
  if (QT < 1) QT = 1;
  if (QT > Tq) QT = Tq;
  const int32_t R = QT * G;
  const size_t smem = sizeof(float) * ((size_t)2 * R * D + 2 * kGKT * D + kGKT * (kGRC + 1) +
                                       (size_t)R * kGKT + 3 * R) +
                      sizeof(int32_t) * (R + 3 * kGKT);
  dim3 grid((unsigned)cdiv(Tq, QT), (unsigned)cf.n_head_kv, (unsigned)B);
  SALS_DISPATCH_DTYPE(cf.dtype, T, {
    SALS_CUDA_TRY(cudaFuncSetAttribute(general_kernel<T>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    general_kernel<T><<<grid, kGThreads, smem, st>>>(a, D, Tq, QT);
  });
  SALS_CUDA_LAUNCHED("general attention");
  return SALS_OK;
}
