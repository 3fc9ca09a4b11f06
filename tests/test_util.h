#pragma once

// Helpers shared by the tests: small reversible stages and comparisons
// against plain autograd.

#include <torchrev/torchrev.h>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace torchrev {
namespace testing {

using SeqBlock = RevBlock<torch::nn::Sequential, torch::nn::Sequential>;

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

/// The message of the c10::Error that `fn` throws, or "" if none.
inline std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  }
  return "";
}

#define EXPECT_ERROR_CONTAINS(stmt, ...)                                     \
  do {                                                                       \
    const std::string message = error_of([&] { stmt; });                     \
    for (const std::string& part : {__VA_ARGS__}) {                          \
      EXPECT_NE(message.find(part), std::string::npos)                       \
          << "error message \"" << message << "\" lacks \"" << part << "\""; \
    }                                                                        \
  } while (0)

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

/// The stage's blocks run one after the other with plain autograd (each
/// block's own forward stores its activations): the reference torchrev must
/// match.
inline torch::Tensor plain_forward(RevSequential& stage, torch::Tensor x) {
  for (const auto& block : *stage) {
    x = block->forward(x);
  }
  return x;
}

/// Counts how often each parameter's gradient accumulator runs, through a
/// post hook on it (what PyTorch's own data-parallel reducer listens to).
struct AccumulatorRunCounts {
  struct Counter : torch::autograd::FunctionPostHook {
    explicit Counter(std::shared_ptr<int> runs) : runs(std::move(runs)) {}
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

/// A deep copy of `stage` with identical parameters and buffers.
inline RevSequential copy_of(const RevSequential& stage) {
  return RevSequential(
      std::dynamic_pointer_cast<RevSequentialImpl>(stage->clone()));
}

} // namespace testing
} // namespace torchrev
