// The varlen executor (varlen_attention.hpp): runs a BalancedBatch's plan on this rank. The rank's
// rows are its groups' rows one after another (the plan's runs order), so each group works on a
// contiguous slice of q, k, v, o and the gradients; lse [H, n] is sliced by columns through a
// scratch block. A one-rank group is one local varlen call (no communication); a group of several
// ranks is a ParallelAttention (zigzag ring, or the hybrid with the group's Ulysses size) over its
// sub-communicator. Every rank runs its groups in the plan's order, which is one global order, so
// the collective calls of overlapping groups cannot wait on each other in a cycle.
#include <algorithm>
#include <chrono>
#include <map>
#include <optional>

#include <fmt/ranges.h>

#include "common/check.hpp"
#include "longattn/parallel_attention.hpp"
#include "runtime/varlen_batch.hpp"
#include "runtime/varlen_borrowed_backend.hpp"

namespace longattn {

namespace {

using Clock = std::chrono::steady_clock;

// Rows [begin, begin + count) of a [rows, ...] tensor.
TensorView slice_rows(const TensorView& t, std::int64_t begin, std::int64_t count) {
  TensorView s = t;
  const auto row_bytes = static_cast<std::size_t>(t.numel() / std::max<std::int64_t>(t.dim(0), 1)) * dtype_size(t.dtype);
  if (s.data) s.data = static_cast<char*>(s.data) + static_cast<std::size_t>(begin) * row_bytes;
  s.shape[0] = count;
  return s;
}

std::string tensor_problem(const TensorView& t, const char* name, std::initializer_list<std::int64_t> dims,
                           std::initializer_list<DType> dtypes, const Device& device) {
  bool ok = t.ndim == static_cast<int>(dims.size()) && t.is_contiguous() &&
            std::find(dtypes.begin(), dtypes.end(), t.dtype) != dtypes.end() && (t.data != nullptr || t.numel() == 0) &&
            (t.device.kind == device.kind || t.numel() == 0);
  int i = 0;
  for (auto d : dims) ok = ok && t.ndim > i && t.dim(i++) == d;
  if (ok) return {};
  std::string types;
  for (DType d : dtypes) types += (types.empty() ? "" : " or ") + std::string(to_string(d));
  return fmt::format("{} must be a contiguous {}[{}] on {}, got {}", name, types, fmt::join(dims, ", "), to_string(device.kind),
                     t.describe());
}

}  // namespace

struct VarlenAttention::Impl {
  // One group this rank belongs to, and where its rows sit among the rank's.
  struct GroupRun {
    int group = 0;
    std::int64_t row_begin = 0, rows = 0;
    std::unique_ptr<ParallelAttention> parallel;  // several ranks
    // One rank: the group's batch, on the backend's device.
    std::vector<std::int32_t> cu_host;
    std::unique_ptr<DeviceBuffer> cu_device;
    int max_length = 0;
    std::unique_ptr<DeviceBuffer> lse_part;  // [H, rows] when the group holds only some of the rank's rows
    bool ring_intra = true, exchange_intra = true;  // whether this rank's sends stay inside its node
  };

  Communicator& comm;
  BalancedBatch batch;
  VarlenOptions options;
  std::unique_ptr<AttentionBackend> backend;
  std::map<int, std::unique_ptr<Communicator>> comm_of_size;
  std::vector<GroupRun> runs;
  std::int64_t local = 0;
  VarlenStats stats;

  Impl(Communicator& c, const BalancedBatch& b, VarlenOptions o, std::unique_ptr<AttentionBackend> be)
      : comm(c), batch(b), options(o), backend(be ? std::move(be) : make_backend("auto")) {
    const auto& request = batch.request();
    const auto& plan = batch.impl().plan;
    // Agreement first: everything below is collective, and a plan that differs between ranks would
    // pair the wrong ranks.
    require_same_on_all_ranks(comm, "varlen batch",
                              fmt::format("ranks {} balance {} heads {}/{} d {} {} {} cap {} groups {} lengths [{}]", plan.ranks,
                                          to_string(request.balance), request.q_heads, request.kv_heads, request.head_dim,
                                          to_string(request.dtype), request.causal ? "causal" : "full", request.cap_tokens,
                                          plan.groups.size(), fmt::join(request.lengths, ",")));
    LONGATTN_INVALID(comm.size() == plan.ranks, "the batch was planned for {} ranks but the communicator has {}: plan it for {}",
                     plan.ranks, comm.size(), comm.size());
    if (const auto why = batch.unexecutable_reason(); !why.empty()) throw Error(ErrorCode::invalid_argument, why);
    const int rank = comm.rank();
    local = batch.attention_tokens(rank);

    // Which node every rank is on, to say whether the bytes a rank sends stay inside its node.
    std::vector<std::int32_t> node(static_cast<std::size_t>(comm.size()));
    const std::int32_t my_node = comm.topology().node;
    comm.allgather(&my_node, node.data(), sizeof(std::int32_t));

    // One split per group size (groups of one size never overlap); ranks outside every group of
    // that size take part alone.
    std::map<int, std::vector<const partition::VarlenGroup*>> groups_of_size;
    for (const auto& g : plan.groups)
      if (g.size > 1) groups_of_size[g.size].push_back(&g);
    for (const auto& [size, groups] : groups_of_size) {
      int color = plan.ranks + rank, key = 0;
      for (const auto* g : groups)
        if (rank >= g->first_rank && rank < g->first_rank + g->size) {
          LONGATTN_REQUIRE(color >= plan.ranks, ErrorCode::internal, "rank {} is in two varlen groups of {} ranks", rank, size);
          color = g->first_rank;
          key = rank - g->first_rank;
        }
      comm_of_size[size] = comm.split(color, key);
    }

    std::int64_t row = 0;
    for (const int g : plan.groups_of_rank(rank)) {
      const auto& group = plan.groups[static_cast<std::size_t>(g)];
      const auto shards = plan.group_shard_plan(g);
      const int member = rank - group.first_rank;
      GroupRun run;
      run.group = g;
      run.row_begin = row;
      run.rows = shards.local_tokens(member);
      row += run.rows;
      if (group.size == 1) {
        run.cu_host = shards.cu_seqlens();
        for (std::size_t i = 1; i < run.cu_host.size(); ++i)
          run.max_length = std::max(run.max_length, run.cu_host[i] - run.cu_host[i - 1]);
        const auto bytes = run.cu_host.size() * sizeof(std::int32_t);
        run.cu_device = backend->device_ops().allocate(bytes);
        backend->device_ops().copy_bytes(run.cu_device->data(), run.cu_host.data(), bytes, options.stream);
        backend->device_ops().synchronize(options.stream);
      } else {
        AttentionProblem problem{shards.cu_seqlens(), request.q_heads, request.kv_heads, request.head_dim,
                                 request.dtype, request.causal, Layout::zigzag};
        ParallelOptions po;
        po.strategy = group.sharding == partition::Sharding::hybrid ? Strategy::hybrid : Strategy::ring;
        po.ulysses_size = group.sharding == partition::Sharding::hybrid ? group.ulysses : 0;
        po.ring.scale = options.scale;
        po.ring.stream = options.stream;
        po.ring.gradient_transport = options.gradient_transport;
        run.parallel = std::make_unique<ParallelAttention>(*comm_of_size.at(group.size), std::move(problem), po,
                                                           std::make_unique<runtime::BorrowedBackend>(*backend));
        const auto& got = run.parallel->shards();
        LONGATTN_REQUIRE(got.cu_seqlens() == shards.cu_seqlens() && got.layout() == shards.layout() &&
                             got.world() == shards.world() && got.group_size() == shards.group_size(),
                         ErrorCode::internal, "group {}: the strategy's shards differ from the plan's", g);
        const int U = run.parallel->ulysses_size(), R = group.size / U;
        const int successor = group.first_rank + ((member / U + 1) % R) * U + member % U;
        run.ring_intra = node[static_cast<std::size_t>(successor)] == my_node;
        for (int j = 0; j < U; ++j) run.exchange_intra &= node[static_cast<std::size_t>(group.first_rank + member / U * U + j)] == my_node;
      }
      if (run.rows != local && run.rows > 0)
        run.lse_part = backend->device_ops().allocate(static_cast<std::size_t>(request.q_heads * run.rows) * sizeof(float));
      runs.push_back(std::move(run));
    }
    LONGATTN_REQUIRE(row == local, ErrorCode::internal, "rank {}: the groups hold {} rows, the plan's runs {}", rank, row, local);
  }

  // One error on every rank when any rank's tensors do not fit its rows.
  void check(std::initializer_list<std::string> problems) {
    std::string first;
    for (const auto& p : problems)
      if (first.empty() && !p.empty()) first = p;
    refuse_on_every_rank_if_any(
        comm, first.empty() ? first
                            : fmt::format("{} (this rank holds {} tokens of the balanced batch: lay the inputs out in "
                                          "attention_runs order, e.g. with VarlenRemap)",
                                          first, local));
  }

  std::string qkv_problems(const TensorView& q, const TensorView& k, const TensorView& v) const {
    const auto& r = batch.request();
    const Device dev = backend->device();
    for (auto p : {tensor_problem(q, "q", {local, r.q_heads, r.head_dim}, {r.dtype}, dev),
                   tensor_problem(k, "k", {local, r.kv_heads, r.head_dim}, {r.dtype}, dev),
                   tensor_problem(v, "v", {local, r.kv_heads, r.head_dim}, {r.dtype}, dev)})
      if (!p.empty()) return p;
    return {};
  }

  // lse columns of a group: the rank's own tensor when the group holds all its rows, else scratch.
  TensorView lse_of(GroupRun& run, const TensorView& lse) const {
    if (!run.lse_part) return TensorView(run.rows ? lse.data : nullptr, DType::f32, {batch.request().q_heads, run.rows}, lse.device);
    return TensorView(run.lse_part->data(), DType::f32, {batch.request().q_heads, run.rows}, lse.device);
  }
  void copy_lse(GroupRun& run, const TensorView& lse, bool into_part) {
    if (!run.lse_part) return;
    const std::size_t width = static_cast<std::size_t>(run.rows) * sizeof(float);
    const std::size_t full = static_cast<std::size_t>(local) * sizeof(float);
    char* rank_lse = static_cast<char*>(lse.data) + static_cast<std::size_t>(run.row_begin) * sizeof(float);
    const auto heads = static_cast<std::size_t>(batch.request().q_heads);
    if (into_part)
      backend->device_ops().copy_2d(run.lse_part->data(), width, rank_lse, full, width, heads, options.stream);
    else
      backend->device_ops().copy_2d(rank_lse, full, run.lse_part->data(), width, width, heads, options.stream);
  }

  AttentionArgs local_args(const GroupRun& run, const TensorView& q, const TensorView& k, const TensorView& v) const {
    AttentionArgs a;
    a.q = q;
    a.k = k;
    a.v = v;
    a.cu_seqlens_q = a.cu_seqlens_k = static_cast<const std::int32_t*>(run.cu_device->data());
    a.batch = static_cast<int>(run.cu_host.size()) - 1;
    a.max_seqlen_q = a.max_seqlen_k = run.max_length;
    a.causal = batch.request().causal;
    a.scale = options.scale;
    a.stream = options.stream;
    return a;
  }

  void count_bytes(const GroupRun& run) {
    const auto& s = run.parallel->last_stats();
    (run.ring_intra ? stats.bytes_intra_node : stats.bytes_inter_node) += s.ring.bytes_sent;
    (run.exchange_intra ? stats.bytes_intra_node : stats.bytes_inter_node) += s.exchange_bytes_sent;
  }

  void forward(TensorView q, TensorView k, TensorView v, TensorView o, TensorView lse) {
    const auto start = Clock::now();
    const auto& r = batch.request();
    const Device dev = backend->device();
    check({qkv_problems(q, k, v), tensor_problem(o, "o", {local, r.q_heads, r.head_dim}, {r.dtype, DType::f32}, dev),
           tensor_problem(lse, "lse", {r.q_heads, local}, {DType::f32}, dev)});
    stats = {};
    for (auto& run : runs) {
      const auto qs = slice_rows(q, run.row_begin, run.rows), ks = slice_rows(k, run.row_begin, run.rows),
                 vs = slice_rows(v, run.row_begin, run.rows), os = slice_rows(o, run.row_begin, run.rows);
      const auto ls = lse_of(run, lse);
      if (run.parallel) {
        run.parallel->forward(qs, ks, vs, os, ls);
        count_bytes(run);
      } else if (run.rows > 0) {
        backend->forward(local_args(run, qs, ks, vs), {os, ls});
      }
      if (run.rows > 0) copy_lse(run, lse, false);
    }
    backend->device_ops().synchronize(options.stream);
    stats.wall_ms = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
  }

  void backward(TensorView q, TensorView k, TensorView v, TensorView o, TensorView lse, TensorView d_o, TensorView dq,
                TensorView dk, TensorView dv) {
    const auto start = Clock::now();
    const auto& r = batch.request();
    const Device dev = backend->device();
    const auto grad_types = {r.dtype, DType::f32};
    check({qkv_problems(q, k, v), tensor_problem(o, "o", {local, r.q_heads, r.head_dim}, grad_types, dev),
           tensor_problem(lse, "lse", {r.q_heads, local}, {DType::f32}, dev),
           tensor_problem(d_o, "d_o", {local, r.q_heads, r.head_dim}, grad_types, dev),
           tensor_problem(dq, "dq", {local, r.q_heads, r.head_dim}, grad_types, dev),
           tensor_problem(dk, "dk", {local, r.kv_heads, r.head_dim}, grad_types, dev),
           tensor_problem(dv, "dv", {local, r.kv_heads, r.head_dim}, grad_types, dev)});
    stats = {};
    for (auto& run : runs) {
      auto rows = [&](const TensorView& t) { return slice_rows(t, run.row_begin, run.rows); };
      if (run.rows > 0) copy_lse(run, lse, true);
      const auto ls = lse_of(run, lse);
      if (run.parallel) {
        run.parallel->backward(rows(q), rows(k), rows(v), rows(o), ls, rows(d_o), rows(dq), rows(dk), rows(dv));
        count_bytes(run);
      } else if (run.rows > 0) {
        backend->backward(local_args(run, rows(q), rows(k), rows(v)), {rows(o), ls, rows(d_o), {}, rows(dq), rows(dk), rows(dv), false});
      }
    }
    backend->device_ops().synchronize(options.stream);
    stats.wall_ms = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
  }
};

VarlenAttention::VarlenAttention(Communicator& comm, const BalancedBatch& batch, VarlenOptions options,
                                 std::unique_ptr<AttentionBackend> backend)
    : impl_(std::make_unique<Impl>(comm, batch, options, std::move(backend))) {}
VarlenAttention::~VarlenAttention() = default;
void VarlenAttention::forward(TensorView q, TensorView k, TensorView v, TensorView o, TensorView lse) {
  impl_->forward(q, k, v, o, lse);
}
void VarlenAttention::backward(TensorView q, TensorView k, TensorView v, TensorView o, TensorView lse, TensorView d_o,
                               TensorView dq, TensorView dk, TensorView dv) {
  impl_->backward(q, k, v, o, lse, d_o, dq, dk, dv);
}
const VarlenStats& VarlenAttention::last_stats() const noexcept { return impl_->stats; }
AttentionBackend& VarlenAttention::backend() noexcept { return *impl_->backend; }

}  // namespace longattn
