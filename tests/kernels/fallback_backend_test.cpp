// The "auto" dispatcher (kernels/fallback_backend): each call reaches the first candidate that
// supports it, a candidate's run-time "unsupported" moves the call on, real errors surface, and
// the name reports what ran. Candidates are CPU backends wrapped to refuse some calls, and the
// results are checked against the double-precision reference.
#include <gtest/gtest.h>

#include <optional>

#include <fmt/format.h>

#include "kernels/cpu_backend.hpp"
#include "kernels/cpu_kernels.hpp"
#include "kernels/fallback_backend.hpp"
#include "longattn/backend.hpp"
#include "longattn/error.hpp"
#include "support/delegating_backend.hpp"
#include "support/test_util.hpp"

namespace longattn {
namespace {

using test::HostTensor;

// A CPU backend under another name that refuses causal calls up front (like cuDNN with explicit
// positions) or throws `thrown` when it runs (like cuDNN finding no engine), and counts its runs.
class Picky final : public test::DelegatingBackend {
 public:
  Picky(std::string name, bool refuse_causal, std::optional<ErrorCode> thrown = std::nullopt)
      : DelegatingBackend(kernels::make_cpu_fast_backend()), name_(std::move(name)), refuse_causal_(refuse_causal),
        thrown_(thrown) {}
  int runs = 0;
  std::string name() const override { return name_; }
  std::string unsupported_reason(const AttentionArgs& a) const override {
    return refuse_causal_ && a.causal ? "no causal here" : inner_->unsupported_reason(a);
  }
  void forward(const AttentionArgs& a, const ForwardOutputs& o) override {
    if (thrown_) throw Error(*thrown_, name_ + " failed");
    ++runs;
    inner_->forward(a, o);
  }
  void backward(const AttentionArgs& a, const BackwardArgs& g) override {
    if (thrown_) throw Error(*thrown_, name_ + " failed");
    ++runs;
    inner_->backward(a, g);
  }

 private:
  std::string name_;
  bool refuse_causal_;
  std::optional<ErrorCode> thrown_;
};

struct Problem {
  HostTensor q, k, v, o, lse, o_ref, lse_ref;
  AttentionArgs args;
};

Problem make_problem(std::mt19937_64& rng, bool causal) {
  Problem p;
  p.q = test::random_tensor(rng, DType::f32, {37, 4, 16});
  p.k = test::random_tensor(rng, DType::f32, {41, 2, 16});
  p.v = test::random_tensor(rng, DType::f32, {41, 2, 16});
  p.o = test::poisoned_tensor(DType::f32, {37, 4, 16});
  p.lse = test::poisoned_tensor(DType::f32, {4, 37});
  p.o_ref = HostTensor(DType::f32, {37, 4, 16});
  p.lse_ref = HostTensor(DType::f32, {4, 37});
  p.args.q = p.q.view;
  p.args.k = p.k.view;
  p.args.v = p.v.view;
  p.args.causal = causal;
  kernels::reference_forward(p.args, {p.o_ref.view, p.lse_ref.view});
  return p;
}

void expect_matches_reference(const Problem& p) {
  EXPECT_LE(test::compare(p.o.to_f32(), p.o_ref.to_f32()).max_abs, 2e-5);
  EXPECT_LE(test::compare(p.lse.to_f32(), p.lse_ref.to_f32()).max_abs, 2e-5);
}

TEST(FallbackBackend, EachCallGoesToTheFirstCandidateThatSupportsIt) {
  std::mt19937_64 rng(test::fresh_seed());
  auto fast = std::make_unique<Picky>("fast", /*refuse_causal=*/true);
  auto general = std::make_unique<Picky>("general", false);
  auto* fast_p = fast.get();
  auto* general_p = general.get();
  std::vector<std::unique_ptr<AttentionBackend>> c;
  c.push_back(std::move(fast));
  c.push_back(std::move(general));
  auto backend = kernels::make_fallback_backend(std::move(c));
  EXPECT_EQ(backend->name(), "fast>general");

  auto full = make_problem(rng, false);
  backend->forward(full.args, {full.o.view, full.lse.view});
  expect_matches_reference(full);
  EXPECT_EQ(fast_p->runs, 1);
  EXPECT_EQ(general_p->runs, 0);
  EXPECT_EQ(backend->name(), "fast");

  auto causal = make_problem(rng, true);
  EXPECT_TRUE(backend->unsupported_reason(causal.args).empty());
  backend->forward(causal.args, {causal.o.view, causal.lse.view});
  expect_matches_reference(causal);
  EXPECT_EQ(fast_p->runs, 1);
  EXPECT_EQ(general_p->runs, 1);
  EXPECT_EQ(backend->name(), "fast+general");
}

TEST(FallbackBackend, RunTimeUnsupportedMovesOnAndOtherErrorsSurface) {
  std::mt19937_64 rng(test::fresh_seed());
  {
    std::vector<std::unique_ptr<AttentionBackend>> c;
    c.push_back(std::make_unique<Picky>("no-engine", false, ErrorCode::unsupported));
    c.push_back(std::make_unique<Picky>("general", false));
    auto backend = kernels::make_fallback_backend(std::move(c));
    auto p = make_problem(rng, true);
    backend->forward(p.args, {p.o.view, p.lse.view});
    expect_matches_reference(p);
    EXPECT_EQ(backend->name(), "general");
  }
  {
    std::vector<std::unique_ptr<AttentionBackend>> c;
    c.push_back(std::make_unique<Picky>("broken", false, ErrorCode::internal));
    c.push_back(std::make_unique<Picky>("general", false));
    auto backend = kernels::make_fallback_backend(std::move(c));
    auto p = make_problem(rng, false);
    try {
      backend->forward(p.args, {p.o.view, p.lse.view});
      FAIL() << "an internal error was swallowed";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::internal);
    }
  }
  {
    std::vector<std::unique_ptr<AttentionBackend>> c;
    c.push_back(std::make_unique<Picky>("a", true));
    c.push_back(std::make_unique<Picky>("b", true));
    auto backend = kernels::make_fallback_backend(std::move(c));
    auto p = make_problem(rng, true);
    const auto why = backend->unsupported_reason(p.args);
    EXPECT_NE(why.find("a: no causal here"), std::string::npos) << why;
    EXPECT_NE(why.find("b: no causal here"), std::string::npos) << why;
    EXPECT_THROW(backend->forward(p.args, {p.o.view, p.lse.view}), Error);
  }
}

TEST(FallbackBackend, AutoOnTheCpuIsTheFastKernels) {
  EXPECT_EQ(make_backend("auto", DeviceKind::cpu)->name(), "cpu");
}

}  // namespace
}  // namespace longattn
