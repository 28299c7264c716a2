// The machine file: every line kind read back with its units (GB/s, microseconds), rate lines with
// the rate table's rules, what a file leaves out kept from the built-in machine, and each malformed
// line refused with file:line and what the file accepts.
#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

#include <fmt/format.h>

#include "longattn/error.hpp"
#include "partition/machine_file.hpp"
#include "support/test_util.hpp"

namespace longattn {
namespace {

using namespace partition;

double uniform(std::mt19937_64& rng, double lo, double hi) { return std::uniform_real_distribution<double>(lo, hi)(rng); }

MachineFile parse(const std::string& text) {
  std::istringstream in(text);
  return parse_machine_file(in, "cluster.machine");
}

// Expects Error(io) whose message holds every one of `parts`.
void expect_refused(const std::string& text, std::initializer_list<std::string> parts) {
  try {
    parse(text);
    ADD_FAILURE() << "accepted:\n" << text;
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::io) << e.what();
    for (const auto& p : parts) EXPECT_NE(std::string(e.what()).find(p), std::string::npos) << e.what() << " lacks `" << p << "`";
  }
}

TEST(MachineFile, EveryLineKindWithItsUnits) {
  const auto seed = test::fresh_seed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  const double intra_gbs = uniform(rng, 100, 900), intra_us = uniform(rng, 1, 9);
  const double inter_gbs = uniform(rng, 5, 50), inter_us = uniform(rng, 5, 50);
  const double linear = uniform(rng, 1e-9, 1e-7);
  const double fwd_short = uniform(rng, 50, 200), bwd_short = uniform(rng, 20, 150);
  const double fwd_long = uniform(rng, 300, 600), bwd_long = uniform(rng, 200, 500);
  const auto text = fmt::format(
      "# a two-node test cluster\n\n  causal 128 1024 {} {} # short blocks\ncausal 128 65536 {} {}\n"
      "link intra_node {} {}  # NVLink\n\tlink inter_node {} {}  \nlinear_seconds_per_token {}#no space\n",
      fwd_short, bwd_short, fwd_long, bwd_long, intra_gbs, intra_us, inter_gbs, inter_us, linear);
  const MachineFile file = parse(text);
  EXPECT_EQ(file.source, "cluster.machine");
  ASSERT_TRUE(file.gives_links());
  EXPECT_NEAR(file.intra_node->bytes_per_second, intra_gbs * 1e9, intra_gbs * 1e-3);
  EXPECT_NEAR(file.intra_node->latency_seconds, intra_us * 1e-6, 1e-15);
  EXPECT_NEAR(file.inter_node->bytes_per_second, inter_gbs * 1e9, inter_gbs * 1e-3);
  EXPECT_NEAR(file.inter_node->latency_seconds, inter_us * 1e-6, 1e-15);
  ASSERT_TRUE(file.linear_seconds_per_token.has_value());
  EXPECT_DOUBLE_EQ(*file.linear_seconds_per_token, linear);
  EXPECT_NEAR(file.rates.forward_tflops(1024, 1024, true, 128), fwd_short, 1e-9);
  EXPECT_NEAR(file.rates.backward_tflops(65536, 65536, true, 128), bwd_long, 1e-9);
  // The log-midpoint of the two lengths: the mean of the rates (the table's interpolation).
  EXPECT_NEAR(file.rates.forward_tflops(8192, 8192, true, 128), (fwd_short + fwd_long) / 2, 1e-9);

  const MachineModel machine = apply_machine_file(default_machine("h100"), file);
  EXPECT_EQ(machine.name, "h100 with cluster.machine");
  EXPECT_DOUBLE_EQ(machine.inter_node.bytes_per_second, file.inter_node->bytes_per_second);
  EXPECT_DOUBLE_EQ(machine.intra_node.latency_seconds, file.intra_node->latency_seconds);
  EXPECT_DOUBLE_EQ(machine.linear_seconds_per_token, linear);
  EXPECT_NEAR(machine.rates.forward_tflops(1024, 1024, true, 128), fwd_short, 1e-9);
  // The file's table replaces the built-in one whole: no full-attention curve of the h100 is left.
  EXPECT_NEAR(machine.rates.forward_tflops(1024, 1024, false, 64), fwd_short, 1e-9);
}

TEST(MachineFile, WhatTheFileLeavesOutStaysBuiltIn) {
  const auto seed = test::fresh_seed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  const double inter_gbs = uniform(rng, 1, 20);
  const MachineFile file = parse(fmt::format("link inter_node {} 0\n", inter_gbs));
  EXPECT_FALSE(file.gives_links());
  EXPECT_FALSE(file.intra_node.has_value());
  EXPECT_TRUE(file.rates.empty());
  EXPECT_FALSE(file.linear_seconds_per_token.has_value());
  const MachineModel base = default_machine("h200");
  const MachineModel machine = apply_machine_file(base, file);
  EXPECT_NEAR(machine.inter_node.bytes_per_second, inter_gbs * 1e9, inter_gbs * 1e-3);
  EXPECT_EQ(machine.inter_node.latency_seconds, 0);
  EXPECT_EQ(machine.intra_node.bytes_per_second, base.intra_node.bytes_per_second);
  EXPECT_EQ(machine.linear_seconds_per_token, base.linear_seconds_per_token);
  EXPECT_EQ(machine.rates.forward_tflops(4096, 4096, true, 128), base.rates.forward_tflops(4096, 4096, true, 128));
}

TEST(MachineFile, MalformedLinesNameFileAndLine) {
  expect_refused("link intra_node 300 5\nlnk inter_node 50 10\n", {"cluster.machine:2:", "unknown line", "link intra_node|inter_node"});
  expect_refused("# header\nlink inter_node fast 10\n", {"cluster.machine:2:", "bandwidth", "positive"});
  expect_refused("link inter_node 0 10\n", {"cluster.machine:1:", "bandwidth"});
  expect_refused("link inter_node 50 -1\n", {"cluster.machine:1:", "latency", "non-negative"});
  expect_refused("link inter_node 50\n", {"cluster.machine:1:", "latency"});
  expect_refused("link inter_node 50 10 extra\n", {"cluster.machine:1:", "unexpected `extra`"});
  expect_refused("link inter_node nan 10\n", {"cluster.machine:1:", "finite"});
  expect_refused("link between_racks 50 10\n", {"cluster.machine:1:", "intra_node or inter_node", "between_racks"});
  expect_refused("link intra_node 300 5\n\nlink intra_node 200 5\n", {"cluster.machine:3:", "second `link intra_node`"});
  expect_refused("linear_seconds_per_token\n", {"cluster.machine:1:", "linear_seconds_per_token"});
  expect_refused("linear_seconds_per_token 1e-8\nlinear_seconds_per_token 2e-8\n", {"cluster.machine:2:", "second"});
  // Rate lines keep this file's line numbers through the rate table's parser.
  expect_refused("link intra_node 300 5\n# rates\ncausal 128 4096 500\n", {"cluster.machine:3:", "causal|full <head_dim>"});
  expect_refused("causal 128 4096 500 400\nlink inter_node 50 10\ncausal 128 4096 510 410\n", {"cluster.machine:3:", "second point"});
  expect_refused("# nothing but comments\n\n", {"cluster.machine", "empty"});
}

TEST(MachineFile, LoadsFromDiskAndNamesAMissingPath) {
  const auto seed = test::fresh_seed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  const double intra_gbs = uniform(rng, 100, 500);
  const auto path = std::filesystem::temp_directory_path() / fmt::format("longattn_machine_{}.txt", seed);
  {
    std::ofstream out(path);
    out << fmt::format("link intra_node {} 3\nlink inter_node 25 12\nlink inter_node", intra_gbs);
  }
  try {
    load_machine_file(path.string());
    ADD_FAILURE() << "a truncated last line was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(path.string() + ":3:"), std::string::npos) << e.what();
  }
  {
    std::ofstream out(path);
    out << fmt::format("link intra_node {} 3\nlink inter_node 25 12\n", intra_gbs);
  }
  const MachineFile file = load_machine_file(path.string());
  EXPECT_EQ(file.source, path.string());
  EXPECT_NEAR(file.intra_node->bytes_per_second, intra_gbs * 1e9, intra_gbs * 1e-3);
  std::filesystem::remove(path);
  try {
    load_machine_file(path.string());
    ADD_FAILURE() << "a missing file was accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::io);
    EXPECT_NE(std::string(e.what()).find("cannot open machine file " + path.string()), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace longattn
