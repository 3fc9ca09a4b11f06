// What a stage's backward refuses to do silently: each case below gave wrong
// gradients, or an error without torchrev context, before it was checked.

#include "test_util.h"

#include <atomic>
#include <mutex>
#include <thread>

using namespace torchrev::testing;

namespace {

/// F multiplies by a tensor computed outside the block (FiLM-style
/// conditioning); G is a plain linear map.
struct ConditionedBlockImpl : torchrev::RevBlockBase {
  explicit ConditionedBlockImpl(int64_t half)
      : f(register_module("f", torch::nn::Linear(half, half))),
        g(register_module("g", torch::nn::Linear(half, half))) {}
  torch::Tensor forward_f(const torch::Tensor& x2) override {
    auto out = torch::tanh(f(x2));
    return gamma.defined() ? out * gamma : out;
  }
  torch::Tensor forward_g(const torch::Tensor& y1) override {
    return torch::tanh(g(y1));
  }
  torch::nn::Linear f, g;
  torch::Tensor gamma; // set by the caller, not registered
};
TORCH_MODULE(ConditionedBlock);

/// A block whose F works in place on its input.
struct InPlaceBlockImpl : torchrev::RevBlockBase {
  InPlaceBlockImpl() : g(register_module("g", torch::nn::Linear(2, 2))) {}
  torch::Tensor forward_f(const torch::Tensor& x2) override {
    return torch::relu_(const_cast<torch::Tensor&>(x2));
  }
  torch::Tensor forward_g(const torch::Tensor& y1) override {
    return g(y1);
  }
  torch::nn::Linear g;
};
TORCH_MODULE(InPlaceBlock);

/// A block whose F returns another dtype.
struct CastingBlockImpl : torchrev::RevBlockBase {
  torch::Tensor forward_f(const torch::Tensor& x2) override {
    return x2.to(torch::kFloat64);
  }
  torch::Tensor forward_g(const torch::Tensor& y1) override {
    return y1;
  }
};
TORCH_MODULE(CastingBlock);

} // namespace

TEST(RevStageChecks, ATensorFromOutsideTheBlockThatNeedsGradIsAnError) {
  // Plain autograd trains the conditioning network; a stage that dropped its
  // gradient would train it silently wrong.
  torch::manual_seed(70);
  torch::nn::Linear conditioning(3, 2);
  ConditionedBlock block(2);
  torchrev::RevSequential stage(block);
  auto c = torch::randn({4, 3});
  block->gamma = torch::sigmoid(conditioning(c));
  auto x = torch::randn({4, 4}, torch::requires_grad());
  EXPECT_ERROR_CONTAINS(
      stage(x).sum().backward(),
      "block 0",
      "F uses a tensor that requires grad",
      "neither its input nor a parameter");
  // With the conditioning detached there is nothing to lose.
  block->gamma = block->gamma.detach();
  stage(x).sum().backward();
  EXPECT_TRUE(x.grad().defined());
}

TEST(RevStageChecks, AWeightTiedToAModuleOutsideTheBlockIsAnError) {
  torch::nn::Linear outside(2, 2); // registered elsewhere, e.g. the parent
  ConditionedBlock block(2);
  torchrev::RevSequential stage(block);
  block->gamma = outside->bias; // the leaf itself, broadcast over the batch
  EXPECT_ERROR_CONTAINS(
      stage(torch::randn({3, 4}, torch::requires_grad())).sum().backward(),
      "block 0",
      "F uses a tensor that requires grad");
}

TEST(RevStageChecks, CheckpointOfAFunctionUsingAnOutsideTensorIsAnError) {
  torch::nn::Linear inside(3, 3);
  auto outside = torch::randn({3}, torch::requires_grad());
  auto x = torch::randn({2, 3}, torch::requires_grad());
  auto y = torchrev::checkpoint(
      {inside.ptr()},
      [&](const torch::Tensor& in) { return inside(in) * outside; },
      x);
  EXPECT_ERROR_CONTAINS(
      y.sum().backward(),
      "torchrev::checkpoint",
      "uses a tensor that requires grad");
}

TEST(RevStageChecks, ANestedCheckpointUsingAnEnclosingModulesWeightIsAnError) {
  // Inside the outer recompute, w's weight leads to the outer checkpoint's
  // sink; the inner checkpoint differentiates only for `a`, so w's share
  // of the gradient would be lost if any sink were accepted.
  torch::nn::Linear a(3, 3), w(3, 3);
  auto x = torch::randn({2, 3}, torch::requires_grad());
  auto y = torchrev::checkpoint(
      {a.ptr(), w.ptr()},
      [&](const torch::Tensor& in) {
        return torchrev::checkpoint(
            {a.ptr()}, [&](const torch::Tensor& h) { return a(h) + w(h); }, in);
      },
      x);
  EXPECT_ERROR_CONTAINS(
      y.sum().backward(),
      "torchrev::checkpoint",
      "uses a tensor that requires grad");
}

TEST(RevStageChecks, AnOptimizerStepBetweenForwardAndBackwardIsAnError) {
  torch::manual_seed(71);
  auto stage = mlp_stage(3, 2);
  auto x = torch::randn({4, 4}, torch::requires_grad());
  stage(x).sum().backward(); // gives every parameter a gradient
  auto loss = stage(x).pow(2).sum();
  {
    // An SGD step in place, as torch.optim does (LibTorch 1.13's C++ SGD
    // writes through .data(), which plain autograd cannot see either).
    torch::NoGradGuard no_grad;
    for (auto& p : stage->parameters()) {
      p.add_(p.grad(), -0.1);
    }
  }
  EXPECT_ERROR_CONTAINS(
      loss.backward(),
      "block 2",
      "modified by an inplace operation",
      "parameter 'f.0.weight'",
      "expected version");
}

TEST(
    RevStageChecks,
    AParameterChangedInPlaceBeforeACheckpointBackwardIsAnError) {
  torch::nn::Linear net(3, 3);
  auto loss = torchrev::checkpoint(net, torch::randn({2, 3})).sum();
  {
    torch::NoGradGuard no_grad;
    net->weight.mul_(2);
  }
  EXPECT_ERROR_CONTAINS(
      loss.backward(),
      "torchrev::checkpoint",
      "modified by an inplace operation",
      "'weight'");
}

TEST(RevStageChecks, FreezingOneParameterAndUnfreezingAnotherIsAnError) {
  auto stage = mlp_stage(1, 2);
  auto params = stage->parameters();
  params[1].requires_grad_(false);
  auto loss = stage(torch::randn({2, 4}, torch::requires_grad())).sum();
  params[1].requires_grad_(true); // same count as in forward, another set
  params[0].requires_grad_(false);
  EXPECT_ERROR_CONTAINS(
      loss.backward(),
      "block 0",
      "parameters requiring grad changed between forward and backward");
}

TEST(RevStageChecks, ASubmoduleSwitchedToEvalBeforeBackwardIsAnError) {
  auto stage = conv_stage(2, 2);
  auto loss = stage(torch::randn({2, 4, 4, 4}, torch::requires_grad())).sum();
  // Only a BatchNorm inside block 1's F, not the block itself.
  stage->ptr(1)->modules()[2]->eval();
  EXPECT_ERROR_CONTAINS(
      loss.backward(),
      "block 1",
      "was in training mode in forward but is in eval mode in backward");
}

TEST(RevStageChecks, FReturningAnotherDtypeIsAnErrorNamingTheBlock) {
  torchrev::RevSequential stage(CastingBlock{});
  EXPECT_ERROR_CONTAINS(
      stage(torch::randn({2, 4}, torch::requires_grad())),
      "block 0",
      "F must return a tensor of its input's dtype and device",
      "Float",
      "Double");
}

TEST(RevStageChecks, AnInPlaceFNeverWritesToTheCallersTensorAndFailsClearly) {
  // A batch of one: both halves are already dense, and were once views.
  // The forward runs without grad, where nothing else would notice that
  // F's in-place op changed x2, the term G's output is added to.
  torchrev::RevSequential stage(InPlaceBlock{});
  auto x = torch::randn({1, 4}).requires_grad_(true);
  auto before = x.detach().clone();
  EXPECT_ERROR_CONTAINS(
      stage(x),
      "torchrev::RevSequential block 0",
      "F modified its input in place",
      "inplace(true)");
  EXPECT_TRUE(x.detach().equal(before));
  // The same on a block called on its own, with plain autograd (there the
  // halves are not leaves, so autograd itself would accept it).
  InPlaceBlock block;
  EXPECT_ERROR_CONTAINS(
      block(torch::randn({3, 4}, torch::requires_grad())),
      "F modified its input in place");
  // An out-of-place F on the same shapes runs (the control).
  torchrev::RevSequential plain(SeqBlock(
      torch::nn::Sequential(torch::nn::ReLU()),
      torch::nn::Sequential(torch::nn::Linear(2, 2))));
  plain(x).sum().backward();
  EXPECT_TRUE(x.grad().defined());
}

TEST(ActivationAudit, NamesTheBlocksThatStoreActivations) {
  auto make_block = [] {
    return SeqBlock(
        torch::nn::Sequential(torch::nn::Linear(2, 2)),
        torch::nn::Sequential(torch::nn::Linear(2, 2)));
  };
  torch::nn::Sequential model(
      torchrev::RevSequential(make_block(), make_block()),
      make_block(), // outside a RevSequential: plain autograd
      torch::nn::Linear(4, 4));
  auto x = torch::randn({3, 4}, torch::requires_grad());
  {
    torchrev::ActivationAudit audit;
    model->forward(x).sum().backward();
    model->forward(x);
    ASSERT_EQ(audit.entries().size(), 2u);
    EXPECT_FALSE(audit.entries()[0].stores_activations);
    EXPECT_EQ(audit.entries()[0].kind, "torchrev::RevSequential, 2 blocks");
    EXPECT_EQ(audit.entries()[0].calls, 2);
    ASSERT_EQ(audit.storing().size(), 1u);
    EXPECT_EQ(audit.storing()[0].module, model[1].get());
    const auto report = audit.report(*model);
    EXPECT_NE(report.find("1 of 2 recorded parts store"), std::string::npos)
        << report;
    EXPECT_NE(report.find("  1 (torchrev::RevBlock"), std::string::npos)
        << report;
    EXPECT_NE(report.find("STORES ACTIVATIONS"), std::string::npos) << report;
  }
  {
    // Without grad nothing is stored, and no audit means nothing recorded.
    torchrev::ActivationAudit audit;
    torch::NoGradGuard no_grad;
    model->forward(x);
    EXPECT_TRUE(audit.storing().empty());
    EXPECT_EQ(audit.entries().size(), 2u);
  }
}

TEST(RevStageChecks, SplitDimOutOfRangeNamesTheBlock) {
  torchrev::RevSequential stage(SeqBlock(
      torch::nn::Sequential(torch::nn::Identity()),
      torch::nn::Sequential(torch::nn::Identity()),
      torchrev::RevBlockOptions().split_dim(3)));
  EXPECT_ERROR_CONTAINS(
      stage(torch::randn({2, 4}, torch::requires_grad())),
      "block 0",
      "split_dim 3 is out of range");
}

TEST(RevStageChecks, AnErrorInsideFNamesTheBlockAndTheHalf) {
  // F built for the full width: BatchNorm sees half the channels.
  torchrev::RevSequential stage(SeqBlock(
      torch::nn::Sequential(torch::nn::BatchNorm1d(4)),
      torch::nn::Sequential(torch::nn::Identity())));
  EXPECT_ERROR_CONTAINS(
      stage(torch::randn({3, 4}, torch::requires_grad())),
      "in F of torchrev::RevSequential block 0",
      "half of shape [3, 2]");
}

TEST(CPUMemoryMeter, AFailedAllocationDoesNotRaiseThePeak) {
  auto& meter = torchrev::CPUMemoryMeter::instance();
  meter.reset_peak();
  const size_t peak = meter.peak_bytes();
  // 4 PiB: the system allocator refuses it.
  EXPECT_THROW(torch::empty({int64_t(1) << 50}, torch::kFloat32), c10::Error);
  EXPECT_EQ(meter.peak_bytes(), peak);
}

TEST(RevStageChecks, TwoThreadsTrainingOneStageLoseNoBatchNormStatistics) {
  // Each thread runs forward + backward on the same stage. A forward that
  // overlaps another thread's recompute would find the BatchNorm statistics
  // detached; torchrev refuses it with a clear error instead, and the
  // statistics survive every run.
  constexpr int kSteps = 30;
  auto stage = conv_stage(4, 2);
  std::atomic<int> refused{0};
  std::atomic<int> trained{0};
  std::vector<std::string> other_errors;
  std::mutex errors_mutex;
  auto work = [&](int seed) {
    auto x = torch::randn({4, 4, 8, 8}, torch::requires_grad());
    for (int step = 0; step < kSteps; ++step) {
      try {
        stage(x * (seed + 1)).pow(2).sum().backward();
        ++trained;
      } catch (const c10::Error& e) {
        const std::string message = e.what_without_backtrace();
        if (message.find("another thread") != std::string::npos) {
          ++refused;
        } else {
          std::lock_guard<std::mutex> lock(errors_mutex);
          other_errors.push_back(message);
        }
      }
    }
  };
  std::thread a(work, 0), b(work, 1);
  a.join();
  b.join();
  EXPECT_TRUE(other_errors.empty())
      << other_errors.size() << " unexpected errors, first: "
      << (other_errors.empty() ? "" : other_errors.front());
  EXPECT_EQ(refused + trained, 2 * kSteps);
  EXPECT_GT(trained, 0);
  std::cout << "[ threads  ] " << trained << " steps trained, " << refused
            << " refused" << std::endl;
  for (const auto& item : stage->named_buffers()) {
    SCOPED_TRACE(item.key());
    ASSERT_TRUE(item.value().defined());
  }
  // Still usable for evaluation.
  stage->eval();
  torch::NoGradGuard no_grad;
  EXPECT_NO_THROW(stage(torch::randn({2, 4, 8, 8})));
}

namespace {

/// A member whose inverse is off by 1e-3.
struct OffByAMilliImpl : torchrev::InvertibleModule {
  torch::Tensor forward(const torch::Tensor& x) override {
    return x * 2;
  }
  torch::Tensor inverse(const torch::Tensor& y) override {
    return y / 2 + 1e-3;
  }
};
TORCH_MODULE(OffByAMilli);

torchrev::RevBlock<torch::nn::Sequential, torch::nn::Sequential> tanh_block(
    int64_t half) {
  return torchrev::RevBlock<torch::nn::Sequential, torch::nn::Sequential>(
      torch::nn::Sequential(torch::nn::Linear(half, half), torch::nn::Tanh()),
      torch::nn::Sequential(torch::nn::Linear(half, half), torch::nn::Tanh()));
}

} // namespace

TEST(DriftDiagnostics, MeasuresEveryReconstructedInputAndNamesTheWorst) {
  torch::manual_seed(90);
  torchrev::RevSequential stage(
      torchrev::RevSequentialOptions().track_drift(true));
  for (int b = 0; b < 4; ++b) {
    stage->push_back(tanh_block(3));
  }
  stage->push_back(OffByAMilli());
  stage->push_back(tanh_block(3));
  stage->to(torch::kFloat64);
  EXPECT_TRUE(stage->drift().input_errors.empty());

  auto x = torch::randn({5, 6}, torch::kFloat64).requires_grad_(true);
  stage(x).pow(2).sum().backward();
  const auto drift = stage->drift();
  ASSERT_EQ(drift.input_errors.size(), 6u);
  for (size_t i = 0; i < 6; ++i) {
    SCOPED_TRACE(i);
    // Member 5's input is rebuilt by an exact block; member 4's inverse is
    // off by 1e-3, so its input is rebuilt wrong, and the error carries down
    // to the inputs of members 0 to 3.
    if (i <= 4) {
      EXPECT_GT(drift.input_errors[i], 1e-4);
    } else {
      EXPECT_LT(drift.input_errors[i], 1e-12);
    }
  }
  EXPECT_GE(drift.worst_member, 0);
  EXPECT_LE(drift.worst_member, 4);
  EXPECT_NE(
      drift.worst_name.find("block " + std::to_string(drift.worst_member)),
      std::string::npos)
      << drift.worst_name;
}

TEST(DriftDiagnostics, LeavesGradientsAloneAndIsTinyInFloat64) {
  torch::manual_seed(91);
  torchrev::RevSequential plain;
  for (int b = 0; b < 8; ++b) {
    plain->push_back(tanh_block(4));
  }
  plain->to(torch::kFloat64);
  auto tracked =
      std::dynamic_pointer_cast<torchrev::RevSequentialImpl>(plain->clone());
  tracked->options.track_drift(true);
  auto input = torch::randn({3, 8}, torch::kFloat64);
  std::vector<torch::Tensor> grads[2];
  torch::Tensor input_grads[2];
  int k = 0;
  for (auto* stage : {plain.get(), tracked.get()}) {
    auto x = input.clone().requires_grad_(true);
    stage->forward(x).pow(2).sum().backward();
    input_grads[k] = x.grad();
    for (const auto& p : stage->parameters()) {
      grads[k].push_back(p.grad());
    }
    ++k;
  }
  EXPECT_TRUE(input_grads[1].equal(input_grads[0]));
  for (size_t i = 0; i < grads[0].size(); ++i) {
    EXPECT_TRUE(grads[1][i].equal(grads[0][i])) << i;
  }
  const auto drift = tracked->drift();
  ASSERT_EQ(drift.input_errors.size(), 8u);
  for (size_t i = 0; i < 8; ++i) {
    EXPECT_GE(drift.input_errors[i], 0.0) << i;
    EXPECT_LT(drift.input_errors[i], 1e-12) << i;
  }
  EXPECT_LT(drift.worst_error, 1e-12);
  EXPECT_TRUE(plain->drift().input_errors.empty());
  std::ostringstream printed;
  tracked->pretty_print(printed);
  EXPECT_EQ(printed.str(), "torchrev::RevSequential(track_drift=true)");
}

TEST(DriftDiagnostics, AnchorsAreKeptNotRebuiltAndTheReportFollowsTheOption) {
  torch::manual_seed(92);
  torchrev::RevSequential stage(
      torchrev::RevSequentialOptions().anchor_every(2).track_drift(true));
  for (int b = 0; b < 6; ++b) {
    stage->push_back(tanh_block(2));
  }
  stage->to(torch::kFloat64);
  auto x = torch::randn({3, 4}, torch::kFloat64).requires_grad_(true);
  auto y = stage(x);
  // Before the backward: nothing measured yet.
  EXPECT_EQ(stage->drift().input_errors, std::vector<double>(6, -1.0));
  y.sum().backward();
  const auto errors = stage->drift().input_errors;
  ASSERT_EQ(errors.size(), 6u);
  for (size_t i = 0; i < 6; ++i) {
    SCOPED_TRACE(i);
    if (i == 2 || i == 4) { // the outputs of anchors 1 and 3: kept
      EXPECT_EQ(errors[i], -1.0);
    } else {
      EXPECT_GE(errors[i], 0.0);
      EXPECT_LT(errors[i], 1e-12);
    }
  }
  // Turned off, the next training forward leaves no report behind.
  stage->options.track_drift(false);
  stage(x).sum().backward();
  EXPECT_TRUE(stage->drift().input_errors.empty());
}
