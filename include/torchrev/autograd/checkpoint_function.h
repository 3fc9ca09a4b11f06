#pragma once

// The autograd Function behind `torchrev::checkpoint` (checkpoint.h):
// forward runs the function without grad and keeps only its input; backward
// re-runs it once, with grad, under the forward's replayed random and
// autocast state, and back-propagates through that recomputed graph. Its
// parameters are inputs of the Function, so their gradients are returned
// through autograd (hooks fire once, `torch::autograd::grad` works).

#include <torchrev/detail/autocast_state.h>
#include <torchrev/detail/concurrent_use.h>
#include <torchrev/detail/forward_replay.h>
#include <torchrev/detail/function_state.h>
#include <torchrev/detail/gradient_sink.h>
#include <torchrev/detail/outside_dependencies.h>
#include <torchrev/detail/replay_checks.h>
#include <torchrev/detail/rng_state.h>
#include <torchrev/detail/unique_tensors.h>
#include <torchrev/recompute.h>

#include <ATen/core/ivalue.h>
#include <torch/autograd.h>
#include <torch/nn/module.h>
#include <torch/types.h>

#include <deque>
#include <functional>
#include <memory>
#include <utility>
#include <vector>

namespace torchrev {
namespace autograd {

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
      const c10::intrusive_ptr<CheckpointState>& state,
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
    detail::save_state(ctx, state);
    return y;
  }

  static torch::autograd::variable_list backward(
      torch::autograd::AutogradContext* ctx,
      torch::autograd::variable_list grad_outputs) {
    auto state = detail::state_for_backward<CheckpointState>(
        ctx,
        "torchrev::checkpoint does not support double backward "
        "(create_graph=true)");
    auto saved = ctx->get_saved_variables();
    const auto& params = state->params;
    detail::check_same_parameters(
        detail::trainable_parameters(state->modules),
        params,
        "torchrev::checkpoint");
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
      detail::RecomputeGuard recompute(state->modules);
      detail::ForwardReplayGuard replay(
          state->autocast, state->rng, x.device());
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
} // namespace torchrev
