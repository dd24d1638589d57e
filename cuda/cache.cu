/*
 * The cache on a CUDA device: allocation (everything, workspace included, at creation),
 * reset, append (slot assignment on the device, projection, value quantisation, exact
 * windows) and the small copy-out entry points. Attention lives in attend.cu.
 *
 * Append is graph-capturable with check_finite = 0: destination slots are computed from the
 * device-resident lengths, and a slot past max_tokens (only reachable by replaying a captured
 * graph past the capacity the host reserved) is dropped rather than written out of bounds.
 */
#include <string.h>

#include <new>

#include "common.cuh"
#include "gemm.cuh"

namespace sals_cuda {
namespace {

constexpr int kScanThreads = 256;
/* Rows of an append projected at a time with quantised latent keys (float32 workspace). */
constexpr int64_t kLatChunk = 2048;

/* Finite check over a strided view of up to 4 dims; sets *flag when a NaN/inf is seen (a
 * plain store of 1: any number of writers agree). */
__global__ void finite_kernel(DView v, int64_t n, int* flag) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    int64_t r = i, off = 0;
    for (int d = SALS_MAX_DIMS - 1; d >= 0; --d) {
      off += (r % v.shape[d]) * v.stride[d];
      r /= v.shape[d];
    }
    if (!isfinite(load_elem(v.data, v.elem, off))) *flag = 1;
  }
}

/*
 * Slots of the T rows of sequence b, in order: rows with pos >= 0 take consecutive slots from
 * len[b], and a slot past max_tokens is dropped (-1). Writes dest, cpos, len[b] and newlen[b].
 * Run by a whole block of kScanThreads threads; returns to every thread the new length and the
 * slot of row threadIdx.x (of the last 256-row chunk when T > kScanThreads).
 */
struct Slots {
  int32_t len, slot;
};
__device__ Slots assign_slots(const DView& pos, int32_t b, int32_t T, int32_t max_tokens,
                              int32_t* __restrict__ len, int32_t* __restrict__ newlen,
                              int32_t* __restrict__ cpos, int32_t* __restrict__ dest) {
  __shared__ int32_t warp_sum[kScanThreads / 32];
  __shared__ int32_t base_s;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  /* the first chunk's positions are loaded together with len[b] */
  int32_t p = (int32_t)threadIdx.x < T ? load_i32(pos, off2(pos, b, threadIdx.x)) : -1;
  if (threadIdx.x == 0) base_s = len[b];
  __syncthreads();
  int32_t slot = -1;
  for (int32_t t0 = 0; t0 < T; t0 += kScanThreads) {
    const int32_t t = t0 + threadIdx.x;
    if (t0 > 0) p = t < T ? load_i32(pos, off2(pos, b, t)) : -1;
    const int32_t valid = p >= 0;
    int32_t incl = valid;
    for (int o = 1; o < 32; o <<= 1) {
      int32_t y = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += y;
    }
    if (lane == 31) warp_sum[warp] = incl;
    __syncthreads();
    int32_t before = 0, total = 0;
    for (int w = 0; w < kScanThreads / 32; ++w) {
      if (w < warp) before += warp_sum[w];
      total += warp_sum[w];
    }
    const int32_t base = base_s;
    if (t < T) {
      int32_t sl = base + before + incl - 1;
      if (!valid || sl >= max_tokens) sl = -1;
      dest[(int64_t)b * T + t] = sl;
      if (sl >= 0) cpos[(int64_t)b * max_tokens + sl] = p;
      slot = sl;
    }
    __syncthreads();
    if (threadIdx.x == 0) base_s = base + total;
    __syncthreads();
  }
  const int32_t n = base_s < max_tokens ? base_s : max_tokens;
  if (threadIdx.x == 0) {
    len[b] = n;
    newlen[b] = n;
  }
  return Slots{n, slot};
}

/* One block per sequence: slots of a T > 1 append (a decode step assigns them in values_kernel). */
__global__ void __launch_bounds__(kScanThreads)
    slot_kernel(DView pos, int32_t T, int32_t max_tokens, int32_t* __restrict__ len,
                int32_t* __restrict__ newlen, int32_t* __restrict__ cpos,
                int32_t* __restrict__ dest) {
  assign_slots(pos, blockIdx.x, T, max_tokens, len, newlen, cpos, dest);
}

/* Latent row element (slot j of sequence b, coordinate n) split over the two arrays. */
template <typename T>
__device__ __forceinline__ void store_latent(const sals_cache_t& c, int64_t b, int64_t j, int64_t n,
                                             float x) {
  const int64_t rs = c.cfg.score_rank, rr = c.cfg.rank - c.cfg.score_rank;
  const int64_t row = b * c.cfg.max_tokens + j;
  if (n < rs) ((T*)c.lat_score)[row * rs + n] = from_f<T>(x);
  else ((T*)c.lat_rest)[row * rr + (n - rs)] = from_f<T>(x);
}

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
constexpr int kVPer = 16, kVChunk = kScanThreads * kVPer;

/*
 * Values and exact windows of one appended row (m = b * T + t) per block of kScanThreads. With
 * T == 1 the block first assigns its sequence's slot (a decode step needs no slot kernel).
 * Channels are read coalesced (thread i takes channels i, i + 256, ...), all of a pass at once,
 * and staged in shared memory; then a segment of lanes per quantisation group runs
 * quantize_group_seg on the staged copy (one padding float per 32 keeps the group-strided reads
 * free of bank conflicts): at a decode step the row is one block, and one thread per group
 * left most of it idle on a serial min/max and packing loop.
 * A pass covers whole groups; a group longer than a pass is read from global memory instead.
 * Three blocks per SM leave registers for a pass's 32 loads in flight without spills.
 * With `flags` (check_finite), the block also checks its row's k and v, raising flags[0] / [1]:
 * the append needs no finite-check launches. Padding rows (no slot) are not checked, as on the
 * CPU.
 */
template <typename T>
__global__ void __launch_bounds__(kScanThreads, 3)
    values_kernel(sals_cache_t c, DView k, DView v, DView pos, int32_t T_,
                  int32_t* __restrict__ len, int32_t* __restrict__ newlen,
                  int32_t* __restrict__ cpos, int32_t* __restrict__ dest, int* flags) {
  __shared__ float xs[kVChunk + kVChunk / 32];
  __shared__ int32_t slot_s, len_s;
  const int32_t b = blockIdx.x / T_, t = blockIdx.x % T_;
  int32_t slot, n;
  if (T_ == 1) {
    /* assign_slots for one row, by one thread: no block scan, two barriers fewer */
    if (threadIdx.x == 0) {
      const int32_t p = load_i32(pos, off2(pos, b, 0)), l0 = len[b], max_tokens = c.cfg.max_tokens;
      const int32_t sl = p >= 0 && l0 < max_tokens ? l0 : -1;
      const int32_t nl = l0 + (p >= 0) < max_tokens ? l0 + (p >= 0) : max_tokens;
      dest[b] = sl;
      if (sl >= 0) cpos[(int64_t)b * max_tokens + sl] = p;
      len[b] = nl;
      newlen[b] = nl;
      slot_s = sl;
      len_s = nl;
    }
    __syncthreads();
    slot = slot_s;
    n = len_s;
  } else {
    slot = dest[blockIdx.x];
    n = newlen[b];
  }
  if (slot < 0) return;
  const int32_t d = c.cfg.head_dim, dk = c.dk, bits = c.cfg.value_bits;
  const int32_t group = c.cfg.value_group;
  const int64_t row = (int64_t)b * c.cfg.max_tokens + slot;
  const bool sink = slot < c.cfg.n_sink;
  const bool recent = c.cfg.n_recent > 0 && slot >= n - c.cfg.n_recent;
  T* sk = sink ? (T*)c.sink_k + ((int64_t)b * c.cfg.n_sink + slot) * dk : nullptr;
  T* sv = sink ? (T*)c.sink_v + ((int64_t)b * c.cfg.n_sink + slot) * dk : nullptr;
  T* rk = recent ? (T*)c.recent_k + ((int64_t)b * c.cfg.n_recent + slot % c.cfg.n_recent) * dk
                 : nullptr;
  T* rv = recent ? (T*)c.recent_v + ((int64_t)b * c.cfg.n_recent + slot % c.cfg.n_recent) * dk
                 : nullptr;
  T* full = bits == 16 ? (T*)c.val + row * dk : nullptr;
  uint8_t* packed = (uint8_t*)c.val + row * c.val_row_bytes;
  const bool staged = bits == 16 || group <= kVChunk;
  const int32_t span = bits == 16 || !staged ? kVChunk : kVChunk / group * group;
  const RowOff voff(v, b, t, d), koff(k, b, t, d);
  for (int32_t c0 = 0; c0 < dk; c0 += span) {
    const int32_t cn = dk - c0 < span ? dk - c0 : span;
    uint32_t vb[kVPer], kb[kVPer];
#pragma unroll
    for (int j = 0; j < kVPer; ++j) {
      const int32_t i = threadIdx.x + j * kScanThreads;
      vb[j] = i < cn ? load_bits(v.data, v.elem, voff(c0 + i)) : 0u;
      kb[j] = i < cn && (sink || recent || flags) ? load_bits(k.data, k.elem, koff(c0 + i)) : 0u;
    }
#pragma unroll
    for (int j = 0; j < kVPer; ++j) {
      const int32_t i = threadIdx.x + j * kScanThreads, ch = c0 + i;
      if (i >= cn) break;
      const float vx = bits_value(vb[j], v.elem), kx = bits_value(kb[j], k.elem);
      if (flags && !isfinite(kx)) flags[0] = 1;
      if (flags && !isfinite(vx)) flags[1] = 1;
      if (sink) {
        sk[ch] = from_f<T>(kx);
        sv[ch] = from_f<T>(vx);
      }
      if (recent) {
        rk[ch] = from_f<T>(kx);
        rv[ch] = from_f<T>(vx);
      }
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
    while (seg > 1 && (g_hi - g_lo) * seg > kScanThreads) seg >>= 1;
    const int32_t per_warp = 32 / seg, lane = threadIdx.x & 31;
    for (int32_t g0 = g_lo + (int32_t)(threadIdx.x >> 5) * per_warp; g0 < g_hi;
         g0 += kScanThreads / 32 * per_warp) {
      const int32_t g = g0 + lane / seg, e0 = g * group;
      auto x_at = [&](int32_t e) {
        const int32_t i = e0 + e - c0;
        return staged ? xs[i + i / 32] : load_elem(v.data, v.elem, voff(e0 + e));
      };
      /* group * bits is a multiple of 8: each group owns whole bytes */
      quantize_group_seg(x_at, g < g_hi, lane % seg, seg, group, bits,
                         packed + (int64_t)e0 * bits / 8, &c.val_scale[row * c.n_groups + g],
                         &c.val_zero[row * c.n_groups + g]);
    }
    __syncthreads();
  }
}

/* dst = [U_hi; U_lo; U_hi] with U_hi = T(U), U_lo = T(U - U_hi): see KRowLoad8. */
template <typename T>
__global__ void convert_proj_kernel(const float* src, T* dst, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    const T hi = from_f<T>(src[i]);
    dst[i] = hi;
    dst[n + i] = from_f<T>(src[i] - to_f<T>(hi));
    dst[2 * n + i] = hi;
  }
}

__global__ void lengths_kernel(const int32_t* len, DView out, int32_t B) {
  int32_t b = blockIdx.x * blockDim.x + threadIdx.x;
  if (b < B) ((int32_t*)out.data)[b * out.stride[0]] = len[b];
}

__global__ void selected_kernel(const int32_t* sel, const int32_t* cnt, int32_t H,
                                int32_t max_tokens, DView idx, DView count) {
  const int32_t b = blockIdx.y / H, h = blockIdx.y % H;
  const int32_t n = cnt[b];
  const int64_t N = idx.shape[2];
  for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < N;
       j += (int64_t)gridDim.x * blockDim.x) {
    int32_t x = (j < n && j < max_tokens) ? sel[((int64_t)b * H + h) * max_tokens + j] : -1;
    ((int32_t*)idx.data)[off3(idx, b, h, j)] = x;
  }
  if (h == 0 && blockIdx.x == 0 && threadIdx.x == 0)
    ((int32_t*)count.data)[b * count.stride[0]] = n;
}

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
template <typename T> struct LatentEpi {
  sals_cache_t c;
  const int32_t* dest;
  int32_t T_;
  __device__ void operator()(int64_t m, int64_t n, float x) const {
    const int32_t slot = __ldg(dest + m); /* written by an earlier kernel: read-only here */
    if (slot >= 0) store_latent<T>(c, m / T_, slot, n, x);
  }
};

/* Quantised latent keys: the projection's epilogue writes row m of a chunk of the append's rows
 * to the float32 workspace, quantize_latent_kernel then stores it. */
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

/*
 * Quantised latent keys of rows [m0, m0 + Mc) of an append (ws: their float32 latent rows,
 * [Mc][rank]), stored as the CPU's store_latent does: the score part [0, score_rank) and the
 * rest [score_rank, rank) each as the value path's groups (quantize_group, the same rounding),
 * one thread per (row, group); key_group divides both parts, so group g of the whole row starts
 * at coordinate g * key_group. flag (when checking): raised if a group's float16 scale or zero
 * overflowed, the case the CPU's check_storable refuses.
 */
__global__ void quantize_latent_kernel(sals_cache_t c, const float* __restrict__ ws,
                                       const int32_t* __restrict__ dest, int64_t m0, int64_t Mc,
                                       int32_t T_, int* flag) {
  const int32_t kg = c.cfg.key_group, bits = c.cfg.key_bits, r = c.cfg.rank;
  const int32_t ngs = c.cfg.score_rank / kg, ng = r / kg;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < Mc * ng;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t m = i / ng;
    const int32_t g = (int32_t)(i % ng);
    const int32_t slot = __ldg(dest + m0 + m);
    if (slot < 0) continue;
    const int64_t row = (m0 + m) / T_ * c.cfg.max_tokens + slot;
    const bool score = g < ngs;
    const int32_t lg = score ? g : g - ngs, part_groups = score ? ngs : ng - ngs;
    uint8_t* packed = (uint8_t*)(score ? c.lat_score : c.lat_rest) +
                      row * (score ? c.lat_score_bytes : c.lat_rest_bytes) +
                      (int64_t)lg * kg * bits / 8;
    uint16_t* sc = (score ? c.lat_score_scale : c.lat_rest_scale) + row * part_groups + lg;
    uint16_t* zr = (score ? c.lat_score_zero : c.lat_rest_zero) + row * part_groups + lg;
    const float* x = ws + m * r + (int64_t)g * kg;
    quantize_group([&](int32_t e) { return x[e]; }, kg, bits, packed, sc, zr);
    if (flag && ((*sc & 0x7c00u) == 0x7c00u || (*zr & 0x7c00u) == 0x7c00u)) *flag = 1;
  }
}

/* What each deferred check reports: the finite checks of k, v and q (the flag index), then the
 * latent range of quantised keys. */
constexpr const char* kFlagWhat[] = {
    "k: an earlier call's input held NaN or infinity",
    "v: an earlier call's input held NaN or infinity",
    "q: an earlier call's input held NaN or infinity",
    "k: an earlier call's latent coordinates spanned more than the float16 scale and zero of "
    "quantised keys hold"};
constexpr int kFiniteCount = 4, kLatentFlag = 3;

/* Report (and clear) what earlier checks found: NOT_FINITE naming the argument. Reads the
 * mapped flags without synchronising, so it sees the checks whose kernels have completed. */
sals_status_t report_finite(CacheState* s) {
  volatile int* flags = s->flag_host;
  for (int i = 0; i < kFiniteCount; ++i) {
    if (flags[i]) {
      for (int j = 0; j < kFiniteCount; ++j) flags[j] = 0;
      return sals_set_error(SALS_ERR_NOT_FINITE,
                            "%s (CUDA checks run on the device and report at the next call or "
                            "sals_cache_check; the cache holds that token: reset it)",
                            kFlagWhat[i]);
    }
  }
  return SALS_OK;
}

/* Report what earlier checks found, then enqueue the check of input x, raising flag `which`. No
 * host synchronisation, no copy: graph capturable. (An append's k and v, and a sparse decode
 * step's q, are checked inside the kernels that read them instead.) */
sals_status_t check_finite(sals_cache_t* c, const sals_view_t* x, int which, cudaStream_t st) {
  CacheState* s = state(c);
  SALS_TRY(report_finite(s));
  int64_t n = 1;
  for (int d = 0; d < x->ndim; ++d) n *= x->shape[d];
  if (n == 0) return SALS_OK;
  int64_t blocks = cdiv(n, 256);
  if (blocks > 4096) blocks = 4096;
  finite_kernel<<<(unsigned)blocks, 256, 0, st>>>(dview(x), n, s->flag + which);
  SALS_CUDA_LAUNCHED("finite");
  return SALS_OK;
}

template <typename T> struct Type {
  typedef T type;
};

/*
 * The append's projection U^T k of rows [m0, m0 + Mc) of k (M = B * T rows in all), by the
 * product that fits: tensor cores (16-bit storage, M >= 64), the skinny split-K product (a decode
 * step's few rows) or float32 tiles. kQuant = false: the whole append (m0 = 0, Mc = M), the
 * epilogue storing the latent rows; kQuant = true: one chunk, written to the float32 workspace
 * (row m - m0) for quantize_latent_kernel.
 */
template <bool kQuant>
sals_status_t project(sals_cache_t* c, const sals_view_t* k, int64_t m0, int64_t Mc,
                      cudaStream_t st) {
  CacheState* s = state(c);
  const int32_t T = (int32_t)k->shape[1], d = c->cfg.head_dim;
  const int64_t M = (int64_t)k->shape[0] * T, N = c->cfg.rank, K = c->dk;
  const sals_cache_t cv = *c;
  auto epi = [&](auto type) {
    typedef typename decltype(type)::type T_;
    if constexpr (kQuant) return LatentWsEpi{s->lat_ws, (int32_t)N};
    else return LatentEpi<T_>{cv, s->dest, T};
  };
  auto rows = [&](auto load) {
    if constexpr (kQuant) return RowShift<decltype(load)>{load, m0};
    else return load;
  };
  const bool tc = c->cfg.dtype != SALS_DTYPE_FLOAT32 && M >= 64 && d % 8 == 0 && N % 8 == 0;
  const bool k_exact = (k->elem == SALS_ELEM_F16 && c->cfg.dtype == SALS_DTYPE_FLOAT16) ||
                       (k->elem == SALS_ELEM_BF16 && c->cfg.dtype == SALS_DTYPE_BFLOAT16);
  const int64_t K3 = (k_exact ? 2 : 3) * K; /* see KRowLoad8 */
  if (tc && c->cfg.dtype == SALS_DTYPE_FLOAT16) {
    SALS_CUDA_TRY(hgemm<__half>(Mc, N, K3, rows(KRowLoad8<__half>{dview(k), M, K, T, d}),
                                (const __half*)s->uh, epi(Type<__half>{}), st));
  } else if (tc) {
    SALS_CUDA_TRY(
        hgemm<__nv_bfloat16>(Mc, N, K3, rows(KRowLoad8<__nv_bfloat16>{dview(k), M, K, T, d}),
                             (const __nv_bfloat16*)s->uh, epi(Type<__nv_bfloat16>{}), st));
  } else if (M <= c->cfg.max_batch) { /* a decode step: a few rows, U read once */
    const SkinnyWork w = skinny_work(s->proj_part, c->cfg.max_batch, N, 1);
    SALS_DISPATCH_DTYPE(
        c->cfg.dtype, T_, SALS_DISPATCH_FLOAT_ELEM(k->elem, E, {
          SALS_CUDA_TRY(skinny((int32_t)Mc, (int32_t)N, (int32_t)K, 1, c->proj, N, 0,
                               rows(KRowLoad<E>{dview(k), T, d}), w, epi(Type<T_>{}), st));
        }));
  } else {
    SALS_DISPATCH_DTYPE(c->cfg.dtype, T_, SALS_DISPATCH_FLOAT_ELEM(k->elem, E, {
                          SALS_CUDA_TRY(sgemm(Mc, N, K, rows(KRowLoad<E>{dview(k), T, d}),
                                              FloatMatLoad{c->proj, N}, epi(Type<T_>{}), st));
                        }));
  }
  return SALS_OK;
}

}  // namespace

/* Exposed to attend.cu. */
sals_status_t ensure_uh(sals_cache_t* c, cudaStream_t st) {
  CacheState* s = state(c);
  if (s->uh_ready || c->cfg.dtype == SALS_DTYPE_FLOAT32) return SALS_OK;
  const int64_t n = (int64_t)c->dk * c->cfg.rank;
  SALS_DISPATCH_DTYPE(c->cfg.dtype, T, {
    convert_proj_kernel<T>
        <<<(unsigned)cdiv(n, 256) < 4096 ? (unsigned)cdiv(n, 256) : 4096, 256, 0, st>>>(
            c->proj, (T*)s->uh, n);
  });
  SALS_CUDA_LAUNCHED("convert_proj");
  s->uh_ready = true;
  return SALS_OK;
}

sals_status_t cache_report_finite(sals_cache_t* c) { return report_finite(state(c)); }

sals_status_t cache_check_finite(sals_cache_t* c, const sals_view_t* x, int which,
                                 cudaStream_t st) {
  return check_finite(c, x, which, st);
}

}  // namespace sals_cuda

using namespace sals_cuda;

extern "C" {

int32_t sals_cuda_device_usable(void) {
  /* Asked before every CUDA call: look once (devices and drivers do not appear at run time). */
  static const int32_t usable = [] {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
      cudaGetLastError();
      return 0;
    }
    return n > 0 ? 1 : 0;
  }();
  return usable;
}

sals_status_t sals_cuda_upload(void* dst, const void* src, size_t bytes) {
  SALS_CUDA_TRY(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice));
  return SALS_OK;
}

sals_status_t sals_cuda_download(void* dst_host, const void* src_dev, size_t bytes) {
  SALS_CUDA_TRY(cudaMemcpy(dst_host, src_dev, bytes, cudaMemcpyDeviceToHost));
  return SALS_OK;
}

static void device_free(void* p) { cudaFree(p); }

void sals_cuda_cache_free(sals_cache_t* c) {
  if (!c) return;
  DeviceGuard g(c->cfg.device.device_id);
  sals_cache_release_buffers(c, device_free);
  CacheState* s = state(c);
  if (s) {
    void* sp[] = {s->uh,     s->dest,    s->newlen,    s->qlat,  s->scores, s->topk_ws, s->logits,
                  s->part_o, s->part_ml, s->proj_part, s->qpart, s->lat_ws, s->pv_done};
    for (void* p : sp)
      if (p) cudaFree(p);
    if (s->flag_host) cudaFreeHost(s->flag_host);
    delete s;
    c->backend = nullptr;
  }
}

/* Splits of the decode softmax per (sequence, KV head), one partial each per query head: enough
 * to fill the device at batch 1, within [2, 64] so the workspace stays small. */
static int parts_for(const sals_cache_t* c, int num_sms) {
  int p = (2 * num_sms + c->cfg.n_head_kv - 1) / c->cfg.n_head_kv;
  if (p < 2) p = 2;
  if (p > 64) p = 64;
  return p;
}

sals_status_t sals_cuda_cache_init(sals_cache_t* c) {
  const sals_config_t& cf = c->cfg;
  SALS_CUDA_TRY(cudaSetDevice(cf.device.device_id));
  CacheState* s = new (std::nothrow) CacheState();
  if (!s) return sals_set_error(SALS_ERR_OUT_OF_MEMORY, "cuda cache: host state");
  memset(s, 0, sizeof(*s));
  c->backend = s;
  s->device = cf.device.device_id;
  cudaDeviceProp prop;
  SALS_CUDA_TRY(cudaGetDeviceProperties(&prop, s->device));
  s->num_sms = prop.multiProcessorCount;
  const size_t es = cf.dtype == SALS_DTYPE_FLOAT32 ? 4 : 2;
  const int64_t B = cf.max_batch, S = cf.max_tokens, dk = c->dk, r = cf.rank, rs = cf.score_rank,
                H = c->n_sel_heads, Hq = cf.n_head_q, d = cf.head_dim;
  uint64_t total = 0;
  bool oom = false;
  auto alloc = [&](void** p, size_t bytes) {
    if (bytes == 0 || oom) return;
    if (cudaMalloc(p, bytes) != cudaSuccess) {
      cudaGetLastError();
      *p = nullptr;
      oom = true;
      return;
    }
    total += bytes;
  };
  const int32_t rot = c->rotary_dim;
  alloc((void**)&c->inv_freq, (size_t)(rot / 2 > 0 ? rot / 2 : 1) * 4);
  alloc((void**)&c->proj, (size_t)dk * r * 4);
  alloc(&c->lat_score, (size_t)(B * S * c->lat_score_bytes));
  if (r > rs) alloc(&c->lat_rest, (size_t)(B * S * c->lat_rest_bytes));
  if (cf.key_bits < 16) {
    const int64_t kg = cf.key_group;
    alloc((void**)&c->lat_score_scale, (size_t)(B * S * (rs / kg)) * 2);
    alloc((void**)&c->lat_score_zero, (size_t)(B * S * (rs / kg)) * 2);
    alloc((void**)&c->lat_rest_scale, (size_t)(B * S * ((r - rs) / kg)) * 2);
    alloc((void**)&c->lat_rest_zero, (size_t)(B * S * ((r - rs) / kg)) * 2);
  }
  alloc(&c->val, (size_t)B * S * c->val_row_bytes);
  if (cf.value_bits != 16) {
    alloc((void**)&c->val_scale, (size_t)B * S * c->n_groups * 2);
    alloc((void**)&c->val_zero, (size_t)B * S * c->n_groups * 2);
  }
  if (cf.n_sink > 0) {
    alloc(&c->sink_k, (size_t)B * cf.n_sink * dk * es);
    alloc(&c->sink_v, (size_t)B * cf.n_sink * dk * es);
  }
  if (cf.n_recent > 0) {
    alloc(&c->recent_k, (size_t)B * cf.n_recent * dk * es);
    alloc(&c->recent_v, (size_t)B * cf.n_recent * dk * es);
  }
  alloc((void**)&c->pos, (size_t)B * S * 4);
  alloc((void**)&c->len, (size_t)B * 4);
  alloc((void**)&c->sel_idx, (size_t)B * H * S * 4);
  alloc((void**)&c->sel_count, (size_t)B * 4);
  /* workspace */
  if (cf.dtype != SALS_DTYPE_FLOAT32) alloc(&s->uh, (size_t)3 * dk * r * es);
  alloc((void**)&s->dest, (size_t)B * S * 4);
  alloc((void**)&s->newlen, (size_t)B * 4);
  alloc((void**)&s->qlat, (size_t)B * H * rs * 4);
  alloc((void**)&s->scores, (size_t)B * H * S * 4);
  const size_t topk_bytes = topk_workspace_bytes((int32_t)(B * H), S);
  alloc(&s->topk_ws, topk_bytes);
  alloc((void**)&s->logits, (size_t)B * Hq * attend_list_max(cf) * 4);
  s->max_parts = parts_for(c, s->num_sms);
  alloc((void**)&s->part_o, (size_t)B * Hq * s->max_parts * d * 4);
  alloc((void**)&s->part_ml, (size_t)B * Hq * s->max_parts * 2 * 4);
  alloc((void**)&s->pv_done, (size_t)B * c->cfg.n_head_kv * 4);
  alloc((void**)&s->proj_part, skinny_work_bytes(B, r, dk, 1));
  alloc((void**)&s->qpart, skinny_work_bytes(B, rs, dk, H));
  if (cf.key_bits < 16) {
    /* a decode step's rows in one chunk; longer appends in chunks of kLatChunk rows */
    const int64_t chunk = B > kLatChunk ? B : kLatChunk;
    s->lat_ws_rows = B * S < chunk ? B * S : chunk;
    alloc((void**)&s->lat_ws, (size_t)(s->lat_ws_rows * r) * 4);
  }
  if (!oom && (cudaHostAlloc((void**)&s->flag_host, kFiniteCount * sizeof(int),
                             cudaHostAllocMapped | cudaHostAllocPortable) != cudaSuccess ||
               cudaHostGetDevicePointer((void**)&s->flag, s->flag_host, 0) != cudaSuccess)) {
    cudaGetLastError();
    oom = true;
  }
  if (s->flag_host) memset(s->flag_host, 0, kFiniteCount * sizeof(int));
  if (oom) {
    sals_cuda_cache_free(c);
    return sals_set_error(SALS_ERR_OUT_OF_MEMORY,
                          "cuda cache: device allocation failed (max_batch %d, max_tokens %d)",
                          cf.max_batch, cf.max_tokens);
  }
  c->allocated = total;
  SALS_CUDA_TRY(cudaMemset(c->len, 0, (size_t)B * 4));
  SALS_CUDA_TRY(cudaMemset(c->sel_count, 0, (size_t)B * 4));
  SALS_CUDA_TRY(cudaMemset(c->pos, 0xff, (size_t)B * S * 4));
  SALS_CUDA_TRY(cudaMemset(s->topk_ws, 0, topk_bytes));
  SALS_CUDA_TRY(cudaMemset(s->pv_done, 0, (size_t)B * c->cfg.n_head_kv * 4));
  /* skinny arrival counters start at zero (the partials need no initial value) */
  SALS_CUDA_TRY(cudaMemset(s->proj_part, 0, skinny_work_bytes(B, r, dk, 1)));
  SALS_CUDA_TRY(cudaMemset(s->qpart, 0, skinny_work_bytes(B, rs, dk, H)));
  SALS_CUDA_TRY(cudaDeviceSynchronize());
  return SALS_OK;
}

sals_status_t sals_cuda_cache_reset(sals_cache_t* c, int64_t batch, void* stream) {
  DeviceGuard g(c->cfg.device.device_id);
  cudaStream_t st = (cudaStream_t)stream;
  SALS_CUDA_TRY(cudaMemsetAsync(c->len, 0, (size_t)batch * 4, st));
  SALS_CUDA_TRY(cudaMemsetAsync(c->sel_count, 0, (size_t)batch * 4, st));
  return SALS_OK;
}

sals_status_t sals_cuda_cache_append(sals_cache_t* c, const sals_view_t* k, const sals_view_t* v,
                                     const sals_view_t* pos, void* stream) {
  DeviceGuard g(c->cfg.device.device_id);
  cudaStream_t st = (cudaStream_t)stream;
  CacheState* s = state(c);
  const int32_t B = (int32_t)k->shape[0], T = (int32_t)k->shape[1];
  if ((int64_t)B * T == 0) return SALS_OK;
  /* values_kernel checks k and v (flags 0 and 1) as it reads them */
  if (c->cfg.check_finite) SALS_TRY(report_finite(s));
  int* const kv_flags = c->cfg.check_finite ? s->flag : nullptr;
  SALS_TRY(ensure_uh(c, st));
  const int64_t M = (int64_t)B * T, N = c->cfg.rank;
  const sals_cache_t cv = *c;
  /* slots first (a decode step, T == 1, assigns them in values_kernel), then values, then the
   * projection, whose epilogue reads the slots */
  if (T > 1) {
    slot_kernel<<<B, kScanThreads, 0, st>>>(dview(pos), T, c->cfg.max_tokens, c->len, s->newlen,
                                            c->pos, s->dest);
    SALS_CUDA_LAUNCHED("slot");
  }
  SALS_DISPATCH_DTYPE(c->cfg.dtype, T_, {
    values_kernel<T_><<<(unsigned)M, kScanThreads, 0, st>>>(
        cv, dview(k), dview(v), dview(pos), T, c->len, s->newlen, c->pos, s->dest, kv_flags);
  });
  SALS_CUDA_LAUNCHED("values");
  if (c->cfg.key_bits == 16) return project<false>(c, k, 0, M, st);
  /* quantised keys: each chunk of rows is projected to float32, then quantised */
  int* flag = c->cfg.check_finite ? s->flag + kLatentFlag : nullptr;
  const int64_t groups_per_row = N / c->cfg.key_group;
  for (int64_t m0 = 0; m0 < M; m0 += s->lat_ws_rows) {
    const int64_t mc = M - m0 < s->lat_ws_rows ? M - m0 : s->lat_ws_rows;
    SALS_TRY(project<true>(c, k, m0, mc, st));
    const int64_t blocks = cdiv(mc * groups_per_row, 256);
    quantize_latent_kernel<<<(unsigned)(blocks < 4096 ? blocks : 4096), 256, 0, st>>>(
        cv, s->lat_ws, s->dest, m0, mc, T, flag);
    SALS_CUDA_LAUNCHED("quantize latent");
  }
  return SALS_OK;
}

sals_status_t sals_cuda_cache_lengths(const sals_cache_t* c, const sals_view_t* out, void* stream) {
  DeviceGuard g(c->cfg.device.device_id);
  const int32_t B = (int32_t)out->shape[0];
  if (B == 0) return SALS_OK;
  lengths_kernel<<<(B + 127) / 128, 128, 0, (cudaStream_t)stream>>>(c->len, dview(out), B);
  SALS_CUDA_LAUNCHED("lengths");
  return SALS_OK;
}

sals_status_t sals_cuda_cache_check(sals_cache_t* c, int32_t wait, void* stream) {
  DeviceGuard g(c->cfg.device.device_id);
  cudaStream_t st = (cudaStream_t)stream;
  if (wait) {
    /* waiting is impossible while the stream is captured: report what is known */
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    SALS_CUDA_TRY(cudaStreamIsCapturing(st, &capture));
    if (capture == cudaStreamCaptureStatusNone) SALS_CUDA_TRY(cudaStreamSynchronize(st));
  }
  return report_finite(state(c));
}

sals_status_t sals_cuda_cache_lengths_host(const sals_cache_t* c, int32_t* out, void* stream) {
  DeviceGuard g(c->cfg.device.device_id);
  cudaStream_t st = (cudaStream_t)stream;
  SALS_CUDA_TRY(
      cudaMemcpyAsync(out, c->len, (size_t)c->cfg.max_batch * 4, cudaMemcpyDeviceToHost, st));
  SALS_CUDA_TRY(cudaStreamSynchronize(st));
  return SALS_OK;
}

sals_status_t sals_cuda_cache_selected(const sals_cache_t* c, const sals_view_t* idx,
                                       const sals_view_t* count, void* stream) {
  DeviceGuard g(c->cfg.device.device_id);
  const int32_t B = (int32_t)idx->shape[0], H = (int32_t)idx->shape[1];
  if (B == 0) return SALS_OK;
  const int64_t N = idx->shape[2];
  dim3 grid((unsigned)(N > 0 ? (cdiv(N, 256) < 64 ? cdiv(N, 256) : 64) : 1), (unsigned)(B * H));
  selected_kernel<<<grid, 256, 0, (cudaStream_t)stream>>>(
      c->sel_idx, c->sel_count, H, c->cfg.max_tokens, dview(idx), dview(count));
  SALS_CUDA_LAUNCHED("selected");
  return SALS_OK;
}

}  // extern "C"
