#pragma once

// The training loop of cifar_train, as a library so tests can drive it.

#include "config.h"
#include "data.h"
#include "distributed.h"
#include "files.h"
#include "progress.h"

#include <torchrev/torchrev.h>

#include <fmt/core.h>
#include <torch/torch.h>

#include <c10/core/impl/DeviceGuardImplInterface.h>

#ifdef TORCHREV_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#endif

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <limits>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

namespace cifar {

struct TrainResult {
  double test_accuracy = 0.0;
  /// Peak allocated bytes during the training steps (data set, model and
  /// optimizer included; evaluations excluded).
  size_t peak_memory_bytes = 0;
  /// Peak allocated bytes during the evaluations (0 when none ran).
  size_t eval_peak_memory_bytes = 0;
  double param_checksum = 0.0;
  int64_t steps = 0; // the step reached (counting the resumed checkpoint's)
  int64_t steps_run = 0; // steps this run executed
  std::optional<int64_t> resumed_from; // the checkpoint's step, if resumed
  std::vector<double> step_losses; // loss of every step this run executed
  double seconds = 0.0; // the whole run, evaluations and checkpoints included
  double train_seconds = 0.0; // the training steps alone
  double train_images_per_s = 0.0; // of the training steps, all ranks
  /// The signal (SIGINT, SIGTERM) that stopped the run at a step boundary,
  /// -1 when another rank's did, 0 when none did.
  int stopped_by_signal = 0;
};

/// One number identifying the parameters: a position-weighted sum in float64.
inline double param_checksum(const torch::nn::Module& model) {
  double sum = 0.0;
  int64_t k = 0;
  for (const auto& p : model.parameters()) {
    auto flat = p.detach().to(torch::kCPU, torch::kFloat64).flatten();
    auto weights = torch::arange(flat.numel(), torch::kFloat64)
                       .remainder_(97)
                       .add_(1.0 + k);
    sum += (flat * weights).sum().item<double>();
    ++k;
  }
  return sum;
}

namespace detail {

/// The first non-empty line of an error message, trimmed (LibTorch appends
/// backtraces, and some messages start with a newline).
inline std::string first_line_of(const std::string& message) {
  size_t begin = 0;
  while (begin < message.size()) {
    size_t end = message.find('\n', begin);
    if (end == std::string::npos) {
      end = message.size();
    }
    const size_t first = message.find_first_not_of(" \t\r", begin);
    if (first != std::string::npos && first < end) {
      size_t last = end;
      while (last > first &&
             std::isspace(static_cast<unsigned char>(message[last - 1]))) {
        --last;
      }
      return message.substr(first, last - first);
    }
    begin = end + 1;
  }
  return "(no message)";
}

inline std::string csv_header() {
  return "step,epoch,loss,train_acc,test_acc,lr,images_per_s,peak_memory_bytes";
}

} // namespace detail

/// A training run: set up with `TrainConfig`, then `run()`.
class Trainer {
 public:
  explicit Trainer(TrainConfig config) : config_(std::move(config)) {
    validate();
    if (config_.optimizer == OptimizerKind::kAuto) {
      config_.optimizer = torchrev::models::is_transformer(config_.model)
          ? OptimizerKind::kAdamW
          : OptimizerKind::kSgd;
    }
    if (config_.lr == 0.0) {
      config_.lr = config_.optimizer == OptimizerKind::kAdamW ? 2e-3 : 0.1;
    }
    if (config_.threads > 0) {
      torch::set_num_threads(config_.threads);
    }
    device_ = torch::Device(torch::kCPU);
    if (config_.device == torch::kCUDA) {
      if (!torch::cuda::is_available()) {
        throw std::invalid_argument(
            "--device cuda: no CUDA device is available");
      }
      // One device per rank on a machine: the launcher's LOCAL_RANK.
      const int local_rank = config_.distributed.local_rank;
      // A count (c10::DeviceIndex, a signed char on LibTorch 2.x), not a
      // character.
      const auto devices = static_cast<int>(
          torch::cuda::device_count()); // NOLINT(bugprone-signed-char-misuse)
      if (local_rank >= devices) {
        throw std::invalid_argument(fmt::format(
            "--device cuda: local rank {} needs CUDA device {}, but this "
            "machine has {} (start at most {} ranks per machine)",
            local_rank,
            local_rank,
            devices,
            devices));
      }
      device_ = torch::Device(
          torch::kCUDA, static_cast<c10::DeviceIndex>(local_rank));
      // Also the current device, which streams, contexts and NCCL use when
      // no tensor names one: otherwise every rank would also open GPU 0.
      c10::impl::getDeviceGuardImpl(device_.type())->setDevice(device_);
    }
    dataset_ = load_dataset(config_.dataset, config_.data_dir);
    augment_ = config_.augment == Augment::kOn ||
        (config_.augment == Augment::kAuto && dataset_.name != "fashion-mnist");
    torch::manual_seed(config_.seed);
    model_ = torchrev::models::create(
        config_.model,
        torchrev::models::ZooOptions()
            .in_channels(dataset_.channels())
            .num_classes(dataset_.num_classes)
            .image_size(dataset_.image_size()));
    model_->to(device_);
    if (config_.channels_last) {
      torchrev::models::use_channels_last(*model_);
    }
    if (config_.optimizer == OptimizerKind::kAdamW) {
      optimizer_ = std::make_unique<torch::optim::AdamW>(
          model_->parameters(),
          torch::optim::AdamWOptions(config_.lr)
              .weight_decay(config_.weight_decay));
    } else {
      optimizer_ = std::make_unique<torch::optim::SGD>(
          model_->parameters(),
          torch::optim::SGDOptions(config_.lr)
              .momentum(config_.momentum)
              .weight_decay(config_.weight_decay));
    }

    const int world = config_.distributed.world_size;
    const int64_t shard = (dataset_.train.size() + world - 1) / world;
    steps_per_epoch_ = shard / config_.batch_size;
    if (steps_per_epoch_ == 0) {
      throw std::invalid_argument(fmt::format(
          "--batch-size {} is larger than the {} training images per rank",
          config_.batch_size,
          shard));
    }
    total_steps_ = config_.max_steps;
    if (config_.epochs > 0) {
      if (config_.epochs >
          std::numeric_limits<int64_t>::max() / steps_per_epoch_) {
        throw std::invalid_argument(fmt::format(
            "--epochs {}: too many ({} steps each would overflow the step "
            "count)",
            config_.epochs,
            steps_per_epoch_));
      }
      const int64_t by_epochs = config_.epochs * steps_per_epoch_;
      total_steps_ =
          total_steps_ > 0 ? std::min(total_steps_, by_epochs) : by_epochs;
    }
    if (total_steps_ == 0) {
      total_steps_ = kDefaultSteps;
    }
    // Writers killed mid-write (SIGKILL, power loss) leave their temporary
    // files behind; the next run removes them.
    for (const auto* path : {&config_.checkpoint, &config_.metrics}) {
      if (!path->empty() && is_main_rank()) {
        remove_stale_temporaries(*path);
      }
    }
    if (config_.resume ||
        (config_.resume_if_exists &&
         std::filesystem::exists(config_.checkpoint))) {
      load_checkpoint();
    }
    if (config_.distributed.enabled()) {
      // After loading: every rank starts from rank 0's parameters.
      parallel_ =
          std::make_unique<DataParallel>(config_.distributed, *model_, device_);
      check_same_settings_on_all_ranks();
    }
  }

  const Dataset& dataset() const {
    return dataset_;
  }
  /// The run's configuration, defaults resolved (`optimizer`, `lr`).
  const TrainConfig& config() const {
    return config_;
  }

  std::shared_ptr<torchrev::models::ImageClassifier> model() const {
    return model_;
  }
  int64_t total_steps() const {
    return total_steps_;
  }
  int64_t steps_per_epoch() const {
    return steps_per_epoch_;
  }
  bool is_main_rank() const {
    return config_.distributed.rank == 0;
  }

  /// Trains until total_steps (or stop_after), evaluates, returns results.
  TrainResult run() {
    TrainResult result;
    result.resumed_from = resumed_from_;
    const int64_t first_step = step_;
    // Peak memory of the training steps (the data set and model included);
    // evaluations are measured apart (see evaluate_measured).
    reset_peak_memory();
    const auto start = std::chrono::steady_clock::now();
    double train_seconds = 0.0; // training steps only
    const int64_t log_every = config_.log_every > 0
        ? config_.log_every
        : std::max<int64_t>(1, total_steps_ / 20);
    Progress progress(total_steps_, step_, config_.quiet || !is_main_rank());
    model_->train();

    double window_loss = 0.0, window_seconds = 0.0;
    int64_t window_correct = 0, window_seen = 0, window_steps = 0;
    const int64_t last = config_.stop_after > 0
        ? std::min(total_steps_, config_.stop_after)
        : total_steps_;
    for (int64_t step = step_; step < last; ++step) {
      if (stop_requested()) {
        result.stopped_by_signal = stop_signal().load();
        break;
      }
      const auto step_start = std::chrono::steady_clock::now();
      const int64_t epoch = step / steps_per_epoch_;
      const double lr = learning_rate(config_, step, total_steps_);
      for (auto& group : optimizer_->param_groups()) {
        group.options().set_lr(lr);
      }
      auto [images, labels] = train_batch(step);
      detail::zero_grad_in_place(*optimizer_);
      auto logits = model_->forward(images);
      auto loss = torch::nn::functional::cross_entropy(logits, labels);
      if (parallel_) {
        parallel_->backward(loss);
      } else {
        loss.backward();
      }
      optimizer_->step();

      const auto loss_value = loss.item<double>();
      result.step_losses.push_back(loss_value);
      window_loss += loss_value;
      window_correct += logits.argmax(1).eq(labels).sum().item<int64_t>();
      window_seen += labels.size(0);
      ++window_steps;
      step_ = step + 1;
      const double seconds = std::chrono::duration<double>(
                                 std::chrono::steady_clock::now() - step_start)
                                 .count();
      window_seconds += seconds;
      train_seconds += seconds;

      const bool log_now = step_ % log_every == 0 || step_ == last;
      const bool eval_now = step_ == total_steps_ ||
          (config_.eval_every > 0 && step_ % config_.eval_every == 0);
      double test_acc = -1.0;
      if (eval_now) {
        test_acc = evaluate_measured(); // collective: every rank
      }
      // Throughput of the training steps alone (no evaluation, no I/O).
      const double ips = double(window_seen) * config_.distributed.world_size /
          std::max(window_seconds, 1e-9);
      const double mean_loss = window_loss / double(window_steps);
      const double train_acc = double(window_correct) / double(window_seen);
      progress.update(
          step_, epoch, mean_loss, train_acc, ips, test_acc, log_now);
      if (log_now || eval_now) {
        rows_.push_back(
            Row{step_,
                epoch,
                mean_loss,
                train_acc,
                test_acc,
                lr,
                ips,
                train_peak_memory()});
        window_loss = window_seconds = 0.0;
        window_correct = window_seen = window_steps = 0;
        if (is_main_rank() && !config_.metrics.empty() && eval_now) {
          write_metrics();
        }
      }
      const bool checkpoint_now = !config_.checkpoint.empty() &&
          (config_.checkpoint_every > 0 ? step_ % config_.checkpoint_every == 0
                                        : eval_now);
      if (checkpoint_now && is_main_rank()) {
        save_checkpoint();
      }
    }
    progress.finish();
    result.peak_memory_bytes = train_peak_memory();
    if (is_main_rank() && !config_.metrics.empty()) {
      write_metrics();
    }
    if (step_ == total_steps_) { // evaluate() is collective
      result.test_accuracy =
          last_test_accuracy_ ? *last_test_accuracy_ : evaluate_measured();
    }
    // A run stopped by --stop-after behaves as if killed: no final save. One
    // stopped by a signal saves the last completed step, when checkpoints
    // were asked for.
    if (!config_.checkpoint.empty() && is_main_rank() &&
        (step_ == total_steps_ || result.stopped_by_signal != 0)) {
      save_checkpoint();
    }
    result.steps = step_;
    result.steps_run = step_ - first_step;
    result.eval_peak_memory_bytes = eval_peak_;
    result.param_checksum = param_checksum(*model_);
    result.train_seconds = train_seconds;
    result.train_images_per_s = train_seconds > 0
        ? double(result.steps_run * config_.batch_size) *
            config_.distributed.world_size / train_seconds
        : 0.0;
    result.seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
            .count();
    return result;
  }

  /// Refuses to train when another rank was started with other settings
  /// (a rank with another --lr or --seed would silently train something
  /// else): every rank compares all ranks' settings and names the flag.
  void check_same_settings_on_all_ranks() {
    auto mine = run_settings();
    mine.emplace_back("--model", config_.model);
    mine.emplace_back("--dataset", dataset_.name);
    mine.emplace_back("--steps", std::to_string(total_steps_));
    // Ranks that resumed different checkpoints (or one none: files not shared
    // between machines) would train apart.
    mine.emplace_back(
        "resumed-from-step",
        resumed_from_ ? std::to_string(*resumed_from_) : "-1");
    const auto all = parallel_->gather_strings(encode_settings(mine));
    for (size_t r = 0; r < all.size(); ++r) {
      const auto d = first_difference(all[r], mine);
      if (d && d->flag == "resumed-from-step") {
        auto resumed = [](const std::string& step) {
          return step == "-1" ? std::string("did not resume (no checkpoint)")
                              : "resumed from step " + step;
        };
        throw std::runtime_error(fmt::format(
            "rank {}: rank {} {}, but this rank {}; every rank must read the "
            "same --checkpoint file (a shared file system, or a copy on each "
            "machine)",
            config_.distributed.rank,
            r,
            resumed(d->theirs),
            resumed(d->ours)));
      }
      if (d) {
        throw std::runtime_error(fmt::format(
            "rank {}: rank {} was started with {} {}, but this rank has "
            "{} {}; start every rank with the same settings",
            config_.distributed.rank,
            r,
            d->flag,
            d->theirs,
            d->flag,
            d->ours));
      }
    }
  }

  /// Set by a SIGINT/SIGTERM handler (see main.cpp): the signal number, or
  /// 0. `run()` stops at the next step boundary; with several ranks, all
  /// stop at the same one.
  static std::atomic<int>& stop_signal() {
    static std::atomic<int> signal{0};
    return signal;
  }

  /// The resumed checkpoint's step; none when this run started afresh.
  std::optional<int64_t> resumed_from() const {
    return resumed_from_;
  }

  /// Accuracy over the whole test set. With several ranks it is collective:
  /// every rank evaluates its contiguous share of the test set with rank 0's
  /// buffers (BatchNorm statistics), and the counts are summed, so the result
  /// is rank 0's model on the whole test set, computed world_size times
  /// faster, and no rank waits idle in the next collective meanwhile.
  double evaluate() {
    torch::NoGradGuard no_grad;
    const auto& test = dataset_.test;
    const int world = config_.distributed.world_size;
    const int rank = config_.distributed.rank;
    if (parallel_) {
      parallel_->broadcast_buffers();
    }
    model_->eval();
    int64_t correct = 0;
    const auto [first, end] = eval_shard(test.size(), rank, world);
    constexpr int64_t kEvalBatch = 500;
    for (int64_t begin = first; begin < end; begin += kEvalBatch) {
      const int64_t n = std::min(kEvalBatch, end - begin);
      auto indices = torch::arange(begin, begin + n, torch::kInt64);
      auto images =
          to_device(make_batch(dataset_, test, indices, false, nullptr));
      auto labels = test.labels.narrow(0, begin, n).to(device_);
      correct +=
          model_->forward(images).argmax(1).eq(labels).sum().item<int64_t>();
    }
    model_->train();
    if (parallel_) {
      correct = static_cast<int64_t>(
          parallel_->all_reduce_sum({static_cast<double>(correct)})[0]);
    }
    last_test_accuracy_ = double(correct) / double(test.size());
    return *last_test_accuracy_;
  }

  /// The test images [first, end) that `rank` of `world` evaluates:
  /// contiguous, disjoint, together all `n`.
  static std::pair<int64_t, int64_t> eval_shard(
      int64_t n,
      int rank,
      int world) {
    return {n * rank / world, n * (rank + 1) / world};
  }

 private:
  /// Whether to stop before the next step: a signal arrived here or, with
  /// several ranks, at any rank (one small all-reduce a step, so that every
  /// rank stops at the same step boundary and none waits in a collective).
  bool stop_requested() {
    double stop = stop_signal().load() != 0 ? 1.0 : 0.0;
    if (parallel_) {
      stop = parallel_->all_reduce_sum({stop})[0];
    }
    if (stop > 0 && stop_signal().load() == 0) {
      stop_signal().store(-1); // a peer's signal
    }
    return stop > 0;
  }

  /// evaluate(), with its memory peak kept apart from training's.
  double evaluate_measured() {
    train_peak_ = std::max(train_peak_, peak_memory());
    reset_peak_memory();
    const double accuracy = evaluate();
    eval_peak_ = std::max(eval_peak_, peak_memory());
    reset_peak_memory();
    return accuracy;
  }

  /// The peak of the training steps so far.
  size_t train_peak_memory() const {
    return std::max(train_peak_, peak_memory());
  }

  struct Row {
    int64_t step, epoch;
    double loss, train_acc, test_acc, lr, images_per_s;
    size_t peak_memory;
  };

  void validate() const {
    auto fail = [](const std::string& message) {
      throw std::invalid_argument(message);
    };
    const auto names = torchrev::models::model_names();
    if (std::find(names.begin(), names.end(), config_.model) == names.end()) {
      std::string valid;
      for (const auto& n : names) {
        valid += (valid.empty() ? "" : ", ") + n;
      }
      fail(
          "--model " + config_.model + ": unknown model; expected one of " +
          valid);
    }
    // The command line can only spell the enums' values; a program can cast.
    auto choice = [&](const char* flag, auto value) {
      if (!is_choice(value)) {
        fail(fmt::format(
            "{} {}: not one of the flag's values",
            flag,
            static_cast<int>(value)));
      }
    };
    choice("--optimizer", config_.optimizer);
    choice("--schedule", config_.schedule);
    choice("--device", config_.device);
    choice("--augment", config_.augment);
    // Each numeric flag, with the value that arrived.
    auto positive = [&](const char* flag, int64_t value) {
      if (value <= 0) {
        fail(fmt::format("{} {}: expected a positive number", flag, value));
      }
    };
    auto non_negative = [&](const char* flag, int64_t value) {
      if (value < 0) {
        fail(fmt::format("{} {}: expected 0 or more", flag, value));
      }
    };
    positive("--batch-size", config_.batch_size);
    non_negative("--epochs", config_.epochs);
    non_negative("--max-steps", config_.max_steps);
    non_negative("--eval-every", config_.eval_every);
    non_negative("--log-every", config_.log_every);
    non_negative("--checkpoint-every", config_.checkpoint_every);
    non_negative("--stop-after", config_.stop_after);
    non_negative("--threads", config_.threads);
    if (!std::isfinite(config_.lr) || config_.lr < 0.0) {
      fail(fmt::format(
          "--lr {}: expected a finite positive number (or 0: 0.1 for SGD, "
          "0.002 for AdamW)",
          config_.lr));
    }
    if (!std::isfinite(config_.momentum) || config_.momentum < 0.0) {
      fail(fmt::format(
          "--momentum {}: expected a finite number >= 0", config_.momentum));
    }
    if (!std::isfinite(config_.weight_decay) || config_.weight_decay < 0.0) {
      fail(fmt::format(
          "--weight-decay {}: expected a finite number >= 0",
          config_.weight_decay));
    }
    const auto& dist = config_.distributed;
    if (dist.world_size < 1) {
      fail(fmt::format(
          "--world-size {}: expected 1 or more processes", dist.world_size));
    }
    if (dist.rank < 0 || dist.rank >= dist.world_size) {
      fail(fmt::format(
          "--rank {}: expected a rank in [0, {})", dist.rank, dist.world_size));
    }
    if ((config_.dataset == "cifar10" || config_.dataset == "cifar100") &&
        config_.data_dir.empty()) {
      fail(
          "--dataset " + config_.dataset +
          " needs --data-dir (the folder "
          "with the binary files; nothing is downloaded)");
    }
    for (const auto& [flag, path] :
         {std::pair<std::string, std::string>{"--metrics", config_.metrics},
          {"--checkpoint", config_.checkpoint}}) {
      if (path.empty()) {
        continue;
      }
      if (std::filesystem::is_directory(path)) {
        fail(fmt::format(
            "{} {}: is a directory; expected a file name", flag, path));
      }
      auto dir = std::filesystem::absolute(path).parent_path();
      if (!std::filesystem::is_directory(dir) ||
          ::access(dir.c_str(), W_OK) != 0) {
        fail(fmt::format(
            "{} {}: cannot write into {}", flag, path, dir.string()));
      }
    }
    if (config_.resume && config_.resume_if_exists) {
      fail("--resume and --resume-if-exists: give one of them");
    }
    if (config_.resume && config_.checkpoint.empty()) {
      fail("--resume needs --checkpoint FILE");
    }
    if (config_.resume_if_exists && config_.checkpoint.empty()) {
      fail("--resume-if-exists needs --checkpoint FILE");
    }
    if (config_.resume && !std::filesystem::exists(config_.checkpoint)) {
      fail("--resume: checkpoint " + config_.checkpoint + " does not exist");
    }
  }

  std::pair<torch::Tensor, torch::Tensor> train_batch(int64_t step) {
    const int64_t epoch = step / steps_per_epoch_;
    if (epoch != order_epoch_) {
      order_ = shard_indices(
          dataset_.train.size(),
          epoch,
          config_.seed,
          config_.distributed.rank,
          config_.distributed.world_size);
      order_epoch_ = epoch;
    }
    const int64_t position = step % steps_per_epoch_;
    auto indices = torch::from_blob(
                       order_.data() + position * config_.batch_size,
                       {config_.batch_size},
                       torch::kInt64)
                       .clone();
    // Augmentation draws from a generator seeded by (seed, step, rank) only,
    // so a resumed run sees exactly the same batches.
    auto generator = at::make_generator<at::CPUGeneratorImpl>(
        config_.seed * 1000003ULL + uint64_t(step) * 131ULL +
        uint64_t(config_.distributed.rank));
    auto images =
        make_batch(dataset_, dataset_.train, indices, augment_, &generator);
    auto labels = dataset_.train.labels.index_select(0, indices);
    return {to_device(images), labels.to(device_)};
  }

  torch::Tensor to_device(const torch::Tensor& images) const {
    return images.to(device_).contiguous(
        config_.channels_last ? torch::MemoryFormat::ChannelsLast
                              : torch::MemoryFormat::Contiguous);
  }

  void reset_peak_memory() const {
#ifdef TORCHREV_CUDA
    if (device_.is_cuda()) {
      c10::cuda::CUDACachingAllocator::resetPeakStats(
          device_.index() < 0 ? 0 : device_.index());
      return;
    }
#endif
    torchrev::CPUMemoryMeter::instance().reset_peak();
  }

  /// The allocator's peak since the last reset_peak_memory().
  size_t peak_memory() const {
#ifdef TORCHREV_CUDA
    // The caching allocator's peak, as memory_bench reports on CUDA.
    if (device_.is_cuda()) {
      const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(
          device_.index() < 0 ? 0 : device_.index());
      return static_cast<size_t>(stats.allocated_bytes[0].peak);
    }
#endif
    return torchrev::CPUMemoryMeter::instance().peak_bytes();
  }

  void write_metrics() const {
    std::string csv = detail::csv_header() + "\n";
    for (const auto& r : rows_) {
      csv += fmt::format(
          "{},{},{:.9g},{:.6f},{},{:.6g},{:.1f},{}\n",
          r.step,
          r.epoch,
          r.loss,
          r.train_acc,
          r.test_acc >= 0 ? fmt::format("{:.6f}", r.test_acc) : "",
          r.lr,
          r.images_per_s,
          r.peak_memory);
    }
    write_file_atomically(config_.metrics, csv);
  }

  /// The settings a resumed run must share with its checkpoint to continue
  /// the same run, as (flag, value) pairs; --epochs, --max-steps and
  /// --batch-size are also covered by the step count.
  std::vector<std::pair<std::string, std::string>> run_settings() const {
    return {
        {"--batch-size", std::to_string(config_.batch_size)},
        {"--seed", std::to_string(config_.seed)},
        {"--optimizer", name_of(config_.optimizer)},
        {"--lr", fmt::format("{:.17g}", config_.lr)},
        {"--schedule", name_of(config_.schedule)},
        {"--momentum", fmt::format("{:.17g}", config_.momentum)},
        {"--weight-decay", fmt::format("{:.17g}", config_.weight_decay)},
        {"--augment", name_of(augment_ ? Augment::kOn : Augment::kOff)},
        {"--world-size", std::to_string(config_.distributed.world_size)},
    };
  }

  /// A setting whose value differs between two runs.
  struct SettingDifference {
    std::string flag, theirs, ours;
  };

  /// Compares `encoded` (encode_settings' format) with `ours`: the first
  /// flag in `encoded` whose value differs, if any. `matched`, when given,
  /// counts the flags of `encoded` found in `ours` with the same value.
  static std::optional<SettingDifference> first_difference(
      const std::string& encoded,
      const std::vector<std::pair<std::string, std::string>>& ours,
      size_t* matched = nullptr) {
    std::istringstream theirs(encoded);
    std::string flag, value;
    while (theirs >> flag >> value) {
      for (const auto& [f, v] : ours) {
        if (f != flag) {
          continue;
        }
        if (v != value) {
          return SettingDifference{flag, value, v};
        }
        if (matched != nullptr) {
          ++*matched;
        }
      }
    }
    return std::nullopt;
  }

  static std::string encode_settings(
      const std::vector<std::pair<std::string, std::string>>& settings) {
    std::string out;
    for (const auto& [flag, value] : settings) {
      out += fmt::format("{} {}\n", flag, value);
    }
    return out;
  }

  /// The whole checkpoint, serialized in memory and sealed (files.h), so
  /// that writing it is one checked write and reading it starts with an
  /// integrity check.
  std::string checkpoint_bytes() const {
    torch::serialize::OutputArchive archive;
    torch::serialize::OutputArchive model_archive, optimizer_archive;
    model_->save(model_archive);
    optimizer_->save(optimizer_archive);
    archive.write("model", model_archive);
    archive.write("optimizer", optimizer_archive);
    archive.write("model_name", c10::IValue(config_.model));
    archive.write("dataset", c10::IValue(dataset_.name));
    archive.write("step", c10::IValue(step_));
    archive.write("total_steps", c10::IValue(total_steps_));
    archive.write("settings", c10::IValue(encode_settings(run_settings())));
    const at::Generator& generator = at::detail::getDefaultCPUGenerator();
    archive.write("rng", generator.get_state());
    std::string rows;
    for (const auto& r : rows_) {
      rows += fmt::format(
          "{} {} {:.17g} {:.17g} {:.17g} {:.17g} {:.17g} {}\n",
          r.step,
          r.epoch,
          r.loss,
          r.train_acc,
          r.test_acc,
          r.lr,
          r.images_per_s,
          r.peak_memory);
    }
    archive.write("metrics", c10::IValue(rows));
    std::string payload;
    archive.save_to([&payload](const void* data, size_t size) -> size_t {
      payload.append(static_cast<const char*>(data), size);
      return size;
    });
    return seal(payload);
  }

  void save_checkpoint() {
    // The serialized copy is I/O, not training: kept out of the peak.
    train_peak_ = std::max(train_peak_, peak_memory());
    write_file_atomically(config_.checkpoint, checkpoint_bytes());
    reset_peak_memory();
  }

  void load_checkpoint() {
    const std::string& path = config_.checkpoint;
    auto fail = [&](const std::string& what) {
      throw std::runtime_error("checkpoint " + path + ": " + what);
    };
    // Nothing parses the file before its integrity is established.
    const std::string sealed = read_file_bytes(path);
    std::string_view payload;
    try {
      payload = unseal(sealed, path);
    } catch (const FileError& e) {
      throw std::runtime_error(
          std::string("cannot read checkpoint ") + e.what() +
          "; nothing was loaded");
    }
    torch::serialize::InputArchive archive;
    try {
      archive.load_from(payload.data(), payload.size());
    } catch (const c10::Error&) {
      fail(
          "cannot read: not a cifar_train checkpoint (no LibTorch archive "
          "inside)");
    }
    // Every field, checked for presence and type before it is used.
    auto field = [&](const char* name,
                     bool (c10::IValue::*is)() const,
                     const char* kind) {
      c10::IValue value;
      if (!archive.try_read(name, value) || !(value.*is)()) {
        fail(fmt::format(
            "field '{}' is missing or not {} (not a cifar_train checkpoint "
            "of this version)",
            name,
            kind));
      }
      return value;
    };
    const auto model_name =
        field("model_name", &c10::IValue::isString, "a string");
    const auto dataset_name =
        field("dataset", &c10::IValue::isString, "a string");
    const int64_t step =
        field("step", &c10::IValue::isInt, "an integer").toInt();
    const int64_t total =
        field("total_steps", &c10::IValue::isInt, "an integer").toInt();
    const auto settings = field("settings", &c10::IValue::isString, "a string");
    const auto metrics = field("metrics", &c10::IValue::isString, "a string");
    if (model_name.toStringRef() != config_.model) {
      fail(
          "holds model " + model_name.toStringRef() + ", but --model is " +
          config_.model);
    }
    if (dataset_name.toStringRef() != dataset_.name) {
      fail(
          "was trained on " + dataset_name.toStringRef() +
          ", but this run uses " + dataset_.name);
    }
    if (total != total_steps_) {
      fail(fmt::format(
          "belongs to a run of {} steps, but this run has {}; resume with the "
          "same --epochs/--max-steps/--batch-size",
          total,
          total_steps_));
    }
    if (step < 0 || step > total) {
      fail(fmt::format("step {} is outside [0, {}]", step, total));
    }
    const auto current = run_settings();
    size_t matched = 0;
    if (const auto d =
            first_difference(settings.toStringRef(), current, &matched)) {
      fail(fmt::format(
          "was written with {} {}, but this run has {} {}; resume with "
          "the run's settings",
          d->flag,
          d->theirs,
          d->flag,
          d->ours));
    }
    // Checkpoints written before --optimizer existed record none: SGD.
    const bool before_optimizer_flag =
        settings.toStringRef().find("--optimizer ") == std::string::npos;
    if (before_optimizer_flag && config_.optimizer != OptimizerKind::kSgd) {
      fail(fmt::format(
          "was written with --optimizer sgd, but this run has --optimizer {}; "
          "resume with the run's settings",
          name_of(config_.optimizer)));
    }
    if (matched + (before_optimizer_flag ? 1 : 0) != current.size()) {
      fail("records incomplete settings (not a checkpoint of this version)");
    }
    torch::serialize::InputArchive model_archive, optimizer_archive;
    torch::Tensor rng;
    try {
      archive.read("model", model_archive);
      archive.read("optimizer", optimizer_archive);
      archive.read("rng", rng);
    } catch (const c10::Error&) {
      fail("the model, optimizer or random state is missing");
    }
    // A failure here ends the Trainer's construction: a half-restored model
    // is never trained.
    try {
      model_->load(model_archive);
      optimizer_->load(optimizer_archive);
      at::Generator generator = at::detail::getDefaultCPUGenerator();
      generator.set_state(rng);
    } catch (const c10::Error& e) {
      fail(
          "does not fit this model: " +
          detail::first_line_of(e.what_without_backtrace()));
    }
    std::vector<Row> rows;
    std::istringstream lines(metrics.toStringRef());
    Row r{};
    while (lines >> r.step >> r.epoch >> r.loss >> r.train_acc >> r.test_acc >>
           r.lr >> r.images_per_s >> r.peak_memory) {
      if (r.step < 1 || r.step > step) {
        fail(fmt::format(
            "metrics row for step {} outside [1, {}]", r.step, step));
      }
      rows.push_back(r);
    }
    if (!lines.eof()) {
      fail("unreadable metrics rows");
    }
    step_ = step;
    resumed_from_ = step;
    rows_ = std::move(rows);
  }

  TrainConfig config_;
  torch::Device device_{torch::kCPU};
  Dataset dataset_;
  bool augment_ = false;
  std::shared_ptr<torchrev::models::ImageClassifier> model_;
  std::unique_ptr<torch::optim::Optimizer> optimizer_;
  std::unique_ptr<DataParallel> parallel_;
  int64_t steps_per_epoch_ = 0;
  int64_t total_steps_ = 0;
  int64_t step_ = 0;
  std::vector<int64_t> order_;
  int64_t order_epoch_ = -1;
  std::vector<Row> rows_;
  std::optional<double> last_test_accuracy_; // of the latest evaluation
  std::optional<int64_t> resumed_from_; // the checkpoint's step, when resumed
  size_t train_peak_ = 0; // of the training steps, before the last reset
  size_t eval_peak_ = 0; // of the evaluations
};

} // namespace cifar
