// Ring attention forward and backward over any Communicator and AttentionBackend, executing the
// ring plan (partition/ring_plan.hpp): which shard each step computes against, the transfer that
// hides behind it, and the step's kernel calls (the causal classification is the plan's, not ours).
//
// Forward, on rank r with P ranks: at step s the rank holds the key/value shard of rank
// src = (r - s) mod P; it posts the receive of the next shard from r-1 and the send of the current
// one to r+1, runs the step's launches (ring_launches.hpp), merges (o, lse) by the LSE identity,
// then waits for the transfers (double buffer: compute on one, receive into the other).
//
// Backward: delta = rowsum(dO * O) once; dQ accumulates at home. dK/dV of a shard follow the shard:
// rank r at step s computes the gradient of shard src into a fresh buffer, adds the partial sum the
// previous rank computed for the same shard one step earlier, and passes it on; after P steps
// every shard's gradient arrives at its home rank.
#include <algorithm>
#include <chrono>
#include <limits>
#include <map>
#include <optional>
#include <vector>

#include "common/check.hpp"
#include "longattn/log.hpp"
#include "longattn/ring.hpp"
#include "partition/ring_plan.hpp"
#include "runtime/ring_launches.hpp"
#include "runtime/ring_workspace.hpp"

namespace longattn {
namespace {

using Clock = std::chrono::steady_clock;
double ms_since(Clock::time_point t) { return std::chrono::duration<double, std::milli>(Clock::now() - t).count(); }

enum Tag : int { kTagK = 11, kTagV = 12, kTagGrad = 13 };

using partition::MaskKind;
using runtime::Launch;

// Prefix sums of the tokens each sequence has in a rank's shard (batch + 1 entries).
std::vector<std::int32_t> local_cu_seqlens(const ShardPlan& plan, int rank) {
  std::vector<std::int32_t> cu(static_cast<std::size_t>(plan.batch()) + 1, 0);
  for (const auto& run : plan.runs(rank)) cu[static_cast<std::size_t>(run.seq) + 1] += static_cast<std::int32_t>(run.count);
  for (std::size_t b = 1; b < cu.size(); ++b) cu[b] += cu[b - 1];
  return cu;
}

// Positions of rank r's tokens in local order, spelled out from its runs.
std::vector<std::int32_t> positions_of(const ShardPlan& plan, int r) {
  std::vector<std::int32_t> pos;
  pos.reserve(static_cast<std::size_t>(plan.local_tokens(r)));
  for (const auto& run : plan.runs(r))
    for (std::int64_t i = 0; i < run.count; ++i) pos.push_back(static_cast<std::int32_t>(run.first + i * run.stride));
  return pos;
}

// Rows [begin, begin + count) of a [tokens, heads, dim] tensor.
TensorView rows_of(const TensorView& t, std::int64_t begin, std::int64_t count) {
  const auto row_bytes = static_cast<std::size_t>(t.dim(1) * t.dim(2)) * dtype_size(t.dtype);
  return TensorView(static_cast<char*>(t.data) + static_cast<std::size_t>(begin) * row_bytes, t.dtype,
                    {count, t.dim(1), t.dim(2)}, t.device);
}

TensorView view_of(DeviceBuffer& buf, DType t, std::initializer_list<std::int64_t> dims, Device dev) {
  TensorView v(buf.data(), t, dims, dev);
  LONGATTN_REQUIRE(v.bytes() <= buf.bytes(), ErrorCode::internal, "workspace too small for {}", v.describe());
  return v;
}

}  // namespace

struct RingAttention::Impl {
  Communicator& comm;
  ShardPlan plan;
  RingOptions opt;
  std::unique_ptr<AttentionBackend> backend;
  RingStats stats;
  int rank, world;

  // Workspaces, sized on first use and reused while shapes allow.
  struct Shape {
    int hq = 0, hkv = 0, d = 0;
    DType dtype = DType::f32;
    bool operator==(const Shape&) const = default;
  } shape;
  std::unique_ptr<DeviceBuffer> kv_buf[2];     // [k | v] of an incoming shard, input dtype
  // o_acc and the lse buffers f32; o_part (one step's partial output) in the input dtype: the
  // kernels compute it in f32 and round once, the merge widens it again, and 16-bit partials halve
  // the largest forward workspace (and cuDNN writes 16-bit outputs anyway).
  std::unique_ptr<DeviceBuffer> o_acc, o_part, lse_part;
  std::unique_ptr<DeviceBuffer> delta, dq_acc;  // f32
  // Travelling dK/dV (ring_workspace.hpp): grad_acc f32 (two alternating with an f32 transport, one
  // otherwise); grad_out the rounded copy sent on (16-bit transport only); grad_in the transport
  // dtype.
  std::unique_ptr<DeviceBuffer> grad_acc[2], grad_out, grad_in;
  std::unique_ptr<DeviceBuffer> lse_rows, delta_rows;  // f32 [H, rows] copies for row-range launches

  // This rank's part of the ring plan for the current head counts, with each step's launches and
  // their sequence offsets on the device: built once per shape, since a plan depends on the shards
  // and heads only.
  struct Schedule {
    int hq = 0, hkv = 0;
    partition::RankPlan plan;
    std::vector<std::vector<Launch>> launches;  // per step
    // Per step and launch: where its cu_q and cu_k start in `offsets` (int32 elements).
    std::vector<std::vector<std::pair<std::size_t, std::size_t>>> offsets_at;
    std::unique_ptr<DeviceBuffer> offsets;
  };
  std::optional<Schedule> schedule;
  // Positions for launches that pass them to the kernels: this rank's, and one buffer the current
  // step's key shard's are written into (built from its runs), so no rank holds every shard's.
  std::unique_ptr<DeviceBuffer> own_positions, key_positions;
  std::vector<std::int32_t> key_positions_host;

  Impl(Communicator& c, ShardPlan p, RingOptions o, std::unique_ptr<AttentionBackend> b)
      : comm(c), plan(std::move(p)), opt(std::move(o)), backend(std::move(b)), rank(c.rank()), world(c.size()) {
    if (!backend) backend = make_backend("auto");
    LONGATTN_INVALID(plan.world() == world, "the shard plan is for {} ranks but the communicator has {}", plan.world(), world);
    LONGATTN_INVALID(opt.gradient_transport == DType::f32 || opt.gradient_transport == DType::bf16,
                     "RingOptions::gradient_transport must be f32 or bf16, got {}", to_string(opt.gradient_transport));
    require_same_on_all_ranks(comm, "ring attention settings (layout, world, batch, tokens, causal, gradient transport)",
                              fmt::format("{} {} {} {} {} {}", to_string(plan.layout()), plan.world(), plan.batch(),
                                          plan.total_tokens(), opt.causal, to_string(opt.gradient_transport)));
  }

  std::unique_ptr<DeviceBuffer> upload(const void* src, std::size_t bytes) {
    auto buf = backend->device_ops().allocate(std::max<std::size_t>(bytes, 4));
    backend->device_ops().copy_bytes(buf->data(), src, bytes, opt.stream);
    return buf;
  }

  // The schedule for these head counts: the rank plan, its launches, and (only where some launch
  // passes positions) the position buffers.
  const Schedule& schedule_for(int hq, int hkv) {
    if (schedule && schedule->hq == hq && schedule->hkv == hkv) return *schedule;
    Schedule sch;
    sch.hq = hq;
    sch.hkv = hkv;
    sch.plan = partition::ring_rank_plan(plan, opt.causal, rank, hq, hkv);
    const auto own_cu = local_cu_seqlens(plan, rank);
    // Offsets shared by launches (a step's queries often split alike) are stored once.
    std::vector<std::int32_t> offsets;
    std::map<std::vector<std::int32_t>, std::size_t> stored;
    auto store = [&](const std::vector<std::int32_t>& cu) {
      const auto [it, added] = stored.try_emplace(cu, offsets.size());
      if (added) offsets.insert(offsets.end(), cu.begin(), cu.end());
      return it->second;
    };
    bool any_positions = false;
    int held = rank;  // the shard whose keys are in hand
    for (const auto& step : sch.plan.steps) {
      LONGATTN_REQUIRE(step.rows == partition::RowSpace::shards && step.all_to_all.empty() && step.key_shard == held,
                       ErrorCode::internal, "the ring executor got a step that is not a ring step over the shards");
      for (const auto& call : step.calls)
        LONGATTN_REQUIRE(call.heads.begin == 0 && call.heads.count == hq, ErrorCode::internal,
                         "the ring executor runs every head in each call");
      auto launches = runtime::group_into_launches(step.calls, own_cu);
      auto& at = sch.offsets_at.emplace_back();
      for (const auto& l : launches) {
        at.emplace_back(l.cu_q.empty() ? 0 : store(l.cu_q), l.cu_k.empty() ? 0 : store(l.cu_k));
        any_positions = any_positions || l.mask == MaskKind::positions;
      }
      sch.launches.push_back(std::move(launches));
      if (step.ring) held = step.ring->recv_shard;
    }
    if (!offsets.empty()) sch.offsets = upload(offsets.data(), offsets.size() * 4);
    if (any_positions && !own_positions) {
      const auto own = positions_of(plan, rank);
      own_positions = upload(own.data(), own.size() * 4);
      key_positions = backend->device_ops().allocate(static_cast<std::size_t>(std::max<std::int64_t>(plan.max_local_tokens(), 1)) * 4);
    }
    schedule = std::move(sch);
    return *schedule;
  }

  // Device positions of rank src's keys for this step: written into the one key buffer (stream
  // order keeps the previous step's kernels reading it before the copy). Null where no launch of
  // the step passes positions.
  const std::int32_t* step_key_positions(const std::vector<Launch>& launches, int src) {
    const bool needed = std::any_of(launches.begin(), launches.end(), [](const Launch& l) { return l.mask == MaskKind::positions; });
    if (!needed) return nullptr;
    if (src == rank) return static_cast<const std::int32_t*>(own_positions->data());
    key_positions_host = positions_of(plan, src);
    backend->device_ops().copy_bytes(key_positions->data(), key_positions_host.data(), key_positions_host.size() * 4, opt.stream);
    return static_cast<const std::int32_t*>(key_positions->data());
  }

  std::int64_t local() const { return plan.local_tokens(rank); }

  void ensure_workspaces(const Shape& s, bool for_backward) {
    const runtime::RingWorkspaceSizes size(local(), plan.max_local_tokens(), s.hq, s.hkv, s.d, s.dtype, opt.gradient_transport);
    auto need = [&](std::unique_ptr<DeviceBuffer>& b, std::size_t bytes) {
      if (!b || b->bytes() < bytes || !(shape == s)) b = backend->device_ops().allocate(bytes);
    };
    for (auto& b : kv_buf) need(b, size.kv_shard);
    need(o_acc, size.q_f32);
    need(o_part, size.q_input);
    need(lse_part, size.rows_f32);
    need(lse_rows, size.rows_f32);
    if (for_backward) {
      need(delta_rows, size.rows_f32);
      need(delta, size.rows_f32);
      need(dq_acc, size.q_f32);
      need(grad_acc[0], size.kv_grad);
      if (narrow_transport()) {
        need(grad_out, size.kv_grad_transport);
      } else {
        need(grad_acc[1], size.kv_grad);
      }
      need(grad_in, size.kv_grad_transport);
    }
    shape = s;
  }

  bool narrow_transport() const { return opt.gradient_transport != DType::f32; }

  Shape check_inputs(const TensorView& q, const TensorView& k, const TensorView& v) {
    LONGATTN_INVALID(q.ndim == 3 && k.ndim == 3 && v.ndim == 3, "ring attention takes q, k, v as [tokens, heads, dim], got {}, {}, {}",
                     q.describe(), k.describe(), v.describe());
    const auto n = local();
    LONGATTN_INVALID(q.dim(0) == n && k.dim(0) == n && v.dim(0) == n,
                     "rank {} holds {} tokens under the {} plan, but q/k/v have {}/{}/{} rows", rank, n,
                     to_string(plan.layout()), q.dim(0), k.dim(0), v.dim(0));
    Shape s{static_cast<int>(q.dim(1)), static_cast<int>(k.dim(1)), static_cast<int>(q.dim(2)), q.dtype};
    require_same_on_all_ranks(comm, "ring attention tensor shapes (heads, kv heads, head dim, dtype)",
                              fmt::format("{} {} {} {}", s.hq, s.hkv, s.d, to_string(s.dtype)));
    LONGATTN_INVALID(s.hkv >= 1 && s.hq % s.hkv == 0, "query heads ({}) must be a multiple of key/value heads ({})", s.hq, s.hkv);
    return s;
  }

  // The local attention arguments of one launch: rows of this rank's queries against rows of the
  // key/value shard in hand. Explicit positions cost the kernels their plain path (and cuDNN
  // cannot take them), so they go only to the launches the plan marks as needing them.
  AttentionArgs launch_args(const TensorView& q, const TensorView& k, const TensorView& v, const Launch& l,
                            std::pair<std::size_t, std::size_t> offsets_at, const std::int32_t* key_pos) const {
    AttentionArgs a;
    a.q = rows_of(q, l.q_begin, l.q_count);
    a.k = rows_of(k, l.k_begin, l.k_count);
    a.v = rows_of(v, l.k_begin, l.k_count);
    if (!l.cu_q.empty()) {
      const auto* offsets = static_cast<const std::int32_t*>(schedule->offsets->data());
      a.batch = l.batch();
      a.cu_seqlens_q = offsets + offsets_at.first;
      a.cu_seqlens_k = offsets + offsets_at.second;
    }
    a.max_seqlen_q = std::max(l.max_seqlen_q, 1);
    a.max_seqlen_k = std::max(l.max_seqlen_k, 1);
    a.causal = l.mask != MaskKind::none;
    if (l.mask == MaskKind::positions) {
      a.q_positions = static_cast<const std::int32_t*>(own_positions->data()) + l.q_begin;
      a.k_positions = key_pos + l.k_begin;
    }
    a.scale = opt.scale;
    a.stream = opt.stream;
    return a;
  }

  // Copies tokens [begin, begin + count) of every head of an [H, n] f32 tensor to or from a
  // packed [H, count] one.
  void copy_token_range(float* dst, std::size_t dst_cols, const float* src, std::size_t src_cols, std::size_t count,
                        int heads) {
    backend->device_ops().copy_2d(dst, dst_cols * 4, src, src_cols * 4, count * 4, static_cast<std::size_t>(heads), opt.stream);
  }

  // Views of the key/value halves of a travelling buffer holding rank src's shard.
  std::pair<TensorView, TensorView> kv_views(DeviceBuffer& buf, int src) const {
    const auto n = plan.local_tokens(src);
    const auto half = static_cast<std::size_t>(n) * static_cast<std::size_t>(shape.hkv) * static_cast<std::size_t>(shape.d) *
                      dtype_size(shape.dtype);
    const Device dev = backend->device();
    TensorView k(buf.data(), shape.dtype, {n, shape.hkv, shape.d}, dev);
    TensorView v(static_cast<char*>(buf.data()) + half, shape.dtype, {n, shape.hkv, shape.d}, dev);
    return {k, v};
  }

  // The operations of a step's ring transfer: the shard in hand goes on while the next arrives.
  void rotate_kv(std::vector<P2POp>& ops, const TensorView& k, const TensorView& v, DeviceBuffer& into,
                 const partition::RingTransfer& t) {
    auto [rk, rv] = kv_views(into, t.recv_shard);
    ops.push_back({P2POp::Kind::recv, rk.data, rk.bytes(), t.recv_from, kTagK});
    ops.push_back({P2POp::Kind::recv, rv.data, rv.bytes(), t.recv_from, kTagV});
    ops.push_back({P2POp::Kind::send, k.data, k.bytes(), t.send_to, kTagK});
    ops.push_back({P2POp::Kind::send, v.data, v.bytes(), t.send_to, kTagV});
    stats.bytes_sent += k.bytes() + v.bytes();
  }

  Request post(const std::vector<P2POp>& ops) { return ops.empty() ? nullptr : comm.post(ops, opt.stream); }

  void wait(Request& req) {
    if (!req) return;
    const auto t = Clock::now();
    req->wait();
    req.reset();
    stats.wait_ms += ms_since(t);
  }

  // Host-measured compute time is real only where the backend runs synchronously (CPU) or when
  // each step is synchronized on purpose (profile_steps).
  bool timing_steps() const { return backend->device().kind == DeviceKind::cpu || opt.profile_steps; }
  // Adds a step's local compute to the stats where it is measured (see timing_steps).
  void count_compute_since(Clock::time_point started) {
    if (!timing_steps()) return;
    backend->device_ops().synchronize(opt.stream);
    stats.compute_ms += ms_since(started);
  }

  // A step with no launch: the causal mask hid every key (an empty shard counts too, as it always
  // did under a causal mask; without one it computes nothing and is not called skipped).
  void count_if_skipped(const std::vector<Launch>& launches) {
    if (launches.empty() && opt.causal) ++stats.skipped_steps;
  }

  void forward(TensorView q, TensorView k, TensorView v, TensorView o, TensorView lse) {
    const auto t0 = Clock::now();
    stats = {};
    const Shape s = check_inputs(q, k, v);
    ensure_workspaces(s, false);
    const Schedule& sch = schedule_for(s.hq, s.hkv);
    const auto n = local();
    const Device dev = backend->device();
    LONGATTN_INVALID(lse.dtype == DType::f32 && lse.ndim == 2 && lse.dim(0) == s.hq && lse.dim(1) == n,
                     "lse must be fp32 [{}, {}], got {}", s.hq, n, lse.describe());
    TensorView oacc = view_of(*o_acc, DType::f32, {n, s.hq, s.d}, dev);
    backend->device_ops().fill(oacc, 0.0f, opt.stream);
    backend->device_ops().fill(lse, -std::numeric_limits<float>::infinity(), opt.stream);

    TensorView cur_k = k, cur_v = v;
    bool first = true;
    for (int step = 0; step < world; ++step) {
      const auto& plan_step = sch.plan.steps[static_cast<std::size_t>(step)];
      const auto& launches = sch.launches[static_cast<std::size_t>(step)];
      const int src = plan_step.key_shard;
      std::vector<P2POp> ops;
      if (plan_step.ring) rotate_kv(ops, cur_k, cur_v, *kv_buf[step % 2], *plan_step.ring);
      Request pending = post(ops);
      const auto tc = Clock::now();
      const std::int32_t* key_pos = step_key_positions(launches, src);
      for (std::size_t i = 0; i < launches.size(); ++i)
        forward_launch(launch_args(q, cur_k, cur_v, launches[i], sch.offsets_at[static_cast<std::size_t>(step)][i], key_pos),
                       launches[i], oacc, lse, first);
      count_if_skipped(launches);
      count_compute_since(tc);
      wait(pending);
      if (plan_step.ring) std::tie(cur_k, cur_v) = kv_views(*kv_buf[step % 2], plan_step.ring->recv_shard);
      ++stats.steps;
      logger(Subsystem::ring).debug("forward step {}/{} (kv of rank {}, {} launches)", step + 1, world, src, launches.size());
      if (opt.on_step) opt.on_step("forward", step + 1, world);
    }
    backend->device_ops().convert(o, oacc, opt.stream);
    finish();
    stats.wall_ms = ms_since(t0);
  }

  // Forward of one launch into the accumulator: written directly when it is the first result and
  // covers every query, else computed aside and merged into its rows (whose lse entries are
  // strided in [H, n], hence the copies).
  void forward_launch(const AttentionArgs& a, const Launch& l, const TensorView& oacc, const TensorView& lse, bool& first) {
    const auto n = local();
    const Device dev = backend->device();
    if (first && l.q_count == n) {
      backend->forward(a, {oacc, lse});
      first = false;
      return;
    }
    first = false;
    TensorView opart = view_of(*o_part, shape.dtype, {l.q_count, shape.hq, shape.d}, dev);
    TensorView lpart = view_of(*lse_part, DType::f32, {shape.hq, l.q_count}, dev);
    backend->forward(a, {opart, lpart});
    if (l.q_count == n) {
      backend->merge_into(oacc, lse, opart, lpart, opt.stream);
      return;
    }
    TensorView lrows = view_of(*lse_rows, DType::f32, {shape.hq, l.q_count}, dev);
    const auto cols = static_cast<std::size_t>(n), count = static_cast<std::size_t>(l.q_count);
    float* lse_at = lse.as<float>() + l.q_begin;
    copy_token_range(lrows.as<float>(), count, lse_at, cols, count, shape.hq);
    backend->merge_into(rows_of(oacc, l.q_begin, l.q_count), lrows, opart, lpart, opt.stream);
    copy_token_range(lse_at, cols, lrows.as<float>(), count, count, shape.hq);
  }

  // Backward of one launch: gradients of its query rows (dq) and key rows (dk, dv) accumulate.
  void backward_launch(const AttentionArgs& a, const Launch& l, const BackwardArgs& whole) {
    const auto n = local();
    const Device dev = backend->device();
    BackwardArgs g;
    g.o = rows_of(whole.o, l.q_begin, l.q_count);
    g.d_o = rows_of(whole.d_o, l.q_begin, l.q_count);
    g.dq = rows_of(whole.dq, l.q_begin, l.q_count);
    g.dk = rows_of(whole.dk, l.k_begin, l.k_count);
    g.dv = rows_of(whole.dv, l.k_begin, l.k_count);
    g.accumulate = true;
    if (l.q_count == n) {
      g.lse = whole.lse;
      g.delta = whole.delta;
    } else {
      const auto cols = static_cast<std::size_t>(n), count = static_cast<std::size_t>(l.q_count);
      g.lse = view_of(*lse_rows, DType::f32, {shape.hq, l.q_count}, dev);
      g.delta = view_of(*delta_rows, DType::f32, {shape.hq, l.q_count}, dev);
      copy_token_range(g.lse.as<float>(), count, whole.lse.as<const float>() + l.q_begin, cols, count, shape.hq);
      copy_token_range(g.delta.as<float>(), count, whole.delta.as<const float>() + l.q_begin, cols, count, shape.hq);
    }
    backend->backward(a, g);
  }

  // Waits for the device and the communicator, turning a stuck peer into an error.
  void finish() {
    comm.synchronize(opt.stream);
    backend->device_ops().synchronize(opt.stream);
  }

  // [dk | dv] of rank src's shard in a gradient buffer, in the given dtype.
  std::pair<TensorView, TensorView> grad_views(DeviceBuffer& buf, int src, DType dtype) const {
    const auto m = plan.local_tokens(src);
    const auto half = static_cast<std::size_t>(m) * static_cast<std::size_t>(shape.hkv) * static_cast<std::size_t>(shape.d) *
                      dtype_size(dtype);
    const Device dev = backend->device();
    TensorView gk(buf.data(), dtype, {m, shape.hkv, shape.d}, dev);
    TensorView gv(static_cast<char*>(buf.data()) + half, dtype, {m, shape.hkv, shape.d}, dev);
    return {gk, gv};
  }

  void backward(TensorView q, TensorView k, TensorView v, TensorView o, TensorView lse, TensorView d_o, TensorView dq,
                TensorView dk, TensorView dv) {
    const auto t0 = Clock::now();
    stats = {};
    const Shape s = check_inputs(q, k, v);
    ensure_workspaces(s, true);
    const Schedule& sch = schedule_for(s.hq, s.hkv);
    const auto n = local();
    const Device dev = backend->device();
    for (const auto* t : {&o, &d_o, &dq})
      LONGATTN_INVALID(t->ndim == 3 && t->dim(0) == n && t->dim(1) == s.hq && t->dim(2) == s.d,
                       "o, d_o and dq must be [{}, {}, {}], got {}", n, s.hq, s.d, t->describe());
    for (const auto* t : {&dk, &dv})
      LONGATTN_INVALID(t->ndim == 3 && t->dim(0) == n && t->dim(1) == s.hkv && t->dim(2) == s.d,
                       "dk and dv must be [{}, {}, {}], got {}", n, s.hkv, s.d, t->describe());

    TensorView delta_v = view_of(*delta, DType::f32, {s.hq, n}, dev);
    TensorView dq_v = view_of(*dq_acc, DType::f32, {n, s.hq, s.d}, dev);
    backend->compute_delta(o, d_o, delta_v, opt.stream);
    backend->device_ops().fill(dq_v, 0.0f, opt.stream);

    // Gradients travel the way the key/value shards do: to the next rank, from the previous one.
    const DType transport = opt.gradient_transport;
    const bool narrow = narrow_transport();
    const auto& ring_link = sch.plan.steps.front().ring;
    const int next = ring_link ? ring_link->send_to : rank, prev = ring_link ? ring_link->recv_from : rank;
    auto sent_bytes = [&](int src) { return 2 * grad_views(*grad_in, src, transport).first.bytes(); };

    // Step s posts one batch: the key/value shard for step s+1, the gradient this rank finished at
    // step s-1 (to the next rank) and the partial gradient of the shard it computes now (from the
    // previous rank, who computed it at its step s-1). Every rank posts the same sequence of
    // batches, so stream-ordered communicators cannot deadlock. A last batch brings each shard's
    // gradient home.
    TensorView cur_k = k, cur_v = v;
    int sent_src = -1;                // shard whose gradient goes out this step
    DeviceBuffer* outgoing = nullptr;  // and the buffer holding it (transport dtype)
    for (int step = 0; step < world; ++step) {
      const auto& plan_step = sch.plan.steps[static_cast<std::size_t>(step)];
      const auto& launches = sch.launches[static_cast<std::size_t>(step)];
      const int src = plan_step.key_shard;
      // One incoming buffer suffices: the batch that refills it is posted after this step's add_into
      // was queued, and stream order (or the host wait on CPUs) keeps them apart. The same holds
      // for the one 16-bit outgoing buffer: this step's rounding into it is queued after the wait
      // for the send that read it.
      DeviceBuffer& incoming = *grad_in;
      std::vector<P2POp> ops;
      if (plan_step.ring) rotate_kv(ops, cur_k, cur_v, *kv_buf[step % 2], *plan_step.ring);
      if (step > 0) {
        ops.push_back({P2POp::Kind::send, outgoing->data(), sent_bytes(sent_src), next, kTagGrad});
        ops.push_back({P2POp::Kind::recv, incoming.data(), sent_bytes(src), prev, kTagGrad});
        stats.bytes_sent += sent_bytes(sent_src);
      }
      Request pending = post(ops);

      // With an f32 transport the buffer computed into is the one sent on, so two alternate.
      DeviceBuffer& gbuf = *grad_acc[narrow ? 0 : step % 2];
      auto [gk, gv] = grad_views(gbuf, src, DType::f32);
      // dq accumulates across steps (accumulate); dk/dv of this step start from zero.
      backend->device_ops().fill(gk, 0.0f, opt.stream);
      backend->device_ops().fill(gv, 0.0f, opt.stream);
      const auto tc = Clock::now();
      const std::int32_t* key_pos = step_key_positions(launches, src);
      const BackwardArgs whole{o, lse, d_o, delta_v, dq_v, gk, gv, true};
      for (std::size_t i = 0; i < launches.size(); ++i)
        backward_launch(launch_args(q, cur_k, cur_v, launches[i], sch.offsets_at[static_cast<std::size_t>(step)][i], key_pos),
                        launches[i], whole);
      count_if_skipped(launches);
      count_compute_since(tc);
      wait(pending);
      if (step > 0) {
        auto [ik, iv] = grad_views(incoming, src, transport);
        backend->device_ops().add_into(gk, ik, opt.stream);
        backend->device_ops().add_into(gv, iv, opt.stream);
      }
      outgoing = &gbuf;
      if (narrow) {
        auto [ok, ov] = grad_views(*grad_out, src, transport);
        backend->device_ops().convert(ok, gk, opt.stream);
        backend->device_ops().convert(ov, gv, opt.stream);
        outgoing = grad_out.get();
      }
      sent_src = src;
      if (plan_step.ring) std::tie(cur_k, cur_v) = kv_views(*kv_buf[step % 2], plan_step.ring->recv_shard);
      ++stats.steps;
      logger(Subsystem::ring).debug("backward step {}/{} (kv of rank {}, {} launches)", step + 1, world, src, launches.size());
      if (opt.on_step) opt.on_step("backward", step + 1, world);
    }
    // After P steps our own shard's gradient comes home from the previous rank.
    TensorView hk, hv;
    if (world > 1) {
      DeviceBuffer& incoming = *grad_in;
      Request last = post({{P2POp::Kind::send, outgoing->data(), sent_bytes(sent_src), next, kTagGrad},
                           {P2POp::Kind::recv, incoming.data(), sent_bytes(rank), prev, kTagGrad}});
      stats.bytes_sent += sent_bytes(sent_src);
      wait(last);
      std::tie(hk, hv) = grad_views(incoming, rank, transport);
    } else {
      std::tie(hk, hv) = grad_views(*grad_acc[0], rank, DType::f32);
    }
    backend->device_ops().convert(dk, hk, opt.stream);
    backend->device_ops().convert(dv, hv, opt.stream);
    backend->device_ops().convert(dq, dq_v, opt.stream);
    finish();
    stats.wall_ms = ms_since(t0);
  }
};

RingAttention::RingAttention(Communicator& comm, ShardPlan plan, RingOptions options, std::unique_ptr<AttentionBackend> backend)
    : impl_(std::make_unique<Impl>(comm, std::move(plan), std::move(options), std::move(backend))) {}
RingAttention::~RingAttention() = default;

void RingAttention::forward(TensorView q, TensorView k, TensorView v, TensorView o, TensorView lse) {
  impl_->forward(q, k, v, o, lse);
}
void RingAttention::backward(TensorView q, TensorView k, TensorView v, TensorView o, TensorView lse, TensorView d_o,
                             TensorView dq, TensorView dk, TensorView dv) {
  impl_->backward(q, k, v, o, lse, d_o, dq, dk, dv);
}
std::size_t RingAttention::workspace_bytes(const ShardPlan& plan, int rank, int heads, int kv_heads, int head_dim, DType dtype,
                                           bool backward, DType gradient_transport) {
  return runtime::RingWorkspaceSizes(plan.local_tokens(rank), plan.max_local_tokens(), heads, kv_heads, head_dim, dtype,
                                     gradient_transport)
      .total(backward);
}
const RingStats& RingAttention::last_stats() const noexcept { return impl_->stats; }
AttentionBackend& RingAttention::backend() noexcept { return *impl_->backend; }
const ShardPlan& RingAttention::plan() const noexcept { return impl_->plan; }

}  // namespace longattn
