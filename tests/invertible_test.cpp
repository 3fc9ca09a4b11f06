// Invertible members of a stage (affine and user-defined couplings, invertible
// layers, user-defined invertible modules), checked against plain autograd on
// the same modules in float64.

#include "test_util.h"

using namespace torchrev::testing;

namespace {

constexpr double kTol = 1e-9; // float64 relative error

/// A residual function on `channels` channels: Conv-BN-Tanh. Conv first and
/// a smooth activation, because zero padding makes channels that are exactly
/// constant: a ReLU right after them sits on its kink, where plain autograd's
/// gradient (0) and that of the reconstruction (off by rounding, so 0 or 1)
/// differ for no fault of either.
torch::nn::Sequential smooth_residual(int64_t channels, int64_t out = 0) {
  return torch::nn::Sequential(
      torch::nn::Conv2d(
          torch::nn::Conv2dOptions(channels, out > 0 ? out : channels, 3)
              .padding(1)
              .bias(false)), // BatchNorm cancels a bias: its gradient is 0
      torch::nn::BatchNorm2d(out > 0 ? out : channels),
      torch::nn::Tanh());
}

/// A user-defined invertible member with parameters: y = x * exp(s) + b per
/// channel.
struct ChannelAffineImpl : torchrev::InvertibleModule {
  explicit ChannelAffineImpl(int64_t channels)
      : s(register_parameter("s", torch::randn({1, channels, 1, 1}) * 0.3)),
        b(register_parameter("b", torch::randn({1, channels, 1, 1}))) {}
  torch::Tensor forward(const torch::Tensor& x) override {
    return x * s.exp() + b;
  }
  torch::Tensor inverse(const torch::Tensor& y) override {
    return (y - b) * (-s).exp();
  }
  std::shared_ptr<torch::nn::Module> clone(
      const torch::optional<torch::Device>& device =
          torch::nullopt) const override {
    return torchrev::clone_state_into(
        *this, std::make_shared<ChannelAffineImpl>(s.size(1)), device);
  }
  torch::Tensor s, b;
};
TORCH_MODULE(ChannelAffine);

/// A user-defined coupling: y = x * exp(tanh(h)).
struct ScaleBlockImpl : torchrev::CouplingBlockBase {
  explicit ScaleBlockImpl(int64_t half)
      : f(register_module("f", smooth_residual(half))),
        g(register_module("g", smooth_residual(half))) {}
  torch::Tensor forward_f(const torch::Tensor& x2) override {
    return f->forward(x2);
  }
  torch::Tensor forward_g(const torch::Tensor& y1) override {
    return g->forward(y1);
  }
  torch::Tensor couple(const torch::Tensor& x, const torch::Tensor& h)
      override {
    return x * torch::tanh(h).exp();
  }
  torch::Tensor uncouple(const torch::Tensor& y, const torch::Tensor& h)
      override {
    return y * (-torch::tanh(h)).exp();
  }
  std::shared_ptr<torch::nn::Module> clone(
      const torch::optional<torch::Device>& device =
          torch::nullopt) const override {
    const auto half = f->ptr<torch::nn::Conv2dImpl>(0)->options.in_channels();
    return torchrev::clone_state_into(
        *this, std::make_shared<ScaleBlockImpl>(half), device);
  }
  torch::nn::Sequential f, g;
};
TORCH_MODULE(ScaleBlock);

/// A member whose inverse does not give back the input's shape.
struct WrongInverseImpl : torchrev::InvertibleModule {
  torch::Tensor forward(const torch::Tensor& x) override {
    return x * 2;
  }
  torch::Tensor inverse(const torch::Tensor& y) override {
    return y.narrow(1, 0, 1) / 2;
  }
};
TORCH_MODULE(WrongInverse);

/// A member whose inverse writes into its argument.
struct InPlaceInverseImpl : torchrev::InvertibleModule {
  torch::Tensor forward(const torch::Tensor& x) override {
    return x + 1;
  }
  torch::Tensor inverse(const torch::Tensor& y) override {
    return y.sub_(1);
  }
};
TORCH_MODULE(InPlaceInverse);

/// A coupling whose uncouple writes into its argument.
struct InPlaceUncoupleImpl : torchrev::CouplingBlockBase {
  torch::Tensor forward_f(const torch::Tensor& x2) override {
    return torch::tanh(x2);
  }
  torch::Tensor forward_g(const torch::Tensor& y1) override {
    return torch::tanh(y1);
  }
  torch::Tensor couple(const torch::Tensor& x, const torch::Tensor& h)
      override {
    return x + h;
  }
  torch::Tensor uncouple(const torch::Tensor& y, const torch::Tensor& h)
      override {
    return y.sub_(h);
  }
};
TORCH_MODULE(InPlaceUncouple);

/// F or G of an affine block on `half` channels: Conv-BN-Tanh to 2 * half
/// channels (raw scale and shift).
torch::nn::Sequential affine_net(int64_t half, double dropout = 0.0) {
  auto seq = smooth_residual(half, 2 * half);
  if (dropout > 0.0) {
    seq->push_back(torch::nn::Dropout(dropout));
  }
  return seq;
}

using Affine =
    torchrev::AffineBlock<torch::nn::Sequential, torch::nn::Sequential>;

Affine affine_block(int64_t half, double dropout = 0.0) {
  return Affine(affine_net(half, dropout), affine_net(half, dropout));
}

SeqBlock additive_block(int64_t half) {
  return SeqBlock(smooth_residual(half), smooth_residual(half));
}

/// Every kind of member in one stage, on (N, 4, H, W) inputs: additive,
/// affine and user couplings, space-to-depth, zero padding and a user
/// member with parameters.
torchrev::RevSequential mixed_stage(double dropout = 0.0) {
  return torchrev::RevSequential(
      additive_block(2),
      affine_block(2, dropout),
      torchrev::SpaceToDepth(2), // 4 -> 16 channels, half the resolution
      ChannelAffine(16),
      additive_block(8),
      torchrev::ChannelZeroPad(4), // 16 -> 20 channels
      affine_block(10, dropout),
      ScaleBlock(10));
}

void expect_steps_match(const Step& rev, const Step& plain, double tol) {
  EXPECT_CLOSE(rev.y, plain.y, tol);
  EXPECT_CLOSE(rev.grad_x, plain.grad_x, tol);
  ASSERT_EQ(rev.param_grads.size(), plain.param_grads.size());
  for (size_t i = 0; i < rev.param_grads.size(); ++i) {
    SCOPED_TRACE("parameter " + std::to_string(i));
    EXPECT_CLOSE(rev.param_grads[i], plain.param_grads[i], tol);
  }
}

void expect_matches_plain_autograd(
    torchrev::RevSequential stage,
    const torch::Tensor& x) {
  stage->to(torch::kFloat64);
  auto reference = copy_of(stage);
  // Two steps: BatchNorm's running statistics feed nothing here, but a
  // second step checks that nothing of the first is left over.
  for (int step = 0; step < 2; ++step) {
    SCOPED_TRACE("step " + std::to_string(step));
    auto rev = run_step(stage, x * (step + 1), StageMode::kReversible);
    auto plain = run_step(reference, x * (step + 1), StageMode::kStored);
    expect_steps_match(rev, plain, kTol);
  }
}

torch::Tensor images(int64_t channels) {
  return torch::randn({3, channels, 6, 6}, torch::kFloat64);
}

} // namespace

TEST(InvertibleMembers, EveryKindMixedInOneStageMatchesPlainAutograd) {
  torch::manual_seed(0);
  expect_matches_plain_autograd(mixed_stage(), images(4));
}

TEST(InvertibleMembers, EachMemberAloneMatchesPlainAutograd) {
  torch::manual_seed(1);
  {
    SCOPED_TRACE("affine block");
    expect_matches_plain_autograd(
        torchrev::RevSequential(affine_block(2)), images(4));
  }
  {
    SCOPED_TRACE("user coupling");
    expect_matches_plain_autograd(
        torchrev::RevSequential(ScaleBlock(2)), images(4));
  }
  {
    SCOPED_TRACE("user member");
    expect_matches_plain_autograd(
        torchrev::RevSequential(ChannelAffine(4)), images(4));
  }
  {
    SCOPED_TRACE("space-to-depth");
    expect_matches_plain_autograd(
        torchrev::RevSequential(torchrev::SpaceToDepth(2)), images(4));
  }
  {
    SCOPED_TRACE("zero padding");
    expect_matches_plain_autograd(
        torchrev::RevSequential(torchrev::ChannelZeroPad(2)), images(4));
  }
}

TEST(InvertibleMembers, MembersFirstLastAndAdjacentMatchPlainAutograd) {
  torch::manual_seed(2);
  {
    SCOPED_TRACE("invertible layers around couplings");
    expect_matches_plain_autograd(
        torchrev::RevSequential(
            torchrev::SpaceToDepth(2),
            additive_block(8),
            affine_block(8),
            ChannelAffine(16)),
        images(4));
  }
  {
    SCOPED_TRACE("adjacent invertible layers");
    expect_matches_plain_autograd(
        torchrev::RevSequential(
            ChannelAffine(4),
            torchrev::ChannelZeroPad(4),
            torchrev::SpaceToDepth(2),
            ChannelAffine(32),
            additive_block(16)),
        images(4));
  }
  {
    SCOPED_TRACE("couplings splitting along different dimensions");
    expect_matches_plain_autograd(
        torchrev::RevSequential(
            Affine(
                torch::nn::Sequential(torch::nn::Linear(3, 6)),
                torch::nn::Sequential(torch::nn::Linear(3, 6)),
                torchrev::AffineBlockOptions().split_dim(-1)),
            ChannelAffine(4),
            affine_block(2)),
        images(4));
  }
}

TEST(InvertibleMembers, AnchorsAndInvertibleMembersMatchPlainAutograd) {
  torch::manual_seed(3);
  auto stage = mixed_stage();
  stage->options.anchor_every(2);
  expect_matches_plain_autograd(stage, images(4));
}

TEST(InvertibleMembers, BatchNormStatisticsAreUpdatedOnce) {
  torch::manual_seed(4);
  auto stage = mixed_stage();
  stage->to(torch::kFloat64);
  auto reference = copy_of(stage);
  auto x = images(4);
  for (int step = 0; step < 2; ++step) {
    run_step(stage, x * (step + 1), StageMode::kReversible);
    run_step(reference, x * (step + 1), StageMode::kStored);
  }
  auto buffers = stage->named_buffers();
  auto ref_buffers = reference->named_buffers();
  ASSERT_GT(buffers.size(), 0u);
  for (const auto& item : buffers) {
    SCOPED_TRACE(item.key());
    const auto& ref = ref_buffers[item.key()];
    if (item.key().find("num_batches_tracked") != std::string::npos) {
      EXPECT_EQ(item.value().item<int64_t>(), 2);
    } else {
      EXPECT_CLOSE(item.value(), ref, kTol);
    }
  }
}

TEST(InvertibleMembers, DropoutInAffineBlocksIsReplayed) {
  auto stage = mixed_stage(/*dropout=*/0.3);
  stage->to(torch::kFloat64);
  auto reference = copy_of(stage);
  auto x = images(4);
  torch::manual_seed(5);
  auto rev = run_step(stage, x, StageMode::kReversible);
  auto after_rev = torch::rand({4}, torch::kFloat64);
  torch::manual_seed(5);
  auto plain = run_step(reference, x, StageMode::kStored);
  auto after_plain = torch::rand({4}, torch::kFloat64);
  expect_steps_match(rev, plain, kTol);
  EXPECT_TRUE(after_rev.equal(after_plain));
  // Dropout was active: without it the output differs.
  stage->eval();
  torch::NoGradGuard no_grad;
  EXPECT_GT(relative_error(stage(x), rev.y), 1e-3);
}

TEST(InvertibleMembers, EachParameterHookFiresOncePerBackward) {
  torch::manual_seed(6);
  auto stage = mixed_stage();
  stage->to(torch::kFloat64);
  auto params = stage->parameters();
  auto counts = count_accumulator_runs(params);
  stage(images(4).requires_grad_(true)).pow(2).sum().backward();
  for (size_t i = 0; i < params.size(); ++i) {
    EXPECT_EQ(*counts.runs[i], 1) << "parameter " << i;
  }
}

TEST(InvertibleMembers, InverseOfAStageInvertsEveryMember) {
  torch::manual_seed(7);
  auto stage = mixed_stage();
  stage->to(torch::kFloat64);
  stage->eval();
  torch::NoGradGuard no_grad;
  auto x = images(4);
  auto y = stage(x);
  EXPECT_EQ(y.sizes(), torch::IntArrayRef({3, 20, 3, 3}));
  EXPECT_CLOSE(stage->inverse(y), x, 1e-12);

  // The invertible layers are exact.
  torchrev::SpaceToDepth s2d(2);
  EXPECT_TRUE(s2d->inverse(s2d(x)).equal(x));
  torchrev::ChannelZeroPad pad(3);
  EXPECT_TRUE(pad->inverse(pad(x)).equal(x));
  EXPECT_TRUE(pad(x).narrow(1, 4, 3).eq(0).all().item<bool>());
  // An affine block on its own, too.
  auto block = affine_block(2);
  block->to(torch::kFloat64);
  block->eval();
  EXPECT_CLOSE(block->inverse(block(x)), x, 1e-12);
}

TEST(InvertibleMembers, SpaceToDepthKeepsChannelsLast) {
  auto x =
      torch::randn({2, 3, 4, 4}).contiguous(torch::MemoryFormat::ChannelsLast);
  torchrev::SpaceToDepth s2d(2);
  auto y = s2d(x);
  EXPECT_EQ(y.sizes(), torch::IntArrayRef({2, 12, 2, 2}));
  EXPECT_TRUE(y.is_contiguous(torch::MemoryFormat::ChannelsLast));
}

TEST(InvertibleMembers, AnInverseOfAnotherShapeIsNamed) {
  torch::manual_seed(8);
  torchrev::RevSequential stage(additive_block(2), WrongInverse());
  auto x = torch::randn({2, 4, 4, 4}, torch::requires_grad());
  auto y = stage(x);
  EXPECT_ERROR_CONTAINS(
      y.sum().backward(),
      "block 1 (",
      "WrongInverseImpl)",
      "inverse must return the shape",
      "expected shape [2, 4, 4, 4]",
      "shape [2, 1, 4, 4]");
}

TEST(InvertibleMembers, AnInverseOrUncoupleInPlaceIsNamed) {
  {
    torchrev::RevSequential stage(additive_block(2), InPlaceInverse());
    auto y = stage(torch::randn({2, 4, 4, 4}, torch::requires_grad()));
    EXPECT_ERROR_CONTAINS(
        y.sum().backward(), "block 1 (", "inverse modified its input in place");
  }
  {
    torchrev::RevSequential stage(InPlaceUncouple(), additive_block(2));
    auto y = stage(torch::randn({2, 4, 4, 4}, torch::requires_grad()));
    EXPECT_ERROR_CONTAINS(
        y.sum().backward(),
        "block 0 (",
        "uncouple modified an argument in place");
    // On its own, the block is named as a coupling block.
    InPlaceUncouple block;
    torch::NoGradGuard no_grad;
    EXPECT_ERROR_CONTAINS(
        block->inverse(torch::randn({2, 4})),
        "torchrev coupling block (",
        "uncouple modified an argument in place");
  }
}

TEST(InvertibleMembers, BadAffineInputIsAClearError) {
  EXPECT_ERROR_CONTAINS(
      Affine(
          affine_net(2),
          affine_net(2),
          torchrev::AffineBlockOptions().min_scale(0)),
      "min_scale must be in (0, 1]",
      "a scale of 0 cannot be inverted",
      "but got 0");
  // F returning the half's shape instead of scale and shift.
  Affine wrong(smooth_residual(2), smooth_residual(2));
  torchrev::RevSequential stage(wrong);
  EXPECT_ERROR_CONTAINS(
      stage(torch::randn({2, 4, 4, 4}, torch::requires_grad())),
      "the raw scale and the shift joined along the split dimension 1",
      "expected shape [2, 4, 4, 4] for a half of shape [2, 2, 4, 4]",
      "but got [2, 2, 4, 4]");
}

TEST(InvertibleMembers, BadLayerInputIsAClearError) {
  torchrev::SpaceToDepth s2d(2);
  EXPECT_ERROR_CONTAINS(
      s2d(torch::randn({2, 3, 5, 4})),
      "height and width divisible by block_size 2",
      "[2, 3, 5, 4]");
  EXPECT_ERROR_CONTAINS(
      s2d(torch::randn({2, 3})), "expected a 4-d input", "2-d tensor");
  EXPECT_ERROR_CONTAINS(
      s2d->inverse(torch::randn({2, 3, 2, 2})),
      "channels are divisible by block_size^2 = 4",
      "[2, 3, 2, 2]");
  EXPECT_ERROR_CONTAINS(
      torchrev::ChannelZeroPad(-1), "extra must be 0 or more", "got -1");
  torchrev::ChannelZeroPad pad(4);
  EXPECT_ERROR_CONTAINS(
      pad->inverse(torch::randn({2, 4})), "expected more than 4 entries");
  // Inside a stage, the member is named.
  torchrev::RevSequential stage(additive_block(2), torchrev::SpaceToDepth(2));
  EXPECT_ERROR_CONTAINS(
      stage(torch::randn({2, 4, 3, 3}, torch::requires_grad())),
      "in forward of torchrev::RevSequential block 1 (torchrev::SpaceToDepthImpl)",
      "divisible by block_size 2");
}

TEST(InvertibleMembers, ACloneIsADeepCopy) {
  torch::manual_seed(9);
  auto stage = mixed_stage();
  auto copy = copy_of(stage);
  ASSERT_EQ(copy->size(), stage->size());
  auto params = stage->parameters();
  auto copied = copy->parameters();
  ASSERT_EQ(params.size(), copied.size());
  for (size_t i = 0; i < params.size(); ++i) {
    EXPECT_TRUE(params[i].equal(copied[i]));
    EXPECT_NE(params[i].data_ptr(), copied[i].data_ptr());
  }
}

namespace {

/// The peak a training step allocates on top of the parameters and their
/// gradients, for `groups` x (4 additive blocks, then a user member) in one
/// stage on 8 x 8 x 32 x 32 inputs.
size_t step_peak_of_groups(int groups) {
  torch::manual_seed(40);
  torchrev::RevSequential stage;
  for (int g = 0; g < groups; ++g) {
    for (int b = 0; b < 4; ++b) {
      stage->push_back(additive_block(4));
    }
    stage->push_back(ChannelAffine(8));
  }
  auto x = torch::randn({8, 8, 32, 32});
  stage(x).pow(2).mean().backward(); // warm-up: allocates the .grad tensors
  for (auto& p : stage->parameters()) {
    p.grad().zero_();
  }
  auto& meter = torchrev::CPUMemoryMeter::instance();
  const size_t before = meter.current_bytes();
  meter.reset_peak();
  stage(x).pow(2).mean().backward();
  return meter.peak_bytes() - before;
}

} // namespace

TEST(InvertibleMembersMemory, PeakIsFlatInTheNumberOfGroups) {
  const size_t two = step_peak_of_groups(2);
  const size_t eight = step_peak_of_groups(8);
  const double ratio = double(eight) / double(two);
  std::cout << "[ memory   ] training-step peak, bytes: 2 groups = " << two
            << ", 8 groups = " << eight << " (x" << ratio << ")" << std::endl;
  EXPECT_LE(ratio, 1.10);
}
