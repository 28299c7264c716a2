// The strategy front door (parallel_attention.hpp). Every strategy runs on a two-level ShardPlan
// with Ulysses groups of U consecutive ranks:
//   U = 1 (ring): RingAttention over the whole communicator on the one-level plan;
//   U > 1 (ulysses, hybrid): inside each group an all-to-all turns the members' sequence shards
//     into the group's rows for each member's heads (HeadExchange); RingAttention then runs over
//     the ring of the members with the same index in every group (R ranks, the group plan, one rank
//     for pure Ulysses: local attention), on the head shards; a last all-to-all brings o and lse
//     back. The backward exchanges its inputs the same way and sums the replicas' dK/dV.
#include "longattn/parallel_attention.hpp"

#include <algorithm>
#include <chrono>
#include <optional>

#include <fmt/ranges.h>

#include "common/check.hpp"
#include "partition/cost_model.hpp"
#include "partition/hybrid_plan.hpp"
#include "partition/ulysses_plan.hpp"
#include "runtime/head_exchange.hpp"
#include "runtime/strategy_choice.hpp"

namespace longattn {

const char* to_string(Strategy s) noexcept {
  switch (s) {
    case Strategy::ring: return "ring";
    case Strategy::ulysses: return "ulysses";
    case Strategy::hybrid: return "hybrid";
    case Strategy::automatic: return "auto";
  }
  return "?";
}

Strategy parse_strategy(const std::string& name) {
  for (Strategy s : {Strategy::ring, Strategy::ulysses, Strategy::hybrid, Strategy::automatic})
    if (name == to_string(s)) return s;
  throw Error(ErrorCode::invalid_argument, fmt::format("unknown strategy '{}': use ring, ulysses, hybrid or auto", name));
}

namespace {

using Clock = std::chrono::steady_clock;
double ms_since(Clock::time_point t) { return std::chrono::duration<double, std::milli>(Clock::now() - t).count(); }

std::string dtype_names(std::initializer_list<DType> dtypes) {
  std::string s;
  for (DType t : dtypes) s += (s.empty() ? "" : " or ") + std::string(to_string(t));
  return s;
}

// Empty when `t` is a contiguous tensor of these dims and one of these dtypes; else what is wrong.
std::string tensor_problem(const TensorView& t, const char* name, std::initializer_list<std::int64_t> dims,
                           std::initializer_list<DType> dtypes) {
  bool ok = t.ndim == static_cast<int>(dims.size()) && t.is_contiguous() &&
            std::find(dtypes.begin(), dtypes.end(), t.dtype) != dtypes.end() && (t.data != nullptr || t.numel() == 0);
  int i = 0;
  for (auto d : dims) ok = ok && t.ndim > i && t.dim(i++) == d;
  if (ok) return {};
  return fmt::format("{} must be a contiguous {}[{}], got {}", name, dtype_names(dtypes), fmt::join(dims, ", "), t.describe());
}

std::string first_problem(std::initializer_list<std::string> problems) {
  for (const auto& p : problems)
    if (!p.empty()) return p;
  return {};
}

// What every rank must have been given alike, spelled out for require_same_on_all_ranks; the batch
// last, since a disagreement shows each rank's first characters.
std::string describe_request(const AttentionProblem& p, const ParallelOptions& o) {
  return fmt::format("strategy {} ulysses_size {} heads {}/{} head_dim {} {} {} layout {} machine_file '{}' cu_seqlens [{}]",
                     to_string(o.strategy), o.ulysses_size, p.q_heads, p.kv_heads, p.head_dim, to_string(p.dtype),
                     p.causal ? "causal" : "full", to_string(p.layout), o.machine_file, fmt::join(p.cu_seqlens, ","));
}

}  // namespace

struct ParallelAttention::Impl {
  Communicator& comm;
  AttentionProblem problem;
  ParallelOptions options;
  Strategy strategy = Strategy::ring;
  int ulysses = 1;
  std::string reason;
  std::optional<ShardPlan> plan;
  std::unique_ptr<Communicator> group_comm, ring_comm;  // only for U > 1
  std::unique_ptr<RingAttention> ring;
  std::unique_ptr<runtime::HeadExchange> exchange;
  std::vector<partition::HeadRange> q_heads, kv_heads;  // per member of a group
  runtime::GroupRows group_rows;
  // Head-side tensors of this member, grown on demand.
  std::unique_ptr<DeviceBuffer> q_h, k_h, v_h, o_h, lse_h, do_h, dq_h, dk_h, dv_h, dk_sum, dv_sum;
  ParallelStats stats;

  Impl(Communicator& c, AttentionProblem p, ParallelOptions o, std::unique_ptr<AttentionBackend> backend)
      : comm(c), problem(std::move(p)), options(std::move(o)) {
    if (!backend) backend = make_backend("auto");
    // Agreement first: everything below (the topology, the choice, the splits) is collective.
    require_same_on_all_ranks(comm, "parallel attention problem and options", describe_request(problem, options));
    LONGATTN_INVALID(problem.q_heads >= 1 && problem.kv_heads >= 1 && problem.q_heads % problem.kv_heads == 0,
                     "query heads ({}) must be a positive multiple of key/value heads ({})", problem.q_heads, problem.kv_heads);
    LONGATTN_INVALID(problem.head_dim >= 1, "head_dim must be positive, got {}", problem.head_dim);
    LONGATTN_INVALID(problem.cu_seqlens.size() >= 2, "cu_seqlens needs batch + 1 >= 2 entries, got {}", problem.cu_seqlens.size());
    choose(backend->device().kind);
    plan.emplace(problem.cu_seqlens, problem.layout, comm.size(), ulysses);

    RingOptions ring_options = options.ring;
    ring_options.causal = problem.causal;
    if (ulysses == 1) {
      ring = std::make_unique<RingAttention>(comm, *plan, ring_options, std::move(backend));
      return;
    }
    const int rank = comm.rank();
    group_comm = comm.split(rank / ulysses, rank % ulysses);
    ring_comm = comm.split(rank % ulysses, rank / ulysses);
    ring = std::make_unique<RingAttention>(*ring_comm, plan->group_plan(), ring_options, std::move(backend));
    const int first = rank / ulysses * ulysses;
    for (int j = 0; j < ulysses; ++j) {
      q_heads.push_back(partition::ulysses_q_heads(problem.q_heads, ulysses, j));
      kv_heads.push_back(partition::ulysses_kv_heads(problem.q_heads, problem.kv_heads, ulysses, j));
      group_rows.rows.push_back(plan->local_tokens(first + j));
      group_rows.row_begin.push_back(plan->group_row_begin(first + j));
    }
    group_rows.total = group_rows.row_begin.back() + group_rows.rows.back();
    exchange = std::make_unique<runtime::HeadExchange>(*group_comm, ring->backend().device_ops(), group_rows);
  }

  // Sets strategy, ulysses and reason from the request (the same on every rank, checked).
  void choose(DeviceKind device) {
    const int P = comm.size();
    strategy = options.strategy;
    switch (options.strategy) {
      case Strategy::ring:
        ulysses = 1;
        reason = "ring requested: one ring over all ranks";
        break;
      case Strategy::ulysses:
        ulysses = P;
        reason = fmt::format("ulysses requested: one group of all {} ranks", P);
        break;
      case Strategy::hybrid: {
        LONGATTN_INVALID(options.ulysses_size >= 0, "the Ulysses size must be positive, or 0 for the ranks of one node; got {}",
                         options.ulysses_size);
        ulysses = options.ulysses_size > 0 ? options.ulysses_size : comm.topology().local_size;
        if (options.ulysses_size == 0) {
          std::int64_t lo = ulysses, hi = ulysses;
          comm.allreduce(&lo, 1, ReduceType::i64, ReduceOp::min);
          comm.allreduce(&hi, 1, ReduceType::i64, ReduceOp::max);
          LONGATTN_INVALID(lo == hi,
                           "hybrid with Ulysses size 0 takes the ranks of one node, but the nodes hold between {} and {} ranks: "
                           "give the Ulysses size explicitly",
                           lo, hi);
        }
        reason = fmt::format("hybrid requested: Ulysses groups of {} ranks{}, a ring of {} groups", ulysses,
                             options.ulysses_size == 0 ? " (one node)" : "", P % ulysses == 0 ? P / ulysses : 0);
        break;
      }
      case Strategy::automatic: {
        const auto chosen = runtime::choose_strategy(comm, problem, options, device);
        LONGATTN_REQUIRE(chosen.strategy != Strategy::automatic, ErrorCode::internal, "the automatic choice returned 'auto'");
        strategy = chosen.strategy;
        ulysses = chosen.strategy == Strategy::ring ? 1 : chosen.strategy == Strategy::ulysses ? P : chosen.ulysses_size;
        reason = chosen.reason;
        break;
      }
    }
    const partition::AttentionShape shape{.seq_len = problem.cu_seqlens.back(),
                                          .query_heads = problem.q_heads,
                                          .kv_heads = problem.kv_heads,
                                          .head_dim = problem.head_dim,
                                          .causal = problem.causal};
    const partition::NodeLayout layout{.ranks = P, .gpus_per_node = std::max(1, ulysses)};
    if (const auto why = partition::hybrid_unsupported_reason(shape, layout, ulysses); !why.empty())
      throw Error(ErrorCode::invalid_argument,
                  fmt::format("the {} strategy cannot run {} query / {} kv heads on {} ranks: {}; Ulysses sizes that can: {} "
                              "(run hybrid with one of them as the Ulysses size, --ulysses-size in ring_attention, or ring)",
                              to_string(strategy), problem.q_heads, problem.kv_heads, P, why,
                              partition::valid_hybrid_group_sizes(problem.q_heads, problem.kv_heads, P)));
  }

  std::int64_t local() const { return plan->local_tokens(comm.rank()); }

  // Local checks of the sequence-side tensors, agreed on by every rank before any exchange.
  void check_forward(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& o, const TensorView& lse) {
    const auto n = local();
    const auto Hq = problem.q_heads, Hkv = problem.kv_heads, D = problem.head_dim;
    const DType t = problem.dtype;
    const auto problem_text = first_problem({tensor_problem(q, "q", {n, Hq, D}, {t}), tensor_problem(k, "k", {n, Hkv, D}, {t}),
                                             tensor_problem(v, "v", {n, Hkv, D}, {t}),
                                             tensor_problem(o, "o", {n, Hq, D}, {t, DType::f32}),
                                             tensor_problem(lse, "lse", {Hq, n}, {DType::f32})});
    refuse_on_every_rank_if_any(
        comm, problem_text.empty()
                  ? problem_text
                  : fmt::format("{} (this rank holds {} tokens under the {} strategy: shard the inputs with shards())", problem_text,
                                n, to_string(strategy)));
  }

  void check_backward(const TensorView& d_o, const TensorView& dq, const TensorView& dk, const TensorView& dv) {
    const auto n = local();
    const auto Hq = problem.q_heads, Hkv = problem.kv_heads, D = problem.head_dim;
    const DType t = problem.dtype;
    refuse_on_every_rank_if_any(
        comm, first_problem({tensor_problem(d_o, "d_o", {n, Hq, D}, {t, DType::f32}),
                             tensor_problem(dq, "dq", {n, Hq, D}, {t, DType::f32}),
                             tensor_problem(dk, "dk", {n, Hkv, D}, {t, DType::f32}),
                             tensor_problem(dv, "dv", {n, Hkv, D}, {t, DType::f32})}));
  }

  DeviceOps& ops() { return ring->backend().device_ops(); }
  void* stream() const { return options.ring.stream; }

  // A head-side [group rows, heads, dim] (or [heads, group rows] for lse) view over `buf`.
  TensorView head_side(std::unique_ptr<DeviceBuffer>& buf, DType t, int heads, bool lse_shaped = false) {
    const auto rows = group_rows.total;
    TensorView v(nullptr, t, {rows, heads, problem.head_dim}, ring->backend().device());
    if (lse_shaped) v = TensorView(nullptr, t, {heads, rows}, ring->backend().device());
    if (!buf || buf->bytes() < v.bytes()) buf = ops().allocate(std::max<std::size_t>(v.bytes(), 64));
    v.data = buf->data();
    return v;
  }
  int my_q_heads() const { return q_heads[static_cast<std::size_t>(group_comm->rank())].count; }
  int my_kv_heads() const { return kv_heads[static_cast<std::size_t>(group_comm->rank())].count; }

  // Waits for the device and the group's exchanges (a stuck peer becomes an error, as in the ring).
  void finish_exchanges() {
    group_comm->synchronize(stream());
    ops().synchronize(stream());
  }

  void finish_stats(Clock::time_point t0) {
    stats.ring = ring->last_stats();
    if (exchange) {
      stats.exchange_ms = exchange->exchange_ms();
      stats.exchange_bytes_sent = exchange->bytes_sent();
    }
    stats.wall_ms = ms_since(t0);
  }

  void forward(TensorView q, TensorView k, TensorView v, TensorView o, TensorView lse) {
    const auto t0 = Clock::now();
    stats = {};
    check_forward(q, k, v, o, lse);
    if (ulysses == 1) {
      ring->forward(q, k, v, o, lse);
      finish_stats(t0);
      return;
    }
    exchange->reset_stats();
    const TensorView qh = head_side(q_h, q.dtype, my_q_heads()), kh = head_side(k_h, k.dtype, my_kv_heads()),
                     vh = head_side(v_h, v.dtype, my_kv_heads()), oh = head_side(o_h, o.dtype, my_q_heads()),
                     lh = head_side(lse_h, DType::f32, my_q_heads(), true);
    exchange->to_heads(q, q_heads, qh, stream());
    exchange->to_heads(k, kv_heads, kh, stream());
    exchange->to_heads(v, kv_heads, vh, stream());
    ring->forward(qh, kh, vh, oh, lh);
    exchange->to_sequence(oh, q_heads, o, stream());
    exchange->lse_to_sequence(lh, q_heads, lse, stream());
    finish_exchanges();
    finish_stats(t0);
  }

  void backward(TensorView q, TensorView k, TensorView v, TensorView o, TensorView lse, TensorView d_o, TensorView dq,
                TensorView dk, TensorView dv) {
    const auto t0 = Clock::now();
    stats = {};
    check_forward(q, k, v, o, lse);
    check_backward(d_o, dq, dk, dv);
    if (ulysses == 1) {
      ring->backward(q, k, v, o, lse, d_o, dq, dk, dv);
      finish_stats(t0);
      return;
    }
    exchange->reset_stats();
    const int hq = my_q_heads(), hkv = my_kv_heads();
    const TensorView qh = head_side(q_h, q.dtype, hq), kh = head_side(k_h, k.dtype, hkv), vh = head_side(v_h, v.dtype, hkv),
                     oh = head_side(o_h, o.dtype, hq), lh = head_side(lse_h, DType::f32, hq, true),
                     doh = head_side(do_h, d_o.dtype, hq), dqh = head_side(dq_h, dq.dtype, hq),
                     dkh = head_side(dk_h, DType::f32, hkv), dvh = head_side(dv_h, DType::f32, hkv);
    exchange->to_heads(q, q_heads, qh, stream());
    exchange->to_heads(k, kv_heads, kh, stream());
    exchange->to_heads(v, kv_heads, vh, stream());
    exchange->to_heads(o, q_heads, oh, stream());
    exchange->to_heads(d_o, q_heads, doh, stream());
    exchange->lse_to_heads(lse, q_heads, lh, stream());
    ring->backward(qh, kh, vh, oh, lh, doh, dqh, dkh, dvh);
    exchange->to_sequence(dqh, q_heads, dq, stream());
    // Every member that read a kv head holds a partial dK/dV of it (from its own query heads):
    // the home rank of a token sums them, in fp32, before the one rounding to dk's dtype.
    for (auto [head, out, sum] : {std::tuple{dkh, dk, &dk_sum}, std::tuple{dvh, dv, &dv_sum}}) {
      if (out.dtype == DType::f32) {
        exchange->to_sequence_summed(head, kv_heads, out, stream());
        continue;
      }
      TensorView acc(nullptr, DType::f32, {out.dim(0), out.dim(1), out.dim(2)}, out.device);
      if (!*sum || (*sum)->bytes() < acc.bytes()) *sum = ops().allocate(std::max<std::size_t>(acc.bytes(), 64));
      acc.data = (*sum)->data();
      exchange->to_sequence_summed(head, kv_heads, acc, stream());
      ops().convert(out, acc, stream());
    }
    finish_exchanges();
    finish_stats(t0);
  }
};

ParallelAttention::ParallelAttention(Communicator& comm, AttentionProblem problem, ParallelOptions options,
                                     std::unique_ptr<AttentionBackend> backend)
    : impl_(std::make_unique<Impl>(comm, std::move(problem), std::move(options), std::move(backend))) {}
ParallelAttention::~ParallelAttention() = default;

const ShardPlan& ParallelAttention::shards() const noexcept { return *impl_->plan; }
Strategy ParallelAttention::strategy() const noexcept { return impl_->strategy; }
int ParallelAttention::ulysses_size() const noexcept { return impl_->ulysses; }
const std::string& ParallelAttention::choice_reason() const noexcept { return impl_->reason; }

void ParallelAttention::forward(TensorView q, TensorView k, TensorView v, TensorView o, TensorView lse) {
  impl_->forward(q, k, v, o, lse);
}
void ParallelAttention::backward(TensorView q, TensorView k, TensorView v, TensorView o, TensorView lse, TensorView d_o,
                                 TensorView dq, TensorView dk, TensorView dv) {
  impl_->backward(q, k, v, o, lse, d_o, dq, dk, dv);
}

const ParallelStats& ParallelAttention::last_stats() const noexcept { return impl_->stats; }
AttentionBackend& ParallelAttention::backend() noexcept { return impl_->ring->backend(); }

}  // namespace longattn
