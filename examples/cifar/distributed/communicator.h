#pragma once

/// A connected group of ranks: the rendezvous store and the process group
/// that carries the collectives, with a deadline on every wait.

#include "compat.h"
#include "messages.h"

#include <torch/types.h>
#include <torch/utils.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace cifar {

/// The collectives of one rank in a group that `rendezvous` connected.
///
/// Every wait ends within the group's timeout with a one-line
/// std::runtime_error that says what was being done, instead of hanging on a
/// peer that exited, stalled or diverged. After a collective has failed the
/// communicator is unusable: every later collective (broadcast,
/// all_reduce_sum, gather_strings, and check_usable before a backward)
/// throws, naming the failure. Collectives must be called by every rank in
/// the same order.
class Communicator {
 public:
  Communicator(
      int rank,
      int world_size,
      std::chrono::milliseconds timeout,
      c10::intrusive_ptr<c10d::Store> store,
      c10::intrusive_ptr<detail::CommBackend> backend,
      torch::Device comm_device)
      : rank_(rank),
        world_size_(world_size),
        timeout_(timeout),
        store_(std::move(store)),
        backend_(std::move(backend)),
        comm_device_(comm_device) {}

  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  /// This process's rank.
  int rank() const {
    return rank_;
  }

  /// Number of processes.
  int world_size() const {
    return world_size_;
  }

  /// Limit for each collective.
  std::chrono::milliseconds timeout() const {
    return timeout_;
  }

  /// The device collectives run on: the training device for NCCL, else CPU.
  torch::Device comm_device() const {
    return comm_device_;
  }

  /// "rank N: ", the start of every error message.
  std::string where() const {
    return "rank " + std::to_string(rank_) + ": ";
  }

  /// True once a collective has failed.
  bool failed() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return !failure_.empty();
  }

  /// Throws when an earlier collective failed.
  void check_usable() const {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!failure_.empty()) {
      throw std::runtime_error(
          where() +
          "DataParallel is unusable after an earlier communication "
          "failure: " +
          failure_);
    }
  }

  /// The end of a wait that starts now.
  std::chrono::steady_clock::time_point deadline() const {
    return std::chrono::steady_clock::now() + timeout_;
  }

  /// Waits for `work` until `deadline`; turns a timeout or a peer's failure
  /// into a std::runtime_error that says what was being done.
  void wait(
      const c10::intrusive_ptr<detail::CommWork>& work,
      const std::string& what,
      std::chrono::steady_clock::time_point deadline) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    left = std::max(left, std::chrono::milliseconds(1));
    try {
      work->wait(left);
    } catch (const std::exception& e) {
      record_failure(what + " failed: " + detail::short_message(e));
      throw std::runtime_error(
          where() + what + " failed (timeout " +
          detail::format_seconds(timeout_) +
          " s; a peer may have exited, stalled or diverged): " +
          detail::short_message(e));
    }
  }

  /// Starts an allreduce (SUM) of `tensors` in place and returns its work.
  c10::intrusive_ptr<detail::CommWork> start_allreduce(
      std::vector<torch::Tensor>& tensors) {
    try {
      return backend_->allreduce(tensors);
    } catch (const std::exception& e) {
      const std::string failure =
          "allreduce launch failed: " + detail::short_message(e);
      record_failure(failure);
      throw std::runtime_error(where() + failure);
    }
  }

  /// Overwrites `tensors` with rank 0's values: one broadcast per
  /// (dtype, device) group of flattened tensors.
  void broadcast(
      const std::vector<torch::Tensor>& tensors,
      const std::string& what) {
    check_usable();
    torch::NoGradGuard no_grad;
    std::vector<bool> done(tensors.size(), false);
    for (size_t first = 0; first < tensors.size(); ++first) {
      if (done[first]) {
        continue;
      }
      std::vector<torch::Tensor> group;
      for (size_t i = first; i < tensors.size(); ++i) {
        if (!done[i] &&
            tensors[i].scalar_type() == tensors[first].scalar_type() &&
            tensors[i].device() == tensors[first].device()) {
          done[i] = true;
          group.push_back(tensors[i]);
        }
      }
      std::vector<torch::Tensor> parts;
      parts.reserve(group.size());
      for (const auto& t : group) {
        parts.push_back(t.reshape({-1}).to(comm_device_));
      }
      std::vector<torch::Tensor> flat{torch::cat(parts)};
      wait(backend_->broadcast(flat), what, deadline());
      int64_t offset = 0;
      for (auto& t : group) {
        t.copy_(flat[0].narrow(0, offset, t.numel()).view(t.sizes()));
        offset += t.numel();
      }
    }
  }

  /// Sums `values` across ranks; every rank receives the sums.
  std::vector<double> all_reduce_sum(std::vector<double> values) {
    if (values.empty()) {
      return values;
    }
    check_usable();
    auto tensor = torch::tensor(values, torch::kFloat64).to(comm_device_);
    std::vector<torch::Tensor> tensors{tensor};
    wait(start_allreduce(tensors), "all_reduce_sum", deadline());
    tensor = tensor.to(torch::kCPU).contiguous();
    std::copy(
        tensor.data_ptr<double>(),
        tensor.data_ptr<double>() + tensor.numel(),
        values.begin());
    return values;
  }

  /// Every rank's `mine`, indexed by rank, exchanged through the rendezvous
  /// store (so it works before any collective).
  std::vector<std::string> gather_strings(const std::string& mine) {
    check_usable();
    const std::string prefix =
        "cifar_dp/gather/" + std::to_string(gathers_++) + "/";
    store_->set(
        prefix + std::to_string(rank_),
        std::vector<uint8_t>(mine.begin(), mine.end()));
    std::vector<std::string> all(static_cast<size_t>(world_size_));
    for (int r = 0; r < world_size_; ++r) {
      if (r == rank_) {
        all[r] = mine;
        continue;
      }
      std::vector<uint8_t> bytes;
      try {
        bytes = store_->get(prefix + std::to_string(r));
      } catch (const std::exception&) {
        throw std::runtime_error(
            where() + "timed out after " + detail::format_seconds(timeout_) +
            " s waiting for rank " + std::to_string(r) + "'s settings");
      }
      all[r].assign(bytes.begin(), bytes.end());
    }
    return all;
  }

 private:
  void record_failure(std::string failure) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (failure_.empty()) {
      failure_ = std::move(failure);
    }
  }

  int rank_;
  int world_size_;
  std::chrono::milliseconds timeout_;
  c10::intrusive_ptr<c10d::Store> store_;
  c10::intrusive_ptr<detail::CommBackend> backend_;
  torch::Device comm_device_;
  /// How many gather_strings calls this rank has made (keys are per call).
  int64_t gathers_ = 0;
  mutable std::mutex mutex_;
  std::string failure_; // the first failed collective, once there is one
};

} // namespace cifar
