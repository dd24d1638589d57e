/*
 * Paged storage on a CUDA device (sals_paged_* with CUDA tensors). Tokens live in the caller's
 * pages, one slot per token in the CPU's layout (sals_paged_layout_t).
 *
 * append: one block per token stores its value, and its exact copy in the window store, into
 *   its slot (store_value_row, the cache's code); the key projection (project_keys) then writes
 *   the latent key into the slot, or into a workspace that quantize_latent_kernel quantises.
 * attend: plan_kernel checks each sequence's indices and lays out the call's work; on a sparse
 *   layer the single-query sequences' queries are folded (launch_fold), their candidates scored
 *   through the block table (launch_scores) and selected (launch_topk); then the cache's
 *   attention kernels run in their paged instantiation: the decode kernels for the single-query
 *   sequences (when the layer fits them and the slots are 16-byte aligned), the general kernel
 *   for every other sequence (queries [t0, t0 + QT) of a sequence per block).
 * The host reads no index tensor: entries out of range are skipped on the device and reported
 * by deferred flags (PagedState::flag, as the cache's finite checks). Scratch is taken per call,
 * stream-ordered, from the device's current memory pool (cudaMallocAsync), so calls with the
 * same settings may run at once on any streams; nothing synchronises the host.
 */
#include <string.h>

#include <new>

#include "common.cuh"
#include "gemm.cuh"
#include "store.cuh"

namespace sals_cuda {
namespace {

constexpr int64_t kSkinnyRows = 64; /* appends of at most this many tokens: split-K product */
constexpr int64_t kLatChunk = 2048; /* quantised keys: rows projected at a time */
constexpr int kPlanThreads = 256;
/* Decode logits larger than this ([B, n_head_q, attended list]) go to the general kernel. */
constexpr size_t kMaxLogitsBytes = (size_t)1 << 30;

const char* const kReportAfter =
    "CUDA checks run on the device and report at the next call with these settings or "
    "sals_paged_check";

PagedState* state_of(const sals_paged_t* p) { return (PagedState*)p->backend; }

/* A [N, H, d] view as the [N, 1, H, d] rows the shared loaders and kernels read. */
DView rows4(const sals_view_t* x) {
  DView v = dview(x);
  v.shape[3] = v.shape[2];
  v.shape[2] = v.shape[1];
  v.shape[1] = 1;
  v.stride[3] = v.stride[2];
  v.stride[2] = v.stride[1];
  v.stride[1] = 0;
  return v;
}

/* Scratch of one call: offsets carved on the host, one stream-ordered allocation, released
 * (stream-ordered) when the call returns. */
struct Scratch {
  size_t at = 0;
  char* base = nullptr;
  cudaStream_t st = nullptr;
  size_t take(size_t bytes) {
    const size_t o = at;
    at = (at + bytes + 255) & ~(size_t)255;
    return o;
  }
  template <typename X> X* ptr(size_t offset) const { return (X*)(base + offset); }
  sals_status_t alloc(cudaStream_t s, const char* what) {
    st = s;
    if (cudaMallocAsync((void**)&base, at > 0 ? at : 1, st) != cudaSuccess) {
      cudaGetLastError();
      base = nullptr;
      return sals_set_error(SALS_ERR_OUT_OF_MEMORY,
                            "paged %s: no %zu bytes of device scratch (stream-ordered)", what, at);
    }
    return SALS_OK;
  }
  ~Scratch() {
    if (base) cudaFreeAsync(base, st);
  }
};

/* ---- append --------------------------------------------------------------------------------- */

/* The pages an append writes: slot s is slot s % block_size of block s / block_size. */
struct PagedStore {
  uint8_t* pages;
  int64_t s0, s1, n_slots;
  int32_t block_size;
  sals_paged_layout_t lay;
  __device__ uint8_t* slot(int32_t s) const {
    return pages + (int64_t)(s / block_size) * s0 + (int64_t)(s % block_size) * s1;
  }
};

/* The slot of appended token m; negative for a token skipped, or whose slot is past the pages. */
__device__ __forceinline__ int32_t slot_of(const DView& slots, int64_t m, int64_t n_slots) {
  const int32_t s = load_i32(slots, m * slots.stride[0]);
  return s < n_slots ? s : -1;
}

/*
 * The value of token blockIdx.x into its slot (store_value_row) and, with a window row, its
 * exact key and value into the window store. A slot or window row out of range raises
 * flags[kFlagSlots] and is not written; a skipped token (slot < 0) is not read, so not checked.
 */
template <typename T>
__global__ void __launch_bounds__(kRowThreads, 3)
    values_kernel(PagedStore p, DView k, DView v, DView slots, DView wrows, DView window,
                  int32_t bits, int32_t group, int32_t dk, int32_t d, int* flags, int32_t finite) {
  __shared__ float xs[kVChunk + kVChunk / 32];
  const int64_t n = blockIdx.x;
  const int32_t s = load_i32(slots, n * slots.stride[0]);
  if (s < 0) return;
  int32_t wr = wrows.data ? load_i32(wrows, n * wrows.stride[0]) : -1;
  const bool bad_slot = s >= p.n_slots, bad_row = wr < -1 || (wr >= 0 && wr >= window.shape[0]);
  if ((bad_slot || bad_row) && threadIdx.x == 0) flags[kFlagSlots] = 1;
  if (bad_slot) return;
  if (bad_row) wr = -1;
  uint8_t* base = p.slot(s);
  const ValueDst<T> dst{bits == 16 ? (T*)(base + p.lay.val) : nullptr, base + p.lay.val,
                        bits == 16 ? nullptr : (uint16_t*)(base + p.lay.val_scale),
                        bits == 16 ? nullptr : (uint16_t*)(base + p.lay.val_zero)};
  auto exact = [&](int32_t ch, float kx, float vx) {
    const int64_t o = off4(window, wr, 0, ch / d, ch % d);
    store_elem((void*)window.data, window.elem, o, kx);
    store_elem((void*)window.data, window.elem, o + window.stride[1], vx);
  };
  store_value_row<T>(k, v, RowOff(k, n, 0, d), RowOff(v, n, 0, d), dk, bits, group, dst, wr >= 0,
                     exact, finite ? flags : nullptr, xs);
}

/* 16-bit latent keys: coordinate n of token m into its slot (both parts lie back to back). */
template <typename T> struct LatentEpi {
  PagedStore p;
  DView slots;
  __device__ void operator()(int64_t m, int64_t n, float x) const {
    const int32_t s = slot_of(slots, m, p.n_slots);
    if (s >= 0) ((T*)(p.slot(s) + p.lay.lat[0]))[n] = from_f<T>(x);
  }
};

/* Quantised latent keys: where row m of a chunk from row m0 keeps a part (quantize_latent_kernel).
 */
struct LatentDst {
  PagedStore p;
  DView slots;
  int64_t m0;
  __device__ bool operator()(int64_t m, int part, uint8_t** codes, uint16_t** sc,
                             uint16_t** zr) const {
    const int32_t s = slot_of(slots, m0 + m, p.n_slots);
    if (s < 0) return false;
    uint8_t* base = p.slot(s);
    *codes = base + p.lay.lat[part];
    *sc = (uint16_t*)(base + p.lay.lat_scale[part]);
    *zr = (uint16_t*)(base + p.lay.lat_zero[part]);
    return true;
  }
};

/* ---- attend --------------------------------------------------------------------------------- */

/* What plan_kernel writes for the attention kernels: per sequence b its tokens (0 when its
 * indices were out of range), first query row and query count; q_row: the query row of a
 * sequence the decode kernels run, else -1; fold_row: the row its scoring query is folded from
 * (0 unless it takes a sparse step); sel_qpos and sel_len: its query's position and its tokens
 * when it takes a sparse step, else -1 and 0 (nothing scored, nothing selected). Work items of the
 * general kernel, (sequence, first query) pairs: `singles` (one query, when the decode kernels do
 * not run) and `multis` (QT queries each, at most max_multis), counted in n_tiles[0] and [1] (zero
 * before the kernel). */
struct Plan {
  int32_t *len, *q_first, *q_count, *q_row, *fold_row, *sel_qpos, *sel_len;
  int32_t *singles, *multis, *n_tiles;
  int64_t max_multis;
};

/*
 * One block per sequence b: the device-side checks of its query_start, seq_lens and block table
 * entries (a sequence out of range is not attended: no output row of it is written) and of its
 * window rows (one out of range is not used: that token is rebuilt), raising flags[kFlagSeqs];
 * then its entries of the plan.
 */
__global__ void __launch_bounds__(kPlanThreads)
    plan_kernel(DView qs, DView lens, DView table, DView wrows, int64_t N, int64_t num_blocks,
                int32_t block_size, int64_t cap, int64_t w_rows, int32_t dense, int32_t fast,
                int32_t QT, Plan plan, int* flags) {
  __shared__ int32_t s_q0, s_nq, s_S, s_start, s_nt;
  __shared__ int32_t s_ok;
  const int32_t b = blockIdx.x;
  if (threadIdx.x == 0) {
    const int64_t q0 = load_i32(qs, b * qs.stride[0]), q1 = load_i32(qs, (b + 1) * qs.stride[0]);
    const int64_t S = load_i32(lens, b * lens.stride[0]);
    s_ok = 0 <= q0 && q0 <= q1 && q1 <= N && q1 - q0 <= S && S <= cap;
    s_q0 = (int32_t)q0;
    s_nq = (int32_t)(q1 - q0);
    s_S = (int32_t)S;
  }
  __syncthreads();
  const int32_t S = s_S;
  int bad = 0, bad_row = 0;
  if (s_ok && block_size > 0)
    for (int64_t j = threadIdx.x; j < (S + block_size - 1) / block_size; j += blockDim.x) {
      const int32_t e = load_i32(table, off2(table, b, j));
      bad |= e < 0 || e >= num_blocks;
    }
  if (wrows.data)
    for (int64_t j = threadIdx.x; j < wrows.shape[1]; j += blockDim.x) {
      const int32_t r = load_i32(wrows, off2(wrows, b, j));
      bad_row |= r < -1 || r >= w_rows;
    }
  const int any_bad = __syncthreads_or(bad), any_bad_row = __syncthreads_or(bad_row);
  if (threadIdx.x == 0) {
    const bool ok = s_ok && !any_bad;
    if (!ok || any_bad_row) flags[kFlagSeqs] = 1;
    const int32_t nq = ok ? s_nq : 0;
    const bool single = nq == 1, sparse = single && !dense;
    plan.len[b] = ok ? S : 0;
    plan.q_first[b] = ok ? s_q0 : 0;
    plan.q_count[b] = nq;
    plan.q_row[b] = single && fast ? s_q0 : -1;
    plan.fold_row[b] = sparse ? s_q0 : 0;
    plan.sel_qpos[b] = sparse ? S - 1 : -1;
    plan.sel_len[b] = sparse ? S : 0;
    if (single && !fast) {
      const int32_t i = atomicAdd(&plan.n_tiles[0], 1);
      plan.singles[2 * i] = b;
      plan.singles[2 * i + 1] = 0;
    }
    s_nt = nq > 1 ? (nq + QT - 1) / QT : 0;
    s_start = s_nt > 0 ? atomicAdd(&plan.n_tiles[1], s_nt) : 0;
    /* more work items than the bound: query ranges of sequences overlap */
    if ((int64_t)s_start + s_nt > plan.max_multis) flags[kFlagSeqs] = 1;
  }
  __syncthreads();
  for (int32_t j = threadIdx.x; j < s_nt; j += blockDim.x) {
    const int64_t i = (int64_t)s_start + j;
    if (i >= plan.max_multis) break;
    plan.multis[2 * i] = b;
    plan.multis[2 * i + 1] = j * QT;
  }
}

/* The slot layout's fields are where the vector loads and cp.async of the decode kernels and of
 * the scoring pass need them: the pages, their block and slot strides and every field used at
 * 16 bytes (scales and zeros of values at 4). */
bool slots_aligned(const sals_paged_t* p, const sals_view_t* pages) {
  const sals_paged_layout_t& L = p->layout;
  bool ok = (uintptr_t)pages->data % 16 == 0 && pages->stride[0] % 16 == 0 &&
            pages->stride[1] % 16 == 0 && L.lat[0] % 16 == 0 && L.lat[1] % 16 == 0 &&
            L.val % 16 == 0;
  if (p->cfg.value_bits < 16) ok = ok && L.val_scale % 4 == 0 && L.val_zero % 4 == 0;
  return ok;
}

}  // namespace
}  // namespace sals_cuda

using namespace sals_cuda;

extern "C" {

void sals_cuda_paged_free(sals_paged_t* p) {
  PagedState* s = p ? state_of(p) : nullptr;
  if (!s) return;
  DeviceGuard g(s->device);
  if (s->proj) cudaFree(s->proj);
  if (s->uh) cudaFree(s->uh);
  if (s->inv_freq) cudaFree(s->inv_freq);
  if (s->flag_host) cudaFreeHost(s->flag_host);
  delete s;
  p->backend = nullptr;
}

sals_status_t sals_cuda_paged_init(sals_paged_t* p) {
  const sals_config_t& cf = p->cfg;
  DeviceGuard g(cf.device.device_id);
  SALS_CUDA_TRY(cudaSetDevice(cf.device.device_id));
  PagedState* s = new (std::nothrow) PagedState();
  if (!s) return sals_set_error(SALS_ERR_OUT_OF_MEMORY, "paged settings: host state");
  memset(s, 0, sizeof *s);
  s->device = cf.device.device_id;
  p->backend = s;
  SALS_CUDA_TRY(cudaDeviceGetAttribute(&s->num_sms, cudaDevAttrMultiProcessorCount, s->device));
  const int64_t n = (int64_t)p->dk * cf.rank, half = p->rotary_dim / 2 > 0 ? p->rotary_dim / 2 : 1;
  const size_t e = sals_dtype_size(cf.dtype);
  bool oom =
      cudaMalloc((void**)&s->proj, (size_t)n * 4) != cudaSuccess ||
      cudaMalloc((void**)&s->inv_freq, (size_t)half * 4) != cudaSuccess ||
      (cf.dtype != SALS_DTYPE_FLOAT32 && cudaMalloc(&s->uh, 3 * (size_t)n * e) != cudaSuccess);
  oom = oom ||
        cudaHostAlloc((void**)&s->flag_host, kFlagCount * sizeof(int),
                      cudaHostAllocMapped | cudaHostAllocPortable) != cudaSuccess ||
        cudaHostGetDevicePointer((void**)&s->flag, s->flag_host, 0) != cudaSuccess;
  if (oom) {
    cudaGetLastError();
    return sals_set_error(SALS_ERR_OUT_OF_MEMORY,
                          "paged settings: device copies of the projection (%lld x %d) on cuda:%d",
                          (long long)p->dk, (int)cf.rank, s->device);
  }
  memset(s->flag_host, 0, kFlagCount * sizeof(int));
  SALS_CUDA_TRY(cudaMemcpy(s->proj, p->proj, (size_t)n * 4, cudaMemcpyHostToDevice));
  SALS_CUDA_TRY(cudaMemcpy(s->inv_freq, p->inv_freq, (size_t)half * 4, cudaMemcpyHostToDevice));
  if (s->uh) SALS_CUDA_TRY(convert_projection(s->proj, s->uh, n, cf.dtype, nullptr));
  SALS_CUDA_TRY(cudaDeviceSynchronize());
  return SALS_OK;
}

sals_status_t sals_cuda_paged_check(const sals_paged_t* p, int32_t wait, void* stream) {
  PagedState* s = state_of(p);
  DeviceGuard g(s->device);
  cudaStream_t st = (cudaStream_t)stream;
  if (wait) {
    /* waiting is impossible while the stream is captured: report what is known */
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    SALS_CUDA_TRY(cudaStreamIsCapturing(st, &capture));
    if (capture == cudaStreamCaptureStatusNone) SALS_CUDA_TRY(cudaStreamSynchronize(st));
  }
  return report_flags(s->flag_host, kFlagCount, kReportAfter);
}

sals_status_t sals_cuda_paged_append(const sals_paged_t* p, const sals_view_t* k,
                                     const sals_view_t* v, const sals_view_t* slots,
                                     const sals_view_t* pages, const sals_view_t* window_rows,
                                     const sals_view_t* window, void* stream) {
  PagedState* s = state_of(p);
  DeviceGuard g(s->device);
  cudaStream_t st = (cudaStream_t)stream;
  const sals_config_t& cf = p->cfg;
  SALS_TRY(report_flags(s->flag_host, kFlagCount, kReportAfter));
  const int64_t N = k->shape[0], r = cf.rank;
  if (N == 0) return SALS_OK;
  const bool quant = cf.key_bits < 16;
  const int64_t chunk = N < kLatChunk ? N : kLatChunk;
  const int64_t skinny_rows = N <= kSkinnyRows ? N : 0;
  Scratch w;
  const size_t o_skinny = w.take(skinny_rows ? skinny_work_bytes(skinny_rows, r, p->dk, 1) : 0);
  const size_t o_lat = w.take(quant ? (size_t)(chunk * r) * 4 : 0);
  SALS_TRY(w.alloc(st, "append"));
  if (skinny_rows)
    SALS_CUDA_TRY(cudaMemsetAsync(w.ptr<char>(o_skinny), 0,
                                  (size_t)4 * skinny_counters(skinny_rows, r, 1), st));

  const PagedStore ps{(uint8_t*)pages->data,    pages->stride[0],
                      pages->stride[1],         pages->shape[0] * pages->shape[1],
                      (int32_t)pages->shape[1], p->layout};
  const DView kv = rows4(k), vv = rows4(v), sv = dview(slots);
  SALS_DISPATCH_DTYPE(cf.dtype, T, {
    values_kernel<T><<<(unsigned)N, kRowThreads, 0, st>>>(
        ps, kv, vv, sv, dview(window_rows), dview(window), cf.value_bits, cf.value_group, p->dk,
        cf.head_dim, s->flag, cf.check_finite);
  });
  SALS_CUDA_LAUNCHED("paged values");
  const KeyProduct kp{s->proj,    s->uh, cf.dtype, cf.head_dim, r, p->dk, w.ptr<void>(o_skinny),
                      skinny_rows};
  if (!quant) {
    auto epi = [&](auto type) {
      typedef typename decltype(type)::type T_;
      return LatentEpi<T_>{ps, sv};
    };
    return project_keys<false>(kp, kv, 1, 0, N, epi, st);
  }
  /* quantised keys: each chunk of rows is projected to float32, then quantised into its slots */
  float* lat = w.ptr<float>(o_lat);
  auto epi = [&](auto) { return LatentWsEpi{lat, (int32_t)r}; };
  int* flag = cf.check_finite ? s->flag + kFlagLatent : nullptr;
  for (int64_t m0 = 0; m0 < N; m0 += chunk) {
    const int64_t mc = N - m0 < chunk ? N - m0 : chunk;
    SALS_TRY(project_keys<true>(kp, kv, 1, m0, mc, epi, st));
    SALS_CUDA_TRY(launch_quantize_latent(LatentDst{ps, sv, m0}, lat, mc, (int32_t)r, cf.score_rank,
                                         cf.key_group, cf.key_bits, flag, st));
  }
  return SALS_OK;
}

sals_status_t sals_cuda_paged_attend(const sals_paged_t* p, const sals_view_t* q,
                                     const sals_view_t* query_start, const sals_view_t* seq_lens,
                                     const sals_view_t* block_table, const sals_view_t* pages,
                                     const sals_view_t* window_rows, const sals_view_t* window,
                                     const sals_view_t* out, const sals_view_t* selected,
                                     void* stream) {
  PagedState* s = state_of(p);
  DeviceGuard g(s->device);
  cudaStream_t st = (cudaStream_t)stream;
  const sals_config_t& cf = p->cfg;
  SALS_TRY(report_flags(s->flag_host, kFlagCount, kReportAfter));
  const int32_t B = (int32_t)seq_lens->shape[0], H = p->n_sel_heads, D = cf.head_dim;
  const int32_t Hq = cf.n_head_q, Hkv = cf.n_head_kv, G = Hq / Hkv, rs = cf.score_rank;
  const int64_t N = q->shape[0], bs = pages->shape[1];
  int64_t cap = block_table->shape[1] * bs; /* the longest a sequence may be */
  if (cap > INT32_MAX) cap = INT32_MAX;
  const bool sparse = !cf.dense;
  /* selections are at most the budget at the capacity (at least 1 entry: no zero-size rows) */
  const int64_t budget_cap = sparse ? most_selected(cf, (int32_t)cap) : 0;
  const int64_t most = budget_cap > 0 ? budget_cap : 1;
  const int64_t lmax = cf.dense ? cap : (int64_t)cf.n_sink + cf.n_recent + budget_cap;
  const bool aligned = slots_aligned(p, pages);
  const bool fast = decode_kernels_fit(cf, p->rotary_dim, p->interleaved) && aligned &&
                    (size_t)B * Hq * (size_t)(lmax > 0 ? lmax : 1) * 4 <= kMaxLogitsBytes;
  const int32_t QT = general_rows(G);
  const int64_t max_multis = cdiv(N, QT) + (B < N / 2 ? B : N / 2);
  const int max_parts = decode_parts(Hkv, s->num_sms);

  /* scratch: the plan, then the buffers that start zeroed (tile counters, selection counts,
   * softmax arrival counters, the fold's split-K counters) back to back, then the rest */
  Scratch w;
  const size_t o_plan = w.take((size_t)4 * (7 * (size_t)B + 2 * (size_t)B + 2 * max_multis));
  const size_t o_counters = w.take(4 * 2);
  const size_t o_count = w.take((size_t)4 * B);
  const size_t o_done = w.take(fast ? (size_t)4 * B * Hkv : 0);
  const size_t fold_bytes = sparse ? skinny_work_bytes(B, rs, H == 1 ? p->dk : D, H) : 0;
  const size_t o_fold = w.take(fold_bytes);
  const size_t zero_end = o_fold + (sparse ? (size_t)4 * skinny_counters(B, rs, H) : 0);
  const size_t o_qlat = w.take(sparse ? (size_t)4 * B * H * rs : 0);
  const size_t o_scores = w.take(sparse ? (size_t)4 * B * H * (size_t)cap : 0);
  const size_t o_sel = w.take((size_t)4 * B * H * (size_t)most);
  const size_t topk_bytes = sparse ? topk_workspace_bytes(B * H, cap > 0 ? cap : 1) : 0;
  const size_t o_topk = w.take(topk_bytes);
  const size_t o_logits = w.take(fast ? (size_t)4 * B * Hq * (size_t)lmax : 0);
  const size_t o_part_o = w.take(fast ? (size_t)4 * B * Hq * max_parts * D : 0);
  const size_t o_part_ml = w.take(fast ? (size_t)4 * B * Hq * max_parts * 2 : 0);
  SALS_TRY(w.alloc(st, "attend"));
  SALS_CUDA_TRY(cudaMemsetAsync(w.ptr<char>(o_counters), 0, zero_end - o_counters, st));
  if (topk_bytes) /* the top-k workspace's row headers start zeroed (select.cu) */
    SALS_CUDA_TRY(cudaMemset2DAsync(w.ptr<char>(o_topk), topk_bytes / ((size_t)B * H), 0,
                                    topk_workspace_bytes(1, 0), (size_t)B * H, st));

  int32_t* plan_i = w.ptr<int32_t>(o_plan);
  Plan plan;
  plan.len = plan_i;
  plan.q_first = plan_i + B;
  plan.q_count = plan_i + 2 * (size_t)B;
  plan.q_row = plan_i + 3 * (size_t)B;
  plan.fold_row = plan_i + 4 * (size_t)B;
  plan.sel_qpos = plan_i + 5 * (size_t)B;
  plan.sel_len = plan_i + 6 * (size_t)B;
  plan.singles = plan_i + 7 * (size_t)B;
  plan.multis = plan_i + 9 * (size_t)B;
  plan.n_tiles = w.ptr<int32_t>(o_counters);
  plan.max_multis = max_multis;
  plan_kernel<<<(unsigned)B, kPlanThreads, 0, st>>>(
      dview(query_start), dview(seq_lens), dview(block_table), dview(window_rows), N,
      pages->shape[0], (int32_t)bs, cap, window ? window->shape[0] : 0, cf.dense, fast, QT, plan,
      s->flag);
  SALS_CUDA_LAUNCHED("paged plan");
  if (cf.check_finite) /* the rows the call reads: query_start[0] .. query_start[B] - 1 */
    SALS_CUDA_TRY(
        launch_finite(dview(q), N * Hq * D, s->flag + kFlagQ, (const int32_t*)query_start->data,
                      (const int32_t*)query_start->data + (int64_t)B * query_start->stride[0], st));

  int32_t* sel = w.ptr<int32_t>(o_sel);
  int32_t* sel_count = w.ptr<int32_t>(o_count);
  PagedSlots slots;
  slots.pages = (const uint8_t*)pages->data;
  slots.s0 = pages->stride[0];
  slots.s1 = pages->stride[1];
  slots.table = (const int32_t*)block_table->data;
  slots.table_s0 = block_table->stride[0];
  slots.block_size = (int32_t)bs;
  slots.lay = p->layout;
  if (sparse && N > 0) {
    float* qlat = w.ptr<float>(o_qlat);
    float* scores = w.ptr<float>(o_scores);
    SALS_CUDA_TRY(launch_fold(rows4(q), plan.fold_row, B, H, G, D, p->dk, s->proj, cf.rank, rs,
                              w.ptr<void>(o_fold), B, qlat, nullptr, st));
    SALS_CUDA_TRY(launch_scores(qlat, H, rs, slots, sals_dtype_elem(cf.dtype), cf.key_bits,
                                cf.key_group, aligned, plan.sel_len, (int32_t)cap, cf.n_sink,
                                cf.n_recent, B, scores, (int64_t)H * cap, s->num_sms, st));
    RowSpec spec = budget_rows(cf, plan.sel_len, H, sel_count);
    spec.qpos.data = plan.sel_qpos;
    spec.qpos.elem = SALS_ELEM_I32;
    spec.qpos.shape[0] = B;
    spec.qpos.shape[1] = spec.qpos.shape[2] = spec.qpos.shape[3] = 1;
    spec.qpos.stride[0] = 1;
    spec.has_qpos = true; /* no pos: token t of a sequence is at position t <= its query's */
    SALS_CUDA_TRY(launch_topk(scores, cap, B * H, spec, sel, (int64_t)H * most, most, 0,
                              w.ptr<void>(o_topk), st));
  }

  AttnArgs a{};
  a.len = plan.len;
  a.sel_idx = sel;
  a.sel_count = sel_count;
  a.sel_stride = most;
  a.uh = s->uh;
  a.proj = s->proj;
  a.inv_freq = s->inv_freq;
  a.n_sink = cf.n_sink;
  a.n_recent = cf.n_recent;
  a.rank = cf.rank;
  a.rs = rs;
  a.dk = p->dk;
  a.hkv = Hkv;
  a.hq = Hq;
  a.G = G;
  a.bits = cf.value_bits;
  a.group = cf.value_group;
  a.n_sel_heads = H;
  a.sparse = sparse ? 1 : 0;
  a.rotary_dim = p->rotary_dim;
  a.inter = p->interleaved;
  a.att = p->attention_scaling;
  a.scale = p->scale;
  a.q = rows4(q);
  a.out = rows4(out);
  a.logits = w.ptr<float>(o_logits);
  a.lmax = lmax;
  a.part_o = w.ptr<float>(o_part_o);
  a.part_ml = w.ptr<float>(o_part_ml);
  a.pv_done = w.ptr<uint32_t>(o_done);
  a.max_parts = max_parts;
  a.key_bits = cf.key_bits;
  a.key_group = cf.key_group;
  a.pg = slots;
  if (window) {
    a.window = window->data;
    a.w_elem = (int32_t)window->elem;
    a.w_rows = window->shape[0];
    a.w_s0 = window->stride[0];
    a.w_s1 = window->stride[1];
    a.w_s2 = window->stride[2];
    a.wrows = (const int32_t*)window_rows->data;
    a.wrows_s0 = window_rows->stride[0];
  }
  a.q_row = plan.q_row;
  a.q_first = plan.q_first;
  a.q_count = plan.q_count;

  if (fast) {
    /* tiles per (sequence, head) bounded on the host by the block table's capacity */
    const int32_t max_tiles = (int32_t)cdiv(lmax, 128);
    const DecodeGrid dg{B, max_tiles > 0 ? max_tiles : 1, max_parts, s->num_sms};
    SALS_CUDA_TRY(launch_decode_attention(a, true, cf.dtype, D, dg, st));
  } else {
    a.tiles = plan.singles;
    a.n_tiles = plan.n_tiles;
    SALS_CUDA_TRY(launch_general_attention(a, true, cf.dtype, D, 1, 1,
                                           dim3((unsigned)B, (unsigned)Hkv, 1), st));
  }
  if (max_multis > 0) {
    a.tiles = plan.multis;
    a.n_tiles = plan.n_tiles + 1;
    SALS_CUDA_TRY(launch_general_attention(a, true, cf.dtype, D, QT, QT,
                                           dim3((unsigned)max_multis, (unsigned)Hkv, 1), st));
  }
  if (selected)
    SALS_CUDA_TRY(launch_selected(sel, sel_count, B, H, most, dview(selected), nullptr,
                                  s->flag + kFlagSelected, st));
  return SALS_OK;
}

}  // extern "C"
