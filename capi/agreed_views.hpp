// Descriptors of one collective call turned into tensor views, with every rank refusing the call
// together when any rank's descriptor is wrong (or not on the context's device), so that no rank is
// left waiting in the exchange the others skipped.
#pragma once

#include <fmt/format.h>

#include <array>
#include <string>
#include <utility>

#include "capi/tensor_descriptor.hpp"
#include "longattn/communicator.hpp"

namespace longattn::capi {

// What is wrong on this rank with one descriptor, or where it lives if not on `device`; empty when fine.
inline std::string view_problem(const char* name, const longattn_tensor* desc, const Device& device) {
  std::string problem = descriptor_problem(name, desc);
  if (problem.empty() && to_device(desc->device) != device)
    problem = fmt::format("tensor '{}' lives on {} {} but the context runs on {} {}: make the context for the tensors' device",
                          name, to_string(to_device(desc->device).kind), desc->device.index, to_string(device.kind),
                          device.index);
  return problem;
}

// `extra_problem`: a further check of this rank's, agreed in the same exchange.
template <std::size_t N>
std::array<TensorView, N> agreed_views(Communicator& comm, const Device& device,
                                       const std::array<std::pair<const char*, const longattn_tensor*>, N>& tensors,
                                       std::string extra_problem = {}) {
  std::string problem;
  for (const auto& [name, desc] : tensors)
    if (problem = view_problem(name, desc, device); !problem.empty()) break;
  refuse_on_every_rank_if_any(comm, problem.empty() ? extra_problem : problem);
  std::array<TensorView, N> views;
  for (std::size_t i = 0; i < N; ++i) views[i] = to_view(*tensors[i].second);
  return views;
}

}  // namespace longattn::capi
