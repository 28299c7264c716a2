// offload_decode's micro-batch scheduling loop (the one the CPU and the GPU model share), driven by
// a scripted model: every micro-batch goes through every (step, layer) in order, sends only after
// its model work is done and computes only after its answer is back; the host never waits for one
// micro-batch's model work while another's answer is ready; and deferred answers (the client's
// replicated append_attend) complete the decode instead of being polled forever.
#include <gtest/gtest.h>

#include <chrono>
#include <future>
#include <random>
#include <thread>
#include <utility>
#include <vector>

#include "../../examples/offload_decode/pipeline_loop.hpp"
#include "support/test_util.hpp"

namespace offload_decode {
namespace {

using Clock = std::chrono::steady_clock;

// A model whose work on micro-batch m "finishes" after a number of polls drawn at random (as GPU
// work finishes while the host does other things), and whose answers arrive from another thread
// after a random delay, or deferred.
class ScriptedModel : public MicroBatchModel {
 public:
  ScriptedModel(int micro_batches, std::uint64_t seed, bool deferred) : rng_(seed), deferred_(deferred), mbs_(micro_batches) {}
  struct Start {
    int finish, next;
  };
  struct MicroBatch {
    std::vector<Start> starts;
    std::vector<int> sent_layers;
    int polls_left = 0;
    bool computing = false, attending = false;
  };
  void start(int m, int finish_layer, int next_layer, int) override {
    auto& mb = mbs_[static_cast<std::size_t>(m)];
    if (mb.computing) ADD_FAILURE() << "micro-batch " << m << " started while its model work was in flight";
    if (mb.attending) ADD_FAILURE() << "micro-batch " << m << " started before its answer was back";
    mb.starts.push_back({finish_layer, next_layer});
    mb.polls_left = std::uniform_int_distribution<int>(0, 20)(rng_);
    mb.computing = true;
  }
  bool done(int m) override {
    auto& mb = mbs_[static_cast<std::size_t>(m)];
    if (mb.polls_left > 0) {
      --mb.polls_left;
      return false;
    }
    mb.computing = false;
    return true;
  }
  std::future<void> send(int m, int layer, Clock::time_point* answered) override {
    auto& mb = mbs_[static_cast<std::size_t>(m)];
    if (mb.computing) ADD_FAILURE() << "micro-batch " << m << " sent before its model work was done";
    mb.sent_layers.push_back(layer);
    mb.attending = true;
    const auto delay = std::chrono::microseconds(std::uniform_int_distribution<int>(0, 400)(rng_));
    bool* attending = &mb.attending;
    auto answer = [=] {
      std::this_thread::sleep_for(delay);
      *answered = Clock::now();
      *attending = false;
    };
    return deferred_ ? std::async(std::launch::deferred, answer) : std::async(std::launch::async, answer);
  }
  const std::vector<MicroBatch>& micro_batches() const { return mbs_; }

 private:
  std::mt19937_64 rng_;
  bool deferred_;
  std::vector<MicroBatch> mbs_;
};

void expect_every_unit_in_order(const ScriptedModel& model, int steps, int layers) {
  for (const auto& mb : model.micro_batches()) {
    ASSERT_EQ(mb.starts.size(), static_cast<std::size_t>(steps * layers + 1));
    ASSERT_EQ(mb.sent_layers.size(), static_cast<std::size_t>(steps * layers));
    EXPECT_EQ(mb.starts.front().finish, -1);
    EXPECT_EQ(mb.starts.back().next, -1);
    for (int u = 0; u < steps * layers; ++u) {
      EXPECT_EQ(mb.starts[static_cast<std::size_t>(u)].next, u % layers) << "unit " << u;
      EXPECT_EQ(mb.starts[static_cast<std::size_t>(u) + 1].finish, u % layers) << "unit " << u;
      EXPECT_EQ(mb.sent_layers[static_cast<std::size_t>(u)], u % layers) << "unit " << u;
    }
  }
}

TEST(OffloadPipelineLoop, EveryMicroBatchWalksEveryLayerInOrder) {
  const auto seed = longattn::test::fresh_seed();
  SCOPED_TRACE(seed);
  std::mt19937_64 pick(seed);
  for (int n : {1, 2, 3}) {
    const int steps = std::uniform_int_distribution<int>(1, 4)(pick), layers = std::uniform_int_distribution<int>(1, 5)(pick);
    ScriptedModel model(n, pick(), false);
    const PipelineTimes t = run_pipeline(model, n, steps, layers);
    expect_every_unit_in_order(model, steps, layers);
    ASSERT_EQ(t.trips.size(), static_cast<std::size_t>(n * steps * layers));
    for (const auto& r : t.trips) EXPECT_GE(r.answered, r.issued);
    EXPECT_GE(t.decode_s, t.wait_s);
  }
}

TEST(OffloadPipelineLoop, DeferredAnswersFinish) {
  const auto seed = longattn::test::fresh_seed();
  SCOPED_TRACE(seed);
  ScriptedModel model(2, seed, true);
  const PipelineTimes t = run_pipeline(model, 2, 3, 2);
  expect_every_unit_in_order(model, 3, 2);
  EXPECT_EQ(t.trips.size(), 12u);
}

// Micro-batch 0's first model work finishes only once micro-batch 1 has sent, got its answer and
// started its next layer: a loop that waited for micro-batch 0's work before serving micro-batch 1
// would never get there (the model then gives up after many polls and the test fails).
class SlowFirstMicroBatch : public MicroBatchModel {
 public:
  void start(int m, int finish_layer, int, int) override {
    if (m == 1 && finish_layer == 0) one_went_on = true;
  }
  bool done(int m) override {
    if (m != 0 || zero_done) return true;
    if (one_went_on || ++polls > 50'000'000) {
      zero_done = true;
      return true;
    }
    return false;
  }
  std::future<void> send(int, int, Clock::time_point* answered) override {
    return std::async(std::launch::async, [answered] {
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
      *answered = Clock::now();
    });
  }
  bool one_went_on = false, zero_done = false;
  long long polls = 0;
};

TEST(OffloadPipelineLoop, AnswerReadyIsServedWhileOtherModelWorkIsInFlight) {
  SlowFirstMicroBatch model;
  run_pipeline(model, 2, 1, 2);
  EXPECT_TRUE(model.one_went_on);
  EXPECT_LT(model.polls, 50'000'000) << "the loop waited on micro-batch 0's model work while micro-batch 1's answer was ready";
}

}  // namespace
}  // namespace offload_decode
