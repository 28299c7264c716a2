// The built-in machines: kernel-rate curves, links and linear-layer coefficients of the GPUs we
// measured and of one CPU thread, each with its source beside it.
#include <algorithm>
#include <string>
#include <vector>

#include <fmt/ranges.h>

#include "common/check.hpp"
#include "partition/cost_model.hpp"

namespace longattn::partition {
// ---- built-in machines -----------------------------------------------------------------------

namespace {

// Backward rate from a forward rate and a combined forward+backward rate, both counted with the
// backward as kBackwardFlopFactor x forward FLOPs, which is how the length curve was reported.
double backward_from_combined(double forward_tflops, double combined_tflops) {
  return kBackwardFlopFactor / ((1 + kBackwardFlopFactor) / combined_tflops - 1 / forward_tflops);
}

struct CombinedPoint {
  std::int64_t length;
  double forward_tflops, forward_backward_tflops;
};

// cuDNN through PyTorch SDPA, causal, bf16, 32 heads, head dim 128, one H200, forward / forward+
// backward by block length: bench/results/cost_model_defaults_2026-12-05.md, first table. It is
// the only curve that reaches short blocks, so the other curves borrow its shape.
constexpr CombinedPoint kH200CausalD128[] = {
    {128, 138, 58},     {256, 269, 115},    {512, 381, 200},    {1024, 487, 300},
    {2048, 545, 378},   {4096, 557, 448},   {8192, 572, 495},   {16384, 577, 518},
    {32768, 592, 534},  {65536, 593, 544},  {131072, 547, 535},
};
constexpr std::int64_t kShapeAnchorLength = 8192;

std::vector<RatePoint> h200_causal_d128() {
  std::vector<RatePoint> points;
  for (const auto& p : kH200CausalD128)
    points.push_back({p.length, p.forward_tflops, backward_from_combined(p.forward_tflops, p.forward_backward_tflops)});
  return points;
}

struct MeasuredCurve {
  bool causal;
  int head_dim;
  RatePoint at_8k, at_32k, at_128k;
};

// The longattn `cudnn` backend on one H100, bf16, 32 heads: bench/results/gpu_kernels_h100_2026-11-23.md,
// section "Update, 21:22 UTC", column "ours cudnn" (forward / backward, backward counted 2.5x).
constexpr MeasuredCurve kH100Cudnn[] = {
    {true, 128, {8192, 586, 504}, {32768, 659, 576}, {131072, 558, 536}},
    {false, 128, {8192, 629, 558}, {32768, 635, 572}, {131072, 608, 547}},
    {true, 64, {8192, 446, 412}, {32768, 495, 436}, {131072, 446, 417}},
    {false, 64, {8192, 482, 470}, {32768, 506, 489}, {131072, 444, 432}},
};

// Below 8k no H100 point was measured: those lengths take the H200 causal curve scaled to meet the
// H100 curve at 8k. Full attention has no diagonal tiles and likely loses less at short lengths, so
// this is pessimistic for it until a calibration run measures the short end.
void add_h100_curve(KernelRateTable& table, const MeasuredCurve& measured) {
  const auto shape = h200_causal_d128();
  const auto anchor = std::find_if(shape.begin(), shape.end(), [](const RatePoint& p) { return p.length == kShapeAnchorLength; });
  const double forward_scale = measured.at_8k.forward_tflops / anchor->forward_tflops;
  const double backward_scale = measured.at_8k.backward_tflops / anchor->backward_tflops;
  for (const auto& p : shape)
    if (p.length < kShapeAnchorLength)
      table.add(measured.causal, measured.head_dim,
                {p.length, p.forward_tflops * forward_scale, p.backward_tflops * backward_scale});
  for (const auto& p : {measured.at_8k, measured.at_32k, measured.at_128k}) table.add(measured.causal, measured.head_dim, p);
}

// Links: bench/results/cost_model_defaults_2026-12-05.md, "Links and linear layers". Inside a
// node, NCCL send/recv per direction per GPU measured on the H200 pair (H100 and H200 share NVLink
// 4, so H100 takes the same). Across nodes nothing was measured: one 400 Gb/s NIC per GPU, the top
// of the range issue 13 names; override it where the cluster is slower. The latencies are assumed,
// not measured: a startup probe should replace them.
constexpr Link kNvlink{348e9, 5e-6};
constexpr Link kNetwork{50e9, 10e-6};

// Linear layers of a hidden-4096 layer (32 heads x 128) at the bf16 GEMM rate measured on each GPU
// (same file, same section): a lower bound on their time until a trainer gives its own coefficient.
constexpr std::int64_t kDefaultHidden = 4096;

// The CPU machine: one thread of the fast CPU backend, fp32, 4 heads, best of 3 after a warm-up,
// by `longattn-bench kernels` (bench/results/cpu_machine_2026-12-05.md, the points marked "used").
// The build machine was shared with other builds while it ran, so the figures are rough; only the
// runs that were not visibly disturbed went in. A rank with more threads scales them (the caller's
// job: the model knows no threads). Short causal blocks lose to their diagonal as on GPUs.
struct CpuPoint {
  bool causal;
  int head_dim;
  RatePoint point;
};
constexpr CpuPoint kCpuOneThread[] = {
    {false, 64, {128, 0.128, 0.112}},  {false, 64, {1024, 0.115, 0.116}},
    {true, 64, {128, 0.0465, 0.0504}}, {true, 64, {1024, 0.0965, 0.0814}},
    {false, 128, {128, 0.148, 0.110}}, {true, 128, {128, 0.0644, 0.0644}},
};
// Links of CPU ranks are assumed, not measured: MPI over shared memory inside a node, a 10 Gb/s
// network across nodes. The startup probe replaces both wherever a job has the ranks to measure.
constexpr Link kSharedMemory{10e9, 2e-6};
constexpr Link kTenGigabitEthernet{1.25e9, 20e-6};
// The OpenBLAS sgemm rate of the same thread in the same runs.
constexpr double kCpuGemmTflops = 0.178;

}  // namespace

std::vector<std::string> default_machine_names() { return {"h100", "h200", "cpu"}; }

MachineModel default_machine(std::string_view name) {
  MachineModel m;
  m.name = std::string(name);
  m.intra_node = kNvlink;
  m.inter_node = kNetwork;
  if (name == "h200") {
    // Only causal d128 was measured by length; full attention and other head dims fall back to it.
    for (const auto& p : h200_causal_d128()) m.rates.add(true, 128, p);
    m.linear_seconds_per_token = linear_seconds_per_token(kDefaultHidden, 790);
  } else if (name == "h100") {
    for (const auto& c : kH100Cudnn) add_h100_curve(m.rates, c);
    m.linear_seconds_per_token = linear_seconds_per_token(kDefaultHidden, 761);
  } else if (name == "cpu") {
    for (const auto& p : kCpuOneThread) m.rates.add(p.causal, p.head_dim, p.point);
    m.intra_node = kSharedMemory;
    m.inter_node = kTenGigabitEthernet;
    m.linear_seconds_per_token = linear_seconds_per_token(kDefaultHidden, kCpuGemmTflops);
  } else {
    throw Error(ErrorCode::invalid_argument, fmt::format("unknown machine `{}`: use one of {}, or load a kernel-rate table",
                                                         name, fmt::join(default_machine_names(), ", ")));
  }
  return m;
}

}  // namespace longattn::partition
