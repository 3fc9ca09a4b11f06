#pragma once

// Gradient checkpointing for LibTorch (which has no checkpoint API of its
// own: pytorch/pytorch#52744).
//
// `checkpoint(module, x)` runs `module` without storing its activations and
// keeps only its input; backward re-runs the forward once, with grad, and
// back-propagates through that recomputed graph. Same guarantees as a
// reversible stage: parameter gradients are returned through autograd (hooks
// fire once, `torch::autograd::grad` works), dropout is replayed exactly,
// BatchNorm running statistics are updated once per step, and the recompute
// runs under the forward's autocast state. Unlike a reversible stage its
// memory grows with the number of checkpointed segments (one stored input
// each), but it works for any module, including ones that change shape.

#include <torchrev/autograd/checkpoint_function.h>
#include <torchrev/detail/concurrent_use.h>
#include <torchrev/detail/unique_tensors.h>

#include <torch/arg.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/any.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <ostream>
#include <utility>
#include <vector>

namespace torchrev {

/// Runs `function` on `x` with gradient checkpointing when training (grad
/// mode on, and `x` or a parameter of `modules` requires grad), plainly
/// otherwise, and returns `function(x)`. `function` may use only the
/// parameters and buffers of `modules`: their parameters become inputs of the
/// checkpoint, which returns their gradients.
inline torch::Tensor checkpoint(
    std::vector<std::shared_ptr<torch::nn::Module>> modules,
    std::function<torch::Tensor(const torch::Tensor&)> function,
    const torch::Tensor& x,
    bool preserve_rng_state = true) {
  for (const auto& module : modules) {
    TORCH_CHECK(
        module != nullptr, "torchrev::checkpoint: expected modules, got null");
  }
  TORCH_CHECK(
      x.defined(), "torchrev::checkpoint: expected a defined input tensor");
  std::deque<detail::BlockUse> uses;
  for (const auto& module : modules) {
    uses.emplace_back(
        module.get(),
        detail::BlockUse::Kind::kForward,
        "torchrev::checkpoint (" + module->name() + ")");
  }
  auto params = detail::trainable_parameters(modules);
  if (!torch::GradMode::is_enabled() ||
      (!x.requires_grad() && params.empty())) {
    return function(x);
  }
  auto state = c10::make_intrusive<autograd::CheckpointState>();
  state->modules = std::move(modules);
  state->function = std::move(function);
  state->preserve_rng_state = preserve_rng_state;
  return autograd::CheckpointFunction::apply(
      state, x, torch::TensorList(params));
}

/// Runs a module holder (e.g. `torch::nn::Sequential`) with checkpointing.
template <typename ModuleHolder>
torch::Tensor checkpoint(ModuleHolder module, const torch::Tensor& x) {
  const auto& ptr = module.ptr();
  return checkpoint(
      {ptr}, [ptr](const torch::Tensor& in) { return ptr->forward(in); }, x);
}

/// Runs `sequential` in `segments` segments of consecutive modules, each but
/// the last with gradient checkpointing, and returns its output, like
/// PyTorch's `torch.utils.checkpoint.checkpoint_sequential`: the segments
/// hold size / segments modules (the last one the rest), and the last runs
/// plainly, since backward needs its activations at once. Training then
/// stores one input per segment and the last segment's activations, and
/// runs every other segment's forward twice.
///
/// ```
/// torch::nn::Sequential body(/* 16 layers */);
/// auto y = torchrev::checkpoint_sequential(body, 4, x); // 4 segments of 4
/// ```
inline torch::Tensor checkpoint_sequential(
    const torch::nn::Sequential& sequential,
    int64_t segments,
    const torch::Tensor& x,
    bool preserve_rng_state = true) {
  const auto size = static_cast<int64_t>(sequential->size());
  TORCH_CHECK(
      segments >= 1 && segments <= std::max<int64_t>(size, 1),
      "torchrev::checkpoint_sequential: expected between 1 and ",
      std::max<int64_t>(size, 1),
      " segments for a Sequential of ",
      size,
      " modules, but got ",
      segments);
  const int64_t segment_size = size / segments;
  // The modules of [begin, end) with their forward (AnyModule copies share
  // the module).
  const auto run = [&sequential](int64_t begin, int64_t end) {
    std::vector<torch::nn::AnyModule> modules(
        sequential->begin() + begin, sequential->begin() + end);
    return [modules](const torch::Tensor& in) mutable {
      torch::Tensor out = in;
      for (auto& module : modules) {
        out = module.forward(out);
      }
      return out;
    };
  };
  torch::Tensor y = x;
  int64_t begin = 0;
  for (int64_t s = 0; s + 1 < segments; ++s, begin += segment_size) {
    std::vector<std::shared_ptr<torch::nn::Module>> modules;
    for (int64_t k = begin; k < begin + segment_size; ++k) {
      modules.push_back(sequential->ptr(static_cast<size_t>(k)));
    }
    y = checkpoint(
        std::move(modules),
        run(begin, begin + segment_size),
        y,
        preserve_rng_state);
  }
  return run(begin, size)(y);
}

/// Options for `Checkpoint`.
struct CheckpointOptions {
  /// Snapshot and replay the random generators, so dropout in the
  /// recompute matches the forward.
  TORCH_ARG(bool, preserve_rng_state) = true;
};

/// A module wrapper that checkpoints the module it holds: stores only its
/// input when training and recomputes the forward in backward.
///
/// ```
/// torchrev::Checkpoint block(torch::nn::Sequential(
///     torch::nn::Conv2d(16, 16, 3), torch::nn::ReLU()));
/// auto y = block(x);
/// ```
class CheckpointImpl : public torch::nn::Cloneable<CheckpointImpl> {
 public:
  /// Wraps the module held by `module` (any holder whose module has a
  /// `forward(const torch::Tensor&)` returning a tensor).
  template <typename M>
  explicit CheckpointImpl(
      torch::nn::ModuleHolder<M> module,
      CheckpointOptions options_ = {})
      : CheckpointImpl(
            module.ptr(),
            [](const std::shared_ptr<torch::nn::Module>& m) {
              auto typed = std::dynamic_pointer_cast<M>(m);
              return Forward([typed](const torch::Tensor& x) -> torch::Tensor {
                return typed->forward(x);
              });
            },
            std::move(options_)) {}

  torch::Tensor forward(const torch::Tensor& x) {
    return checkpoint({module_}, forward_, x, options.preserve_rng_state());
  }

  void reset() override {}

  /// Deep copy of the wrapped module.
  std::shared_ptr<torch::nn::Module> clone(
      const torch::optional<torch::Device>& device =
          torch::nullopt) const override {
    return std::shared_ptr<CheckpointImpl>(
        new CheckpointImpl(module_->clone(device), bind_, options));
  }

  void pretty_print(std::ostream& stream) const override {
    stream << "torchrev::Checkpoint";
  }

  CheckpointOptions options;

 private:
  using Forward = std::function<torch::Tensor(const torch::Tensor&)>;
  using Binder =
      std::function<Forward(const std::shared_ptr<torch::nn::Module>&)>;

  CheckpointImpl(
      std::shared_ptr<torch::nn::Module> module,
      Binder bind,
      CheckpointOptions options_)
      : options(std::move(options_)),
        module_(register_module("module", std::move(module))),
        bind_(std::move(bind)),
        forward_(bind_(module_)) {}

  std::shared_ptr<torch::nn::Module> module_;
  Binder bind_;
  Forward forward_;
};

/// Holder of a `CheckpointImpl`.
TORCH_MODULE(Checkpoint);

} // namespace torchrev
