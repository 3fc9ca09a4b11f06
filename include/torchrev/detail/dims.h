#pragma once

#include <c10/util/Exception.h>
#include <torch/types.h>

#include <cstdint>

namespace torchrev {
namespace detail {

/// `dim` as an index into the dimensions of `t`, negative values counting
/// from the end; throws "<context...>: <name> <dim> is out of range for an
/// input with <n> dimensions (shape [...])" otherwise. The context's pieces
/// are joined only when the check fails.
template <class... Context>
int64_t resolve_dim(
    int64_t dim,
    const torch::Tensor& t,
    const char* name,
    const Context&... context) {
  TORCH_CHECK(
      dim >= -t.dim() && dim < t.dim(),
      context...,
      ": ",
      name,
      " ",
      dim,
      " is out of range for an input with ",
      t.dim(),
      " dimensions (shape ",
      t.sizes(),
      ")");
  return dim < 0 ? dim + t.dim() : dim;
}

} // namespace detail
} // namespace torchrev
