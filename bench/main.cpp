// longattn-bench <subcommand> [flags]: dispatch to the registered benchmarks.
#include <cstdio>
#include <cstring>
#include <exception>

#include "bench_registry.hpp"
#include "longattn/error.hpp"

namespace longattn::bench {
std::vector<BenchInfo>& registry() {
  static std::vector<BenchInfo> r;
  return r;
}
}  // namespace longattn::bench

int main(int argc, char** argv) {
  using longattn::bench::registry;
  auto usage = [] {
    std::fprintf(stderr, "usage: longattn-bench <benchmark> [flags]\nbenchmarks:\n");
    for (const auto& b : registry()) std::fprintf(stderr, "  %-10s %s\n", b.name.c_str(), b.summary.c_str());
  };
  if (argc < 2 || !std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "-h")) {
    usage();
    return argc < 2 ? 2 : 0;
  }
  for (const auto& b : registry()) {
    if (b.name != argv[1]) continue;
    try {
      return b.run(argc - 1, argv + 1);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "longattn-bench %s: error: %s\n", argv[1], e.what());
      return 1;
    }
  }
  std::fprintf(stderr, "longattn-bench: unknown benchmark '%s'\n", argv[1]);
  usage();
  return 2;
}
