// offload_decode: the decode loop of a small synthetic multi-layer model whose attention over the
// KV cache is offloaded to longattn-offload-server daemons. The model runs on this host's CPU
// (--device cpu, the default) or on the GPU (--device cuda); with --device cuda
// --local-attention the same model keeps its KV in GPU memory and attends there instead, the
// all-on-GPU baseline that offloading is measured against (tokens/s, GPU memory).
//
//   build/bin/longattn-offload-server --listen 127.0.0.1:7070 --token-file tok &
//   build/bin/offload_decode --servers 127.0.0.1:7070,127.0.0.1:7071 --token-file tok
//       --layers 4 --batch 4 --context 4096 --steps 16 --heads 8 --kv-heads 2 --head-dim 64 --check
//
// Each step, per layer: q, k, v = x Wq, x Wk, x Wv; one append_attend per server appends the new
// k, v and attends the queries there; x += o Wo; x = rmsnorm(x). With --micro-batches N the batch
// is cut into N groups that take turns: while one group's attention is on the servers, the model
// computes the next group's layer. The prefill context is random KV sent in bulk. --check keeps a local copy of the KV and compares every attention result with the
// local "cpu" backend. Ends with one line: RESULT {json}.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <functional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "../common/flags.hpp"
#include "decode_common.hpp"
#include "pipeline_loop.hpp"
#include "pipeline_output.hpp"
#include "longattn/backend.hpp"
#include "longattn/dtype_convert.hpp"
#include "longattn/error.hpp"
#include "longattn/offload_client.hpp"

namespace {

using namespace longattn;
using offload_decode::Config;
using Clock = std::chrono::steady_clock;

constexpr const char* kUsage = R"(usage: offload_decode --servers HOST:PORT[,HOST:PORT...] --token-file FILE [flags]
       offload_decode --device cuda --local-attention [flags]
  --device D        where the model runs: cpu (default) or cuda (where built with CUDA)
  --local-attention with --device cuda: KV in GPU memory, attention on the GPU (no servers); a batch
                    whose KV does not fit is refused before allocating, naming the largest that does
  --find-max-batch  with --device cuda: print the largest batch that fits all on the GPU (from the
                    device's free memory) and what offloading needs on the GPU at --batch, then exit
  --layers L        model layers (default 4)
  --batch B         sequences decoded together (default 4)
  --context N       prefill tokens per sequence (default 4096)
  --steps S         decode steps (default 16)
  --heads H         query heads (default 8)
  --kv-heads K      kv heads, H % K == 0 (default 2)
  --head-dim D      (default 64)
  --dtype T         KV dtype on the servers: bf16, fp16, fp32 (default bf16)
  --shard-tokens N  spread each sequence over the servers in ranges of N tokens (default 0: whole sequences)
  --timeout-ms MS   per request, retries included (default 10000)
  --transport T     tcp or ucx (ucx where built with UCX; the servers must use the same)
  --micro-batches N split the batch into N micro-batches kept in flight: while the servers attend one at
                    layer L, the model computes another (default 1; 2 or 3 hide the attention)
  --replicas N      keep every piece of KV on N servers; reads fail over when one fails (default 1)
  --tls             TLS to the servers (started with --tls-cert); --tls-ca FILE: the CA that signed their
                    certificates (default: the system's), --tls-cert FILE --tls-key FILE: this client's
                    certificate (mutual TLS), --tls-server-name NAME: the name their certificates carry
  --seed S          (default 1)
  --check           compare every attention with the local cpu backend (keeps an f32 copy of the KV on
                    this host: use small sizes)
)";

std::string read_token(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(ErrorCode::io, "cannot read token file " + path);
  std::stringstream ss;
  ss << in.rdbuf();
  std::string t = ss.str();
  while (!t.empty() && (t.back() == '\n' || t.back() == '\r' || t.back() == ' ')) t.pop_back();
  return t;
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string x; std::getline(ss, x, ',');)
    if (!x.empty()) out.push_back(x);
  return out;
}

// y[n, out] = x[n, in] W[in, out]
void matmul(const std::vector<float>& x, const std::vector<float>& w, std::vector<float>& y, int n, int in, int out) {
  y.assign(static_cast<std::size_t>(n) * out, 0.0f);
#pragma omp parallel for
  for (int r = 0; r < n; ++r)
    for (int i = 0; i < in; ++i) {
      const float xv = x[static_cast<std::size_t>(r) * in + i];
      const float* wr = &w[static_cast<std::size_t>(i) * out];
      float* yr = &y[static_cast<std::size_t>(r) * out];
      for (int o = 0; o < out; ++o) yr[o] += xv * wr[o];
    }
}

// The decode loop with the model on this host's CPU (the original mode of this example).
int run_cpu(const Config& cfg) {
  const int L = cfg.layers, B = cfg.batch, steps = cfg.steps, H = cfg.heads, K = cfg.kv_heads, D = cfg.head_dim;
  const std::int64_t ctx = cfg.context;
  const DType dt = cfg.dtype;
  const bool check = cfg.check;
  const int hidden = cfg.hidden();
  const offload::ClientOptions& co = cfg.client;
  offload::Client client(co);

  std::mt19937_64 rng(cfg.seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  auto randn = [&](std::size_t n, float scale) {
    std::vector<float> v(n);
    for (auto& x : v) x = nd(rng) * scale;
    return v;
  };
  struct Layer {
    std::vector<float> wq, wk, wv, wo;
  };
  std::vector<Layer> layers(static_cast<std::size_t>(L));
  const float ws = 1.0f / std::sqrt(static_cast<float>(hidden));
  for (auto& l : layers) {
    l.wq = randn(static_cast<std::size_t>(hidden) * H * D, ws);
    l.wk = randn(static_cast<std::size_t>(hidden) * K * D, ws);
    l.wv = randn(static_cast<std::size_t>(hidden) * K * D, ws);
    l.wo = randn(static_cast<std::size_t>(H) * D * hidden, ws);
  }

  // Prefill: random KV (values exact in the KV dtype, so the local check sees the same numbers).
  const std::size_t row = static_cast<std::size_t>(K) * D;
  std::vector<std::vector<std::vector<float>>> kcache(static_cast<std::size_t>(L), std::vector<std::vector<float>>(static_cast<std::size_t>(B)));
  auto vcache = kcache;
  auto to_dtype = [&](std::vector<float>& v) {  // rounds in place, returns raw bytes
    std::vector<std::byte> raw(v.size() * dtype_size(dt));
    for (std::size_t i = 0; i < v.size(); ++i) {
      store_from_f32(raw.data(), dt, i, v[i]);
      v[i] = load_as_f32(raw.data(), dt, i);
    }
    return raw;
  };
  const auto t_prefill = Clock::now();
  for (int b = 0; b < B; ++b) client.open({static_cast<std::uint64_t>(b), L, K, D, dt}).get();
  for (int l = 0; l < L; ++l) {
    std::vector<std::future<void>> pending;
    std::vector<std::vector<std::byte>> keep;
    for (int b = 0; b < B; ++b) {
      if (ctx == 0) continue;
      auto k = randn(static_cast<std::size_t>(ctx) * row, 1.0f), v = randn(static_cast<std::size_t>(ctx) * row, 1.0f);
      keep.push_back(to_dtype(k));
      keep.push_back(to_dtype(v));
      pending.push_back(client.append(static_cast<std::uint64_t>(b), l, keep[keep.size() - 2].data(), keep.back().data(), ctx));
      if (check) {
        kcache[l][b] = std::move(k);
        vcache[l][b] = std::move(v);
      }
    }
    for (auto& p : pending) p.get();
  }
  const double prefill_s = std::chrono::duration<double>(Clock::now() - t_prefill).count();

  std::unique_ptr<AttentionBackend> local;
  if (check) local = make_backend("cpu", DeviceKind::cpu);
  std::vector<float> x = randn(static_cast<std::size_t>(B) * hidden, 1.0f);

  // The model's side of the pipeline on this host's CPU: each micro-batch's work runs to the end
  // before start() returns, so the loop sends its request at once and computes the next one's.
  class CpuModel final : public offload_decode::MicroBatchModel {
   public:
    struct Part {
      offload_decode::MicroBatchRange seqs;
      std::vector<float> x, q, kk, vv, o, lse, y;
      std::vector<std::byte> kraw, vraw;
      std::vector<offload::DecodeQuery> queries;
    };
    CpuModel(const Config& c, offload::Client& client, const std::vector<Layer>& layers, const std::vector<float>& x,
             std::function<std::vector<std::byte>(std::vector<float>&)> to_dtype,
             std::function<void(Part&, int)> check_layer)
        : c_(c), client_(client), layers_(layers), to_dtype_(std::move(to_dtype)), check_layer_(std::move(check_layer)) {
      const int hidden = c.hidden();
      for (const auto& r : offload_decode::split_batch(c.batch, c.micro_batches)) {
        Part p;
        p.seqs = r;
        p.x.assign(x.begin() + static_cast<std::ptrdiff_t>(r.first) * hidden, x.begin() + static_cast<std::ptrdiff_t>(r.first + r.count) * hidden);
        for (int b = r.first; b < r.first + r.count; ++b) p.queries.push_back({static_cast<std::uint64_t>(b), 1});
        p.o.resize(static_cast<std::size_t>(r.count) * c.heads * c.head_dim);
        p.lse.resize(static_cast<std::size_t>(r.count) * c.heads);
        parts_.push_back(std::move(p));
      }
    }
    void start(int m, int finish_layer, int next_layer, int) override {
      Part& p = parts_[static_cast<std::size_t>(m)];
      if (finish_layer >= 0 && check_layer_) check_layer_(p, finish_layer);  // not model time
      const auto t = Clock::now();
      const int hidden = c_.hidden(), H = c_.heads, K = c_.kv_heads, D = c_.head_dim, n = p.seqs.count;
      if (finish_layer >= 0) {  // x += o Wo; x = rmsnorm(x)
        matmul(p.o, layers_[static_cast<std::size_t>(finish_layer)].wo, p.y, n, H * D, hidden);
        for (int b = 0; b < n; ++b) {
          float ss = 0;
          float* xb = &p.x[static_cast<std::size_t>(b) * hidden];
          for (int i = 0; i < hidden; ++i) {
            xb[i] += p.y[static_cast<std::size_t>(b) * hidden + i];
            ss += xb[i] * xb[i];
          }
          const float inv = 1.0f / std::sqrt(ss / static_cast<float>(hidden) + 1e-6f);
          for (int i = 0; i < hidden; ++i) xb[i] *= inv;
        }
      }
      if (next_layer >= 0) {
        const auto& W = layers_[static_cast<std::size_t>(next_layer)];
        matmul(p.x, W.wq, p.q, n, hidden, H * D);
        matmul(p.x, W.wk, p.kk, n, hidden, K * D);
        matmul(p.x, W.wv, p.vv, n, hidden, K * D);
        // q rounded to the KV dtype too (a GPU server takes q in it), so every kind of server and
        // the --check reference see the same numbers.
        to_dtype_(p.q);
        p.kraw = to_dtype_(p.kk);
        p.vraw = to_dtype_(p.vv);
      }
      compute_s += std::chrono::duration<double>(Clock::now() - t).count();
    }
    bool done(int) override { return true; }
    std::future<void> send(int m, int layer, Clock::time_point* answered) override {
      Part& p = parts_[static_cast<std::size_t>(m)];
      return client_.append_attend(layer, c_.heads, c_.head_dim, p.queries, p.q.data(), p.kraw.data(), p.vraw.data(), p.o.data(),
                                   p.lse.data(), answered);
    }
    double compute_s = 0;

   private:
    const Config& c_;
    offload::Client& client_;
    const std::vector<Layer>& layers_;
    std::function<std::vector<std::byte>(std::vector<float>&)> to_dtype_;
    std::function<void(Part&, int)> check_layer_;
    std::vector<Part> parts_;
  };

  double max_err = 0;
  // --check: local attention over the same KV with the cpu backend (f32 copies of the KV values).
  auto check_layer = [&](CpuModel::Part& p, int l) {
    Config part = cfg;
    part.batch = p.seqs.count;
    std::vector<std::vector<float>> kpart, vpart;
    for (int i = 0; i < p.seqs.count; ++i) {
      auto& kc = kcache[l][p.seqs.first + i];
      auto& vc = vcache[l][p.seqs.first + i];
      kc.insert(kc.end(), p.kk.begin() + static_cast<std::ptrdiff_t>(i * row), p.kk.begin() + static_cast<std::ptrdiff_t>((i + 1) * row));
      vc.insert(vc.end(), p.vv.begin() + static_cast<std::ptrdiff_t>(i * row), p.vv.begin() + static_cast<std::ptrdiff_t>((i + 1) * row));
      kpart.push_back(kc);
      vpart.push_back(vc);
    }
    max_err = std::max(max_err, offload_decode::check_against_local(*local, part, kpart, vpart, p.q.data(), p.o.data(), p.lse.data(), false));
  };
  CpuModel model(cfg, client, layers, x, to_dtype, check ? std::function<void(CpuModel::Part&, int)>(check_layer) : nullptr);

  const int N = cfg.micro_batches;
  const auto s0 = client.stats();
  offload_decode::ServerKernelMeter kernels(client, co.servers.size());
  const auto times = offload_decode::run_pipeline(model, N, steps, L);
  const double decode_s = times.decode_s, attn_s = times.wait_s;
  const auto pipe = offload_decode::pipeline_report(times.trips, model.compute_s, times.wait_s, decode_s, steps, L, N, B);
  kernels.finish();
  const auto s1 = client.stats();
  const double server_kv = offload_decode::servers_kv_bytes(client, co.servers.size());
  for (int b = 0; b < B; ++b) client.drop(static_cast<std::uint64_t>(b)).get();

  const double tokens_per_s = static_cast<double>(B) * steps / decode_s;
  std::printf("offload_decode: %zu server(s), %d layers, batch %d, context %lld + %d steps, %d/%d heads x %d, %s KV\n", co.servers.size(), L, B,
              static_cast<long long>(ctx), steps, H, K, D, to_string(dt));
  std::printf("  prefill %.3f s; decode %.3f s: %.1f tokens/s; attention wait %.3f ms per step (all layers)\n", prefill_s, decode_s,
              tokens_per_s, attn_s * 1e3 / steps);
  std::printf("  per step: %.1f KiB sent, %.1f KiB received%s\n", static_cast<double>(s1.bytes_sent - s0.bytes_sent) / steps / 1024,
              static_cast<double>(s1.bytes_received - s0.bytes_received) / steps / 1024,
              check ? fmt::format("; max |error| vs local attention {:.3g}", max_err).c_str() : "");
  std::printf("  KV held by the servers: %.3f GiB\n", server_kv / (1 << 30));
  std::fputs(offload_decode::pipeline_lines(pipe, N, kernels, steps, "model").c_str(), stdout);
  std::printf("RESULT {\"program\":\"offload_decode\",\"transport\":\"%s\",\"servers\":%zu,\"layers\":%d,\"batch\":%d,\"context\":%lld,\"steps\":%d,\"heads\":%d,"
              "\"kv_heads\":%d,\"head_dim\":%d,\"dtype\":\"%s\",\"shard_tokens\":%lld,\"prefill_s\":%.4f,\"decode_s\":%.4f,\"tokens_per_s\":%.3f,"
              "\"attention_ms_per_step\":%.4f,\"bytes_sent_per_step\":%.1f,\"bytes_received_per_step\":%.1f,\"retries\":%llu,"
              "\"checked\":%s,\"max_error\":%.6g,\"device\":\"cpu\",\"attention\":\"offloaded\",\"kv_bytes_servers\":%.0f%s}\n",
              co.transport.c_str(), co.servers.size(), L, B, static_cast<long long>(ctx), steps, H, K, D, to_string(dt),
              static_cast<long long>(co.shard_tokens), prefill_s, decode_s, tokens_per_s, attn_s * 1e3 / steps,
              static_cast<double>(s1.bytes_sent - s0.bytes_sent) / steps, static_cast<double>(s1.bytes_received - s0.bytes_received) / steps,
              static_cast<unsigned long long>(s1.retries - s0.retries), check ? "true" : "false", check ? max_err : 0.0, server_kv,
              offload_decode::pipeline_json(pipe, N, kernels, steps).c_str());
  if (check && !(max_err < 1e-3)) {
    std::fprintf(stderr, "offload_decode: error: offloaded attention differs from local attention by %.3g\n", max_err);
    return 1;
  }
  return 0;
}

int run(int argc, char** argv) {
  examples::Flags f(argc, argv, kUsage,
                    {"servers", "token-file", "layers", "batch", "context", "steps", "heads", "kv-heads", "head-dim", "dtype",
                     "shard-tokens", "timeout-ms", "seed", "transport", "device", "micro-batches", "replicas", "tls-ca", "tls-cert",
                     "tls-key", "tls-server-name"},
                    {"check", "local-attention", "find-max-batch", "tls"});
  Config c;
  const std::string device = f.str("device", "cpu");
  if (device != "cpu" && device != "cuda") throw Error(ErrorCode::invalid_argument, "--device must be cpu or cuda, got '" + device + "'");
  c.local_attention = f.flag("local-attention");
  if (c.local_attention && device != "cuda")
    throw Error(ErrorCode::invalid_argument, "--local-attention is the all-on-GPU baseline: use it with --device cuda");
  if (c.local_attention && (f.has("servers") || f.has("token-file") || f.has("shard-tokens") || f.has("transport")))
    throw Error(ErrorCode::invalid_argument, "--local-attention runs without servers: drop --servers/--token-file/--shard-tokens/--transport");
  c.find_max_batch = f.flag("find-max-batch");
  if (c.find_max_batch && device != "cuda")
    throw Error(ErrorCode::invalid_argument, "--find-max-batch measures the GPU's free memory: use it with --device cuda");
  if (!c.local_attention && !c.find_max_batch && (!f.has("servers") || !f.has("token-file")))
    throw Error(ErrorCode::invalid_argument, "--servers and --token-file are required (see --help)");
  c.layers = static_cast<int>(f.integer("layers", 4, 1, 1024));
  c.batch = static_cast<int>(f.integer("batch", 4, 1, 4096));
  c.context = f.integer("context", 4096, 0, std::int64_t{1} << 30);
  c.steps = static_cast<int>(f.integer("steps", 16, 1, 1 << 20));
  c.heads = static_cast<int>(f.integer("heads", 8, 1, 1024));
  c.kv_heads = static_cast<int>(f.integer("kv-heads", 2, 1, 1024));
  c.head_dim = static_cast<int>(f.integer("head-dim", 64, 1, 512));
  c.dtype = parse_dtype(f.str("dtype", "bf16"));
  c.check = f.flag("check");
  c.seed = static_cast<std::uint64_t>(f.integer("seed", 1, 0, 1LL << 62));
  if (c.heads % c.kv_heads) throw Error(ErrorCode::invalid_argument, "--heads must be a multiple of --kv-heads");
  c.micro_batches = static_cast<int>(f.integer("micro-batches", 1, 1, 4096));
  if (c.micro_batches > c.batch)
    throw Error(ErrorCode::invalid_argument, fmt::format("--micro-batches {} exceeds --batch {}: each micro-batch needs a sequence; "
                                                         "use at most {}", c.micro_batches, c.batch, c.batch));
  if (c.micro_batches > 1 && c.local_attention)
    throw Error(ErrorCode::invalid_argument, "--micro-batches overlaps the model with remote attention: drop it with --local-attention");
  if (!c.local_attention && !c.find_max_batch) {
    c.client.servers = split(f.str("servers", ""));
    c.client.token = read_token(f.str("token-file", ""));
    c.client.timeout = std::chrono::milliseconds(f.integer("timeout-ms", 10000, 1, 3600000));
    c.client.shard_tokens = f.integer("shard-tokens", 0, 0, std::int64_t{1} << 40);
    c.client.transport = f.str("transport", "tcp");
    c.client.replicas = static_cast<int>(f.integer("replicas", 1, 1, static_cast<std::int64_t>(c.client.servers.size())));
    c.client.tls.enabled = f.flag("tls");
    if (!c.client.tls.enabled && (f.has("tls-ca") || f.has("tls-cert") || f.has("tls-key") || f.has("tls-server-name")))
      throw Error(ErrorCode::invalid_argument, "--tls-ca, --tls-cert, --tls-key and --tls-server-name need --tls");
    c.client.tls.ca_file = f.str("tls-ca", "");
    c.client.tls.cert_file = f.str("tls-cert", "");
    c.client.tls.key_file = f.str("tls-key", "");
    c.client.tls.server_name = f.str("tls-server-name", "");
  }
  if (device == "cpu") return run_cpu(c);
#if defined(LONGATTN_HAVE_CUDA)
  return offload_decode::run_gpu(c);
#else
  throw Error(ErrorCode::unsupported, "--device cuda: this build has no CUDA (configure with -DLONGATTN_CUDA=ON where nvcc exists); use --device cpu");
#endif
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const longattn::Error& e) {
    std::fprintf(stderr, "offload_decode: error (%s): %s\n", longattn::to_string(e.code()), e.what());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "offload_decode: error: %s\n", e.what());
  }
  return 1;
}
