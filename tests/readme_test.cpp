// The README's snippets, compiled with the umbrella header alone and run:
// composing, writing and cloning a block, converting a stage, auditing,
// training and saving.

#include <torchrev/torchrev.h>

#include <gtest/gtest.h>

#include <filesystem>
#include <sstream>

namespace {

// "Writing your own block", with the clone() of the paragraph after it.
struct MyBlockImpl : torchrev::RevBlockBase {
  explicit MyBlockImpl(int64_t half_)
      : f(register_module("f", torch::nn::Linear(half_, half_))),
        g(register_module("g", torch::nn::Linear(half_, half_))),
        half(half_) {}
  torch::Tensor forward_f(const torch::Tensor& x2) override {
    return torch::tanh(f(x2));
  }
  torch::Tensor forward_g(const torch::Tensor& y1) override {
    return torch::tanh(g(y1));
  }
  std::shared_ptr<torch::nn::Module> clone(
      const torch::optional<torch::Device>& device =
          torch::nullopt) const override {
    return torchrev::clone_state_into(
        *this, std::make_shared<MyBlockImpl>(half), device);
  }
  torch::nn::Linear f, g;
  int64_t half;
};
TORCH_MODULE(MyBlock);

// "Invertible members": a member of your own.
struct FeatureAffineImpl : torchrev::InvertibleModule {
  explicit FeatureAffineImpl(int64_t features)
      : s(register_parameter("s", torch::zeros({features}))),
        b(register_parameter("b", torch::zeros({features}))) {}
  torch::Tensor forward(const torch::Tensor& x) override {
    return x * s.exp() + b;
  }
  torch::Tensor inverse(const torch::Tensor& y) override {
    return (y - b) * (-s).exp();
  }
  torch::Tensor s, b;
};
TORCH_MODULE(FeatureAffine);

} // namespace

TEST(Readme, InvertibleMembersTrainAndInvert) {
  auto net = [] { // 8 channels in, raw scale and shift (2 x 8) out
    return torch::nn::Sequential(
        torch::nn::BatchNorm2d(8),
        torch::nn::ReLU(),
        torch::nn::Conv2d(torch::nn::Conv2dOptions(8, 16, 3).padding(1)));
  };
  using Affine =
      torchrev::AffineBlock<torch::nn::Sequential, torch::nn::Sequential>;
  torchrev::RevSequential stage(
      Affine(net(), net()),
      Affine(net(), net(), torchrev::AffineBlockOptions().min_scale(0.25)),
      torchrev::SpaceToDepth(2)); // 16 channels at H, W -> 64 at H/2, W/2
  auto x = torch::randn({4, 16, 32, 32}, torch::requires_grad());
  auto y = stage(x);
  EXPECT_EQ(y.sizes(), torch::IntArrayRef({4, 64, 16, 16}));
  y.pow(2).mean().backward();
  EXPECT_TRUE(x.grad().defined());
  stage->eval();
  torch::NoGradGuard no_grad;
  EXPECT_TRUE(stage->inverse(stage(x)).allclose(x, 1e-4, 1e-4));

  torchrev::RevSequential mixed(MyBlock(64), FeatureAffine(128), MyBlock(64));
  auto in = torch::randn({8, 128});
  EXPECT_TRUE(mixed->inverse(mixed(in)).allclose(in, 1e-4, 1e-4));
}

TEST(Readme, ComposingTrainingAndSavingCompileWithTheUmbrellaHeader) {
  auto residual = [] {
    return torch::nn::Sequential(
        torch::nn::BatchNorm2d(16),
        torch::nn::ReLU(),
        torch::nn::Conv2d(torch::nn::Conv2dOptions(16, 16, 3).padding(1)));
  };
  torchrev::RevSequential stage;
  for (int i = 0; i < 4; ++i) {
    stage->push_back(
        torchrev::RevBlock<torch::nn::Sequential, torch::nn::Sequential>(
            residual(), residual()));
  }
  torch::nn::Sequential model(
      torch::nn::Conv2d(torch::nn::Conv2dOptions(3, 32, 3).padding(1)),
      stage,
      torch::nn::AdaptiveAvgPool2d(1),
      torch::nn::Flatten(),
      torch::nn::Linear(32, 10));
  // Training and saving need nothing beyond the umbrella header.
  torch::optim::SGD optimizer(
      model->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
  auto images = torch::randn({2, 3, 8, 8});
  auto labels = torch::tensor({1, 3});
  auto loss =
      torch::nn::functional::cross_entropy(model->forward(images), labels);
  optimizer.zero_grad();
  loss.backward();
  optimizer.step();
  std::stringstream saved;
  torch::save(model, saved);
  torch::nn::Sequential loaded(
      torch::nn::Conv2d(torch::nn::Conv2dOptions(3, 32, 3).padding(1)),
      torchrev::RevSequential(
          torchrev::RevBlock<torch::nn::Sequential, torch::nn::Sequential>(
              residual(), residual()),
          torchrev::RevBlock<torch::nn::Sequential, torch::nn::Sequential>(
              residual(), residual()),
          torchrev::RevBlock<torch::nn::Sequential, torch::nn::Sequential>(
              residual(), residual()),
          torchrev::RevBlock<torch::nn::Sequential, torch::nn::Sequential>(
              residual(), residual())),
      torch::nn::AdaptiveAvgPool2d(1),
      torch::nn::Flatten(),
      torch::nn::Linear(32, 10));
  torch::load(loaded, saved);
  model->eval();
  loaded->eval();
  EXPECT_TRUE(model->forward(images).equal(loaded->forward(images)));
}

TEST(Readme, CustomBlockClonesDeeplyAndInverts) {
  torchrev::RevSequential stage(MyBlock(3), MyBlock(3));
  stage->push_back(std::make_shared<MyBlockImpl>(3));
  auto copy =
      std::dynamic_pointer_cast<torchrev::RevSequentialImpl>(stage->clone());
  ASSERT_NE(copy, nullptr);
  auto x = torch::randn({4, 6}, torch::kFloat64);
  stage->to(torch::kFloat64);
  copy->to(torch::kFloat64);
  EXPECT_TRUE(stage(x).equal(copy->forward(x)));
  // Deep: changing the copy leaves the original.
  {
    torch::NoGradGuard no_grad;
    copy->parameters()[0].add_(1.0);
  }
  EXPECT_FALSE(stage(x).equal(copy->forward(x)));
  auto y = stage(x.requires_grad_(true));
  auto back = stage->inverse(y.detach());
  EXPECT_LT((back - x.detach()).abs().max().item<double>(), 1e-12);
  // A clone into a block of another size is a clear error.
  MyBlock small(3);
  EXPECT_THROW(
      torchrev::clone_state_into(*small, std::make_shared<MyBlockImpl>(4)),
      c10::Error);
}

TEST(Readme, ConvertingAStageWithACheckpointedTransition) {
  const int n = 3;
  torch::nn::Sequential stage2;
  stage2->push_back(torchrev::Checkpoint(torchrev::models::RevTransitionBlock(
      torchrev::models::ResidualBlockOptions(32, 64).stride(2))));
  torchrev::RevSequential body;
  for (int i = 1; i < n; ++i) {
    body->push_back(torchrev::models::preact_rev_block(64));
  }
  stage2->push_back(body);
  auto x = torch::randn({2, 32, 8, 8}, torch::requires_grad());
  torchrev::ActivationAudit audit;
  stage2->forward(x).sum().backward();
  EXPECT_EQ(x.grad().sizes(), x.sizes());
  EXPECT_TRUE(audit.storing().empty()) << audit.report(*stage2);
  // The transition prints without doubled parentheses.
  std::ostringstream printed;
  printed << *stage2;
  EXPECT_NE(
      printed.str().find("torchrev::models::RevTransitionBlock[32 -> 64, "
                         "stride=2]("),
      std::string::npos)
      << printed.str();
}

TEST(Readme, CheckingYourOwnBlock) {
  torch::manual_seed(0);
  torchrev::RevSequential stage(MyBlock(8), MyBlock(8));
  auto report = torchrev::check_stage(stage, torch::randn({4, 16}));
  std::ostringstream printed;
  printed << report; // one line per check; the first failure on top
  EXPECT_TRUE(report.passed()) << printed.str();
  EXPECT_EQ(report.first_failure(), nullptr);
  EXPECT_NE(printed.str().find("ok    member 1 ("), std::string::npos)
      << printed.str();
  EXPECT_NE(printed.str().find("ok    stage: forward"), std::string::npos)
      << printed.str();
}

TEST(Readme, TransformersFromTheZoo) {
  // "Model zoo": a reversible ViT for 28x28 images, deeper than the zoo's.
  torchrev::models::RevViT net(
      torchrev::models::ViTOptions().image_size(28).in_channels(1).depth(12));
  auto images = torch::randn({2, 1, 28, 28});
  auto logits = net(images);
  EXPECT_EQ(logits.sizes(), torch::IntArrayRef({2, 10}));
  logits.sum().backward();
  EXPECT_TRUE(net->embedding->patches->weight.grad().defined());
}

TEST(Readme, APreActConvUnit) {
  // "Model zoo": a lean pre-activation unit.
  auto x = torch::randn({4, 16, 8, 8}, torch::requires_grad());
  torchrev::models::PreActConv unit(
      torchrev::models::PreActConvOptions(16, 32, 3).stride(2));
  auto y = unit(x); // BatchNorm2d(16) -> ReLU -> 3x3 conv, stride 2
  EXPECT_EQ(y.sizes(), torch::IntArrayRef({4, 32, 4, 4}));
  y.sum().backward();
  EXPECT_TRUE(x.grad().defined());
  EXPECT_TRUE(unit->conv->weight.grad().defined());
}
