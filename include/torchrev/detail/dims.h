#pragma once

#include <c10/util/Exception.h>
#include <torch/types.h>

#include <cstdint>
#include <string>

namespace torchrev {
namespace detail {

/// `dim` as an index into the dimensions of `t`, negative values counting
/// from the end; throws "<context>: <name> <dim> is out of range for an
/// input with <n> dimensions (shape [...])" otherwise.
inline int64_t resolve_dim(
    int64_t dim,
    const torch::Tensor& t,
    const std::string& context,
    const char* name) {
  TORCH_CHECK(
      dim >= -t.dim() && dim < t.dim(),
      context,
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
