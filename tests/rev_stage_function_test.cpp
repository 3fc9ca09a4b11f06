// The autograd Function behind RevSequential, checked against plain autograd
// on the same modules in float64.

#include "test_util.h"

using namespace torchrev::testing;

namespace {

constexpr double kTol = 1e-9; // float64 relative error

void expect_steps_match(const Step& rev, const Step& plain, double tol) {
  EXPECT_CLOSE(rev.y, plain.y, tol);
  EXPECT_CLOSE(rev.grad_x, plain.grad_x, tol);
  ASSERT_EQ(rev.param_grads.size(), plain.param_grads.size());
  for (size_t i = 0; i < rev.param_grads.size(); ++i) {
    SCOPED_TRACE("parameter " + std::to_string(i));
    EXPECT_CLOSE(rev.param_grads[i], plain.param_grads[i], tol);
  }
}

/// Two accumulating backward passes of a squared loss through `stage` and
/// through a deep copy run with plain autograd, from the same `input`: the
/// input's and every parameter's `.grad` must match.
void expect_two_passes_match_plain_autograd(
    torchrev::RevSequential& stage,
    const torch::Tensor& input) {
  auto reference = copy_of(stage);
  auto x = input.clone().requires_grad_(true);
  auto ref_x = input.clone().requires_grad_(true);
  for (int pass = 0; pass < 2; ++pass) {
    stage(x).pow(2).sum().backward();
    run_stage(reference, ref_x, StageMode::kStored).pow(2).sum().backward();
  }
  EXPECT_CLOSE(x.grad(), ref_x.grad(), kTol);
  auto params = stage->parameters();
  auto ref_params = reference->parameters();
  ASSERT_EQ(params.size(), ref_params.size());
  for (size_t k = 0; k < params.size(); ++k) {
    SCOPED_TRACE("parameter " + std::to_string(k));
    EXPECT_CLOSE(params[k].grad(), ref_params[k].grad(), kTol);
  }
}

} // namespace

TEST(RevStageFunction, ForwardAndAllGradientsMatchPlainAutogradFloat64) {
  torch::manual_seed(0);
  auto stage = conv_stage(/*depth=*/4, /*half=*/3);
  stage->to(torch::kFloat64);
  auto reference = copy_of(stage);
  auto x = torch::randn({4, 6, 5, 5}, torch::kFloat64);
  auto rev = run_step(stage, x, StageMode::kReversible);
  auto plain = run_step(reference, x, StageMode::kStored);
  ASSERT_GT(rev.param_grads.size(), 0u);
  expect_steps_match(rev, plain, kTol);
}

TEST(RevStageFunction, GradientsMatchPlainAutogradFloat32) {
  torch::manual_seed(1);
  auto stage = mlp_stage(/*depth=*/6, /*half=*/8);
  auto reference = copy_of(stage);
  auto x = torch::randn({16, 16});
  auto rev = run_step(stage, x, StageMode::kReversible);
  auto plain = run_step(reference, x, StageMode::kStored);
  expect_steps_match(rev, plain, 1e-4);
}

TEST(
    RevStageFunction,
    AutogradGradWithRespectToParametersMatchesAndLeavesGradUntouched) {
  torch::manual_seed(2);
  auto stage = conv_stage(3, 2);
  stage->to(torch::kFloat64);
  auto reference = copy_of(stage);
  auto x = torch::randn({3, 4, 4, 4}, torch::kFloat64);

  auto params = stage->parameters();
  auto y = stage(x);
  auto grads = torch::autograd::grad({(y * y).sum()}, params);
  auto ref_params = reference->parameters();
  auto ref_y = run_stage(reference, x, StageMode::kStored);
  auto ref_grads = torch::autograd::grad({(ref_y * ref_y).sum()}, ref_params);

  ASSERT_EQ(grads.size(), ref_grads.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    SCOPED_TRACE("parameter " + std::to_string(i));
    EXPECT_CLOSE(grads[i], ref_grads[i], kTol);
    // No gradient may be accumulated as a side effect of the inner backward.
    EXPECT_FALSE(params[i].grad().defined());
  }
}

TEST(RevStageFunction, EachParameterHookFiresOncePerBackward) {
  torch::manual_seed(3);
  auto stage = conv_stage(4, 2);
  auto params = stage->parameters();
  std::vector<int> fired(params.size(), 0);
  for (size_t i = 0; i < params.size(); ++i) {
    params[i].register_hook([&fired, i](const torch::Tensor& grad) {
      ++fired[i];
      return grad;
    });
  }
  auto x = torch::randn({2, 4, 4, 4}, torch::requires_grad());
  stage(x).sum().backward();
  for (size_t i = 0; i < params.size(); ++i) {
    EXPECT_EQ(fired[i], 1) << "hook of parameter " << i;
  }
  stage(x).pow(2).sum().backward();
  for (size_t i = 0; i < params.size(); ++i) {
    EXPECT_EQ(fired[i], 2) << "hook of parameter " << i;
  }
}

TEST(
    RevStageFunction,
    AHookThatDoublesGradientsGivesTwicePlainAutogradsGradients) {
  // LibTorch 2.x runs a leaf's hooks when the leaf is an input of
  // autograd::grad; were the recompute's inner grad call to run them, each
  // gradient would be doubled twice.
  torch::manual_seed(13);
  auto stage = conv_stage(3, 2);
  stage->to(torch::kFloat64);
  auto reference = copy_of(stage);
  for (auto& p : stage->parameters()) {
    p.register_hook([](const torch::Tensor& grad) { return grad * 2; });
  }
  auto x = torch::randn({3, 4, 5, 5}, torch::kFloat64);
  auto rev = run_step(stage, x, StageMode::kReversible);
  auto plain = run_step(reference, x, StageMode::kStored);
  EXPECT_CLOSE(rev.grad_x, plain.grad_x, kTol);
  ASSERT_EQ(rev.param_grads.size(), plain.param_grads.size());
  for (size_t i = 0; i < rev.param_grads.size(); ++i) {
    SCOPED_TRACE("parameter " + std::to_string(i));
    EXPECT_CLOSE(rev.param_grads[i], 2 * plain.param_grads[i], kTol);
  }
}

TEST(RevStageFunction, GradientAccumulatorPostHooksFireOncePerBackward) {
  torch::manual_seed(14);
  auto stage = conv_stage(3, 2);
  auto counts = count_accumulator_runs(stage->parameters());
  auto x = torch::randn({2, 4, 4, 4}, torch::requires_grad());
  stage(x).pow(2).sum().backward();
  for (size_t i = 0; i < counts.runs.size(); ++i) {
    EXPECT_EQ(*counts.runs[i], 1) << "accumulator of parameter " << i;
  }
}

TEST(RevStageFunction, BatchNormRunningStatsAfterAStepEqualPlainAutograds) {
  torch::manual_seed(4);
  auto stage = conv_stage(3, 2);
  stage->to(torch::kFloat64);
  auto reference = copy_of(stage);
  auto x = torch::randn({4, 4, 5, 5}, torch::kFloat64);
  for (int step = 0; step < 2; ++step) {
    run_step(stage, x * (step + 1), StageMode::kReversible);
    run_step(reference, x * (step + 1), StageMode::kStored);
  }
  auto buffers = stage->named_buffers();
  auto ref_buffers = reference->named_buffers();
  ASSERT_EQ(buffers.size(), ref_buffers.size());
  ASSERT_GT(buffers.size(), 0u);
  for (const auto& item : buffers) {
    SCOPED_TRACE(item.key());
    const auto& ref = ref_buffers[item.key()];
    if (item.key().find("num_batches_tracked") != std::string::npos) {
      EXPECT_EQ(item.value().item<int64_t>(), 2);
      EXPECT_TRUE(item.value().equal(ref));
    } else {
      EXPECT_CLOSE(item.value(), ref, kTol);
    }
  }
}

TEST(RevStageFunction, DropoutGradientsMatchPlainAutogradUnderTheSameSeed) {
  auto stage = mlp_stage(4, 6, /*dropout=*/0.5);
  stage->to(torch::kFloat64);
  auto reference = copy_of(stage);
  auto x = torch::randn({8, 12}, torch::kFloat64);

  torch::manual_seed(5);
  auto rev = run_step(stage, x, StageMode::kReversible);
  auto after_rev = torch::rand({4}, torch::kFloat64);
  torch::manual_seed(5);
  auto plain = run_step(reference, x, StageMode::kStored);
  auto after_plain = torch::rand({4}, torch::kFloat64);

  expect_steps_match(rev, plain, kTol);
  // Dropout was active: without it the output differs.
  stage->eval();
  torch::NoGradGuard no_grad;
  EXPECT_GT(relative_error(stage(x), rev.y), 1e-3);
  // After backward the user's RNG stream is where plain autograd leaves it.
  EXPECT_TRUE(after_rev.equal(after_plain));
}

TEST(RevStageFunction, WithoutRngPreservationDropoutIsNotReplayed) {
  // The RNG replay is what makes the dropout test pass: without it the
  // gradients differ. This guards against the dropout test passing vacuously.
  auto stage = mlp_stage(4, 6, 0.5);
  stage->options.preserve_rng_state(false);
  stage->to(torch::kFloat64);
  auto reference = copy_of(stage);
  auto x = torch::randn({8, 12}, torch::kFloat64);
  torch::manual_seed(6);
  auto rev = run_step(stage, x, StageMode::kReversible);
  torch::manual_seed(6);
  auto plain = run_step(reference, x, StageMode::kStored);
  EXPECT_GT(relative_error(rev.grad_x, plain.grad_x), 1e-3);
}

TEST(RevStageFunction, ReluBeforeTheStageKeepsTheTensorItSaved) {
  torch::manual_seed(7);
  auto stage = conv_stage(3, 2);
  stage->to(torch::kFloat64);
  auto reference = copy_of(stage);
  auto input = torch::randn({2, 4, 4, 4}, torch::kFloat64);

  auto x = input.clone().requires_grad_(true);
  auto h = torch::relu(x); // ReLU saves h, which is the stage input.
  auto h_before = h.detach().clone();
  (stage(h).pow(2)).sum().backward();
  EXPECT_TRUE(h.detach().equal(h_before)); // never written to or freed

  auto ref_x = input.clone().requires_grad_(true);
  run_stage(reference, torch::relu(ref_x), StageMode::kStored)
      .pow(2)
      .sum()
      .backward();
  EXPECT_CLOSE(x.grad(), ref_x.grad(), kTol);
}

// The backward accumulates gradients into the memory of the gradients it is
// given when nothing else refers to it (LibTorch 2.x hands them over). A
// gradient the caller keeps must never be written to.
TEST(RevStageFunction, GradientsTheCallerKeepsAreNeverWrittenTo) {
  torch::manual_seed(9);
  for (int depth : {1, 3}) {
    SCOPED_TRACE("depth " + std::to_string(depth));
    auto stage = mlp_stage(depth, 4);
    stage->to(torch::kFloat64);
    auto input = torch::randn({3, 8}, torch::kFloat64);

    // Kept by a hook on the stage output.
    auto x = input.clone().requires_grad_(true);
    auto y = stage(x);
    torch::Tensor hooked;
    y.register_hook([&](const torch::Tensor& g) { hooked = g; });
    y.pow(2).sum().backward();
    EXPECT_CLOSE(hooked, 2 * y.detach(), kTol);

    // Kept by `retain_grad`.
    auto x1 = input.clone().requires_grad_(true);
    auto y1 = stage(x1);
    y1.retain_grad();
    y1.pow(2).sum().backward();
    EXPECT_CLOSE(y1.grad(), 2 * y1.detach(), kTol);

    // Given by the caller.
    auto x2 = input.clone().requires_grad_(true);
    auto given = torch::randn({3, 8}, torch::kFloat64);
    auto given_before = given.clone();
    stage(x2).backward(given);
    EXPECT_TRUE(given.equal(given_before));
  }
}

// Blocks whose F or G passes the gradient through unchanged (an identity)
// return the very tensor they were given as the input's gradient: the sum
// dy + d must not be formed in place in it.
TEST(RevStageFunction, IdentityHalvesMatchPlainAutograd) {
  auto linear = [] {
    return torch::nn::Sequential(torch::nn::Linear(3, 3), torch::nn::Tanh());
  };
  auto identity = [] { return torch::nn::Sequential(torch::nn::Identity()); };
  struct Case {
    const char* name;
    bool f_identity, g_identity;
  };
  for (const Case& c :
       {Case{"F identity", true, false},
        Case{"G identity", false, true},
        Case{"both identity", true, true}}) {
    for (int depth : {1, 3}) {
      for (bool expanded : {false, true}) { // y.sum(): an expanded gradient
        SCOPED_TRACE(
            std::string(c.name) + (expanded ? ", sum" : ", squares") +
            ", depth " + std::to_string(depth));
        torch::manual_seed(10);
        torchrev::RevSequential stage;
        for (int i = 0; i < depth; ++i) {
          stage->push_back(SeqBlock(
              c.f_identity ? identity() : linear(),
              c.g_identity ? identity() : linear()));
        }
        stage->to(torch::kFloat64);
        auto reference = copy_of(stage);
        auto input = torch::randn({2, 6}, torch::kFloat64);
        auto loss = [&](const torch::Tensor& y) {
          return expanded ? y.sum() : (y * y).sum();
        };
        auto x = input.clone().requires_grad_(true);
        loss(stage(x)).backward();
        auto ref_x = input.clone().requires_grad_(true);
        loss(run_stage(reference, ref_x, StageMode::kStored)).backward();
        EXPECT_CLOSE(x.grad(), ref_x.grad(), kTol);
        auto params = stage->parameters();
        auto ref_params = reference->parameters();
        ASSERT_EQ(params.size(), ref_params.size());
        for (size_t k = 0; k < params.size(); ++k) {
          EXPECT_CLOSE(params[k].grad(), ref_params[k].grad(), kTol);
        }
      }
    }
  }
}

namespace {

/// x + p, with a parameter of x's whole shape: autograd passes the output's
/// gradient through unchanged as both x's and p's gradient.
struct AddParameterImpl : torch::nn::Cloneable<AddParameterImpl> {
  explicit AddParameterImpl(std::vector<int64_t> shape_)
      : shape(std::move(shape_)) {
    reset();
  }
  void reset() override {
    p = register_parameter("p", torch::randn(shape));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    return x + p;
  }
  std::vector<int64_t> shape;
  torch::Tensor p;
};
TORCH_MODULE(AddParameter);

} // namespace

// A parameter gradient that is the very tensor the node was handed as dy must
// not change when dx is summed into dy, nor share memory with the input's
// gradient: two backward passes accumulate into both `.grad`s.
TEST(
    RevStageFunction,
    ParameterGradientsThatAreTheOutputGradientMatchPlainAutograd) {
  auto linear = [] {
    return torch::nn::Sequential(torch::nn::Linear(3, 3), torch::nn::Tanh());
  };
  auto add = [] {
    return torch::nn::Sequential(AddParameter(std::vector<int64_t>{1, 3}));
  };
  for (bool g_adds : {true, false}) {
    for (int depth : {1, 2, 3}) {
      SCOPED_TRACE(
          std::string(g_adds ? "G" : "F") + " adds a parameter, depth " +
          std::to_string(depth));
      torch::manual_seed(11);
      torchrev::RevSequential stage;
      for (int i = 0; i < depth; ++i) {
        stage->push_back(
            SeqBlock(g_adds ? linear() : add(), g_adds ? add() : linear()));
      }
      stage->to(torch::kFloat64);
      expect_two_passes_match_plain_autograd(
          stage, torch::randn({1, 6}, torch::kFloat64));
    }
  }
}

namespace {

/// Linear(n, n) that keeps a handle to every output it returns, with a copy
/// of its values: memory the module can still reach.
struct KeepOutputsImpl : torch::nn::Cloneable<KeepOutputsImpl> {
  explicit KeepOutputsImpl(int64_t n_) : n(n_) {
    reset();
  }
  void reset() override {
    linear = register_module("linear", torch::nn::Linear(n, n));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    auto out = linear(x);
    kept.push_back(out);
    copies.push_back(out.detach().clone());
    return out;
  }
  int64_t n;
  torch::nn::Linear linear{nullptr};
  std::vector<torch::Tensor> kept, copies;
};
TORCH_MODULE(KeepOutputs);

} // namespace

// The backward writes x2 = y2 - G(y1) into the memory of the recomputed
// G(y1) (and x1 likewise into F(x2)'s) only when nothing else refers to it.
// A last layer that saves its output for its own backward (Tanh, an in-place
// ReLU) or a module that keeps its output must see the values it computed.
TEST(
    RevStageFunction,
    ReconstructionIntoRecomputedOutputsMatchesPlainAutograd) {
  auto linear = [] { return torch::nn::Sequential(torch::nn::Linear(3, 3)); };
  auto tanh = [] {
    return torch::nn::Sequential(torch::nn::Linear(3, 3), torch::nn::Tanh());
  };
  auto relu_ = [] {
    return torch::nn::Sequential(
        torch::nn::Linear(3, 3),
        torch::nn::ReLU(torch::nn::ReLUOptions().inplace(true)));
  };
  auto keep = [] { return torch::nn::Sequential(KeepOutputs(3)); };
  struct Case {
    const char* name;
    std::function<torch::nn::Sequential()> make;
  };
  for (const Case& c :
       {Case{"written into", linear},
        Case{"Tanh saves its output", tanh},
        Case{"in-place ReLU saves its output", relu_},
        Case{"the module keeps its output", keep}}) {
    for (int depth : {1, 3}) {
      SCOPED_TRACE(std::string(c.name) + ", depth " + std::to_string(depth));
      torch::manual_seed(12);
      torchrev::RevSequential stage;
      for (int i = 0; i < depth; ++i) {
        stage->push_back(SeqBlock(c.make(), c.make()));
      }
      stage->to(torch::kFloat64);
      expect_two_passes_match_plain_autograd(
          stage, torch::randn({4, 6}, torch::kFloat64));
      for (const auto& module : stage->modules()) {
        if (auto* keeper = module->as<KeepOutputsImpl>()) {
          ASSERT_FALSE(keeper->kept.empty());
          for (size_t k = 0; k < keeper->kept.size(); ++k) {
            EXPECT_TRUE(keeper->kept[k].detach().equal(keeper->copies[k]))
                << "output " << k << " was written to";
          }
        }
      }
    }
  }
}

TEST(RevStageFunction, BackwardTwiceWithoutRetainGraphIsAnError) {
  auto stage = mlp_stage(2, 4);
  auto x = torch::randn({3, 8}, torch::requires_grad());
  auto loss = stage(x).sum();
  loss.backward();
  EXPECT_THROW(loss.backward(), c10::Error);
}

TEST(
    RevStageFunction,
    BackwardTwiceWithRetainGraphAccumulatesTwiceTheGradient) {
  torch::manual_seed(8);
  auto stage = mlp_stage(3, 4);
  stage->to(torch::kFloat64);
  auto x =
      torch::randn({3, 8}, torch::dtype(torch::kFloat64).requires_grad(true));
  auto loss = stage(x).pow(2).sum();
  loss.backward({}, /*retain_graph=*/true);
  auto once = x.grad().clone();
  auto param_once = stage->parameters()[0].grad().clone();
  loss.backward();
  EXPECT_CLOSE(x.grad(), 2 * once, kTol);
  EXPECT_CLOSE(stage->parameters()[0].grad(), 2 * param_once, kTol);
}

TEST(RevStageFunction, DoubleBackwardIsAClearError) {
  auto stage = mlp_stage(2, 4);
  auto x = torch::randn({3, 8}, torch::requires_grad());
  auto y = stage(x).pow(2).sum();
  EXPECT_ERROR_CONTAINS(
      torch::autograd::grad(
          {y}, {x}, {}, /*retain_graph=*/true, /*create_graph=*/true),
      "double backward");
}

TEST(RevStageFunction, InPlaceChangeOfTheOutputIsDetected) {
  auto stage = mlp_stage(2, 4);
  auto x = torch::randn({3, 8}, torch::requires_grad());
  auto y = stage(x);
  auto loss = y.sum();
  y.mul_(2); // backward would reconstruct inputs from the modified output
  EXPECT_ERROR_CONTAINS(
      loss.backward(),
      "modified by an inplace operation",
      "block 1",
      "the stage output",
      "is at version 1; expected version 0");
}

// The stage keeps its output for the backward and releases it there: an
// output the caller still holds is neither freed nor written to, and a
// backward that retains the graph keeps it for the next one.
TEST(RevStageFunction, AStageOutputTheCallerHoldsIsUnchangedByTheBackward) {
  torch::manual_seed(13);
  auto stage = conv_stage(2, 2);
  stage->to(torch::kFloat64);
  auto reference = copy_of(stage);
  auto input = torch::randn({2, 4, 5, 5}, torch::kFloat64);
  auto x = input.clone().requires_grad_(true);
  auto y = stage(x);
  const auto y_before = y.detach().clone();
  auto loss = y.pow(2).sum();
  loss.backward({}, /*retain_graph=*/true);
  EXPECT_TRUE(y.detach().equal(y_before));
  loss.backward();
  EXPECT_TRUE(y.detach().equal(y_before));
  EXPECT_ERROR_CONTAINS(
      loss.backward(), "backward through the graph a second time");

  auto ref_x = input.clone().requires_grad_(true);
  run_stage(reference, ref_x, StageMode::kStored).pow(2).sum().backward();
  EXPECT_CLOSE(x.grad(), 2 * ref_x.grad(), kTol);
}

TEST(RevStageFunction, OnlyParametersTrainWhenTheInputNeedsNoGrad) {
  torch::manual_seed(9);
  auto stage = conv_stage(2, 2);
  stage->to(torch::kFloat64);
  auto reference = copy_of(stage);
  auto x = torch::randn({2, 4, 4, 4}, torch::kFloat64); // no requires_grad
  auto y = stage(x);
  ASSERT_TRUE(y.requires_grad());
  y.pow(2).sum().backward();
  run_stage(reference, x, StageMode::kStored).pow(2).sum().backward();
  auto params = stage->parameters();
  auto ref_params = reference->parameters();
  for (size_t i = 0; i < params.size(); ++i) {
    EXPECT_CLOSE(params[i].grad(), ref_params[i].grad(), kTol);
  }
}

TEST(RevStageFunction, FrozenParametersGetNoGradient) {
  torch::manual_seed(10);
  auto stage = mlp_stage(2, 4);
  stage->to(torch::kFloat64);
  auto reference = copy_of(stage);
  auto frozen = stage->parameters()[0];
  frozen.requires_grad_(false);
  reference->parameters()[0].requires_grad_(false);
  auto x = torch::randn({3, 8}, torch::kFloat64);
  auto rev = run_step(stage, x, StageMode::kReversible);
  auto plain = run_step(reference, x, StageMode::kStored);
  EXPECT_FALSE(frozen.grad().defined());
  for (size_t i = 1; i < rev.param_grads.size(); ++i) {
    EXPECT_CLOSE(rev.param_grads[i], plain.param_grads[i], kTol);
  }
}

TEST(RevStageFunction, GradientsMatchPlainAutograd_CUDA) {
  if (!torch::cuda::is_available()) {
    GTEST_SKIP() << "no CUDA device";
  }
  torch::manual_seed(11);
  auto stage = conv_stage(4, 3, /*batch_norm=*/true, /*dropout=*/0.2);
  stage->to(torch::Device(torch::kCUDA), torch::kFloat64);
  auto reference = copy_of(stage);
  auto x = torch::randn(
      {4, 6, 5, 5}, torch::dtype(torch::kFloat64).device(torch::kCUDA));
  torch::manual_seed(12);
  auto rev = run_step(stage, x, StageMode::kReversible);
  torch::manual_seed(12);
  auto plain = run_step(reference, x, StageMode::kStored);
  expect_steps_match(rev, plain, kTol);
}

TEST(RevStageFunction, TwoGraphsAliveAtOnceBothMatchPlainAutograd) {
  torch::manual_seed(15);
  auto stage = conv_stage(3, 2);
  stage->to(torch::kFloat64);
  auto reference = copy_of(stage);
  auto a = torch::randn({2, 4, 5, 5}, torch::kFloat64);
  auto b = torch::randn({2, 4, 5, 5}, torch::kFloat64);

  auto xa = a.clone().requires_grad_(true);
  auto xb = b.clone().requires_grad_(true);
  auto loss_a = stage(xa).pow(2).sum();
  auto loss_b = stage(xb).pow(3).sum(); // second forward before any backward
  loss_b.backward();
  loss_a.backward();

  auto ref_a = a.clone().requires_grad_(true);
  auto ref_b = b.clone().requires_grad_(true);
  run_stage(reference, ref_a, StageMode::kStored).pow(2).sum().backward();
  run_stage(reference, ref_b, StageMode::kStored).pow(3).sum().backward();

  EXPECT_CLOSE(xa.grad(), ref_a.grad(), kTol);
  EXPECT_CLOSE(xb.grad(), ref_b.grad(), kTol);
  auto params = stage->parameters();
  auto ref_params = reference->parameters();
  for (size_t i = 0; i < params.size(); ++i) {
    SCOPED_TRACE("parameter " + std::to_string(i));
    EXPECT_CLOSE(params[i].grad(), ref_params[i].grad(), kTol);
  }
}

TEST(
    RevStageFunction,
    ABackwardThroughPartOfTheStageIsCorrectAndLeavesItUsable) {
  // autograd::grad with respect to a middle block's parameters runs only the
  // nodes of the blocks after it; a full backward afterwards is still right.
  torch::manual_seed(16);
  auto stage = conv_stage(4, 2);
  stage->to(torch::kFloat64);
  auto reference = copy_of(stage);
  auto input = torch::randn({2, 4, 5, 5}, torch::kFloat64);

  auto middle = stage->ptr(2)->parameters();
  auto ref_middle = reference->ptr(2)->parameters();
  auto x = input.clone().requires_grad_(true);
  auto loss = stage(x).pow(2).sum();
  auto grads = torch::autograd::grad({loss}, middle, {}, /*retain_graph=*/true);
  auto ref_x = input.clone().requires_grad_(true);
  auto ref_loss = run_stage(reference, ref_x, StageMode::kStored).pow(2).sum();
  auto ref_grads =
      torch::autograd::grad({ref_loss}, ref_middle, {}, /*retain_graph=*/true);
  ASSERT_EQ(grads.size(), ref_grads.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    EXPECT_CLOSE(grads[i], ref_grads[i], kTol);
  }

  loss.backward();
  ref_loss.backward();
  EXPECT_CLOSE(x.grad(), ref_x.grad(), kTol);
  auto params = stage->parameters();
  auto ref_params = reference->parameters();
  for (size_t i = 0; i < params.size(); ++i) {
    SCOPED_TRACE("parameter " + std::to_string(i));
    EXPECT_CLOSE(params[i].grad(), ref_params[i].grad(), kTol);
  }
}

TEST(RevStageFunction, ParameterHooksFireBlockByBlockDuringTheBackward) {
  // Each block's gradients are returned by that block's own node, so the
  // last block's hooks fire before any earlier block is recomputed: a
  // data-parallel reducer can all-reduce them while backward goes on.
  constexpr int kDepth = 4;
  int recomputed = 0; // F evaluations during backward so far
  torchrev::RevSequential stage;
  for (int b = 0; b < kDepth; ++b) {
    torch::nn::Sequential f(
        torch::nn::Functional([&recomputed](torch::Tensor x) {
          recomputed += torchrev::is_recomputing() ? 1 : 0;
          return x;
        }),
        torch::nn::Linear(3, 3),
        torch::nn::Tanh());
    torch::nn::Sequential g(torch::nn::Linear(3, 3), torch::nn::Tanh());
    stage->push_back(SeqBlock(f, g));
  }
  std::vector<int> seen_at(kDepth, -1);
  for (int b = 0; b < kDepth; ++b) {
    stage->ptr(b)->parameters()[0].register_hook(
        [&seen_at, &recomputed, b](const torch::Tensor& g) {
          seen_at[b] = recomputed;
          return g;
        });
  }
  stage(torch::randn({2, 6}, torch::requires_grad())).sum().backward();
  EXPECT_EQ(recomputed, kDepth);
  for (int b = 0; b < kDepth; ++b) {
    // Block b's hook fired once blocks kDepth-1 ... b had been recomputed.
    EXPECT_EQ(seen_at[b], kDepth - b) << "block " << b;
  }
}

TEST(RevStageFunction, WithAnchorsGradientsStillMatchPlainAutograd) {
  for (int64_t every : {1, 2, 3}) {
    SCOPED_TRACE("anchor_every " + std::to_string(every));
    torch::manual_seed(17);
    auto stage = conv_stage(5, 2, /*batch_norm=*/true, /*dropout=*/0.2);
    stage->options.anchor_every(every);
    stage->to(torch::kFloat64);
    auto reference = copy_of(stage);
    auto x = torch::randn({3, 4, 5, 5}, torch::kFloat64);
    torch::manual_seed(18);
    auto rev = run_step(stage, x, StageMode::kReversible);
    torch::manual_seed(18);
    auto plain = run_step(reference, x, StageMode::kStored);
    expect_steps_match(rev, plain, kTol);
  }
}

TEST(RevStageFunction, AnchorsBoundTheDriftOfADeepFloat32Stage) {
  // Blocks that amplify rounding errors (conv weights x3): without anchors
  // the reconstruction error compounds over all 64 blocks.
  torch::manual_seed(19);
  auto stage = conv_stage(64, 4);
  {
    torch::NoGradGuard no_grad;
    for (auto& item : stage->named_parameters()) {
      if (item.key().find("weight") != std::string::npos &&
          item.value().dim() == 4) {
        item.value().mul_(3);
      }
    }
  }
  stage->eval(); // BatchNorm with running statistics
  auto reference = copy_of(stage);
  reference->to(torch::kFloat64);
  auto x = torch::randn({2, 8, 6, 6});
  auto exact = run_step(reference, x.to(torch::kFloat64), StageMode::kStored);
  auto error_with = [&](int64_t every) {
    stage->options.anchor_every(every);
    auto rev = run_step(stage, x, StageMode::kReversible);
    return relative_error(rev.grad_x.to(torch::kFloat64), exact.grad_x);
  };
  const double none = error_with(0);
  const double every8 = error_with(8);
  std::cout << "[ drift    ] grad x relative error, 64 blocks: no anchors "
            << none << ", anchor_every 8: " << every8 << std::endl;
  EXPECT_LT(every8, none / 10);
}

TEST(RevStageFunction, NegativeAnchorEveryIsAnError) {
  auto stage = mlp_stage(2, 2);
  stage->options.anchor_every(-1);
  EXPECT_ERROR_CONTAINS(
      stage(torch::randn({2, 4}, torch::requires_grad())),
      "anchor_every must be 0",
      "-1");
}
