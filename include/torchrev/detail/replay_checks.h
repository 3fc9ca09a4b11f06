#pragma once

// Checks that a backward recompute sees the module as the forward saw it.
//
// A recompute that runs on changed modules gives wrong gradients silently:
// parameters updated in place between forward and backward (an optimizer
// step), a parameter frozen or unfrozen, or a submodule switched between
// train() and eval() (BatchNorm normalises differently). Plain autograd
// reports the first as "modified by an inplace operation"; these checks make
// torchrev report all of them, naming the block and the parameter or module.

#include <torchrev/detail/unique_tensors.h>

#include <torch/nn/module.h>
#include <torch/types.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace torchrev {
namespace detail {

/// The training flag of `module` and of each of its submodules, in
/// `modules()` order.
inline std::vector<bool> training_flags(const torch::nn::Module& module) {
  std::vector<bool> flags;
  for (const auto& m : module.modules(/*include_self=*/true)) {
    flags.push_back(m->is_training());
  }
  return flags;
}

/// Throws if a module under `module` changed between train() and eval()
/// since `forward_flags` were taken.
inline void check_training_flags(
    const torch::nn::Module& module,
    const std::vector<bool>& forward_flags,
    const std::string& where) {
  const auto named = module.named_modules(/*name_prefix=*/"", true);
  TORCH_CHECK(
      named.size() == forward_flags.size(),
      where,
      ": its submodules changed between forward and backward (",
      forward_flags.size(),
      " then ",
      named.size(),
      " modules)");
  for (size_t k = 0; k < named.size(); ++k) {
    const auto& m = named[k].value();
    TORCH_CHECK(
        m->is_training() == forward_flags[k],
        where,
        ": ",
        named[k].key().empty() ? std::string("the block")
                               : "submodule '" + named[k].key() + "'",
        " (",
        m->name(),
        ") was in ",
        forward_flags[k] ? "training" : "eval",
        " mode in forward but is in ",
        m->is_training() ? "training" : "eval",
        " mode in backward; call train()/eval() only between steps");
  }
}

/// The version counters of `params`.
inline std::vector<uint32_t> versions(torch::TensorList params) {
  std::vector<uint32_t> result;
  result.reserve(params.size());
  for (const auto& p : params) {
    result.push_back(static_cast<uint32_t>(p._version()));
  }
  return result;
}

/// The name of `param` in `module`, or "#index" if it is not found.
inline std::string parameter_name(
    const torch::nn::Module& module,
    const torch::Tensor& param,
    size_t index) {
  for (const auto& item : module.named_parameters()) {
    if (item.value().unsafeGetTensorImpl() == param.unsafeGetTensorImpl()) {
      return item.key();
    }
  }
  return "#" + std::to_string(index);
}

/// Throws unless each of `params` is still at its forward version; names
/// parameters as `module` does.
inline void check_versions(
    const std::vector<torch::Tensor>& params,
    const std::vector<uint32_t>& forward_versions,
    const torch::nn::Module& module,
    const std::string& where) {
  for (size_t k = 0; k < params.size(); ++k) {
    const auto version = static_cast<uint32_t>(params[k]._version());
    TORCH_CHECK(
        version == forward_versions[k],
        where,
        ": one of the variables needed for gradient computation has been "
        "modified by an inplace operation: parameter '",
        parameter_name(module, params[k], k),
        "' is at version ",
        version,
        "; expected version ",
        forward_versions[k],
        " instead. Do not update parameters (e.g. optimizer.step()) between "
        "a forward and its backward.");
  }
}

/// Throws unless `now` (the parameters requiring grad at backward) are
/// exactly `forward_params`, the same tensors in the same order.
inline void check_same_parameters(
    const std::vector<torch::Tensor>& now,
    const std::vector<torch::Tensor>& forward_params,
    const std::string& where) {
  bool same = now.size() == forward_params.size();
  for (size_t k = 0; same && k < now.size(); ++k) {
    same =
        now[k].unsafeGetTensorImpl() == forward_params[k].unsafeGetTensorImpl();
  }
  TORCH_CHECK(
      same,
      where,
      ": the parameters requiring grad changed between forward and backward "
      "(",
      forward_params.size(),
      " then ",
      now.size(),
      "); change requires_grad only between steps");
}

/// Throws unless `module`'s parameters that require grad are still exactly
/// `forward_params`, each at its forward version.
inline void check_parameters_unchanged(
    const torch::nn::Module& module,
    const std::vector<torch::Tensor>& forward_params,
    const std::vector<uint32_t>& forward_versions,
    const std::string& where) {
  check_same_parameters(trainable_parameters(module), forward_params, where);
  check_versions(forward_params, forward_versions, module, where);
}

} // namespace detail
} // namespace torchrev
