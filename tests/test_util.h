#pragma once

// Helpers shared by the tests: small reversible stages and comparisons
// against plain autograd.

#include <torchrev/torchrev.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <functional>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace torchrev {
namespace testing {

using SeqBlock = RevBlock<torch::nn::Sequential, torch::nn::Sequential>;
using torchrev::run_stage;
using torchrev::StageMode;

/// The largest absolute difference divided by the largest magnitude of `b`.
inline double relative_error(const torch::Tensor& a, const torch::Tensor& b) {
  EXPECT_TRUE(a.defined());
  EXPECT_TRUE(b.defined());
  if (!a.defined() || !b.defined()) {
    return 1.0;
  }
  EXPECT_EQ(a.sizes(), b.sizes());
  const double scale = b.abs().max().item<double>();
  const double diff = (a - b).abs().max().item<double>();
  return scale == 0.0 ? diff : diff / scale;
}

#define EXPECT_CLOSE(a, b, tol) \
  EXPECT_LT(::torchrev::testing::relative_error(a, b), tol)

/// The message of the `Error` that `fn` throws (without LibTorch's
/// backtrace), or "" if none.
template <typename Error = c10::Error>
std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    if constexpr (std::is_base_of_v<c10::Error, Error>) {
      return e.what_without_backtrace();
    } else {
      return e.what();
    }
  }
  return "";
}

/// Matches a `c10::Error` whose message, without LibTorch's backtrace
/// (whose function names could match by accident), contains every one of
/// `parts`.
template <typename... Parts>
auto error_message_contains(const Parts&... parts) {
  return ::testing::Throws<c10::Error>(::testing::ResultOf(
      "its message",
      [](const c10::Error& e) {
        return std::string(e.what_without_backtrace());
      },
      ::testing::AllOf(::testing::HasSubstr(std::string(parts))...)));
}

/// Expects `stmt` to throw a `c10::Error` whose message contains each of the
/// strings that follow.
#define EXPECT_ERROR_CONTAINS(stmt, ...) \
  EXPECT_THAT(                           \
      [&] { stmt; }, ::torchrev::testing::error_message_contains(__VA_ARGS__))

/// A residual function for `channels` channels: BN-ReLU-Conv, optionally
/// with dropout, as in a pre-activation RevNet.
inline torch::nn::Sequential conv_residual(
    int64_t channels,
    bool batch_norm = true,
    double dropout = 0.0) {
  torch::nn::Sequential seq;
  if (batch_norm) {
    seq->push_back(torch::nn::BatchNorm2d(channels));
  }
  seq->push_back(torch::nn::ReLU());
  seq->push_back(torch::nn::Conv2d(
      torch::nn::Conv2dOptions(channels, channels, 3).padding(1)));
  if (dropout > 0.0) {
    seq->push_back(torch::nn::Dropout(dropout));
  }
  return seq;
}

/// A stage of `depth` conv blocks on inputs with 2 * `half` channels.
inline RevSequential conv_stage(
    int depth,
    int64_t half,
    bool batch_norm = true,
    double dropout = 0.0) {
  RevSequential stage;
  for (int i = 0; i < depth; ++i) {
    stage->push_back(SeqBlock(
        conv_residual(half, batch_norm, dropout),
        conv_residual(half, batch_norm, dropout)));
  }
  return stage;
}

/// A stage of `depth` small MLP blocks on (batch, 2 * `half`) inputs.
inline RevSequential mlp_stage(int depth, int64_t half, double dropout = 0.0) {
  RevSequential stage;
  for (int i = 0; i < depth; ++i) {
    torch::nn::Sequential f(torch::nn::Linear(half, half), torch::nn::Tanh());
    torch::nn::Sequential g(torch::nn::Linear(half, half), torch::nn::Tanh());
    if (dropout > 0.0) {
      f->push_back(torch::nn::Dropout(dropout));
      g->push_back(torch::nn::Dropout(dropout));
    }
    stage->push_back(SeqBlock(f, g));
  }
  return stage;
}

/// What one training step of a stage computed: its output, the input's
/// gradient and every parameter's gradient (undefined where none).
struct Step {
  torch::Tensor y, grad_x;
  std::vector<torch::Tensor> param_grads;
};

/// One forward + backward of `stage` in `mode` (`kStored`: the members one
/// after the other with plain autograd, the reference torchrev must match),
/// with `.grad` cleared first.
inline Step run_step(
    RevSequential& stage,
    const torch::Tensor& input,
    StageMode mode) {
  stage->zero_grad();
  auto x = input.detach().clone().requires_grad_(true);
  auto y = run_stage(stage, x, mode);
  // A loss whose gradient is not constant, so every block sees a distinct dy.
  (y * y).sum().backward();
  Step step{y.detach(), x.grad(), {}};
  for (const auto& p : stage->parameters()) {
    step.param_grads.push_back(
        p.grad().defined() ? p.grad().clone() : p.grad());
  }
  return step;
}

/// Counts how often each parameter's gradient accumulator runs, through a
/// post hook on it (what PyTorch's own data-parallel reducer listens to).
struct AccumulatorRunCounts {
  struct Counter : torch::autograd::FunctionPostHook {
    explicit Counter(std::shared_ptr<int> counter) : runs(std::move(counter)) {}
    torch::autograd::variable_list operator()(
        const torch::autograd::variable_list& outputs,
        const torch::autograd::variable_list& /*inputs*/) override {
      ++*runs;
      return outputs;
    }
    std::shared_ptr<int> runs;
  };
  /// Keeps the accumulators (held only weakly by their parameters) alive.
  std::vector<decltype(torch::autograd::impl::grad_accumulator(
      std::declval<const torch::Tensor&>()))>
      accumulators;
  std::vector<std::shared_ptr<int>> runs;
};

inline AccumulatorRunCounts count_accumulator_runs(
    const std::vector<torch::Tensor>& params) {
  AccumulatorRunCounts counts;
  for (const auto& p : params) {
    auto accumulator = torch::autograd::impl::grad_accumulator(p);
    auto runs = std::make_shared<int>(0);
    accumulator->add_post_hook(
        std::make_unique<AccumulatorRunCounts::Counter>(runs));
    counts.accumulators.push_back(std::move(accumulator));
    counts.runs.push_back(std::move(runs));
  }
  return counts;
}

/// What one cross-entropy training step of a model computed: its logits, the
/// input's gradient and every parameter's gradient.
struct ModelStep {
  torch::Tensor logits, input_grad;
  std::vector<torch::Tensor> grads;
};

/// One training step of the zoo model `net` with its stages run in `mode`,
/// on `images`, with the global generators seeded so that dropout draws the
/// same numbers in every mode.
template <typename Net>
ModelStep model_step(
    const std::shared_ptr<Net>& net,
    StageMode mode,
    const torch::Tensor& images,
    const torch::Tensor& labels) {
  net->options.mode(mode);
  auto x = images.clone().requires_grad_(true);
  torch::manual_seed(5);
  ModelStep step;
  step.logits = net->forward(x);
  torch::nn::functional::cross_entropy(step.logits, labels).backward();
  step.input_grad = x.grad();
  for (const auto& p : net->parameters()) {
    step.grads.push_back(p.grad());
  }
  return step;
}

/// A ViT/RevViT small enough to compare gradients in float64: 8x8 images in
/// 2x2 patches, 16 features, 2 heads, 3 blocks, with dropout in the blocks
/// and in the attention (so that the replay of their draws is tested too).
inline models::ViTOptions tiny_vit_options() {
  return models::ViTOptions()
      .image_size(8)
      .patch_size(2)
      .dim(16)
      .heads(2)
      .depth(3)
      .dropout(0.2)
      .attention_dropout(0.1);
}

/// A deep copy of `stage` with identical parameters and buffers.
inline RevSequential copy_of(const RevSequential& stage) {
  return RevSequential(
      std::dynamic_pointer_cast<RevSequentialImpl>(stage->clone()));
}

} // namespace testing
} // namespace torchrev
