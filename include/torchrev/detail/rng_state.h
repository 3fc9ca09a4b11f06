#pragma once

#include <ATen/Context.h>
#include <ATen/core/Generator.h>
#include <c10/core/Device.h>
#include <torch/types.h>

#include <exception>
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

  /// The default generators a computation on `device` draws from: the
  /// CPU's, and the device's own.
  static std::vector<at::Generator> generators(const c10::Device& device) {
    std::vector<at::Generator> used{at::detail::getDefaultCPUGenerator()};
    if (!device.is_cpu()) {
      used.push_back(at::globalContext().defaultGenerator(device));
    }
    return used;
  }

  /// Captures the current state of the generators used on `device`.
  static RngState capture(const c10::Device& device) {
    RngState state;
    for (auto& generator : generators(device)) {
      state.add(std::move(generator));
    }
    return state;
  }

  /// Like `capture(device)`, but returns `previous` (sharing its storage)
  /// when the generators have not moved since it was taken. A stage takes
  /// two snapshots per block, and without random draws (no dropout) they
  /// are all equal: sharing keeps their memory constant in depth (a CPU
  /// generator's state is about 5 KB).
  static RngState capture(const c10::Device& device, const RngState& previous) {
    RngState state = capture(device);
    if (state.same_as(previous)) {
      return previous;
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
  bool same_as(const RngState& other) const {
    if (generators_.size() != other.generators_.size()) {
      return false;
    }
    for (size_t k = 0; k < generators_.size(); ++k) {
      const auto& a = generators_[k];
      const auto& b = other.generators_[k];
      if (a.first != b.first || !a.second.equal(b.second)) {
        return false;
      }
    }
    return true;
  }

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
    // A destructor must not throw (it may run while an exception from the
    // replayed computation unwinds); setting a state the generator itself
    // produced does not fail in practice, but if it did, say so.
    try {
      current_.restore();
    } catch (const std::exception& e) {
      try {
        TORCH_WARN(
            "torchrev: could not restore the random generators after a "
            "recompute: ",
            e.what());
      } catch (...) { // a warning handler that throws
      }
    }
  }
  ForkedRngGuard(const ForkedRngGuard&) = delete;
  ForkedRngGuard& operator=(const ForkedRngGuard&) = delete;

 private:
  RngState current_;
};

} // namespace detail
} // namespace torchrev
