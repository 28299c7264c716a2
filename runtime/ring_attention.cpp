// Ring attention forward and backward over any Communicator and AttentionBackend.
//
// Forward, on rank r with P ranks: at step s the rank holds the key/value shard of rank
// src = (r - s) mod P; it posts the receive of the next shard from r-1 and the send of the current
// one to r+1, computes its queries against the current shard, merges (o, lse) by the LSE identity,
// then waits for the transfers (double buffer: compute on one, receive into the other).
//
// Backward: delta = rowsum(dO * O) once; dQ accumulates at home. dK/dV of a shard follow the shard:
// rank r at step s computes the gradient of shard src into a fresh buffer, adds the partial sum the
// previous rank computed for the same shard one step earlier, and passes it on; after P steps
// every shard's gradient arrives at its home rank.
#include <algorithm>
#include <chrono>
#include <limits>
#include <span>
#include <vector>

#include <optional>

#include "common/check.hpp"
#include "longattn/log.hpp"
#include "longattn/ring.hpp"
#include "partition/step_blocks.hpp"

namespace longattn {
namespace {

using Clock = std::chrono::steady_clock;
double ms_since(Clock::time_point t) { return std::chrono::duration<double, std::milli>(Clock::now() - t).count(); }

enum Tag : int { kTagK = 11, kTagV = 12, kTagGrad = 13 };

// What every rank knows about every rank's shard, without any data and without anything per token:
// sizes, sequence boundaries, the position range per sequence (to skip steps the causal mask
// hides), and the runs that give the positions where a step needs them.
struct ShardMeta {
  std::int64_t tokens = 0;
  std::vector<TokenRun> runs;                // ShardPlan::runs: a few per sequence
  std::vector<std::int32_t> cu_seqlens_host;  // int32 [batch + 1]
  std::unique_ptr<DeviceBuffer> cu_seqlens;  // the same on the backend's device
  std::vector<std::int32_t> min_pos, max_pos;  // per sequence; empty sequence => min > max
  int max_len = 1;  // longest local piece of a sequence: the kernels' grid hint (avoids a readback)
  // Positions are just the index inside each sequence (one rank, or a contiguous first shard):
  // then the kernels get no position arrays and take their plain causal path.
  bool identity_positions = false;
};

ShardMeta describe_shard(std::vector<TokenRun> runs, int batch) {
  ShardMeta m;
  const auto nb = static_cast<std::size_t>(batch);
  m.cu_seqlens_host.assign(nb + 1, 0);
  m.min_pos.assign(nb, std::numeric_limits<std::int32_t>::max());
  m.max_pos.assign(nb, -1);
  m.identity_positions = true;
  for (const auto& r : runs) {
    const auto seq = static_cast<std::size_t>(r.seq);
    const auto held = m.cu_seqlens_host[seq + 1];  // tokens of this sequence before the run
    m.tokens += r.count;
    m.cu_seqlens_host[seq + 1] += static_cast<std::int32_t>(r.count);
    m.min_pos[seq] = std::min(m.min_pos[seq], r.first);
    m.max_pos[seq] = std::max(m.max_pos[seq], static_cast<std::int32_t>(r.first + (r.count - 1) * r.stride));
    if (r.first != held || (r.count > 1 && r.stride != 1)) m.identity_positions = false;
  }
  for (std::size_t b = 0; b < nb; ++b) {
    m.max_len = std::max(m.max_len, m.cu_seqlens_host[b + 1]);
    m.cu_seqlens_host[b + 1] += m.cu_seqlens_host[b];
  }
  m.runs = std::move(runs);
  return m;
}

// Rows [begin, begin + count) of a [tokens, heads, dim] tensor.
TensorView rows_of(const TensorView& t, std::int64_t begin, std::int64_t count) {
  const auto row_bytes = static_cast<std::size_t>(t.dim(1) * t.dim(2)) * dtype_size(t.dtype);
  return TensorView(static_cast<char*>(t.data) + static_cast<std::size_t>(begin) * row_bytes, t.dtype,
                    {count, t.dim(1), t.dim(2)}, t.device);
}

// Bytes of each workspace a rank holding n tokens allocates when the fullest rank holds n_max (a
// travelling shard must fit the largest one). ensure_workspaces allocates exactly these, and
// RingAttention::workspace_bytes adds them up, so a job can check a run fits before building it.
struct WorkspaceSizes {
  std::size_t kv_shard, kv_grad, q_f32, q_input, rows_f32;
  WorkspaceSizes(std::int64_t n, std::int64_t n_max, int hq, int hkv, int d, DType dtype) {
    const auto kv_elems = static_cast<std::size_t>(n_max) * static_cast<std::size_t>(hkv) * static_cast<std::size_t>(d);
    const auto q_elems = static_cast<std::size_t>(n) * static_cast<std::size_t>(hq) * static_cast<std::size_t>(d);
    auto at_least = [](std::size_t bytes) { return std::max<std::size_t>(bytes, 64); };
    kv_shard = at_least(2 * kv_elems * dtype_size(dtype));  // [k | v]
    kv_grad = at_least(2 * kv_elems * 4);                   // [dk | dv] in f32
    q_f32 = at_least(q_elems * 4);
    q_input = at_least(q_elems * dtype_size(dtype));
    rows_f32 = at_least(static_cast<std::size_t>(n) * static_cast<std::size_t>(hq) * 4);
  }
  std::size_t total(bool backward) const {
    const std::size_t forward = 2 * kv_shard + q_f32 + q_input + 2 * rows_f32;
    return backward ? forward + 2 * rows_f32 + q_f32 + 3 * kv_grad : forward;
  }
};

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
  std::vector<ShardMeta> meta;
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
  std::unique_ptr<DeviceBuffer> delta, dq_acc, grad_buf[2], grad_in;  // f32
  std::unique_ptr<DeviceBuffer> lse_rows, delta_rows;  // f32 [H, rows] copies for row-range blocks
  // Causal single-sequence plans: each step as plain blocks (partition/step_blocks.hpp), by source
  // rank; nullopt where the positions need passing.
  std::vector<std::optional<std::vector<partition::StepBlock>>> blocks;
  // Positions for steps that pass them to the kernels: this rank's, and one buffer the current
  // step's key shard's are written into (built from its runs), so no rank holds every shard's.
  std::unique_ptr<DeviceBuffer> own_positions, key_positions;
  std::vector<std::int32_t> key_positions_host;

  Impl(Communicator& c, ShardPlan p, RingOptions o, std::unique_ptr<AttentionBackend> b)
      : comm(c), plan(std::move(p)), opt(std::move(o)), backend(std::move(b)), rank(c.rank()), world(c.size()) {
    if (!backend) backend = make_backend("auto");
    LONGATTN_INVALID(plan.world() == world, "the shard plan is for {} ranks but the communicator has {}", plan.world(), world);
    require_same_on_all_ranks(comm, "ring attention settings (layout, world, batch, tokens, causal)",
                              fmt::format("{} {} {} {} {}", to_string(plan.layout()), plan.world(), plan.batch(),
                                          plan.total_tokens(), opt.causal));
    meta.reserve(static_cast<std::size_t>(world));
    for (int r = 0; r < world; ++r) {
      meta.push_back(describe_shard(plan.runs(r), plan.batch()));
      auto& m = meta.back();
      m.cu_seqlens = upload(m.cu_seqlens_host.data(), m.cu_seqlens_host.size() * 4);
    }
    blocks.resize(static_cast<std::size_t>(world));
    if (opt.causal && plan.batch() == 1)
      for (int r = 0; r < world; ++r)
        blocks[static_cast<std::size_t>(r)] = partition::causal_step_blocks(std::span<const TokenRun>(of(rank).runs),
                                                                            std::span<const TokenRun>(of(r).runs));
    // Position arrays go to the device only when some step passes them to the kernels (causal
    // steps not cut into plain blocks, see step_args); a single-sequence ring passes none.
    bool any = false;
    for (int r = 0; r < world; ++r) any = any || passes_positions(r);
    if (any) {
      const auto own = positions_of(rank);
      own_positions = upload(own.data(), own.size() * 4);
      key_positions = backend->device_ops().allocate(static_cast<std::size_t>(std::max<std::int64_t>(plan.max_local_tokens(), 1)) * 4);
    }
  }

  // Positions of rank r's tokens in local order, spelled out from its runs.
  std::vector<std::int32_t> positions_of(int r) const {
    std::vector<std::int32_t> pos;
    pos.reserve(static_cast<std::size_t>(of(r).tokens));
    for (const auto& run : of(r).runs)
      for (std::int64_t i = 0; i < run.count; ++i) pos.push_back(static_cast<std::int32_t>(run.first + i * run.stride));
    return pos;
  }

  // Device positions of rank src's keys for this step: written into the one key buffer (stream
  // order keeps the previous step's kernels reading it before the copy).
  const std::int32_t* key_positions_of(int src) {
    if (src == rank) return static_cast<const std::int32_t*>(own_positions->data());
    key_positions_host = positions_of(src);
    backend->device_ops().copy_bytes(key_positions->data(), key_positions_host.data(), key_positions_host.size() * 4, opt.stream);
    return static_cast<const std::int32_t*>(key_positions->data());
  }

  // Whether the step that computes against rank src's shard hands positions to the kernels.
  bool passes_positions(int src) const {
    const auto& a = meta[static_cast<std::size_t>(rank)];
    const auto& b = meta[static_cast<std::size_t>(src)];
    const auto& plain = blocks[static_cast<std::size_t>(src)];
    return opt.causal && src != rank && !(plain && !plain->empty()) && !(a.identity_positions && b.identity_positions);
  }

  std::unique_ptr<DeviceBuffer> upload(const void* src, std::size_t bytes) {
    auto buf = backend->device_ops().allocate(std::max<std::size_t>(bytes, 4));
    backend->device_ops().copy_bytes(buf->data(), src, bytes, opt.stream);
    return buf;
  }

  const ShardMeta& of(int r) const { return meta[static_cast<std::size_t>(r)]; }
  std::int64_t local() const { return of(rank).tokens; }

  // True when some query of this rank may see some key of rank src (always without a causal mask).
  bool has_work(int src) const {
    if (!opt.causal) return true;
    if (const auto& b = blocks[static_cast<std::size_t>(src)]) return !b->empty();
    for (int b = 0; b < plan.batch(); ++b) {
      const auto ub = static_cast<std::size_t>(b);
      if (of(src).min_pos[ub] <= of(rank).max_pos[ub]) return true;
    }
    return false;
  }

  // True when every key of rank src precedes (or equals) every query of this rank, sequence by
  // sequence: the causal mask hides nothing.
  bool fully_visible(int src) const {
    for (int b = 0; b < plan.batch(); ++b) {
      const auto ub = static_cast<std::size_t>(b);
      const bool empty = of(src).min_pos[ub] > of(src).max_pos[ub] || of(rank).min_pos[ub] > of(rank).max_pos[ub];
      if (!empty && of(src).max_pos[ub] > of(rank).min_pos[ub]) return false;
    }
    return true;
  }

  void ensure_workspaces(const Shape& s, bool for_backward) {
    const WorkspaceSizes size(local(), plan.max_local_tokens(), s.hq, s.hkv, s.d, s.dtype);
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
      for (auto& b : grad_buf) need(b, size.kv_grad);
      need(grad_in, size.kv_grad);
    }
    shape = s;
  }

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
    return s;
  }

  // Local attention arguments: this rank's queries against the given key/value shard of rank src.
  AttentionArgs step_args(const TensorView& q, const TensorView& k, const TensorView& v, int src) {
    AttentionArgs a;
    a.q = q;
    a.k = k;
    a.v = v;
    a.batch = plan.batch();
    if (a.batch > 1) {  // one sequence needs no boundaries
      a.cu_seqlens_q = static_cast<const std::int32_t*>(of(rank).cu_seqlens->data());
      a.cu_seqlens_k = static_cast<const std::int32_t*>(of(src).cu_seqlens->data());
    }
    a.max_seqlen_q = of(rank).max_len;
    a.max_seqlen_k = of(src).max_len;
    a.causal = opt.causal;
    // Explicit positions cost the kernels their plain path (and cuDNN cannot take them), so they
    // are passed only where the mask needs them. Not needed: identity positions on both sides; the
    // diagonal step (queries and keys are the same shard, positions increase inside each sequence,
    // so "key position <= query position" is "key index <= query index"); and a shard whose keys
    // all precede every query of the same sequence (no mask at all: contiguous layouts).
    if (a.causal && fully_visible(src)) a.causal = false;
    const bool same_shard = src == rank;
    if (a.causal && !same_shard && !(of(rank).identity_positions && of(src).identity_positions)) {
      a.q_positions = static_cast<const std::int32_t*>(own_positions->data());
      a.k_positions = key_positions_of(src);
    }
    a.scale = opt.scale;
    a.stream = opt.stream;
    return a;
  }

  // One plain block of a step: rows of the queries against rows of the keys, no positions.
  AttentionArgs block_args(const TensorView& q, const TensorView& k, const TensorView& v,
                           const partition::StepBlock& b) const {
    AttentionArgs a;
    a.q = rows_of(q, b.q_begin, b.q_count);
    a.k = rows_of(k, b.k_begin, b.k_count);
    a.v = rows_of(v, b.k_begin, b.k_count);
    a.max_seqlen_q = static_cast<int>(b.q_count);
    a.max_seqlen_k = static_cast<int>(b.k_count);
    a.causal = b.causal;
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
    const auto n = of(src).tokens;
    const auto half = static_cast<std::size_t>(n) * static_cast<std::size_t>(shape.hkv) * static_cast<std::size_t>(shape.d) *
                      dtype_size(shape.dtype);
    const Device dev = backend->device();
    TensorView k(buf.data(), shape.dtype, {n, shape.hkv, shape.d}, dev);
    TensorView v(static_cast<char*>(buf.data()) + half, shape.dtype, {n, shape.hkv, shape.d}, dev);
    return {k, v};
  }

  // The operations that bring shard next_src here while sending the current one onward.
  void rotate_kv(std::vector<P2POp>& ops, const TensorView& k, const TensorView& v, DeviceBuffer& into, int next_src) {
    const int next = (rank + 1) % world, prev = (rank - 1 + world) % world;
    auto [rk, rv] = kv_views(into, next_src);
    ops.push_back({P2POp::Kind::recv, rk.data, rk.bytes(), prev, kTagK});
    ops.push_back({P2POp::Kind::recv, rv.data, rv.bytes(), prev, kTagV});
    ops.push_back({P2POp::Kind::send, k.data, k.bytes(), next, kTagK});
    ops.push_back({P2POp::Kind::send, v.data, v.bytes(), next, kTagV});
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

  void forward(TensorView q, TensorView k, TensorView v, TensorView o, TensorView lse) {
    const auto t0 = Clock::now();
    stats = {};
    const Shape s = check_inputs(q, k, v);
    ensure_workspaces(s, false);
    const auto n = local();
    const Device dev = backend->device();
    LONGATTN_INVALID(lse.dtype == DType::f32 && lse.ndim == 2 && lse.dim(0) == s.hq && lse.dim(1) == n,
                     "lse must be fp32 [{}, {}], got {}", s.hq, n, lse.describe());
    TensorView oacc = view_of(*o_acc, DType::f32, {n, s.hq, s.d}, dev);
    TensorView opart = view_of(*o_part, s.dtype, {n, s.hq, s.d}, dev);
    TensorView lpart = view_of(*lse_part, DType::f32, {s.hq, n}, dev);
    backend->device_ops().fill(oacc, 0.0f, opt.stream);
    backend->device_ops().fill(lse, -std::numeric_limits<float>::infinity(), opt.stream);

    TensorView cur_k = k, cur_v = v;
    bool first = true;
    for (int step = 0; step < world; ++step) {
      const int src = (rank - step + world) % world;
      std::vector<P2POp> ops;
      if (step + 1 < world) rotate_kv(ops, cur_k, cur_v, *kv_buf[step % 2], (rank - step - 1 + 2 * world) % world);
      Request pending = post(ops);
      const auto tc = Clock::now();
      if (const auto& plain = blocks[static_cast<std::size_t>(src)]; plain && !plain->empty()) {
        for (const auto& b : *plain) forward_block(q, cur_k, cur_v, b, oacc, lse, first);
      } else if (has_work(src)) {
        const auto a = step_args(q, cur_k, cur_v, src);
        if (first) {  // nothing to merge with yet: write the accumulator directly
          backend->forward(a, {oacc, lse});
          first = false;
        } else {
          backend->forward(a, {opart, lpart});
          backend->merge_into(oacc, lse, opart, lpart, opt.stream);
        }
      } else {
        ++stats.skipped_steps;
      }
      count_compute_since(tc);
      wait(pending);
      if (step + 1 < world) std::tie(cur_k, cur_v) = kv_views(*kv_buf[step % 2], (rank - step - 1 + 2 * world) % world);
      ++stats.steps;
      logger(Subsystem::ring).debug("forward step {}/{} (kv of rank {})", step + 1, world, src);
      if (opt.on_step) opt.on_step("forward", step + 1, world);
    }
    backend->device_ops().convert(o, oacc, opt.stream);
    finish();
    stats.wall_ms = ms_since(t0);
  }

  // Forward of one block into the accumulator: written directly when it is the first result and
  // covers every query, else computed aside and merged into its rows (whose lse entries are
  // strided in [H, n], hence the copies).
  void forward_block(const TensorView& q, const TensorView& k, const TensorView& v, const partition::StepBlock& b,
                     const TensorView& oacc, const TensorView& lse, bool& first) {
    const auto n = local();
    const Device dev = backend->device();
    const auto a = block_args(q, k, v, b);
    if (first && b.q_count == n) {
      backend->forward(a, {oacc, lse});
      first = false;
      return;
    }
    first = false;
    TensorView opart = view_of(*o_part, shape.dtype, {b.q_count, shape.hq, shape.d}, dev);
    TensorView lpart = view_of(*lse_part, DType::f32, {shape.hq, b.q_count}, dev);
    backend->forward(a, {opart, lpart});
    if (b.q_count == n) {
      backend->merge_into(oacc, lse, opart, lpart, opt.stream);
      return;
    }
    TensorView lrows = view_of(*lse_rows, DType::f32, {shape.hq, b.q_count}, dev);
    const auto cols = static_cast<std::size_t>(n), count = static_cast<std::size_t>(b.q_count);
    float* lse_at = lse.as<float>() + b.q_begin;
    copy_token_range(lrows.as<float>(), count, lse_at, cols, count, shape.hq);
    backend->merge_into(rows_of(oacc, b.q_begin, b.q_count), lrows, opart, lpart, opt.stream);
    copy_token_range(lse_at, cols, lrows.as<float>(), count, count, shape.hq);
  }

  // Backward of one block: gradients of its query rows (dq) and key rows (dk, dv) accumulate.
  void backward_block(const TensorView& q, const TensorView& k, const TensorView& v, const partition::StepBlock& b,
                      const BackwardArgs& whole) {
    const auto n = local();
    const Device dev = backend->device();
    BackwardArgs g;
    g.o = rows_of(whole.o, b.q_begin, b.q_count);
    g.d_o = rows_of(whole.d_o, b.q_begin, b.q_count);
    g.dq = rows_of(whole.dq, b.q_begin, b.q_count);
    g.dk = rows_of(whole.dk, b.k_begin, b.k_count);
    g.dv = rows_of(whole.dv, b.k_begin, b.k_count);
    g.accumulate = true;
    if (b.q_count == n) {
      g.lse = whole.lse;
      g.delta = whole.delta;
    } else {
      const auto cols = static_cast<std::size_t>(n), count = static_cast<std::size_t>(b.q_count);
      g.lse = view_of(*lse_rows, DType::f32, {shape.hq, b.q_count}, dev);
      g.delta = view_of(*delta_rows, DType::f32, {shape.hq, b.q_count}, dev);
      copy_token_range(g.lse.as<float>(), count, whole.lse.as<const float>() + b.q_begin, cols, count, shape.hq);
      copy_token_range(g.delta.as<float>(), count, whole.delta.as<const float>() + b.q_begin, cols, count, shape.hq);
    }
    backend->backward(block_args(q, k, v, b), g);
  }

  // Waits for the device and the communicator, turning a stuck peer into an error.
  void finish() {
    comm.synchronize(opt.stream);
    backend->device_ops().synchronize(opt.stream);
  }

  void backward(TensorView q, TensorView k, TensorView v, TensorView o, TensorView lse, TensorView d_o, TensorView dq,
                TensorView dk, TensorView dv) {
    const auto t0 = Clock::now();
    stats = {};
    const Shape s = check_inputs(q, k, v);
    ensure_workspaces(s, true);
    const auto n = local();
    const Device dev = backend->device();
    const int next = (rank + 1) % world, prev = (rank - 1 + world) % world;
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

    // Gradient buffer of rank src's shard: [dk | dv] in fp32.
    auto grad_views = [&](DeviceBuffer& buf, int src) {
      const auto m = of(src).tokens;
      const auto half = static_cast<std::size_t>(m) * static_cast<std::size_t>(s.hkv) * static_cast<std::size_t>(s.d);
      TensorView gk(buf.data(), DType::f32, {m, s.hkv, s.d}, dev);
      TensorView gv(static_cast<float*>(buf.data()) + half, DType::f32, {m, s.hkv, s.d}, dev);
      return std::pair{gk, gv};
    };
    auto grad_bytes = [&](int src) { return 2 * grad_views(*grad_in, src).first.bytes(); };

    // Step s posts one batch: the key/value shard for step s+1, the gradient this rank computed at
    // step s-1 (to the next rank) and the partial gradient of the shard it computes now (from the
    // previous rank, who computed it at its step s-1). Every rank posts the same sequence of
    // batches, so stream-ordered communicators cannot deadlock. A last batch brings each shard's
    // gradient home.
    TensorView cur_k = k, cur_v = v;
    int sent_src = -1;  // shard whose gradient (in grad_buf[(step - 1) % 2]) goes out this step
    for (int step = 0; step < world; ++step) {
      const int src = (rank - step + world) % world;
      const int next_src = (rank - step - 1 + 2 * world) % world;
      // One incoming buffer suffices: the batch that refills it is posted after this step's add_into
      // was queued, and stream order (or the host wait on CPUs) keeps them apart.
      DeviceBuffer& incoming = *grad_in;
      std::vector<P2POp> ops;
      if (step + 1 < world) rotate_kv(ops, cur_k, cur_v, *kv_buf[step % 2], next_src);
      if (step > 0) {
        ops.push_back({P2POp::Kind::send, grad_buf[(step - 1) % 2]->data(), grad_bytes(sent_src), next, kTagGrad});
        ops.push_back({P2POp::Kind::recv, incoming.data(), grad_bytes(src), prev, kTagGrad});
        stats.bytes_sent += grad_bytes(sent_src);
      }
      Request pending = post(ops);

      DeviceBuffer& gbuf = *grad_buf[step % 2];
      auto [gk, gv] = grad_views(gbuf, src);
      // dq accumulates across steps (accumulate); dk/dv of this step start from zero.
      backend->device_ops().fill(gk, 0.0f, opt.stream);
      backend->device_ops().fill(gv, 0.0f, opt.stream);
      const auto tc = Clock::now();
      if (has_work(src)) {
        const auto& plain = blocks[static_cast<std::size_t>(src)];
        BackwardArgs g;
        g.o = o;
        g.lse = lse;
        g.d_o = d_o;
        g.delta = delta_v;
        g.dq = dq_v;
        g.dk = gk;
        g.dv = gv;
        g.accumulate = true;
        if (plain) {
          for (const auto& b : *plain) backward_block(q, cur_k, cur_v, b, g);
        } else {
          backend->backward(step_args(q, cur_k, cur_v, src), g);
        }
      } else {
        ++stats.skipped_steps;
      }
      count_compute_since(tc);
      wait(pending);
      if (step > 0) {
        auto [ik, iv] = grad_views(incoming, src);
        backend->device_ops().add_into(gk, ik, opt.stream);
        backend->device_ops().add_into(gv, iv, opt.stream);
      }
      sent_src = src;
      if (step + 1 < world) std::tie(cur_k, cur_v) = kv_views(*kv_buf[step % 2], next_src);
      ++stats.steps;
      logger(Subsystem::ring).debug("backward step {}/{} (kv of rank {})", step + 1, world, src);
      if (opt.on_step) opt.on_step("backward", step + 1, world);
    }
    // After P steps our own shard's gradient comes home from the previous rank.
    DeviceBuffer* home = grad_buf[(world - 1) % 2].get();
    if (world > 1) {
      DeviceBuffer& incoming = *grad_in;
      Request last = post({{P2POp::Kind::send, grad_buf[(world - 1) % 2]->data(), grad_bytes(sent_src), next, kTagGrad},
                           {P2POp::Kind::recv, incoming.data(), grad_bytes(rank), prev, kTagGrad}});
      stats.bytes_sent += grad_bytes(sent_src);
      wait(last);
      home = &incoming;
    }
    auto [hk, hv] = grad_views(*home, rank);
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
                                           bool backward) {
  return WorkspaceSizes(plan.local_tokens(rank), plan.max_local_tokens(), heads, kv_heads, head_dim, dtype).total(backward);
}
const RingStats& RingAttention::last_stats() const noexcept { return impl_->stats; }
AttentionBackend& RingAttention::backend() noexcept { return *impl_->backend; }
const ShardPlan& RingAttention::plan() const noexcept { return impl_->plan; }

}  // namespace longattn
