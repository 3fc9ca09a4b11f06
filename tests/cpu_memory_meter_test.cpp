// The CPU memory meter, and the memory a reversible stage actually saves.

#include "test_util.h"

using namespace torchrev::testing;

using ::testing::HasSubstr;
using ::testing::ThrowsMessage;

namespace {

/// Bytes a training step (forward + backward) allocates on top of what was
/// allocated before it, at its peak. Gradients exist before the step (warm-up)
/// so they are not counted as activations. Also reports what is still
/// allocated after the step, relative to before it.
struct StepMemory {
  size_t peak = 0;
  long long leftover = 0;
};

void train_step(
    torchrev::RevSequential& stage,
    const torch::Tensor& x,
    StageMode mode) {
  auto y = run_stage(stage, x, mode);
  y.pow(2).mean().backward();
}

StepMemory measure_step(int depth, StageMode mode, int64_t anchor_every = 0) {
  torch::manual_seed(40);
  auto stage = conv_stage(depth, /*half=*/4);
  stage->options.anchor_every(anchor_every);
  auto x = torch::randn({8, 8, 32, 32});
  train_step(stage, x, mode); // warm-up: allocates the .grad tensors
  for (auto& p : stage->parameters()) {
    p.grad().zero_();
  }
  auto& meter = torchrev::CPUMemoryMeter::instance();
  const size_t before = meter.current_bytes();
  meter.reset_peak();
  train_step(stage, x, mode);
  StepMemory result;
  result.peak = meter.peak_bytes() - before;
  result.leftover = static_cast<long long>(meter.current_bytes()) -
      static_cast<long long>(before);
  return result;
}

} // namespace

TEST(CPUMemoryMeter, IsInstalledAndCountsTensorBytes) {
  ASSERT_TRUE(torchrev::CPUMemoryMeter::installed());
  auto& meter = torchrev::CPUMemoryMeter::instance();
  const size_t before = meter.current_bytes();
  meter.reset_peak();
  {
    auto t = torch::empty({1000}, torch::kFloat64);
    EXPECT_EQ(meter.current_bytes() - before, 8000u);
    auto u = torch::empty({500}, torch::kFloat32);
    EXPECT_EQ(meter.current_bytes() - before, 10000u);
  }
  EXPECT_EQ(meter.current_bytes(), before);
  EXPECT_EQ(meter.peak_bytes() - before, 10000u);
}

TEST(CPUMemoryMeter, BudgetRejectsAllocationsThatWouldExceedIt) {
  auto& meter = torchrev::CPUMemoryMeter::instance();
  meter.set_budget(meter.current_bytes() + 4096);
  EXPECT_NO_THROW(torch::empty({1024}, torch::kFloat32));
  EXPECT_THAT(
      [] { torch::empty({1 << 20}, torch::kFloat32); },
      ThrowsMessage<c10::OutOfMemoryError>(HasSubstr("exceed the budget")));
  meter.set_budget(0);
  EXPECT_NO_THROW(torch::empty({1 << 20}, torch::kFloat32));
}

TEST(CPUMemoryMeter, ConvolutionsWorkThroughTheMeter) {
  // oneDNN allocates through raw_allocate/raw_deleter.
  auto conv = torch::nn::Conv2d(torch::nn::Conv2dOptions(3, 8, 3).padding(1));
  auto y = conv(torch::randn({2, 3, 16, 16}));
  EXPECT_EQ(y.sizes(), torch::IntArrayRef({2, 8, 16, 16}));
}

TEST(RevSequentialMemory, PeakIsFlatInDepthWhilePlainAutogradGrowsLinearly) {
  const auto rev4 = measure_step(4, StageMode::kReversible);
  const auto rev16 = measure_step(16, StageMode::kReversible);
  const auto plain4 = measure_step(4, StageMode::kStored);
  const auto plain8 = measure_step(8, StageMode::kStored);
  const auto plain16 = measure_step(16, StageMode::kStored);
  const double rev_ratio = double(rev16.peak) / double(rev4.peak);
  const double plain_ratio = double(plain16.peak) / double(plain4.peak);
  std::cout << "[ memory   ] training-step peak above baseline, bytes: "
            << "reversible depth 4 = " << rev4.peak
            << ", depth 16 = " << rev16.peak << " (x" << rev_ratio << "); "
            << "plain depth 4 = " << plain4.peak
            << ", depth 8 = " << plain8.peak << ", depth 16 = " << plain16.peak
            << " (x" << plain_ratio << ")" << std::endl;
  EXPECT_LE(rev_ratio, 1.25);
  // Plain autograd grows linearly: 8 more blocks cost twice what 4 more do.
  const double growth =
      double(plain16.peak - plain8.peak) / double(plain8.peak - plain4.peak);
  EXPECT_GT(growth, 1.7);
  EXPECT_LT(growth, 2.3);
  EXPECT_GT(plain_ratio, 2.5);
  EXPECT_LT(rev16.peak, plain16.peak / 3);
}

TEST(RevSequentialMemory, A64BlockStageNeedsAtMost1Point1TimesAn8BlockStage) {
  // Each block's node returns its own parameter gradients, which autograd
  // accumulates (and frees) at once, so neither activations nor temporary
  // parameter gradients pile up with depth. The peak counts everything a
  // step allocates on top of the parameters and their .grad tensors.
  const auto rev8 = measure_step(8, StageMode::kReversible);
  const auto rev64 = measure_step(64, StageMode::kReversible);
  const double ratio = double(rev64.peak) / double(rev8.peak);
  std::cout << "[ memory   ] reversible training-step peak, bytes: depth 8 = "
            << rev8.peak << ", depth 64 = " << rev64.peak << " (x" << ratio
            << ")" << std::endl;
  EXPECT_LE(ratio, 1.10);
}

TEST(RevSequentialMemory, EachAnchorKeepsOneActivation) {
  // 64 blocks, anchor_every 8: blocks 8, 16, ..., 56 keep their outputs
  // (the 64th is the stage output, kept anyway): 7 activations of
  // 8 x 8 x 32 x 32 floats each.
  const auto none = measure_step(64, StageMode::kReversible);
  const auto anchored = measure_step(64, StageMode::kReversible, 8);
  const double activation = 8.0 * 8 * 32 * 32 * sizeof(float);
  const double extra = (double(anchored.peak) - double(none.peak)) / activation;
  std::cout << "[ memory   ] anchor_every 8 on 64 blocks: peak "
            << anchored.peak << " vs " << none.peak << " bytes (" << extra
            << " activations)" << std::endl;
  EXPECT_GE(extra, 6.0);
  EXPECT_LE(extra, 8.0);
}

// What one block's backward keeps alive on top of the stage output (2h,
// counted before it), in halves h of the activation: the output gradient dy
// (2h, handed over by autograd, so dx is summed into it), x2 (1h, written
// into G(y1)'s memory) and G's input gradient (1h): 4h. The stage output is
// released once x1 is written into F(x2)'s memory, before F's backward.
// Keeping the stage output through F's backward adds a half (5.25h);
// allocating x1 and x2 anew, or summing dx into new memory, more (7.25h
// before any of this, on LibTorch 1.13).
TEST(RevSequentialMemory, ABlocksBackwardKeepsFourHalvesAlive) {
  torch::manual_seed(41);
  const int64_t batch = 1024, half = 128;
  torchrev::RevSequential stage;
  stage->push_back(SeqBlock(
      torch::nn::Sequential(torch::nn::Linear(half, half)),
      torch::nn::Sequential(torch::nn::Linear(half, half))));
  stage->to(torch::kFloat64);
  auto x = torch::randn({batch, 2 * half}, torch::kFloat64);
  auto weights = torch::rand({batch, 2 * half}, torch::kFloat64);
  auto loss = [&] { return (stage(x) * weights).sum(); };
  loss().backward(); // warm-up: allocates the .grad tensors
  auto& meter = torchrev::CPUMemoryMeter::instance();
  auto l = loss(); // the stage output is kept: counted before the backward
  const size_t before = meter.current_bytes();
  meter.reset_peak();
  l.backward();
  const double h = double(batch * half * sizeof(double));
  const double halves = double(meter.peak_bytes() - before) / h;
  std::cout << "[ memory   ] one block's backward: " << halves << " halves"
            << std::endl;
  EXPECT_GE(halves, 4.0);
  EXPECT_LE(halves, 4.5);
}

TEST(RevSequentialMemory, NothingStaysAllocatedAfterATrainingStep) {
  for (auto mode : {StageMode::kReversible, StageMode::kStored}) {
    const auto step = measure_step(8, mode);
    EXPECT_EQ(step.leftover, 0)
        << (mode == StageMode::kReversible ? "reversible" : "stored");
  }
}

namespace {

/// Peak bytes of a RevNet training step on top of its parameters and their
/// .grad tensors (allocated by a warm-up step).
size_t revnet_step_peak(torchrev::models::RevNetImpl& net) {
  auto images = torch::randn({4, 3, 32, 32});
  auto labels = torch::tensor({1, 4, 2, 9});
  auto step = [&] {
    torch::nn::functional::cross_entropy(net.forward(images), labels)
        .backward();
  };
  step();
  for (auto& p : net.parameters()) {
    p.grad().zero_();
  }
  auto& meter = torchrev::CPUMemoryMeter::instance();
  const size_t before = meter.current_bytes();
  meter.reset_peak();
  step();
  return meter.peak_bytes() - before;
}

} // namespace

TEST(RevNetMemory, CheckpointedTransitionsAreTheDefaultAndLowerThePeak) {
  // A transition block's input is the previous stage's output, which that
  // stage keeps for its own backward: checkpointing the transition stores
  // nothing more, and drops the activations a stored transition keeps
  // through the later stages' backward.
  torch::manual_seed(42);
  auto checkpointed = std::dynamic_pointer_cast<torchrev::models::RevNetImpl>(
      torchrev::models::create("revnet38"));
  ASSERT_NE(checkpointed, nullptr);
  ASSERT_TRUE(checkpointed->options.checkpoint_transitions());
  auto stored = std::dynamic_pointer_cast<torchrev::models::RevNetImpl>(
      checkpointed->clone());
  stored->options.checkpoint_transitions(false);
  const size_t with_checkpoints = revnet_step_peak(*checkpointed);
  const size_t with_stored = revnet_step_peak(*stored);
  std::cout << "[ memory   ] revnet38 training-step peak, bytes: transitions "
               "checkpointed "
            << with_checkpoints << ", stored " << with_stored << std::endl;
  EXPECT_LT(with_checkpoints, with_stored);
}
