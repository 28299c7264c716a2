// read_lengths and cut_to_total_tokens (measure_lengths.hpp).
#include "measure_lengths.hpp"

#include <algorithm>
#include <fstream>
#include <numeric>
#include <sstream>

#include <fmt/format.h>

#include "longattn/error.hpp"

namespace longattn::bench {

std::vector<std::int64_t> read_lengths(const std::string& path) {
  std::ifstream file(path);
  if (!file.is_open()) throw Error(ErrorCode::io, fmt::format("cannot open lengths file {}: check the path", path));
  std::vector<std::int64_t> lengths;
  std::string line;
  for (int number = 1; std::getline(file, line); ++number) {
    const auto first = line.find_first_not_of(" \t\r");
    if (first == std::string::npos || line[first] == '#') continue;
    std::istringstream fields(line);
    long long length = 0;
    std::string extra;
    if (!(fields >> length) || (fields >> extra))
      throw Error(ErrorCode::io, fmt::format("{}:{}: expected one sequence length (an integer), got `{}`", path, number, line));
    lengths.push_back(length);
  }
  if (lengths.empty())
    throw Error(ErrorCode::io, fmt::format("{}: no lengths in it; write one sequence length per line", path));
  return lengths;
}

std::vector<std::int64_t> cut_to_total_tokens(const std::vector<std::int64_t>& lengths, std::int64_t total_tokens) {
  const std::int64_t total = std::accumulate(lengths.begin(), lengths.end(), std::int64_t{0});
  if (total_tokens <= 0 || total <= total_tokens || lengths.empty()) return lengths;
  const std::int64_t longest_allowed = std::max<std::int64_t>(total_tokens / 2, 1);
  const auto longest = static_cast<std::size_t>(std::max_element(lengths.begin(), lengths.end()) - lengths.begin());
  std::int64_t room = total_tokens - std::min(lengths[longest], longest_allowed);
  std::vector<bool> kept(lengths.size(), false);
  kept[longest] = true;
  for (std::size_t s = 0; s < lengths.size(); ++s) {
    const std::int64_t length = std::min(lengths[s], longest_allowed);
    if (s == longest || length > room) continue;
    kept[s] = true;
    room -= length;
  }
  std::vector<std::int64_t> out;
  for (std::size_t s = 0; s < lengths.size(); ++s)
    if (kept[s]) out.push_back(std::min(lengths[s], longest_allowed));
  return out;
}

}  // namespace longattn::bench
