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
#include "store.cuh"

namespace sals_cuda {
namespace {

constexpr int kScanThreads = kRowThreads;
/* Rows of an append projected at a time with quantised latent keys (float32 workspace). */
constexpr int64_t kLatChunk = 2048;

/* Finite check over a strided view of up to 4 dims; sets *flag when a NaN/inf is seen (a
 * plain store of 1: any number of writers agree). With rows_lo, only the rows (dim 0) in
 * [*rows_lo, *rows_hi), clamped to the view, are looked at. */
__global__ void finite_kernel(DView v, int64_t n, int* flag, const int32_t* rows_lo,
                              const int32_t* rows_hi) {
  int64_t lo = 0, hi = v.shape[0];
  if (rows_lo) {
    lo = *rows_lo < 0 ? 0 : (*rows_lo > hi ? hi : *rows_lo);
    hi = *rows_hi < lo ? lo : (*rows_hi > hi ? hi : *rows_hi);
  }
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    int64_t r = i, off = 0;
    for (int d = SALS_MAX_DIMS - 1; d > 0; --d) {
      off += (r % v.shape[d]) * v.stride[d];
      r /= v.shape[d];
    }
    /* r: the element's row */
    if (r >= lo && r < hi && !isfinite(load_elem(v.data, v.elem, off + r * v.stride[0]))) *flag = 1;
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

/*
 * Values and exact windows of one appended row (m = b * T + t) per block of kScanThreads
 * (store_value_row). With T == 1 the block first assigns its sequence's slot (a decode step
 * needs no slot kernel). Three blocks per SM leave registers for a pass's 32 loads in flight
 * without spills. With `flags` (check_finite), the block also checks its row's k and v; padding
 * rows (no slot) are not checked, as on the CPU.
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
  const int64_t row = (int64_t)b * c.cfg.max_tokens + slot;
  const bool sink = slot < c.cfg.n_sink;
  const bool recent = c.cfg.n_recent > 0 && slot >= n - c.cfg.n_recent;
  T* sk = sink ? (T*)c.sink_k + ((int64_t)b * c.cfg.n_sink + slot) * dk : nullptr;
  T* sv = sink ? (T*)c.sink_v + ((int64_t)b * c.cfg.n_sink + slot) * dk : nullptr;
  T* rk = recent ? (T*)c.recent_k + ((int64_t)b * c.cfg.n_recent + slot % c.cfg.n_recent) * dk
                 : nullptr;
  T* rv = recent ? (T*)c.recent_v + ((int64_t)b * c.cfg.n_recent + slot % c.cfg.n_recent) * dk
                 : nullptr;
  const ValueDst<T> dst{bits == 16 ? (T*)c.val + row * dk : nullptr,
                        (uint8_t*)c.val + row * c.val_row_bytes,
                        bits == 16 ? nullptr : c.val_scale + row * c.n_groups,
                        bits == 16 ? nullptr : c.val_zero + row * c.n_groups};
  auto exact = [&](int32_t ch, float kx, float vx) {
    if (sink) {
      sk[ch] = from_f<T>(kx);
      sv[ch] = from_f<T>(vx);
    }
    if (recent) {
      rk[ch] = from_f<T>(kx);
      rv[ch] = from_f<T>(vx);
    }
  };
  store_value_row<T>(k, v, RowOff(k, b, t, d), RowOff(v, b, t, d), dk, bits, c.cfg.value_group, dst,
                     sink || recent, exact, flags, xs);
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

/* One block per row (b, h) of idx: the first cnt[b] entries of selection row b * H + h (of
 * row_stride), then -1; count[b] = cnt[b] when count.data; *flag raised (when given) if a
 * selection is longer than idx's rows. */
__global__ void selected_kernel(const int32_t* sel, const int32_t* cnt, int32_t H,
                                int64_t row_stride, DView idx, DView count, int* flag) {
  const int32_t b = blockIdx.x / H, h = blockIdx.x % H;
  const int32_t n = cnt[b];
  const int64_t N = idx.shape[2];
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
    int32_t x = (j < n && j < row_stride) ? sel[((int64_t)b * H + h) * row_stride + j] : -1;
    ((int32_t*)idx.data)[off3(idx, b, h, j)] = x;
  }
  if (h == 0 && threadIdx.x == 0) {
    if (count.data) ((int32_t*)count.data)[b * count.stride[0]] = n;
    if (flag && n > N) *flag = 1;
  }
}

template <typename T> struct LatentEpi {
  sals_cache_t c;
  const int32_t* dest;
  int32_t T_;
  __device__ void operator()(int64_t m, int64_t n, float x) const {
    const int32_t slot = __ldg(dest + m); /* written by an earlier kernel: read-only here */
    if (slot >= 0) store_latent<T>(c, m / T_, slot, n, x);
  }
};

/* Where row m of a chunk from row m0 of an append keeps a latent part (quantize_latent_kernel):
 * its slot's row of lat_score / lat_rest and their scales and zeros. */
struct CacheLatentDst {
  sals_cache_t c;
  const int32_t* dest;
  int64_t m0;
  int32_t T_;
  __device__ bool operator()(int64_t m, int part, uint8_t** codes, uint16_t** sc,
                             uint16_t** zr) const {
    const int32_t slot = __ldg(dest + m0 + m);
    if (slot < 0) return false;
    const int64_t row = (m0 + m) / T_ * c.cfg.max_tokens + slot;
    const int64_t groups =
        (part ? c.cfg.rank - c.cfg.score_rank : c.cfg.score_rank) / c.cfg.key_group;
    *codes = (uint8_t*)(part ? c.lat_rest : c.lat_score) +
             row * (part ? c.lat_rest_bytes : c.lat_score_bytes);
    *sc = (part ? c.lat_rest_scale : c.lat_score_scale) + row * groups;
    *zr = (part ? c.lat_rest_zero : c.lat_score_zero) + row * groups;
    return true;
  }
};

/* Report (and clear) what the cache's earlier checks found. */
sals_status_t report_finite(CacheState* s) {
  return report_flags(s->flag_host, kFlagCacheCount,
                      "CUDA checks run on the device and report at the next call or "
                      "sals_cache_check; the cache holds that token: reset it");
}

/* Report what earlier checks found, then enqueue the check of input x, raising flag `which`. No
 * host synchronisation, no copy: graph capturable. (An append's k and v, and a sparse decode
 * step's q, are checked inside the kernels that read them instead.) */
sals_status_t check_finite(sals_cache_t* c, const sals_view_t* x, int which, cudaStream_t st) {
  CacheState* s = state(c);
  SALS_TRY(report_finite(s));
  int64_t n = 1;
  for (int d = 0; d < x->ndim; ++d) n *= x->shape[d];
  SALS_CUDA_TRY(launch_finite(dview(x), n, s->flag + which, nullptr, nullptr, st));
  return SALS_OK;
}

/*
 * The append's projection U^T k of rows [m0, m0 + Mc) of k (project_keys). kQuant = false: the
 * whole append (m0 = 0, Mc = M), the epilogue storing the latent rows; kQuant = true: one chunk,
 * written to the float32 workspace (row m - m0) for quantize_latent_kernel.
 */
template <bool kQuant>
sals_status_t project(sals_cache_t* c, const sals_view_t* k, int64_t m0, int64_t Mc,
                      cudaStream_t st) {
  CacheState* s = state(c);
  const int32_t T = (int32_t)k->shape[1];
  const sals_cache_t cv = *c;
  auto epi = [&](auto type) {
    typedef typename decltype(type)::type T_;
    if constexpr (kQuant) return LatentWsEpi{s->lat_ws, c->cfg.rank};
    else return LatentEpi<T_>{cv, s->dest, T};
  };
  const KeyProduct p{c->proj,     s->uh, c->cfg.dtype, c->cfg.head_dim,
                     c->cfg.rank, c->dk, s->proj_part, c->cfg.max_batch};
  return project_keys<kQuant>(p, dview(k), T, m0, Mc, epi, st);
}

}  // namespace

cudaError_t convert_projection(const float* src, void* dst, int64_t n, sals_dtype_t dtype,
                               cudaStream_t st) {
  const unsigned blocks = (unsigned)(cdiv(n, 256) < 4096 ? cdiv(n, 256) : 4096);
  SALS_DISPATCH_DTYPE(dtype, T,
                      { convert_proj_kernel<T><<<blocks, 256, 0, st>>>(src, (T*)dst, n); });
  return cudaPeekAtLastError();
}

cudaError_t launch_selected(const int32_t* sel, const int32_t* cnt, int32_t B, int32_t H,
                            int64_t row_stride, const DView& idx, const DView* count, int* flag,
                            cudaStream_t st) {
  if ((int64_t)B * H == 0) return cudaSuccess;
  selected_kernel<<<(unsigned)(B * H), 256, 0, st>>>(sel, cnt, H, row_stride, idx,
                                                     count ? *count : DView{}, flag);
  return cudaPeekAtLastError();
}

cudaError_t launch_finite(const DView& v, int64_t n, int* flag, const int32_t* rows_lo,
                          const int32_t* rows_hi, cudaStream_t st) {
  if (n == 0) return cudaSuccess;
  int64_t blocks = cdiv(n, 256);
  if (blocks > 4096) blocks = 4096;
  finite_kernel<<<(unsigned)blocks, 256, 0, st>>>(v, n, flag, rows_lo, rows_hi);
  return cudaPeekAtLastError();
}

/* What each deferred check reports (the flag's index), and as what. */
sals_status_t report_flags(int* flags_host, int n, const char* after) {
  static const struct {
    sals_status_t status;
    const char* what;
  } kWhat[kFlagCount] = {
      {SALS_ERR_NOT_FINITE, "k: an earlier call's input held NaN or infinity"},
      {SALS_ERR_NOT_FINITE, "v: an earlier call's input held NaN or infinity"},
      {SALS_ERR_NOT_FINITE, "q: an earlier call's input held NaN or infinity"},
      {SALS_ERR_NOT_FINITE,
       "k: an earlier call's latent coordinates spanned more than the float16 scale and zero of "
       "quantised keys hold"},
      {SALS_ERR_INVALID_ARGUMENT,
       "slot_mapping, window_rows: an earlier append had an entry out of range (that token or "
       "copy was not stored)"},
      {SALS_ERR_INVALID_ARGUMENT,
       "query_start, seq_lens, block_table, window_rows: an earlier attend had a sequence with "
       "an entry out of range (a sequence's: not attended, its output rows not written; a window "
       "row's: the token rebuilt)"},
      {SALS_ERR_INVALID_ARGUMENT,
       "selected: an earlier attend selected more tokens than its dim 2 holds (the rest were "
       "left out of `selected`, not out of the attention)"}};
  /* the mapped flags are read without synchronising: the checks whose kernels have completed */
  volatile int* flags = flags_host;
  for (int i = 0; i < n; ++i) {
    if (flags[i]) {
      for (int j = 0; j < n; ++j) flags[j] = 0;
      return sals_set_error(kWhat[i].status, "%s (%s)", kWhat[i].what, after);
    }
  }
  return SALS_OK;
}

/* Exposed to attend.cu. */
sals_status_t ensure_uh(sals_cache_t* c, cudaStream_t st) {
  CacheState* s = state(c);
  if (s->uh_ready || c->cfg.dtype == SALS_DTYPE_FLOAT32) return SALS_OK;
  SALS_CUDA_TRY(convert_projection(c->proj, s->uh, (int64_t)c->dk * c->cfg.rank, c->cfg.dtype, st));
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
  const size_t es = sals_dtype_size(cf.dtype);
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
  s->max_parts = decode_parts(c->cfg.n_head_kv, s->num_sms);
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
  if (!oom && (cudaHostAlloc((void**)&s->flag_host, kFlagCacheCount * sizeof(int),
                             cudaHostAllocMapped | cudaHostAllocPortable) != cudaSuccess ||
               cudaHostGetDevicePointer((void**)&s->flag, s->flag_host, 0) != cudaSuccess)) {
    cudaGetLastError();
    oom = true;
  }
  if (s->flag_host) memset(s->flag_host, 0, kFlagCacheCount * sizeof(int));
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
  int* flag = c->cfg.check_finite ? s->flag + kFlagLatent : nullptr;
  for (int64_t m0 = 0; m0 < M; m0 += s->lat_ws_rows) {
    const int64_t mc = M - m0 < s->lat_ws_rows ? M - m0 : s->lat_ws_rows;
    SALS_TRY(project<true>(c, k, m0, mc, st));
    SALS_CUDA_TRY(launch_quantize_latent(CacheLatentDst{cv, s->dest, m0, T}, s->lat_ws, mc,
                                         (int32_t)N, c->cfg.score_rank, c->cfg.key_group,
                                         c->cfg.key_bits, flag, st));
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
  const DView cv = dview(count);
  SALS_CUDA_TRY(launch_selected(c->sel_idx, c->sel_count, B, H, c->cfg.max_tokens, dview(idx), &cv,
                                nullptr, (cudaStream_t)stream));
  return SALS_OK;
}

}  // extern "C"
