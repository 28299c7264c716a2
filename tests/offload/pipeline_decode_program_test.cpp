// offload_decode --micro-batches N --check against two servers started here on loopback: for N = 1,
// 2, 3 the pipelined decode equals local attention, and the RESULT line carries the pipeline's
// report (busy fraction, bound, tokens/s over the bound). A micro-batch count above the batch is
// refused in one line. The same with --device cuda where a GPU is visible.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <regex>
#include <string>
#include <vector>

#include "daemon_process.hpp"
#include "offload_test_util.hpp"
#include "support/test_util.hpp"

namespace longattn::offload {
namespace {

struct ProgramRun {
  int status = -1;
  std::string output;
};

ProgramRun run_program(const std::string& command) {
  ProgramRun r;
  std::FILE* p = ::popen((command + " 2>&1").c_str(), "r");
  if (!p) return r;
  char buf[4096];
  while (std::fgets(buf, sizeof buf, p)) r.output += buf;
  const int st = ::pclose(p);
  r.status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return r;
}

double json_number(const std::string& text, const std::string& key) {
  std::smatch m;
  if (!std::regex_search(text, m, std::regex("\"" + key + "\":(-?[0-9.eE+-]+)"))) return -1;
  return std::stod(m[1]);
}

#ifdef LONGATTN_OFFLOAD_DECODE_PROGRAM
// offload_decode with `model` (its device and size flags) against two loopback servers, with 1, 2
// and 3 micro-batches and --check: every run passes, matches local attention and reports its
// micro-batches and a busy fraction in (0, 1]. Returns the RESULT lines; none where the program
// says this machine has no CUDA.
std::vector<std::string> micro_batch_runs(const std::string& model) {
  auto s1 = test::start_server(), s2 = test::start_server();
  test::TempDir dir;
  const std::string token = dir.file("token");
  std::ofstream(token) << test::kToken << "\n";
  const auto seed = ::longattn::test::fresh_seed();
  SCOPED_TRACE(seed);
  std::vector<std::string> results;
  for (int n : {1, 2, 3}) {
    const std::string cmd = std::string(LONGATTN_OFFLOAD_DECODE_PROGRAM) + " " + model + " --servers " + test::addr(*s1) + "," +
                            test::addr(*s2) + " --token-file " + token + " --check --seed " + std::to_string(seed % 1000000) +
                            " --micro-batches " + std::to_string(n);
    const ProgramRun r = run_program(cmd);
    if (r.output.find("this build has no CUDA") != std::string::npos || r.output.find("no CUDA GPU is visible") != std::string::npos)
      return {};
    EXPECT_EQ(r.status, 0) << cmd << "\n" << r.output;
    const auto at = r.output.rfind("RESULT {");
    EXPECT_NE(at, std::string::npos) << r.output;
    if (r.status != 0 || at == std::string::npos) return results;
    const std::string result = r.output.substr(at);
    EXPECT_NE(result.find("\"checked\":true"), std::string::npos) << result;
    EXPECT_LT(json_number(result, "max_error"), 1e-3) << result;
    EXPECT_EQ(json_number(result, "micro_batches"), n) << result;
    EXPECT_GT(json_number(result, "compute_busy_fraction"), 0) << result;
    EXPECT_LE(json_number(result, "compute_busy_fraction"), 1) << result;
    EXPECT_GT(json_number(result, "tokens_per_s_over_bound"), 0) << result;
    results.push_back(result);
  }
  return results;
}

TEST(OffloadDecodeProgram, MicroBatchesOneTwoThreeMatchLocalAttention) {
  const auto results = micro_batch_runs("--layers 2 --batch 5 --context 96 --steps 3 --heads 4 --kv-heads 2 --head-dim 16");
  EXPECT_EQ(results.size(), 3u);
  for (const auto& result : results) {
    EXPECT_GT(json_number(result, "bound_tokens_per_s"), 0) << result;
    EXPECT_GT(json_number(result, "attention_ms_per_part"), 0) << result;
  }
}

// The same with the model on the GPU (each micro-batch on its own stream); skipped where this build
// has no CUDA or no GPU is visible.
TEST(OffloadDecodeProgram, GpuMicroBatchesOneTwoThreeMatchLocalAttention) {
  const auto results =
      micro_batch_runs("--device cuda --layers 2 --batch 5 --context 300 --steps 3 --heads 4 --kv-heads 2 --head-dim 64");
  if (results.empty() && !HasFailure()) GTEST_SKIP() << "no CUDA here";
  EXPECT_EQ(results.size(), 3u);
}

TEST(OffloadDecodeProgram, MoreMicroBatchesThanSequencesRefused) {
  test::TempDir dir;
  const std::string token = dir.file("token");
  std::ofstream(token) << test::kToken << "\n";
  const ProgramRun r = run_program(std::string(LONGATTN_OFFLOAD_DECODE_PROGRAM) + " --servers 127.0.0.1:1 --token-file " + token +
                            " --batch 2 --micro-batches 3");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("--micro-batches 3 exceeds --batch 2"), std::string::npos) << r.output;
  EXPECT_EQ(std::count(r.output.begin(), r.output.end(), '\n'), 1) << r.output;
}
#endif

}  // namespace
}  // namespace longattn::offload
