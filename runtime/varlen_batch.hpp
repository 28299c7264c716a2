// What a BalancedBatch holds (varlen_attention.hpp): the planner's VarlenPlan and the request it
// came from. Internal to runtime/, so the public header shows no partition/ type.
#pragma once

#include "longattn/varlen_attention.hpp"
#include "partition/varlen_planner.hpp"

namespace longattn {

struct BalancedBatch::Impl {
  BalanceRequest request;
  std::vector<std::int32_t> cu_seqlens;
  partition::VarlenPlan plan;
  BalanceModel model;
};

}  // namespace longattn
