// Where a server's threads may run (--cpus LIST, --numa-node N). Servers sharing one host otherwise
// share all its cores and memory channels as the OS places them; restricted to one socket's CPUs,
// a server's kernel threads read KV from that socket's memory (pages are first touched by the
// server's own threads, so the default first-touch policy keeps them local).
#pragma once

#include <string>
#include <vector>

namespace longattn::offload {

// "0-3,8,10-11" -> {0, 1, 2, 3, 8, 10, 11} (sorted, no repeats). Throws Error(invalid_argument)
// naming the item that is not a CPU number or range.
std::vector<int> parse_cpu_list(const std::string& text);

// The CPUs of NUMA node `node`, read from <sys_root>/node<N>/cpulist. Throws Error(invalid_argument)
// when the node does not exist.
std::vector<int> numa_node_cpus(int node, const std::string& sys_root = "/sys/devices/system/node");

// Restricts the calling thread, and every thread it starts afterwards, to `cpus`: call it before
// the server starts its threads. Throws Error(invalid_argument) naming the CPUs this process may
// not use.
void restrict_to_cpus(const std::vector<int>& cpus);

// The CPUs the calling thread may run on.
std::vector<int> allowed_cpus();

}  // namespace longattn::offload
