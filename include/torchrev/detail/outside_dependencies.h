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
// gradient sinks.

#include <torchrev/detail/gradient_sink.h>

#include <ATen/SequenceNumber.h>
#include <ATen/record_function.h>
#include <torch/csrc/autograd/function.h>
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

/// Throws if the graph of `out`, recomputed in `scope` from the leaf `input`
/// (and from parameters whose accumulators are gradient sinks), depends on
/// any other tensor that requires grad. `where` and `what` name the
/// computation in the message, e.g. "torchrev::RevSequential block 2 (...)"
/// and "F".
inline void check_no_outside_dependencies(
    const torch::Tensor& out,
    const torch::Tensor& input,
    const RecomputeScope& scope,
    const std::string& where,
    const char* what) {
  if (!out.defined() || !out.grad_fn()) {
    return;
  }
  const torch::autograd::Node* input_accumulator = input.defined()
      ? torch::autograd::impl::try_get_grad_accumulator(input).get()
      : nullptr;
  std::vector<torch::autograd::Node*> pending{out.grad_fn().get()};
  std::unordered_set<const torch::autograd::Node*> seen{pending.front()};
  while (!pending.empty()) {
    torch::autograd::Node* node = pending.back();
    pending.pop_back();
    for (const auto& edge : node->next_edges()) {
      torch::autograd::Node* next = edge.function.get();
      if (next == nullptr || next == input_accumulator ||
          !seen.insert(next).second ||
          dynamic_cast<GradientSink*>(next) != nullptr) {
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

} // namespace detail
} // namespace torchrev
