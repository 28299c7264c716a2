// offload_decode --device cuda: the synthetic model's decode loop with its weights, hidden states and
// projections on the GPU. Two ways to attend, same model and same KV values:
//   offloaded (default): the new token's k, v and the queries are copied to the host and sent to
//     the servers, which hold the KV; o comes back and is copied to the GPU. No KV in GPU memory.
//     With --micro-batches N the shared loop (pipeline_loop.hpp) keeps N in flight, each with its
//     own stream, so the GPU computes one while the servers attend another.
//   --local-attention (all on the GPU): KV caches in GPU memory, attention by the "cuda" backend's
//     forward (one query token per sequence over its KV: the split-KV decode kernel).
// All on the GPU, every step ends with a synchronization, as a real decode loop's sampling would
// (offloaded, the host waits for each micro-batch's work anyway: it sends its q, k, v). Reported:
// tokens per second, attention time per step, GPU memory in use, and the KV bytes the servers hold.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "capacity.hpp"
#include "decode_common.hpp"
#include "gpu_kernels.hpp"
#include "gpu_micro_batches.hpp"
#include "gpu_resources.hpp"
#include "pipeline_loop.hpp"
#include "pipeline_output.hpp"
#include "longattn/dtype_convert.hpp"
#include "longattn/error.hpp"

namespace offload_decode {
namespace {

using namespace longattn;
using Clock = std::chrono::steady_clock;


// The random stream of one tensor: what (1 = k, 2 = v, 3..6 = weights, 7 = x), layer, sequence.
std::uint64_t key_of(std::uint64_t seed, int what, int layer, int seq) {
  std::uint64_t k = seed;
  for (std::uint64_t part : {static_cast<std::uint64_t>(what), static_cast<std::uint64_t>(layer), static_cast<std::uint64_t>(seq)})
    k = (k ^ part) * 0x100000001b3ULL + 0x9e37ULL;
  return k;
}

void append_f32(const std::byte* raw, DType t, std::size_t n, std::vector<float>& dst) {
  for (std::size_t i = 0; i < n; ++i) dst.push_back(load_as_f32(raw, t, i));
}

}  // namespace

// --find-max-batch: the largest batch of this shape that fits all on the GPU, and what the
// offloaded mode needs on the GPU at the asked batch.
int report_largest_batch(const Config& c, std::size_t free_bytes) {
  Config local = c, offloaded = c;
  local.local_attention = true;
  offloaded.local_attention = false;
  const std::int64_t most = largest_gpu_batch(local, free_bytes);
  const double gib = double(1 << 30), offloaded_gib = gpu_decode_bytes(offloaded, c.batch).total() / gib;
  std::printf("offload_decode (cuda): %.2f GiB free; all on the GPU, the largest batch of %lld + %d tokens that fits is %lld; "
              "offloaded, batch %d needs %.2f GiB on the GPU\n",
              free_bytes / gib, static_cast<long long>(c.context), c.steps, static_cast<long long>(most), c.batch, offloaded_gib);
  std::printf("RESULT {\"program\":\"offload_decode\",\"device\":\"cuda\",\"find_max_batch\":true,\"free_gib\":%.3f,\"layers\":%d,"
              "\"context\":%lld,\"steps\":%d,\"largest_gpu_batch\":%lld,\"batch\":%d,\"offloaded_gpu_gib\":%.3f,\"batch_fits_on_gpu\":%s}\n",
              free_bytes / gib, c.layers, static_cast<long long>(c.context), c.steps, static_cast<long long>(most), c.batch, offloaded_gib,
              c.batch <= most ? "true" : "false");
  return 0;
}

int run_gpu(const Config& c) {
  const bool local = c.local_attention;
  if (c.dtype == DType::f32)
    throw Error(ErrorCode::invalid_argument, "--device cuda keeps the KV in bf16 or fp16 (the GPU decode kernel's types): use --dtype bf16 or fp16");
  int ndev = 0;
  if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) {
    cudaGetLastError();
    throw Error(ErrorCode::unsupported, "--device cuda: no CUDA GPU is visible on this machine; use --device cpu");
  }
  int dev_index = 0;
  cuda_ok(cudaGetDevice(&dev_index), "cudaGetDevice");
  const Device dev{DeviceKind::cuda, dev_index};
  // Checked before anything is allocated: a batch that cannot fit is refused with the batch that can.
  std::size_t free_bytes = 0, total_bytes = 0;
  cuda_ok(cudaMemGetInfo(&free_bytes, &total_bytes), "cudaMemGetInfo");
  if (c.find_max_batch) return report_largest_batch(c, free_bytes);
  require_gpu_fits(c, free_bytes);
  Stream st;

  const int L = c.layers, B = c.batch, H = c.heads, K = c.kv_heads, D = c.head_dim, steps = c.steps, hidden = c.hidden();
  const std::int64_t ctx = c.context, cap = c.context + c.steps;
  const std::size_t row = c.kv_row(), es = dtype_size(c.dtype);
  const gpu::Elem et = elem_of(c.dtype);
  const float unit = std::sqrt(3.0f);  // uniform [-1, 1) times this has variance 1

  std::unique_ptr<AttentionBackend> be;
  std::unique_ptr<offload::Client> client;
  if (local) {
    be = make_backend("cuda", DeviceKind::cuda);
    AttentionArgs probe;
    probe.q = TensorView(nullptr, c.dtype, {1, H, D}, dev);
    probe.k = TensorView(nullptr, c.dtype, {cap, K, D}, dev);
    probe.v = probe.k;
    const std::string why = be->unsupported_reason(probe);
    if (!why.empty()) throw Error(ErrorCode::unsupported, "--local-attention: the cuda backend cannot run this shape: " + why);
  } else {
    client = std::make_unique<offload::Client>(c.client);
  }
  std::unique_ptr<AttentionBackend> cpu;
  if (c.check) cpu = make_backend("cpu", DeviceKind::cpu);

  // The model: bf16 weights, f32 activations.
  std::vector<std::unique_ptr<DeviceMem>> wq, wk, wv, wo;
  const float ws = unit / std::sqrt(static_cast<float>(hidden));
  for (int l = 0; l < L; ++l) {
    auto make = [&](int what, std::int64_t in, std::int64_t out) {
      auto m = std::make_unique<DeviceMem>(static_cast<std::size_t>(in * out) * 2);
      gpu::fill_random(m->p, gpu::kBf16, in, out, out, key_of(c.seed, what, l, 0), ws, st.s);
      return m;
    };
    wq.push_back(make(3, hidden, static_cast<std::int64_t>(H) * D));
    wk.push_back(make(4, hidden, static_cast<std::int64_t>(row)));
    wv.push_back(make(5, hidden, static_cast<std::int64_t>(row)));
    wo.push_back(make(6, static_cast<std::int64_t>(H) * D, hidden));
  }
  const std::size_t weight_bytes = static_cast<std::size_t>(L) * 2 * (2 * static_cast<std::size_t>(hidden) * H * D + 2 * hidden * row);
  const std::size_t qn = static_cast<std::size_t>(B) * H * D;
  DeviceMem x(static_cast<std::size_t>(B) * hidden * 4), y(static_cast<std::size_t>(B) * hidden * 4), q(qn * 4), k(B * row * 4),
      v(B * row * 4), o(qn * 4), lse(static_cast<std::size_t>(B) * H * 4), q_lp(qn * es);
  gpu::fill_random(x.p, gpu::kF32, B, hidden, hidden, key_of(c.seed, 7, 0, 0), unit, st.s);

  // KV: in GPU memory [B][cap][K][D] per layer (local), or on the servers.
  std::vector<std::unique_ptr<DeviceMem>> kc, vc;
  std::unique_ptr<DeviceMem> kv_lp;
  std::unique_ptr<PinnedMem> h_q, h_kv, h_o, h_lse;
  if (local) {
    for (int l = 0; l < L; ++l) {
      kc.push_back(std::make_unique<DeviceMem>(static_cast<std::size_t>(B * cap) * row * es));
      vc.push_back(std::make_unique<DeviceMem>(static_cast<std::size_t>(B * cap) * row * es));
    }
  } else {
    kv_lp = std::make_unique<DeviceMem>(2 * B * row * es);
    h_q = std::make_unique<PinnedMem>(qn * 4);
    h_kv = std::make_unique<PinnedMem>(2 * B * row * es);
    h_o = std::make_unique<PinnedMem>(qn * 4);
    h_lse = std::make_unique<PinnedMem>(static_cast<std::size_t>(B) * H * 4);
  }
  const std::size_t kv_gpu_bytes = local ? static_cast<std::size_t>(L) * 2 * B * cap * row * es : 0;

  // --check: f32 copies of every sequence's KV on the host.
  std::vector<std::vector<std::vector<float>>> kh(c.check ? L : 0, std::vector<std::vector<float>>(B)), vh = kh;

  // Prefill: random KV made on the GPU (where a real prefill makes it); offloaded, it is copied out
  // sequence by sequence and sent to the servers in bulk.
  const auto t_prefill = Clock::now();
  {
    const std::size_t seq_bytes = static_cast<std::size_t>(ctx) * row * es;
    std::unique_ptr<DeviceMem> stage;
    std::unique_ptr<PinnedMem> h_stage;
    if (!local) {
      stage = std::make_unique<DeviceMem>(2 * seq_bytes);
      h_stage = std::make_unique<PinnedMem>(2 * seq_bytes);
      for (int b = 0; b < B; ++b) client->open({static_cast<std::uint64_t>(b), L, K, D, c.dtype}).get();
    }
    std::vector<std::byte> check_raw(c.check ? 2 * seq_bytes : 0);
    for (int l = 0; l < L; ++l) {
      std::vector<std::future<void>> pending;
      for (int b = 0; b < B && ctx > 0; ++b) {
        std::byte* kd = local ? kc[l]->as() + static_cast<std::size_t>(b * cap) * row * es : stage->as();
        std::byte* vd = local ? vc[l]->as() + static_cast<std::size_t>(b * cap) * row * es : stage->as() + seq_bytes;
        gpu::fill_random(kd, et, ctx, static_cast<std::int64_t>(row), static_cast<std::int64_t>(row), key_of(c.seed, 1, l, b), unit, st.s);
        gpu::fill_random(vd, et, ctx, static_cast<std::int64_t>(row), static_cast<std::int64_t>(row), key_of(c.seed, 2, l, b), unit, st.s);
        const std::byte *hk = nullptr, *hv = nullptr;
        if (!local) {
          cuda_ok(cudaMemcpyAsync(h_stage->p, stage->p, 2 * seq_bytes, cudaMemcpyDeviceToHost, st.s), "cudaMemcpyAsync");
          st.sync();
          hk = h_stage->as();
          hv = h_stage->as() + seq_bytes;
          // The client copies its inputs before append returns, so the staging buffer is free again.
          pending.push_back(client->append(static_cast<std::uint64_t>(b), l, hk, hv, ctx));
        } else if (c.check) {
          cuda_ok(cudaMemcpyAsync(check_raw.data(), kd, seq_bytes, cudaMemcpyDeviceToHost, st.s), "cudaMemcpyAsync");
          cuda_ok(cudaMemcpyAsync(check_raw.data() + seq_bytes, vd, seq_bytes, cudaMemcpyDeviceToHost, st.s), "cudaMemcpyAsync");
          st.sync();
          hk = check_raw.data();
          hv = check_raw.data() + seq_bytes;
        }
        if (c.check) {
          append_f32(hk, c.dtype, static_cast<std::size_t>(ctx) * row, kh[l][b]);
          append_f32(hv, c.dtype, static_cast<std::size_t>(ctx) * row, vh[l][b]);
        }
      }
      for (auto& p : pending) p.get();
    }
    st.sync();
  }
  const double prefill_s = std::chrono::duration<double>(Clock::now() - t_prefill).count();

  const offload::ClientStats s0 = client ? client->stats() : offload::ClientStats{};
  double attn_s = 0, max_err = 0, decode_s = 0;
  std::string pipeline_text, pipeline_lines_json;  // offloaded: the pipeline's table lines and RESULT keys
  if (local) {
    std::vector<Event> ev_begin(static_cast<std::size_t>(L)), ev_end(static_cast<std::size_t>(L));
    std::vector<float> qf(qn), of(qn), lf(static_cast<std::size_t>(B) * H);
    std::vector<std::byte> raw(std::max(qn, 2 * B * row) * es);
    const auto t_decode = Clock::now();
    for (int step = 0; step < steps; ++step) {
      for (int l = 0; l < L; ++l) {
        gpu::matmul(x.as<float>(), wq[l]->p, q.as<float>(), B, hidden, H * D, st.s);
        gpu::matmul(x.as<float>(), wk[l]->p, k.as<float>(), B, hidden, static_cast<int>(row), st.s);
        gpu::matmul(x.as<float>(), wv[l]->p, v.as<float>(), B, hidden, static_cast<int>(row), st.s);
        const std::int64_t pos = ctx + step, len = pos + 1;
        // The new token's k, v into the caches (rounded to the KV dtype), q to the kernel's dtype.
        gpu::store_rows(kc[l]->as() + static_cast<std::size_t>(pos) * row * es, et, cap * static_cast<std::int64_t>(row), k.as<float>(), B,
                        static_cast<int>(row), st.s);
        gpu::store_rows(vc[l]->as() + static_cast<std::size_t>(pos) * row * es, et, cap * static_cast<std::int64_t>(row), v.as<float>(), B,
                        static_cast<int>(row), st.s);
        gpu::store_rows(q_lp.p, et, static_cast<std::int64_t>(H) * D, q.as<float>(), B, H * D, st.s);
        cuda_ok(cudaEventRecord(ev_begin[l].e, st.s), "cudaEventRecord");
        for (int b = 0; b < B; ++b) {
          AttentionArgs a;
          a.q = TensorView(q_lp.as() + static_cast<std::size_t>(b) * H * D * es, c.dtype, {1, H, D}, dev);
          a.k = TensorView(kc[l]->as() + static_cast<std::size_t>(b * cap) * row * es, c.dtype, {len, K, D}, dev);
          a.v = TensorView(vc[l]->as() + static_cast<std::size_t>(b * cap) * row * es, c.dtype, {len, K, D}, dev);
          a.max_seqlen_q = 1;
          a.max_seqlen_k = static_cast<int>(len);
          a.stream = st.s;
          be->forward(a, {TensorView(o.as<float>() + static_cast<std::size_t>(b) * H * D, DType::f32, {1, H, D}, dev),
                          TensorView(lse.as<float>() + static_cast<std::size_t>(b) * H, DType::f32, {H, 1}, dev)});
        }
        cuda_ok(cudaEventRecord(ev_end[l].e, st.s), "cudaEventRecord");
        if (c.check) {
          // The same layer over the host's f32 copies, with the q the attention saw.
          st.sync();
          cuda_ok(cudaMemcpy(raw.data(), q_lp.p, qn * es, cudaMemcpyDeviceToHost), "cudaMemcpy");
          for (std::size_t i = 0; i < qn; ++i) qf[i] = load_as_f32(raw.data(), c.dtype, i);
          cuda_ok(cudaMemcpy(of.data(), o.p, qn * 4, cudaMemcpyDeviceToHost), "cudaMemcpy");
          cuda_ok(cudaMemcpy(lf.data(), lse.p, lf.size() * 4, cudaMemcpyDeviceToHost), "cudaMemcpy");
          for (int b = 0; b < B; ++b) {
            const std::size_t at = (static_cast<std::size_t>(b * cap) + static_cast<std::size_t>(pos)) * row * es;
            cuda_ok(cudaMemcpy(raw.data(), kc[l]->as() + at, row * es, cudaMemcpyDeviceToHost), "cudaMemcpy");
            cuda_ok(cudaMemcpy(raw.data() + row * es, vc[l]->as() + at, row * es, cudaMemcpyDeviceToHost), "cudaMemcpy");
            append_f32(raw.data(), c.dtype, row, kh[l][b]);
            append_f32(raw.data() + row * es, c.dtype, row, vh[l][b]);
          }
          max_err = std::max(max_err, check_against_local(*cpu, c, kh[l], vh[l], qf.data(), of.data(), lf.data(), true));
        }
        gpu::matmul(o.as<float>(), wo[l]->p, y.as<float>(), B, H * D, hidden, st.s);
        gpu::residual_rmsnorm(x.as<float>(), y.as<float>(), B, hidden, st.s);
      }
      // The step's tokens are final here (a real loop samples them now).
      st.sync();
      for (int l = 0; l < L; ++l) {
        float ms = 0;
        cuda_ok(cudaEventElapsedTime(&ms, ev_begin[l].e, ev_end[l].e), "cudaEventElapsedTime");
        attn_s += ms * 1e-3;
      }
    }
    decode_s = std::chrono::duration<double>(Clock::now() - t_decode).count();
  } else {
    GpuModel::Buffers bufs{wq, wk, wv, wo, x.as<float>(), y.as<float>(), q.as<float>(), k.as<float>(), v.as<float>(), o.as<float>(),
                           kv_lp->as(), h_q->as<float>(), h_kv->as(), h_o->as<float>(), h_lse->as<float>()};
    // --check: each micro-batch's layer against the cpu backend over the host's f32 copies, with the
    // q, k, v the servers got and the o, lse they answered (still in the pinned buffers then).
    auto check_part = [&](const MicroBatchRange& r, int l, const float* hq, const std::byte* hkv, const float* ho, const float* hl) {
      Config part = c;
      part.batch = r.count;
      std::vector<std::vector<float>> kpart, vpart;
      for (int i = 0; i < r.count; ++i) {
        append_f32(hkv + static_cast<std::size_t>(i) * row * es, c.dtype, row, kh[l][r.first + i]);
        append_f32(hkv + static_cast<std::size_t>(r.count + i) * row * es, c.dtype, row, vh[l][r.first + i]);
        kpart.push_back(kh[l][r.first + i]);
        vpart.push_back(vh[l][r.first + i]);
      }
      max_err = std::max(max_err, check_against_local(*cpu, part, kpart, vpart, hq, ho, hl, false));
    };
    GpuModel model(c, *client, bufs, c.check ? GpuModel::CheckFn(check_part) : nullptr);
    ServerKernelMeter kernels(*client, c.client.servers.size());
    const auto times = run_pipeline(model, c.micro_batches, steps, L);
    cuda_ok(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    decode_s = times.decode_s;
    attn_s = times.wait_s;
    kernels.finish();
    const auto pipe = pipeline_report(times.trips, model.gpu_busy_seconds(), times.wait_s, decode_s, steps, L, c.micro_batches, B);
    pipeline_text = pipeline_lines(pipe, c.micro_batches, kernels, steps, "GPU");
    pipeline_lines_json = pipeline_json(pipe, c.micro_batches, kernels, steps);
  }
  const std::size_t gpu_used = gpu_memory_used_bytes();

  // A fingerprint of the final hidden states: equal models give (nearly) equal numbers in both modes.
  std::vector<float> xf(static_cast<std::size_t>(B) * hidden);
  cuda_ok(cudaMemcpy(xf.data(), x.p, xf.size() * 4, cudaMemcpyDeviceToHost), "cudaMemcpy");
  double fingerprint = 0;
  for (std::size_t i = 0; i < xf.size(); ++i) fingerprint += xf[i] * static_cast<double>(static_cast<int>(i % 13) - 6);
  fingerprint /= static_cast<double>(xf.size());

  double server_kv = 0;
  offload::ClientStats s1;
  if (client) {
    s1 = client->stats();
    server_kv = servers_kv_bytes(*client, c.client.servers.size());
    for (int b = 0; b < B; ++b) client->drop(static_cast<std::uint64_t>(b)).get();
  }

  const double tokens_per_s = static_cast<double>(B) * steps / decode_s;
  const char* mode = local ? "local" : "offloaded";
  const double gib = 1 << 30;
  std::printf("offload_decode (cuda, attention %s): %s%d layers, batch %d, context %lld + %d steps, %d/%d heads x %d, %s KV\n", mode,
              local ? "" : fmt::format("{} server(s), ", c.client.servers.size()).c_str(), L, B, static_cast<long long>(ctx), steps, H, K,
              D, to_string(c.dtype));
  std::printf("  prefill %.3f s; decode %.3f s: %.1f tokens/s; attention%s %.3f ms per step (all layers)\n", prefill_s, decode_s, tokens_per_s,
              local ? "" : " wait", attn_s * 1e3 / steps);
  std::printf("  GPU memory in use %.3f GiB (weights %.3f GiB, KV on the GPU %.3f GiB); KV held by the servers %.3f GiB%s\n",
              static_cast<double>(gpu_used) / gib, static_cast<double>(weight_bytes) / gib, static_cast<double>(kv_gpu_bytes) / gib,
              server_kv / gib, c.check ? fmt::format("; max |error| vs local attention {:.3g}", max_err).c_str() : "");
  std::fputs(pipeline_text.c_str(), stdout);
  std::printf("RESULT {\"program\":\"offload_decode\",\"device\":\"cuda\",\"attention\":\"%s\",\"transport\":\"%s\",\"servers\":%zu,"
              "\"layers\":%d,\"batch\":%d,\"context\":%lld,\"steps\":%d,\"heads\":%d,\"kv_heads\":%d,\"head_dim\":%d,\"dtype\":\"%s\","
              "\"shard_tokens\":%lld,\"prefill_s\":%.4f,\"decode_s\":%.4f,\"tokens_per_s\":%.3f,\"attention_ms_per_step\":%.4f,"
              "\"gpu_memory_used_bytes\":%zu,\"weights_bytes\":%zu,\"kv_bytes_gpu\":%zu,\"kv_bytes_servers\":%.0f,"
              "\"bytes_sent_per_step\":%.1f,\"bytes_received_per_step\":%.1f,\"retries\":%llu,\"hidden_fingerprint\":%.6g,"
              "\"checked\":%s,\"max_error\":%.6g%s}\n",
              mode, local ? "none" : c.client.transport.c_str(), c.client.servers.size(), L, B, static_cast<long long>(ctx), steps, H, K, D,
              to_string(c.dtype), static_cast<long long>(c.client.shard_tokens), prefill_s, decode_s, tokens_per_s, attn_s * 1e3 / steps,
              gpu_used, weight_bytes, kv_gpu_bytes, server_kv, static_cast<double>(s1.bytes_sent - s0.bytes_sent) / steps,
              static_cast<double>(s1.bytes_received - s0.bytes_received) / steps, static_cast<unsigned long long>(s1.retries - s0.retries),
              fingerprint, c.check ? "true" : "false", c.check ? max_err : 0.0, pipeline_lines_json.c_str());
  // Offloaded: the servers' f32 kernel; local: the GPU kernel (f32 accumulation, fast exp2).
  const double tol = local ? 2e-3 : 1e-3;
  if (c.check && !(max_err < tol)) {
    std::fprintf(stderr, "offload_decode: error: %s attention differs from the cpu backend by %.3g (tolerance %.1g)\n", mode, max_err, tol);
    return 1;
  }
  return 0;
}

}  // namespace offload_decode
