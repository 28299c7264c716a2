// A causal ring step as a few plain attention calls. Queries at positions qpos attend keys at kpos
// (one sequence, both sorted increasing) under "key position <= query position". Explicit
// positions cost the kernels their fast path and cuDNN cannot take them at all; but for the shards
// the layouts make (contiguous chunks, zigzag pairs of chunks, strided tokens), the visible pairs
// split into a handful of rectangular blocks that are either fully visible or causal by index
// inside the block (key j visible to query i iff j <= i). Pure: no devices, no communication.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <vector>

#include "longattn/layout.hpp"

namespace longattn::partition {

struct StepBlock {
  std::int64_t q_begin = 0, q_count = 0;  // rows of the query shard
  std::int64_t k_begin = 0, k_count = 0;  // rows of the key shard
  bool causal = false;                    // false: every pair visible; true: key j <= query i
  bool operator==(const StepBlock&) const = default;
};

// The blocks covering exactly the visible pairs, each pair once; empty when nothing is visible;
// nullopt when the positions do not fall into few enough arithmetic runs (the caller then passes
// positions to the kernel). max_blocks bounds the number of kernel calls a step may cost.
std::optional<std::vector<StepBlock>> causal_step_blocks(std::span<const std::int32_t> qpos,
                                                         std::span<const std::int32_t> kpos, int max_blocks = 4);

// The same from the shards' runs (ShardPlan::runs of one sequence), in time and memory that do not
// grow with the number of tokens: what the ring plans with.
std::optional<std::vector<StepBlock>> causal_step_blocks(std::span<const TokenRun> q, std::span<const TokenRun> k,
                                                         int max_blocks = 4);

}  // namespace longattn::partition
