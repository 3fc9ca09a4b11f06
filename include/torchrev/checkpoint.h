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

#include <torchrev/detail/autocast_state.h>
#include <torchrev/detail/concurrent_use.h>
#include <torchrev/detail/gradient_sink.h>
#include <torchrev/detail/outside_dependencies.h>
#include <torchrev/detail/replay_checks.h>
#include <torchrev/detail/rng_state.h>
#include <torchrev/recompute.h>
#include <torchrev/rev_block.h>

#include <ATen/core/ivalue.h>
#include <torch/autograd.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/any.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include <deque>
#include <functional>
#include <memory>
#include <ostream>
#include <type_traits>
#include <unordered_set>
#include <utility>
#include <vector>

namespace torchrev {
namespace autograd {

/// The parameters of `modules` that require grad, each once.
inline std::vector<torch::Tensor> trainable_parameters(
    const std::vector<std::shared_ptr<torch::nn::Module>>& modules) {
  std::vector<torch::Tensor> params;
  std::unordered_set<const void*> seen;
  for (const auto& module : modules) {
    for (const auto& p : detail::trainable_parameters(*module)) {
      if (seen.insert(p.unsafeGetTensorImpl()).second) {
        params.push_back(p);
      }
    }
  }
  return params;
}

/// What a `CheckpointFunction` forward hands to its backward.
struct CheckpointState : torch::CustomClassHolder {
  /// The modules whose parameters are inputs and whose norm layers must not
  /// update their statistics twice.
  std::vector<std::shared_ptr<torch::nn::Module>> modules;
  /// The computation, `module`'s forward.
  std::function<torch::Tensor(const torch::Tensor&)> function;
  bool preserve_rng_state = true;
  /// The parameters passed to forward and their versions then.
  std::vector<torch::Tensor> params;
  std::vector<uint32_t> param_versions;
  detail::RngState rng;
  detail::AutocastState autocast;
};

/// Stores only its input; recomputes the forward in backward.
struct CheckpointFunction
    : public torch::autograd::Function<CheckpointFunction> {
  static torch::Tensor forward(
      torch::autograd::AutogradContext* ctx,
      c10::intrusive_ptr<CheckpointState> state,
      const torch::Tensor& x,
      torch::TensorList params) {
    state->params = params.vec();
    state->param_versions = detail::versions(params);
    state->autocast = detail::AutocastState::current();
    if (state->preserve_rng_state) {
      state->rng = detail::RngState::capture(x.device());
    }
    torch::Tensor y;
    {
      // No grad-less casts of the weights may outlive this forward.
      detail::AutocastCacheDisabledGuard no_autocast_cache;
      y = state->function(x);
    }
    ctx->save_for_backward({x});
    ctx->saved_data["state"] = c10::IValue::make_capsule(state);
    return y;
  }

  static torch::autograd::variable_list backward(
      torch::autograd::AutogradContext* ctx,
      torch::autograd::variable_list grad_outputs) {
    TORCH_CHECK(
        !torch::GradMode::is_enabled(),
        "torchrev::checkpoint does not support double backward "
        "(create_graph=true)");
    auto saved = ctx->get_saved_variables();
    auto state = c10::static_intrusive_pointer_cast<CheckpointState>(
        ctx->saved_data["state"].toCapsule());
    const auto& params = state->params;
    detail::check_same_parameters(
        trainable_parameters(state->modules), params, "torchrev::checkpoint");
    if (!params.empty()) { // then there is a module to name them by
      detail::check_versions(
          params,
          state->param_versions,
          *state->modules.front(),
          "torchrev::checkpoint");
    }
    const bool input_needs_grad = saved[0].requires_grad();
    auto x = saved[0].detach().requires_grad_(input_needs_grad);
    // The recomputed graph leads to private sinks instead of the parameters'
    // accumulators until the gradients are taken, so parameter hooks run once,
    // in the outer backward (see detail/gradient_sink.h).
    detail::GradientSinkGuard sinks(params);
    std::deque<detail::BlockUse> uses;
    for (const auto& module : state->modules) {
      uses.emplace_back(
          module.get(),
          detail::BlockUse::Kind::kRecompute,
          "torchrev::checkpoint (" + module->name() + ")");
    }
    torch::Tensor y;
    detail::RecomputeScope scope;
    {
      torch::AutoGradMode enable_grad(true);
      detail::AutocastStateGuard autocast(state->autocast);
      detail::RecomputeGuard recompute(state->modules);
      detail::ForkedRngGuard rng(state->rng, x.device());
      y = state->function(x);
    }
    detail::check_no_outside_dependencies(
        y,
        x,
        params,
        scope,
        "torchrev::checkpoint",
        "the checkpointed function");
    torch::autograd::variable_list grads(2 + params.size());
    if (!y.requires_grad()) {
      return grads;
    }
    torch::autograd::variable_list inputs;
    if (input_needs_grad) {
      inputs.push_back(x);
    }
    inputs.insert(inputs.end(), params.begin(), params.end());
    auto computed = torch::autograd::grad(
        {y},
        inputs,
        {grad_outputs[0]},
        /*retain_graph=*/false,
        /*create_graph=*/false,
        /*allow_unused=*/true);
    // Slots: state (not a tensor), x, then the parameters.
    const size_t first_param = input_needs_grad ? 1 : 0;
    if (input_needs_grad) {
      grads[1] = computed[0];
    }
    for (size_t k = 0; k < params.size(); ++k) {
      grads[2 + k] = computed[first_param + k];
    }
    return grads;
  }
};

} // namespace autograd

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
  auto params = autograd::trainable_parameters(modules);
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
  auto ptr = module.ptr();
  return checkpoint(
      {ptr}, [ptr](const torch::Tensor& in) { return ptr->forward(in); }, x);
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
