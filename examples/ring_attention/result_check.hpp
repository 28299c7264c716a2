// --check's comparison of the ring's gathered results with the oracle's. The job's inputs are
// finite and every query sees at least one key, so every exact output is finite: a NaN or an
// infinity on either side fails the check (and is named), whatever the other side holds.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include <fmt/format.h>

namespace longattn::ring_job {

class ResultComparison {
 public:
  // Compares one result tensor (named for the report) element by element.
  void add(const char* name, const std::vector<float>& got, const std::vector<float>& want) {
    if (got.size() != want.size()) {
      failures_.push_back(fmt::format("{} has {} values, the oracle {}", name, got.size(), want.size()));
      return;
    }
    std::int64_t non_finite = 0, first = -1;
    for (std::size_t i = 0; i < got.size(); ++i) {
      const double a = got[i], b = want[i];
      if (!std::isfinite(a) || !std::isfinite(b)) {
        if (non_finite++ == 0) first = static_cast<std::int64_t>(i);
        continue;
      }
      max_abs_ = std::max(max_abs_, std::abs(a - b));
      max_ref_ = std::max(max_ref_, std::abs(b));
    }
    if (non_finite > 0)
      failures_.push_back(fmt::format("{} has {} non-finite value{} (first at flat index {}: ring {}, oracle {})", name, non_finite,
                                      non_finite == 1 ? "" : "s", first, got[static_cast<std::size_t>(first)],
                                      want[static_cast<std::size_t>(first)]));
  }

  double max_abs() const { return failures_.empty() ? max_abs_ : INFINITY; }
  double rel() const { return max_abs() / (max_ref_ > 0 ? max_ref_ : 1.0); }
  bool passed(double tolerance) const { return failures_.empty() && rel() <= tolerance; }
  // Why the check failed beyond the tolerance ("" when only the tolerance speaks).
  std::string failures() const {
    std::string s;
    for (const auto& f : failures_) s += (s.empty() ? "" : "; ") + f;
    return s;
  }

 private:
  double max_abs_ = 0, max_ref_ = 0;
  std::vector<std::string> failures_;
};

}  // namespace longattn::ring_job
