/*
 * Shared pieces of the CUDA backend: element access through validated views, conversions,
 * launch checks, tensor-core fragments and the CUDA-private cache state. Not API.
 */
#ifndef SALS_CUDA_COMMON_CUH_
#define SALS_CUDA_COMMON_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "internal.h"

#define SALS_CUDA_TRY(expr)                                                                   \
  do {                                                                                        \
    cudaError_t e_ = (expr);                                                                  \
    if (e_ != cudaSuccess)                                                                    \
      return sals_set_error(SALS_ERR_DEVICE, "%s: %s (%s:%d)", #expr, cudaGetErrorString(e_), \
                            __FILE__, __LINE__);                                              \
  } while (0)

/* After a launch: configuration errors surface here; faults surface at the next sync. */
#define SALS_CUDA_LAUNCHED(name) SALS_CUDA_TRY(cudaPeekAtLastError())

namespace sals_cuda {

static inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

/* A view as kernels see it: element type is a run-time tag, strides in elements. */
struct DView {
  const void* data;
  int32_t elem;
  int64_t shape[SALS_MAX_DIMS];
  int64_t stride[SALS_MAX_DIMS];
};

static inline DView dview(const sals_view_t* v) {
  DView d;
  d.data = v ? v->data : nullptr;
  d.elem = v ? (int32_t)v->elem : 0;
  for (int i = 0; i < SALS_MAX_DIMS; ++i) {
    d.shape[i] = (v && i < v->ndim) ? v->shape[i] : 1;
    d.stride[i] = (v && i < v->ndim) ? v->stride[i] : 0;
  }
  return d;
}

__device__ __forceinline__ float load_elem(const void* p, int32_t elem, int64_t i) {
  switch (elem) {
    case SALS_ELEM_F32: return ((const float*)p)[i];
    case SALS_ELEM_F16: return __half2float(((const __half*)p)[i]);
    case SALS_ELEM_BF16: return __bfloat162float(((const __nv_bfloat16*)p)[i]);
    case SALS_ELEM_I32: return (float)((const int32_t*)p)[i];
    default: return (float)((const uint8_t*)p)[i];
  }
}

__device__ __forceinline__ void store_elem(void* p, int32_t elem, int64_t i, float x) {
  switch (elem) {
    case SALS_ELEM_F32: ((float*)p)[i] = x; break;
    case SALS_ELEM_F16: ((__half*)p)[i] = __float2half_rn(x); break;
    case SALS_ELEM_BF16: ((__nv_bfloat16*)p)[i] = __float2bfloat16_rn(x); break;
    default: break;
  }
}

__device__ __forceinline__ int64_t off2(const DView& v, int64_t i, int64_t j) {
  return i * v.stride[0] + j * v.stride[1];
}
__device__ __forceinline__ int64_t off3(const DView& v, int64_t i, int64_t j, int64_t k) {
  return i * v.stride[0] + j * v.stride[1] + k * v.stride[2];
}
__device__ __forceinline__ int64_t off4(const DView& v, int64_t i, int64_t j, int64_t k,
                                        int64_t l) {
  return i * v.stride[0] + j * v.stride[1] + k * v.stride[2] + l * v.stride[3];
}
__device__ __forceinline__ int32_t load_i32(const DView& v, int64_t off) {
  return ((const int32_t*)v.data)[off];
}

/* Typed storage helpers for the cache's own compact arrays. */
template <typename T> __device__ __forceinline__ float to_f(T x);
template <> __device__ __forceinline__ float to_f<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_f<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

__device__ __forceinline__ float half_bits_to_f(uint16_t h) {
  return __half2float(__ushort_as_half(h));
}

/* Runs the statements with T = float, __half or __nv_bfloat16, picked by two conditions. */
#define SALS_DISPATCH_FLOAT(is_f32, is_f16, T, ...) \
  do {                                              \
    if (is_f32) {                                   \
      typedef float T;                              \
      __VA_ARGS__;                                  \
    } else if (is_f16) {                            \
      typedef __half T;                             \
      __VA_ARGS__;                                  \
    } else {                                        \
      typedef __nv_bfloat16 T;                      \
      __VA_ARGS__;                                  \
    }                                               \
  } while (0)
/* ... on the cache storage type (sals_dtype_t) */
#define SALS_DISPATCH_DTYPE(dtype, T, ...) \
  SALS_DISPATCH_FLOAT((dtype) == SALS_DTYPE_FLOAT32, (dtype) == SALS_DTYPE_FLOAT16, T, __VA_ARGS__)
/* ... on the element type of a float DView (SALS_ELEM_*) */
#define SALS_DISPATCH_FLOAT_ELEM(elem, T, ...) \
  SALS_DISPATCH_FLOAT((elem) == SALS_ELEM_F32, (elem) == SALS_ELEM_F16, T, __VA_ARGS__)

/*
 * RoPE of one pair at position p for frequency f (float32 theta, as the header specifies).
 * theta is reduced to [-pi, pi] in float32 with a two-part Cody-Waite split of 2 pi and fma
 * (each fma rounds once; the result is within about 3e-7 of the exact remainder for
 * |theta| < 2^24, i.e. any position below 16M at frequency 1; larger angles are reduced in
 * float64) and the hardware sine/cosine (absolute error ~5e-7 there) does the rest. sincosf
 * costs tens of instructions per pair, and a Payne-Hanek slow path with a local-memory frame
 * once theta passes ~1e5 (long contexts), in the loop every rebuilt key goes through; a float64
 * reduction for every angle runs F2F conversions and DFMA at a fraction of the float32 rate.
 */
__device__ __forceinline__ void rope_cs(int32_t p, float f, float att, float* c, float* s) {
  const float th = (float)p * f;
  float r;
  if (fabsf(th) < 16777216.f) {
    constexpr float kInvTwoPi = 0.15915494309189535f;
    constexpr float kTwoPiHi = 6.28318548202514648f;       /* float(2 pi) */
    constexpr float kTwoPiLo = -1.7484555314695172e-07f;   /* 2 pi - kTwoPiHi */
    const float k = rintf(th * kInvTwoPi);
    r = fmaf(-k, kTwoPiLo, fmaf(-k, kTwoPiHi, th));
  } else {
    constexpr double kTwoPi = 6.283185307179586476925286766559;
    const double k = rint((double)th * (1.0 / kTwoPi));
    r = (float)fma(-k, kTwoPi, (double)th);
  }
  float sn, cs;
  __sincosf(r, &sn, &cs);
  *c = cs * att;
  *s = sn * att;
}

/* Elements *a, *b of rotary pair i (rotary dimension rd), pairs per the header. */
__device__ __forceinline__ void rope_pair_index(int32_t i, int32_t rd, int32_t inter, int32_t* a,
                                                int32_t* b) {
  if (inter) {
    *a = 2 * i;
    *b = 2 * i + 1;
  } else {
    *a = i;
    *b = i + rd / 2;
  }
}

/* Element e of a head vector rotated at position p; x(j) reads element j of the unrotated
 * vector. Elements past rotary_dim pass through. */
template <typename X>
__device__ __forceinline__ float rope_elem(X x, int32_t e, int32_t p, const float* inv_freq,
                                           int32_t rotary_dim, int32_t inter, float att) {
  if (e >= rotary_dim) return x(e);
  const int32_t half = rotary_dim / 2;
  const int32_t pi = inter ? e / 2 : (e < half ? e : e - half);
  int32_t ea, eb;
  rope_pair_index(pi, rotary_dim, inter, &ea, &eb);
  float cs, sn;
  rope_cs(p, inv_freq[pi], att, &cs, &sn);
  const float xa = x(ea), xb = x(eb);
  return e == ea ? xa * cs - xb * sn : xb * cs + xa * sn;
}

/*
 * Quantisation of one group of channels exactly as the CPU backend does it: zero rounded down
 * and scale rounded up to float16, so [zero, zero + levels * scale] covers [min, max]; codes
 * packed little-endian into the group's whole bytes. GroupQuant holds a group's parameters
 * from its min and max; code() gives a channel's code.
 */
struct GroupQuant {
  float z, inv, levels;
  uint16_t scale, zero;
  __device__ __forceinline__ GroupQuant(float lo, float hi, int32_t bits) {
    levels = (float)((1 << bits) - 1);
    const __half zh = __float2half_rd(lo);
    z = __half2float(zh);
    const __half sh = __float2half_ru((hi - z) / levels);
    const float sc = __half2float(sh);
    inv = sc > 0.f ? 1.f / sc : 0.f;
    scale = __half_as_ushort(sh);
    zero = __half_as_ushort(zh);
  }
  __device__ __forceinline__ uint32_t code(float x) const {
    float q = (x - z) * inv + 0.5f;
    q = q < 0.f ? 0.f : (q > levels ? levels : q);
    return (uint32_t)q;
  }
};

/* One group (x_at(e) gives channel e as float) by one thread. */
template <typename F>
__device__ __forceinline__ void quantize_group(F x_at, int32_t group, int32_t bits, uint8_t* packed,
                                               uint16_t* scale, uint16_t* zero) {
  float lo = INFINITY, hi = -INFINITY;
  for (int32_t e = 0; e < group; ++e) {
    const float x = x_at(e);
    lo = fminf(lo, x);
    hi = fmaxf(hi, x);
  }
  const GroupQuant gq(lo, hi, bits);
  *scale = gq.scale;
  *zero = gq.zero;
  uint32_t acc = 0;
  int nb = 0;
  for (int32_t e = 0; e < group; ++e) {
    acc |= gq.code(x_at(e)) << nb;
    nb += bits;
    if (nb == 8) {
      *packed++ = (uint8_t)acc;
      acc = 0;
      nb = 0;
    }
  }
}

/* One group by an aligned segment of `seg` lanes (a power of two <= 32; lane `r` of it): the
 * lanes share the min/max scan and write one byte each at a time. Every lane of the warp calls
 * it together (the reductions are warp shuffles); lanes whose segment has no group pass
 * live = false. fminf/fmaxf are exact and order-free, so the result equals quantize_group's. */
template <typename F>
__device__ __forceinline__ void quantize_group_seg(F x_at, bool live, int32_t r, int32_t seg,
                                                   int32_t group, int32_t bits, uint8_t* packed,
                                                   uint16_t* scale, uint16_t* zero) {
  float lo = INFINITY, hi = -INFINITY;
  if (live)
    for (int32_t e = r; e < group; e += seg) {
      const float x = x_at(e);
      lo = fminf(lo, x);
      hi = fmaxf(hi, x);
    }
  for (int32_t o = seg / 2; o > 0; o >>= 1) {
    lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, o));
    hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, o));
  }
  if (!live) return;
  const GroupQuant gq(lo, hi, bits);
  if (r == 0) {
    *scale = gq.scale;
    *zero = gq.zero;
  }
  const int32_t per_byte = 8 / bits;
  for (int32_t j = r; j < group / per_byte; j += seg) {
    uint32_t acc = 0;
    for (int32_t e = 0; e < per_byte; ++e) acc |= gq.code(x_at(j * per_byte + e)) << (e * bits);
    packed[j] = (uint8_t)acc;
  }
}

/* Channels [col, col + N) of a quantised row (values, or one part of a latent key row): codes
 * packed little-endian from p, group g's float16 scale and zero at sc[g], zr[g] (g = channel /
 * group); col is a multiple of N. The same pointers work for a whole cache row in global memory
 * and for one head's slice staged in shared memory. N channels of one group come from one load
 * of their codes. */
template <int N>
__device__ __forceinline__ void decode_codes(const uint8_t* p, const uint16_t* sc,
                                             const uint16_t* zr, int64_t col, int32_t bits,
                                             int32_t group, float* dst) {
  const uint32_t mask = (1u << bits) - 1u;
  if (N > 1 && group % N == 0) {
    /* N * bits is 4, 8, 16, 32 or 64 bits, aligned to its own size */
    const int64_t bit0 = col * bits;
    const uint8_t* q = p + (bit0 >> 3);
    const int tb = N * bits;
    uint64_t w;
    if (tb <= 8) w = (uint64_t)(*q >> (bit0 & 7));
    else if (tb == 16) w = *reinterpret_cast<const uint16_t*>(q);
    else if (tb == 32) w = *reinterpret_cast<const uint32_t*>(q);
    else w = *reinterpret_cast<const uint64_t*>(q);
    const int64_t g = col / group;
    const float z = half_bits_to_f(zr[g]), s = half_bits_to_f(sc[g]);
#pragma unroll
    for (int e = 0; e < N; ++e) dst[e] = z + (float)((uint32_t)(w >> (e * bits)) & mask) * s;
    return;
  }
  for (int32_t e = 0; e < N; ++e) {
    const int64_t ch = col + e;
    const int64_t bit = ch * bits;
    const uint32_t code = (p[bit >> 3] >> (bit & 7)) & mask;
    const int64_t g = ch / group;
    dst[e] = half_bits_to_f(zr[g]) + (float)code * half_bits_to_f(sc[g]);
  }
}

/* Constant-size table of inv_freq for stateless kernels (passed by value, no allocation). */
struct RopeArgs {
  float inv_freq[256];
  int32_t rotary_dim;
  float att;
  int32_t inter;
};

/* ---- tensor-core fragments (mma.sync m16n8k16, fp32 accumulate) ------------------------ */

template <typename T> struct MmaKind;
template <> struct MmaKind<__half> {
  static constexpr bool bf16 = false;
};
template <> struct MmaKind<__nv_bfloat16> {
  static constexpr bool bf16 = true;
};

template <typename T>
__device__ __forceinline__ void mma16816(float* c, const uint32_t* a, const uint32_t* b) {
  if constexpr (MmaKind<T>::bf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

/* Two floats rounded to T and packed into one 32-bit fragment register (lo in the low half),
 * as an MMA's A or B fragment holds two consecutive K elements. */
template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (MmaKind<T>::bf16) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return (uint32_t)__cvta_generic_to_shared(p);
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
/* 16-byte async copy; src_bytes 0 fills the destination with zeros. */
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

/* ---- warpgroup MMA (sm_90a: wgmma.mma_async, operands in shared memory) ------------------ */
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SALS_WGMMA 1
/* Shared-memory matrix descriptor of a K-major operand in the 128-byte swizzle layout: rows of
 * 64 16-bit elements (128 bytes), each 16-byte chunk c of row r stored at chunk c ^ (r % 8),
 * atoms of 8 rows (1024 bytes, 1024-byte aligned). smem points at the operand's first row and
 * K offset (a K step of 16 moves it by 32 bytes within the atom); 8-row groups are 1024 bytes
 * apart (stride byte offset); the leading byte offset is unused for this layout. */
__device__ __forceinline__ uint64_t wgmma_desc_sw128(const void* smem) {
  return (uint64_t)((smem_u32(smem) & 0x3FFFF) >> 4) | ((uint64_t)1 << 16) |
         ((uint64_t)(1024 >> 4) << 32) | ((uint64_t)1 << 62);
}
__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_wait_all() {
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
}
/* Shared memory written by cp.async becomes visible to wgmma (the async proxy). */
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
/* Keeps the compiler from moving accumulator reads or writes across an asynchronous MMA. */
template <int N>
__device__ __forceinline__ void wgmma_fence_operands(float (&d)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) asm volatile("" : "+f"(d[i][j])::"memory");
}
/* D[64 x N] += A[64 x 16] B[16 x N], both K-major in shared memory (descriptors); thread
 * fragment d[n / 8][..] as the m16n8 accumulator of its warp's 16 rows. The instruction string
 * is spliced from the shape, the operand types and the accumulator register list. */
#define SALS_WGMMA_ACC(i) "+f"(d[i][0]), "+f"(d[i][1]), "+f"(d[i][2]), "+f"(d[i][3])
#define SALS_WGMMA_ASM(SHAPE, TYPES, REGS, DESCS, ...)                                       \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\nwgmma.mma_async.sync.aligned." SHAPE \
               ".f32" TYPES " {" REGS "}, " DESCS ", p, 1, 1, 0, 0;\n}\n"                    \
               : __VA_ARGS__                                                                 \
               : "l"(da), "l"(db))
#define SALS_WGMMA_R32                                                   \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15" \
  ", %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define SALS_WGMMA_R64                                                               \
  SALS_WGMMA_R32                                                                     \
  ", %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47" \
  ", %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define SALS_WGMMA_ACC64                                                                         \
  SALS_WGMMA_ACC(0), SALS_WGMMA_ACC(1), SALS_WGMMA_ACC(2), SALS_WGMMA_ACC(3), SALS_WGMMA_ACC(4), \
      SALS_WGMMA_ACC(5), SALS_WGMMA_ACC(6), SALS_WGMMA_ACC(7)
#define SALS_WGMMA_ACC128                                                                         \
  SALS_WGMMA_ACC64, SALS_WGMMA_ACC(8), SALS_WGMMA_ACC(9), SALS_WGMMA_ACC(10), SALS_WGMMA_ACC(11), \
      SALS_WGMMA_ACC(12), SALS_WGMMA_ACC(13), SALS_WGMMA_ACC(14), SALS_WGMMA_ACC(15)
template <typename T>
__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[16][4], uint64_t da, uint64_t db) {
  if constexpr (MmaKind<T>::bf16)
    SALS_WGMMA_ASM("m64n128k16", ".bf16.bf16", SALS_WGMMA_R64, "%64, %65", SALS_WGMMA_ACC128);
  else SALS_WGMMA_ASM("m64n128k16", ".f16.f16", SALS_WGMMA_R64, "%64, %65", SALS_WGMMA_ACC128);
}
template <typename T>
__device__ __forceinline__ void wgmma_m64n64k16(float (&d)[8][4], uint64_t da, uint64_t db) {
  if constexpr (MmaKind<T>::bf16)
    SALS_WGMMA_ASM("m64n64k16", ".bf16.bf16", SALS_WGMMA_R32, "%32, %33", SALS_WGMMA_ACC64);
  else SALS_WGMMA_ASM("m64n64k16", ".f16.f16", SALS_WGMMA_R32, "%32, %33", SALS_WGMMA_ACC64);
}
/* D[64 x 8] += A[64 x 16] B[16 x 8] with A in registers (each warp's 16 rows in the mma.sync
 * m16n8k16 A layout, which is the layout of an m16n8 accumulator pair: FlashAttention-3 feeds
 * P to its P.V product the same way) and B K-major in shared memory (descriptor). */
#define SALS_WGMMA_RS_ASM(TYPES)                                                      \
  asm volatile(                                                                       \
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\nwgmma.mma_async.sync.aligned.m64n8k16" \
      ".f32" TYPES " {%0, %1, %2, %3}, {%4, %5, %6, %7}, %8, p, 1, 1, 0;\n}\n"        \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db))
template <typename T>
__device__ __forceinline__ void wgmma_m64n8k16_rs(float (&d)[4], const uint32_t (&a)[4],
                                                  uint64_t db) {
  if constexpr (MmaKind<T>::bf16) SALS_WGMMA_RS_ASM(".bf16.bf16");
  else SALS_WGMMA_RS_ASM(".f16.f16");
}
#endif

/* ---- CUDA-private cache state (cache->backend) ----------------------------------------- */

struct CacheState {
  int device;
  void* uh;          /* dtype [3 Dk, rank]: the projection in the storage type, [U_hi; U_lo;
                      * U_hi] (tensor cores; decode rebuilds keys with U_hi) */
  bool uh_ready;     /* uh converted from cache->proj (done at the first append/attend) */
  int32_t* dest;     /* [max_batch * max_tokens] destination slot of each appended row, -1 pad */
  int32_t* newlen;   /* [max_batch] lengths after the last append (ring ownership) */
  float* qlat;       /* [max_batch, n_sel_heads, score_rank] scoring queries */
  float* scores;     /* [max_batch, n_sel_heads, max_tokens] */
  void* topk_ws;     /* top-k workspace, topk_workspace_bytes(max_batch * n_sel_heads,
                      * max_tokens), zeroed at creation (launch_topk keeps it so) */
  float* logits;     /* [max_batch, Hq, attend_list_max] decode logits (rebuild -> softmax) */
  float* part_o;     /* [max_batch, Hq, max_parts, head_dim] split-attention partials (one per
                      * split of the decode softmax) */
  float* part_ml;    /* [max_batch, Hq, max_parts, 2] running max and sum of each partial */
  uint32_t* pv_done; /* [max_batch, Hkv] arrival counters of the decode softmax blocks (the last
                      * one merges the partials and resets it), zeroed at creation */
  float* proj_part;  /* skinny workspace (gemm.cuh skinny_work) of decode-append projections:
                      * arrival counters, then split-K partials */
  float* qpart;      /* the same for the scoring queries */
  float* lat_ws;     /* quantised keys only: [lat_ws_rows, rank] float32 latent rows of an
                      * append, quantised by a second kernel (cache.cu) */
  int64_t lat_ws_rows;
  int max_parts;
  /* Non-finite input seen, one int per check (kFlagK .. kFlagLatent below), in mapped pinned
   * host memory: kernels write it through `flag`, the host reads `flag_host` without a copy. */
  int* flag;         /* device alias of flag_host */
  int* flag_host;
  int num_sms;
};

static inline CacheState* state(const sals_cache_t* c) { return (CacheState*)c->backend; }

/* ---- CUDA-private state of paged storage (sals_paged_t::backend, paged.cu) -------------- */

struct PagedState {
  int device;
  float* proj;     /* [Dk, rank] float32 */
  void* uh;        /* [3 Dk, rank] storage type, as CacheState::uh (16-bit storage only) */
  float* inv_freq; /* [max(rotary_dim / 2, 1)] */
  int* flag;       /* kFlagCount deferred checks, mapped pinned host memory (as the cache's) */
  int* flag_host;
  int num_sms;
};

/*
 * Deferred checks: kernels raise a flag (a plain store of 1) in mapped pinned host memory, and
 * the host reports it at the next call that looks, without a copy or a wait (graph capturable).
 * The cache uses the first kFlagCacheCount; paged storage all of them (its index checks: the
 * host cannot read device indices without a synchronisation).
 */
enum {
  kFlagK,        /* k held NaN or infinity */
  kFlagV,        /* v held NaN or infinity */
  kFlagQ,        /* q held NaN or infinity */
  kFlagLatent,   /* a quantised latent group's float16 scale or zero overflowed */
  kFlagCacheCount,
  kFlagSlots = kFlagCacheCount, /* paged append: a slot_mapping or window_rows entry out of range */
  kFlagSeqs, /* paged attend: a sequence's query_start, seq_lens or block table entries out of
              * range, or a window_rows entry */
  kFlagSelected, /* paged attend: a selection longer than `selected` holds */
  kFlagCount
};
/* Report (and clear) the first raised of flags[0, n): SALS_ERR_NOT_FINITE or
 * SALS_ERR_INVALID_ARGUMENT naming the argument, the message closed by `after`. */
sals_status_t report_flags(int* flags_host, int n, const char* after);
/* Enqueue a check of the first n elements of view v (row-major over its shape) that raises
 * *flag on NaN or infinity; with rows_lo / rows_hi (device int32), only rows (dim 0) in
 * [*rows_lo, *rows_hi) clamped to the view are checked (cache.cu). */
cudaError_t launch_finite(const DView& v, int64_t n, int* flag, const int32_t* rows_lo,
                          const int32_t* rows_hi, cudaStream_t st);
/* idx[b, h, :] (a [B, H, K] view) = the first cnt[b] entries of selection row b * H + h of
 * `sel` (rows of row_stride), then -1; *count (when given) [B] = cnt; *flag (when given) raised
 * for a selection longer than K, whose entries past K are left out (cache.cu). */
cudaError_t launch_selected(const int32_t* sel, const int32_t* cnt, int32_t B, int32_t H,
                            int64_t row_stride, const DView& idx, const DView* count, int* flag,
                            cudaStream_t st);
/* dst = [U_hi; U_lo; U_hi] of src [n] in the 16-bit storage type (see CacheState::uh). */
cudaError_t convert_projection(const float* src, void* dst, int64_t n, sals_dtype_t dtype,
                               cudaStream_t st);

/* Sets the cache's device for the duration of a call and restores the caller's. */
struct DeviceGuard {
  int prev = -1;
  explicit DeviceGuard(int dev) {
    if (cudaGetDevice(&prev) == cudaSuccess && prev != dev) cudaSetDevice(dev);
    else prev = -1;
  }
  ~DeviceGuard() {
    if (prev >= 0) cudaSetDevice(prev);
  }
};

/* ---- functions shared between translation units --------------------------------------- */

/* Budget of a sequence of S tokens: the header's rule, clamped to the candidates. */
__device__ __forceinline__ int32_t budget_for(int32_t S, int32_t n_sink, int32_t n_recent,
                                              int32_t budget_tokens, float budget_frac) {
  int32_t n_cand = S - n_sink - n_recent;
  if (n_cand <= 0) return 0;
  int32_t k;
  if (budget_tokens > 0) {
    k = budget_tokens;
  } else {
    double x = ceil((double)budget_frac * (double)S);
    k = x > (double)n_cand ? n_cand : (int32_t)x;
  }
  return k < n_cand ? k : n_cand;
}

/* Top-k selection over rows of float scores (select.cu). Row r covers scores[r*row_stride + j]
 * for the candidates j in [lo_r, hi_r) and writes min(budget_r, candidates) token indices (j)
 * to idx[b*idx_stride_b + h*idx_stride_h + ...] (r = b*rows_per_seq + h) in any order; when
 * pad_to > 0 the row is padded with -1 up to pad_to. The per-row range and budget come from a
 * RowSpec evaluated on the device. `workspace`: at least topk_workspace_bytes(rows,
 * row_stride) bytes, zeroed before its first use and then only used by launch_topk with the
 * same row_stride (every launch leaves it as it found it). */
struct RowSpec {
  const int32_t* lengths; /* [B] or NULL (= fixed_len) */
  int32_t fixed_len;
  int32_t rows_per_seq; /* rows r belong to sequence r / rows_per_seq */
  int32_t n_sink, n_recent;
  int32_t budget_tokens; /* > 0: fixed budget */
  float budget_frac; /* used when budget_tokens == 0 */
  int32_t* count; /* [B] selected per sequence, or NULL */
  DView qpos; /* [B, 1] query positions: a padded query (< 0) selects nothing; */
  bool has_qpos; /* absent for the stateless score_select */
  const int32_t* pos; /* [B, pos_stride] token positions: a token after the query's position
                       * is not a candidate; NULL = every token is */
  int64_t pos_stride;
};
/* The rows of a cache's selection: cf's sinks, recent window and budget over `lengths`,
 * rows_per_seq selection heads per sequence, counts to `count`; no query positions (the caller
 * sets qpos, has_qpos, pos and pos_stride where it has them). */
inline RowSpec budget_rows(const sals_config_t& cf, const int32_t* lengths, int32_t rows_per_seq,
                           int32_t* count) {
  RowSpec r{};
  r.lengths = lengths;
  r.rows_per_seq = rows_per_seq;
  r.n_sink = cf.n_sink;
  r.n_recent = cf.n_recent;
  r.budget_tokens = cf.budget_tokens;
  r.budget_frac = cf.budget_frac;
  r.count = count;
  return r;
}
size_t topk_workspace_bytes(int32_t rows, int64_t row_stride);
cudaError_t launch_topk(const float* scores, int64_t row_stride, int32_t rows, RowSpec spec,
                        int32_t* idx, int64_t idx_stride_b, int64_t idx_stride_h, int32_t pad_to,
                        void* workspace, cudaStream_t st);

/* Scores s[b, h, j] = q_lat[b, h, :R] . k_lat[b, j, :R] for j in [n_sink, len_b - n_recent)
 * (score.cu). q_lat: float [B, H, R] compact; k_lat: a 3-D view [B, S, >=R]. */
cudaError_t launch_scores(const float* qlat, int32_t H, int32_t R, DView k_lat,
                          const int32_t* lengths, int32_t fixed_len, int32_t n_sink,
                          int32_t n_recent, int32_t B, float* scores, int64_t score_stride_b,
                          int32_t num_sms, cudaStream_t st);

/* Rows of quantised latent keys (one part of the latent row: scoring reads the score part):
 * token j of sequence b is row b * seq_rows + j, its codes at codes + row * row_bytes, its
 * groups' scales and zeros at scale / zero + row * (row_bytes * 8 / bits / group). */
struct QuantRows {
  const uint8_t* codes;
  const uint16_t* scale;
  const uint16_t* zero;
  int64_t seq_rows, row_bytes;
  int32_t bits, group;
};
/* The same scores over quantised latent keys (the dequantised coordinates, as the CPU scores
 * them). */
cudaError_t launch_scores(const float* qlat, int32_t H, int32_t R, const QuantRows& k_lat,
                          const int32_t* lengths, int32_t n_sink, int32_t n_recent, int32_t B,
                          float* scores, int64_t score_stride_b, int32_t num_sms, cudaStream_t st);

/* Longest attended list of one decode step for the cache's config (attend.cu): the row length of
 * CacheState::logits. */
int64_t attend_list_max(const sals_config_t& cf);
/* Tokens a sparse step selects at most for sequences of up to S tokens (the budget rule clamped
 * to the candidates; attend.cu). */
int32_t most_selected(const sals_config_t& cf, int32_t S);

/* ---- paged storage ------------------------------------------------------------------------ */

/*
 * Token t of sequence b of an attend lies in slot t % block_size of block table[b, t /
 * block_size] of the pages [num_blocks, block_size, slot_bytes]; a field of the slot at its byte
 * offset in `lay` (sals_paged_layout_t). Kernels read the table only for tokens of sequences
 * whose entries the plan kernel found in range (paged.cu).
 */
struct PagedSlots {
  const uint8_t* pages;
  int64_t s0, s1; /* bytes from one block to the next, from one slot to the next */
  const int32_t* table;
  int64_t table_s0; /* entries from one sequence's row to the next */
  int32_t block_size;
  sals_paged_layout_t lay;
  __device__ __forceinline__ int64_t offset(int32_t b, int32_t t) const {
    return (int64_t)table[(int64_t)b * table_s0 + t / block_size] * s0 +
           (int64_t)(t % block_size) * s1;
  }
  __device__ __forceinline__ const uint8_t* slot(int32_t b, int32_t t) const {
    return pages + offset(b, t);
  }
};

/* Scores of paged latent keys (score.cu), as launch_scores above: the score part of each slot,
 * `elem` the storage type (key_bits 16) or codes (key_bits < 16). `vec`: the slots and their
 * fields are 16-byte aligned (vector loads); max_len bounds the lengths. */
cudaError_t launch_scores(const float* qlat, int32_t H, int32_t R, const PagedSlots& k_lat,
                          int32_t elem, int32_t key_bits, int32_t key_group, bool vec,
                          const int32_t* lengths, int32_t max_len, int32_t n_sink, int32_t n_recent,
                          int32_t B, float* scores, int64_t score_stride_b, int32_t num_sms,
                          cudaStream_t st);

/*
 * Scoring queries (attend.cu): qlat[b * H + hs, :score_rank] = U_hs[:, :score_rank]^T of the
 * GQA-summed pre-RoPE query of sequence b, read from row row_of[b] (or b when row_of is NULL),
 * token 0, of the [rows, T, n_head_q, head_dim] view q. H = 1 folds every head, H = n_head_kv
 * each KV head's group. `work`: a skinny workspace for `work_rows` >= B rows (gemm.cuh
 * skinny_work), counters zero. flag: raised when a folded sum is not finite (NULL: no check).
 */
cudaError_t launch_fold(const DView& q, const int32_t* row_of, int32_t B, int32_t H, int32_t G,
                        int32_t D, int32_t dk, const float* proj, int32_t rank, int32_t score_rank,
                        void* work, int64_t work_rows, float* qlat, int* flag, cudaStream_t st);

/* ---- attention (attend.cu) ---------------------------------------------------------------- */

/*
 * Everything the attention kernels read. The kernels have two instantiations: the cache's
 * (token t of sequence b at row b * max_tokens + t of its arrays, exact copies of the sinks and
 * the recent window in its own arrays) and paged storage's (tokens in slots, `pg`; exact copies
 * in an optional window store; the call's sequences described by the plan kernel's arrays).
 */
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
  const int32_t* len; /* [B] tokens per sequence (paged: the plan's) */
  const int32_t* sel_idx; /* [B, n_sel_heads, sel_stride] selections */
  const int32_t* sel_count; /* [B] */
  int64_t sel_stride;
  const void* uh; /* storage-type projection (tensor-core rebuild) */
  const float* proj; /* float32 projection (general kernel) */
  const float* inv_freq;
  int32_t n_sink, n_recent, max_tokens, rank, rs, dk, hkv, hq, G, bits, group, n_groups;
  int64_t val_row_bytes;
  int32_t n_sel_heads, sparse, rotary_dim, inter;
  float att, scale;
  /* call: q and out as [rows, T, heads, head_dim] (paged: [N, 1, ...]), query positions [B, T]
   * (the cache's) */
  DView q, qpos, out;
  float* logits; /* [B, hq, lmax] sparse decode logits (log2 domain) */
  int64_t lmax;
  float* part_o;
  float* part_ml;
  uint32_t* pv_done; /* [B, hkv] softmax arrival counters, zero between launches */
  int32_t max_parts;
  /* quantised latent keys (key_bits < 16): scales and zeros of the two parts' groups */
  const uint16_t* lat_score_scale;
  const uint16_t* lat_score_zero;
  const uint16_t* lat_rest_scale;
  const uint16_t* lat_rest_zero;
  int32_t key_bits, key_group;
  int64_t lat_score_bytes, lat_rest_bytes;
  /* paged storage */
  PagedSlots pg;
  const void* window; /* exact copies [w_rows, 2, hkv, head_dim] of type w_elem, or NULL */
  int32_t w_elem;
  int64_t w_rows, w_s0, w_s1, w_s2;
  const int32_t* wrows; /* [B, n_sink + n_recent] window_rows, row stride wrows_s0 */
  int64_t wrows_s0;
  const int32_t* q_row; /* [B] the query row of a sequence the decode kernels run, else -1 */
  const int32_t* q_first; /* [B] first query row and */
  const int32_t* q_count; /* [B] queries of each sequence */
  const int32_t* tiles; /* (sequence, first query) of each general-kernel block, *n_tiles */
  const int32_t* n_tiles;
};

/* Launch geometry of a decode step: B x n_head_kv lists of at most max_tiles 128-token tiles. */
struct DecodeGrid {
  int32_t B, max_tiles, max_pv_split, num_sms;
};

/* Whether the decode kernels serve a layer: 16-bit storage, head_dim 64, 128 or 256, at most 8
 * query heads per KV head, rank and score_rank multiples of 8, and a rotation that covers the
 * head or is interleaved. */
bool decode_kernels_fit(const sals_config_t& cf, int32_t rotary_dim, int32_t interleaved);
/* The decode kernels (rebuild + logits, then softmax + P.V + merge) over dg.B sequences of one
 * query each; `paged` picks paged storage's instantiation. */
cudaError_t launch_decode_attention(const AttnArgs& a, bool paged, sals_dtype_t dtype, int32_t D,
                                    const DecodeGrid& dg, cudaStream_t st);
/* Splits of the decode softmax per (sequence, KV head), one partial each per query head: enough
 * to fill the device at batch 1, within [2, 64] so the workspace stays small (the row length of
 * the partials, max_parts). */
int decode_parts(int32_t n_head_kv, int num_sms);
/* Rows of queries per block of the general kernel: QT queries of one KV head's G heads. */
int32_t general_rows(int32_t G);
/* The general kernel over grid (tiles, n_head_kv, sequences): the cache's tile x holds queries
 * [x QT, (x + 1) QT) of sequence z (Tq per sequence); paged storage's reads its (sequence, first
 * query) from a.tiles. */
cudaError_t launch_general_attention(const AttnArgs& a, bool paged, sals_dtype_t dtype, int32_t D,
                                     int32_t Tq, int32_t QT, dim3 grid, cudaStream_t st);

}  // namespace sals_cuda

#endif /* SALS_CUDA_COMMON_CUH_ */
