// BalancedBatch: a varlen batch planned over the ranks by the chosen balance (the cost-model
// planner or one of its baselines), and the views of the plan users need: each rank's tokens in
// both layouts, the groups, the modelled figures.
#include "runtime/varlen_batch.hpp"

#include <algorithm>

#include "common/check.hpp"
#include "partition/machine_file.hpp"

namespace longattn {

const char* to_string(Balance balance) noexcept {
  switch (balance) {
    case Balance::hierarchical: return "hierarchical";
    case Balance::per_sequence_zigzag: return "per-sequence-zigzag";
    case Balance::whole_sequences: return "whole-sequences";
    case Balance::flat_minheap: return "flat-minheap";
  }
  return "?";
}

Balance parse_balance(const std::string& name) {
  for (Balance b : {Balance::hierarchical, Balance::per_sequence_zigzag, Balance::whole_sequences, Balance::flat_minheap})
    if (name == to_string(b)) return b;
  throw Error(ErrorCode::invalid_argument,
              fmt::format("unknown balance '{}': use hierarchical, per-sequence-zigzag, whole-sequences or flat-minheap", name));
}

std::vector<std::int64_t> lengths_from_cu_seqlens(const std::vector<std::int32_t>& cu_seqlens) {
  return partition::lengths_from_cu_seqlens(cu_seqlens);
}

namespace {

partition::VarlenProblem problem_of(const BalanceRequest& r) {
  partition::VarlenProblem p;
  p.lengths = r.lengths;
  p.ranks = r.ranks;
  p.gpus_per_node = r.gpus_per_node;
  p.cap_tokens = r.cap_tokens;
  p.shape.query_heads = r.q_heads;
  p.shape.kv_heads = r.kv_heads;
  p.shape.head_dim = r.head_dim;
  p.shape.element_bytes = static_cast<int>(dtype_size(r.dtype));
  p.shape.causal = r.causal;
  return p;
}

partition::MachineModel machine_of(const BalanceRequest& r) {
  auto machine = partition::default_machine(r.machine);
  if (!r.machine_file.empty()) machine = partition::apply_machine_file(std::move(machine), partition::load_machine_file(r.machine_file));
  return machine;
}

partition::VarlenPlan make_plan(const BalanceRequest& r) {
  const auto problem = problem_of(r);
  partition::check_problem(problem);
  const auto machine = machine_of(r);
  switch (r.balance) {
    case Balance::hierarchical: return partition::plan_hierarchical(problem, machine);
    case Balance::per_sequence_zigzag: return partition::plan_per_sequence_zigzag(problem, machine);
    case Balance::whole_sequences: return partition::plan_whole_sequences(problem, machine);
    case Balance::flat_minheap:
      LONGATTN_INVALID(r.chunk_tokens >= 1, "the flat min-heap's chunk size must be positive, got {}", r.chunk_tokens);
      return partition::plan_flat_minheap(problem, machine, r.chunk_tokens);
  }
  throw Error(ErrorCode::internal, "unknown balance");
}

}  // namespace

BalancedBatch::BalancedBatch(const BalanceRequest& request) {
  auto impl = std::make_shared<Impl>();
  impl->request = request;
  impl->plan = make_plan(request);  // checks the request first: nothing else is built on bad input
  impl->cu_seqlens.push_back(0);
  for (const auto l : request.lengths) impl->cu_seqlens.push_back(impl->cu_seqlens.back() + static_cast<std::int32_t>(l));
  auto& m = impl->model;
  m.step_seconds = impl->plan.step_seconds();
  m.imbalance = impl->plan.imbalance();
  m.bytes_intra_node = impl->plan.bytes_intra_node;
  m.bytes_inter_node = impl->plan.bytes_inter_node;
  m.planner_ms = impl->plan.planner_ms;
  for (const auto& c : impl->plan.rank_costs) m.rank_seconds.push_back(c.total_seconds());
  impl_ = std::move(impl);
}

BalancedBatch::~BalancedBatch() = default;
BalancedBatch::BalancedBatch(const BalancedBatch&) = default;
BalancedBatch& BalancedBatch::operator=(const BalancedBatch&) = default;

const BalanceRequest& BalancedBatch::request() const noexcept { return impl_->request; }
int BalancedBatch::ranks() const noexcept { return impl_->plan.ranks; }
const std::vector<std::int32_t>& BalancedBatch::cu_seqlens() const noexcept { return impl_->cu_seqlens; }
std::int64_t BalancedBatch::total_tokens() const noexcept { return impl_->cu_seqlens.back(); }
const BalanceModel& BalancedBatch::model() const noexcept { return impl_->model; }

std::vector<TokenRun> BalancedBatch::attention_runs(int rank) const { return impl_->plan.runs(rank); }

std::int64_t BalancedBatch::attention_tokens(int rank) const {
  std::int64_t n = 0;
  for (const auto& run : attention_runs(rank)) n += run.count;
  return n;
}

std::int64_t BalancedBatch::linear_begin(int rank) const {
  LONGATTN_INVALID(rank >= 0 && rank <= ranks(), "rank {} is outside [0, {}]", rank, ranks());
  return total_tokens() * rank / ranks();
}

std::vector<BalancedGroup> BalancedBatch::groups() const {
  std::vector<BalancedGroup> out;
  for (const auto& g : impl_->plan.groups)
    out.push_back({g.first_rank, g.size, g.ulysses, partition::to_string(g.tier), partition::to_string(g.sharding), g.sequences});
  return out;
}

namespace {

// Query/key pairs the mask lets the runs' query rows see (their whole sequences are the keys).
double visible_pairs(const BalanceRequest& r, const std::vector<TokenRun>& runs) {
  double pairs = 0;
  for (const auto& run : runs) {
    const auto length = static_cast<double>(r.lengths[static_cast<std::size_t>(run.seq)]);
    const auto count = static_cast<double>(run.count);
    if (!r.causal) {
      pairs += count * length;
      continue;
    }
    // Query position p sees keys 0..p: the run's positions first, first + stride, ... summed.
    const double last = run.first + (count - 1) * run.stride;
    pairs += count * (run.first + last) / 2 + count;
  }
  return pairs;
}

}  // namespace

double BalancedBatch::attention_flops(int rank) const {
  const auto& r = request();
  const auto& plan = impl_->plan;
  double pairs = 0;
  for (const int g : plan.groups_of_rank(rank)) {
    const auto& group = plan.groups[static_cast<std::size_t>(g)];
    if (group.sharding == partition::Sharding::chunks) return 4.0 * r.head_dim * r.q_heads * visible_pairs(r, attention_runs(rank));
    const auto shards = plan.group_shard_plan(g);
    const int member = rank - group.first_rank;
    auto runs_of = [&](int m) {
      auto runs = shards.runs(m);
      for (auto& run : runs) run.seq = group.sequences[static_cast<std::size_t>(run.seq)];
      return runs;
    };
    if (group.sharding != partition::Sharding::hybrid) {
      pairs += visible_pairs(r, runs_of(member));
      continue;
    }
    // A hybrid member attends its Ulysses group's rows for 1 / ulysses of the heads.
    const int first = member / group.ulysses * group.ulysses;
    for (int m = first; m < first + group.ulysses; ++m) pairs += visible_pairs(r, runs_of(m)) / group.ulysses;
  }
  return 4.0 * r.head_dim * r.q_heads * pairs;
}

std::string BalancedBatch::unexecutable_reason() const {
  for (const auto& g : impl_->plan.groups)
    if (g.sharding == partition::Sharding::chunks)
      return "the flat-minheap balance is a modelled baseline only: its chunks fetch keys from their owners, which no "
             "executor here runs; its modelled step time, imbalance and bytes are printed by `longattn-bench balance`; run "
             "hierarchical, per-sequence-zigzag or whole-sequences";
  return {};
}

}  // namespace longattn
