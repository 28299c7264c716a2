// The server's --cpus / --numa-node: CPU lists parsed by hand-checked cases, bad ones refused with
// the item named, a NUMA node's CPUs read from a sysfs-like folder, and a thread restricted to one
// of the CPUs it may use (what the server's threads inherit), then restored.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <thread>

#include "longattn/error.hpp"
#include "offload/cpu_affinity.hpp"

namespace longattn::offload {
namespace {

std::string refusal(const std::string& list) {
  try {
    parse_cpu_list(list);
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::invalid_argument);
    return e.what();
  }
  return "";
}

TEST(CpuAffinity, ParsesListsAndRanges) {
  EXPECT_EQ(parse_cpu_list("0-3,8,10-11"), (std::vector<int>{0, 1, 2, 3, 8, 10, 11}));
  EXPECT_EQ(parse_cpu_list("5"), (std::vector<int>{5}));
  EXPECT_EQ(parse_cpu_list("3,1,2-3"), (std::vector<int>{1, 2, 3}));  // sorted, no repeats
  EXPECT_NE(refusal("").find("empty"), std::string::npos);
  EXPECT_NE(refusal("0,,1").find("''"), std::string::npos);
  EXPECT_NE(refusal("1,").find("ends with a comma"), std::string::npos);
  EXPECT_NE(refusal("a-3").find("'a'"), std::string::npos);
  EXPECT_NE(refusal("4-2").find("backwards"), std::string::npos);
  EXPECT_NE(refusal("-1").find("not a CPU number"), std::string::npos);
  EXPECT_NE(refusal("99999").find("'99999'"), std::string::npos);
}

TEST(CpuAffinity, NumaNodeCpusFromSysfs) {
  const auto dir = std::filesystem::temp_directory_path() / ("longattn-numa-" + std::to_string(std::random_device{}()));
  std::filesystem::create_directories(dir / "node1");
  std::ofstream(dir / "node1" / "cpulist") << "16-19,48\n";
  EXPECT_EQ(numa_node_cpus(1, dir.string()), (std::vector<int>{16, 17, 18, 19, 48}));
  try {
    numa_node_cpus(7, dir.string());
    ADD_FAILURE() << "node 7 does not exist";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("NUMA node 7"), std::string::npos) << e.what();
  }
  std::filesystem::remove_all(dir);
}

TEST(CpuAffinity, RestrictsTheThreadAndWhatItStarts) {
  // In a thread of its own, so the test process keeps its CPUs.
  std::thread([] {
    const std::vector<int> allowed = allowed_cpus();
    ASSERT_FALSE(allowed.empty());
    const int pick = allowed[std::random_device{}() % allowed.size()];
    restrict_to_cpus({pick});
    EXPECT_EQ(allowed_cpus(), std::vector<int>{pick});
    std::vector<int> seen_by_child;
    std::thread([&] { seen_by_child = allowed_cpus(); }).join();
    EXPECT_EQ(seen_by_child, std::vector<int>{pick});
    // A CPU the process may not use is refused, naming it.
    int absent = 0;
    while (std::find(allowed.begin(), allowed.end(), absent) != allowed.end()) ++absent;
    try {
      restrict_to_cpus({absent});
      ADD_FAILURE() << "CPU " << absent << " is not available";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("CPUs " + std::to_string(absent) + " are not available"), std::string::npos) << e.what();
    }
  }).join();
}

}  // namespace
}  // namespace longattn::offload
