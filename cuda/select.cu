/*
 * Top-k selection per row on the device (no host round trip): a radix select over the scores'
 * order-preserving integer keys, with the row spread over several blocks.
 *
 * A row is cut into chunks of kChunk candidates, one block each (grid: rows x the chunks of
 * the longest row; blocks past a row's length return at once). Every block loads its chunk
 * once, keeps the keys in registers and counts their leading digit (12 bits: sign, exponent
 * and 3 mantissa bits) in a shared histogram. Blocks of a row of several chunks add their
 * counts to the row's histogram in the workspace; the last one to finish (a ticket counter, so
 * no block ever waits for another) goes on alone, and so does the only block of a one-chunk
 * row, which never touches the workspace:
 *  1. the bin of the leading digit holding the k-th largest key;
 *  2. one pass over the row (its own chunk from registers) writes the keys of higher bins and
 *     gathers the keys of that bin (typically 1-3% of the row) into a list, in shared memory
 *     or, when too many, in the workspace; when the whole bin is selected it is written too
 *     and the row is done;
 *  3. radix passes over the list, 10 + 10 bits of the key, stopping as soon as every key of a
 *     bin is selected, then, only when some keys equal to the threshold are left out, over
 *     the complemented index of those keys (11 + 11 + 10 bits): the lower index wins a tie;
 *  4. one pass over the list writes its selected keys.
 * The rows' workspace histograms, visible counts and tickets are reset by the block that read
 * them, so the workspace is zeroed once when allocated. Histogram updates are aggregated per
 * warp (__match_any_sync): the leading digits of similar floats collide heavily.
 *
 * The rule is the CPU backend's: candidates are the tokens in [n_sink, S - n_recent) whose
 * position is not after the query's; a NaN score ranks as -inf; ties go to the lower index;
 * count = min(budget, visible candidates), the same for every head of a sequence.
 */
#include "common.cuh"

namespace sals_cuda {
namespace {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
constexpr int kU = 4;                          /* candidates per thread in a chunk */
constexpr int32_t kChunk = kU * kThreads;      /* candidates per block in the first pass */
constexpr int kLeadBits = 12;
constexpr int kLeadShift = 32 - kLeadBits;
constexpr int kLeadBins = 1 << kLeadBits;
constexpr int kKeyBits = 10;                   /* digit of each later pass over the key */
constexpr int32_t kListCap = 8192;             /* list entries held in shared memory */
/* Per row in the workspace: leading-digit histogram, visible count, ticket (padded to 128 B),
 * then room for a list of row_stride keys and as many indices. */
constexpr int32_t kHeader = kLeadBins + 32;
constexpr int kVisible = kLeadBins, kTicket = kLeadBins + 1;
/* Dynamic shared memory: histogram (up to kLeadBins bins), list keys, list indices. */
constexpr size_t kSmem = sizeof(int32_t) * ((size_t)kLeadBins + 2 * (size_t)kListCap);
constexpr uint32_t kFull = 0xffffffffu;

/* Larger float -> larger unsigned key, never 0 (0 marks "not a candidate"). */
__device__ __forceinline__ uint32_t order_key(float f) {
  if (isnan(f)) f = -INFINITY; /* as the CPU backend: a NaN score ranks as -inf */
  f += 0.f;                    /* -0 == +0 for the CPU's comparison: one key */
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ int32_t warp_incl_scan(int32_t x) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int32_t y = __shfl_up_sync(kFull, x, o);
    if (lane >= o) x += y;
  }
  return x;
}

/* hist[bin] += 1 for each lane with `live`, one shared atomic per distinct bin of the warp.
 * Called by all 32 lanes; the others group under a value no bin has. */
__device__ __forceinline__ void hist_add(int32_t* hist, uint32_t bin, bool live) {
  const uint32_t peers = __match_any_sync(kFull, live ? bin : ~0u);
  if (live && (__ffs(peers) - 1) == (int)(threadIdx.x & 31)) atomicAdd(&hist[bin], __popc(peers));
}

/* Slot of this lane's entry when the lanes with `p` append to *counter. Called by all lanes. */
__device__ __forceinline__ int32_t warp_slot(bool p, int32_t* counter) {
  const uint32_t bal = __ballot_sync(kFull, p);
  if (!bal) return 0;
  const int lane = threadIdx.x & 31, leader = __ffs(bal) - 1;
  int32_t base = 0;
  if (lane == leader) base = atomicAdd(counter, __popc(bal));
  base = __shfl_sync(kFull, base, leader);
  return base + __popc(bal & ((1u << lane) - 1u));
}

struct Bin {
  int32_t bin, above, count;
};

/* Block-wide: the bin of hist[0, nbins) holding the rem-th largest key, counting from the top
 * bin (1 <= rem <= total), how many keys lie in higher bins and how many in it. Each thread
 * sums nbins / kThreads adjacent bins (nbins: 1024, 2048 or 4096). Ends with a barrier. */
__device__ Bin find_bin(const int32_t* hist, int nbins, int32_t rem, int32_t* warp_tot,
                        Bin* s_bin) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int per = nbins / kThreads;
  const int top = nbins - 1 - tid * per; /* this thread's bins: top, top - 1, ... */
  int32_t sum = 0;
  for (int i = 0; i < per; ++i) sum += hist[top - i];
  const int32_t incl = warp_incl_scan(sum);
  if (lane == 31) warp_tot[warp] = incl;
  __syncthreads();
  const int32_t w = warp_tot[lane];
  const int32_t warp_before = __shfl_sync(kFull, warp_incl_scan(w) - w, warp);
  const int32_t before = warp_before + incl - sum;
  if (before < rem && rem <= before + sum) { /* exactly one thread */
    int32_t acc = before;
    for (int i = 0; i < per; ++i) {
      const int32_t c = hist[top - i];
      if (acc + c >= rem) {
        *s_bin = Bin{top - i, acc, c};
        break;
      }
      acc += c;
    }
  }
  __syncthreads();
  return *s_bin;
}

/* One radix pass over list entries [0, n): among the entries for which value(i, &v) holds and
 * whose v matches *prefix under *mask, the digit (v >> sh) of `width` bits holding the rem-th
 * largest v. Extends prefix and mask by that digit, takes the keys of higher digits off *rem
 * and sets *in_bin to the entries with that digit. Starts and ends with a barrier. */
template <typename Value>
__device__ void list_pass(int32_t n, Value value, int sh, int width, uint32_t* prefix,
                          uint32_t* mask, int32_t* rem, int32_t* in_bin, int32_t* hist,
                          int32_t* warp_tot, Bin* s_bin) {
  const int nbins = 1 << width;
  const uint32_t dmask = (uint32_t)nbins - 1u;
  for (int i = threadIdx.x; i < nbins; i += kThreads) hist[i] = 0;
  __syncthreads();
  const uint32_t pre = *prefix, msk = *mask;
#pragma unroll 4
  for (int32_t i0 = 0; i0 < n; i0 += kThreads) {
    const int32_t i = i0 + (int32_t)threadIdx.x;
    uint32_t v = 0;
    const bool live = i < n && value(i, &v) && (v & msk) == pre;
    hist_add(hist, (v >> sh) & dmask, live);
  }
  __syncthreads();
  const Bin f = find_bin(hist, nbins, *rem, warp_tot, s_bin);
  *prefix = pre | ((uint32_t)f.bin << sh);
  *mask = msk | (dmask << sh);
  *rem -= f.above;
  *in_bin = f.count;
}

__global__ void __launch_bounds__(kThreads)
    topk_kernel(const float* __restrict__ scores, int64_t row_stride, RowSpec spec,
                int32_t* __restrict__ idx, int64_t isb, int64_t ish, int32_t pad_to,
                int32_t* __restrict__ ws) {
  extern __shared__ int32_t smem[];
  int32_t* hist = smem;
  uint32_t* s_key = (uint32_t*)(smem + kLeadBins);
  int32_t* s_idx = smem + kLeadBins + kListCap;
  __shared__ int32_t warp_tot[kWarps];
  __shared__ Bin s_bin;
  __shared__ int32_t s_nvis, s_nout, s_nlist;
  __shared__ bool s_last;

  const int32_t row = blockIdx.x, chunk = blockIdx.y;
  const int32_t b = row / spec.rows_per_seq;
  const bool first_head = row % spec.rows_per_seq == 0;
  const int32_t S = spec.lengths ? spec.lengths[b] : spec.fixed_len;
  const int32_t lo = spec.n_sink;
  const int32_t hi = S - spec.n_recent;
  const int32_t qp = spec.has_qpos ? load_i32(spec.qpos, off2(spec.qpos, b, 0)) : INT32_MAX;
  const int32_t* kpos = spec.pos ? spec.pos + (int64_t)b * spec.pos_stride : nullptr;
  const float* s = scores + (int64_t)row * row_stride;
  int32_t* out = idx + (int64_t)b * isb + (int64_t)(row % spec.rows_per_seq) * ish;
  const int tid = threadIdx.x, lane = tid & 31;

  /* count and -1 padding, by the one block that finishes the row */
  auto finish_row = [&](int32_t k) {
    if (spec.count && first_head && tid == 0) spec.count[b] = k;
    for (int32_t i = k + tid; i < pad_to; i += kThreads) out[i] = -1;
  };
  const int32_t kb =
      qp < 0 ? 0 : budget_for(S, spec.n_sink, spec.n_recent, spec.budget_tokens, spec.budget_frac);
  const int32_t nchunks = kb > 0 ? (hi - lo + kChunk - 1) / kChunk : 1;
  if (chunk >= nchunks) return;
  if (kb == 0) {
    finish_row(0);
    return;
  }

  /* Element u of this thread in the chunk from `base` is j = base + u * kThreads + tid. */
  auto load = [&](int32_t base, float* x, int32_t* p) {
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int32_t j = base + u * kThreads + tid;
      x[u] = j < hi ? s[j] : 0.f;
      p[u] = j < hi && kpos ? kpos[j] : 0;
    }
  };
  auto make_key = [&](int32_t j, float x, int32_t p) {
    return j < hi && (!kpos || p <= qp) ? order_key(x) : 0u;
  };

  /* ---- leading-digit histogram of this block's chunk ---- */
  const int32_t own = lo + chunk * kChunk;
  uint32_t key[kU];
  {
    float x[kU];
    int32_t p[kU];
    load(own, x, p);
    for (int i = tid; i < kLeadBins; i += kThreads) hist[i] = 0;
    if (tid == 0) s_nvis = 0;
    __syncthreads();
    int32_t nvis = 0;
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      key[u] = make_key(own + u * kThreads + tid, x[u], p[u]);
      nvis += key[u] != 0;
    }
#pragma unroll
    for (int u = 0; u < kU; ++u) hist_add(hist, key[u] >> kLeadShift, key[u] != 0);
    nvis = __reduce_add_sync(kFull, nvis);
    if (lane == 0 && nvis) atomicAdd(&s_nvis, nvis);
    __syncthreads();
  }
  int32_t* g = ws + (int64_t)row * (kHeader + 2 * row_stride); /* this row's workspace */
  if (nchunks > 1) {
    for (int i = tid; i < kLeadBins; i += kThreads)
      if (hist[i]) atomicAdd(&g[i], hist[i]);
    if (tid == 0) atomicAdd(&g[kVisible], s_nvis);
    __threadfence(); /* this block's counts before its ticket */
    __syncthreads();
    if (tid == 0) s_last = atomicAdd(&g[kTicket], 1) == nchunks - 1;
    __syncthreads();
    if (!s_last) return;
    __threadfence(); /* every other block's counts after their tickets */
    for (int i = tid; i < kLeadBins; i += kThreads) hist[i] = atomicExch(&g[i], 0);
    if (tid == 0) {
      s_nvis = atomicExch(&g[kVisible], 0);
      g[kTicket] = 0;
    }
    __syncthreads();
  }

  /* ---- the row's threshold, by this block alone ---- */
  const int32_t k = kb < s_nvis ? kb : s_nvis;
  finish_row(k);
  if (k == 0) return;
  if (tid == 0) {
    s_nout = 0;
    s_nlist = 0;
  }
  const Bin lead = find_bin(hist, kLeadBins, k, warp_tot, &s_bin);
  int32_t rem = k - lead.above;       /* keys still to select from the threshold bin */
  const bool whole = rem == lead.count; /* the threshold bin is selected whole */
  const int32_t n_list = whole ? 0 : lead.count;
  uint32_t* lkey = s_key;
  int32_t* lidx = s_idx;
  if (n_list > kListCap) {
    lkey = (uint32_t*)(g + kHeader);
    lidx = g + kHeader + row_stride;
  }

  /* Pass over the row: keys of higher bins (and of the threshold bin when whole) are written,
   * keys of the threshold bin otherwise listed. One warp scan and one atomic per counter and
   * chunk; the next chunk's loads are in flight meanwhile. */
  const uint32_t take_from = whole ? (uint32_t)lead.bin : (uint32_t)lead.bin + 1u;
  float nx[kU];
  int32_t np[kU];
  if (chunk != 0) load(lo, nx, np);
  for (int32_t c = 0; c < nchunks; ++c) {
    const int32_t base = lo + c * kChunk;
    uint32_t ck[kU];
#pragma unroll
    for (int u = 0; u < kU; ++u)
      ck[u] = c == chunk ? key[u] : make_key(base + u * kThreads + tid, nx[u], np[u]);
    if (c + 1 < nchunks && c + 1 != chunk) load(base + kChunk, nx, np);
    int32_t n_take = 0, n_keep = 0;
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const uint32_t d = ck[u] >> kLeadShift;
      n_take += ck[u] != 0 && d >= take_from;
      n_keep += ck[u] != 0 && !whole && d == (uint32_t)lead.bin;
    }
    /* both counts in one warp scan: at most kU * 32 each */
    const int32_t packed = n_take | n_keep << 16;
    const int32_t incl = warp_incl_scan(packed);
    int32_t bt = 0, bk = 0;
    if (lane == 31) {
      if (incl & 0xffff) bt = atomicAdd(&s_nout, incl & 0xffff);
      if (incl >> 16) bk = atomicAdd(&s_nlist, incl >> 16);
    }
    const int32_t excl = incl - packed;
    bt = __shfl_sync(kFull, bt, 31) + (excl & 0xffff);
    bk = __shfl_sync(kFull, bk, 31) + (excl >> 16);
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int32_t j = base + u * kThreads + tid;
      const uint32_t d = ck[u] >> kLeadShift;
      if (ck[u] != 0 && d >= take_from) {
        out[bt++] = j;
      } else if (ck[u] != 0 && !whole && d == (uint32_t)lead.bin) {
        lkey[bk] = ck[u];
        lidx[bk++] = j;
      }
    }
  }
  if (whole) return;

  /* ---- radix passes over the list (each starts with a barrier: the list is complete) ---- */
  uint32_t prefix = (uint32_t)lead.bin << kLeadShift, mask = ~0u << kLeadShift;
  int32_t in_bin = n_list;
  auto by_key = [&](int32_t i, uint32_t* v) {
    *v = lkey[i];
    return true;
  };
  for (int sh = kLeadShift - kKeyBits; sh >= 0 && in_bin != rem; sh -= kKeyBits)
    list_pass(n_list, by_key, sh, kKeyBits, &prefix, &mask, &rem, &in_bin, hist, warp_tot, &s_bin);
  /* Still more keys equal to the threshold than places left: the lower indices win, i.e. the
   * larger complemented indices. */
  const uint32_t thr = prefix;
  uint32_t iprefix = 0, imask = 0;
  auto by_index = [&](int32_t i, uint32_t* v) {
    *v = ~(uint32_t)lidx[i];
    return lkey[i] == thr;
  };
  for (int pass = 0; pass < 3 && in_bin != rem; ++pass)
    list_pass(n_list, by_index,
              pass == 0   ? 21
              : pass == 1 ? 10
                          : 0,
              pass == 2 ? 10 : 11, &iprefix, &imask, &rem, &in_bin, hist, warp_tot, &s_bin);

  /* Selected: keys above the threshold's prefix, and keys in its bin whose complemented index
   * is in or above the index bin (every one of them when no index pass ran: iprefix = 0). */
  for (int32_t i0 = 0; i0 < n_list; i0 += kThreads) {
    const int32_t i = i0 + tid;
    uint32_t kv = 0;
    int32_t j = 0;
    if (i < n_list) {
      kv = lkey[i];
      j = lidx[i];
    }
    const bool take = i < n_list && (kv > prefix || (kv == prefix && ~(uint32_t)j >= iprefix));
    const int32_t o = warp_slot(take, &s_nout);
    if (take) out[o] = j;
  }
}

}  // namespace

size_t topk_workspace_bytes(int32_t rows, int64_t row_stride) {
  return sizeof(int32_t) * (size_t)rows * ((size_t)kHeader + 2 * (size_t)row_stride);
}

cudaError_t launch_topk(const float* scores, int64_t row_stride, int32_t rows, RowSpec spec,
                        int32_t* idx, int64_t idx_stride_b, int64_t idx_stride_h, int32_t pad_to,
                        void* workspace, cudaStream_t st) {
  if (rows <= 0) return cudaSuccess;
  const cudaError_t e =
      cudaFuncSetAttribute(topk_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)kSmem);
  if (e != cudaSuccess) return e;
  const dim3 grid((unsigned)rows, (unsigned)cdiv(row_stride > 0 ? row_stride : 1, kChunk));
  topk_kernel<<<grid, kThreads, kSmem, st>>>(scores, row_stride, spec, idx, idx_stride_b,
                                             idx_stride_h, pad_to, (int32_t*)workspace);
  return cudaPeekAtLastError();
}

}  // namespace sals_cuda
