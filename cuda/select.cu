/*
 * Top-k selection per row on the device (no host round trip): a radix select over the scores'
 * order-preserving integer keys in three digit passes (11, 11, 10 bits), one block per row,
 * then one pass that writes every key above the threshold and as many ties as the budget
 * leaves. Shared-memory histogram updates are aggregated per warp (__match_any_sync) because
 * the leading digits of similar floats collide heavily.
 */
#include "common.cuh"

namespace sals_cuda {
namespace {

constexpr int kThreads = 1024;
constexpr int kBins = 2048;

/* Larger float -> larger unsigned key. */
__device__ __forceinline__ uint32_t order_key(float f) {
  if (isnan(f)) return 0u; /* NaN ranks last (the CPU skips NaN scores) */
  uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__global__ void __launch_bounds__(kThreads) topk_kernel(const float* __restrict__ scores,
                                                        int64_t row_stride, RowSpec spec,
                                                        int32_t* __restrict__ idx,
                                                        int64_t isb, int64_t ish,
                                                        int32_t pad_to) {
  __shared__ int32_t hist[kBins];
  __shared__ uint32_t s_prefix;
  __shared__ int32_t s_remaining;
  __shared__ int32_t s_above, s_equal;

  const int32_t row = blockIdx.x;
  const int32_t b = row / spec.rows_per_seq;
  const int32_t S = spec.lengths ? spec.lengths[b] : spec.fixed_len;
  const int32_t lo = spec.n_sink;
  const int32_t hi = S - spec.n_recent;
  const int32_t n_cand = hi > lo ? hi - lo : 0;
  const bool padded = spec.has_qpos && load_i32(spec.qpos, off2(spec.qpos, b, 0)) < 0;
  const int32_t k =
      padded ? 0 : budget_for(S, spec.n_sink, spec.n_recent, spec.budget_tokens, spec.budget_frac);
  const float* s = scores + (int64_t)row * row_stride;
  int32_t* out = idx + (int64_t)b * isb + (int64_t)(row % spec.rows_per_seq) * ish;
  const int tid = threadIdx.x;

  if (spec.count && row % spec.rows_per_seq == 0 && tid == 0) spec.count[b] = k;
  for (int32_t i = k + tid; i < pad_to; i += kThreads) out[i] = -1;
  if (k == 0) return;
  if (k == n_cand) {
    for (int32_t i = tid; i < n_cand; i += kThreads) out[i] = lo + i;
    return;
  }

  if (tid == 0) {
    s_prefix = 0;
    s_remaining = k;
    s_above = 0;
    s_equal = 0;
  }
  const int shifts[3] = {21, 10, 0};
  const int widths[3] = {11, 11, 10};
  uint32_t mask = 0;
  for (int pass = 0; pass < 3; ++pass) {
    for (int i = tid; i < kBins; i += kThreads) hist[i] = 0;
    __syncthreads();
    const uint32_t prefix = s_prefix;
    const int sh = shifts[pass];
    const uint32_t dmask = (1u << widths[pass]) - 1u;
    for (int32_t base = lo; base < hi; base += kThreads) {
      int32_t j = base + tid;
      bool live = false;
      uint32_t digit = 0;
      if (j < hi) {
        uint32_t key = order_key(s[j]);
        live = (key & mask) == prefix;
        digit = (key >> sh) & dmask;
      }
      uint32_t active = __ballot_sync(0xffffffffu, live);
      if (live) {
        uint32_t peers = __match_any_sync(active, digit);
        if ((__ffs(peers) - 1) == (int)(threadIdx.x & 31)) atomicAdd(&hist[digit], __popc(peers));
      }
    }
    __syncthreads();
    /* Warp 0 scans bins from the top for the digit holding the k-th largest key. */
    if (tid < 32) {
      int32_t remaining = s_remaining;
      int32_t acc = 0;
      int found_bin = -1;
      int32_t above_found = 0;
      for (int top = (int)dmask; top >= 0 && found_bin < 0; top -= 32) {
        int bin = top - tid;
        int32_t c = bin >= 0 ? hist[bin] : 0;
        int32_t incl = c;
        for (int o = 1; o < 32; o <<= 1) {
          int32_t y = __shfl_up_sync(0xffffffffu, incl, o);
          if (tid >= o) incl += y;
        }
        uint32_t hit = __ballot_sync(0xffffffffu, acc + incl >= remaining);
        if (hit) {
          int lane = __ffs(hit) - 1;
          found_bin = top - lane;
          int32_t excl = __shfl_sync(0xffffffffu, incl - c, lane);
          above_found = acc + excl;
        } else {
          acc += __shfl_sync(0xffffffffu, incl, 31);
        }
      }
      if (tid == 0) {
        s_prefix = prefix | ((uint32_t)found_bin << sh);
        s_remaining = remaining - above_found;
      }
    }
    mask |= dmask << sh;
    __syncthreads();
  }

  const uint32_t thr = s_prefix;
  const int32_t ties = s_remaining;
  const int32_t n_above = k - ties;
  for (int32_t j = lo + tid; j < hi; j += kThreads) {
    uint32_t key = order_key(s[j]);
    if (key > thr) {
      out[atomicAdd(&s_above, 1)] = j;
    } else if (key == thr) {
      int32_t e = atomicAdd(&s_equal, 1);
      if (e < ties) out[n_above + e] = j;
    }
  }
}

}  // namespace

cudaError_t launch_topk(const float* scores, int64_t row_stride, int32_t rows, RowSpec spec,
                        int32_t* idx, int64_t idx_stride_b, int64_t idx_stride_h, int32_t pad_to,
                        cudaStream_t st) {
  if (rows <= 0) return cudaSuccess;
  topk_kernel<<<rows, kThreads, 0, st>>>(scores, row_stride, spec, idx, idx_stride_b,
                                         idx_stride_h, pad_to);
  return cudaPeekAtLastError();
}

}  // namespace sals_cuda
