// longattn-bench subcommands register themselves here: one file per benchmark, each ending its
// output with a RESULT {json} line.
#pragma once

#include <functional>
#include <string>
#include <vector>

namespace longattn::bench {

using BenchMain = std::function<int(int argc, char** argv)>;  // argv[0] is the subcommand name

struct BenchInfo {
  std::string name, summary;
  BenchMain run;
};

std::vector<BenchInfo>& registry();

struct Register {
  Register(std::string name, std::string summary, BenchMain run) {
    registry().push_back({std::move(name), std::move(summary), std::move(run)});
  }
};

}  // namespace longattn::bench
