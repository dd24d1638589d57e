/*
 * Device code shared by the appends of the cache (cache.cu) and of paged storage (paged.cu):
 * one token's value (16-bit or group-quantised) and exact copies, the key projection U^T k by
 * the product that fits the rows, and the quantisation of latent keys. Where a token goes is
 * the caller's part: a destination (ValueDst), an exact-copy functor, an epilogue, a functor
 * naming latent rows. Not API.
 */
#ifndef SALS_CUDA_STORE_CUH_
#define SALS_CUDA_STORE_CUH_

#include "common.cuh"
#include "gemm.cuh"

namespace sals_cuda {

/* Threads of the kernels that store one appended row per block. */
constexpr int kRowThreads = 256;

/* Offsets of the channels i = h * d + e of row (b, t) of a [B, T, Hkv, d] view; rows whose heads
 * lie back to back (the usual layout) need no division per channel. */
struct RowOff {
  int64_t base, s2, s3;
  int32_t d;
  bool flat;
  __device__ RowOff(const DView& x, int64_t b, int64_t t, int32_t d_)
      : base(off2(x, b, t)),
        s2(x.stride[2]),
        s3(x.stride[3]),
        d(d_),
        flat(x.stride[3] == 1 && x.stride[2] == d_) {}
  __device__ int64_t operator()(int32_t i) const {
    return flat ? base + i : base + (i / d) * s2 + (i % d) * s3;
  }
};

/*
 * A float element's raw bits (float32: 32 bits; float16 / bfloat16: 16 bits), then its value.
 * Loading raw bits first lets a thread have all its loads in flight before it converts any: a
 * conversion right after each load (load_elem's switch) waits on the loads one after another.
 * k and v may be of different float types, so the type stays a run-time tag here.
 */
__device__ __forceinline__ uint32_t load_bits(const void* p, int32_t elem, int64_t i) {
  return elem == SALS_ELEM_F32 ? ((const uint32_t*)p)[i] : ((const uint16_t*)p)[i];
}
__device__ __forceinline__ float bits_value(uint32_t x, int32_t elem) {
  if (elem == SALS_ELEM_F32) return __uint_as_float(x);
  if (elem == SALS_ELEM_F16) return __half2float(__ushort_as_half((unsigned short)x));
  return __bfloat162float(__ushort_as_bfloat16((unsigned short)x));
}

/* Channels of a row staged per pass: kVPer per thread, loaded before any is used. */
constexpr int kVPer = 16, kVChunk = kRowThreads * kVPer;

/* Where one token's value goes: `full` [Dk] in the storage type (value_bits 16), or codes from
 * `packed` with the float16 scale and zero of group g at scale[g], zero[g]. */
template <typename T> struct ValueDst {
  T* full; /* NULL when quantised */
  uint8_t* packed;
  uint16_t* scale;
  uint16_t* zero;
};

/*
 * The value of one appended row (channel i of v at voff(i), of k at koff(i), i < dk) by a block
 * of kRowThreads, every thread calling. Channels are read coalesced (thread i takes channels i,
 * i + 256, ...), all of a pass at once, and staged in shared memory (xs: kVChunk + kVChunk / 32
 * floats); then a segment of lanes per quantisation group runs quantize_group_seg on the staged
 * copy (one padding float per 32 keeps the group-strided reads free of bank conflicts): at a
 * decode step the row is one block, and one thread per group left most of it idle on a serial
 * min/max and packing loop. A pass covers whole groups; a group longer than a pass is read from
 * global memory instead.
 * exact(ch, k, v) stores channel ch's exact key and value where with_exact (k is read for it).
 * With `flags` (check_finite) the block also checks the row's k and v, raising flags[kFlagK] /
 * flags[kFlagV]: the append needs no finite-check launches.
 */
template <typename T, typename Exact>
__device__ __forceinline__ void store_value_row(const DView& k, const DView& v, const RowOff& koff,
                                                const RowOff& voff, int32_t dk, int32_t bits,
                                                int32_t group, const ValueDst<T>& dst,
                                                bool with_exact, Exact exact, int* flags,
                                                float* xs) {
  T* const full = dst.full;
  const bool staged = bits == 16 || group <= kVChunk;
  const int32_t span = bits == 16 || !staged ? kVChunk : kVChunk / group * group;
  for (int32_t c0 = 0; c0 < dk; c0 += span) {
    const int32_t cn = dk - c0 < span ? dk - c0 : span;
    uint32_t vb[kVPer], kb[kVPer];
#pragma unroll
    for (int j = 0; j < kVPer; ++j) {
      const int32_t i = threadIdx.x + j * kRowThreads;
      vb[j] = i < cn ? load_bits(v.data, v.elem, voff(c0 + i)) : 0u;
      kb[j] = i < cn && (with_exact || flags) ? load_bits(k.data, k.elem, koff(c0 + i)) : 0u;
    }
#pragma unroll
    for (int j = 0; j < kVPer; ++j) {
      const int32_t i = threadIdx.x + j * kRowThreads, ch = c0 + i;
      if (i >= cn) break;
      const float vx = bits_value(vb[j], v.elem), kx = bits_value(kb[j], k.elem);
      if (flags && !isfinite(kx)) flags[kFlagK] = 1;
      if (flags && !isfinite(vx)) flags[kFlagV] = 1;
      if (with_exact) exact(ch, kx, vx);
      if (full) full[ch] = from_f<T>(vx);
      else xs[i + i / 32] = vx;
    }
    if (full) continue;
    __syncthreads();
    /* groups that start in this pass (all of them lie in it when staged), one per segment of
     * `seg` lanes: the power of two covering the group (at most a warp), halved until the
     * pass's groups fit the block at once */
    const int32_t g_lo = (c0 + group - 1) / group, g_hi = (c0 + cn - 1) / group + 1;
    int32_t seg = group >= 32 ? 32 : 1 << (32 - __clz(group - 1));
    while (seg > 1 && (g_hi - g_lo) * seg > kRowThreads) seg >>= 1;
    const int32_t per_warp = 32 / seg, lane = threadIdx.x & 31;
    for (int32_t g0 = g_lo + (int32_t)(threadIdx.x >> 5) * per_warp; g0 < g_hi;
         g0 += kRowThreads / 32 * per_warp) {
      const int32_t g = g0 + lane / seg, e0 = g * group;
      auto x_at = [&](int32_t e) {
        const int32_t i = e0 + e - c0;
        return staged ? xs[i + i / 32] : load_elem(v.data, v.elem, voff(e0 + e));
      };
      /* group * bits is a multiple of 8: each group owns whole bytes */
      quantize_group_seg(x_at, g < g_hi, lane % seg, seg, group, bits,
                         dst.packed + (int64_t)e0 * bits / 8, dst.scale + g, dst.zero + g);
    }
    __syncthreads();
  }
}

/* ---- the key projection U^T k ---------------------------------------------------------------- */

/* Input projection row m = b*T + t, column i = h*d + e of a [B, T, Hkv, d] view. */
template <typename E> struct KRowLoad {
  DView k;
  int32_t T, d;
  __device__ float operator()(int64_t m, int64_t i, int32_t = 0) const {
    const int64_t b = T == 1 ? m : m / T; /* decode: no 64-bit division per element */
    return load_as<E>(k.data, RowOff(k, b, m - b * T, d)((int32_t)i));
  }
};
/*
 * A operand of the prefill projection on tensor cores. 16-bit U and 16-bit keys alone would
 * round the latent keys (and so the scores) well above float32: with x = x_hi + x_lo and
 * U = U_hi + U_lo split into 16-bit parts, the product runs over K' = 3K (or 2K when the keys
 * are already in the storage type, x_lo = 0) as [x_hi, x_hi, x_lo] . [U_hi; U_lo; U_hi], which
 * is float32-accurate up to the dropped x_lo U_lo term. Column i of segment i / K is key
 * coordinate i % K.
 */
template <typename T> struct KRowLoad8 {
  DView k;
  int64_t M, K;
  int32_t steps, d; /* steps: T of the [B, T, Hkv, d] view */
  __device__ void load8(int64_t m, int64_t i, T* dst) const {
    const int64_t seg = i / K;
    if (m >= M || seg >= 3) {
#pragma unroll
      for (int e = 0; e < 8; ++e) dst[e] = from_f<T>(0.f);
      return;
    }
    i -= seg * K;
    const int64_t o = off4(k, m / steps, m % steps, i / d, i % d);
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const float x = load_elem(k.data, k.elem, o + e);
      const T hi = from_f<T>(x);
      dst[e] = seg == 2 ? from_f<T>(x - to_f<T>(hi)) : hi;
    }
  }
};
struct FloatMatLoad {
  const float* p;
  int64_t ld;
  __device__ float operator()(int64_t i, int64_t j) const { return p[i * ld + j]; }
};
/* Quantised latent keys: the projection's epilogue writes row m of a chunk of the append's rows
 * to a float32 workspace, quantize_latent_kernel then stores it. */
struct LatentWsEpi {
  float* ws;
  int32_t N;
  __device__ void operator()(int64_t m, int64_t n, float x) const { ws[m * N + n] = x; }
};
/* A row loader seen from row m0 on (the chunks of a quantised-key append). */
template <typename L> struct RowShift {
  L l;
  int64_t m0;
  __device__ float operator()(int64_t m, int64_t i, int32_t hs = 0) const {
    return l(m + m0, i, hs);
  }
  template <typename D> __device__ void load8(int64_t m, int64_t i, D* dst) const {
    l.load8(m + m0, i, dst);
  }
};
template <typename T> struct Type {
  typedef T type;
};

/* What the projection of an append multiplies by, and with which workspace. */
struct KeyProduct {
  const float* proj; /* [Dk, rank] float32 */
  const void* uh;    /* [3 Dk, rank] in the 16-bit storage type, [U_hi; U_lo; U_hi] */
  sals_dtype_t dtype;
  int32_t d;
  int64_t rank, dk;
  void* skinny_ws;     /* skinny_work of skinny_rows rows (counters zero): appends of at most */
  int64_t skinny_rows; /* skinny_rows rows run the split-K product (0: never) */
};

/*
 * The projection U^T k of rows [m0, m0 + Mc) of k, a [B, T, Hkv, d] view of M = B T rows, by
 * the product that fits: tensor cores (16-bit storage, M >= 64), the skinny split-K product (a
 * decode step's few rows) or float32 tiles. make_epi(Type<S>{}) gives the epilogue for storage
 * type S: epi(m, n, x) for row m (m - m0 with kQuant, whose chunks go to a workspace) and latent
 * coordinate n.
 */
template <bool kQuant, typename MakeEpi>
sals_status_t project_keys(const KeyProduct& p, const DView& k, int32_t T, int64_t m0, int64_t Mc,
                           MakeEpi make_epi, cudaStream_t st) {
  const int32_t d = p.d;
  const int64_t M = k.shape[0] * T, N = p.rank, K = p.dk;
  auto rows = [&](auto load) {
    if constexpr (kQuant) return RowShift<decltype(load)>{load, m0};
    else return load;
  };
  const bool tc = p.dtype != SALS_DTYPE_FLOAT32 && M >= 64 && d % 8 == 0 && N % 8 == 0;
  const bool k_exact = (k.elem == SALS_ELEM_F16 && p.dtype == SALS_DTYPE_FLOAT16) ||
                       (k.elem == SALS_ELEM_BF16 && p.dtype == SALS_DTYPE_BFLOAT16);
  const int64_t K3 = (k_exact ? 2 : 3) * K; /* see KRowLoad8 */
  if (tc && p.dtype == SALS_DTYPE_FLOAT16) {
    SALS_CUDA_TRY(hgemm<__half>(Mc, N, K3, rows(KRowLoad8<__half>{k, M, K, T, d}),
                                (const __half*)p.uh, make_epi(Type<__half>{}), st));
  } else if (tc) {
    SALS_CUDA_TRY(hgemm<__nv_bfloat16>(Mc, N, K3, rows(KRowLoad8<__nv_bfloat16>{k, M, K, T, d}),
                                       (const __nv_bfloat16*)p.uh, make_epi(Type<__nv_bfloat16>{}),
                                       st));
  } else if (M <= p.skinny_rows) { /* a decode step: a few rows, U read once */
    const SkinnyWork w = skinny_work(p.skinny_ws, p.skinny_rows, N, 1);
    SALS_DISPATCH_DTYPE(
        p.dtype, T_, SALS_DISPATCH_FLOAT_ELEM(k.elem, E, {
          SALS_CUDA_TRY(skinny((int32_t)Mc, (int32_t)N, (int32_t)K, 1, p.proj, N, 0,
                               rows(KRowLoad<E>{k, T, d}), w, make_epi(Type<T_>{}), st));
        }));
  } else {
    SALS_DISPATCH_DTYPE(p.dtype, T_, SALS_DISPATCH_FLOAT_ELEM(k.elem, E, {
                          SALS_CUDA_TRY(sgemm(Mc, N, K, rows(KRowLoad<E>{k, T, d}),
                                              FloatMatLoad{p.proj, N}, make_epi(Type<T_>{}), st));
                        }));
  }
  return SALS_OK;
}

/*
 * Quantised latent keys of Mc rows of an append (ws: their float32 latent rows, [Mc][rank]),
 * stored as the CPU's store_latent does: the score part [0, score_rank) and the rest
 * [score_rank, rank) each as the value path's groups (quantize_group, the same rounding), one
 * thread per (row, group); key_group divides both parts, so group g of the whole row starts at
 * coordinate g * key_group. dst(m, part, &codes, &scale, &zero) names where row m keeps part
 * `part` (0: score, 1: rest), false for a row not stored. flag (when checking): raised if a
 * group's float16 scale or zero overflowed, the case the CPU's check_storable refuses.
 */
template <typename Dst>
__global__ void quantize_latent_kernel(Dst dst, const float* __restrict__ ws, int64_t Mc,
                                       int32_t rank, int32_t score_rank, int32_t kg, int32_t bits,
                                       int* flag) {
  const int32_t ngs = score_rank / kg, ng = rank / kg;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < Mc * ng;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t m = i / ng;
    const int32_t g = (int32_t)(i % ng);
    const bool score = g < ngs;
    uint8_t* packed;
    uint16_t *sc, *zr;
    if (!dst(m, score ? 0 : 1, &packed, &sc, &zr)) continue;
    const int32_t lg = score ? g : g - ngs;
    packed += (int64_t)lg * kg * bits / 8;
    sc += lg;
    zr += lg;
    const float* x = ws + m * rank + (int64_t)g * kg;
    quantize_group([&](int32_t e) { return x[e]; }, kg, bits, packed, sc, zr);
    if (flag && ((*sc & 0x7c00u) == 0x7c00u || (*zr & 0x7c00u) == 0x7c00u)) *flag = 1;
  }
}

/* Launch quantize_latent_kernel over Mc rows. */
template <typename Dst>
cudaError_t launch_quantize_latent(Dst dst, const float* ws, int64_t Mc, int32_t rank,
                                   int32_t score_rank, int32_t kg, int32_t bits, int* flag,
                                   cudaStream_t st) {
  const int64_t blocks = cdiv(Mc * (rank / kg), 256);
  if (blocks == 0) return cudaSuccess;
  quantize_latent_kernel<<<(unsigned)(blocks < 4096 ? blocks : 4096), 256, 0, st>>>(
      dst, ws, Mc, rank, score_rank, kg, bits, flag);
  return cudaPeekAtLastError();
}

}  // namespace sals_cuda

#endif /* SALS_CUDA_STORE_CUH_ */
