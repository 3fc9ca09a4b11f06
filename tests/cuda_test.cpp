// The guarantees that depend on the device, checked on CUDA: the CUDA
// generator's replay (dropout), CUDA autocast's replay, the zoo's models
// against plain autograd, check_stage on a CUDA example, and memory flat in
// depth as the CUDA caching allocator counts it. Every test here skips
// without a CUDA device (CI has none); they run on a GPU machine.

#include "test_util.h"

#include <torchrev/check.h>
#include <torchrev/detail/autocast_state.h>
#include <torchrev/models/zoo.h>

#ifdef TORCHREV_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#endif

using namespace torchrev::testing;

namespace {

#define TORCHREV_REQUIRE_CUDA()         \
  do {                                  \
    if (!torch::cuda::is_available()) { \
      GTEST_SKIP() << "no CUDA device"; \
    }                                   \
  } while (false)

const torch::Device kCuda(torch::kCUDA, 0);

torch::TensorOptions cuda64() {
  return torch::dtype(torch::kFloat64).device(kCuda);
}

/// Reversible against stored training of `base` (moved to the GPU in
/// float64) on 3 images of `image_size` pixels.
template <typename Net>
void expect_reversible_matches_stored(
    const std::shared_ptr<Net>& base,
    int64_t image_size) {
  ASSERT_NE(base, nullptr);
  base->to(kCuda, torch::kFloat64);
  auto images = torch::randn({3, 3, image_size, image_size}, cuda64());
  auto labels = torch::tensor({1, 4, 9}).to(kCuda);
  auto stored = model_step(
      std::dynamic_pointer_cast<Net>(base->clone()),
      StageMode::kStored,
      images,
      labels);
  auto reversible = model_step(
      std::dynamic_pointer_cast<Net>(base->clone()),
      StageMode::kReversible,
      images,
      labels);
  EXPECT_CLOSE(reversible.logits, stored.logits, 1e-12);
  EXPECT_CLOSE(reversible.input_grad, stored.input_grad, 1e-9);
  ASSERT_EQ(reversible.grads.size(), stored.grads.size());
  for (size_t i = 0; i < stored.grads.size(); ++i) {
    SCOPED_TRACE("parameter " + std::to_string(i));
    ASSERT_TRUE(reversible.grads[i].defined());
    EXPECT_CLOSE(reversible.grads[i], stored.grads[i], 1e-9);
  }
}

} // namespace

TEST(Cuda, RevNetsEqualTheSameNetworkWithPlainAutograd_CUDA) {
  TORCHREV_REQUIRE_CUDA();
  torch::manual_seed(91);
  {
    SCOPED_TRACE("revnet38");
    expect_reversible_matches_stored(
        std::dynamic_pointer_cast<torchrev::models::RevNetImpl>(
            torchrev::models::create("revnet38")),
        16);
  }
  {
    SCOPED_TRACE("revnet_mini_inv");
    expect_reversible_matches_stored(
        std::dynamic_pointer_cast<torchrev::models::RevNetInvImpl>(
            torchrev::models::create("revnet_mini_inv")),
        16);
  }
}

TEST(Cuda, RevViTWithDropoutEqualsPlainAutograd_CUDA) {
  // Dropout draws from the CUDA generator (Philox, seed and offset): the
  // recompute must replay exactly the forward's draws.
  TORCHREV_REQUIRE_CUDA();
  torch::manual_seed(97);
  expect_reversible_matches_stored(
      std::make_shared<torchrev::models::RevViTImpl>(tiny_vit_options()), 8);
}

TEST(Cuda, AStepLeavesTheCudaGeneratorWhereStoredTrainingLeavesIt_CUDA) {
  // The replay forks the generator: after the backward, the next draw is the
  // one plain autograd would give, and dropout did draw (the control).
  TORCHREV_REQUIRE_CUDA();
  torch::manual_seed(92);
  auto stage = conv_stage(3, 2, /*batch_norm=*/true, /*dropout=*/0.3);
  stage->to(kCuda, torch::kFloat64);
  auto reference = copy_of(stage);
  auto x = torch::randn({2, 4, 5, 5}, cuda64());
  torch::manual_seed(93);
  const auto untouched = torch::rand({4}, cuda64());
  torch::manual_seed(93);
  run_step(stage, x, StageMode::kReversible);
  const auto after_reversible = torch::rand({4}, cuda64());
  torch::manual_seed(93);
  run_step(reference, x, StageMode::kStored);
  const auto after_stored = torch::rand({4}, cuda64());
  EXPECT_TRUE(torch::equal(after_reversible, after_stored));
  EXPECT_FALSE(torch::equal(after_reversible, untouched));
}

TEST(
    Cuda,
    ABackwardOutsideAutocastRecomputesUnderTheForwardsCudaAutocast_CUDA) {
  TORCHREV_REQUIRE_CUDA();
  torch::manual_seed(94);
  // F and G record the dtype they computed in.
  struct RecordingBlockImpl : torchrev::RevBlockBase {
    RecordingBlockImpl()
        : f(register_module("f", torch::nn::Linear(4, 4))),
          g(register_module("g", torch::nn::Linear(4, 4))) {}
    torch::Tensor forward_f(const torch::Tensor& x2) override {
      auto out = f(x2);
      dtypes.push_back(out.scalar_type());
      return out.to(x2.scalar_type());
    }
    torch::Tensor forward_g(const torch::Tensor& y1) override {
      auto out = g(y1);
      dtypes.push_back(out.scalar_type());
      return out.to(y1.scalar_type());
    }
    torch::nn::Linear f, g;
    std::vector<torch::ScalarType> dtypes;
  };
  auto block = std::make_shared<RecordingBlockImpl>();
  torchrev::RevSequential stage;
  stage->push_back(block);
  stage->to(kCuda);
  auto x = torch::randn({2, 8}, torch::device(kCuda).requires_grad(true));
  const auto before = torchrev::detail::AutocastState::current();
  auto autocast = before;
  autocast.cuda_enabled = true;
  autocast.cuda_dtype = torch::kHalf;
  autocast.apply();
  auto y = stage(x);
  before.apply();
  ASSERT_EQ(block->dtypes.size(), 2u);
  EXPECT_EQ(block->dtypes[0], torch::kHalf); // the control
  y.sum().backward();
  ASSERT_EQ(block->dtypes.size(), 4u);
  EXPECT_EQ(block->dtypes[2], torch::kHalf);
  EXPECT_EQ(block->dtypes[3], torch::kHalf);
  EXPECT_FALSE(torchrev::detail::AutocastState::current().cuda_enabled);
  EXPECT_TRUE(x.grad().defined());
}

TEST(Cuda, CheckStagePassesATransformerBlockWithDropout_CUDA) {
  TORCHREV_REQUIRE_CUDA();
  torch::manual_seed(95);
  auto block = torchrev::models::rev_transformer_block(
      torchrev::models::TransformerBlockOptions(8, 2)
          .dropout(0.2)
          .attention_dropout(0.2));
  torchrev::RevSequential stage;
  stage->push_back(block);
  stage->to(kCuda);
  auto report = torchrev::check_stage(
      stage, torch::randn({3, 5, 16}, torch::device(kCuda)));
  EXPECT_TRUE(report.passed()) << report;
}

#ifdef TORCHREV_CUDA
namespace {

/// Bytes one training step allocates on the GPU above what was allocated
/// before it, at its peak, as the CUDA caching allocator counts them.
size_t cuda_step_peak(int depth, StageMode mode) {
  torch::manual_seed(96);
  auto stage = conv_stage(depth, /*half=*/4);
  stage->to(kCuda);
  auto x = torch::randn({8, 8, 32, 32}, torch::device(kCuda));
  auto step = [&] { run_stage(stage, x, mode).pow(2).mean().backward(); };
  step(); // warm-up: allocates the .grad tensors
  c10::cuda::device_synchronize();
  using c10::cuda::CUDACachingAllocator::getDeviceStats;
  const size_t before = getDeviceStats(0).allocated_bytes[0].current;
  c10::cuda::CUDACachingAllocator::resetPeakStats(0);
  step();
  c10::cuda::device_synchronize();
  return getDeviceStats(0).allocated_bytes[0].peak - before;
}

} // namespace

TEST(Cuda, ReversiblePeakIsFlatInDepthOnTheGpu_CUDA) {
  TORCHREV_REQUIRE_CUDA();
  const auto rev8 = cuda_step_peak(8, StageMode::kReversible);
  const auto rev64 = cuda_step_peak(64, StageMode::kReversible);
  const auto stored8 = cuda_step_peak(8, StageMode::kStored);
  const auto stored64 = cuda_step_peak(64, StageMode::kStored);
  const double ratio = double(rev64) / double(rev8);
  std::cout << "[ memory   ] CUDA training-step peak, bytes: reversible "
            << "depth 8 = " << rev8 << ", depth 64 = " << rev64 << " (x"
            << ratio << "); stored depth 8 = " << stored8
            << ", depth 64 = " << stored64 << std::endl;
  EXPECT_LE(ratio, 1.10);
  EXPECT_GT(double(stored64) / double(stored8), 4.0); // the control
  EXPECT_LT(rev64, stored64 / 8);
}
#endif
