#pragma once

#include <torchrev/detail/autocast_state.h>
#include <torchrev/detail/rng_state.h>

#include <c10/core/Device.h>

namespace torchrev {
namespace detail {

/// RAII: runs a recompute as its forward ran, under the forward's autocast
/// state and, when `rng` is not empty, from the forward's random generator
/// states; on exit the thread's own autocast state and generators are back
/// (the generators forked, as `torch.random.fork_rng` does). Every recompute
/// of torchrev's backwards (F, G, a member's inverse and forward, a
/// checkpointed function) runs inside one.
class ForwardReplayGuard {
 public:
  ForwardReplayGuard(
      const AutocastState& autocast,
      const RngState& rng,
      const c10::Device& device)
      : autocast_(autocast), rng_(rng, device) {}
  ForwardReplayGuard(const ForwardReplayGuard&) = delete;
  ForwardReplayGuard& operator=(const ForwardReplayGuard&) = delete;

 private:
  // Constructed in this order and destroyed in the reverse one.
  AutocastStateGuard autocast_;
  ForkedRngGuard rng_;
};

} // namespace detail
} // namespace torchrev
