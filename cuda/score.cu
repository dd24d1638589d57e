/*
 * Scoring pass: the one pass that touches every candidate token. Memory-bound, so each group
 * of L lanes reads one token's leading R latent coordinates with 16-byte loads (L = R/8
 * rounded up to a power of two, at most 32) and several tokens are in flight per warp.
 * Quantised latent keys go through the same loops (score_codes_*), each lane dequantising its
 * 8 coordinates from one code load. Each kernel reads token j of sequence b through a row
 * functor: the cache's rows are strided arrays, paged storage's are slots named by the block
 * table (the same loops, another instantiation).
 */
#include "common.cuh"

namespace sals_cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__device__ __forceinline__ void load8(const T* p, float* f) {
  uint4 u = *reinterpret_cast<const uint4*>(p);
  const T* h = reinterpret_cast<const T*>(&u);
#pragma unroll
  for (int i = 0; i < 8; ++i) f[i] = to_f<T>(h[i]);
}

/* Rows of 16-bit latent keys: row(b, j) points at token j's leading coordinates. */
template <typename T> struct StridedRows {
  const T* k;
  int64_t ksb, ksj;
  __device__ const T* row(int32_t b, int64_t j) const { return k + (int64_t)b * ksb + j * ksj; }
};
template <typename T> struct PagedRows {
  PagedSlots s;
  __device__ const T* row(int32_t b, int64_t j) const {
    return (const T*)(s.slot(b, (int32_t)j) + s.lay.lat[0]);
  }
};

/* Vector path: 16-bit storage, R % 8 == 0, rows 16-byte aligned. Each lane group scores kU
 * tokens per iteration so that kU independent 16-byte loads per lane are in flight. */
constexpr int kU = 4;
template <typename T, typename Rows>
__global__ void __launch_bounds__(kThreads)
    score_vec_kernel(const float* __restrict__ qlat, int32_t H, int32_t R, Rows k,
                     const int32_t* __restrict__ lengths, int32_t fixed_len, int32_t n_sink,
                     int32_t n_recent, int32_t L, float* __restrict__ scores, int64_t ssb) {
  const int32_t b = blockIdx.y;
  const int32_t S = lengths ? lengths[b] : fixed_len;
  const int32_t lo = n_sink, hi = S - n_recent;
  const int lane = threadIdx.x & 31;
  const int sub = lane % L;          /* lane within the token's group */
  const int grp = lane / L;          /* token group within the warp */
  const int per_warp = 32 / L;
  const int warp = threadIdx.x >> 5;
  const int64_t step = (int64_t)gridDim.x * (kThreads / 32) * per_warp * kU;
  const float* q = qlat + (int64_t)b * H * R;
  float* s = scores + (int64_t)b * ssb;
  for (int64_t j0 = lo + ((int64_t)blockIdx.x * (kThreads / 32) + warp) * per_warp * kU; j0 < hi;
       j0 += step) {
    const T* row[kU];
    bool ok[kU];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int64_t j = j0 + u * per_warp + grp;
      ok[u] = j < hi;
      row[u] = k.row(b, ok[u] ? j : lo);
    }
    for (int32_t h = 0; h < H; ++h) {
      float acc[kU] = {};
      for (int32_t c = sub * 8; c < R; c += L * 8) {
        float kv[kU][8];
#pragma unroll
        for (int u = 0; u < kU; ++u) load8<T>(row[u] + c, kv[u]);
        const float4 qa = __ldg(reinterpret_cast<const float4*>(q + h * R + c));
        const float4 qb = __ldg(reinterpret_cast<const float4*>(q + h * R + c + 4));
#pragma unroll
        for (int u = 0; u < kU; ++u)
          acc[u] += kv[u][0] * qa.x + kv[u][1] * qa.y + kv[u][2] * qa.z + kv[u][3] * qa.w +
                    kv[u][4] * qb.x + kv[u][5] * qb.y + kv[u][6] * qb.z + kv[u][7] * qb.w;
      }
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        float x = acc[u];
        for (int o = L / 2; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
        if (ok[u] && sub == 0) s[(int64_t)h * (ssb / H) + j0 + u * per_warp + grp] = x;
      }
    }
  }
}

/* Rows of latent keys of any float type: row(b, j) gives token j's row, at(c) coordinate c. */
struct ViewRows {
  DView k; /* [B, S, >= R], last dim contiguous */
  struct Row {
    const void* p;
    int32_t elem;
    int64_t off;
    __device__ float at(int32_t c) const { return load_elem(p, elem, off + c); }
  };
  __device__ Row row(int32_t b, int64_t j) const { return Row{k.data, k.elem, off2(k, b, j)}; }
};
struct PagedAnyRows {
  PagedSlots s;
  int32_t elem;
  __device__ ViewRows::Row row(int32_t b, int64_t j) const {
    return ViewRows::Row{s.slot(b, (int32_t)j) + s.lay.lat[0], elem, 0};
  }
};

/* Any element type and stride. */
template <typename Rows>
__global__ void __launch_bounds__(kThreads)
    score_any_kernel(const float* __restrict__ qlat, int32_t H, int32_t R, Rows k,
                     const int32_t* __restrict__ lengths, int32_t fixed_len, int32_t n_sink,
                     int32_t n_recent, float* __restrict__ scores, int64_t ssb) {
  const int32_t b = blockIdx.y;
  const int32_t S = lengths ? lengths[b] : fixed_len;
  const int32_t lo = n_sink, hi = S - n_recent;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t step = (int64_t)gridDim.x * (kThreads / 32);
  for (int64_t j = lo + (int64_t)blockIdx.x * (kThreads / 32) + warp; j < hi; j += step) {
    const auto row = k.row(b, j);
    for (int32_t h = 0; h < H; ++h) {
      float acc = 0.f;
      for (int32_t c = lane; c < R; c += 32) acc += row.at(c) * qlat[((int64_t)b * H + h) * R + c];
      for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
      if (lane == 0) scores[(int64_t)b * ssb + (int64_t)h * (ssb / H) + j] = acc;
    }
  }
}

/*
 * Quantised latent keys: the same two loops over CodeRows (row(b, j) is token j of sequence b;
 * load8(c, f) decodes coordinates [c, c + 8) from one code load, at(c) one coordinate, both
 * with decode_codes, the function P.V decodes values with). The 16-bit kernels above are kept
 * apart: one template instantiated for both changed their register allocation (a 4-byte spill
 * in score_vec_kernel).
 */
struct CodeRows {
  QuantRows q;
  struct Row {
    const uint8_t* p;
    const uint16_t *sc, *zr;
    int32_t bits, group;
    __device__ void load8(int32_t c, float* f) const {
      decode_codes<8>(p, sc, zr, c, bits, group, f);
    }
    __device__ float at(int32_t c) const {
      float x;
      decode_codes<1>(p, sc, zr, c, bits, group, &x);
      return x;
    }
  };
  __device__ Row row(int32_t b, int64_t j) const {
    const int64_t r = (int64_t)b * q.seq_rows + j, ng = q.row_bytes * 8 / q.bits / q.group;
    return Row{q.codes + r * q.row_bytes, q.scale + r * ng, q.zero + r * ng, q.bits, q.group};
  }
};
/* Paged slots' codes of the score part, with their groups' scales and zeros. */
struct PagedCodeRows {
  PagedSlots s;
  int32_t bits, group;
  __device__ CodeRows::Row row(int32_t b, int64_t j) const {
    const uint8_t* p = s.slot(b, (int32_t)j);
    return CodeRows::Row{p + s.lay.lat[0], (const uint16_t*)(p + s.lay.lat_scale[0]),
                         (const uint16_t*)(p + s.lay.lat_zero[0]), bits, group};
  }
};

/* Vector path (R % 8 == 0), as score_vec_kernel. */
template <typename Rows>
__global__ void __launch_bounds__(kThreads)
    score_codes_vec_kernel(const float* __restrict__ qlat, int32_t H, int32_t R, Rows k,
                           const int32_t* __restrict__ lengths, int32_t n_sink, int32_t n_recent,
                           int32_t L, float* __restrict__ scores, int64_t ssb) {
  const int32_t b = blockIdx.y;
  const int32_t S = lengths[b];
  const int32_t lo = n_sink, hi = S - n_recent;
  const int lane = threadIdx.x & 31;
  const int sub = lane % L;          /* lane within the token's group */
  const int grp = lane / L;          /* token group within the warp */
  const int per_warp = 32 / L;
  const int warp = threadIdx.x >> 5;
  const int64_t step = (int64_t)gridDim.x * (kThreads / 32) * per_warp * kU;
  const float* q = qlat + (int64_t)b * H * R;
  float* s = scores + (int64_t)b * ssb;
  for (int64_t j0 = lo + ((int64_t)blockIdx.x * (kThreads / 32) + warp) * per_warp * kU; j0 < hi;
       j0 += step) {
    decltype(k.row(0, 0)) row[kU];
    bool ok[kU];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int64_t j = j0 + u * per_warp + grp;
      ok[u] = j < hi;
      row[u] = k.row(b, ok[u] ? j : lo);
    }
    for (int32_t h = 0; h < H; ++h) {
      float acc[kU] = {};
      for (int32_t c = sub * 8; c < R; c += L * 8) {
        float kv[kU][8];
#pragma unroll
        for (int u = 0; u < kU; ++u) row[u].load8(c, kv[u]);
        const float4 qa = __ldg(reinterpret_cast<const float4*>(q + h * R + c));
        const float4 qb = __ldg(reinterpret_cast<const float4*>(q + h * R + c + 4));
#pragma unroll
        for (int u = 0; u < kU; ++u)
          acc[u] += kv[u][0] * qa.x + kv[u][1] * qa.y + kv[u][2] * qa.z + kv[u][3] * qa.w +
                    kv[u][4] * qb.x + kv[u][5] * qb.y + kv[u][6] * qb.z + kv[u][7] * qb.w;
      }
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        float x = acc[u];
        for (int o = L / 2; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
        if (ok[u] && sub == 0) s[(int64_t)h * (ssb / H) + j0 + u * per_warp + grp] = x;
      }
    }
  }
}

/* Scalar path (R % 8 != 0), as score_any_kernel: one warp per token. */
template <typename Rows>
__global__ void __launch_bounds__(kThreads)
    score_codes_any_kernel(const float* __restrict__ qlat, int32_t H, int32_t R, Rows k,
                           const int32_t* __restrict__ lengths, int32_t n_sink, int32_t n_recent,
                           float* __restrict__ scores, int64_t ssb) {
  const int32_t b = blockIdx.y;
  const int32_t S = lengths[b];
  const int32_t lo = n_sink, hi = S - n_recent;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t step = (int64_t)gridDim.x * (kThreads / 32);
  for (int64_t j = lo + (int64_t)blockIdx.x * (kThreads / 32) + warp; j < hi; j += step) {
    const auto row = k.row(b, j);
    for (int32_t h = 0; h < H; ++h) {
      float acc = 0.f;
      for (int32_t c = lane; c < R; c += 32) acc += row.at(c) * qlat[((int64_t)b * H + h) * R + c];
      for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
      if (lane == 0) scores[(int64_t)b * ssb + (int64_t)h * (ssb / H) + j] = acc;
    }
  }
}

/* Grid: the sequence's tokens over blocks, at most ~8 blocks per SM over the batch. */
dim3 score_grid(int64_t S, int32_t B, int per_block, int32_t num_sms) {
  int64_t gx = cdiv(S, per_block);
  const int64_t cap = cdiv(8LL * (num_sms > 0 ? num_sms : 132), B);
  if (gx > cap) gx = cap;
  if (gx < 1) gx = 1;
  return dim3((unsigned)gx, (unsigned)B);
}
/* Lanes per token on the vector path: R/8 rounded up to a power of two, at most 32. */
int lanes_for(int32_t R) {
  int L = 1;
  while (L < 32 && L * 8 < R) L <<= 1;
  return L;
}

}  // namespace

cudaError_t launch_scores(const float* qlat, int32_t H, int32_t R, DView k_lat,
                          const int32_t* lengths, int32_t fixed_len, int32_t n_sink,
                          int32_t n_recent, int32_t B, float* scores, int64_t score_stride_b,
                          int32_t num_sms, cudaStream_t st) {
  if (B <= 0) return cudaSuccess;
  const int64_t S = k_lat.shape[1];
  const bool vec = (k_lat.elem == SALS_ELEM_F16 || k_lat.elem == SALS_ELEM_BF16) && R % 8 == 0 &&
                   k_lat.stride[1] % 8 == 0 && k_lat.stride[0] % 8 == 0 &&
                   ((uintptr_t)k_lat.data % 16) == 0;
  int L = 1;
  while (L < 32 && L * 8 < R) L <<= 1;
  const int per_block = vec ? (kThreads / 32) * (32 / L) * kU : kThreads / 32;
  int64_t gx = cdiv(S, per_block);
  const int64_t cap = cdiv(8LL * (num_sms > 0 ? num_sms : 132), B);
  if (gx > cap) gx = cap;
  if (gx < 1) gx = 1;
  dim3 grid((unsigned)gx, (unsigned)B);
  if (vec) {
    if (k_lat.elem == SALS_ELEM_F16)
      score_vec_kernel<__half><<<grid, kThreads, 0, st>>>(
          qlat, H, R,
          StridedRows<__half>{(const __half*)k_lat.data, k_lat.stride[0], k_lat.stride[1]}, lengths,
          fixed_len, n_sink, n_recent, L, scores, score_stride_b);
    else
      score_vec_kernel<__nv_bfloat16><<<grid, kThreads, 0, st>>>(
          qlat, H, R,
          StridedRows<__nv_bfloat16>{(const __nv_bfloat16*)k_lat.data, k_lat.stride[0],
                                     k_lat.stride[1]},
          lengths, fixed_len, n_sink, n_recent, L, scores, score_stride_b);
  } else {
    score_any_kernel<<<grid, kThreads, 0, st>>>(qlat, H, R, ViewRows{k_lat}, lengths, fixed_len,
                                                n_sink, n_recent, scores, score_stride_b);
  }
  return cudaPeekAtLastError();
}

cudaError_t launch_scores(const float* qlat, int32_t H, int32_t R, const QuantRows& k_lat,
                          const int32_t* lengths, int32_t n_sink, int32_t n_recent, int32_t B,
                          float* scores, int64_t score_stride_b, int32_t num_sms, cudaStream_t st) {
  if (B <= 0) return cudaSuccess;
  /* whole 8-coordinate pieces, with code loads aligned to their size (row_bytes = R bits / 8) */
  const bool vec = R % 8 == 0;
  const int L = lanes_for(R);
  const dim3 grid =
      score_grid(k_lat.seq_rows, B, vec ? (kThreads / 32) * (32 / L) * kU : kThreads / 32, num_sms);
  if (vec)
    score_codes_vec_kernel<<<grid, kThreads, 0, st>>>(qlat, H, R, CodeRows{k_lat}, lengths, n_sink,
                                                      n_recent, L, scores, score_stride_b);
  else
    score_codes_any_kernel<<<grid, kThreads, 0, st>>>(qlat, H, R, CodeRows{k_lat}, lengths, n_sink,
                                                      n_recent, scores, score_stride_b);
  return cudaPeekAtLastError();
}

cudaError_t launch_scores(const float* qlat, int32_t H, int32_t R, const PagedSlots& k_lat,
                          int32_t elem, int32_t key_bits, int32_t key_group, bool vec,
                          const int32_t* lengths, int32_t max_len, int32_t n_sink, int32_t n_recent,
                          int32_t B, float* scores, int64_t score_stride_b, int32_t num_sms,
                          cudaStream_t st) {
  if (B <= 0) return cudaSuccess;
  vec = vec && R % 8 == 0;
  const int L = lanes_for(R);
  const dim3 grid =
      score_grid(max_len, B, vec ? (kThreads / 32) * (32 / L) * kU : kThreads / 32, num_sms);
  if (key_bits < 16) {
    const PagedCodeRows rows{k_lat, key_bits, key_group};
    if (vec)
      score_codes_vec_kernel<<<grid, kThreads, 0, st>>>(qlat, H, R, rows, lengths, n_sink, n_recent,
                                                        L, scores, score_stride_b);
    else
      score_codes_any_kernel<<<grid, kThreads, 0, st>>>(qlat, H, R, rows, lengths, n_sink, n_recent,
                                                        scores, score_stride_b);
  } else if (vec && elem == SALS_ELEM_F16) {
    score_vec_kernel<__half><<<grid, kThreads, 0, st>>>(qlat, H, R, PagedRows<__half>{k_lat},
                                                        lengths, 0, n_sink, n_recent, L, scores,
                                                        score_stride_b);
  } else if (vec && elem == SALS_ELEM_BF16) {
    score_vec_kernel<__nv_bfloat16>
        <<<grid, kThreads, 0, st>>>(qlat, H, R, PagedRows<__nv_bfloat16>{k_lat}, lengths, 0, n_sink,
                                    n_recent, L, scores, score_stride_b);
  } else {
    score_any_kernel<<<grid, kThreads, 0, st>>>(qlat, H, R, PagedAnyRows{k_lat, elem}, lengths, 0,
                                                n_sink, n_recent, scores, score_stride_b);
  }
  return cudaPeekAtLastError();
}

}  // namespace sals_cuda
