// The machine file's parser: its own lines (links, the linear-layer coefficient) here, the kernel-
// rate lines handed to the rate table's parser with their line numbers kept.
#include "partition/machine_file.hpp"

#include <cmath>
#include <fstream>
#include <istream>
#include <sstream>

#include <fmt/format.h>

#include "common/check.hpp"

namespace longattn::partition {

namespace {

constexpr const char* kLineKinds =
    "a machine file takes `causal|full <head_dim> <length> <forward_tflops> <backward_tflops>`, "
    "`link intra_node|inter_node <GB/s> <latency_us>` and `linear_seconds_per_token <seconds>` lines";

// One line's fields after its keyword; `where` is "<source>:<line>" for messages.
struct LineReader {
  std::istringstream fields;
  std::string where, text;

  double number(const char* what, bool zero_allowed) {
    double value = 0;
    const bool read = static_cast<bool>(fields >> value);
    LONGATTN_REQUIRE(read && std::isfinite(value) && (value > 0 || (zero_allowed && value == 0)), ErrorCode::io,
                     "{}: {} must be a {} number, in `{}`; {}", where, what, zero_allowed ? "finite, non-negative" : "positive, finite",
                     text, kLineKinds);
    return value;
  }
  void end() {
    std::string extra;
    LONGATTN_REQUIRE(!(fields >> extra), ErrorCode::io, "{}: unexpected `{}` at the end of `{}`; {}", where, extra, text,
                     kLineKinds);
  }
};

}  // namespace

MachineFile parse_machine_file(std::istream& in, const std::string& source_name) {
  MachineFile file;
  file.source = source_name;
  // The rate lines go to parse_rate_table with every other line blanked, so its messages keep
  // the line numbers of this file.
  std::string rate_lines;
  bool any_rate = false, any_line = false;
  std::string line;
  for (int line_number = 1; std::getline(in, line); ++line_number) {
    // A '#' starts a comment anywhere on a line, so each line can say where its figure came from.
    line = line.substr(0, line.find('#'));
    const auto first = line.find_first_not_of(" \t\r");
    const bool blank = first == std::string::npos || line[first] == '#';
    std::string keyword;
    if (!blank) std::istringstream(line) >> keyword;
    const bool rate = keyword == "causal" || keyword == "full";
    rate_lines += (rate ? line : std::string()) + '\n';
    if (blank) continue;
    any_line = true;
    any_rate |= rate;
    if (rate) continue;
    LineReader reader{std::istringstream(line), fmt::format("{}:{}", source_name, line_number), line};
    reader.fields >> keyword;
    if (keyword == "link") {
      std::string tier;
      reader.fields >> tier;
      LONGATTN_REQUIRE(tier == "intra_node" || tier == "inter_node", ErrorCode::io,
                       "{}: link tier must be intra_node or inter_node, got `{}` in `{}`", reader.where, tier, line);
      auto& slot = tier == "intra_node" ? file.intra_node : file.inter_node;
      LONGATTN_REQUIRE(!slot, ErrorCode::io, "{}: a second `link {}` line; give each tier once", reader.where, tier);
      const double gigabytes_per_second = reader.number("the bandwidth (GB/s)", false);
      const double latency_us = reader.number("the latency (us)", true);
      reader.end();
      slot = Link{gigabytes_per_second * 1e9, latency_us * 1e-6};
    } else if (keyword == "linear_seconds_per_token") {
      LONGATTN_REQUIRE(!file.linear_seconds_per_token, ErrorCode::io,
                       "{}: a second `linear_seconds_per_token` line; give it once", reader.where);
      file.linear_seconds_per_token = reader.number("linear_seconds_per_token", true);
      reader.end();
    } else {
      throw Error(ErrorCode::io, fmt::format("{}: unknown line `{}`: {}", reader.where, line, kLineKinds));
    }
  }
  LONGATTN_REQUIRE(any_line, ErrorCode::io, "{}: the machine file is empty; {}", source_name, kLineKinds);
  if (any_rate) {
    std::istringstream rates(rate_lines);
    file.rates = parse_rate_table(rates, source_name);
  }
  return file;
}

MachineFile load_machine_file(const std::string& path) {
  std::ifstream in(path);
  LONGATTN_REQUIRE(in.is_open(), ErrorCode::io, "cannot open machine file {}: check the path and its permissions", path);
  return parse_machine_file(in, path);
}

MachineModel apply_machine_file(MachineModel base, const MachineFile& file) {
  if (!file.rates.empty()) base.rates = file.rates;
  if (file.intra_node) base.intra_node = *file.intra_node;
  if (file.inter_node) base.inter_node = *file.inter_node;
  if (file.linear_seconds_per_token) base.linear_seconds_per_token = *file.linear_seconds_per_token;
  base.name = fmt::format("{} with {}", base.name, file.source);
  return base;
}

}  // namespace longattn::partition
