// The "cudnn" backend: cuDNN 9's fused flash attention (SDPA) forward and backward, with the softmax
// statistics (lse) so that ring steps plug it in exactly like the own kernels. The graphs are built
// with NVIDIA's header-only cudnn-frontend (scripts/fetch-cudnn-frontend.sh) once per shape and
// cached; element-wise helpers (merge, delta, fill, ...) are the "cuda" backend's.
//
// What cuDNN's SDPA can express decides what this backend accepts: causal masks by index (top-left
// diagonal inside each sequence), varlen through ragged offsets plus per-sequence lengths, GQA/MQA,
// bf16/fp16 in and out. Calls with explicit positions and causal masking (ring steps away from the
// diagonal, zigzag/striped shards) are refused with a reason; the "auto" backend sends those to
// "cuda" (see fallback_backend.cpp).
#include "common/check.hpp"
#include "kernels/cuda/cuda_backends.hpp"

#ifdef LONGATTN_HAVE_CUDNN
#include <cudnn.h>
#include <cudnn_frontend.h>

#include <bit>
#include <map>
#include <mutex>
#include <tuple>
#include <unordered_map>

#include "kernels/cuda/cuda_common.hpp"
#include "kernels/cuda/cudnn_support.hpp"
#include "kernels/cuda/flash_params.hpp"
#include "longattn/config.hpp"
#include "longattn/log.hpp"

namespace longattn::kernels {
namespace {

namespace fe = cudnn_frontend;
using namespace cuda;

// Tensor ids in the cuDNN graphs (the variant pack maps them to pointers at run time).
enum Uid : std::int64_t {
  kQ = 1, kK, kV, kO, kStats, kDO, kDQ, kDK, kDV,
  kSeqQ, kSeqK, kOffQ, kOffK, kOffV, kOffO, kOffDO, kOffDQ, kOffDK, kOffDV,
};

// One graph per distinct problem: the sizes cuDNN compiles for (max lengths of ragged batches are
// rounded up to a bucket, so varlen batches reuse graphs), direction, mask and scale.
struct GraphKey {
  bool backward = false;
  DType dtype = DType::bf16;
  int batch = 1;
  std::int64_t s_q = 0, s_k = 0;
  int hq = 0, hkv = 0, d = 0;
  bool causal = false, ragged = false, deterministic = false;
  std::uint32_t scale_bits = 0;
  auto tie() const {
    return std::tie(backward, dtype, batch, s_q, s_k, hq, hkv, d, causal, ragged, deterministic, scale_bits);
  }
  bool operator<(const GraphKey& o) const { return tie() < o.tie(); }
};

struct Graph {
  std::shared_ptr<fe::graph::Graph> graph;
  std::int64_t workspace_bytes = 0;
  std::string failure;  // non-empty: cuDNN cannot run this problem (kept so we do not rebuild)
};

// A 4-d tensor of packed [tokens, heads, d] rows seen as cuDNN's [batch, heads, seq, d].
std::shared_ptr<fe::graph::Tensor_attributes> packed(fe::graph::Graph& g, const char* name, std::int64_t uid,
                                                     const GraphKey& k, int heads, std::int64_t seq,
                                                     std::shared_ptr<fe::graph::Tensor_attributes> ragged) {
  auto t = g.tensor(fe::graph::Tensor_attributes()
                        .set_name(name)
                        .set_uid(uid)
                        .set_dim({k.batch, heads, seq, k.d})
                        .set_stride({seq * heads * k.d, k.d, static_cast<std::int64_t>(heads) * k.d, 1}));
  if (ragged) t->set_ragged_offset(ragged);
  return t;
}

void set_output_like(const std::shared_ptr<fe::graph::Tensor_attributes>& t, const char* name, std::int64_t uid,
                     const GraphKey& k, int heads, std::int64_t seq,
                     std::shared_ptr<fe::graph::Tensor_attributes> ragged) {
  t->set_output(true).set_name(name).set_uid(uid).set_dim({k.batch, heads, seq, k.d}).set_stride(
      {seq * heads * k.d, k.d, static_cast<std::int64_t>(heads) * k.d, 1});
  if (ragged) t->set_ragged_offset(ragged);
}

std::shared_ptr<fe::graph::Tensor_attributes> int_column(fe::graph::Graph& g, const char* name, std::int64_t uid,
                                                         std::int64_t n) {
  return g.tensor(fe::graph::Tensor_attributes()
                      .set_name(name)
                      .set_uid(uid)
                      .set_dim({n, 1, 1, 1})
                      .set_stride({1, 1, 1, 1})
                      .set_data_type(fe::DataType_t::INT32));
}

// Builds the forward or backward SDPA graph for `k`; a failure message instead of a graph when
// cuDNN has no engine for it.
Graph build_graph(cudnnHandle_t handle, const GraphKey& k, float scale) {
  Graph out;
  auto g = std::make_shared<fe::graph::Graph>();
  g->set_io_data_type(k.dtype == DType::bf16 ? fe::DataType_t::BFLOAT16 : fe::DataType_t::HALF)
      .set_intermediate_data_type(fe::DataType_t::FLOAT)
      .set_compute_data_type(fe::DataType_t::FLOAT);
  std::shared_ptr<fe::graph::Tensor_attributes> seq_q, seq_k, off[kOffDV + 1];
  if (k.ragged) {
    seq_q = int_column(*g, "seq_q", kSeqQ, k.batch);
    seq_k = int_column(*g, "seq_k", kSeqK, k.batch);
    const char* names[] = {"off_q", "off_k", "off_v", "off_o", "off_do", "off_dq", "off_dk", "off_dv"};
    const std::int64_t last = k.backward ? kOffDV : kOffO;  // a graph holds only tensors it uses
    for (std::int64_t u = kOffQ; u <= last; ++u) off[u] = int_column(*g, names[u - kOffQ], u, k.batch + 1);
  }
  auto q = packed(*g, "Q", kQ, k, k.hq, k.s_q, off[kOffQ]);
  auto kk = packed(*g, "K", kK, k, k.hkv, k.s_k, off[kOffK]);
  auto v = packed(*g, "V", kV, k, k.hkv, k.s_k, off[kOffV]);
  const std::vector<std::int64_t> stats_dim{k.batch, k.hq, k.s_q, 1}, stats_stride{k.hq * k.s_q, k.s_q, 1, 1};

  auto configure_mask = [&](auto& opts) {
    opts.set_attn_scale(scale);
    if (k.causal) opts.set_diagonal_alignment(fe::DiagonalAlignment_t::TOP_LEFT).set_diagonal_band_right_bound(0);
    if (k.ragged) opts.set_padding_mask(true).set_seq_len_q(seq_q).set_seq_len_kv(seq_k);
  };
  if (!k.backward) {
    auto opts = fe::graph::SDPA_attributes().set_name("sdpa").set_generate_stats(true);
    configure_mask(opts);
    auto [o, stats] = g->sdpa(q, kk, v, opts);
    set_output_like(o, "O", kO, k, k.hq, k.s_q, off[kOffO]);
    stats->set_output(true).set_name("Stats").set_uid(kStats).set_data_type(fe::DataType_t::FLOAT)
        .set_dim(stats_dim).set_stride(stats_stride);
  } else {
    auto o = packed(*g, "O", kO, k, k.hq, k.s_q, off[kOffO]);
    auto d_o = packed(*g, "dO", kDO, k, k.hq, k.s_q, off[kOffDO]);
    auto stats = g->tensor(fe::graph::Tensor_attributes().set_name("Stats").set_uid(kStats)
                               .set_dim(stats_dim).set_stride(stats_stride).set_data_type(fe::DataType_t::FLOAT));
    auto opts = fe::graph::SDPA_backward_attributes().set_name("sdpa_backward");
    configure_mask(opts);
    if (k.deterministic) opts.set_deterministic_algorithm(true);
    auto [dq, dk, dv] = g->sdpa_backward(q, kk, v, o, d_o, stats, opts);
    set_output_like(dq, "dQ", kDQ, k, k.hq, k.s_q, off[kOffDQ]);
    set_output_like(dk, "dK", kDK, k, k.hkv, k.s_k, off[kOffDK]);
    set_output_like(dv, "dV", kDV, k, k.hkv, k.s_k, off[kOffDV]);
  }
  auto step = [&](fe::error_t e, const char* what) {
    if (e.is_good() || !out.failure.empty()) return;
    out.failure = fmt::format("cuDNN {}: {}", what, e.get_message());
  };
  step(g->validate(), "validate");
  if (out.failure.empty()) step(g->build_operation_graph(handle), "build_operation_graph");
  if (out.failure.empty()) step(g->create_execution_plans({fe::HeurMode_t::A}), "create_execution_plans");
  if (out.failure.empty()) step(g->check_support(handle), "check_support");
  if (out.failure.empty()) step(g->build_plans(handle), "build_plans");
  if (out.failure.empty()) step(g->get_workspace_size(out.workspace_bytes), "get_workspace_size");
  if (out.failure.empty()) out.graph = std::move(g);
  return out;
}

// Stream-ordered scratch memory for one call.
class Scratch {
 public:
  explicit Scratch(cudaStream_t s) : stream_(s) {}
  ~Scratch() {
    for (void* p : ptrs_) cudaFreeAsync(p, stream_);
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  template <class T = void>
  T* get(std::size_t bytes) {
    void* p = nullptr;
    LONGATTN_CUDA_CHECK(cudaMallocAsync(&p, std::max<std::size_t>(bytes, 16), stream_));
    ptrs_.push_back(p);
    return static_cast<T*>(p);
  }

 private:
  cudaStream_t stream_;
  std::vector<void*> ptrs_;
};

constexpr int kRaggedBucket = 64;  // max lengths of ragged batches round up to this (graph reuse)

class CudnnBackend final : public AttentionBackend {
 public:
  CudnnBackend() : merge_and_delta_(make_cuda_backend()) {
    LONGATTN_CUDA_CHECK(cudaGetDevice(&device_));
    LONGATTN_CUDNN_CHECK(cudnnCreate(&handle_));
    deterministic_ = env_int("LONGATTN_DETERMINISTIC") != 0;
  }
  ~CudnnBackend() override {
    cache_.clear();
    if (workspace_) cudaFree(workspace_);
    cudnnDestroy(handle_);
  }
  std::string name() const override { return "cudnn"; }
  Device device() const override { return {DeviceKind::cuda, device_}; }

  std::string unsupported_reason(const AttentionArgs& a) const override {
    auto why = device_tensor_reason(a);
    if (!why.empty()) return why;
    if (a.q.ndim != 3 || a.k.ndim != 3) return "q/k/v must be [tokens, heads, head_dim]";
    const auto d = a.q.dim(2);
    if (d % 8 != 0 || d > 256) return fmt::format("cuDNN SDPA needs head_dim a multiple of 8 up to 256, got {}", d);
    if (a.causal && (a.q_positions || a.k_positions))
      return "cuDNN masks by index only; causal attention with explicit positions (ring steps) needs the cuda backend";
    if (a.q.dim(0) == 0 || a.k.dim(0) == 0) return "empty query or key tensors";
    const bool ragged = a.cu_seqlens_q && a.batch > 1;
    if (ragged && (a.q.numel() > INT32_MAX || a.k.numel() > INT32_MAX))
      return "cuDNN's ragged offsets are 32-bit: packed varlen tensors must hold fewer than 2^31 elements";
    return {};
  }

  void forward(const AttentionArgs& user, const ForwardOutputs& out) override {
    const auto s = validate_call(user, out);
    auto st = static_cast<cudaStream_t>(user.stream);
    Scratch scratch(st);
    const auto& [a, key, graph] = plan_call(user, s, false, scratch);
    std::unordered_map<std::int64_t, void*> pack{{kQ, a.q.data}, {kK, a.k.data}, {kV, a.v.data}};
    void* o16 = out.o.dtype == a.q.dtype ? out.o.data : scratch.get(s.tq * s.hq * s.d * dtype_size(a.q.dtype));
    pack[kO] = o16;
    float* stats = key.ragged ? scratch.get<float>(sizeof(float) * key.batch * key.hq * key.s_q) : out.lse.as<float>();
    pack[kStats] = stats;
    if (key.ragged) add_varlen(a, s, false, scratch, pack, st);
    execute(*graph, pack, st);
    if (key.ragged) {
      launch_scatter_stats(stats, static_cast<int>(key.s_q), a.cu_seqlens_q, a.cu_seqlens_k, a.batch, s.hq, s.tq,
                           out.lse.as<float>(), st);
      launch_zero_rows_without_partner(o16, a.q.dtype, s.tq, static_cast<std::int64_t>(s.hq) * s.d, a.cu_seqlens_q,
                                       a.cu_seqlens_k, a.batch, st);
    }
    if (o16 != out.o.data) launch_convert(out.o.data, out.o.dtype, o16, a.q.dtype, out.o.numel(), st);
  }

  void backward(const AttentionArgs& user, const BackwardArgs& g) override {
    const auto s = validate_call(user, g);
    auto st = static_cast<cudaStream_t>(user.stream);
    Scratch scratch(st);
    const auto& [a, key, graph] = plan_call(user, s, true, scratch);
    const DType io = a.q.dtype;
    // cuDNN reads o and dO in the input dtype (it derives delta from them itself, so a given
    // delta is not needed) and writes 16-bit gradients.
    auto as_io = [&](const TensorView& t) -> void* {
      if (t.dtype == io) return t.data;
      void* p = scratch.get(t.numel() * dtype_size(io));
      launch_convert(p, io, t.data, t.dtype, t.numel(), st);
      return p;
    };
    std::unordered_map<std::int64_t, void*> pack{{kQ, a.q.data}, {kK, a.k.data}, {kV, a.v.data},
                                                 {kO, as_io(g.o)}, {kDO, as_io(g.d_o)}};
    if (key.ragged) {
      float* padded = scratch.get<float>(sizeof(float) * key.batch * key.hq * key.s_q);
      launch_gather_stats(g.lse.as<const float>(), a.cu_seqlens_q, a.batch, s.hq, s.tq, static_cast<int>(key.s_q),
                          padded, st);
      pack[kStats] = padded;
      add_varlen(a, s, true, scratch, pack, st);
    } else {
      pack[kStats] = g.lse.data;
    }
    const TensorView* grads[] = {&g.dq, &g.dk, &g.dv};
    const std::int64_t uids[] = {kDQ, kDK, kDV};
    void* out16[3];
    for (int i = 0; i < 3; ++i) {
      const bool direct = !g.accumulate && grads[i]->dtype == io;
      out16[i] = direct ? grads[i]->data : scratch.get(grads[i]->numel() * dtype_size(io));
      pack[uids[i]] = out16[i];
    }
    execute(*graph, pack, st);
    const std::int64_t q_row = static_cast<std::int64_t>(s.hq) * s.d, k_row = static_cast<std::int64_t>(s.hkv) * s.d;
    if (key.ragged) {
      launch_zero_rows_without_partner(out16[0], io, s.tq, q_row, a.cu_seqlens_q, a.cu_seqlens_k, a.batch, st);
      launch_zero_rows_without_partner(out16[1], io, s.tk, k_row, a.cu_seqlens_k, a.cu_seqlens_q, a.batch, st);
      launch_zero_rows_without_partner(out16[2], io, s.tk, k_row, a.cu_seqlens_k, a.cu_seqlens_q, a.batch, st);
    }
    for (int i = 0; i < 3; ++i) {
      if (out16[i] == grads[i]->data) continue;
      if (g.accumulate)
        launch_add_into(grads[i]->as<float>(), out16[i], io, grads[i]->numel(), st);
      else
        launch_convert(grads[i]->data, grads[i]->dtype, out16[i], io, grads[i]->numel(), st);
    }
  }

  void merge_into(TensorView oa, TensorView la, TensorView op, TensorView lp, void* stream) override {
    merge_and_delta_->merge_into(oa, la, op, lp, stream);
  }
  void compute_delta(TensorView o, TensorView d_o, TensorView delta, void* stream) override {
    merge_and_delta_->compute_delta(o, d_o, delta, stream);
  }

 private:
  void require(const AttentionArgs& a) const {
    const auto why = unsupported_reason(a);
    LONGATTN_REQUIRE(why.empty(), ErrorCode::unsupported, "cudnn backend: {}", why);
  }

  // The arguments and graph of one call. A single sequence whose exact shape has no graph yet,
  // once kExactShapes exact graphs exist, runs as a ragged batch of one (its own [0, T]
  // boundaries) through the graph of its length bucket: callers whose lengths keep changing
  // (prefill of many prompts) then reuse graphs instead of paying a graph build per length.
  struct Call {
    AttentionArgs args;
    GraphKey key;
    const Graph* graph = nullptr;
  };
  static constexpr std::size_t kExactShapes = 8;

  Call plan_call(const AttentionArgs& user, const ProblemShape& s, bool backward, Scratch& scratch) {
    require(user);
    Call c{user, make_key(user, s, backward, false)};
    if (c.key.ragged || user.q.numel() > INT32_MAX || user.k.numel() > INT32_MAX || !bucket_instead(c.key)) {
      c.graph = &get_graph(c.key, user.effective_scale());
      return c;
    }
    auto* cu = scratch.get<std::int32_t>(4 * sizeof(std::int32_t));
    launch_whole_sequence_bounds(cu, s.tq, s.tk, static_cast<cudaStream_t>(user.stream));
    c.args.batch = 1;
    c.args.cu_seqlens_q = cu;
    c.args.cu_seqlens_k = cu + 2;
    c.args.max_seqlen_q = static_cast<int>(s.tq);
    c.args.max_seqlen_k = static_cast<int>(s.tk);
    c.key = make_key(c.args, s, backward, true);
    c.graph = &get_graph(c.key, user.effective_scale());
    return c;
  }

  bool bucket_instead(const GraphKey& exact) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (cache_.count(exact)) return false;
    std::size_t exact_graphs = 0;
    for (const auto& [k, g] : cache_) exact_graphs += !k.ragged;
    return exact_graphs >= kExactShapes;
  }

  GraphKey make_key(const AttentionArgs& a, const ProblemShape& s, bool backward, bool force_ragged) const {
    GraphKey k;
    k.backward = backward;
    k.dtype = a.q.dtype;
    k.hq = s.hq;
    k.hkv = s.hkv;
    k.d = s.d;
    k.causal = a.causal;
    k.deterministic = backward && deterministic_;
    k.scale_bits = std::bit_cast<std::uint32_t>(a.effective_scale());
    k.ragged = a.cu_seqlens_q && (a.batch > 1 || force_ragged);
    if (k.ragged) {
      int mq = 0, mk = 0;
      sequence_maxima(a, s, mq, mk);
      auto bucket = [](int n) { return std::max<std::int64_t>(kRaggedBucket, (n + kRaggedBucket - 1) / kRaggedBucket * kRaggedBucket); };
      k.batch = a.batch;
      k.s_q = bucket(mq);
      k.s_k = bucket(mk);
    } else {
      k.s_q = s.tq;
      k.s_k = s.tk;
    }
    return k;
  }

  const Graph& get_graph(const GraphKey& key, float scale) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = cache_.find(key);
    if (it == cache_.end()) {
      logger(Subsystem::kernels).debug("cudnn: building {} graph b{} sq{} sk{} h{}/{} d{} causal {} ragged {}",
                                       key.backward ? "backward" : "forward", key.batch, key.s_q, key.s_k, key.hq,
                                       key.hkv, key.d, key.causal, key.ragged);
      it = cache_.emplace(key, build_graph(handle_, key, scale)).first;
    }
    LONGATTN_REQUIRE(it->second.failure.empty(), ErrorCode::unsupported,
                     "cudnn backend cannot run this problem ({}); use the cuda backend (LONGATTN_BACKEND=cuda)",
                     it->second.failure);
    return it->second;
  }

  // Per-sequence lengths and ragged offsets, computed on the device from cu_seqlens.
  void add_varlen(const AttentionArgs& a, const ProblemShape& s, bool backward, Scratch& scratch,
                  std::unordered_map<std::int64_t, void*>& pack, cudaStream_t st) {
    auto* ints = scratch.get<std::int32_t>(sizeof(std::int32_t) * (4 * a.batch + 2));
    std::int32_t *seq_q = ints, *seq_k = ints + a.batch, *off_q = ints + 2 * a.batch, *off_k = off_q + a.batch + 1;
    launch_varlen_descriptors(a.cu_seqlens_q, a.cu_seqlens_k, a.batch, static_cast<std::int64_t>(s.hq) * s.d,
                              static_cast<std::int64_t>(s.hkv) * s.d, seq_q, seq_k, off_q, off_k, st);
    pack[kSeqQ] = seq_q;
    pack[kSeqK] = seq_k;
    for (auto u : {kOffQ, kOffO}) pack[u] = off_q;
    for (auto u : {kOffK, kOffV}) pack[u] = off_k;
    if (backward) {
      for (auto u : {kOffDO, kOffDQ}) pack[u] = off_q;
      for (auto u : {kOffDK, kOffDV}) pack[u] = off_k;
    }
  }

  void execute(const Graph& graph, std::unordered_map<std::int64_t, void*>& pack, cudaStream_t st) {
    LONGATTN_CUDNN_CHECK(cudnnSetStream(handle_, st));
    if (static_cast<std::size_t>(graph.workspace_bytes) > workspace_bytes_) {
      // Grow-only workspace; the old one may still be read by work queued on another stream.
      LONGATTN_CUDA_CHECK(cudaDeviceSynchronize());
      if (workspace_) LONGATTN_CUDA_CHECK(cudaFree(workspace_));
      workspace_ = nullptr;
      LONGATTN_CUDA_CHECK(cudaMalloc(&workspace_, graph.workspace_bytes));
      workspace_bytes_ = graph.workspace_bytes;
      logger(Subsystem::kernels).debug("cuDNN workspace grows to {:.1f} MiB", static_cast<double>(workspace_bytes_) / (1 << 20));
    }
    auto e = graph.graph->execute(handle_, pack, workspace_);
    LONGATTN_REQUIRE(e.is_good(), ErrorCode::internal, "cuDNN SDPA execution failed: {}", e.get_message());
  }

  std::unique_ptr<AttentionBackend> merge_and_delta_;  // the own kernels' merge and delta (cuDNN has neither)
  cudnnHandle_t handle_ = nullptr;
  int device_ = 0;
  bool deterministic_ = false;
  std::mutex mutex_;
  std::map<GraphKey, Graph> cache_;
  void* workspace_ = nullptr;
  std::size_t workspace_bytes_ = 0;
};

}  // namespace

bool cudnn_backend_available() {
  if (!cuda_device_available()) return false;
  if (cudnnGetVersion() < 90000) return false;
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) return false;
  return major >= 8;  // cuDNN's fused SDPA needs Ampere or newer
}

std::unique_ptr<AttentionBackend> make_cudnn_backend() { return std::make_unique<CudnnBackend>(); }

}  // namespace longattn::kernels

#else  // built without cuDNN or without the cudnn-frontend headers

namespace longattn::kernels {
bool cudnn_backend_available() { return false; }
std::unique_ptr<AttentionBackend> make_cudnn_backend() {
  throw Error(ErrorCode::unsupported,
              "this build has no cudnn backend (cuDNN or the cudnn-frontend headers were not found at configure "
              "time; run scripts/fetch-cudnn-frontend.sh and reconfigure)");
}
}  // namespace longattn::kernels

#endif
