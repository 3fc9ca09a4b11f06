#pragma once

#include <torch/nn/module.h>
#include <torch/types.h>

#include <memory>
#include <unordered_set>
#include <vector>

namespace torchrev {
namespace detail {

/// The parameters of `modules` that require grad, in `parameters()` order,
/// each once: a module may register the same tensor twice (a shared
/// submodule, tied weights), and its gradient must then be returned, summed
/// and all-reduced once.
inline std::vector<torch::Tensor> trainable_parameters(
    const std::vector<const torch::nn::Module*>& modules) {
  std::vector<torch::Tensor> params;
  std::unordered_set<const c10::TensorImpl*> seen;
  for (const auto* module : modules) {
    for (const auto& p : module->parameters()) {
      if (p.requires_grad() && seen.insert(p.unsafeGetTensorImpl()).second) {
        params.push_back(p);
      }
    }
  }
  return params;
}

/// The parameters of `module` that require grad, each once.
inline std::vector<torch::Tensor> trainable_parameters(
    const torch::nn::Module& module) {
  return trainable_parameters(std::vector<const torch::nn::Module*>{&module});
}

/// The parameters of `modules` that require grad, each once.
inline std::vector<torch::Tensor> trainable_parameters(
    const std::vector<std::shared_ptr<torch::nn::Module>>& modules) {
  std::vector<const torch::nn::Module*> raw;
  raw.reserve(modules.size());
  for (const auto& module : modules) {
    raw.push_back(module.get());
  }
  return trainable_parameters(raw);
}

} // namespace detail
} // namespace torchrev
