// The machine file: a description of a machine for the cost model in one text file, so that the
// `auto` strategy choice can be told a cluster's links and kernel rates instead of probing and
// guessing them. It extends the kernel-rate table format (cost_model.hpp) with a few more lines:
//
//   # comments (from '#' to the end of a line) and blank lines are skipped
//   causal 128 8192 586 504          kernel rates: causal|full <head_dim> <length> <fwd> <bwd> TFLOP/s
//   link intra_node 348 5            a link tier: <GB/s per GPU, one direction> <latency in us>
//   link inter_node 50 10
//   linear_seconds_per_token 1.3e-8  linear layers of one layer, forward, per token
//
// Every line kind is optional: what the file leaves out comes from the built-in machine of the
// device (and links from the startup probe), what it gives replaces that.
#pragma once

#include <iosfwd>
#include <optional>
#include <string>

#include "partition/cost_model.hpp"

namespace longattn::partition {

struct MachineFile {
  std::string source;      // the path or name it was read from, for messages
  KernelRateTable rates;   // empty when the file gives no rate lines
  std::optional<Link> intra_node, inter_node;
  std::optional<double> linear_seconds_per_token;

  bool gives_links() const noexcept { return intra_node.has_value() && inter_node.has_value(); }
};

// Throws Error(io) naming "<source_name>:<line>" and the line kinds it accepts on a malformed line:
// an unknown keyword, a missing or extra field, a value that is not a positive finite number, a
// tier given twice.
MachineFile parse_machine_file(std::istream& in, const std::string& source_name);
// Throws Error(io) when the file cannot be opened, naming the path.
MachineFile load_machine_file(const std::string& path);

// `base` with everything the file gives put in its place; the name says that a file was applied.
MachineModel apply_machine_file(MachineModel base, const MachineFile& file);

}  // namespace longattn::partition
