#pragma once

#include <ATen/core/ivalue.h>
#include <c10/util/intrusive_ptr.h>
#include <torch/autograd.h>

namespace torchrev {
namespace detail {

/// Hands `state` from a custom Function's forward to its backward, in
/// `ctx->saved_data` (a capsule: it holds no tensors autograd would track).
template <typename State>
void save_state(
    torch::autograd::AutogradContext* ctx,
    c10::intrusive_ptr<State> state) {
  ctx->saved_data["state"] = c10::IValue::make_capsule(std::move(state));
}

/// The state `save_state` handed over, for a backward that recomputes
/// outside the graph and so cannot be differentiated again: with grad mode
/// on (a double backward, `create_graph=true`) it fails with
/// `double_backward_error`.
template <typename State>
c10::intrusive_ptr<State> state_for_backward(
    torch::autograd::AutogradContext* ctx,
    const char* double_backward_error) {
  TORCH_CHECK(!torch::GradMode::is_enabled(), double_backward_error);
  return c10::static_intrusive_pointer_cast<State>(
      ctx->saved_data["state"].toCapsule());
}

} // namespace detail
} // namespace torchrev
