/*
 * Matrix-product templates used by several operations:
 *   sgemm:  float32 CUDA-core tiles (64x64x16, 4x4 per thread) with accessor functors for A, B
 *           and the epilogue (exact float32 path: any dtype, stride or size);
 *   skinny: split-K float32 product of a few rows times a float32 matrix, the splits added
 *           in a fixed order by the last block of each output tile (decode-step projections
 *           of keys and scoring queries);
 *   hgemm:  tensor-core tiles (mma.sync m16n8k16, 64x64x32, 4 warps) for 16-bit storage, A
 *           rows converted on load, B a compact [K, N] matrix in the storage type.
 * Both are templates so that projection, append and rebuild share one tiled loop each.
 */
#ifndef SALS_CUDA_GEMM_CUH_
#define SALS_CUDA_GEMM_CUH_

#include <cuda/atomic>
#include <type_traits>

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

/*
 * C[r, n] = sum_k X(m, k, hs) U_hs[k, n] for r = m * H + hs, up to a few hundred rows m, where
 * U_hs = U + hs * u_head_stride (row stride ldu). Grid: (32 columns, split of K, MR rows m and
 * head hs), MR = 1, 4 or 16 (kSkM) rows per block as the batch needs; each block reads its U
 * tile once for all its rows, so U is read once per MR rows.
 * Inside a block each warp takes 4-row groups of the split (one column per lane), and issues all
 * its U loads before the block stages X, so the whole tile is in flight at once; X sits in
 * shared memory as [MR][rows] and is read as 4-row float4 broadcasts.
 * Block sums are written to part[((z * M + m) * H + hs) * N + n] for split z. With an
 * epilogue, the last block of each (column tile, row group, head) to finish (an arrival counter)
 * adds the splits in order z = 0, 1, ... and calls epi(m * H + hs, n, sum): a fixed order, so the
 * result does not depend on which block came last.
 */
constexpr int kSkCols = 32, kSkM = 16, kSkWarps = 8, kSkThreads = 32 * kSkWarps;
constexpr int kSkQuads = 8;                              /* 4-row groups per warp, at most */
constexpr int kSkMaxRows = 4 * kSkWarps * kSkQuads;      /* rows of K per split, at most */
constexpr int kSkSumBatch = 16; /* partials loaded at once when summing */

/* Rows of K per split: K / 16 rounded up to whole 32-row passes, within [32, kSkMaxRows]. At
 * most 16 splits up to K = 4096 (enough blocks to cover the device at batch 1, few partials per
 * output to add at the end), K / kSkMaxRows beyond. */
static inline int32_t skinny_rows(int64_t K) {
  const int64_t r = cdiv(cdiv(K, 16), 32) * 32;
  return (int32_t)(r < 32 ? 32 : (r > kSkMaxRows ? kSkMaxRows : r));
}
static inline int32_t skinny_splits(int64_t K) { return (int32_t)cdiv(K, skinny_rows(K)); }
/* An upper bound of skinny_splits(k) for every k <= K (workspace sizing). */
static inline int64_t skinny_max_splits(int64_t K) {
  return cdiv(K, kSkMaxRows) > 16 ? cdiv(K, kSkMaxRows) : 16;
}

/*
 * X loaders read elements with the type fixed at compile time (load_as<E>, dispatched on the
 * host with SALS_DISPATCH_FLOAT_ELEM) and are called with in-range indices only: with a run-time
 * type switch (load_elem) or a guard around the load, each conversion sits in its own branch
 * right after its load, and the block's staging loop waits on its loads one after another
 * instead of having them all in flight.
 */
template <typename E> __device__ __forceinline__ float load_as(const void* p, int64_t i) {
  return to_f<E>(((const E*)p)[i]);
}

/* Workspace of a skinny product with an epilogue, for up to max_m rows: one arrival counter per
 * (column tile, row group, head), zero between launches (the last block resets its own), then
 * the split partials. Zero it once when it is allocated. */
struct SkinnyWork {
  uint32_t* count;
  float* part;
};
static inline int64_t skinny_counters(int64_t max_m, int64_t N, int64_t H) {
  return cdiv(N, kSkCols) * cdiv(max_m, kSkM) * H;
}
static inline size_t skinny_work_bytes(int64_t max_m, int64_t N, int64_t K, int64_t H) {
  return (size_t)4 * (skinny_counters(max_m, N, H) + skinny_max_splits(K) * max_m * H * N);
}
static inline SkinnyWork skinny_work(void* base, int64_t max_m, int64_t N, int64_t H) {
  uint32_t* count = (uint32_t*)base;
  return SkinnyWork{count, (float*)(count + skinny_counters(max_m, N, H))};
}

/* Two blocks per SM: a batch-16 LLaMA2-size grid (256 blocks) is resident in one wave. */
template <int MR, typename XLoad, typename Epi>
__global__ void __launch_bounds__(kSkThreads, 2)
    skinny_kernel(int32_t M, int32_t N, int32_t K, int32_t H, int32_t R,
                  const float* __restrict__ U, int64_t ldu, int64_t u_head_stride, XLoad x,
                  float* __restrict__ part, uint32_t* __restrict__ count, Epi epi) {
  /* X [MR][R] while the products run, then the warps' sums [kSkWarps][MR][kSkCols] */
  static_assert(MR * kSkMaxRows >= kSkWarps * MR * kSkCols, "shared X also holds warp sums");
  __shared__ __align__(16) float sm[MR * kSkMaxRows];
  __shared__ bool last_s;
  const int32_t splits = (int32_t)gridDim.y, z = (int32_t)blockIdx.y;
  const int32_t hs = (int32_t)blockIdx.z % H, m0 = ((int32_t)blockIdx.z / H) * MR;
  const int32_t k0 = z * R, kn = K - k0 < R ? K - k0 : R;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int32_t n = (int32_t)blockIdx.x * kSkCols + lane;
  const int nq = R / (4 * kSkWarps);

  float u[kSkQuads][4];
  const float* up = U + hs * u_head_stride + (int64_t)k0 * ldu + n;
#pragma unroll
  for (int j = 0; j < kSkQuads; ++j)
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int kk = 4 * (warp + kSkWarps * j) + r;
      u[j][r] = (j < nq && kk < kn && n < N) ? __ldg(up + (int64_t)kk * ldu) : 0.f;
    }

  /* X [MR][R] (element i = mm * R + kk), spread over all threads. Every thread makes all
   * MR loads, with no branch between them: indices are clamped into range (past the tile,
   * onto its last row: cached duplicates), and what lies outside is stored as zeros. */
  float xv[MR];
#pragma unroll
  for (int j = 0; j < MR; ++j) {
    const int i = tid + j * kSkThreads, kk = i % R, mm = i / R < MR ? i / R : MR - 1;
    xv[j] = x(m0 + mm < M ? m0 + mm : M - 1, k0 + kk < K ? k0 + kk : K - 1, hs);
  }
#pragma unroll
  for (int j = 0; j < MR; ++j) {
    const int i = tid + j * kSkThreads, mm = i / R, kk = i - mm * R;
    if (i < MR * R) sm[i] = m0 + mm < M && k0 + kk < K ? xv[j] : 0.f;
  }
  __syncthreads();

  float acc[MR] = {};
#pragma unroll
  for (int j = 0; j < kSkQuads; ++j) {
    if (j >= nq) break;
    const int kq = 4 * (warp + kSkWarps * j);
#pragma unroll
    for (int mm = 0; mm < MR; ++mm) {
      const float4 xq = *reinterpret_cast<const float4*>(&sm[mm * R + kq]);
      acc[mm] += u[j][0] * xq.x;
      acc[mm] += u[j][1] * xq.y;
      acc[mm] += u[j][2] * xq.z;
      acc[mm] += u[j][3] * xq.w;
    }
  }
  __syncthreads(); /* X no longer read: the space takes the warps' sums */
#pragma unroll
  for (int mm = 0; mm < MR; ++mm) sm[(warp * MR + mm) * kSkCols + lane] = acc[mm];
  __syncthreads();

  /* each thread owns kOut of the block's MR x kSkCols outputs (fewer rows: some own none) */
  constexpr int kOutputs = MR * kSkCols, kOut = (kOutputs + kSkThreads - 1) / kSkThreads;
  const int64_t zstride = (int64_t)M * H * N;
#pragma unroll
  for (int o = 0; o < kOut; ++o) {
    const int i = tid + o * kSkThreads, mm = i / kSkCols, c = i % kSkCols;
    if (i >= kOutputs) break;
    const int32_t m = m0 + mm, nn = (int32_t)blockIdx.x * kSkCols + c;
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < kSkWarps; ++w) s += sm[(w * MR + mm) * kSkCols + c];
    if (m < M && nn < N) part[z * zstride + ((int64_t)m * H + hs) * N + nn] = s;
  }
  /* Arrive on the tile's counter. The barrier orders the block's partial stores before
   * thread 0's release (cumulative at device scope); the last block's acquire, then the
   * barrier, order every other block's partials before its reads. */
  __syncthreads();
  const uint32_t tile = blockIdx.x + gridDim.x * blockIdx.z;
  if (tid == 0) {
    cuda::atomic_ref<uint32_t, cuda::thread_scope_device> arrived(count[tile]);
    last_s = arrived.fetch_add(1u, cuda::memory_order_acq_rel) == (uint32_t)splits - 1;
  }
  __syncthreads();
  if (!last_s) return;
  float s[kOut] = {};
  for (int32_t z0 = 0; z0 < splits; z0 += kSkSumBatch) {
    float p[kOut][kSkSumBatch];
#pragma unroll
    for (int o = 0; o < kOut; ++o) {
      const int i = tid + o * kSkThreads;
      const int32_t m = m0 + i / kSkCols, nn = (int32_t)blockIdx.x * kSkCols + i % kSkCols;
      const bool ok = i < kOutputs && m < M && nn < N;
      const float* src = part + ((int64_t)m * H + hs) * N + nn;
#pragma unroll
      for (int j = 0; j < kSkSumBatch; ++j)
        p[o][j] = ok && z0 + j < splits ? __ldcg(src + (z0 + j) * zstride) : 0.f;
    }
#pragma unroll
    for (int o = 0; o < kOut; ++o)
#pragma unroll
      for (int j = 0; j < kSkSumBatch; ++j)
        if (z0 + j < splits) s[o] += p[o][j];
  }
#pragma unroll
  for (int o = 0; o < kOut; ++o) {
    const int i = tid + o * kSkThreads;
    const int32_t m = m0 + i / kSkCols, nn = (int32_t)blockIdx.x * kSkCols + i % kSkCols;
    if (i < kOutputs && m < M && nn < N) epi((int64_t)m * H + hs, nn, s[o]);
  }
  if (tid == 0) count[tile] = 0; /* every block of the tile has arrived: ready for the next */
}

/* The whole product: epi(m * H + hs, n, value) for every m < M, hs < H, n < N. w: a workspace
 * from skinny_work for at least M rows, the same N and H, and K at most the sizing's K. */
template <typename XLoad, typename Epi>
cudaError_t skinny(int32_t M, int32_t N, int32_t K, int32_t H, const float* U, int64_t ldu,
                   int64_t u_head_stride, XLoad x, SkinnyWork w, Epi epi, cudaStream_t st) {
  if (M <= 0 || N <= 0 || K <= 0) return cudaSuccess;
  const int32_t R = skinny_rows(K);
  auto launch = [&](auto rows) {
    constexpr int MR = decltype(rows)::value;
    dim3 grid((unsigned)cdiv(N, kSkCols), (unsigned)cdiv(K, R), (unsigned)(cdiv(M, MR) * H));
    skinny_kernel<MR><<<grid, kSkThreads, 0, st>>>(M, N, K, H, R, U, ldu, u_head_stride, x, w.part,
                                                   w.count, epi);
    return cudaPeekAtLastError();
  };
  /* rows per block: the batch when it is small (a block computing 16 rows for one spent 15/16
   * of its staging and products on clamped duplicates), 16 beyond */
  if (M == 1) return launch(std::integral_constant<int, 1>{});
  if (M <= 4) return launch(std::integral_constant<int, 4>{});
  return launch(std::integral_constant<int, kSkM>{});
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
      if (k < K && n < N) rb[i] = *reinterpret_cast<const uint4*>(B + k * N + n);
      else rb[i] = make_uint4(0, 0, 0, 0);
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
        ldmatrix_x4_trans(bfr[j], &Bs[buf][(ks + (lane % 8) + ((lane / 8) % 2) * 8) * kHgBS + wn +
                                           j * 16 + (lane / 16) * 8]);
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
cudaError_t hgemm(int64_t M, int64_t N, int64_t K, ALoad a, const T* B, Epi epi, cudaStream_t st) {
  if (M <= 0 || N <= 0) return cudaSuccess;
  dim3 grid((unsigned)cdiv(N, kHgBN), (unsigned)cdiv(M, kHgBM));
  hgemm_kernel<T><<<grid, kHgThreads, 0, st>>>(M, N, K, a, B, epi);
  return cudaPeekAtLastError();
}

}  // namespace sals_cuda

#endif /* SALS_CUDA_GEMM_CUH_ */
