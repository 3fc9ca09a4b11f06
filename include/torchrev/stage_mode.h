#pragma once

#include <torchrev/checkpoint.h>
#include <torchrev/invertible_module.h>
#include <torchrev/rev_sequential.h>

#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <memory>
#include <utility>
#include <vector>

namespace torchrev {

/// How the members of a `RevSequential` run: the three ways of trading
/// memory for compute on the same modules, with the same values and
/// gradients (README: "Choosing reversible, checkpointed or stored").
enum class StageMode {
  /// As the `RevSequential`: nothing but the stage's output is stored, and
  /// each member's input is reconstructed in backward.
  kReversible,
  /// Each member's own forward with plain autograd: every activation is
  /// stored (what the reversible mode must match, and the fastest).
  kStored,
  /// The members with gradient checkpointing (`torchrev::checkpoint`) in
  /// segments of ceil(sqrt(size)) members (Chen et al. 2016): one input per
  /// segment is stored, and each segment's forward runs twice.
  kCheckpointed,
};

/// Runs `stage` on `x` in `mode` and returns its output; the same modules,
/// parameters and random numbers in every mode. Reversible, it runs the
/// stage with `forward_consuming`: a temporary `x` (or one moved in) is
/// released once the first member has read it.
///
/// ```
/// auto y = torchrev::run_stage(*stage, x, torchrev::StageMode::kStored);
/// ```
inline torch::Tensor run_stage(
    RevSequentialImpl& stage,
    torch::Tensor x,
    StageMode mode) {
  switch (mode) {
    case StageMode::kReversible:
      return stage.forward_consuming(std::move(x));
    case StageMode::kStored:
      for (const auto& member : stage) {
        x = member->forward(x);
      }
      return x;
    case StageMode::kCheckpointed: {
      const size_t n = stage.size();
      const auto segment = std::max<size_t>(
          1, static_cast<size_t>(std::ceil(std::sqrt(static_cast<double>(n)))));
      for (size_t begin = 0; begin < n; begin += segment) {
        const size_t end = std::min(n, begin + segment);
        std::vector<std::shared_ptr<torch::nn::Module>> modules;
        std::vector<std::shared_ptr<InvertibleModule>> members;
        for (size_t i = begin; i < end; ++i) {
          members.push_back(stage.ptr(i));
          modules.push_back(members.back());
        }
        x = checkpoint(
            std::move(modules),
            [members](const torch::Tensor& in) {
              torch::Tensor out = in;
              for (const auto& member : members) {
                out = member->forward(out);
              }
              return out;
            },
            x);
      }
      return x;
    }
  }
  TORCH_CHECK(false, "torchrev::run_stage: unknown StageMode");
}

/// `run_stage` for a stage's holder.
inline torch::Tensor run_stage(
    RevSequential stage,
    torch::Tensor x,
    StageMode mode) {
  return run_stage(*stage, std::move(x), mode);
}

} // namespace torchrev
