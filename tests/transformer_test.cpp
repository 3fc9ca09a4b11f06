// Vision transformers: RevViT's values and gradients against the same blocks
// run with plain autograd (dropout included), against ViT, parameter counts,
// options and errors, and memory flat in depth.

#include "test_util.h"

#include <torchrev/models/zoo.h>

using torchrev::models::RevViTImpl;
using torchrev::models::StageMode;
using torchrev::models::TokenPooling;
using torchrev::models::ViTImpl;
using torchrev::models::ViTOptions;

namespace {

// Parameters from the architecture, written independently of the builders:
// LayerNorm 2*d, linear in*out + out, the patch convolution with a bias.
int64_t vit_params(const ViTOptions& o) {
  const int64_t d = o.dim(), hidden = d * o.mlp_ratio();
  const int64_t grid = o.image_size() / o.patch_size();
  const bool cls = o.pool() == TokenPooling::kClassToken;
  const int64_t attention = 2 * d + (d * 3 * d + 3 * d) + (d * d + d);
  const int64_t mlp = 2 * d + (d * hidden + hidden) + (hidden * d + d);
  const int64_t embedding =
      o.in_channels() * o.patch_size() * o.patch_size() * d + d +
      (grid * grid + (cls ? 1 : 0)) * d + (cls ? d : 0);
  const int64_t head = 2 * d + d * o.num_classes() + o.num_classes();
  return embedding + o.depth() * (attention + mlp) + head;
}

} // namespace

TEST(Transformer, RevViTGradientsEqualTheSameBlocksWithPlainAutograd) {
  for (auto pool : {TokenPooling::kMean, TokenPooling::kClassToken}) {
    SCOPED_TRACE(pool == TokenPooling::kMean ? "mean" : "class token");
    torch::manual_seed(70);
    auto options = torchrev::testing::tiny_vit_options().pool(pool);
    auto base = std::make_shared<RevViTImpl>(options);
    base->to(torch::kFloat64);
    auto images = torch::randn({3, 3, 8, 8}, torch::kFloat64);
    auto labels = torch::tensor({1, 4, 9});
    std::vector<torchrev::testing::ModelStep> runs;
    for (auto mode :
         {StageMode::kStored,
          StageMode::kReversible,
          StageMode::kCheckpointed}) {
      runs.push_back(torchrev::testing::model_step(
          std::dynamic_pointer_cast<RevViTImpl>(base->clone()),
          mode,
          images,
          labels));
    }
    // Dropout is active: another seed gives other logits, so equality below
    // is the replay of the forward's random numbers, not their absence.
    {
      auto other = std::dynamic_pointer_cast<RevViTImpl>(base->clone());
      torch::manual_seed(6);
      torch::NoGradGuard no_grad;
      EXPECT_GT(
          torchrev::testing::relative_error(
              other->forward(images), runs[0].logits),
          1e-3);
    }
    for (size_t m : {1u, 2u}) {
      SCOPED_TRACE(m == 1 ? "reversible" : "checkpointed");
      EXPECT_CLOSE(runs[m].logits, runs[0].logits, 1e-12);
      EXPECT_CLOSE(runs[m].input_grad, runs[0].input_grad, 1e-9);
      ASSERT_EQ(runs[m].grads.size(), runs[0].grads.size());
      for (size_t i = 0; i < runs[0].grads.size(); ++i) {
        SCOPED_TRACE("parameter " + std::to_string(i));
        ASSERT_TRUE(runs[m].grads[i].defined());
        EXPECT_CLOSE(runs[m].grads[i], runs[0].grads[i], 1e-9);
      }
    }
  }
}

TEST(Transformer, ViTAndRevViTHaveTheSameParametersAndBlocks) {
  for (auto pool : {TokenPooling::kMean, TokenPooling::kClassToken}) {
    auto options =
        ViTOptions().image_size(28).in_channels(1).num_classes(7).pool(pool);
    torchrev::models::ViT vit(options);
    torchrev::models::RevViT revvit(options);
    EXPECT_EQ(torchrev::models::parameter_count(*vit), vit_params(options));
    EXPECT_EQ(torchrev::models::parameter_count(*revvit), vit_params(options));
    EXPECT_EQ(revvit->blocks->size(), 6u);
    torch::NoGradGuard no_grad;
    vit->eval();
    revvit->eval();
    auto images = torch::randn({2, 1, 28, 28});
    EXPECT_EQ(vit(images).sizes(), torch::IntArrayRef({2, 7}));
    EXPECT_EQ(revvit(images).sizes(), torch::IntArrayRef({2, 7}));
  }
}

TEST(Transformer, ZooNamesImageSizeAndDepth) {
  for (const std::string name : {"vit_mini", "revvit_mini"}) {
    SCOPED_TRACE(name);
    EXPECT_TRUE(torchrev::models::is_transformer(name));
    auto net = torchrev::models::create(
        name,
        torchrev::models::ZooOptions().in_channels(1).image_size(28).depth(2));
    const auto expected =
        vit_params(ViTOptions().image_size(28).in_channels(1).depth(2));
    EXPECT_EQ(torchrev::models::parameter_count(*net), expected);
    torch::NoGradGuard no_grad;
    net->eval();
    EXPECT_EQ(
        net->forward(torch::randn({2, 1, 28, 28})).sizes(),
        torch::IntArrayRef({2, 10}));
    // 32x32 images for a 28x28 model: a clear error, not a shape mismatch
    // deep inside.
    const auto message = torchrev::testing::error_of([&] {
      net->forward(torch::randn({2, 1, 32, 32}));
    });
    EXPECT_NE(
        message.find("expected images of shape (batch, 1, 28, 28), got shape "
                     "[2, 1, 32, 32]"),
        std::string::npos)
        << message;
  }
  EXPECT_TRUE(torchrev::models::is_reversible("revvit_mini"));
  EXPECT_FALSE(torchrev::models::is_reversible("vit_mini"));
}

TEST(Transformer, ZooDefaultDepthIsTheMiniModelsOwn) {
  for (const std::string name : {"vit_mini", "revvit_mini"}) {
    SCOPED_TRACE(name);
    auto net = torchrev::models::create(
        name, torchrev::models::ZooOptions().in_channels(1).image_size(28));
    EXPECT_EQ(
        torchrev::models::parameter_count(*net),
        vit_params(ViTOptions().image_size(28).in_channels(1).depth(
            torchrev::models::kViTMiniDepth)));
  }
}

TEST(Transformer, BadOptionsAreNamed) {
  using torchrev::testing::error_of;
  auto message = error_of([] { torchrev::models::ViT(ViTOptions().dim(30)); });
  EXPECT_NE(
      message.find("expected dim divisible by heads (both positive), got dim "
                   "30 and 4 heads"),
      std::string::npos)
      << message;
  message =
      error_of([] { torchrev::models::RevViT(ViTOptions().image_size(30)); });
  EXPECT_NE(
      message.find("expected a patch_size that divides image_size, got "
                   "patch_size 4 and image_size 30"),
      std::string::npos)
      << message;
  message = error_of([] { torchrev::models::ViT(ViTOptions().dropout(1.0)); });
  EXPECT_NE(
      message.find("expected dropout probabilities in [0, 1), got 1"),
      std::string::npos)
      << message;
}

namespace {

size_t revvit_step_peak(int64_t depth) {
  torch::manual_seed(71);
  torchrev::models::RevViT net(ViTOptions().depth(depth).dim(32).heads(2));
  auto images = torch::randn({16, 3, 32, 32});
  auto labels = torch::randint(10, {16});
  auto step = [&] {
    torch::nn::functional::cross_entropy(net(images), labels).backward();
  };
  step(); // warm-up: allocates the .grad tensors
  for (auto& p : net->parameters()) {
    p.grad().zero_();
  }
  auto& meter = torchrev::CPUMemoryMeter::instance();
  const size_t before = meter.current_bytes();
  meter.reset_peak();
  step();
  return meter.peak_bytes() - before;
}

} // namespace

TEST(TransformerMemory, RevViTPeakIsFlatInDepth) {
  const size_t two = revvit_step_peak(2);
  const size_t eight = revvit_step_peak(8);
  const double ratio = double(eight) / double(two);
  std::cout << "[ memory   ] RevViT training-step peak, bytes: depth 2 = "
            << two << ", depth 8 = " << eight << " (x" << ratio << ")"
            << std::endl;
  EXPECT_LE(ratio, 1.10);
}
