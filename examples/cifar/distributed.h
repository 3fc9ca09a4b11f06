#pragma once

/// Multi-process data-parallel training for the CIFAR example, on c10d.
///
/// One process per rank. Rank 0 hosts a `c10d::TCPStore` at
/// MASTER_ADDR:MASTER_PORT (or, under torchrun, the launcher already hosts
/// it there), every rank joins it, and a Gloo process group
/// (NCCL for CUDA devices when LibTorch was built with it) carries the
/// collectives. `DataParallel` broadcasts rank 0's parameters and buffers,
/// then averages gradients bucket by bucket while backward is still running,
/// like `torch.nn.parallel.DistributedDataParallel`. `shard_indices` splits
/// each epoch between ranks like `torch.utils.data.DistributedSampler`.
///
/// ```
/// auto dist = cifar::DistributedOptions::from_environment();
/// cifar::DataParallel dp(dist, *model, device);
/// for (int64_t epoch = 0; epoch < epochs; ++epoch) {
///   auto indices = cifar::shard_indices(
///       train_size, epoch, seed, dp.rank(), dp.world_size());
///   for (/* each batch drawn from indices */) {
///     optimizer.zero_grad();
///     auto loss = criterion(model->forward(x), y);
///     dp.backward(loss); // loss.backward(), gradients averaged over ranks
///     optimizer.step();
///   }
/// }
/// ```
///
/// Build: link torch_cpu (the CMake `torch` target also defines
/// USE_DISTRIBUTED and USE_C10D_GLOO). Only LibTorch built with Gloo (Debian,
/// pip and the official archives are) provides the symbols used here.

#include <torch/nn/module.h>
#include <torch/optim/optimizer.h>
#include <torch/types.h>
#include <torch/utils.h>
#include <torch/version.h>

#include <ATen/CPUGeneratorImpl.h>
#include <c10/util/Exception.h>

// ProcessGroupGloo.hpp is empty unless USE_C10D_GLOO is defined; LibTorch's
// CMake package defines it, a hand-written compile line usually does not.
#ifndef USE_C10D_GLOO
#define USE_C10D_GLOO
#define CIFAR_DISTRIBUTED_DEFINED_USE_C10D_GLOO
#endif
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#ifdef CIFAR_DISTRIBUTED_DEFINED_USE_C10D_GLOO
#undef USE_C10D_GLOO
#undef CIFAR_DISTRIBUTED_DEFINED_USE_C10D_GLOO
#endif
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

// Defined (by the CMake `torch` target) only for LibTorch built with NCCL.
#ifdef USE_C10D_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#include <torch/cuda.h>
#endif

#include <algorithm>
#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <future>
#include <memory>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <unordered_set>
#include <utility>
#include <vector>

namespace cifar {

namespace detail {

// LibTorch 2.0 split ProcessGroup into a dispatching front end and Backend
// implementations (ProcessGroupGloo/NCCL derive from c10d::Backend there);
// in 1.13 they derive from c10d::ProcessGroup. Both bases expose the
// collectives used here with the same signatures.
#if TORCH_VERSION_MAJOR >= 2
using CommBackend = c10d::Backend;
#else
using CommBackend = c10d::ProcessGroup;
#endif

// 1.13 moved Work out of ProcessGroup into c10d::Work (Work.hpp); 1.12 and
// older only have the nested ProcessGroup::Work.
#if TORCH_VERSION_MAJOR == 1 && TORCH_VERSION_MINOR < 13
using CommWork = c10d::ProcessGroup::Work;
#else
using CommWork = c10d::Work;
#endif

/// Zeroes every gradient in place, keeping its memory, on every LibTorch:
/// `Optimizer::zero_grad()` does this in 1.13 but frees the gradients (sets
/// them to none) by default since 2.0, which would change measured peaks.
inline void zero_grad_in_place(torch::optim::Optimizer& optimizer) {
#if TORCH_VERSION_MAJOR >= 2
  optimizer.zero_grad(/*set_to_none=*/false);
#else
  optimizer.zero_grad();
#endif
}

/// Formats a duration in seconds without trailing zeros ("60", "2.5").
inline std::string format_seconds(std::chrono::milliseconds t) {
  std::ostringstream out;
  const auto ms = t.count();
  out << ms / 1000;
  if (ms % 1000 != 0) {
    std::string frac = std::to_string(1000 + ms % 1000).substr(1);
    while (!frac.empty() && frac.back() == '0') {
      frac.pop_back();
    }
    out << '.' << frac;
  }
  return out.str();
}

/// The first line of an exception's message, without c10's backtrace.
inline std::string short_message(const std::exception& e) {
  std::string what;
  if (const auto* c10_error = dynamic_cast<const c10::Error*>(&e)) {
    what = c10_error->what_without_backtrace();
  } else {
    what = e.what();
  }
  const auto newline = what.find('\n');
  if (newline != std::string::npos) {
    what.resize(newline);
  }
  return what;
}

/// Parses a whole decimal integer in [lo, hi] from environment variable
/// `name`; throws a one-line std::runtime_error naming it otherwise.
inline int64_t parse_env_int(
    const char* name,
    const std::string& value,
    int64_t lo,
    int64_t hi) {
  int64_t result = 0;
  size_t used = 0;
  bool ok = !value.empty();
  if (ok) {
    try {
      result = std::stoll(value, &used, 10);
    } catch (const std::exception&) {
      ok = false;
    }
  }
  if (!ok || used != value.size() || result < lo || result > hi) {
    throw std::runtime_error(
        std::string("invalid ") + name + "='" + value +
        "': expected an integer in [" + std::to_string(lo) + ", " +
        std::to_string(hi) + "]");
  }
  return result;
}

/// Shared state of a DataParallel: the communication objects and the
/// gradient buckets. Hooks hold it through a weak_ptr, so a hook that fires
/// after its DataParallel is gone does nothing.
struct DataParallelState {
  struct Bucket {
    std::vector<size_t> params; // indices into DataParallelState::params
    std::vector<int64_t> offsets; // element offset of each param in flat
    int64_t grad_numel = 0; // flat = [gradients..., one used-flag per param]
    torch::Tensor flat;
    size_t pending = 0; // parameters that have not reported yet
    bool launched = false;
    c10::intrusive_ptr<CommWork> work;
  };

  int rank = 0;
  int world_size = 1;
  std::chrono::milliseconds timeout{60000};
  torch::Device comm_device = torch::kCPU;
  c10::intrusive_ptr<c10d::Store> store;
  /// How many gather_strings calls this rank has made (keys are per call).
  int64_t gathers = 0;
  c10::intrusive_ptr<CommBackend> backend;

  std::vector<torch::Tensor> params; // requires-grad parameters (aliases)
  std::vector<torch::Tensor> buffers; // model buffers (aliases)
  std::vector<std::string> names;
  std::vector<size_t> bucket_of; // param index -> bucket index
  std::vector<size_t> slot_of; // param index -> position within its bucket
  std::vector<Bucket> buckets;

  std::mutex mutex;
  bool open = false; // between prepare_backward and finish_backward
  bool any_reported = false;
  std::vector<char> reported; // per parameter, this backward
  size_t next_launch = 0; // buckets are launched strictly in index order
  std::string failure; // non-empty once a collective failed

  std::string where() const {
    return "rank " + std::to_string(rank) + ": ";
  }

  void check_usable() const {
    if (!failure.empty()) {
      throw std::runtime_error(
          where() +
          "DataParallel is unusable after an earlier communication "
          "failure: " +
          failure);
    }
  }

  /// Waits for `work` until `deadline`; turns a timeout or a peer's failure
  /// into a std::runtime_error that says what was being done.
  void wait(
      const c10::intrusive_ptr<CommWork>& work,
      const std::string& what,
      std::chrono::steady_clock::time_point deadline) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    left = std::max(left, std::chrono::milliseconds(1));
    try {
      work->wait(left);
    } catch (const std::exception& e) {
      {
        std::lock_guard<std::mutex> lock(mutex);
        failure = what + " failed: " + short_message(e);
      }
      throw std::runtime_error(
          where() + what + " failed (timeout " + format_seconds(timeout) +
          " s; a peer may have exited, stalled or diverged): " +
          short_message(e));
    }
  }

  std::chrono::steady_clock::time_point deadline() const {
    return std::chrono::steady_clock::now() + timeout;
  }

  /// Overwrites `tensors` with rank 0's values: one broadcast per
  /// (dtype, device) group of flattened tensors.
  void broadcast(
      const std::vector<torch::Tensor>& tensors,
      const std::string& what) {
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
        parts.push_back(t.reshape({-1}).to(comm_device));
      }
      std::vector<torch::Tensor> flat{torch::cat(parts)};
      wait(backend->broadcast(flat), what, deadline());
      int64_t offset = 0;
      for (auto& t : group) {
        t.copy_(flat[0].narrow(0, offset, t.numel()).view(t.sizes()));
        offset += t.numel();
      }
    }
  }

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
    try {
      bucket.work = backend->allreduce(tensors);
    } catch (const std::exception& e) {
      failure = "allreduce launch failed: " + short_message(e);
      throw std::runtime_error(where() + failure);
    }
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
    if (!failure.empty()) {
      return; // finish_backward reports the failure
    }
    if (!open) {
      throw std::runtime_error(
          where() + "parameter " + names[index] +
          " received a gradient outside prepare_backward()/"
          "finish_backward(); run each backward of a model wrapped in "
          "cifar::DataParallel as backward(loss), or call "
          "prepare_backward() before it");
    }
    if (reported[index]) {
      throw std::runtime_error(
          where() + "parameter " + names[index] +
          " produced two gradients in one backward; run each backward as "
          "backward(loss), or call prepare_backward() and finish_backward() "
          "around it");
    }
    if (grad.defined() && grad.is_sparse()) {
      throw std::runtime_error(
          where() + "parameter " + names[index] +
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

/// Where this process sits in a multi-process run and how to rendezvous.
struct DistributedOptions {
  /// Number of processes (WORLD_SIZE env var or --world-size).
  int world_size = 1;
  /// This process's rank in [0, world_size) (RANK env var or --rank).
  int rank = 0;
  /// Address of rank 0, which hosts the TCPStore (MASTER_ADDR).
  std::string master_addr = "127.0.0.1";
  /// TCP port of the TCPStore on rank 0 (MASTER_PORT).
  int master_port = 29500;
  /// Limit for the rendezvous and for each collective.
  std::chrono::milliseconds timeout{60000};
  /// This process's index among the ranks on its machine (LOCAL_RANK, or
  /// --local-rank): the CUDA device it trains on.
  int local_rank = 0;
  /// True when a launcher already hosts the TCPStore at
  /// MASTER_ADDR:MASTER_PORT (torchrun sets TORCHELASTIC_USE_AGENT_STORE=True):
  /// then every rank, rank 0 included, connects to it as a client.
  bool launcher_hosts_store = false;
  /// How often the launcher has restarted this group
  /// (TORCHELASTIC_RESTART_COUNT). The store's keys of each attempt are kept
  /// apart, because a launcher's store outlives the attempts.
  int restart_count = 0;
  /// The launcher's run id (TORCHELASTIC_RUN_ID), empty when no elastic
  /// launcher started this process.
  std::string elastic_run_id;

  /// Fills fields from WORLD_SIZE, RANK, MASTER_ADDR, MASTER_PORT,
  /// LOCAL_RANK and torchrun's TORCHELASTIC_* variables when set (fields of
  /// unset variables keep their defaults). An invalid value throws a one-line
  /// std::runtime_error naming the variable and value.
  static DistributedOptions from_environment() {
    DistributedOptions options;
    if (const char* v = std::getenv("WORLD_SIZE")) {
      options.world_size =
          static_cast<int>(detail::parse_env_int("WORLD_SIZE", v, 1, 65535));
    }
    if (const char* v = std::getenv("RANK")) {
      options.rank =
          static_cast<int>(detail::parse_env_int("RANK", v, 0, 65534));
    }
    if (const char* v = std::getenv("MASTER_ADDR")) {
      if (*v == '\0') {
        throw std::runtime_error(
            "invalid MASTER_ADDR='': expected a host name or address");
      }
      options.master_addr = v;
    }
    if (const char* v = std::getenv("MASTER_PORT")) {
      options.master_port =
          static_cast<int>(detail::parse_env_int("MASTER_PORT", v, 1, 65535));
    }
    if (const char* v = std::getenv("LOCAL_RANK")) {
      options.local_rank =
          static_cast<int>(detail::parse_env_int("LOCAL_RANK", v, 0, 65534));
    }
    if (const char* v = std::getenv("TORCHELASTIC_USE_AGENT_STORE")) {
      // Python's torch.distributed compares with str(True) the same way.
      options.launcher_hosts_store = std::string(v) == "True";
    }
    if (const char* v = std::getenv("TORCHELASTIC_RESTART_COUNT")) {
      options.restart_count = static_cast<int>(
          detail::parse_env_int("TORCHELASTIC_RESTART_COUNT", v, 0, 1 << 30));
    }
    if (const char* v = std::getenv("TORCHELASTIC_RUN_ID")) {
      options.elastic_run_id = v;
    }
    return options;
  }

  /// True when more than one process takes part.
  bool enabled() const {
    return world_size > 1;
  }
};

/// Owns the TCPStore + process group; data-parallel gradient averaging.
///
/// Every rank must construct it with the same model architecture and call
/// the same sequence of prepare_backward/finish_backward, all_reduce_sum
/// and broadcast_buffers. It keeps aliases of the model's parameters (no copy
/// of the model) and removes its gradient hooks when destroyed. With world_size
/// 1 nothing is created and every method is a cheap no-op.
///
/// Each backward must produce fresh gradients: finish_backward overwrites
/// .grad with the average of this backward's gradients, so call
/// optimizer.zero_grad() every step (gradient accumulation across several
/// backward passes is not supported).
class DataParallel {
 public:
  /// Rendezvous through c10d::TCPStore (rank 0 hosts it), create
  /// ProcessGroupGloo on CPU (NCCL when device is CUDA and available), then
  /// broadcast all parameters and buffers of `model` from rank 0. Validates
  /// options (rank in [0, world_size), port range) with clear
  /// std::runtime_error messages. A peer that never joins makes this throw
  /// within `timeout` with a message like "rank 1: timed out after 60 s
  /// waiting for 2 ranks at 127.0.0.1:29500" instead of hanging. Gradients
  /// are averaged in buckets of about `bucket_bytes` (see prepare_backward).
  DataParallel(
      const DistributedOptions& options,
      torch::nn::Module& model,
      torch::Device device,
      size_t bucket_bytes = 1 << 20)
      : state_(std::make_shared<detail::DataParallelState>()) {
    validate(options);
    auto& s = *state_;
    s.rank = options.rank;
    s.world_size = options.world_size;
    s.timeout = options.timeout;
    if (!options.enabled()) {
      return;
    }
    rendezvous(options, device);
    collect_tensors(model);
    check_same_model(model);
    s.broadcast(
        model_state(model), "broadcast of the initial parameters and buffers");
    build_buckets(bucket_bytes);
    register_hooks();
  }

  DataParallel(const DataParallel&) = delete;
  DataParallel& operator=(const DataParallel&) = delete;
  DataParallel& operator=(DataParallel&&) = delete;

  /// Moves the process group and hooks; `other` is left empty.
  DataParallel(DataParallel&& other) noexcept
      : state_(std::move(other.state_)), hooks_(std::move(other.hooks_)) {
    other.hooks_.clear();
  }

  ~DataParallel() {
    for (auto& hook : hooks_) {
      try {
        hook.first.remove_hook(hook.second);
      } catch (...) {
      }
    }
  }

  /// One backward of `loss` whose gradients arrive averaged over the ranks:
  /// `prepare_backward()`, `loss.backward()`, `finish_backward()`. Call the
  /// two halves around a backward of your own instead (several losses,
  /// `retain_graph`).
  void backward(const torch::Tensor& loss) {
    prepare_backward();
    loss.backward();
    finish_backward();
  }

  /// Registers per-parameter gradient hooks (param.register_hook) once, at
  /// construction: when a parameter's gradient is produced during backward
  /// it is copied into its bucket; when every parameter of a bucket has
  /// reported, an async allreduce (SUM) of the flattened bucket starts
  /// immediately, while backward is still running. Buckets are formed in
  /// reverse parameter order (gradients arrive roughly last-layer-first),
  /// capped by bucket_bytes, and are started strictly in that order so all
  /// ranks issue identical collectives.
  /// Call before each backward. A gradient that arrives without it, or a
  /// second gradient for one parameter in one backward, makes the backward
  /// throw.
  void prepare_backward() {
    auto& s = *state_;
    if (s.world_size == 1) {
      return;
    }
    std::lock_guard<std::mutex> lock(s.mutex);
    s.check_usable();
    if (s.open && s.any_reported) {
      throw std::runtime_error(
          s.where() +
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
    if (s.world_size == 1) {
      return;
    }
    std::unique_lock<std::mutex> lock(s.mutex);
    s.check_usable();
    if (!s.open) {
      throw std::runtime_error(
          s.where() + "finish_backward() called without prepare_backward()");
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

    const auto deadline = s.deadline();
    const size_t count = s.buckets.size();
    for (size_t b = 0; b < count; ++b) {
      s.wait(
          s.buckets[b].work,
          "allreduce of gradient bucket " + std::to_string(b + 1) + "/" +
              std::to_string(count),
          deadline);
    }

    torch::NoGradGuard no_grad;
    for (auto& bucket : s.buckets) {
      bucket.flat.div_(s.world_size);
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

  /// All-reduce (sum) helper for metrics: sums a vector of doubles across
  /// ranks; every rank receives the sums.
  std::vector<double> all_reduce_sum(std::vector<double> values) {
    auto& s = *state_;
    if (s.world_size == 1 || values.empty()) {
      return values;
    }
    s.check_usable();
    auto tensor = torch::tensor(values, torch::kFloat64).to(s.comm_device);
    std::vector<torch::Tensor> tensors{tensor};
    s.wait(s.backend->allreduce(tensors), "all_reduce_sum", s.deadline());
    tensor = tensor.to(torch::kCPU).contiguous();
    std::copy(
        tensor.data_ptr<double>(),
        tensor.data_ptr<double>() + tensor.numel(),
        values.begin());
    return values;
  }

  /// Every rank's `mine`, indexed by rank, exchanged through the rendezvous
  /// store (so it works before any collective). Collective: all ranks must
  /// call it, in the same order relative to other `gather_strings` calls.
  std::vector<std::string> gather_strings(const std::string& mine) {
    auto& s = *state_;
    if (s.world_size == 1) {
      return {mine};
    }
    s.check_usable();
    const std::string prefix =
        "cifar_dp/gather/" + std::to_string(s.gathers++) + "/";
    s.store->set(
        prefix + std::to_string(s.rank),
        std::vector<uint8_t>(mine.begin(), mine.end()));
    std::vector<std::string> all(static_cast<size_t>(s.world_size));
    for (int r = 0; r < s.world_size; ++r) {
      if (r == s.rank) {
        all[r] = mine;
        continue;
      }
      std::vector<uint8_t> bytes;
      try {
        bytes = s.store->get(prefix + std::to_string(r));
      } catch (const std::exception&) {
        throw std::runtime_error(
            s.where() + "timed out after " + detail::format_seconds(s.timeout) +
            " s waiting for rank " + std::to_string(r) + "'s settings");
      }
      all[r].assign(bytes.begin(), bytes.end());
    }
    return all;
  }

  /// Optional: overwrites every rank's buffers (e.g. BatchNorm running
  /// statistics, which each rank otherwise updates from its own shard) with
  /// rank 0's, e.g. before evaluation or checkpointing. Collective: all
  /// ranks must call it.
  void broadcast_buffers() {
    auto& s = *state_;
    if (s.world_size == 1 || s.buffers.empty()) {
      return;
    }
    s.check_usable();
    s.broadcast(s.buffers, "broadcast of buffers");
  }

  /// This process's rank.
  int rank() const {
    return state_->rank;
  }

  /// Number of processes.
  int world_size() const {
    return state_->world_size;
  }

 private:
  static void validate(const DistributedOptions& o) {
    if (o.world_size < 1) {
      throw std::runtime_error(
          "invalid world size " + std::to_string(o.world_size) +
          ": must be >= 1");
    }
    if (o.rank < 0 || o.rank >= o.world_size) {
      throw std::runtime_error(
          "invalid rank " + std::to_string(o.rank) + ": must be in [0, " +
          std::to_string(o.world_size) + ") for world size " +
          std::to_string(o.world_size));
    }
    if (o.timeout.count() <= 0) {
      throw std::runtime_error(
          "invalid distributed timeout " + std::to_string(o.timeout.count()) +
          " ms: must be positive");
    }
    if (!o.enabled()) {
      return; // address and port are not used
    }
    if (o.master_port < 1 || o.master_port > 65535) {
      throw std::runtime_error(
          "invalid master port " + std::to_string(o.master_port) +
          ": must be in [1, 65535]");
    }
    if (o.master_addr.empty()) {
      throw std::runtime_error("invalid master address: empty");
    }
  }

  void rendezvous(const DistributedOptions& o, torch::Device device) {
    auto& s = *state_;
    const std::string endpoint =
        o.master_addr + ":" + std::to_string(o.master_port);
    const auto start = std::chrono::steady_clock::now();
    auto fail = [&](const std::exception& e) {
      const auto elapsed = std::chrono::steady_clock::now() - start;
      const std::string cause = detail::short_message(e);
      const bool timed_out = elapsed >= o.timeout * 9 / 10 ||
          cause.find("imed out") != std::string::npos ||
          cause.find("imeout") != std::string::npos;
      if (timed_out) {
        return std::runtime_error(
            s.where() + "timed out after " + detail::format_seconds(o.timeout) +
            " s waiting for " + std::to_string(o.world_size) + " ranks at " +
            endpoint + " (" + cause + ")");
      }
      return std::runtime_error(
          s.where() + "rendezvous with " + std::to_string(o.world_size) +
          " ranks at " + endpoint + " failed: " + cause);
    };

    // Joining runs on a thread of its own: a store that accepts the
    // connection but never answers (a torchrun 2.x store and a LibTorch 1.x
    // client speak different protocols) would otherwise block past every
    // timeout. The thread owns what it uses; a hung one is abandoned.
    auto joining =
        std::make_shared<std::promise<c10::intrusive_ptr<c10d::Store>>>();
    auto joined_store = joining->get_future();
    std::thread([joining, o, start] {
      try {
        c10d::TCPStoreOptions store_options;
        store_options.port = static_cast<std::uint16_t>(o.master_port);
        store_options.isServer = o.rank == 0 && !o.launcher_hosts_store;
        // TCPStore's own waitWorkers (1.13) returns silently on timeout, so
        // the ranks count themselves in below instead.
        store_options.waitWorkers = false;
        store_options.timeout = o.timeout;
        // Each attempt of a restarted group has keys of its own: a
        // launcher's store keeps the previous attempt's (its join count
        // included).
        c10::intrusive_ptr<c10d::Store> store =
            c10::make_intrusive<c10d::PrefixStore>(
                "torchrev/attempt" + std::to_string(o.restart_count),
                make_store(o.master_addr, store_options));
        const auto joined = store->add("cifar_dp/joined", 1);
        if (joined == o.world_size) {
          store->set("cifar_dp/all_joined", std::vector<uint8_t>{1});
        }
        auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
            start + o.timeout - std::chrono::steady_clock::now());
        store->wait(
            {"cifar_dp/all_joined"},
            std::max(left, std::chrono::milliseconds(1)));
        joining->set_value(std::move(store));
      } catch (...) {
        joining->set_exception(std::current_exception());
      }
    }).detach();
    // The store's own timeouts end the wait first; this is the backstop.
    if (joined_store.wait_for(o.timeout + std::chrono::seconds(5)) !=
        std::future_status::ready) {
      throw std::runtime_error(
          s.where() + "timed out after " + detail::format_seconds(o.timeout) +
          " s waiting for an answer from the store at " + endpoint +
          (o.launcher_hosts_store
               ? " (hosted by the launcher: a LibTorch 1.x build cannot use "
                 "the store of a torchrun from torch 2.x; launch "
                 "with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 so that rank 0 "
                 "hosts one)"
               : ""));
    }
    try {
      s.store = joined_store.get();
    } catch (const std::exception& e) {
      throw fail(e);
    }

#ifdef USE_C10D_NCCL
    if (device.is_cuda() && torch::cuda::is_available()) {
      try {
        auto nccl_options = c10d::ProcessGroupNCCL::Options::create();
        nccl_options->timeout = o.timeout;
        s.backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(
            s.store, o.rank, o.world_size, nccl_options);
      } catch (const std::exception& e) {
        throw fail(e);
      }
      s.comm_device = device;
      return;
    }
#endif
    try {
      auto gloo_options = c10d::ProcessGroupGloo::Options::create(o.timeout);
      gloo_options->devices.push_back(gloo_device(o.master_addr));
      s.backend = c10::make_intrusive<c10d::ProcessGroupGloo>(
          s.store, o.rank, o.world_size, gloo_options);
    } catch (const std::exception& e) {
      throw fail(e);
    }
    // Gloo reduces CUDA tensors only in CUDA builds; keep CPU otherwise.
    s.comm_device = torch::kCPU;
    (void)device;
  }

  /// A TCPStore. LibTorch 2.4 made the libuv server the default; a LibTorch
  /// built without libuv throws for it, so fall back to the classic server.
  static c10::intrusive_ptr<c10d::TCPStore> make_store(
      const std::string& host,
      c10d::TCPStoreOptions options) {
#if TORCH_VERSION_MAJOR > 2 || \
    (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)
    if (options.useLibUV) {
      try {
        return c10::make_intrusive<c10d::TCPStore>(host, options);
      } catch (const c10::Error& e) {
        const std::string what = e.what_without_backtrace();
        if (what.find("libuv") == std::string::npos &&
            what.find("libUV") == std::string::npos) {
          throw;
        }
        options.useLibUV = false;
      }
    }
#endif
    return c10::make_intrusive<c10d::TCPStore>(host, options);
  }

  /// Gloo transport device: the interface in GLOO_SOCKET_IFNAME if set, the
  /// loopback address when the master is local, else this host's address.
  static std::shared_ptr<::gloo::transport::Device> gloo_device(
      const std::string& master_addr) {
    if (const char* ifname = std::getenv("GLOO_SOCKET_IFNAME")) {
      if (*ifname != '\0') {
        return c10d::ProcessGroupGloo::createDeviceForInterface(ifname);
      }
    }
    if (master_addr == "localhost" || master_addr.rfind("127.", 0) == 0) {
      return c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1");
    }
    // Gloo's default resolves this host's name, which on many machines maps
    // to a loopback address that peers cannot reach. Use the local address
    // that routes to the master instead: what a connected UDP socket is
    // bound to (nothing is sent).
    const std::string local = local_address_towards(master_addr);
    if (!local.empty()) {
      std::fprintf(
          stderr,
          "cifar_train: gloo uses %s, the local address that routes to %s "
          "(set GLOO_SOCKET_IFNAME to choose an interface)\n",
          local.c_str(),
          master_addr.c_str());
      return c10d::ProcessGroupGloo::createDeviceForHostname(local);
    }
    return c10d::ProcessGroupGloo::createDefaultDevice();
  }

  /// This host's IPv4 address on the route to `host`, or "" when `host`
  /// does not resolve or no route leads there.
  static std::string local_address_towards(const std::string& host) {
    addrinfo hints{};
    hints.ai_family = AF_INET;
    hints.ai_socktype = SOCK_DGRAM;
    addrinfo* found = nullptr;
    if (::getaddrinfo(host.c_str(), "9", &hints, &found) != 0 ||
        found == nullptr) {
      return "";
    }
    std::string local;
    const int fd = ::socket(AF_INET, SOCK_DGRAM, 0);
    if (fd >= 0 && ::connect(fd, found->ai_addr, found->ai_addrlen) == 0) {
      sockaddr_in bound{};
      socklen_t length = sizeof(bound);
      char text[INET_ADDRSTRLEN] = {};
      if (::getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &length) ==
              0 &&
          ::inet_ntop(AF_INET, &bound.sin_addr, text, sizeof(text)) !=
              nullptr) {
        local = text;
      }
    }
    if (fd >= 0) {
      ::close(fd);
    }
    ::freeaddrinfo(found);
    return local;
  }

  /// Records aliases of the requires-grad parameters (each tensor once).
  void collect_tensors(torch::nn::Module& model) {
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
            s.where() + "parameter " + item.key() +
            " is not a dense tensor; DataParallel needs dense parameters");
      }
      s.params.push_back(param);
      s.names.push_back(item.key());
    }
    for (const auto& buffer : model.buffers(/*recurse=*/true)) {
      if (buffer.defined() &&
          seen.insert(buffer.unsafeGetTensorImpl()).second) {
        s.buffers.push_back(buffer);
      }
    }
  }

  /// Dense, deduplicated parameters and buffers to broadcast.
  static std::vector<torch::Tensor> model_state(torch::nn::Module& model) {
    std::vector<torch::Tensor> tensors;
    std::unordered_set<const void*> seen;
    auto add = [&](const torch::Tensor& t) {
      if (t.defined() && seen.insert(t.unsafeGetTensorImpl()).second) {
        tensors.push_back(t);
      }
    };
    for (const auto& p : model.parameters(/*recurse=*/true)) {
      add(p);
    }
    for (const auto& b : model.buffers(/*recurse=*/true)) {
      add(b);
    }
    return tensors;
  }

  /// Fails on every rank alike when the ranks' models differ in structure
  /// (the number, order, dtypes and shapes of parameters and buffers),
  /// before a mismatched broadcast could hang or corrupt them: rank 0's
  /// description is broadcast, each rank compares it with its own, and a sum
  /// of the verdicts tells every rank.
  void check_same_model(torch::nn::Module& model) {
    auto& s = *state_;
    // The structure as numbers, each exact in a double: the parameter
    // count, then each tensor's dtype, rank and sizes.
    std::vector<double> own{static_cast<double>(s.params.size())};
    for (const auto& t : model_state(model)) {
      own.push_back(static_cast<double>(static_cast<int>(t.scalar_type())));
      own.push_back(static_cast<double>(t.dim()));
      for (const auto size : t.sizes()) {
        own.push_back(static_cast<double>(size));
      }
    }
    const auto own_tensor = torch::tensor(own, torch::kFloat64);
    auto length =
        torch::full({1}, static_cast<double>(own.size()), torch::kFloat64);
    s.broadcast({length}, "broadcast of rank 0's model description");
    const auto rank0_length = static_cast<int64_t>(length.item<double>());
    bool differs = rank0_length != own_tensor.numel();
    auto rank0 = differs ? torch::zeros({rank0_length}, torch::kFloat64)
                         : own_tensor.clone();
    s.broadcast({rank0}, "broadcast of rank 0's model description");
    differs = differs || !torch::equal(rank0, own_tensor);
    if (all_reduce_sum({differs ? 1.0 : 0.0})[0] > 0) {
      throw std::runtime_error(
          s.where() +
          (differs ? "this rank's model differs from rank 0's"
                   : "another rank's model differs from rank 0's") +
          " (parameter/buffer count, order, shapes or dtypes); every rank "
          "must build the same model");
    }
  }

  void build_buckets(size_t bucket_bytes) {
    auto& s = *state_;
    const size_t n = s.params.size();
    s.bucket_of.assign(n, 0);
    s.slot_of.assign(n, 0);
    s.reported.assign(n, 0);
    detail::DataParallelState::Bucket current;
    size_t current_bytes = 0;
    auto close = [&] {
      if (current.params.empty()) {
        return;
      }
      const auto& first = s.params[current.params.front()];
      current.flat = torch::zeros(
          {current.grad_numel + static_cast<int64_t>(current.params.size())},
          first.options().device(s.comm_device).requires_grad(false));
      s.buckets.push_back(std::move(current));
      current = detail::DataParallelState::Bucket();
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
    std::weak_ptr<detail::DataParallelState> weak = state_;
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

  std::shared_ptr<detail::DataParallelState> state_;
  std::vector<std::pair<torch::Tensor, unsigned>> hooks_;
};

/// Disjoint per-rank shard of a shuffled epoch, like
/// torch.utils.data.DistributedSampler (drop_last=false): the permutation
/// of [0, dataset_size) depends only on (seed, epoch) (a private CPU
/// generator seeded with seed + epoch feeds randperm; the global RNG is not
/// touched), padded by wrapping so every rank gets the same count
/// ceil(n / world_size); rank r takes indices r, r + world, r + 2*world ...
/// With world_size 1 it is the full permutation. shuffle=false uses
/// 0, 1, ..., n - 1 instead of the permutation.
inline std::vector<int64_t> shard_indices(
    int64_t dataset_size,
    int64_t epoch,
    uint64_t seed,
    int rank,
    int world_size,
    bool shuffle = true) {
  if (dataset_size < 0) {
    throw std::runtime_error(
        "shard_indices: negative dataset size " + std::to_string(dataset_size));
  }
  if (world_size < 1 || rank < 0 || rank >= world_size) {
    throw std::runtime_error(
        "shard_indices: rank " + std::to_string(rank) +
        " is not in [0, world size " + std::to_string(world_size) + ")");
  }
  if (dataset_size == 0) {
    return {};
  }
  std::vector<int64_t> order(static_cast<size_t>(dataset_size));
  if (shuffle) {
    auto generator = at::make_generator<at::CPUGeneratorImpl>(
        seed + static_cast<uint64_t>(epoch));
    const auto perm = torch::randperm(
        dataset_size, generator, torch::TensorOptions().dtype(torch::kLong));
    const int64_t* data = perm.data_ptr<int64_t>();
    std::copy(data, data + dataset_size, order.begin());
  } else {
    for (int64_t i = 0; i < dataset_size; ++i) {
      order[static_cast<size_t>(i)] = i;
    }
  }
  const int64_t per_rank = (dataset_size + world_size - 1) / world_size;
  std::vector<int64_t> shard;
  shard.reserve(static_cast<size_t>(per_rank));
  for (int64_t k = 0; k < per_rank; ++k) {
    const int64_t position = rank + k * world_size; // in the padded order
    shard.push_back(order[static_cast<size_t>(position % dataset_size)]);
  }
  return shard;
}

} // namespace cifar
