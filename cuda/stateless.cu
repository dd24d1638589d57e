/*
 * Stateless stages on caller-provided CUDA tensors (experiments, tests). Any float dtype and
 * strides; float32 arithmetic. Only sals_score_select needs scratch memory (float queries,
 * scores, top-k workspace): it is taken stream-ordered (cudaMallocAsync), which graph capture
 * also accepts.
 */
#include "common.cuh"
#include "gemm.cuh"

namespace sals_cuda {
namespace {

struct View2Load {
  DView v;
  __device__ float operator()(int64_t i, int64_t j) const {
    return load_elem(v.data, v.elem, off2(v, i, j));
  }
};
struct View2Store {
  DView v;
  __device__ void operator()(int64_t i, int64_t j, float x) const {
    store_elem((void*)v.data, v.elem, off2(v, i, j), x);
  }
};

RopeArgs rope_args(const float* inv_freq, int32_t rotary_dim, float att, int32_t inter) {
  RopeArgs r;
  r.rotary_dim = rotary_dim;
  r.att = att;
  r.inter = inter;
  for (int i = 0; i < 256; ++i) r.inv_freq[i] = i < rotary_dim / 2 ? inv_freq[i] : 0.f;
  return r;
}

/* One thread per (row, head, pair or unrotated dim); reads both elements before writing, so
 * out may alias x. */
__global__ void rope_kernel(DView x, DView pos, RopeArgs r, DView out, int64_t N, int32_t H,
                            int32_t d) {
  const int32_t half = r.rotary_dim / 2;
  const int32_t units = half + (d - r.rotary_dim);
  const int64_t total = N * H * units;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t n = i / ((int64_t)H * units);
    const int32_t h = (int32_t)(i / units % H), u = (int32_t)(i % units);
    if (u < half) {
      int32_t ea, eb;
      rope_pair_index(u, r.rotary_dim, r.inter, &ea, &eb);
      float cs, sn;
      rope_cs(load_i32(pos, n * pos.stride[0]), r.inv_freq[u], r.att, &cs, &sn);
      const float xa = load_elem(x.data, x.elem, off3(x, n, h, ea));
      const float xb = load_elem(x.data, x.elem, off3(x, n, h, eb));
      store_elem((void*)out.data, out.elem, off3(out, n, h, ea), xa * cs - xb * sn);
      store_elem((void*)out.data, out.elem, off3(out, n, h, eb), xb * cs + xa * sn);
    } else {
      const int32_t e = r.rotary_dim + (u - half);
      store_elem((void*)out.data, out.elem, off3(out, n, h, e),
                 load_elem(x.data, x.elem, off3(x, n, h, e)));
    }
  }
}

/* One block per row: k = proj @ k_lat[n] into shared memory, then rotated into out. */
__global__ void rebuild_rope_kernel(DView kl, DView proj, DView pos, RopeArgs r, DView out,
                                    int32_t H, int32_t d) {
  extern __shared__ float sm[];
  const int64_t n = blockIdx.x;
  const int32_t R = (int32_t)kl.shape[1], dk = H * d;
  float* lat = sm;
  float* k = sm + R;
  for (int32_t c = threadIdx.x; c < R; c += blockDim.x)
    lat[c] = load_elem(kl.data, kl.elem, off2(kl, n, c));
  __syncthreads();
  for (int32_t e = threadIdx.x; e < dk; e += blockDim.x) {
    float s = 0.f;
    for (int32_t c = 0; c < R; ++c) s += load_elem(proj.data, proj.elem, off2(proj, e, c)) * lat[c];
    k[e] = s;
  }
  __syncthreads();
  const int32_t p = load_i32(pos, n * pos.stride[0]);
  for (int32_t i = threadIdx.x; i < dk; i += blockDim.x) {
    const int32_t h = i / d, e = i % d;
    const float* kh = k + h * d;
    const float y =
        rope_elem([&](int32_t j) { return kh[j]; }, e, p, r.inv_freq, r.rotary_dim, r.inter, r.att);
    store_elem((void*)out.data, out.elem, off3(out, n, h, e), y);
  }
}

/* One block per (sequence, query head); each warp keeps its own online softmax over a strided
 * share of the tokens, merged at the end. -1 entries are skipped; any other index outside
 * [0, length) is skipped too and, when bad != NULL, the first one seen is recorded as
 * {1, b, h, n, idx[b, h, n], length_b}. */
constexpr int kSaWarps = 4;
__global__ void sparse_attention_kernel(DView q, DView k, DView v, DView idx, bool has_idx,
                                        const int32_t* lengths, float scale, DView out,
                                        int32_t* bad) {
  extern __shared__ float sm[];
  const int32_t Hq = (int32_t)q.shape[1], d = (int32_t)q.shape[2];
  const int32_t Hkv = (int32_t)k.shape[2], G = Hq / Hkv;
  const int32_t b = blockIdx.x / Hq, hq = blockIdx.x % Hq, h = hq / G;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float* qs = sm;                      /* [d] */
  float* acc = qs + d;                 /* [warps][d] */
  float* ml = acc + kSaWarps * d;      /* [warps][2] */
  const int32_t len = lengths ? lengths[b] : (int32_t)k.shape[1];
  const int32_t hi = has_idx ? (int32_t)(idx.shape[1] == 1 ? 0 : h) : 0;
  const int64_t n_list = has_idx ? idx.shape[2] : len;
  for (int32_t e = threadIdx.x; e < d; e += blockDim.x)
    qs[e] = load_elem(q.data, q.elem, off3(q, b, hq, e)) * scale;
  for (int32_t e = lane; e < d; e += 32) acc[warp * d + e] = 0.f;
  __syncthreads();
  float m = -INFINITY, l = 0.f;
  for (int64_t i = warp; i < n_list; i += kSaWarps) {
    const int32_t j = has_idx ? load_i32(idx, off3(idx, b, hi, i)) : (int32_t)i;
    if (j < 0 || j >= len) {
      if (j != -1 && bad && lane == 0 && atomicCAS(bad, 0, 1) == 0) {
        bad[1] = b;
        bad[2] = hi;
        bad[3] = (int32_t)i;
        bad[4] = j;
        bad[5] = len;
      }
      continue;
    }
    float s = 0.f;
    for (int32_t e = lane; e < d; e += 32)
      s += qs[e] * load_elem(k.data, k.elem, off4(k, b, j, h, e));
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    const float m_new = fmaxf(m, s);
    const float alpha = expf(m - m_new), p = expf(s - m_new);
    l = l * alpha + p;
    m = m_new;
    for (int32_t e = lane; e < d; e += 32)
      acc[warp * d + e] =
          acc[warp * d + e] * alpha + p * load_elem(v.data, v.elem, off4(v, b, j, h, e));
  }
  if (lane == 0) {
    ml[warp * 2] = m;
    ml[warp * 2 + 1] = l;
  }
  __syncthreads();
  float M = -INFINITY;
  for (int w = 0; w < kSaWarps; ++w)
    if (ml[w * 2 + 1] > 0.f) M = fmaxf(M, ml[w * 2]);
  float L = 0.f;
  for (int w = 0; w < kSaWarps; ++w)
    if (ml[w * 2 + 1] > 0.f) L += ml[w * 2 + 1] * expf(ml[w * 2] - M);
  for (int32_t e = threadIdx.x; e < d; e += blockDim.x) {
    float o = 0.f;
    if (L > 0.f) {
      for (int w = 0; w < kSaWarps; ++w)
        if (ml[w * 2 + 1] > 0.f) o += acc[w * d + e] * expf(ml[w * 2] - M);
      o /= L;
    }
    store_elem((void*)out.data, out.elem, off3(out, b, hq, e), o);
  }
}

__global__ void quantize_kernel(DView x, int32_t bits, int32_t group, DView packed, DView scale,
                                DView zero) {
  const int64_t N = x.shape[0];
  const int32_t ng = (int32_t)(x.shape[1] / group);
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < N * ng;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t n = i / ng;
    const int32_t g = (int32_t)(i % ng), c0 = g * group;
    auto x_at = [&](int32_t e) { return load_elem(x.data, x.elem, off2(x, n, c0 + e)); };
    quantize_group(
        x_at, group, bits, (uint8_t*)packed.data + off2(packed, n, (int64_t)c0 * bits / 8),
        (uint16_t*)scale.data + off2(scale, n, g), (uint16_t*)zero.data + off2(zero, n, g));
  }
}

__global__ void dequantize_kernel(DView packed, DView scale, DView zero, int32_t bits,
                                  int32_t group, DView out) {
  const int64_t N = out.shape[0], D = out.shape[1];
  const uint32_t mask = (1u << bits) - 1u;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < N * D;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t n = i / D, c = i % D, bit = c * bits;
    const uint8_t byte = ((const uint8_t*)packed.data)[off2(packed, n, bit >> 3)];
    const uint32_t code = (byte >> (bit & 7)) & mask;
    const float sc = half_bits_to_f(((const uint16_t*)scale.data)[off2(scale, n, c / group)]);
    const float z = half_bits_to_f(((const uint16_t*)zero.data)[off2(zero, n, c / group)]);
    store_elem((void*)out.data, out.elem, off2(out, n, c), z + (float)code * sc);
  }
}

/* q_lat view -> compact float [B, H, R]. */
__global__ void to_float3_kernel(DView v, int32_t R, float* dst) {
  const int64_t B = v.shape[0], H = v.shape[1];
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < B * H * R;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t b = i / (H * R), h = i / R % H, c = i % R;
    dst[i] = load_elem(v.data, v.elem, off3(v, b, h, c));
  }
}

unsigned blocks_for(int64_t n, int threads) {
  int64_t b = cdiv(n, threads);
  if (b < 1) b = 1;
  return (unsigned)(b < 65535 ? b : 65535);
}

int num_sms_current() {
  int dev = 0, n = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
    return 132;
  return n;
}

}  // namespace
}  // namespace sals_cuda

using namespace sals_cuda;

extern "C" {

sals_status_t sals_cuda_project(const sals_view_t* x, const sals_view_t* proj,
                                const sals_view_t* out, void* stream) {
  const int64_t N = x->shape[0], K = x->shape[1], R = proj->shape[1];
  SALS_CUDA_TRY(sgemm(N, R, K, View2Load{dview(x)}, View2Load{dview(proj)}, View2Store{dview(out)},
                      (cudaStream_t)stream));
  return SALS_OK;
}

sals_status_t sals_cuda_rope_apply(const sals_view_t* x, const sals_view_t* pos,
                                   const float* inv_freq, int32_t rotary_dim,
                                   float attention_scaling, int32_t interleaved,
                                   const sals_view_t* out, void* stream) {
  if (rotary_dim / 2 > 256)
    return sals_set_error(SALS_ERR_UNSUPPORTED, "rope.rotary_dim: %d > 512 on cuda", rotary_dim);
  const int64_t N = x->shape[0];
  const int32_t H = (int32_t)x->shape[1], d = (int32_t)x->shape[2];
  const int64_t units = (int64_t)N * H * (rotary_dim / 2 + d - rotary_dim);
  if (units == 0) return SALS_OK;
  rope_kernel<<<blocks_for(units, 256), 256, 0, (cudaStream_t)stream>>>(
      dview(x), dview(pos), rope_args(inv_freq, rotary_dim, attention_scaling, interleaved),
      dview(out), N, H, d);
  SALS_CUDA_LAUNCHED("rope");
  return SALS_OK;
}

sals_status_t sals_cuda_score_select(const sals_view_t* q_lat, const sals_view_t* k_lat,
                                     const sals_view_t* lengths, int32_t score_rank, int32_t n_sink,
                                     int32_t n_recent, int32_t budget, const sals_view_t* idx,
                                     void* stream) {
  cudaStream_t st = (cudaStream_t)stream;
  const int32_t B = (int32_t)q_lat->shape[0], H = (int32_t)q_lat->shape[1];
  const int32_t S = (int32_t)k_lat->shape[1];
  if (B == 0 || H == 0) return SALS_OK;
  float* qf = nullptr;
  float* sc = nullptr;
  void* ws = nullptr; /* top-k workspace: zeroed before its first use */
  const size_t ws_bytes = topk_workspace_bytes(B * H, S > 0 ? S : 1);
  SALS_CUDA_TRY(cudaMallocAsync((void**)&qf, sizeof(float) * B * H * score_rank, st));
  if (cudaMallocAsync((void**)&sc, sizeof(float) * (size_t)B * H * (S > 0 ? S : 1), st) !=
      cudaSuccess) {
    cudaFreeAsync(qf, st);
    return sals_set_error(SALS_ERR_OUT_OF_MEMORY, "score_select: scratch for %d x %d scores", B * H,
                          S);
  }
  if (cudaMallocAsync(&ws, ws_bytes, st) != cudaSuccess) {
    cudaFreeAsync(qf, st);
    cudaFreeAsync(sc, st);
    return sals_set_error(SALS_ERR_OUT_OF_MEMORY, "score_select: top-k workspace of %zu bytes",
                          ws_bytes);
  }
  cudaError_t e = cudaMemsetAsync(ws, 0, ws_bytes, st);
  if (e == cudaSuccess) {
    to_float3_kernel<<<blocks_for((int64_t)B * H * score_rank, 256), 256, 0, st>>>(dview(q_lat),
                                                                                   score_rank, qf);
    e = cudaPeekAtLastError();
  }
  const int32_t* len = lengths ? (const int32_t*)lengths->data : nullptr;
  if (e == cudaSuccess)
    e = launch_scores(qf, H, score_rank, dview(k_lat), len, S, n_sink, n_recent, B, sc,
                      (int64_t)H * S, num_sms_current(), st);
  if (e == cudaSuccess) {
    RowSpec spec;
    spec.lengths = len;
    spec.fixed_len = S;
    spec.rows_per_seq = H;
    spec.n_sink = n_sink;
    spec.n_recent = n_recent;
    spec.budget_tokens = budget;
    spec.budget_frac = 0.f;
    spec.count = nullptr;
    spec.has_qpos = false;
    spec.pos = nullptr;
    spec.pos_stride = 0;
    e = launch_topk(sc, S, B * H, spec, (int32_t*)idx->data, idx->stride[0], idx->stride[1], budget,
                    ws, st);
  }
  cudaFreeAsync(qf, st);
  cudaFreeAsync(sc, st);
  cudaFreeAsync(ws, st);
  SALS_CUDA_TRY(e);
  return SALS_OK;
}

sals_status_t sals_cuda_rebuild_rope(const sals_view_t* k_lat, const sals_view_t* proj,
                                     const sals_view_t* pos, const float* inv_freq,
                                     int32_t rotary_dim, float attention_scaling,
                                     int32_t interleaved, const sals_view_t* out, void* stream) {
  if (rotary_dim / 2 > 256)
    return sals_set_error(SALS_ERR_UNSUPPORTED, "rope.rotary_dim: %d > 512 on cuda", rotary_dim);
  const int64_t N = k_lat->shape[0];
  const int32_t H = (int32_t)out->shape[1], d = (int32_t)out->shape[2];
  const int64_t R = k_lat->shape[1];
  if (N == 0) return SALS_OK;
  const size_t smem = sizeof(float) * (size_t)(R + (int64_t)H * d);
  SALS_CUDA_TRY(cudaFuncSetAttribute(rebuild_rope_kernel,
                                     cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  rebuild_rope_kernel<<<(unsigned)N, 256, smem, (cudaStream_t)stream>>>(
      dview(k_lat), dview(proj), dview(pos),
      rope_args(inv_freq, rotary_dim, attention_scaling, interleaved), dview(out), H, d);
  SALS_CUDA_LAUNCHED("rebuild_rope");
  return SALS_OK;
}

sals_status_t sals_cuda_sparse_attention(const sals_view_t* q, const sals_view_t* k,
                                         const sals_view_t* v, const sals_view_t* idx,
                                         const sals_view_t* lengths, float scale,
                                         const sals_view_t* out, void* stream) {
  const int32_t B = (int32_t)q->shape[0], Hq = (int32_t)q->shape[1], d = (int32_t)q->shape[2];
  if ((int64_t)B * Hq == 0) return SALS_OK;
  if (scale == 0.f) scale = 1.f / sqrtf((float)d);
  const size_t smem = sizeof(float) * ((size_t)d * (1 + kSaWarps) + 2 * kSaWarps);
  cudaStream_t st = (cudaStream_t)stream;
  SALS_CUDA_TRY(cudaFuncSetAttribute(sparse_attention_kernel,
                                     cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  /* Out-of-range indices are reported as the CPU path does, which needs the result on the
   * host: done in eager calls; a graph being captured skips them silently (no host wait). */
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  SALS_CUDA_TRY(cudaStreamIsCapturing(st, &capture));
  int32_t seen[6] = {0, 0, 0, 0, 0, 0};
  int32_t* bad = nullptr;
  if (idx && capture == cudaStreamCaptureStatusNone)
    SALS_CUDA_TRY(cudaMallocAsync((void**)&bad, sizeof(seen), st));
  cudaError_t e = bad ? cudaMemsetAsync(bad, 0, sizeof(seen), st) : cudaSuccess;
  if (e == cudaSuccess) {
    sparse_attention_kernel<<<(unsigned)(B * Hq), kSaWarps * 32, smem, st>>>(
        dview(q), dview(k), dview(v), dview(idx), idx != nullptr,
        lengths ? (const int32_t*)lengths->data : nullptr, scale, dview(out), bad);
    e = cudaPeekAtLastError();
  }
  if (bad) {
    if (e == cudaSuccess) e = cudaMemcpyAsync(seen, bad, sizeof(seen), cudaMemcpyDeviceToHost, st);
    cudaFreeAsync(bad, st);
    if (e == cudaSuccess) e = cudaStreamSynchronize(st);
  }
  SALS_CUDA_TRY(e);
  if (seen[0]) /* the CPU path's message */
    return sals_set_error(SALS_ERR_INVALID_ARGUMENT,
                          "idx[%d, %d, %d]: %d not a token of 0..%d (or -1)", seen[1], seen[2],
                          seen[3], seen[4], seen[5] - 1);
  return SALS_OK;
}

sals_status_t sals_cuda_quantize_values(const sals_view_t* v, int32_t bits, int32_t group,
                                        const sals_view_t* packed, const sals_view_t* scale,
                                        const sals_view_t* zero, void* stream) {
  const int64_t n = v->shape[0] * (v->shape[1] / group);
  if (n == 0) return SALS_OK;
  quantize_kernel<<<blocks_for(n, 128), 128, 0, (cudaStream_t)stream>>>(
      dview(v), bits, group, dview(packed), dview(scale), dview(zero));
  SALS_CUDA_LAUNCHED("quantize");
  return SALS_OK;
}

sals_status_t sals_cuda_dequantize_values(const sals_view_t* packed, const sals_view_t* scale,
                                          const sals_view_t* zero, int32_t bits, int32_t group,
                                          const sals_view_t* out, void* stream) {
  const int64_t n = out->shape[0] * out->shape[1];
  if (n == 0) return SALS_OK;
  dequantize_kernel<<<blocks_for(n, 256), 256, 0, (cudaStream_t)stream>>>(
      dview(packed), dview(scale), dview(zero), bits, group, dview(out));
  SALS_CUDA_LAUNCHED("dequantize");
  return SALS_OK;
}

}  // extern "C"
