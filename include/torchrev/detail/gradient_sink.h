#pragma once

// Differentiating a recomputed block with respect to its parameters, without
// running the parameters' hooks.
//
// torchrev's backward re-runs a block with grad and asks
// `torch::autograd::grad` for the gradients of its parameters, which it then
// returns from its own backward, so autograd accumulates each parameter's
// gradient once, in the outer backward, and runs its hooks there. But since
// LibTorch 2.0 (pytorch/pytorch PR 92559), a leaf's `register_hook` hooks
// also run when the leaf is among the `inputs` of `torch::autograd::grad`:
// they would fire inside the recompute with a partial gradient, and again on
// the returned one (a hook that scales or clips a gradient would be applied
// twice). LibTorch 1.13 does not do this.
//
// The engine finds a leaf's hooks through the leaf's gradient accumulator,
// the graph node every edge to the leaf points at. `GradientSinkGuard` points
// each parameter at a private `GradientSink` node instead while the block is
// recomputed and differentiated: the recomputed graph's edges lead to the
// sinks, `grad` captures the gradients there, and a sink has no hooks and is
// never run. The guard then restores the real accumulators, which the outer
// graph holds, so hooks (tensor hooks, accumulator post hooks,
// post-accumulate-grad hooks) run exactly once per backward, as with plain
// autograd, on every LibTorch version.
//
// Thread safety: a parameter's gradient accumulator is shared by every graph
// that uses it. While a guard is alive, a graph built in another thread from
// the same parameters would route their gradients to the sink, where they are
// lost; two backward passes through graphs that share parameters, run at the
// same time in two threads, would swap each other's accumulators. So while a
// backward through a stage (or a checkpoint) runs, do not run a forward or
// another backward through the same modules in another thread (the
// recompute's BatchNorm statistics freeze has the same limit; see
// `RecomputeGuard`). Sequential use, and nested stages, are safe.

#include <torch/autograd.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/types.h>

#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

namespace torchrev {
namespace detail {

/// The pointer type LibTorch uses for autograd nodes: `std::shared_ptr<Node>`
/// up to 2.12, `c10::intrusive_ptr<Node>` from 2.13. Deduced rather than
/// guarded by version, so that any release in between builds too.
using NodePtr = decltype(torch::autograd::impl::try_get_grad_accumulator(
    std::declval<const torch::autograd::Variable&>()));

/// Stands in for a parameter's gradient accumulator while a block is
/// differentiated. `torch::autograd::grad` only captures the gradient that
/// reaches it; the engine never calls `apply`.
struct GradientSink final : torch::autograd::Node {
  explicit GradientSink(const torch::Tensor& param) {
    add_input_metadata(param);
  }

  torch::autograd::variable_list apply(
      torch::autograd::variable_list&& /*grads*/) override {
    TORCH_CHECK(
        false,
        "torchrev internal error: a gradient sink was executed; gradients of "
        "a recomputed block must only be captured with autograd::grad");
  }
};

/// RAII: while alive, every graph built from `params` differentiates into
/// private sinks instead of the parameters' gradient accumulators (see the
/// file comment). Restores the accumulators when destroyed.
class GradientSinkGuard {
 public:
  explicit GradientSinkGuard(const std::vector<torch::Tensor>& params) {
    saved_.reserve(params.size());
    try {
      for (const auto& param : params) {
        auto sink = make_node<NodePtr, GradientSink>(param);
        saved_.push_back(
            {param,
             torch::autograd::impl::try_get_grad_accumulator(param),
             sink});
        torch::autograd::impl::set_grad_accumulator(param, WeakNodePtr(sink));
      }
    } catch (...) {
      restore();
      throw;
    }
  }

  ~GradientSinkGuard() {
    restore();
  }

  GradientSinkGuard(const GradientSinkGuard&) = delete;
  GradientSinkGuard& operator=(const GradientSinkGuard&) = delete;

 private:
  static constexpr bool kSharedNodes =
      std::is_same<NodePtr, std::shared_ptr<torch::autograd::Node>>::value;
  using WeakNodePtr = std::conditional_t<
      kSharedNodes,
      std::weak_ptr<torch::autograd::Node>,
      c10::weak_intrusive_ptr<torch::autograd::Node>>;

  // A template, so that only the branch for this LibTorch's pointer type is
  // instantiated.
  template <class Ptr, class Sink>
  static Ptr make_node(const torch::Tensor& param) {
    if constexpr (kSharedNodes) {
      return std::make_shared<Sink>(param);
    } else {
      return c10::make_intrusive<Sink>(param);
    }
  }

  /// Puts back each accumulator this guard replaced, last first, and only
  /// where the parameter still points at this guard's sink (a nested guard
  /// restores its own first).
  void restore() noexcept {
    for (size_t k = saved_.size(); k-- > 0;) {
      const Entry& entry = saved_[k];
      if (torch::autograd::impl::try_get_grad_accumulator(entry.param).get() ==
          entry.sink.get()) {
        torch::autograd::impl::set_grad_accumulator(
            entry.param, WeakNodePtr(entry.accumulator));
      }
    }
    saved_.clear();
  }

  struct Entry {
    torch::Tensor param;
    /// The parameter's real accumulator (null if it had none).
    NodePtr accumulator;
    /// Kept alive here: the parameter itself holds it only weakly.
    NodePtr sink;
  };
  std::vector<Entry> saved_;
};

} // namespace detail
} // namespace torchrev
