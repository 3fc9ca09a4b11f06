// check_block / check_stage: every block of the zoo passes; the classic
// mistakes (F writing into its input, a private generator, state changed by
// the forward, an inexact inverse) fail and are named.

#include "test_util.h"

#include <torchrev/check.h>
#include <torchrev/models/zoo.h>

namespace {

using torchrev::check_block;
using torchrev::check_stage;
using torchrev::CheckReport;

/// F and G: Linear + tanh on `half` features. `Mistake` selects what F does
/// wrong.
enum class Mistake { kNone, kInPlaceInput, kOwnGenerator, kChangedState };

struct LinearBlockImpl : torchrev::RevBlockBase {
  LinearBlockImpl(int64_t half, Mistake mistake)
      : half_(half),
        mistake_(mistake),
        f(register_module("f", torch::nn::Linear(half, half))),
        g(register_module("g", torch::nn::Linear(half, half))) {}

  torch::Tensor forward_f(const torch::Tensor& x2) override {
    switch (mistake_) {
      case Mistake::kNone:
        break;
      case Mistake::kInPlaceInput:
        return torch::tanh(f(x2.mul_(1.0)));
      case Mistake::kOwnGenerator: {
        // Dropout with a generator of its own: the stage cannot replay it.
        auto keep =
            torch::bernoulli(torch::full_like(x2, 0.5), 0.5, generator_);
        return torch::tanh(f(x2 * keep * 2));
      }
      case Mistake::kChangedState:
        // A scale that the forward changes: a recompute sees another one.
        calls_ += 1;
        return torch::tanh(f(x2)) * static_cast<double>(calls_);
    }
    return torch::tanh(f(x2));
  }

  torch::Tensor forward_g(const torch::Tensor& y1) override {
    return torch::tanh(g(y1));
  }

  std::shared_ptr<torch::nn::Module> clone(
      const torch::optional<torch::Device>& device =
          torch::nullopt) const override {
    auto copy = std::make_shared<LinearBlockImpl>(half_, mistake_);
    copy->calls_ = calls_;
    copy->generator_ = generator_; // shares the generator, as copies do
    return torchrev::clone_state_into(*this, copy, device);
  }

  int64_t half_;
  Mistake mistake_;
  int64_t calls_ = 0;
  at::Generator generator_ = at::detail::createCPUGenerator(7);
  torch::nn::Linear f, g;
};
TORCH_MODULE(LinearBlock);

/// A member whose inverse is off by a little.
struct InexactInverseImpl : torchrev::InvertibleModule {
  torch::Tensor forward(const torch::Tensor& x) override {
    return x * 2;
  }
  torch::Tensor inverse(const torch::Tensor& y) override {
    return y / 2 + 1e-3;
  }
  std::shared_ptr<torch::nn::Module> clone(
      const torch::optional<torch::Device>& = torch::nullopt) const override {
    return std::make_shared<InexactInverseImpl>();
  }
};
TORCH_MODULE(InexactInverse);

/// A member without clone().
struct NotCloneableImpl : torchrev::InvertibleModule {
  torch::Tensor forward(const torch::Tensor& x) override {
    return x * 2;
  }
  torch::Tensor inverse(const torch::Tensor& y) override {
    return y / 2;
  }
};
TORCH_MODULE(NotCloneable);

std::string failure_of(const CheckReport& report) {
  const auto* failure = report.first_failure();
  return failure == nullptr
      ? std::string("(passed)")
      : failure->where + ": " + failure->what + ": " + failure->detail;
}

} // namespace

TEST(CheckBlock, ACorrectBlockPassesEveryCheck) {
  torch::manual_seed(80);
  auto report =
      check_block(LinearBlock(4, Mistake::kNone), torch::randn({5, 8}));
  EXPECT_TRUE(report.passed()) << report;
  // Forward, input gradient, 4 parameter gradients, repeated forward, random
  // numbers, reconstruction.
  EXPECT_EQ(report.results.size(), 9u) << report;
  EXPECT_EQ(report.results[3].what, "gradient of f.weight") << report;
  for (const auto& r : report.results) {
    EXPECT_EQ(r.where, "member 0 ((anonymous namespace)::LinearBlockImpl)");
  }
}

TEST(CheckBlock, CatchesAnFThatWritesIntoItsInput) {
  torch::manual_seed(81);
  auto report =
      check_block(LinearBlock(4, Mistake::kInPlaceInput), torch::randn({5, 8}));
  ASSERT_FALSE(report.passed()) << report;
  const auto failure = failure_of(report);
  EXPECT_NE(failure.find("member 0 ("), std::string::npos) << failure;
  EXPECT_NE(failure.find("modified its input in place"), std::string::npos)
      << failure;
}

TEST(CheckBlock, CatchesAGeneratorOfItsOwn) {
  torch::manual_seed(82);
  auto report =
      check_block(LinearBlock(4, Mistake::kOwnGenerator), torch::randn({5, 8}));
  ASSERT_FALSE(report.passed()) << report;
  const auto failure = failure_of(report);
  EXPECT_NE(failure.find("repeated forward"), std::string::npos) << failure;
  EXPECT_NE(failure.find("generator of its own"), std::string::npos) << failure;
  // The gradients themselves are wrong too, not only the repeat.
  bool gradient_failed = false;
  for (const auto& r : report.results) {
    gradient_failed |= !r.passed && r.what.rfind("gradient of f.", 0) == 0;
  }
  EXPECT_TRUE(gradient_failed) << report;
}

TEST(CheckBlock, CatchesAnFThatDependsOnStateItChanges) {
  torch::manual_seed(83);
  auto report =
      check_block(LinearBlock(4, Mistake::kChangedState), torch::randn({5, 8}));
  ASSERT_FALSE(report.passed()) << report;
  const auto failure = failure_of(report);
  EXPECT_NE(failure.find("repeated forward"), std::string::npos) << failure;
  EXPECT_NE(failure.find("state that its forward changes"), std::string::npos)
      << failure;
  bool input_gradient_failed = false, reconstruction_failed = false;
  for (const auto& r : report.results) {
    input_gradient_failed |= !r.passed && r.what == "input gradient";
    reconstruction_failed |=
        !r.passed && r.what.rfind("reconstruction", 0) == 0;
  }
  EXPECT_TRUE(input_gradient_failed) << report;
  EXPECT_TRUE(reconstruction_failed) << report;
}

TEST(CheckStage, NamesTheFirstMemberThatFails) {
  torch::manual_seed(84);
  torchrev::RevSequential stage(
      LinearBlock(4, Mistake::kNone),
      InexactInverse(),
      LinearBlock(4, Mistake::kNone));
  auto report = check_stage(stage, torch::randn({5, 8}));
  ASSERT_FALSE(report.passed()) << report;
  const auto* failure = report.first_failure();
  EXPECT_EQ(
      failure->where, "member 1 ((anonymous namespace)::InexactInverseImpl)")
      << report;
  EXPECT_EQ(failure->what, "reconstruction inverse(forward(x)) (eval mode)");
  EXPECT_GT(failure->error, 1e-4);
  // The whole stage is checked too, after its members.
  EXPECT_EQ(report.results.back().where, "stage");
}

TEST(CheckStage, LeavesTheStageAndTheCallersRandomNumbersAlone) {
  torch::manual_seed(85);
  torchrev::RevSequential stage(
      LinearBlock(4, Mistake::kNone), LinearBlock(4, Mistake::kNone));
  const auto before = stage->parameters()[0].clone();
  auto x = torch::randn({5, 8});
  torch::manual_seed(86);
  const auto expected = torch::rand({3});
  torch::manual_seed(86);
  EXPECT_TRUE(check_stage(stage, x).passed());
  EXPECT_TRUE(torch::rand({3}).equal(expected));
  EXPECT_TRUE(stage->parameters()[0].equal(before));
  EXPECT_EQ(stage->parameters()[0].scalar_type(), torch::kFloat32);
  EXPECT_FALSE(stage->parameters()[0].grad().defined());
}

TEST(CheckStage, BadInputIsNamed) {
  using torchrev::testing::error_of;
  torchrev::RevSequential stage{NotCloneable()};
  auto message = error_of([&] { check_stage(stage, torch::randn({2, 4})); });
  EXPECT_NE(message.find("implement clone() for your block"), std::string::npos)
      << message;
  message = error_of([&] {
    check_stage(stage, torch::ones({2, 4}, torch::kLong));
  });
  EXPECT_NE(
      message.find("expected a defined floating-point example input, got Long"),
      std::string::npos)
      << message;
}

namespace {

/// Every reversible stage of a zoo model, with the input it gets from a
/// batch of `images`.
std::vector<std::pair<torchrev::RevSequential, torch::Tensor>> zoo_stages(
    const std::shared_ptr<torchrev::models::ImageClassifier>& model,
    const torch::Tensor& images) {
  using namespace torchrev::models;
  torch::NoGradGuard no_grad;
  std::vector<std::pair<torchrev::RevSequential, torch::Tensor>> stages;
  if (auto net = std::dynamic_pointer_cast<RevNetImpl>(model)) {
    auto x = net->stem(images);
    for (size_t s = 0; s < net->stages->size(); ++s) {
      auto stage = torchrev::RevSequential(
          net->stages->ptr<torchrev::RevSequentialImpl>(s));
      if (auto transition = net->transition(s)) {
        x = transition->forward(x);
      }
      if (!stage->is_empty()) {
        stages.emplace_back(stage, x);
        x = stage(x);
      }
    }
  } else if (auto inv = std::dynamic_pointer_cast<RevNetInvImpl>(model)) {
    stages.emplace_back(inv->trunk, inv->stem(images));
  } else if (auto vit = std::dynamic_pointer_cast<RevViTImpl>(model)) {
    auto tokens = vit->embedding(images);
    stages.emplace_back(vit->blocks, torch::cat({tokens, tokens}, -1));
  }
  return stages;
}

} // namespace

TEST(CheckStage, EveryReversibleStageOfTheZooPasses) {
  for (const auto& name : torchrev::models::model_names()) {
    if (!torchrev::models::is_reversible(name) || name == "revnet110" ||
        name == "revnet110_inv") {
      continue; // revnet110's blocks are revnet38's, more of them
    }
    SCOPED_TRACE(name);
    torch::manual_seed(87);
    auto model = torchrev::models::create(
        name, torchrev::models::ZooOptions().image_size(16).depth(2));
    const auto stages = zoo_stages(model, torch::randn({4, 3, 16, 16}));
    ASSERT_FALSE(stages.empty());
    for (const auto& [stage, input] : stages) {
      auto report = check_stage(stage, input);
      EXPECT_TRUE(report.passed()) << report;
    }
  }
}

TEST(CheckStage, ATransformerBlockWithDropoutPasses) {
  torch::manual_seed(88);
  auto block = torchrev::models::rev_transformer_block(
      torchrev::models::TransformerBlockOptions(8, 2)
          .dropout(0.2)
          .attention_dropout(0.2));
  auto report = check_block(block, torch::randn({3, 5, 16}));
  EXPECT_TRUE(report.passed()) << report;
  bool random = false;
  for (const auto& r : report.results) {
    random |= r.what == "random numbers" &&
        r.detail.find("draws random numbers;") != std::string::npos;
  }
  EXPECT_TRUE(random) << report;
}
