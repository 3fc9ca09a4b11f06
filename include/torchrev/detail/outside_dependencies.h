#pragma once

// Finding gradients that a recompute would drop.
//
// torchrev's backward recomputes a block (or a checkpointed function) and
// differentiates it with respect to its input and its parameters only. If the
// computation also used another tensor that requires grad, for example a
// conditioning tensor computed outside the stage (FiLM), or the weight of a
// module registered elsewhere (tied weights), plain autograd would give that
// tensor a gradient and torchrev would silently not. `RecomputeScope` marks
// where a recompute starts; `check_no_outside_dependencies` then walks the
// recomputed graph and raises an error naming the block if any edge leaves it
// for something other than the recompute's input leaf or the parameters'
// gradient edges (their sinks).

#include <ATen/SequenceNumber.h>
#include <ATen/record_function.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/types.h>

#include <cstdint>
#include <string>
#include <unordered_set>
#include <vector>

namespace torchrev {
namespace detail {

/// Marks the start of a recompute on this thread: every autograd node made
/// from here on has a sequence number at least `first_sequence_nr` and this
/// thread's id (numbers are per thread).
struct RecomputeScope {
  uint64_t first_sequence_nr = at::sequence_number::peek();
  uint64_t thread_id = at::RecordFunction::currentThreadId();

  bool created_here(const torch::autograd::Node& node) const {
    // Gradient accumulators (of any leaf) are numbered UINT64_MAX.
    return node.thread_id() == thread_id &&
        node.sequence_nr() >= first_sequence_nr &&
        node.sequence_nr() != UINT64_MAX;
  }
};

/// Throws if the graph of `out`, recomputed in `scope` from the leaves `inputs`
/// and from `params` (while `sinks` stands in for their accumulators),
/// depends on any other tensor that requires grad. `where` and `what` name
/// the computation in the message, e.g. "torchrev::RevSequential block 2
/// (...)" and "F".
///
/// Only the exact nodes that the requested gradients are captured at may be
/// left: this call's sinks (not those of an enclosing recompute, whose
/// gradients this call's `grad` would not return), the gradient edge of
/// each parameter (a sink, or the grad_fn of a parameter that is not a leaf,
/// such as a data-parallel replica's), and the input's accumulator. A leaf
/// created with requires_grad inside F or G is reported too, although plain
/// autograd would accept it.
inline void check_no_outside_dependencies(
    const torch::Tensor& out,
    const std::vector<torch::Tensor>& inputs,
    const std::vector<torch::Tensor>& params,
    const RecomputeScope& scope,
    const std::string& where,
    const char* what) {
  if (!out.defined() || !out.grad_fn()) {
    return;
  }
  std::unordered_set<const torch::autograd::Node*> allowed;
  for (const auto& input : inputs) {
    if (input.defined()) {
      allowed.insert(
          torch::autograd::impl::try_get_grad_accumulator(input).get());
    }
  }
  for (const auto& p : params) {
    allowed.insert(torch::autograd::impl::gradient_edge(p).function.get());
  }
  std::vector<torch::autograd::Node*> pending{out.grad_fn().get()};
  std::unordered_set<const torch::autograd::Node*> seen{pending.front()};
  while (!pending.empty()) {
    torch::autograd::Node* node = pending.back();
    pending.pop_back();
    for (const auto& edge : node->next_edges()) {
      torch::autograd::Node* next = edge.function.get();
      if (next == nullptr || allowed.count(next) != 0 ||
          !seen.insert(next).second) {
        continue;
      }
      // An op without a derivative leaves an Error node (numbered like an
      // accumulator on 2.x); its own error says more than ours would.
      if (dynamic_cast<torch::autograd::Error*>(next) != nullptr) {
        pending.push_back(next);
        continue;
      }
      TORCH_CHECK(
          scope.created_here(*next),
          where,
          ": ",
          what,
          " uses a tensor that requires grad but is neither its input nor a "
          "parameter of the block (found through ",
          next->name(),
          "), for example a conditioning tensor computed outside the stage "
          "or the weight of a module registered elsewhere. torchrev "
          "differentiates only with respect to the block's input and its own "
          "parameters, so that tensor's gradient would be lost. Register the "
          "module inside the block, pass the tensor in as part of the stage "
          "input, or run this block with plain autograd.");
      pending.push_back(next);
    }
  }
}

/// As above, for a computation from one leaf `input`.
inline void check_no_outside_dependencies(
    const torch::Tensor& out,
    const torch::Tensor& input,
    const std::vector<torch::Tensor>& params,
    const RecomputeScope& scope,
    const std::string& where,
    const char* what) {
  check_no_outside_dependencies(
      out, std::vector<torch::Tensor>{input}, params, scope, where, what);
}

} // namespace detail
} // namespace torchrev
