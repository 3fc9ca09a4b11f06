#pragma once

// The training loop of cifar_train, as a library so tests can drive it.

#include "config.h"
#include "data.h"
#include "distributed.h"
#include "files.h"
#include "metrics.h"
#include "peak_memory.h"
#include "progress.h"
#include "settings.h"
#include "training_state.h"
#include "validation.h"

#include <torchrev/torchrev.h>

#include <fmt/core.h>
#include <torch/torch.h>

#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <limits>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#ifdef __linux__
#include <sched.h>
#endif

namespace cifar {

/// The CPUs this process may run on (its affinity mask), or
/// `std::thread::hardware_concurrency()` where that cannot be read.
inline int available_cpus() {
#ifdef __linux__
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0 && CPU_COUNT(&set) > 0) {
    return CPU_COUNT(&set);
  }
#endif
  return std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
}

/// The intra-op threads of `--threads 0`: LibTorch's default, one per
/// physical core (OMP_NUM_THREADS overrides it, as torchrun sets it). Where
/// that default is a single thread while this process may use more CPUs,
/// all of them: LibTorch 1.13's core detection finds one core on some
/// virtual machines (a 2-core AMD EPYC here, where 2.13 finds two), which
/// made training there take up to 1.6x as long.
inline int default_threads() {
  const int libtorch = torch::get_num_threads();
  const bool set_by_environment =
      std::getenv("OMP_NUM_THREADS") || std::getenv("MKL_NUM_THREADS");
  return libtorch == 1 && !set_by_environment ? available_cpus() : libtorch;
}

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

/// A training run: set up with `TrainConfig`, then `run()`.
class Trainer {
 public:
  explicit Trainer(TrainConfig config) : config_(std::move(config)) {
    cifar::validate(config_);
    if (config_.optimizer == OptimizerKind::kAuto) {
      config_.optimizer = torchrev::models::is_transformer(config_.model)
          ? OptimizerKind::kAdamW
          : OptimizerKind::kSgd;
    }
    if (config_.lr == 0.0) {
      config_.lr = config_.optimizer == OptimizerKind::kAdamW ? 2e-3 : 0.1;
    }
    // Only a change is applied: setting the count switches off MKL's own
    // choice of threads per call (LibTorch 2.x wheels).
    const int threads =
        config_.threads > 0 ? config_.threads : default_threads();
    if (threads != torch::get_num_threads()) {
      torch::set_num_threads(threads);
    }
    device_ = training_device(config_);
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
    optimizer_ = make_optimizer(config_, model_->parameters());

    steps_per_epoch_ = count_steps_per_epoch(config_, dataset_);
    total_steps_ = count_total_steps(config_, steps_per_epoch_);
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
    reset_peak_memory(device_);
    const auto start = std::chrono::steady_clock::now();
    const int64_t log_every = config_.log_every > 0
        ? config_.log_every
        : std::max<int64_t>(1, total_steps_ / 20);
    Progress progress(total_steps_, step_, config_.quiet || !is_main_rank());
    model_->train();

    Window window; // the steps since the last metrics row
    const int64_t last = config_.stop_after > 0
        ? std::min(total_steps_, config_.stop_after)
        : total_steps_;
    for (int64_t step = step_; step < last; ++step) {
      if (stop_requested()) {
        result.stopped_by_signal = stop_signal().load();
        break;
      }
      const double lr = learning_rate(config_, step, total_steps_);
      const StepResult done = train_step(step, lr);
      result.step_losses.push_back(done.loss);
      result.train_seconds += done.seconds;
      window.add(done);
      step_ = step + 1;

      const bool log_now = step_ % log_every == 0 || step_ == last;
      const bool eval_now = step_ == total_steps_ ||
          (config_.eval_every > 0 && step_ % config_.eval_every == 0);
      MetricsRow row = window.row(config_.distributed.world_size);
      row.step = step_;
      row.epoch = step / steps_per_epoch_;
      row.lr = lr;
      if (eval_now) {
        row.test_acc = evaluate_measured(); // collective: every rank
      }
      row.peak_memory = train_peak_memory();
      progress.update(row, log_now);
      if (log_now || eval_now) {
        rows_.push_back(row);
        window = Window();
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
    result.train_images_per_s = result.train_seconds > 0
        ? double(result.steps_run * config_.batch_size) *
            config_.distributed.world_size / result.train_seconds
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
  /// The device this rank trains on: the CPU, or the CUDA device of its
  /// local rank, made the current one.
  static torch::Device training_device(const TrainConfig& config) {
    if (config.device != torch::kCUDA) {
      return torch::kCPU;
    }
    if (!torch::cuda::is_available()) {
      throw std::invalid_argument("--device cuda: no CUDA device is available");
    }
    // One device per rank on a machine: the launcher's LOCAL_RANK.
    const int local_rank = config.distributed.local_rank;
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
    const torch::Device device(
        torch::kCUDA, static_cast<c10::DeviceIndex>(local_rank));
    // Also the current device, which streams, contexts and NCCL use when no
    // tensor names one: otherwise every rank would also open GPU 0.
    c10::impl::getDeviceGuardImpl(device.type())->setDevice(device);
    return device;
  }

  /// The optimizer `config` names, at its learning rate.
  static std::unique_ptr<torch::optim::Optimizer> make_optimizer(
      const TrainConfig& config,
      const std::vector<torch::Tensor>& parameters) {
    if (config.optimizer == OptimizerKind::kAdamW) {
      return std::make_unique<torch::optim::AdamW>(
          parameters,
          torch::optim::AdamWOptions(config.lr).weight_decay(
              config.weight_decay));
    }
    return std::make_unique<torch::optim::SGD>(
        parameters,
        torch::optim::SGDOptions(config.lr)
            .momentum(config.momentum)
            .weight_decay(config.weight_decay));
  }

  /// Full batches in each rank's share of an epoch.
  static int64_t count_steps_per_epoch(
      const TrainConfig& config,
      const Dataset& dataset) {
    const int world = config.distributed.world_size;
    const int64_t shard = (dataset.train.size() + world - 1) / world;
    const int64_t steps = shard / config.batch_size;
    if (steps == 0) {
      throw std::invalid_argument(fmt::format(
          "--batch-size {} is larger than the {} training images per rank",
          config.batch_size,
          shard));
    }
    return steps;
  }

  /// The run's length: --max-steps, --epochs (the shorter when both are
  /// given), else kDefaultSteps.
  static int64_t count_total_steps(
      const TrainConfig& config,
      int64_t steps_per_epoch) {
    int64_t total = config.max_steps;
    if (config.epochs > 0) {
      if (config.epochs >
          std::numeric_limits<int64_t>::max() / steps_per_epoch) {
        throw std::invalid_argument(fmt::format(
            "--epochs {}: too many ({} steps each would overflow the step "
            "count)",
            config.epochs,
            steps_per_epoch));
      }
      const int64_t by_epochs = config.epochs * steps_per_epoch;
      total = total > 0 ? std::min(total, by_epochs) : by_epochs;
    }
    return total == 0 ? kDefaultSteps : total;
  }

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
    train_peak_ = std::max(train_peak_, peak_memory(device_));
    reset_peak_memory(device_);
    const double accuracy = evaluate();
    eval_peak_ = std::max(eval_peak_, peak_memory(device_));
    reset_peak_memory(device_);
    return accuracy;
  }

  /// The peak of the training steps so far.
  size_t train_peak_memory() const {
    return std::max(train_peak_, peak_memory(device_));
  }

  /// What one training step measured.
  struct StepResult {
    double loss = 0.0;
    int64_t correct = 0; ///< training images classified right
    int64_t seen = 0; ///< training images of this rank
    double seconds = 0.0; ///< the step alone: no evaluation, no I/O
  };

  /// The training steps since the last metrics row.
  struct Window {
    double loss = 0.0;
    double seconds = 0.0;
    int64_t correct = 0;
    int64_t seen = 0;
    int64_t steps = 0;

    void add(const StepResult& step) {
      loss += step.loss;
      seconds += step.seconds;
      correct += step.correct;
      seen += step.seen;
      ++steps;
    }

    /// The window's loss, accuracy and throughput (of all `world` ranks).
    MetricsRow row(int world) const {
      MetricsRow r;
      r.loss = loss / double(steps);
      r.train_acc = double(correct) / double(seen);
      r.images_per_s = double(seen) * world / std::max(seconds, 1e-9);
      return r;
    }
  };

  /// One optimizer step at learning rate `lr` on the batch of `step`.
  StepResult train_step(int64_t step, double lr) {
    const auto start = std::chrono::steady_clock::now();
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
    StepResult done;
    done.loss = loss.item<double>();
    done.correct = logits.argmax(1).eq(labels).sum().item<int64_t>();
    done.seen = labels.size(0);
    done.seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
            .count();
    return done;
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

  void write_metrics() const {
    write_file_atomically(config_.metrics, metrics_csv(rows_));
  }

  /// The settings a resumed run must share with its checkpoint to continue
  /// the same run, as (flag, value) pairs; --epochs, --max-steps and
  /// --batch-size are also covered by the step count.
  RunSettings run_settings() const {
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

  void save_checkpoint() {
    // The serialized copy is I/O, not training: kept out of the peak.
    train_peak_ = std::max(train_peak_, peak_memory(device_));
    const RunRecord record{
        config_.model,
        dataset_.name,
        step_,
        total_steps_,
        encode_settings(run_settings()),
        rows_};
    write_file_atomically(
        config_.checkpoint, checkpoint_bytes(record, *model_, *optimizer_));
    reset_peak_memory(device_);
  }

  /// Continues the run that --checkpoint holds: refuses a checkpoint of
  /// another model, data set, length or settings before anything of this
  /// run changes.
  void load_checkpoint() {
    LoadedCheckpoint checkpoint(config_.checkpoint);
    const RunRecord& saved = checkpoint.record();
    if (saved.model_name != config_.model) {
      checkpoint.fail(
          "holds model " + saved.model_name + ", but --model is " +
          config_.model);
    }
    if (saved.dataset != dataset_.name) {
      checkpoint.fail(
          "was trained on " + saved.dataset + ", but this run uses " +
          dataset_.name);
    }
    if (saved.total_steps != total_steps_) {
      checkpoint.fail(fmt::format(
          "belongs to a run of {} steps, but this run has {}; resume with the "
          "same --epochs/--max-steps/--batch-size",
          saved.total_steps,
          total_steps_));
    }
    const auto current = run_settings();
    size_t matched = 0;
    if (const auto d = first_difference(saved.settings, current, &matched)) {
      checkpoint.fail(fmt::format(
          "was written with {} {}, but this run has {} {}; resume with "
          "the run's settings",
          d->flag,
          d->theirs,
          d->flag,
          d->ours));
    }
    // Checkpoints written before --optimizer existed record none: SGD.
    const bool before_optimizer_flag =
        saved.settings.find("--optimizer ") == std::string::npos;
    if (before_optimizer_flag && config_.optimizer != OptimizerKind::kSgd) {
      checkpoint.fail(fmt::format(
          "was written with --optimizer sgd, but this run has --optimizer {}; "
          "resume with the run's settings",
          name_of(config_.optimizer)));
    }
    if (matched + (before_optimizer_flag ? 1 : 0) != current.size()) {
      checkpoint.fail(
          "records incomplete settings (not a checkpoint of this version)");
    }
    // A failure here ends the Trainer's construction: a half-restored model
    // is never trained.
    checkpoint.restore(*model_, *optimizer_);
    step_ = saved.step;
    resumed_from_ = saved.step;
    rows_ = saved.rows;
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
  std::vector<MetricsRow> rows_;
  std::optional<double> last_test_accuracy_; // of the latest evaluation
  std::optional<int64_t> resumed_from_; // the checkpoint's step, when resumed
  size_t train_peak_ = 0; // of the training steps, before the last reset
  size_t eval_peak_ = 0; // of the evaluations
};

} // namespace cifar
