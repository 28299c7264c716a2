// Balanced variable-length batch handles of the C API: parameters to a BalancedBatch, its index
// maps, the remap between the linear and attention layouts, and attention on the attention layout,
// each refused on every rank at once when a descriptor is wrong on any.
#include <fmt/format.h>

#include <algorithm>
#include <cstring>
#include <memory>

#include "capi/agreed_views.hpp"
#include "capi/guard.hpp"
#include "capi/handles.hpp"
#include "capi/tensor_descriptor.hpp"
#include "longattn/backend.hpp"

namespace longattn::capi {
namespace {

Balance to_balance(int balance) {
  switch (balance) {
    case LONGATTN_BALANCE_HIERARCHICAL: return Balance::hierarchical;
    case LONGATTN_BALANCE_PER_SEQUENCE_ZIGZAG: return Balance::per_sequence_zigzag;
    case LONGATTN_BALANCE_WHOLE_SEQUENCES: return Balance::whole_sequences;
    default: break;
  }
  throw Error(ErrorCode::invalid_argument, fmt::format("balance {} is not a longattn_balance: use LONGATTN_BALANCE_HIERARCHICAL, "
                                                       "_PER_SEQUENCE_ZIGZAG or _WHOLE_SEQUENCES", balance));
}

// The C parameters as the planner's request; throws on values outside the enums or impossible
// counts (BalancedBatch checks the rest).
BalanceRequest translate(const longattn_varlen_params& p, const Communicator& comm, DeviceKind device) {
  if (p.struct_size != sizeof(longattn_varlen_params))
    throw Error(ErrorCode::invalid_argument,
                fmt::format("params.struct_size is {}, this library's longattn_varlen_params has {} bytes: call "
                            "longattn_varlen_params_init first, and build against the header of the library you link",
                            p.struct_size, sizeof(longattn_varlen_params)));
  if (p.batch < 1) throw Error(ErrorCode::invalid_argument, fmt::format("params.batch is {}: a batch has at least one sequence", p.batch));
  require_non_null(p.cu_seqlens, "params.cu_seqlens");
  if (p.gpus_per_node < 0)
    throw Error(ErrorCode::invalid_argument,
                fmt::format("params.gpus_per_node is {}: give the ranks per node, or 0 to take the communicator's topology",
                            p.gpus_per_node));
  if (p.cap_tokens < 0)
    throw Error(ErrorCode::invalid_argument, fmt::format("params.cap_tokens is {}: give a positive cap, or 0 for none", p.cap_tokens));
  BalanceRequest request;
  request.lengths = lengths_from_cu_seqlens(std::vector<std::int32_t>(p.cu_seqlens, p.cu_seqlens + p.batch + 1));
  request.ranks = comm.size();
  request.gpus_per_node = p.gpus_per_node ? p.gpus_per_node : comm.topology().local_size;
  request.cap_tokens = p.cap_tokens;
  request.q_heads = p.q_heads;
  request.kv_heads = p.kv_heads;
  request.head_dim = p.head_dim;
  request.dtype = to_dtype(enum_value(p.dtype));
  request.causal = p.causal != 0;
  request.balance = to_balance(enum_value(p.balance));
  request.machine = p.machine ? p.machine : (device == DeviceKind::cpu ? "cpu" : "h100");
  if (p.machine_file) request.machine_file = p.machine_file;
  return request;
}

std::unique_ptr<VarlenAttention> plan(longattn_varlen& h, void* stream) {
  VarlenOptions options = h.options;
  options.stream = stream;
  return std::make_unique<VarlenAttention>(*h.comm->comm, *h.batch, options,
                                           make_backend(h.context->backend, h.context->device.kind));
}

// The executor for this call's stream; making one is collective, so whether any rank meets a new
// stream is agreed first.
VarlenAttention& for_stream(longattn_varlen& h, void* stream) {
  if (h.context->device.kind == DeviceKind::cpu) return *h.by_stream.at(nullptr);
  std::int64_t missing = h.by_stream.count(stream) ? 0 : 1;
  h.comm->comm->allreduce(&missing, 1, ReduceType::i64, ReduceOp::max);
  if (missing) h.by_stream[stream] = plan(h, stream);
  return *h.by_stream.at(stream);
}

void require_rank(const longattn_varlen& h, int rank) {
  if (rank < 0 || rank >= h.batch->ranks())
    throw Error(ErrorCode::invalid_argument, fmt::format("rank {} is outside [0, {})", rank, h.batch->ranks()));
}

// Both tensors of a remap, agreed on every rank: descriptors, device, and the same dimensions
// after the token one (the row counts are the remap's own check).
std::array<TensorView, 2> remap_views(longattn_varlen& h, const char* from_name, const longattn_tensor* from,
                                      const char* to_name, const longattn_tensor* to) {
  std::string problem;
  if (descriptor_problem(from_name, from).empty() && descriptor_problem(to_name, to).empty()) {
    bool same = from->ndim == to->ndim;
    for (int k = 1; same && k < from->ndim; ++k) same = from->shape[k] == to->shape[k];
    if (!same)
      problem = fmt::format("{} {} and {} {} must have the same dimensions after the first (token) one", from_name,
                            to_view(*from).describe(), to_name, to_view(*to).describe());
  }
  return agreed_views<2>(*h.comm->comm, h.context->device, {{{from_name, from}, {to_name, to}}}, problem);
}

}  // namespace
}  // namespace longattn::capi

using longattn::capi::guarded;
using longattn::capi::require_non_null;

extern "C" {

void longattn_varlen_params_init(longattn_varlen_params* params) {
  if (!params) return;
  std::memset(params, 0, sizeof *params);
  params->struct_size = sizeof *params;
  params->q_heads = params->kv_heads = 1;
  params->head_dim = 64;
  params->dtype = LONGATTN_DTYPE_BF16;
  params->causal = 1;
  params->balance = LONGATTN_BALANCE_HIERARCHICAL;
  params->gradient_transport = LONGATTN_DTYPE_F32;
}

longattn_status longattn_varlen_create(longattn_context* context, longattn_comm* comm, const longattn_varlen_params* params,
                                       longattn_varlen** out) {
  return guarded(__func__, [&] {
    require_non_null(comm, "comm");
    std::string problem;
    auto handle = std::make_unique<longattn_varlen>();
    try {
      require_non_null(context, "context");
      require_non_null(params, "params");
      require_non_null(out, "out");
      handle->batch = std::make_unique<longattn::BalancedBatch>(
          longattn::capi::translate(*params, *comm->comm, context->device.kind));
      handle->options.scale = params->scale;
      handle->options.gradient_transport = longattn::capi::to_dtype(longattn::capi::enum_value(params->gradient_transport));
    } catch (const longattn::Error& e) {
      problem = e.what();
    }
    // Planning is pure, so a refusal here is the same on every rank that was given the same
    // parameters; agreeing on it also keeps a rank given different ones from waiting below.
    longattn::refuse_on_every_rank_if_any(*comm->comm, problem);
    handle->context = context;
    handle->comm = comm;
    auto& first = *(handle->by_stream[nullptr] = longattn::capi::plan(*handle, nullptr));
    handle->remap = std::make_unique<longattn::VarlenRemap>(*comm->comm, *handle->batch, first.backend().device_ops());
    *out = handle.release();
  });
}

void longattn_varlen_destroy(longattn_varlen* varlen) { delete varlen; }

longattn_status longattn_varlen_get_info(const longattn_varlen* varlen, longattn_varlen_info* info) {
  return guarded(__func__, [&] {
    require_non_null(varlen, "varlen");
    require_non_null(info, "info");
    const auto& batch = *varlen->batch;
    const int rank = varlen->comm->comm->rank();
    info->total_tokens = batch.total_tokens();
    info->linear_begin = batch.linear_begin(rank);
    info->linear_tokens = batch.linear_tokens(rank);
    info->attention_tokens = batch.attention_tokens(rank);
    info->groups = static_cast<int>(batch.groups().size());
    info->modelled_imbalance = batch.model().imbalance;
  });
}

longattn_status longattn_varlen_linear_rows(const longattn_varlen* varlen, int rank, int64_t* begin, int64_t* tokens) {
  return guarded(__func__, [&] {
    require_non_null(varlen, "varlen");
    longattn::capi::require_rank(*varlen, rank);
    if (begin) *begin = varlen->batch->linear_begin(rank);
    if (tokens) *tokens = varlen->batch->linear_tokens(rank);
  });
}

longattn_status longattn_varlen_attention_index(const longattn_varlen* varlen, int rank, int64_t* tokens,
                                                int64_t* global_index, int32_t* positions, int64_t capacity) {
  return guarded(__func__, [&] {
    require_non_null(varlen, "varlen");
    longattn::capi::require_rank(*varlen, rank);
    const auto& batch = *varlen->batch;
    const std::int64_t n = batch.attention_tokens(rank);
    if ((global_index || positions) && capacity < n)
      throw longattn::Error(longattn::ErrorCode::invalid_argument,
                            fmt::format("capacity {} is too small: rank {} holds {} tokens in the attention layout", capacity, rank, n));
    if (global_index || positions) {
      const auto& cu = batch.cu_seqlens();
      for (const auto& run : batch.attention_runs(rank))
        for (std::int64_t i = 0; i < run.count; ++i) {
          const std::int64_t position = run.first + i * run.stride;
          const auto row = static_cast<std::size_t>(run.row + i);
          if (global_index) global_index[row] = cu[static_cast<std::size_t>(run.seq)] + position;
          if (positions) positions[row] = static_cast<std::int32_t>(position);
        }
    }
    if (tokens) *tokens = n;
  });
}

longattn_status longattn_varlen_to_attention(longattn_varlen* varlen, const longattn_tensor* linear,
                                             const longattn_tensor* attention, void* stream) {
  return guarded(__func__, [&] {
    require_non_null(varlen, "varlen");
    const auto t = longattn::capi::remap_views(*varlen, "linear", linear, "attention", attention);
    varlen->remap->to_attention(t[0], t[1], stream);
  });
}

longattn_status longattn_varlen_to_linear(longattn_varlen* varlen, const longattn_tensor* attention,
                                          const longattn_tensor* linear, void* stream) {
  return guarded(__func__, [&] {
    require_non_null(varlen, "varlen");
    const auto t = longattn::capi::remap_views(*varlen, "attention", attention, "linear", linear);
    varlen->remap->to_linear(t[0], t[1], stream);
  });
}

longattn_status longattn_varlen_forward(longattn_varlen* varlen, const longattn_tensor* q, const longattn_tensor* k,
                                        const longattn_tensor* v, const longattn_tensor* o, const longattn_tensor* lse,
                                        void* stream) {
  return guarded(__func__, [&] {
    require_non_null(varlen, "varlen");
    const auto t = longattn::capi::agreed_views<5>(*varlen->comm->comm, varlen->context->device,
                                                   {{{"q", q}, {"k", k}, {"v", v}, {"o", o}, {"lse", lse}}});
    longattn::capi::for_stream(*varlen, stream).forward(t[0], t[1], t[2], t[3], t[4]);
  });
}

longattn_status longattn_varlen_backward(longattn_varlen* varlen, const longattn_tensor* q, const longattn_tensor* k,
                                         const longattn_tensor* v, const longattn_tensor* o, const longattn_tensor* lse,
                                         const longattn_tensor* d_o, const longattn_tensor* dq,
                                         const longattn_tensor* dk, const longattn_tensor* dv, void* stream) {
  return guarded(__func__, [&] {
    require_non_null(varlen, "varlen");
    const auto t = longattn::capi::agreed_views<9>(
        *varlen->comm->comm, varlen->context->device,
        {{{"q", q}, {"k", k}, {"v", v}, {"o", o}, {"lse", lse}, {"d_o", d_o}, {"dq", dq}, {"dk", dk}, {"dv", dv}}});
    longattn::capi::for_stream(*varlen, stream).backward(t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7], t[8]);
  });
}

}  // extern "C"
