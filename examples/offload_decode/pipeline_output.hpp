// What offload_decode prints about a pipelined (offloaded) decode, the same for the model on the
// CPU and on the GPU: the pipeline's per-step figures and the servers' decode-kernel time and rate
// over the decode (read from their metrics before and after), as table lines and RESULT keys.
#pragma once

#include <algorithm>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "decode_common.hpp"
#include "pipeline_stats.hpp"

namespace offload_decode {

// The servers' decode kernels between construction and finish(): the busiest server's kernel time
// and the rate all of them read KV at.
class ServerKernelMeter {
 public:
  ServerKernelMeter(longattn::offload::Client& c, std::size_t servers)
      : client_(c),
        servers_(servers),
        seconds_(servers_metric(c, servers, "longattn_offload_kernel_seconds_total")),
        bytes_(servers_metric(c, servers, "longattn_offload_kernel_kv_bytes_read_total")) {}
  void finish() {
    const auto seconds = servers_metric(client_, servers_, "longattn_offload_kernel_seconds_total");
    const auto bytes = servers_metric(client_, servers_, "longattn_offload_kernel_kv_bytes_read_total");
    double sum_s = 0, read = 0;
    for (std::size_t i = 0; i < servers_; ++i) {
      busiest_s = std::max(busiest_s, seconds[i] - seconds_[i]);
      sum_s += seconds[i] - seconds_[i];
      read += bytes[i] - bytes_[i];
    }
    gbps_per_server = sum_s > 0 ? read / sum_s / 1e9 : 0;
  }
  double busiest_s = 0;        // kernel seconds of the busiest server
  double gbps_per_server = 0;  // KV bytes read over kernel seconds, all servers together

 private:
  longattn::offload::Client& client_;
  std::size_t servers_;
  std::vector<double> seconds_, bytes_;
};

// The table lines (indented, after the run's own) and the RESULT keys (a leading comma each).
inline std::string pipeline_lines(const PipelineReport& p, int micro_batches, const ServerKernelMeter& k, int steps, const char* model_side) {
  return fmt::format("  {} micro-batch{}: {} busy {:.1f}% of the time, {:.3f} ms between tokens, attention wait {:.3f} ms per step\n"
                     "  per micro-batch and layer: {} {:.3f} ms, attention {:.3f} ms; bound {:.1f} tokens/s, reached {:.2f} of it\n"
                     "  servers' decode kernels: {:.3f} ms per step on the busiest server, {:.2f} GB/s of KV read per server\n",
                     micro_batches, micro_batches == 1 ? "" : "es", model_side, 100 * p.compute_busy_fraction, p.time_between_tokens_s * 1e3,
                     p.attention_wait_s_per_step * 1e3, model_side, p.compute_s_per_part * 1e3, p.attention_s_per_part * 1e3,
                     p.bound_tokens_per_s, p.ratio(), k.busiest_s * 1e3 / steps, k.gbps_per_server);
}

inline std::string pipeline_json(const PipelineReport& p, int micro_batches, const ServerKernelMeter& k, int steps) {
  return fmt::format(",\"micro_batches\":{},\"compute_busy_fraction\":{:.4f},\"time_between_tokens_ms\":{:.4f},\"attention_wait_ms_per_step\":{:.4f},"
                     "\"compute_ms_per_part\":{:.4f},\"attention_ms_per_part\":{:.4f},\"bound_tokens_per_s\":{:.3f},\"tokens_per_s_over_bound\":{:.4f},"
                     "\"server_kernel_ms_per_step\":{:.4f},\"server_kernel_gbps\":{:.3f}",
                     micro_batches, p.compute_busy_fraction, p.time_between_tokens_s * 1e3, p.attention_wait_s_per_step * 1e3,
                     p.compute_s_per_part * 1e3, p.attention_s_per_part * 1e3, p.bound_tokens_per_s, p.ratio(), k.busiest_s * 1e3 / steps,
                     k.gbps_per_server);
}

// Micro-batch m's sequences: B split into N groups of consecutive sequences, sizes differing by one.
struct MicroBatchRange {
  int first = 0, count = 0;
};
inline std::vector<MicroBatchRange> split_batch(int batch, int micro_batches) {
  std::vector<MicroBatchRange> r;
  for (int m = 0, first = 0; m < micro_batches; ++m) {
    const int count = batch / micro_batches + (m < batch % micro_batches ? 1 : 0);
    r.push_back({first, count});
    first += count;
  }
  return r;
}

}  // namespace offload_decode
