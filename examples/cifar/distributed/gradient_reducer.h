#pragma once

/// Data-parallel gradient averaging while backward runs, like the reducer of
/// `torch.nn.parallel.DistributedDataParallel`: a hook on every parameter
/// copies its gradient into a flat bucket, and a full bucket starts its
/// allreduce at once.

#include "communicator.h"
#include "compat.h"

#include <torch/nn/module.h>
#include <torch/types.h>
#include <torch/utils.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

namespace cifar {

namespace detail {

/// Shared state of a GradientReducer: the gradient buckets and what this
/// backward has reported. Hooks hold it through a weak_ptr, so a hook that
/// fires after its reducer is gone does nothing.
struct ReducerState {
  struct Bucket {
    std::vector<size_t> params; // indices into ReducerState::params
    std::vector<int64_t> offsets; // element offset of each param in flat
    int64_t grad_numel = 0; // flat = [gradients..., one used-flag per param]
    torch::Tensor flat;
    size_t pending = 0; // parameters that have not reported yet
    bool launched = false;
    c10::intrusive_ptr<CommWork> work;
  };

  std::shared_ptr<Communicator> comm;
  std::vector<torch::Tensor> params; // requires-grad parameters (aliases)
  std::vector<std::string> names;
  std::vector<size_t> bucket_of; // param index -> bucket index
  std::vector<size_t> slot_of; // param index -> position within its bucket
  std::vector<Bucket> buckets;

  std::mutex mutex;
  bool open = false; // between prepare_backward and finish_backward
  bool any_reported = false;
  std::vector<char> reported; // per parameter, this backward
  size_t next_launch = 0; // buckets are launched strictly in index order

  /// Copies the bucket's used-flags in and starts its allreduce (SUM).
  /// Caller holds `mutex`.
  void launch_locked(size_t b) {
    Bucket& bucket = buckets[b];
    std::vector<float> flags(bucket.params.size());
    for (size_t i = 0; i < bucket.params.size(); ++i) {
      flags[i] = reported[bucket.params[i]] ? 1.0f : 0.0f;
    }
    {
      torch::NoGradGuard no_grad;
      bucket.flat
          .narrow(0, bucket.grad_numel, static_cast<int64_t>(flags.size()))
          .copy_(torch::tensor(flags));
    }
    std::vector<torch::Tensor> tensors{bucket.flat};
    bucket.work = comm->start_allreduce(tensors);
    bucket.launched = true;
  }

  /// Launches every complete bucket whose predecessors are all launched, so
  /// all ranks issue the allreduces in the same order. Caller holds `mutex`.
  void launch_ready_locked() {
    while (next_launch < buckets.size() && buckets[next_launch].pending == 0) {
      launch_locked(next_launch);
      ++next_launch;
    }
  }

  /// Gradient hook body for parameter `index`; runs on an autograd thread.
  void on_gradient(size_t index, const torch::Tensor& grad) {
    std::lock_guard<std::mutex> lock(mutex);
    if (comm->failed()) {
      return; // finish_backward reports the failure
    }
    if (!open) {
      throw std::runtime_error(
          comm->where() + "parameter " + names[index] +
          " received a gradient outside prepare_backward()/"
          "finish_backward(); run each backward of a model wrapped in "
          "cifar::DataParallel as backward(loss), or call "
          "prepare_backward() before it");
    }
    if (reported[index]) {
      throw std::runtime_error(
          comm->where() + "parameter " + names[index] +
          " produced two gradients in one backward; run each backward as "
          "backward(loss), or call prepare_backward() and finish_backward() "
          "around it");
    }
    if (grad.defined() && grad.is_sparse()) {
      throw std::runtime_error(
          comm->where() + "parameter " + names[index] +
          " has a sparse gradient, which DataParallel does not support");
    }
    reported[index] = 1;
    any_reported = true;
    Bucket& bucket = buckets[bucket_of[index]];
    const auto& param = params[index];
    {
      torch::NoGradGuard no_grad;
      auto slot =
          bucket.flat.narrow(0, bucket.offsets[slot_of[index]], param.numel())
              .view(param.sizes());
      if (grad.defined()) {
        slot.copy_(grad);
      } else {
        slot.zero_(); // an undefined gradient means zero
      }
    }
    if (--bucket.pending == 0) {
      launch_ready_locked();
    }
  }
};

} // namespace detail

/// Averages the gradients of a model's trainable parameters over the ranks
/// of a Communicator, bucket by bucket while backward is still running.
///
/// A hook on each parameter (param.register_hook) copies its gradient into
/// its bucket; when every parameter of a bucket has reported, an async
/// allreduce (SUM) of the flattened bucket starts immediately. Buckets are
/// formed in reverse parameter order (gradients arrive roughly
/// last-layer-first), capped by bucket_bytes, and are started strictly in
/// that order so all ranks issue identical collectives.
///
/// Each backward must produce fresh gradients: finish_backward overwrites
/// .grad with the average of this backward's gradients, so call
/// optimizer.zero_grad() every step (gradient accumulation across several
/// backward passes is not supported). It keeps aliases of the parameters
/// (no copy of the model) and removes its gradient hooks when destroyed.
class GradientReducer {
 public:
  /// Forms buckets of about `bucket_bytes` over `model`'s requires-grad
  /// parameters and registers their hooks. Throws for a parameter that is
  /// not a dense tensor.
  GradientReducer(
      std::shared_ptr<Communicator> comm,
      torch::nn::Module& model,
      size_t bucket_bytes)
      : state_(std::make_shared<detail::ReducerState>()) {
    state_->comm = std::move(comm);
    collect_parameters(model);
    build_buckets(bucket_bytes);
    register_hooks();
  }

  GradientReducer(const GradientReducer&) = delete;
  GradientReducer& operator=(const GradientReducer&) = delete;
  GradientReducer& operator=(GradientReducer&&) = delete;

  /// Moves the buckets and hooks; `other` is left empty.
  GradientReducer(GradientReducer&& other) noexcept
      : state_(std::move(other.state_)), hooks_(std::move(other.hooks_)) {
    other.hooks_.clear();
  }

  ~GradientReducer() {
    for (auto& hook : hooks_) {
      try {
        hook.first.remove_hook(hook.second);
      } catch (...) {
      }
    }
  }

  /// Call before each backward. A gradient that arrives without it, or a
  /// second gradient for one parameter in one backward, makes the backward
  /// throw.
  void prepare_backward() {
    auto& s = *state_;
    std::lock_guard<std::mutex> lock(s.mutex);
    s.comm->check_usable();
    if (s.open && s.any_reported) {
      throw std::runtime_error(
          s.comm->where() +
          "prepare_backward() called again before finish_backward(); "
          "call finish_backward() after every backward so all ranks "
          "issue the same collectives");
    }
    std::fill(s.reported.begin(), s.reported.end(), 0);
    for (auto& bucket : s.buckets) {
      bucket.pending = bucket.params.size();
      bucket.launched = false;
      bucket.work.reset();
    }
    s.next_launch = 0;
    s.any_reported = false;
    s.open = true;
  }

  /// Call after backward and before optimizer.step(): waits for all bucket
  /// allreduces (with the timeout; a dead peer gives a clear
  /// std::runtime_error, not a hang), divides by world size, and writes the
  /// averaged gradient into each parameter's .grad (copy_, defining .grad
  /// if needed). Parameters whose hook never fired in this backward
  /// (unused) count as zero gradient so all ranks still call the same
  /// collectives; one rank's unused parameters never cause a deadlock. A
  /// parameter unused on every rank keeps its .grad untouched, like
  /// DistributedDataParallel with find_unused_parameters.
  void finish_backward() {
    auto& s = *state_;
    std::unique_lock<std::mutex> lock(s.mutex);
    s.comm->check_usable();
    if (!s.open) {
      throw std::runtime_error(
          s.comm->where() +
          "finish_backward() called without prepare_backward()");
    }
    s.open = false;
    {
      torch::NoGradGuard no_grad;
      for (size_t b = 0; b < s.buckets.size(); ++b) {
        auto& bucket = s.buckets[b];
        if (bucket.pending == 0) {
          continue;
        }
        for (size_t i = 0; i < bucket.params.size(); ++i) {
          const size_t p = bucket.params[i];
          if (!s.reported[p]) {
            bucket.flat.narrow(0, bucket.offsets[i], s.params[p].numel())
                .zero_();
          }
        }
        bucket.pending = 0;
      }
    }
    s.launch_ready_locked();
    lock.unlock(); // hooks cannot fire any more; don't hold it while waiting

    const auto deadline = s.comm->deadline();
    const size_t count = s.buckets.size();
    for (size_t b = 0; b < count; ++b) {
      s.comm->wait(
          s.buckets[b].work,
          "allreduce of gradient bucket " + std::to_string(b + 1) + "/" +
              std::to_string(count),
          deadline);
    }

    torch::NoGradGuard no_grad;
    for (auto& bucket : s.buckets) {
      bucket.flat.div_(s.comm->world_size());
      const auto flags = bucket.flat
                             .narrow(
                                 0,
                                 bucket.grad_numel,
                                 static_cast<int64_t>(bucket.params.size()))
                             .to(torch::kCPU, torch::kFloat);
      const float* used = flags.data_ptr<float>();
      for (size_t i = 0; i < bucket.params.size(); ++i) {
        if (used[i] <= 0.0f) {
          continue; // unused on every rank
        }
        auto& param = s.params[bucket.params[i]];
        auto averaged = bucket.flat.narrow(0, bucket.offsets[i], param.numel())
                            .view(param.sizes());
        auto& grad = param.mutable_grad();
        if (grad.defined()) {
          grad.copy_(averaged);
        } else {
          grad = torch::empty_like(param).copy_(averaged);
        }
      }
      bucket.work.reset();
    }
  }

 private:
  /// Records aliases of the requires-grad parameters (each tensor once).
  void collect_parameters(torch::nn::Module& model) {
    auto& s = *state_;
    std::unordered_set<const void*> seen;
    for (const auto& item : model.named_parameters(/*recurse=*/true)) {
      const auto& param = item.value();
      if (!param.requires_grad() ||
          !seen.insert(param.unsafeGetTensorImpl()).second) {
        continue;
      }
      if (param.layout() != torch::kStrided) {
        throw std::runtime_error(
            s.comm->where() + "parameter " + item.key() +
            " is not a dense tensor; DataParallel needs dense parameters");
      }
      s.params.push_back(param);
      s.names.push_back(item.key());
    }
  }

  void build_buckets(size_t bucket_bytes) {
    auto& s = *state_;
    const size_t n = s.params.size();
    s.bucket_of.assign(n, 0);
    s.slot_of.assign(n, 0);
    s.reported.assign(n, 0);
    detail::ReducerState::Bucket current;
    size_t current_bytes = 0;
    auto close = [&] {
      if (current.params.empty()) {
        return;
      }
      const auto& first = s.params[current.params.front()];
      current.flat = torch::zeros(
          {current.grad_numel + static_cast<int64_t>(current.params.size())},
          first.options().device(s.comm->comm_device()).requires_grad(false));
      s.buckets.push_back(std::move(current));
      current = detail::ReducerState::Bucket();
      current_bytes = 0;
    };
    for (size_t k = n; k-- > 0;) { // reverse parameter order
      const auto& param = s.params[k];
      const size_t bytes = param.numel() * param.element_size();
      if (!current.params.empty()) {
        const auto& head = s.params[current.params.front()];
        if (head.scalar_type() != param.scalar_type() ||
            head.device() != param.device() ||
            current_bytes + bytes > bucket_bytes) {
          close();
        }
      }
      s.bucket_of[k] = s.buckets.size();
      s.slot_of[k] = current.params.size();
      current.params.push_back(k);
      current.offsets.push_back(current.grad_numel);
      current.grad_numel += param.numel();
      current_bytes += bytes;
    }
    close();
  }

  void register_hooks() {
    auto& s = *state_;
    std::weak_ptr<detail::ReducerState> weak = state_;
    for (size_t i = 0; i < s.params.size(); ++i) {
      auto& param = s.params[i];
      const unsigned handle =
          param.register_hook([weak, i](const torch::Tensor& grad) {
            if (auto state = weak.lock()) {
              state->on_gradient(i, grad);
            }
          });
      hooks_.emplace_back(param, handle);
    }
  }

  std::shared_ptr<detail::ReducerState> state_;
  std::vector<std::pair<torch::Tensor, unsigned>> hooks_;
};

} // namespace cifar
