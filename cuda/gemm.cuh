/*
 * Matrix-product templates used by several operations:
 *   sgemm:  float32 CUDA-core tiles (64x64x16, 4x4 per thread) with accessor functors for A, B
 *           and the epilogue (exact float32 path: any dtype, stride or size);
 *   skinny: split-K float32 partials of a few rows times a float32 matrix (decode-step
 *           projections of keys and scoring queries);
 *   hgemm:  tensor-core tiles (mma.sync m16n8k16, 64x64x32, 4 warps) for 16-bit storage, A
 *           rows converted on load, B a compact [K, N] matrix in the storage type.
 * Both are templates so that projection, append and rebuild share one tiled loop each.
 */
#ifndef SALS_CUDA_GEMM_CUH_
#define SALS_CUDA_GEMM_CUH_

#include "common.cuh"

namespace sals_cuda {

constexpr int kSgBM = 64, kSgBN = 64, kSgBK = 16, kSgThreads = 256;

/* C[m, n] = sum_k A(m, k) B(k, n); epi(m, n, value). */
template <typename ALoad, typename BLoad, typename Epi>
__global__ void __launch_bounds__(kSgThreads)
    sgemm_kernel(int64_t M, int64_t N, int64_t K, ALoad a, BLoad bl, Epi epi) {
  __shared__ float As[kSgBK][kSgBM + 4];
  __shared__ float Bs[kSgBK][kSgBN + 4];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t m0 = (int64_t)blockIdx.y * kSgBM, n0 = (int64_t)blockIdx.x * kSgBN;
  float acc[4][4] = {};
  for (int64_t k0 = 0; k0 < K; k0 += kSgBK) {
    for (int i = threadIdx.x; i < kSgBK * kSgBM; i += kSgThreads) {
      int kk = i / kSgBM, mm = i % kSgBM;
      int64_t m = m0 + mm, k = k0 + kk;
      As[kk][mm] = (m < M && k < K) ? a(m, k) : 0.f;
    }
    for (int i = threadIdx.x; i < kSgBK * kSgBN; i += kSgThreads) {
      int kk = i / kSgBN, nn = i % kSgBN;
      int64_t n = n0 + nn, k = k0 + kk;
      Bs[kk][nn] = (n < N && k < K) ? bl(k, n) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kSgBK; ++kk) {
      float av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) av[i] = As[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) bv[j] = Bs[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * bv[j];
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      int64_t m = m0 + ty + 16 * i, n = n0 + tx + 16 * j;
      if (m < M && n < N) epi(m, n, acc[i][j]);
    }
}

template <typename ALoad, typename BLoad, typename Epi>
cudaError_t sgemm(int64_t M, int64_t N, int64_t K, ALoad a, BLoad b, Epi epi, cudaStream_t st) {
  if (M <= 0 || N <= 0) return cudaSuccess;
  dim3 grid((unsigned)cdiv(N, kSgBN), (unsigned)cdiv(M, kSgBM));
  sgemm_kernel<<<grid, kSgThreads, 0, st>>>(M, N, K, a, b, epi);
  return cudaPeekAtLastError();
}

/* ---- skinny products: a few rows (decode batch) times a float32 matrix ----------------- */

constexpr int kSkCols = 64, kSkRows = 128, kSkM = 16, kSkThreads = 256;

/* Split-K partials of C[m, n] = sum_k X(m, k, hs) U_hs[k, n] for up to a few hundred rows m:
 * part[(z * M * H + m * H + hs) * N + n] for split z of kSkRows rows of K, where
 * U_hs = U + hs * u_head_stride (row stride ldu). One block per (64 columns, split, 16 rows,
 * head): every U element is read once per 16 rows, so the grid covers the device even at
 * batch 1 and the product runs near the bandwidth of reading U once. */
template <typename XLoad>
__global__ void __launch_bounds__(kSkThreads)
    skinny_kernel(int32_t M, int32_t N, int32_t K, int32_t H, const float* __restrict__ U,
                  int64_t ldu, int64_t u_head_stride, XLoad x, float* __restrict__ part) {
  __shared__ float xs[kSkM][kSkRows];
  __shared__ float red[kSkThreads / kSkCols][kSkM][kSkCols];
  const int32_t z = blockIdx.y, hs = blockIdx.z % H, m0 = (blockIdx.z / H) * kSkM;
  const int32_t k0 = z * kSkRows;
  const int tid = threadIdx.x;
  for (int i = tid; i < kSkM * kSkRows; i += kSkThreads) {
    const int mm = i / kSkRows, kk = i % kSkRows;
    xs[mm][kk] = (m0 + mm < M && k0 + kk < K) ? x(m0 + mm, k0 + kk, hs) : 0.f;
  }
  __syncthreads();
  constexpr int kPh = kSkThreads / kSkCols;
  const int cl = tid % kSkCols, ph = tid / kSkCols;
  const int32_t n = blockIdx.x * kSkCols + cl;
  const int32_t kn = K - k0 < kSkRows ? K - k0 : kSkRows;
  float acc[kSkM] = {};
  if (n < N) {
    const float* u = U + hs * u_head_stride + (int64_t)k0 * ldu + n;
#pragma unroll 4
    for (int kk = ph; kk < kn; kk += kPh) {
      const float uv = __ldg(u + (int64_t)kk * ldu);
#pragma unroll
      for (int mm = 0; mm < kSkM; ++mm) acc[mm] += uv * xs[mm][kk];
    }
  }
#pragma unroll
  for (int mm = 0; mm < kSkM; ++mm) red[ph][mm][cl] = acc[mm];
  __syncthreads();
  for (int i = tid; i < kSkM * kSkCols; i += kSkThreads) {
    const int mm = i / kSkCols, c = i % kSkCols;
    const int32_t nn = blockIdx.x * kSkCols + c;
    if (m0 + mm >= M || nn >= N) continue;
    float v = 0.f;
#pragma unroll
    for (int p = 0; p < kPh; ++p) v += red[p][mm][c];
    part[(((int64_t)z * M + m0 + mm) * H + hs) * N + nn] = v;
  }
}

static inline int32_t skinny_splits(int64_t K) { return (int32_t)cdiv(K, kSkRows); }

template <typename XLoad>
cudaError_t skinny(int32_t M, int32_t N, int32_t K, int32_t H, const float* U, int64_t ldu,
                   int64_t u_head_stride, XLoad x, float* part, cudaStream_t st) {
  if (M <= 0 || N <= 0 || K <= 0) return cudaSuccess;
  dim3 grid((unsigned)cdiv(N, kSkCols), (unsigned)skinny_splits(K),
            (unsigned)(cdiv(M, kSkM) * H));
  skinny_kernel<<<grid, kSkThreads, 0, st>>>(M, N, K, H, U, ldu, u_head_stride, x, part);
  return cudaPeekAtLastError();
}

/* ---- tensor-core tiles ------------------------------------------------------------------ */

constexpr int kHgBM = 64, kHgBN = 64, kHgBK = 32, kHgThreads = 128;
constexpr int kHgAS = kHgBK + 8; /* padded row strides (halves): conflict-free ldmatrix */
constexpr int kHgBS = kHgBN + 8;

/*
 * C[m, n] = sum_k A(m, k) B[k, n]. a.load8(m, k, T* dst) stores 8 consecutive k of row m
 * (zeros outside), for k a multiple of 8. B: compact [K, N] of T with N % 8 == 0.
 * epi(m, n, value) for every m < M, n < N.
 */
template <typename T, typename ALoad, typename Epi>
__global__ void __launch_bounds__(kHgThreads)
    hgemm_kernel(int64_t M, int64_t N, int64_t K, ALoad a, const T* __restrict__ B, Epi epi) {
  __shared__ __align__(16) T As[2][kHgBM * kHgAS];
  __shared__ __align__(16) T Bs[2][kHgBK * kHgBS];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = (warp >> 1) * 32, wn = (warp & 1) * 32;
  const int64_t m0 = (int64_t)blockIdx.y * kHgBM, n0 = (int64_t)blockIdx.x * kHgBN;
  float acc[2][4][4] = {};

  /* Each thread stages 2 A chunks (8 k each) and 2 B chunks (8 n each) per k tile. */
  uint4 ra[2], rb[2];
  auto fetch = [&](int64_t k0) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      int c = tid + i * kHgThreads; /* 0..255 */
      int mm = c / 4, kk = (c % 4) * 8;
      a.load8(m0 + mm, k0 + kk, reinterpret_cast<T*>(&ra[i]));
      int kb = c / 8, nn = (c % 8) * 8;
      int64_t k = k0 + kb, n = n0 + nn;
      if (k < K && n < N)
        rb[i] = *reinterpret_cast<const uint4*>(B + k * N + n);
      else
        rb[i] = make_uint4(0, 0, 0, 0);
    }
  };
  auto stash = [&](int buf) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      int c = tid + i * kHgThreads;
      *reinterpret_cast<uint4*>(&As[buf][(c / 4) * kHgAS + (c % 4) * 8]) = ra[i];
      *reinterpret_cast<uint4*>(&Bs[buf][(c / 8) * kHgBS + (c % 8) * 8]) = rb[i];
    }
  };

  fetch(0);
  stash(0);
  __syncthreads();
  int buf = 0;
  for (int64_t k0 = 0; k0 < K; k0 += kHgBK) {
    const bool more = k0 + kHgBK < K;
    if (more) fetch(k0 + kHgBK);
#pragma unroll
    for (int ks = 0; ks < kHgBK; ks += 16) {
      uint32_t af[2][4], bfr[2][4];
#pragma unroll
      for (int i = 0; i < 2; ++i)
        ldmatrix_x4(af[i], &As[buf][(wm + i * 16 + (lane % 16)) * kHgAS + ks + (lane / 16) * 8]);
#pragma unroll
      for (int j = 0; j < 2; ++j)
        ldmatrix_x4_trans(
            bfr[j], &Bs[buf][(ks + (lane % 8) + ((lane / 8) % 2) * 8) * kHgBS + wn + j * 16 +
                             (lane / 16) * 8]);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) mma16816<T>(acc[i][j], af[i], &bfr[j / 2][(j % 2) * 2]);
    }
    if (more) {
      stash(buf ^ 1);
      __syncthreads();
      buf ^= 1;
    }
  }
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        int64_t m = m0 + wm + i * 16 + g + (r / 2) * 8;
        int64_t n = n0 + wn + j * 8 + 2 * t + (r % 2);
        if (m < M && n < N) epi(m, n, acc[i][j][r]);
      }
}

template <typename T, typename ALoad, typename Epi>
cudaError_t hgemm(int64_t M, int64_t N, int64_t K, ALoad a, const T* B, Epi epi,
                  cudaStream_t st) {
  if (M <= 0 || N <= 0) return cudaSuccess;
  dim3 grid((unsigned)cdiv(N, kHgBN), (unsigned)cdiv(M, kHgBM));
  hgemm_kernel<T><<<grid, kHgThreads, 0, st>>>(M, N, K, a, B, epi);
  return cudaPeekAtLastError();
}

}  // namespace sals_cuda

#endif /* SALS_CUDA_GEMM_CUH_ */
