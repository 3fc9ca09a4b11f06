#pragma once

// Deep copies of modules that cannot derive from torch::nn::Cloneable.

#include <torch/nn/module.h>
#include <torch/types.h>

#include <memory>
#include <string>

namespace torchrev {

/// Copies every parameter (its values and `requires_grad`) and every buffer
/// of `from` into the same-named ones of `to`, a freshly built module of the
/// same structure, and its training mode; returns `to`. With `device`, the
/// copies are made on it.
///
/// This is how a `RevBlockBase` subclass (which cannot also derive from
/// `torch::nn::Cloneable`) implements `clone()`, so that a stage holding it
/// can be cloned:
///
/// ```
/// std::shared_ptr<torch::nn::Module> clone(
///     const torch::optional<torch::Device>& device =
///         torch::nullopt) const override {
///   return torchrev::clone_state_into(
///       *this, std::make_shared<MyBlockImpl>(half), device);
/// }
/// ```
template <class M>
std::shared_ptr<M> clone_state_into(
    const torch::nn::Module& from,
    std::shared_ptr<M> to,
    const torch::optional<torch::Device>& device = torch::nullopt) {
  TORCH_CHECK(
      to != nullptr,
      "torchrev::clone_state_into: expected a module to copy into");
  torch::NoGradGuard no_grad;
  const auto copied = [&device](const torch::Tensor& t) {
    return device.has_value()
        ? t.to(*device, /*non_blocking=*/false, /*copy=*/true)
        : t.clone();
  };
  auto copy_into =
      [&](const auto& source, auto target, const char* what, bool grad) {
        TORCH_CHECK(
            source.size() == target.size(),
            "torchrev::clone_state_into: ",
            from.name(),
            " has ",
            source.size(),
            " ",
            what,
            "s but the new module has ",
            target.size(),
            "; build it with the same options");
        for (const auto& item : source) {
          auto* slot = target.find(item.key());
          TORCH_CHECK(
              slot != nullptr && slot->sizes() == item.value().sizes(),
              "torchrev::clone_state_into: the new module has no ",
              what,
              " '",
              item.key(),
              "' of shape ",
              item.value().sizes(),
              "; build it with the same options");
          // set_data: the copy keeps the original's dtype and device.
          slot->set_data(copied(item.value()));
          if (grad) {
            slot->set_requires_grad(item.value().requires_grad());
          }
        }
      };
  copy_into(from.named_parameters(), to->named_parameters(), "parameter", true);
  copy_into(from.named_buffers(), to->named_buffers(), "buffer", false);
  to->train(from.is_training());
  return to;
}

} // namespace torchrev
