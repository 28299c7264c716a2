// Restricting the server to a set of CPUs (see cpu_affinity.hpp).
#include "offload/cpu_affinity.hpp"

#include <sched.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <fstream>
#include <sstream>

#include <fmt/format.h>

#include "common/check.hpp"

namespace longattn::offload {
namespace {

int parse_cpu(const std::string& item, const std::string& whole) {
  char* end = nullptr;
  errno = 0;
  const long v = std::strtol(item.c_str(), &end, 10);
  LONGATTN_INVALID(!item.empty() && *end == '\0' && errno == 0 && v >= 0 && v < CPU_SETSIZE,
                   "CPU list '{}': '{}' is not a CPU number in [0, {}); write numbers and ranges like 0-3,8", whole, item, CPU_SETSIZE);
  return static_cast<int>(v);
}

std::string to_text(const std::vector<int>& cpus) {
  std::string s;
  for (int c : cpus) {
    if (!s.empty()) s += ',';
    s += std::to_string(c);
  }
  return s;
}

}  // namespace

std::vector<int> parse_cpu_list(const std::string& text) {
  std::vector<int> cpus;
  std::stringstream in(text);
  for (std::string item; std::getline(in, item, ',');) {
    const auto dash = item.find('-');
    if (dash == std::string::npos) {
      cpus.push_back(parse_cpu(item, text));
      continue;
    }
    const int first = parse_cpu(item.substr(0, dash), text), last = parse_cpu(item.substr(dash + 1), text);
    LONGATTN_INVALID(first <= last, "CPU list '{}': the range '{}' runs backwards", text, item);
    for (int c = first; c <= last; ++c) cpus.push_back(c);
  }
  LONGATTN_INVALID(!cpus.empty() && text.back() != ',', "CPU list '{}' is empty or ends with a comma; write numbers and ranges like 0-3,8",
                   text);
  std::sort(cpus.begin(), cpus.end());
  cpus.erase(std::unique(cpus.begin(), cpus.end()), cpus.end());
  return cpus;
}

std::vector<int> numa_node_cpus(int node, const std::string& sys_root) {
  const std::string path = fmt::format("{}/node{}/cpulist", sys_root, node);
  std::ifstream in(path);
  std::string text;
  LONGATTN_INVALID(node >= 0 && in && std::getline(in, text) && !text.empty(),
                   "NUMA node {} does not exist on this host (no {}); `lscpu` lists the nodes", node, path);
  return parse_cpu_list(text);
}

void restrict_to_cpus(const std::vector<int>& cpus) {
  LONGATTN_INVALID(!cpus.empty(), "no CPUs to run on");
  const std::vector<int> allowed = allowed_cpus();
  std::vector<int> missing;
  for (int c : cpus)
    if (!std::binary_search(allowed.begin(), allowed.end(), c)) missing.push_back(c);
  LONGATTN_INVALID(missing.empty(), "CPUs {} are not available to this process (it may use {}); choose among those", to_text(missing),
                   to_text(allowed));
  cpu_set_t set;
  CPU_ZERO(&set);
  for (int c : cpus) CPU_SET(c, &set);
  LONGATTN_INVALID(sched_setaffinity(0, sizeof set, &set) == 0, "cannot restrict the server to CPUs {}: errno {}", to_text(cpus), errno);
}

std::vector<int> allowed_cpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  std::vector<int> cpus;
  if (sched_getaffinity(0, sizeof set, &set) != 0) return cpus;
  for (int c = 0; c < CPU_SETSIZE; ++c)
    if (CPU_ISSET(c, &set)) cpus.push_back(c);
  return cpus;
}

}  // namespace longattn::offload
