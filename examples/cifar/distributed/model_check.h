#pragma once

/// The check that every rank built the same model, before anything is
/// broadcast into it.

#include "communicator.h"

#include <torch/nn/module.h>
#include <torch/types.h>

#include <stdexcept>
#include <string>
#include <unordered_set>
#include <vector>

namespace cifar {

/// Dense, deduplicated parameters and buffers to broadcast.
inline std::vector<torch::Tensor> model_state(torch::nn::Module& model) {
  std::vector<torch::Tensor> tensors;
  std::unordered_set<const void*> seen;
  auto add = [&](const torch::Tensor& t) {
    if (t.defined() && seen.insert(t.unsafeGetTensorImpl()).second) {
      tensors.push_back(t);
    }
  };
  for (const auto& p : model.parameters(/*recurse=*/true)) {
    add(p);
  }
  for (const auto& b : model.buffers(/*recurse=*/true)) {
    add(b);
  }
  return tensors;
}

/// Fails on every rank alike when the ranks' models differ in structure
/// (the number, order, dtypes and shapes of parameters and buffers, and
/// which of them require grad),
/// before a mismatched broadcast could hang or corrupt them: rank 0's
/// description is broadcast, each rank compares it with its own, and a sum
/// of the verdicts tells every rank.
inline void check_same_model(Communicator& comm, torch::nn::Module& model) {
  // The structure as numbers, each exact in a double: the tensor count
  // (never an empty description), then for each tensor its dtype, whether
  // it requires grad, its rank and its sizes.
  const auto tensors = model_state(model);
  std::vector<double> own{static_cast<double>(tensors.size())};
  for (const auto& t : tensors) {
    own.push_back(static_cast<double>(static_cast<int>(t.scalar_type())));
    own.push_back(t.requires_grad() ? 1.0 : 0.0);
    own.push_back(static_cast<double>(t.dim()));
    for (const auto size : t.sizes()) {
      own.push_back(static_cast<double>(size));
    }
  }
  const auto own_tensor = torch::tensor(own, torch::kFloat64);
  auto length =
      torch::full({1}, static_cast<double>(own.size()), torch::kFloat64);
  comm.broadcast({length}, "broadcast of rank 0's model description");
  const auto rank0_length = static_cast<int64_t>(length.item<double>());
  bool differs = rank0_length != own_tensor.numel();
  auto rank0 = differs ? torch::zeros({rank0_length}, torch::kFloat64)
                       : own_tensor.clone();
  comm.broadcast({rank0}, "broadcast of rank 0's model description");
  differs = differs || !torch::equal(rank0, own_tensor);
  if (comm.all_reduce_sum({differs ? 1.0 : 0.0})[0] > 0) {
    throw std::runtime_error(
        comm.where() +
        (differs ? "this rank's model differs from rank 0's"
                 : "another rank's model differs from rank 0's") +
        " (parameter/buffer count, order, shapes, dtypes or which require "
        "grad); every rank "
        "must build the same model");
  }
}

} // namespace cifar
