#pragma once

#include <torch/nn.h>

#include <functional>
#include <memory>
#include <vector>

namespace torchrev {

namespace detail {
inline bool& recomputing_flag() {
  static thread_local bool flag = false;
  return flag;
}
} // namespace detail

/// True while torchrev re-evaluates a block's F or G during backward (or
/// during `inverse()`). A custom module that updates state in its forward
/// (running statistics, counters) should skip that update when this returns
/// true, so the update happens once per training step, as in plain autograd.
/// LibTorch's BatchNorm and InstanceNorm modules are handled automatically.
inline bool is_recomputing() {
  return detail::recomputing_flag();
}

namespace detail {

/// RAII: marks the current thread as recomputing and stops every BatchNorm /
/// InstanceNorm module under `root` that is in training mode from updating
/// its running statistics. The modules still normalise with the batch
/// statistics, exactly as in the forward pass; only the update of
/// `running_mean`, `running_var` and `num_batches_tracked` is suppressed, by
/// detaching those tensors from the module for the guard's lifetime (the
/// registered buffers themselves are not touched).
class RecomputeGuard {
 public:
  explicit RecomputeGuard(torch::nn::Module& root)
      : previous_flag_(recomputing_flag()) {
    recomputing_flag() = true;
    freeze(root);
  }

  explicit RecomputeGuard(
      const std::vector<std::shared_ptr<torch::nn::Module>>& roots)
      : previous_flag_(recomputing_flag()) {
    recomputing_flag() = true;
    for (const auto& root : roots) {
      freeze(*root);
    }
  }

  ~RecomputeGuard() {
    for (auto& restore : restores_) {
      restore();
    }
    recomputing_flag() = previous_flag_;
  }

  RecomputeGuard(const RecomputeGuard&) = delete;
  RecomputeGuard& operator=(const RecomputeGuard&) = delete;

 private:
  void freeze(torch::nn::Module& root) {
    for (const auto& module : root.modules(/*include_self=*/true)) {
      detach_stats<torch::nn::BatchNorm1dImpl>(*module) ||
          detach_stats<torch::nn::BatchNorm2dImpl>(*module) ||
          detach_stats<torch::nn::BatchNorm3dImpl>(*module) ||
          detach_stats<torch::nn::InstanceNorm1dImpl>(*module) ||
          detach_stats<torch::nn::InstanceNorm2dImpl>(*module) ||
          detach_stats<torch::nn::InstanceNorm3dImpl>(*module);
    }
  }

  template <class NormImpl>
  bool detach_stats(torch::nn::Module& module) {
    auto* norm = dynamic_cast<NormImpl*>(&module);
    if (norm == nullptr) {
      return false;
    }
    if (!norm->is_training() || !norm->options.track_running_stats()) {
      return true; // Running statistics are read, not written: keep them.
    }
    restores_.emplace_back(
        [norm,
         mean = std::move(norm->running_mean),
         var = std::move(norm->running_var),
         count = std::move(norm->num_batches_tracked)]() mutable {
          norm->running_mean = std::move(mean);
          norm->running_var = std::move(var);
          norm->num_batches_tracked = std::move(count);
        });
    norm->running_mean = torch::Tensor();
    norm->running_var = torch::Tensor();
    norm->num_batches_tracked = torch::Tensor();
    return true;
  }

  bool previous_flag_;
  std::vector<std::function<void()>> restores_;
};

} // namespace detail
} // namespace torchrev
