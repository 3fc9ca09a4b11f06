#pragma once

/// `DataParallel`: one object that connects the ranks, checks they built the
/// same model, broadcasts rank 0's parameters and buffers, and averages
/// gradients during backward, like `torch.nn.parallel.DistributedDataParallel`.

#include "communicator.h"
#include "gradient_reducer.h"
#include "model_check.h"
#include "options.h"
#include "rendezvous.h"

#include <torch/nn/module.h>
#include <torch/types.h>

#include <cstddef>
#include <memory>
#include <optional>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

namespace cifar {

/// Owns this rank's Communicator and GradientReducer.
///
/// Every rank must construct it with the same model architecture and make
/// the same sequence of backward, all_reduce_sum, gather_strings and
/// broadcast_buffers calls. With world_size 1 nothing is created and every
/// method is a cheap no-op.
///
/// Each backward must produce fresh gradients: it overwrites .grad with the
/// average of this backward's gradients, so call optimizer.zero_grad() every
/// step (gradient accumulation across several backward passes is not
/// supported).
class DataParallel {
 public:
  /// Rendezvous through c10d::TCPStore (rank 0 hosts it), create
  /// ProcessGroupGloo on CPU (NCCL when device is CUDA and available), check
  /// that every rank built the same model, then broadcast all parameters and
  /// buffers of `model` from rank 0. Validates options (rank in
  /// [0, world_size), port range) with clear std::runtime_error messages. A
  /// peer that never joins makes this throw within `timeout` with a message
  /// like "rank 1: timed out after 60 s waiting for 2 ranks at
  /// 127.0.0.1:29500" instead of hanging. Gradients are averaged in buckets
  /// of about `bucket_bytes` (see GradientReducer).
  DataParallel(
      const DistributedOptions& options,
      torch::nn::Module& model,
      torch::Device device,
      size_t bucket_bytes = 1 << 20)
      : rank_(options.rank), world_size_(options.world_size) {
    options.validate();
    if (!options.enabled()) {
      return;
    }
    comm_ = rendezvous(options, device);
    reducer_.emplace(comm_, model, bucket_bytes);
    check_same_model(*comm_, model);
    comm_->broadcast(
        model_state(model), "broadcast of the initial parameters and buffers");
    buffers_ = unique_buffers(model);
  }

  DataParallel(const DataParallel&) = delete;
  DataParallel& operator=(const DataParallel&) = delete;
  DataParallel& operator=(DataParallel&&) = delete;

  /// Moves the connection, the gradient hooks and the buffers; every call
  /// on `other` afterwards does nothing.
  DataParallel(DataParallel&& other) noexcept
      : rank_(other.rank_),
        world_size_(other.world_size_),
        comm_(std::move(other.comm_)),
        reducer_(std::move(other.reducer_)),
        buffers_(std::move(other.buffers_)) {
    other.comm_.reset();
    other.reducer_.reset();
    other.buffers_.clear();
  }

  ~DataParallel() = default;

  /// One backward of `loss` whose gradients arrive averaged over the ranks:
  /// `prepare_backward()`, `loss.backward()`, `finish_backward()`. Call the
  /// two halves around a backward of your own instead (several losses,
  /// `retain_graph`).
  void backward(const torch::Tensor& loss) {
    prepare_backward();
    loss.backward();
    finish_backward();
  }

  /// Call before each backward of your own. A gradient that arrives without
  /// it, or a second gradient for one parameter in one backward, makes the
  /// backward throw.
  void prepare_backward() {
    if (reducer_) {
      reducer_->prepare_backward();
    }
  }

  /// Call after each backward of your own and before optimizer.step(): see
  /// GradientReducer::finish_backward.
  void finish_backward() {
    if (reducer_) {
      reducer_->finish_backward();
    }
  }

  /// Sums `values` across ranks (for metrics); every rank receives the sums.
  std::vector<double> all_reduce_sum(std::vector<double> values) {
    return comm_ ? comm_->all_reduce_sum(std::move(values)) : values;
  }

  /// Every rank's `mine`, indexed by rank, exchanged through the rendezvous
  /// store (so it works before any collective).
  std::vector<std::string> gather_strings(const std::string& mine) {
    return comm_ ? comm_->gather_strings(mine) : std::vector<std::string>{mine};
  }

  /// Overwrites every rank's buffers (e.g. BatchNorm running statistics,
  /// which each rank otherwise updates from its own shard) with rank 0's,
  /// e.g. before evaluation or checkpointing.
  void broadcast_buffers() {
    if (comm_ && !buffers_.empty()) {
      comm_->broadcast(buffers_, "broadcast of buffers");
    }
  }

  /// This process's rank.
  int rank() const {
    return rank_;
  }

  /// Number of processes.
  int world_size() const {
    return world_size_;
  }

 private:
  /// The model's buffers, each once, without those that alias a trainable
  /// parameter (the gradient reducer already keeps those equal).
  static std::vector<torch::Tensor> unique_buffers(torch::nn::Module& model) {
    std::unordered_set<const void*> seen;
    for (const auto& p : model.parameters(/*recurse=*/true)) {
      if (p.requires_grad()) {
        seen.insert(p.unsafeGetTensorImpl());
      }
    }
    std::vector<torch::Tensor> buffers;
    for (const auto& b : model.buffers(/*recurse=*/true)) {
      if (b.defined() && seen.insert(b.unsafeGetTensorImpl()).second) {
        buffers.push_back(b);
      }
    }
    return buffers;
  }

  int rank_;
  int world_size_;
  std::shared_ptr<Communicator> comm_;
  std::optional<GradientReducer> reducer_;
  std::vector<torch::Tensor> buffers_;
};

} // namespace cifar
