// RevSequential as a container: construction, embedding, serialization,
// inversion, plain (no-grad) forward, and errors for bad input.

#include "test_util.h"

#include <sstream>

using namespace torchrev::testing;

namespace {

/// A user-written block: subclasses RevBlockBase directly.
struct AffineTanhBlockImpl : torchrev::RevBlockBase {
  explicit AffineTanhBlockImpl(int64_t half)
      : f(register_module("f", torch::nn::Linear(half, half))),
        g(register_module("g", torch::nn::Linear(half, half))) {}
  torch::Tensor forward_f(const torch::Tensor& x2) override {
    return torch::tanh(f(x2));
  }
  torch::Tensor forward_g(const torch::Tensor& y1) override {
    return 0.5 * torch::tanh(g(y1));
  }
  torch::nn::Linear f, g;
};
TORCH_MODULE(AffineTanhBlock);

/// A block whose F changes the shape: must be rejected.
struct ShapeChangingBlockImpl : torchrev::RevBlockBase {
  explicit ShapeChangingBlockImpl(bool in_f_) : in_f(in_f_) {}
  torch::Tensor forward_f(const torch::Tensor& x2) override {
    return in_f ? x2.narrow(1, 0, 1) : x2;
  }
  torch::Tensor forward_g(const torch::Tensor& y1) override {
    return in_f ? y1 : torch::cat({y1, y1}, 1);
  }
  bool in_f;
};
TORCH_MODULE(ShapeChangingBlock);

} // namespace

TEST(RevSequential, ApiCompilesAsDocumented) {
  torch::nn::Sequential seq_f(torch::nn::Linear(2, 2));
  torch::nn::Sequential seq_g(torch::nn::Linear(2, 2));
  torchrev::RevBlock<torch::nn::Sequential, torch::nn::Sequential> block(
      seq_f, seq_g);
  EXPECT_EQ(block->f.ptr(), seq_f.ptr());
  EXPECT_EQ(block->named_children()["f"].get(), seq_f.ptr().get());
  EXPECT_EQ(block->named_children()["g"].get(), seq_g.ptr().get());

  torchrev::RevSequential empty;
  EXPECT_EQ(empty->size(), 0u);
  torchrev::RevSequential stage(
      block, std::make_shared<AffineTanhBlockImpl>(2));
  stage->push_back(AffineTanhBlock(2));
  stage->push_back(std::make_shared<AffineTanhBlockImpl>(2));
  stage->push_back(
      torchrev::RevBlock<torch::nn::Sequential, torch::nn::Sequential>(
          torch::nn::Sequential(torch::nn::Linear(2, 2)),
          torch::nn::Sequential(torch::nn::Linear(2, 2))));
  EXPECT_EQ(stage->size(), 5u);
  EXPECT_EQ(stage->ptr(0).get(), block.ptr().get());
  EXPECT_NE(stage->ptr<AffineTanhBlockImpl>(1), nullptr);
  EXPECT_EQ(stage->ptr<AffineTanhBlockImpl>(0), nullptr);
  auto children = stage->named_children();
  for (const char* name : {"0", "1", "2", "3", "4"}) {
    EXPECT_TRUE(children.contains(name)) << name;
  }
  torchrev::RevSequential with_options(
      torchrev::RevSequentialOptions().preserve_rng_state(false), block);
  EXPECT_FALSE(with_options->options.preserve_rng_state());
  EXPECT_EQ(with_options->size(), 1u);
  EXPECT_EQ(stage(torch::randn({3, 4})).sizes(), torch::IntArrayRef({3, 4}));
}

TEST(RevSequential, SubclassedRevBlockBaseMatchesPlainAutograd) {
  torch::manual_seed(20);
  torchrev::RevSequential stage;
  for (int i = 0; i < 5; ++i) {
    stage->push_back(AffineTanhBlock(3));
  }
  stage->to(torch::kFloat64);
  auto x =
      torch::randn({4, 6}, torch::dtype(torch::kFloat64).requires_grad(true));
  stage(x).pow(2).sum().backward();
  auto rev_grad_x = x.grad().clone();
  std::vector<torch::Tensor> rev_grads;
  for (auto& p : stage->parameters()) {
    rev_grads.push_back(p.grad().clone());
    p.mutable_grad() = torch::Tensor();
  }
  x.mutable_grad() = torch::Tensor();
  run_stage(stage, x, StageMode::kStored).pow(2).sum().backward();
  EXPECT_CLOSE(rev_grad_x, x.grad(), 1e-9);
  auto params = stage->parameters();
  for (size_t i = 0; i < params.size(); ++i) {
    EXPECT_CLOSE(rev_grads[i], params[i].grad(), 1e-9);
  }
}

TEST(RevSequential, InverseOfForwardReconstructsTheInputOver16Blocks) {
  torch::manual_seed(21);
  auto stage = conv_stage(16, 2);
  stage->to(torch::kFloat64);
  stage->eval();
  auto x = torch::randn({2, 4, 6, 6}, torch::kFloat64);
  torch::NoGradGuard no_grad;
  auto y = stage(x);
  EXPECT_GT(relative_error(y, x), 1e-2); // the stage does something
  EXPECT_CLOSE(stage->inverse(y), x, 1e-9);
}

TEST(RevSequential, InverseInTrainingModeDoesNotUpdateRunningStats) {
  torch::manual_seed(22);
  auto stage = conv_stage(2, 2);
  auto x = torch::randn({2, 4, 6, 6});
  torch::NoGradGuard no_grad;
  auto y = stage(x);
  std::vector<torch::Tensor> before;
  for (const auto& b : stage->buffers()) {
    before.push_back(b.clone());
  }
  auto x_back = stage->inverse(y);
  EXPECT_CLOSE(x_back, x, 1e-4);
  auto after = stage->buffers();
  for (size_t i = 0; i < before.size(); ++i) {
    EXPECT_TRUE(after[i].equal(before[i])) << "buffer " << i;
  }
}

TEST(RevSequential, NestsInTorchSequentialAndRoundTripsThroughSaveAndLoad) {
  torch::manual_seed(23);
  auto make = [] {
    return torch::nn::Sequential(
        torch::nn::Conv2d(torch::nn::Conv2dOptions(1, 4, 3).padding(1)),
        torch::nn::ReLU(),
        conv_stage(3, 2),
        torch::nn::AdaptiveAvgPool2d(1),
        torch::nn::Flatten(),
        torch::nn::Linear(4, 3));
  };
  auto model = make();
  auto x = torch::randn({2, 1, 6, 6});
  model->forward(x).sum().backward(); // trains through the nested stage
  for (const auto& p : model->parameters()) {
    ASSERT_TRUE(p.grad().defined());
  }
  model->eval();
  torch::NoGradGuard no_grad;
  auto expected = model->forward(x);

  std::stringstream stream;
  torch::save(model, stream);
  torch::manual_seed(99);
  auto loaded = make();
  loaded->eval();
  EXPECT_FALSE(loaded->forward(x).equal(expected));
  torch::load(loaded, stream);
  EXPECT_TRUE(loaded->forward(x).equal(expected));
  auto names = loaded->named_parameters().keys();
  EXPECT_NE(
      std::find(names.begin(), names.end(), "2.1.f.2.weight"), names.end());
}

TEST(RevSequential, CloneIsDeepAndIndependent) {
  torch::manual_seed(24);
  auto stage = mlp_stage(3, 2);
  auto copy = copy_of(stage);
  ASSERT_EQ(copy->size(), 3u);
  auto x = torch::randn({2, 4});
  torch::NoGradGuard no_grad;
  EXPECT_TRUE(copy(x).equal(stage(x)));
  stage->parameters()[0].add_(1.0);
  EXPECT_FALSE(copy(x).equal(stage(x)));
}

TEST(RevSequential, PrettyPrintNamesTorchrevModulesAndNonDefaultOptions) {
  auto stage = mlp_stage(1, 2);
  std::ostringstream plain;
  plain << *stage;
  EXPECT_NE(plain.str().find("torchrev::RevSequential(\n"), std::string::npos)
      << plain.str();
  EXPECT_NE(plain.str().find("(0): torchrev::RevBlock"), std::string::npos)
      << plain.str();
  torchrev::RevSequential quiet(
      torchrev::RevSequentialOptions().preserve_rng_state(false));
  std::ostringstream with_option;
  with_option << *quiet;
  EXPECT_EQ(
      with_option.str(), "torchrev::RevSequential(preserve_rng_state=false)");
}

TEST(RevSequential, PlainForwardUnderNoGradSavesNothing) {
  auto stage = conv_stage(8, 4);
  auto x = torch::randn({4, 8, 16, 16}, torch::requires_grad());
  torch::NoGradGuard no_grad;
  auto& meter = torchrev::CPUMemoryMeter::instance();
  stage(x); // warm-up
  const size_t before = meter.current_bytes();
  auto y = stage(x);
  EXPECT_FALSE(y.requires_grad());
  EXPECT_FALSE(y.grad_fn());
  // Only the output itself is still allocated.
  EXPECT_EQ(meter.current_bytes() - before, static_cast<size_t>(y.nbytes()));
}

TEST(RevSequential, WithoutAnythingRequiringGradNothingIsSaved) {
  auto stage = conv_stage(8, 4);
  for (auto& p : stage->parameters()) {
    p.requires_grad_(false);
  }
  auto x = torch::randn({4, 8, 16, 16});
  auto& meter = torchrev::CPUMemoryMeter::instance();
  stage(x); // warm-up
  const size_t before = meter.current_bytes();
  auto y = stage(x); // grad mode is on, but nothing requires grad
  EXPECT_FALSE(y.requires_grad());
  EXPECT_EQ(meter.current_bytes() - before, static_cast<size_t>(y.nbytes()));
}

TEST(RevSequential, AModuleSharedByFAndGGetsItsGradientOnce) {
  torch::manual_seed(25);
  torch::nn::Linear shared(3, 3);
  auto make = [&] {
    torch::nn::Sequential f(shared, torch::nn::Tanh());
    torch::nn::Sequential g(shared, torch::nn::Sigmoid());
    return SeqBlock(f, g);
  };
  torchrev::RevSequential stage(make(), make());
  stage->to(torch::kFloat64);
  auto x = torch::randn({4, 6}, torch::kFloat64);
  stage(x).pow(2).sum().backward();
  auto rev_grad = shared->weight.grad().clone();
  shared->weight.mutable_grad() = torch::Tensor();
  shared->bias.mutable_grad() = torch::Tensor();
  run_stage(stage, x, StageMode::kStored).pow(2).sum().backward();
  EXPECT_CLOSE(rev_grad, shared->weight.grad(), 1e-9);
}

TEST(RevSequential, OddSizeAlongTheSplitDimensionIsAnErrorNamingTheBlock) {
  auto stage = mlp_stage(2, 2);
  EXPECT_ERROR_CONTAINS(
      stage(torch::randn({2, 5}, torch::requires_grad())),
      "block 0",
      "even size along the split dimension 1",
      "got size 5");
  torch::NoGradGuard no_grad;
  EXPECT_ERROR_CONTAINS(stage(torch::randn({2, 5})), "block 0", "got size 5");
}

TEST(RevSequential, FewerThanTwoDimensionsIsAnError) {
  auto stage = mlp_stage(1, 2);
  EXPECT_ERROR_CONTAINS(
      stage(torch::randn({4}, torch::requires_grad())),
      "block 0",
      "at least 2 dimensions",
      "1-d tensor");
}

TEST(RevSequential, FOrGReturningAnotherShapeIsAnErrorNamingTheBlock) {
  auto good = mlp_stage(1, 2)->ptr(0);
  torchrev::RevSequential bad_f(good, ShapeChangingBlock(true));
  EXPECT_ERROR_CONTAINS(
      bad_f(torch::randn({2, 4}, torch::requires_grad())),
      "block 1",
      "F must preserve the shape",
      "[2, 2]",
      "[2, 1]");
  torchrev::RevSequential bad_g(ShapeChangingBlock(false));
  EXPECT_ERROR_CONTAINS(
      bad_g(torch::randn({2, 4}, torch::requires_grad())),
      "block 0",
      "G must preserve the shape",
      "[2, 4]");
}

TEST(RevSequential, EmptyStageIsAnError) {
  torchrev::RevSequential stage;
  EXPECT_ERROR_CONTAINS(stage(torch::randn({2, 4})), "empty stage");
  EXPECT_ERROR_CONTAINS(stage->inverse(torch::randn({2, 4})), "empty stage");
}

TEST(RevSequential, OutOfRangeIndexIsAnError) {
  auto stage = mlp_stage(2, 2);
  EXPECT_ERROR_CONTAINS(stage->ptr(2), "index 2 is out of range", "2 blocks");
}
