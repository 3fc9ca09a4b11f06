#pragma once

#include <ATen/Context.h>
#include <ATen/core/Generator.h>
#include <c10/core/Device.h>
#include <torch/types.h>

#include <mutex>
#include <utility>
#include <vector>

namespace torchrev {
namespace detail {

/// A snapshot of the default random generators that a computation on `device`
/// draws from: always the CPU generator, and the device's own generator when
/// the device is not the CPU (CUDA). Used to replay dropout masks exactly when
/// a block is recomputed, without reseeding anything.
class RngState {
 public:
  RngState() = default;

  /// Captures the current state of the generators used on `device`.
  static RngState capture(const c10::Device& device) {
    RngState state;
    state.add(at::detail::getDefaultCPUGenerator());
    if (!device.is_cpu()) {
      state.add(at::globalContext().defaultGenerator(device));
    }
    return state;
  }

  bool empty() const {
    return generators_.empty();
  }

  /// Sets every captured generator back to its captured state.
  void restore() const {
    for (const auto& entry : generators_) {
      at::Generator generator = entry.first;
      std::lock_guard<std::mutex> lock(generator.mutex());
      generator.set_state(entry.second);
    }
  }

 private:
  void add(at::Generator generator) {
    std::lock_guard<std::mutex> lock(generator.mutex());
    generators_.emplace_back(generator, generator.get_state());
  }

  std::vector<std::pair<at::Generator, torch::Tensor>> generators_;
};

/// RAII: sets the generators to a saved state for the lifetime of the guard,
/// then puts them back where they were, so the caller's random stream is left
/// exactly as if the replayed computation had never run.
class ForkedRngGuard {
 public:
  ForkedRngGuard(const RngState& replay, const c10::Device& device) {
    if (!replay.empty()) {
      current_ = RngState::capture(device);
      replay.restore();
    }
  }
  ~ForkedRngGuard() {
    current_.restore();
  }
  ForkedRngGuard(const ForkedRngGuard&) = delete;
  ForkedRngGuard& operator=(const ForkedRngGuard&) = delete;

 private:
  RngState current_;
};

} // namespace detail
} // namespace torchrev
