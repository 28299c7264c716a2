// Attention handles of the C API: parameters to an AttentionProblem and ParallelOptions, the
// shard helpers, and forward/backward on descriptors, each refused on every rank at once when a
// descriptor is wrong on any.
#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <memory>
#include <utility>

#include "capi/agreed_views.hpp"
#include "capi/guard.hpp"
#include "capi/handles.hpp"
#include "capi/tensor_descriptor.hpp"
#include "longattn/backend.hpp"

namespace longattn::capi {
namespace {

Layout to_layout(int layout) {
  switch (layout) {
    case LONGATTN_LAYOUT_CONTIGUOUS: return Layout::contiguous;
    case LONGATTN_LAYOUT_ZIGZAG: return Layout::zigzag;
    case LONGATTN_LAYOUT_STRIPED: return Layout::striped;
    default: break;
  }
  throw Error(ErrorCode::invalid_argument, fmt::format("layout {} is not a longattn_layout: use LONGATTN_LAYOUT_CONTIGUOUS, "
                                                       "_ZIGZAG or _STRIPED", layout));
}

Strategy to_strategy(int strategy) {
  switch (strategy) {
    case LONGATTN_STRATEGY_RING: return Strategy::ring;
    case LONGATTN_STRATEGY_ULYSSES: return Strategy::ulysses;
    case LONGATTN_STRATEGY_HYBRID: return Strategy::hybrid;
    case LONGATTN_STRATEGY_AUTO: return Strategy::automatic;
    default: break;
  }
  throw Error(ErrorCode::invalid_argument, fmt::format("strategy {} is not a longattn_strategy: use LONGATTN_STRATEGY_RING, "
                                                       "_ULYSSES, _HYBRID or _AUTO", strategy));
}

longattn_strategy from_strategy(Strategy s) {
  switch (s) {
    case Strategy::ring: return LONGATTN_STRATEGY_RING;
    case Strategy::ulysses: return LONGATTN_STRATEGY_ULYSSES;
    case Strategy::hybrid: return LONGATTN_STRATEGY_HYBRID;
    case Strategy::automatic: break;
  }
  return LONGATTN_STRATEGY_AUTO;
}

// The C parameters as the C++ problem and options; throws on values outside the enums or
// impossible counts (the C++ constructor checks the rest, and agreement between ranks).
std::pair<AttentionProblem, ParallelOptions> translate(const longattn_attention_params& p) {
  if (p.struct_size != sizeof(longattn_attention_params))
    throw Error(ErrorCode::invalid_argument,
                fmt::format("params.struct_size is {}, this library's longattn_attention_params has {} bytes: call "
                            "longattn_attention_params_init first, and build against the header of the library you link",
                            p.struct_size, sizeof(longattn_attention_params)));
  if (p.batch < 1) throw Error(ErrorCode::invalid_argument, fmt::format("params.batch is {}: a batch has at least one sequence", p.batch));
  require_non_null(p.cu_seqlens, "params.cu_seqlens");
  AttentionProblem problem;
  problem.cu_seqlens.assign(p.cu_seqlens, p.cu_seqlens + p.batch + 1);
  problem.q_heads = p.q_heads;
  problem.kv_heads = p.kv_heads;
  problem.head_dim = p.head_dim;
  problem.dtype = to_dtype(enum_value(p.dtype));
  problem.causal = p.causal != 0;
  problem.layout = to_layout(enum_value(p.layout));
  ParallelOptions options;
  options.strategy = to_strategy(enum_value(p.strategy));
  options.ulysses_size = p.ulysses_size;
  if (p.machine_file) options.machine_file = p.machine_file;
  options.ring.scale = p.scale;
  options.ring.gradient_transport = to_dtype(enum_value(p.gradient_transport));
  return {std::move(problem), std::move(options)};
}

std::unique_ptr<ParallelAttention> plan(longattn_attention& a, void* stream) {
  ParallelOptions options = a.options;
  options.ring.stream = stream;
  return std::make_unique<ParallelAttention>(*a.comm->comm, a.problem, options,
                                             make_backend(a.context->backend, a.context->device.kind));
}

// The object for this call's stream. Whether some rank meets a new stream is agreed first, since
// making one is collective: then every rank makes (or remakes) one for its own stream.
ParallelAttention& for_stream(longattn_attention& a, void* stream) {
  if (a.context->device.kind == DeviceKind::cpu) return *a.by_stream.at(nullptr);
  std::int64_t missing = a.by_stream.count(stream) ? 0 : 1;
  a.comm->comm->allreduce(&missing, 1, ReduceType::i64, ReduceOp::max);
  if (missing) a.by_stream[stream] = plan(a, stream);
  return *a.by_stream.at(stream);
}

template <std::size_t N>
std::array<TensorView, N> checked_views(longattn_attention& a, const std::array<std::pair<const char*, const longattn_tensor*>, N>& tensors) {
  return agreed_views(*a.comm->comm, a.context->device, tensors);
}

// Rows of a token-major tensor and the bytes of one row; throws unless it is a CPU tensor.
std::pair<std::int64_t, std::size_t> host_rows(const char* name, const longattn_tensor* desc) {
  if (auto problem = descriptor_problem(name, desc); !problem.empty()) throw Error(ErrorCode::invalid_argument, problem);
  if (enum_value(desc->device.kind) != LONGATTN_DEVICE_CPU)
    throw Error(ErrorCode::invalid_argument,
                fmt::format("tensor '{}' is in GPU memory, but shard and unshard copy host memory: gather on the device "
                            "with the indices of longattn_attention_shard_index instead", name));
  const TensorView v = to_view(*desc);
  return {v.dim(0), v.dim(0) ? v.bytes() / static_cast<std::size_t>(v.dim(0)) : 0};
}

// Checks global/local against rank's shard and returns the shard and the row size.
std::pair<RankShard, std::size_t> rows_to_copy(const longattn_attention& a, int rank, const longattn_tensor* global,
                                               const longattn_tensor* local) {
  const auto& shards = a.any().shards();
  if (rank < 0 || rank >= shards.world())
    throw Error(ErrorCode::invalid_argument, fmt::format("rank {} is outside [0, {})", rank, shards.world()));
  const auto [global_rows, global_row_bytes] = host_rows("global", global);
  const auto [local_rows, local_row_bytes] = host_rows("local", local);
  bool same_rows = enum_value(global->dtype) == enum_value(local->dtype) && global->ndim == local->ndim;
  for (int k = 1; same_rows && k < global->ndim; ++k) same_rows = global->shape[k] == local->shape[k];
  if (!same_rows)
    throw Error(ErrorCode::invalid_argument, fmt::format("global {} and local {} must have the same dtype and the same "
                                                         "dimensions after the first (token) one",
                                                         to_view(*global).describe(), to_view(*local).describe()));
  if (global_rows != shards.total_tokens() || local_rows != shards.local_tokens(rank))
    throw Error(ErrorCode::invalid_argument,
                fmt::format("global has {} rows and local {}; the batch has {} tokens of which rank {} holds {}", global_rows,
                            local_rows, shards.total_tokens(), rank, shards.local_tokens(rank)));
  return {shards.shard(rank), std::max(global_row_bytes, local_row_bytes)};
}

}  // namespace
}  // namespace longattn::capi

using longattn::capi::guarded;
using longattn::capi::require_non_null;

extern "C" {

void longattn_attention_params_init(longattn_attention_params* params) {
  if (!params) return;
  std::memset(params, 0, sizeof *params);
  params->struct_size = sizeof *params;
  params->q_heads = params->kv_heads = 1;
  params->head_dim = 64;
  params->dtype = LONGATTN_DTYPE_BF16;
  params->layout = LONGATTN_LAYOUT_ZIGZAG;
  params->strategy = LONGATTN_STRATEGY_RING;
  params->gradient_transport = LONGATTN_DTYPE_F32;
}

longattn_status longattn_attention_create(longattn_context* context, longattn_comm* comm,
                                          const longattn_attention_params* params, longattn_attention** out) {
  return guarded(__func__, [&] {
    require_non_null(comm, "comm");
    std::string problem;
    auto handle = std::make_unique<longattn_attention>();
    try {
      require_non_null(context, "context");
      require_non_null(params, "params");
      require_non_null(out, "out");
      auto [p, o] = longattn::capi::translate(*params);
      handle->problem = std::move(p);
      handle->options = std::move(o);
    } catch (const longattn::Error& e) {
      problem = e.what();
    }
    longattn::refuse_on_every_rank_if_any(*comm->comm, problem);
    handle->context = context;
    handle->comm = comm;
    handle->by_stream[nullptr] = longattn::capi::plan(*handle, nullptr);
    *out = handle.release();
  });
}

void longattn_attention_destroy(longattn_attention* attention) { delete attention; }

longattn_status longattn_attention_get_info(const longattn_attention* attention, longattn_attention_info* info) {
  return guarded(__func__, [&] {
    require_non_null(attention, "attention");
    require_non_null(info, "info");
    const auto& pa = attention->any();
    const int ranks = attention->comm->comm->size();
    info->strategy = longattn::capi::from_strategy(pa.strategy());
    info->ulysses_size = pa.ulysses_size();
    info->ring_size = ranks / pa.ulysses_size();
    info->total_tokens = pa.shards().total_tokens();
    info->local_tokens = pa.shards().local_tokens(attention->comm->comm->rank());
  });
}

longattn_status longattn_attention_choice_reason(const longattn_attention* attention, const char** reason) {
  return guarded(__func__, [&] {
    require_non_null(attention, "attention");
    require_non_null(reason, "reason");
    *reason = attention->any().choice_reason().c_str();
  });
}

longattn_status longattn_attention_shard_index(const longattn_attention* attention, int rank, int64_t* tokens,
                                               int64_t* global_index, int32_t* positions, int64_t capacity) {
  return guarded(__func__, [&] {
    require_non_null(attention, "attention");
    const auto& shards = attention->any().shards();
    if (rank < 0 || rank >= shards.world())
      throw longattn::Error(longattn::ErrorCode::invalid_argument, fmt::format("rank {} is outside [0, {})", rank, shards.world()));
    const std::int64_t n = shards.local_tokens(rank);
    if ((global_index || positions) && capacity < n)
      throw longattn::Error(longattn::ErrorCode::invalid_argument,
                            fmt::format("capacity {} is too small: rank {} holds {} tokens", capacity, rank, n));
    if (global_index || positions) {
      const auto shard = shards.shard(rank);
      if (global_index) std::copy(shard.global_index.begin(), shard.global_index.end(), global_index);
      if (positions) std::copy(shard.positions.begin(), shard.positions.end(), positions);
    }
    if (tokens) *tokens = n;
  });
}

longattn_status longattn_attention_shard(const longattn_attention* attention, int rank, const longattn_tensor* global,
                                         const longattn_tensor* local) {
  return guarded(__func__, [&] {
    require_non_null(attention, "attention");
    const auto [shard, row_bytes] = longattn::capi::rows_to_copy(*attention, rank, global, local);
    longattn::shard_rows(global->data, local->data, row_bytes, shard);
  });
}

longattn_status longattn_attention_unshard(const longattn_attention* attention, int rank, const longattn_tensor* local,
                                           const longattn_tensor* global) {
  return guarded(__func__, [&] {
    require_non_null(attention, "attention");
    const auto [shard, row_bytes] = longattn::capi::rows_to_copy(*attention, rank, global, local);
    longattn::unshard_rows(local->data, global->data, row_bytes, shard);
  });
}

longattn_status longattn_attention_forward(longattn_attention* attention, const longattn_tensor* q,
                                           const longattn_tensor* k, const longattn_tensor* v, const longattn_tensor* o,
                                           const longattn_tensor* lse, void* stream) {
  return guarded(__func__, [&] {
    require_non_null(attention, "attention");
    const auto t = longattn::capi::checked_views<5>(*attention, {{{"q", q}, {"k", k}, {"v", v}, {"o", o}, {"lse", lse}}});
    longattn::capi::for_stream(*attention, stream).forward(t[0], t[1], t[2], t[3], t[4]);
  });
}

longattn_status longattn_attention_backward(longattn_attention* attention, const longattn_tensor* q,
                                            const longattn_tensor* k, const longattn_tensor* v, const longattn_tensor* o,
                                            const longattn_tensor* lse, const longattn_tensor* d_o,
                                            const longattn_tensor* dq, const longattn_tensor* dk,
                                            const longattn_tensor* dv, void* stream) {
  return guarded(__func__, [&] {
    require_non_null(attention, "attention");
    const auto t = longattn::capi::checked_views<9>(
        *attention,
        {{{"q", q}, {"k", k}, {"v", v}, {"o", o}, {"lse", lse}, {"d_o", d_o}, {"dq", dq}, {"dk", dk}, {"dv", dv}}});
    longattn::capi::for_stream(*attention, stream).backward(t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7], t[8]);
  });
}

}  // extern "C"
