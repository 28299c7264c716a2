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
  // --help answers on stdout with exit 0; a usage error goes to stderr with exit 2.
  auto usage = [](std::FILE* out) {
    std::fprintf(out, "usage: longattn-bench <benchmark> [flags]   (longattn-bench <benchmark> --help for its flags)\nbenchmarks:\n");
    for (const auto& b : registry()) std::fprintf(out, "  %-12s %s\n", b.name.c_str(), b.summary.c_str());
  };
  if (argc < 2) {
    usage(stderr);
    return 2;
  }
  if (!std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "-h") || !std::strcmp(argv[1], "help")) {
    usage(stdout);
    return 0;
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
  usage(stderr);
  return 2;
}
