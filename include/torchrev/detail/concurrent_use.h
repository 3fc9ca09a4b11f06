#pragma once

// Detecting a stage used by two threads in a way that would lose state.
//
// While torchrev recomputes a block (in backward, or in `inverse`), it
// temporarily detaches the block's BatchNorm running statistics
// (`RecomputeGuard`) and points its parameters' gradient edges at private
// sinks (`GradientSinkGuard`). A forward through the same block in another
// thread at that moment would update no running statistics, or find them
// undefined, and its parameter gradients would go to the sinks; a second
// recompute in another thread would swap the same state back and forth.
// Plain autograd has no such state, so two threads training one model lose
// nothing there; torchrev instead raises a clear error in the second thread.
//
// `BlockUse` records, per block, which threads are running it forward
// (shared: any number of threads may) and which are recomputing it
// (exclusive: no other thread may run it at all). Nested use in one thread
// (a block inside another block's F) is always allowed.

#include <c10/util/Exception.h>

#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>

namespace torchrev {
namespace detail {

class BlockUse {
 public:
  enum class Kind { kForward, kRecompute };

  /// Marks `block` as used by this thread in `kind`, or throws if another
  /// thread's use conflicts. `where` names the block in the error.
  BlockUse(const void* block, Kind kind, const std::string& where)
      : block_(block), kind_(kind), thread_(std::this_thread::get_id()) {
    auto& r = registry();
    std::lock_guard<std::mutex> lock(r.mutex);
    auto& use = r.uses[block_];
    const bool other_recomputes = held_by_other(use.recompute);
    const bool other_forwards = held_by_other(use.forward);
    const bool conflict = kind_ == Kind::kForward
        ? other_recomputes
        : other_recomputes || other_forwards;
    if (conflict) {
      if (use.forward.empty() && use.recompute.empty()) {
        r.uses.erase(block_);
      }
      TORCH_CHECK(
          false,
          where,
          kind_ == Kind::kForward ? " cannot run forward"
                                  : " cannot be recomputed",
          ": another thread is ",
          other_recomputes ? "recomputing it (a backward or inverse)"
                           : "running its forward",
          ". While torchrev recomputes a block it detaches the block's "
          "BatchNorm running statistics and redirects its parameters' "
          "gradients, so a stage's forward and backward must not overlap "
          "with a backward through the same blocks in another thread. Train "
          "one model per thread (clone() it), or serialize the steps.");
    }
    ++(kind_ == Kind::kForward ? use.forward : use.recompute)[thread_];
  }

  ~BlockUse() {
    auto& r = registry();
    std::lock_guard<std::mutex> lock(r.mutex);
    auto it = r.uses.find(block_);
    if (it == r.uses.end()) {
      return;
    }
    auto& counts =
        kind_ == Kind::kForward ? it->second.forward : it->second.recompute;
    auto count = counts.find(thread_);
    if (count != counts.end() && --count->second == 0) {
      counts.erase(count);
    }
    if (it->second.forward.empty() && it->second.recompute.empty()) {
      r.uses.erase(it);
    }
  }

  BlockUse(const BlockUse&) = delete;
  BlockUse& operator=(const BlockUse&) = delete;

 private:
  using Counts = std::unordered_map<std::thread::id, int>;
  struct Use {
    Counts forward, recompute;
  };
  struct Registry {
    std::mutex mutex;
    std::unordered_map<const void*, Use> uses;
  };

  static Registry& registry() {
    // Never destroyed: guards may run during static destruction.
    static auto* r = new Registry();
    return *r;
  }

  bool held_by_other(const Counts& counts) const {
    for (const auto& entry : counts) {
      if (entry.first != thread_) {
        return true;
      }
    }
    return false;
  }

  const void* block_;
  Kind kind_;
  std::thread::id thread_;
};

} // namespace detail
} // namespace torchrev
