// Split-KV decode kernel (see decode.hpp). Each group of D/8 lanes owns one key at a time and
// reads its K and V rows as 16-byte vectors; 4 keys per group are in flight per step. Per query
// row a group keeps (max, sum, output) of its keys; groups merge inside the warp by shuffles,
// warps inside the block through shared memory, splits in a second small kernel.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "common/check.hpp"
#include "kernels/attention_state.hpp"
#include "kernels/cuda/launch.cuh"
#include "kernels/cuda/decode.hpp"
#include "kernels/cuda/flash_params.hpp"

namespace longattn::kernels::cuda {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kWarps = 8;
constexpr int kUnroll = 4;  // keys per lane group per step: 8 x 16-byte loads in flight per lane

struct DecodeParams {
  const void *q, *k, *v;
  const std::int32_t *pos_q, *pos_k;
  int tq, tk, hq, hkv, group, rows;  // rows = tq * group
  int splits, keys_per_split;
  bool causal;
  float scale_log2;
  float* part_o;    // [hkv][splits][rows][D]
  float* part_lse;  // [hkv][splits][rows], natural log
};

template <class T>
__device__ __forceinline__ void unpack8(const uint4& u, float* f) {
  const T* h = reinterpret_cast<const T*>(&u);
#pragma unroll
  for (int i = 0; i < 8; ++i) f[i] = static_cast<float>(h[i]);
}

template <class T, int D, int R>
__global__ void __launch_bounds__(kWarps * 32, R <= 4 ? 2 : 1) decode_split_kernel(const DecodeParams p) {
  constexpr int LG = D / 8;          // lanes per key
  constexpr int KPW = 32 / LG;       // keys per warp per unrolled slot
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int sub = lane % LG, grp = lane / LG;
  const int split = blockIdx.x, hk = blockIdx.y;

  // Query rows of this kv head: row r = token (r / group), head hk * group + r % group.
  float q[R][8];
  int qpos[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if (r < p.rows) {
      const int tok = r / p.group, h = hk * p.group + r % p.group;
      const uint4 u = *reinterpret_cast<const uint4*>(static_cast<const T*>(p.q) + (static_cast<std::int64_t>(tok) * p.hq + h) * D + sub * 8);
      unpack8<T>(u, q[r]);
#pragma unroll
      for (int i = 0; i < 8; ++i) q[r][i] *= p.scale_log2;
      qpos[r] = p.pos_q ? p.pos_q[tok] : tok;
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) q[r][i] = 0.0f;
      qpos[r] = -0x7fffffff;
    }
  }
  float m[R], l[R], acc[R][8];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[r][i] = 0.0f;
  }

  const int k_begin = split * p.keys_per_split;
  const int k_end = min(p.tk, k_begin + p.keys_per_split);
  const std::int64_t kv_stride = static_cast<std::int64_t>(p.hkv) * D;
  const T* kbase = static_cast<const T*>(p.k) + static_cast<std::int64_t>(hk) * D + sub * 8;
  const T* vbase = static_cast<const T*>(p.v) + static_cast<std::int64_t>(hk) * D + sub * 8;

  for (int k0 = k_begin + warp * KPW * kUnroll; k0 < k_end; k0 += kWarps * KPW * kUnroll) {
    uint4 kr[kUnroll], vr[kUnroll];
    int key[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      key[u] = k0 + u * KPW + grp;
      const bool in = key[u] < k_end;
      kr[u] = in ? __ldg(reinterpret_cast<const uint4*>(kbase + key[u] * kv_stride)) : make_uint4(0, 0, 0, 0);
      vr[u] = in ? __ldg(reinterpret_cast<const uint4*>(vbase + key[u] * kv_stride)) : make_uint4(0, 0, 0, 0);
    }
    float s[kUnroll][R];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float kf[8];
      unpack8<T>(kr[u], kf);
      const bool in = key[u] < k_end;
      const int kp = in ? (p.pos_k ? p.pos_k[key[u]] : key[u]) : 0;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float d = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; ++i) d = fmaf(q[r][i], kf[i], d);
#pragma unroll
        for (int o = LG / 2; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
        s[u][r] = (in && !(p.causal && kp > qpos[r])) ? d : -INFINITY;
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float mx = m[r];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) mx = fmaxf(mx, s[u][r]);
      const float mu = mx == -INFINITY ? 0.0f : mx;
      const float alpha = exp2f(m[r] - mu);
      m[r] = mx;
      l[r] *= alpha;
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[r][i] *= alpha;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const float pr = exp2f(s[u][r] - mu);
        l[r] += pr;
        float vf[8];
        unpack8<T>(vr[u], vf);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[r][i] = fmaf(pr, vf[i], acc[r][i]);
      }
    }
  }

  // Merge the lane groups of the warp (same `sub`, different `grp`).
#pragma unroll
  for (int o = LG; o < 32; o <<= 1) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const float mo = __shfl_xor_sync(0xffffffffu, m[r], o);
      const float lo = __shfl_xor_sync(0xffffffffu, l[r], o);
      const float mx = fmaxf(m[r], mo);
      const float mu = mx == -INFINITY ? 0.0f : mx;
      const float a = exp2f(m[r] - mu), b = exp2f(mo - mu);
      l[r] = l[r] * a + lo * b;
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[r][i] = acc[r][i] * a + __shfl_xor_sync(0xffffffffu, acc[r][i], o) * b;
      m[r] = mx;
    }
  }

  // Merge the warps through shared memory: [warp][row][D] outputs, [warp][row] max and sum.
  extern __shared__ float smem[];
  float* s_acc = smem;
  float* s_m = s_acc + kWarps * R * D;
  float* s_l = s_m + kWarps * R;
  if (grp == 0) {
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int i = 0; i < 8; ++i) s_acc[(warp * R + r) * D + sub * 8 + i] = acc[r][i];
  }
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      s_m[warp * R + r] = m[r];
      s_l[warp * R + r] = l[r];
    }
  }
  __syncthreads();
  for (int e = tid; e < p.rows * D; e += kWarps * 32) {
    const int r = e / D, x = e % D;
    float mx = -INFINITY;
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, s_m[w * R + r]);
    const float mu = mx == -INFINITY ? 0.0f : mx;
    float lsum = 0.0f, o = 0.0f;
    for (int w = 0; w < kWarps; ++w) {
      const float a = exp2f(s_m[w * R + r] - mu);
      lsum += s_l[w * R + r] * a;
      o += s_acc[(w * R + r) * D + x] * a;
    }
    const std::int64_t prow = (static_cast<std::int64_t>(hk) * p.splits + split) * p.rows + r;
    p.part_o[prow * D + x] = lsum > 0.0f ? o / lsum : 0.0f;
    if (x == 0) p.part_lse[prow] = lsum > 0.0f ? (mx + log2f(lsum)) * kLn2 : -INFINITY;
  }
}

// One block per (kv head, row); D threads merge the splits of that row.
template <class OutT>
__global__ void decode_merge_kernel(const DecodeParams p, OutT* o, float* lse, int d) {
  const int hk = blockIdx.x, r = blockIdx.y, x = threadIdx.x;
  const std::int64_t base = static_cast<std::int64_t>(hk) * p.splits * p.rows + r;
  SoftmaxState<> merged;
  for (int s = 0; s < p.splits; ++s) merged.max = fmaxf(merged.max, p.part_lse[base + static_cast<std::int64_t>(s) * p.rows]);
  float acc = 0.0f;
  for (int s = 0; s < p.splits; ++s) {
    const std::int64_t pr = base + static_cast<std::int64_t>(s) * p.rows;
    acc += weighted(merged.add(SoftmaxState<>::of_result(p.part_lse[pr])), p.part_o[pr * d + x]);
  }
  const int tok = r / p.group, h = hk * p.group + r % p.group;
  o[(static_cast<std::int64_t>(tok) * p.hq + h) * d + x] = static_cast<OutT>(acc * merged.normalizer());
  if (x == 0) lse[static_cast<std::int64_t>(h) * p.tq + tok] = merged.lse();
}

template <class T, int D, int R>
void launch_split(const DecodeParams& p, cudaStream_t stream) {
  const int smem = (kWarps * R * D + 2 * kWarps * R) * static_cast<int>(sizeof(float));
  auto kernel = decode_split_kernel<T, D, R>;
  launch_with_smem(kernel, dim3(p.splits, p.hkv), kWarps * 32, smem, stream, p);
}

template <class T, int D>
void dispatch_rows(const DecodeParams& p, cudaStream_t stream) {
  if (p.rows <= 4) launch_split<T, D, 4>(p, stream);
  else launch_split<T, D, 8>(p, stream);
}

}  // namespace

std::string decode_unsupported_reason(const AttentionArgs& a) {
  if (a.q.ndim != 3 || a.k.ndim != 3) return "decode: q, k, v must be [tokens, heads, head_dim]";
  if (a.q.dtype != DType::bf16 && a.q.dtype != DType::f16) return "decode: only bf16 and fp16 are built";
  const auto d = a.q.dim(2);
  if (d != 64 && d != 128) return "decode: only head_dim 64 and 128 are built";
  if (a.batch != 1) return "decode: one sequence per call (batch 1)";
  if (a.q.dim(1) % a.k.dim(1) != 0) return "decode: q heads must be a multiple of kv heads";
  const auto rows = a.q.dim(0) * (a.q.dim(1) / a.k.dim(1));
  if (rows > kDecodeMaxRows) return "decode: more than 8 query rows per kv head (use the fused forward)";
  if (a.k.dim(0) >= (std::int64_t{1} << 31)) return "decode: more than 2^31 keys";
  return {};
}

void cuda_decode_attention(const AttentionArgs& a, const ForwardOutputs& out) {
  const std::string why = decode_unsupported_reason(a);
  if (!why.empty()) throw_unsupported(why.c_str());
  auto stream = static_cast<cudaStream_t>(a.stream);
  const int tq = static_cast<int>(a.q.dim(0)), tk = static_cast<int>(a.k.dim(0));
  const int hq = static_cast<int>(a.q.dim(1)), hkv = static_cast<int>(a.k.dim(1)), d = static_cast<int>(a.q.dim(2));
  if (tq == 0) return;
  if (tk == 0) {
    launch_fill(out.o.data, out.o.dtype, out.o.numel(), 0.0f, stream);
    launch_fill(out.lse.data, DType::f32, out.lse.numel(), -INFINITY, stream);
    return;
  }
  int dev = 0, sms = 0;
  LONGATTN_CUDA_CHECK(cudaGetDevice(&dev));
  LONGATTN_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));

  DecodeParams p{};
  p.q = a.q.data;
  p.k = a.k.data;
  p.v = a.v.data;
  p.pos_q = a.q_positions;
  p.pos_k = a.k_positions;
  p.tq = tq;
  p.tk = tk;
  p.hq = hq;
  p.hkv = hkv;
  p.group = hq / hkv;
  p.rows = tq * p.group;
  p.causal = a.causal;
  p.scale_log2 = a.effective_scale() * kLog2e;
  // About 4 blocks per SM over all kv heads, but at least 512 keys per split so that the merge
  // stays small next to the KV read.
  const int want = (4 * sms + hkv - 1) / hkv;
  const int max_splits = (tk + 511) / 512;
  p.splits = want < max_splits ? want : max_splits;
  if (p.splits < 1) p.splits = 1;
  p.keys_per_split = (tk + p.splits - 1) / p.splits;
  p.splits = (tk + p.keys_per_split - 1) / p.keys_per_split;

  const std::size_t part_rows = static_cast<std::size_t>(hkv) * p.splits * p.rows;
  void* ws = nullptr;
  LONGATTN_CUDA_CHECK(cudaMallocAsync(&ws, part_rows * (d + 1) * sizeof(float), stream));
  p.part_o = static_cast<float*>(ws);
  p.part_lse = p.part_o + part_rows * d;

  if (a.q.dtype == DType::bf16) {
    if (d == 64) dispatch_rows<__nv_bfloat16, 64>(p, stream);
    else dispatch_rows<__nv_bfloat16, 128>(p, stream);
  } else {
    if (d == 64) dispatch_rows<__half, 64>(p, stream);
    else dispatch_rows<__half, 128>(p, stream);
  }
  const dim3 grid(hkv, p.rows);
  if (out.o.dtype == DType::f32) decode_merge_kernel<float><<<grid, d, 0, stream>>>(p, out.o.as<float>(), out.lse.as<float>(), d);
  else if (out.o.dtype == DType::bf16) decode_merge_kernel<__nv_bfloat16><<<grid, d, 0, stream>>>(p, out.o.as<__nv_bfloat16>(), out.lse.as<float>(), d);
  else decode_merge_kernel<__half><<<grid, d, 0, stream>>>(p, out.o.as<__half>(), out.lse.as<float>(), d);
  LONGATTN_CUDA_CHECK_LAUNCH();
  LONGATTN_CUDA_CHECK(cudaFreeAsync(ws, stream));
}

}  // namespace longattn::kernels::cuda
