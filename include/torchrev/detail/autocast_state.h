#pragma once

#include <ATen/autocast_mode.h>
#include <torch/version.h>

namespace torchrev {
namespace detail {

/// The autocast (mixed precision) state of the current thread. A recompute in
/// backward must run under the state the forward ran under, or its values and
/// dtypes differ from the forward's.
struct AutocastState {
  bool cpu_enabled = false;
  bool cuda_enabled = false;
  at::ScalarType cpu_dtype = at::kBFloat16;
  at::ScalarType cuda_dtype = at::kHalf;

  static AutocastState current() {
    AutocastState state;
#if TORCH_VERSION_MAJOR > 2 || \
    (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)
    state.cpu_enabled = at::autocast::is_autocast_enabled(at::kCPU);
    state.cuda_enabled = at::autocast::is_autocast_enabled(at::kCUDA);
    state.cpu_dtype = at::autocast::get_autocast_dtype(at::kCPU);
    state.cuda_dtype = at::autocast::get_autocast_dtype(at::kCUDA);
#else
    state.cpu_enabled = at::autocast::is_cpu_enabled();
    state.cuda_enabled = at::autocast::is_enabled();
    state.cpu_dtype = at::autocast::get_autocast_cpu_dtype();
    state.cuda_dtype = at::autocast::get_autocast_gpu_dtype();
#endif
    return state;
  }

  void apply() const {
#if TORCH_VERSION_MAJOR > 2 || \
    (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)
    at::autocast::set_autocast_enabled(at::kCPU, cpu_enabled);
    at::autocast::set_autocast_enabled(at::kCUDA, cuda_enabled);
    at::autocast::set_autocast_dtype(at::kCPU, cpu_dtype);
    at::autocast::set_autocast_dtype(at::kCUDA, cuda_dtype);
#else
    at::autocast::set_cpu_enabled(cpu_enabled);
    at::autocast::set_enabled(cuda_enabled);
    at::autocast::set_autocast_cpu_dtype(cpu_dtype);
    at::autocast::set_autocast_gpu_dtype(cuda_dtype);
#endif
  }
};

/// RAII: turns autocast's cache of cast weights off, then restores it.
/// Under grad mode off (a Function's forward) LibTorch 1.13 still caches the
/// casts of weights that require grad, without a grad_fn; a recompute, or the
/// caller's own later use of the weight in the same autocast region, would
/// then reuse a cast that gives the weight no gradient (pytorch issue
/// 112583, fixed in 2.x). Casting afresh costs a little time under autocast
/// and nothing otherwise.
class AutocastCacheDisabledGuard {
 public:
  AutocastCacheDisabledGuard()
      : previous_(at::autocast::is_autocast_cache_enabled()) {
    at::autocast::set_autocast_cache_enabled(false);
  }
  ~AutocastCacheDisabledGuard() {
    at::autocast::set_autocast_cache_enabled(previous_);
  }
  AutocastCacheDisabledGuard(const AutocastCacheDisabledGuard&) = delete;
  AutocastCacheDisabledGuard& operator=(const AutocastCacheDisabledGuard&) =
      delete;

 private:
  bool previous_;
};

/// RAII: runs a recompute under a saved autocast state, then restores the
/// thread's own. Like entering and leaving `torch.autocast`, it counts the
/// nesting and clears autocast's cache of cast weights when the outermost
/// autocast region ends, so no cast made here outlives an optimizer step.
class AutocastStateGuard {
 public:
  explicit AutocastStateGuard(const AutocastState& state)
      : previous_(AutocastState::current()),
        active_(state.cpu_enabled || state.cuda_enabled) {
    state.apply();
    if (active_) {
      at::autocast::increment_nesting();
    }
  }
  ~AutocastStateGuard() {
    if (active_ && at::autocast::decrement_nesting() == 0) {
      at::autocast::clear_cache();
    }
    previous_.apply();
  }
  AutocastStateGuard(const AutocastStateGuard&) = delete;
  AutocastStateGuard& operator=(const AutocastStateGuard&) = delete;

 private:
  AutocastState previous_;
  bool active_;
  AutocastCacheDisabledGuard no_cache_;
};

} // namespace detail
} // namespace torchrev
