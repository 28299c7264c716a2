// What the C API's opaque handles hold: owners of C++ objects, nothing more.
#pragma once

#include <map>
#include <memory>
#include <string>

#include "longattn/communicator.hpp"
#include "longattn/longattn.h"
#include "longattn/parallel_attention.hpp"
#include "longattn/varlen_attention.hpp"

struct longattn_comm {
  std::unique_ptr<longattn::Communicator> comm;
};

struct longattn_context {
  std::string backend;
  longattn::Device device;
};

struct longattn_attention {
  longattn_context* context;
  longattn_comm* comm;
  longattn::AttentionProblem problem;
  longattn::ParallelOptions options;
  // One planned object per stream a caller has used: ParallelAttention runs on the stream it was
  // made with, and a caller (PyTorch's current stream) may change it between calls. CPU contexts
  // use the null stream only.
  std::map<void*, std::unique_ptr<longattn::ParallelAttention>> by_stream;
  longattn::ParallelAttention& any() const { return *by_stream.begin()->second; }
};

struct longattn_varlen {
  longattn_context* context;
  longattn_comm* comm;
  std::unique_ptr<longattn::BalancedBatch> batch;
  longattn::VarlenOptions options;
  // One executor per stream a caller has used, as for longattn_attention; the null stream's is made
  // at creation and kept, and its backend's device operations serve the remap.
  std::map<void*, std::unique_ptr<longattn::VarlenAttention>> by_stream;
  // Declared last: destroyed first, while the device operations it borrows still exist.
  std::unique_ptr<longattn::VarlenRemap> remap;
};
