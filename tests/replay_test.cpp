// The pieces a recompute relies on, one at a time: is_recomputing(), the
// random generator snapshot and its forked replay, the autocast state guard,
// and the stage's replay of autocast in backward.

#include "test_util.h"

#include <torchrev/detail/autocast_state.h>
#include <torchrev/detail/forward_replay.h>
#include <torchrev/detail/rng_state.h>

using namespace torchrev::testing;

namespace {

/// F and G are Linear layers that record, on each call, whether torchrev
/// was recomputing and the dtype the layer computed in.
struct RecordingBlockImpl : torchrev::RevBlockBase {
  explicit RecordingBlockImpl(int64_t half)
      : f(register_module("f", torch::nn::Linear(half, half))),
        g(register_module("g", torch::nn::Linear(half, half))) {}
  torch::Tensor forward_f(const torch::Tensor& x2) override {
    auto out = f(x2);
    calls.push_back({torchrev::is_recomputing(), out.scalar_type()});
    return out.to(x2.scalar_type());
  }
  torch::Tensor forward_g(const torch::Tensor& y1) override {
    auto out = g(y1);
    calls.push_back({torchrev::is_recomputing(), out.scalar_type()});
    return out.to(y1.scalar_type());
  }
  struct Call {
    bool recomputing;
    torch::ScalarType dtype;
  };
  std::vector<Call> calls;
  torch::nn::Linear f, g;
};
TORCH_MODULE(RecordingBlock);

torchrev::detail::AutocastState cpu_autocast(bool enabled) {
  auto state = torchrev::detail::AutocastState::current();
  state.cpu_enabled = enabled;
  state.cpu_dtype = torch::kBFloat16;
  return state;
}

} // namespace

TEST(Replay, IsRecomputingHoldsOnlyWhileTorchrevReevaluatesABlock) {
  torch::manual_seed(60);
  RecordingBlock block(4);
  torchrev::RevSequential stage(block);
  auto x = torch::randn({2, 8}, torch::requires_grad());
  EXPECT_FALSE(torchrev::is_recomputing());
  auto y = stage(x);
  ASSERT_EQ(block->calls.size(), 2u); // F and G in forward
  EXPECT_FALSE(block->calls[0].recomputing);
  EXPECT_FALSE(block->calls[1].recomputing);
  y.sum().backward();
  ASSERT_EQ(block->calls.size(), 4u); // G and F again in backward
  EXPECT_TRUE(block->calls[2].recomputing);
  EXPECT_TRUE(block->calls[3].recomputing);
  EXPECT_FALSE(torchrev::is_recomputing());
  torch::NoGradGuard no_grad;
  stage->inverse(y);
  ASSERT_EQ(block->calls.size(), 6u);
  EXPECT_TRUE(block->calls[4].recomputing);
  EXPECT_TRUE(block->calls[5].recomputing);
  EXPECT_FALSE(torchrev::is_recomputing());
  // A block on its own, outside a stage, is never recomputing.
  block->forward(y);
  EXPECT_FALSE(block->calls.back().recomputing);
}

TEST(Replay, AGeneratorSnapshotReplaysTheSameDrawsAndTheForkLeavesTheCaller) {
  torch::manual_seed(61);
  const auto snapshot = torchrev::detail::RngState::capture(torch::kCPU);
  const auto first = torch::rand({5});
  const auto second = torch::rand({5});
  EXPECT_FALSE(first.equal(second)); // the control: the stream moves on
  {
    torchrev::detail::ForkedRngGuard replay(snapshot, torch::kCPU);
    EXPECT_TRUE(torch::rand({5}).equal(first));
  }
  // The caller's stream continues where it was, as if nothing had run.
  const auto third = torch::rand({5});
  torch::manual_seed(61);
  torch::rand({5});
  torch::rand({5});
  EXPECT_TRUE(third.equal(torch::rand({5})));
  // An empty snapshot replays nothing: the current stream is used.
  torch::manual_seed(62);
  const auto expected = torch::rand({5});
  torch::manual_seed(62);
  {
    torchrev::detail::ForkedRngGuard none(
        torchrev::detail::RngState(), torch::kCPU);
    EXPECT_TRUE(torch::rand({5}).equal(expected));
  }
}

TEST(Replay, TheAutocastGuardAppliesASavedStateAndRestoresTheThreads) {
  const auto before = torchrev::detail::AutocastState::current();
  cpu_autocast(true).apply();
  {
    torchrev::detail::AutocastStateGuard guard(cpu_autocast(false));
    EXPECT_FALSE(torchrev::detail::AutocastState::current().cpu_enabled);
    torchrev::detail::ForwardReplayGuard replay(
        cpu_autocast(true), torchrev::detail::RngState(), torch::kCPU);
    EXPECT_TRUE(torchrev::detail::AutocastState::current().cpu_enabled);
  }
  EXPECT_TRUE(torchrev::detail::AutocastState::current().cpu_enabled);
  before.apply();
  EXPECT_EQ(
      torchrev::detail::AutocastState::current().cpu_enabled,
      before.cpu_enabled);
}

TEST(Replay, ABackwardOutsideAutocastRecomputesUnderTheForwardsAutocast) {
  torch::manual_seed(63);
  RecordingBlock block(4);
  torchrev::RevSequential stage(block);
  auto x = torch::randn({2, 8}, torch::requires_grad());
  const auto before = torchrev::detail::AutocastState::current();
  cpu_autocast(true).apply();
  auto y = stage(x);
  before.apply();
  ASSERT_EQ(block->calls.size(), 2u);
  // The control: under CPU autocast the Linear layers compute in bfloat16.
  EXPECT_EQ(block->calls[0].dtype, torch::kBFloat16);
  y.sum().backward(); // outside autocast
  ASSERT_EQ(block->calls.size(), 4u);
  EXPECT_EQ(block->calls[2].dtype, torch::kBFloat16);
  EXPECT_EQ(block->calls[3].dtype, torch::kBFloat16);
  EXPECT_FALSE(torchrev::detail::AutocastState::current().cpu_enabled);
  // And the other way round: a forward without autocast is recomputed
  // without it inside an autocast region.
  auto y2 = stage(x);
  cpu_autocast(true).apply();
  y2.sum().backward();
  before.apply();
  ASSERT_EQ(block->calls.size(), 8u);
  EXPECT_EQ(block->calls[6].dtype, torch::kFloat32);
  EXPECT_EQ(block->calls[7].dtype, torch::kFloat32);
}

TEST(RevSequentialContainer, IndexesAndCastsLikeTorchSequential) {
  torch::manual_seed(64);
  auto stage = torchrev::RevSequential(
      RecordingBlock(2),
      SeqBlock(
          torch::nn::Sequential(torch::nn::Linear(2, 2)),
          torch::nn::Sequential(torch::nn::Linear(2, 2))));
  std::shared_ptr<torchrev::InvertibleModule> first = stage[0];
  EXPECT_EQ(first.get(), stage->ptr(0).get());
  EXPECT_EQ(&stage->at<RecordingBlockImpl>(0), stage->ptr(0).get());
  EXPECT_EQ(stage->ptr<RecordingBlockImpl>(1), nullptr);
  EXPECT_ERROR_CONTAINS(
      stage->at<RecordingBlockImpl>(1),
      "could not cast member 1",
      "RecordingBlockImpl");
  EXPECT_ERROR_CONTAINS(stage[2], "index 2 is out of range", "2 blocks");
  size_t count = 0;
  for (const auto& member : *stage) {
    EXPECT_EQ(member.get(), stage->ptr(count).get());
    ++count;
  }
  EXPECT_EQ(count, stage->size());
}
