/*
 * Top-k selection per row on the device (no host round trip): a radix select over the scores'
 * order-preserving integer keys in three digit passes (11, 11, 10 bits), one block per row,
 * then one pass that writes every key above the threshold and, in index order, as many keys
 * equal to it as the budget leaves. Shared-memory histogram updates are aggregated per warp
 * (__match_any_sync) because the leading digits of similar floats collide heavily. Each pass
 * loads kU scores (and positions) per thread before using any of them: with one block per row
 * the passes are bound by load latency, not bandwidth.
 *
 * The rule is the CPU backend's: candidates are the tokens in [n_sink, S - n_recent) whose
 * position is not after the query's; a NaN score ranks as -inf; ties go to the lower index;
 * count = min(budget, visible candidates), the same for every head of a sequence.
 */
#include "common.cuh"

namespace sals_cuda {
namespace {

constexpr int kThreads = 1024;
constexpr int kBins = 2048;
constexpr int kU = 8;

/* Larger float -> larger unsigned key. */
__device__ __forceinline__ uint32_t order_key(float f) {
  if (isnan(f)) f = -INFINITY; /* as the CPU backend: a NaN score ranks as -inf */
  uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

/* Exclusive prefix of `flag` over the block in thread order; *total gets the block's sum. */
__device__ __forceinline__ int32_t block_excl_scan(bool flag, int32_t* warp_tot, int32_t* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const uint32_t bal = __ballot_sync(0xffffffffu, flag);
  if (lane == 0) warp_tot[warp] = __popc(bal);
  __syncthreads();
  int32_t before = 0, all = 0;
  for (int w = 0; w < kThreads / 32; ++w) {
    const int32_t x = warp_tot[w];
    before += w < warp ? x : 0;
    all += x;
  }
  __syncthreads(); /* warp_tot is reused by the next call */
  *total = all;
  return before + __popc(bal & ((1u << lane) - 1u));
}

__global__ void __launch_bounds__(kThreads) topk_kernel(const float* __restrict__ scores,
                                                        int64_t row_stride, RowSpec spec,
                                                        int32_t* __restrict__ idx,
                                                        int64_t isb, int64_t ish,
                                                        int32_t pad_to) {
  __shared__ int32_t hist[kBins];
  __shared__ int32_t warp_tot[kThreads / 32];
  __shared__ uint32_t s_prefix;
  __shared__ int32_t s_remaining, s_above, s_visible, s_eq;

  const int32_t row = blockIdx.x;
  const int32_t b = row / spec.rows_per_seq;
  const int32_t S = spec.lengths ? spec.lengths[b] : spec.fixed_len;
  const int32_t lo = spec.n_sink;
  const int32_t hi = S - spec.n_recent;
  const int32_t qp = spec.has_qpos ? load_i32(spec.qpos, off2(spec.qpos, b, 0)) : INT32_MAX;
  const int32_t* kpos = spec.pos ? spec.pos + (int64_t)b * spec.pos_stride : nullptr;
  const float* s = scores + (int64_t)row * row_stride;
  int32_t* out = idx + (int64_t)b * isb + (int64_t)(row % spec.rows_per_seq) * ish;
  const int tid = threadIdx.x;
  /* Chunk of kU * kThreads candidates from `base`: element u of this thread is j = base + u *
   * kThreads + tid; vis[u] says whether it is a visible candidate, key[u] its order key. The
   * loads of all kU elements are issued before any is used. */
  auto load_chunk = [&](int32_t base, bool* vis, uint32_t* key) {
    float x[kU];
    int32_t p[kU];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int32_t j = base + u * kThreads + tid;
      const bool in = j < hi;
      x[u] = in ? s[j] : 0.f;
      p[u] = in && kpos ? kpos[j] : 0;
      vis[u] = in && (!kpos || p[u] <= qp);
    }
#pragma unroll
    for (int u = 0; u < kU; ++u) key[u] = vis[u] ? order_key(x[u]) : 0u;
  };
  constexpr int32_t kChunk = kU * kThreads;

  if (tid == 0) {
    s_prefix = 0;
    s_above = 0;
    s_visible = 0;
  }
  __syncthreads();
  int32_t k = qp < 0 ? 0 : budget_for(S, spec.n_sink, spec.n_recent, spec.budget_tokens,
                                      spec.budget_frac);
  if (k > 0 && kpos) { /* invisible tokens are not candidates: count the visible ones */
    int32_t n = 0;
    for (int32_t base = lo; base < hi; base += kChunk) {
      int32_t p[kU];
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int32_t j = base + u * kThreads + tid;
        p[u] = j < hi ? kpos[j] : 0;
      }
#pragma unroll
      for (int u = 0; u < kU; ++u) n += base + u * kThreads + tid < hi && p[u] <= qp;
    }
    n = __reduce_add_sync(0xffffffffu, n);
    if ((tid & 31) == 0 && n) atomicAdd(&s_visible, n);
    __syncthreads();
    k = k < s_visible ? k : s_visible;
  } else if (k > 0) {
    k = k < hi - lo ? k : hi - lo;
  }
  if (spec.count && row % spec.rows_per_seq == 0 && tid == 0) spec.count[b] = k;
  for (int32_t i = k + tid; i < pad_to; i += kThreads) out[i] = -1;
  if (k == 0) return;

  if (tid == 0) s_remaining = k;
  const int shifts[3] = {21, 10, 0};
  const int widths[3] = {11, 11, 10};
  uint32_t mask = 0;
  for (int pass = 0; pass < 3; ++pass) {
    for (int i = tid; i < kBins; i += kThreads) hist[i] = 0;
    __syncthreads();
    const uint32_t prefix = s_prefix;
    const int sh = shifts[pass];
    const uint32_t dmask = (1u << widths[pass]) - 1u;
    for (int32_t base = lo; base < hi; base += kChunk) {
      bool vis[kU];
      uint32_t key[kU];
      load_chunk(base, vis, key);
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const bool live = vis[u] && (key[u] & mask) == prefix;
        const uint32_t digit = (key[u] >> sh) & dmask;
        const uint32_t active = __ballot_sync(0xffffffffu, live);
        if (live) {
          const uint32_t peers = __match_any_sync(active, digit);
          if ((__ffs(peers) - 1) == (int)(threadIdx.x & 31))
            atomicAdd(&hist[digit], __popc(peers));
        }
      }
    }
    __syncthreads();
    /* Warp 0 scans bins from the top for the digit holding the k-th largest key. */
    if (tid < 32) {
      int32_t remaining = s_remaining;
      int32_t acc = 0;
      int found_bin = -1;
      int32_t above_found = 0, in_found = 0;
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
          in_found = __shfl_sync(0xffffffffu, c, lane);
        } else {
          acc += __shfl_sync(0xffffffffu, incl, 31);
        }
      }
      if (tid == 0) {
        s_prefix = prefix | ((uint32_t)found_bin << sh);
        s_remaining = remaining - above_found;
        s_eq = in_found; /* after the last pass: keys equal to the threshold */
      }
    }
    mask |= dmask << sh;
    __syncthreads();
  }

  /* Keys above the threshold in any order; keys equal to it in index order (lower first),
   * unless every one of them is selected: then in any order too, with no block scans. */
  const uint32_t thr = s_prefix;
  const int32_t ties = s_remaining;
  const int32_t n_above = k - ties;
  const bool all_ties = s_eq == ties;
  int32_t eq_base = 0; /* uniform over the block: every thread runs the same chunks */
  for (int32_t base = lo; base < hi; base += kChunk) {
    bool vis[kU];
    uint32_t key[kU];
    load_chunk(base, vis, key);
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int32_t j = base + u * kThreads + tid; /* index order: u-major, then thread */
      if (vis[u] && (key[u] > thr || (all_ties && key[u] == thr)))
        out[atomicAdd(&s_above, 1)] = j;
      if (!all_ties && eq_base < ties) {
        int32_t n_eq;
        const bool eq = vis[u] && key[u] == thr;
        const int32_t r = block_excl_scan(eq, warp_tot, &n_eq);
        if (eq && eq_base + r < ties) out[n_above + eq_base + r] = j;
        eq_base += n_eq;
      }
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
