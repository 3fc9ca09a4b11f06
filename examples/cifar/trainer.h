#pragma once

// The training loop of cifar_train, as a library so tests can drive it.

#include "data.h"
#include "distributed.h"
#include "progress.h"

#include <torchrev/torchrev.h>

#include <fmt/core.h>
#include <torch/torch.h>

#ifdef TORCHREV_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#endif

#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace cifar {

/// Everything a training run is configured by (the command-line flags).
struct TrainConfig {
  std::string model = "revnet_mini";
  std::string dataset = "auto";
  std::string data_dir;
  int64_t epochs = 0; // 0: bounded by max_steps only
  int64_t max_steps = 0; // 0: bounded by epochs only; both 0: kDefaultSteps
  int64_t batch_size = 128; // per rank
  double lr = 0.1; // peak learning rate
  std::string schedule = "onecycle"; // step, cosine or onecycle
  double momentum = 0.9;
  double weight_decay = 5e-4;
  int threads = 0; // 0: LibTorch's default
  uint64_t seed = 0;
  std::string device = "cpu";
  int64_t eval_every = 0; // 0: evaluate at the end only
  int64_t log_every = 0; // 0: about 20 lines per run
  std::string metrics; // CSV file
  std::string checkpoint; // checkpoint file
  int64_t checkpoint_every = 0; // 0: at each evaluation and at the end
  bool resume = false;
  int64_t stop_after = 0; // stop after this step, as if interrupted (tests)
  std::string augment = "auto"; // auto (CIFAR only), on, off
  bool channels_last = true; // NHWC tensors: much faster convolutions on CPU
  DistributedOptions distributed;
  bool quiet = false; // no progress output
};

/// The default run's length, when neither --epochs nor --max-steps is given.
constexpr int64_t kDefaultSteps = 1200;

struct TrainResult {
  double test_accuracy = 0.0;
  size_t peak_memory_bytes = 0;
  double param_checksum = 0.0;
  int64_t steps = 0;
  std::vector<double> step_losses; // loss of every step this run executed
  double seconds = 0.0;
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

/// Learning rate at `step` of `total` for the schedule.
inline double learning_rate(
    const TrainConfig& config,
    int64_t step,
    int64_t total) {
  const double t = total > 1 ? double(step) / double(total - 1) : 1.0;
  const double pi = 3.14159265358979323846;
  if (config.schedule == "step") {
    return config.lr * (t < 0.5 ? 1.0 : t < 0.75 ? 0.1 : 0.01);
  }
  if (config.schedule == "cosine") {
    return 0.5 * config.lr * (1.0 + std::cos(pi * t));
  }
  // One-cycle (as PyTorch's OneCycleLR): warm up from lr/25 over the first
  // 30%, then cosine-anneal to lr/1e4.
  constexpr double kWarmup = 0.3;
  const double start = config.lr / 25.0, end = config.lr / 1e4;
  if (t < kWarmup) {
    return start +
        (config.lr - start) * 0.5 * (1.0 - std::cos(pi * t / kWarmup));
  }
  const double u = (t - kWarmup) / (1.0 - kWarmup);
  return end + (config.lr - end) * 0.5 * (1.0 + std::cos(pi * u));
}

namespace detail {

/// fsync a file or directory by path; best effort for directories.
inline void sync_path(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd >= 0) {
    ::fsync(fd);
    ::close(fd);
  }
}

/// Writes `path` atomically: `write(tmp)` then flush, fsync and rename, so an
/// interrupted write never destroys the previous file.
template <class WriteFn>
void write_atomically(const std::string& path, WriteFn write) {
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  try {
    write(tmp);
    sync_path(tmp);
    std::filesystem::rename(tmp, path);
  } catch (...) {
    std::error_code ignored;
    std::filesystem::remove(tmp, ignored);
    throw;
  }
  auto dir = std::filesystem::absolute(path).parent_path();
  sync_path(dir.string());
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
    if (config_.threads > 0) {
      torch::set_num_threads(config_.threads);
    }
    device_ =
        torch::Device(config_.device == "cuda" ? torch::kCUDA : torch::kCPU);
    if (device_.is_cuda()) {
      if (!torch::cuda::is_available()) {
        throw std::invalid_argument(
            "--device cuda: no CUDA device is available");
      }
    }
    dataset_ = load_dataset(config_.dataset, config_.data_dir);
    augment_ = config_.augment == "on" ||
        (config_.augment == "auto" && dataset_.name != "fashion-mnist");
    torch::manual_seed(config_.seed);
    model_ = torchrev::models::create(
        config_.model,
        torchrev::models::ZooOptions()
            .in_channels(dataset_.channels())
            .num_classes(dataset_.num_classes));
    model_->to(device_);
    if (config_.channels_last) {
      torchrev::models::use_channels_last(*model_);
    }
    optimizer_ = std::make_unique<torch::optim::SGD>(
        model_->parameters(),
        torch::optim::SGDOptions(config_.lr)
            .momentum(config_.momentum)
            .weight_decay(config_.weight_decay));

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
      const int64_t by_epochs = config_.epochs * steps_per_epoch_;
      total_steps_ =
          total_steps_ > 0 ? std::min(total_steps_, by_epochs) : by_epochs;
    }
    if (total_steps_ == 0) {
      total_steps_ = kDefaultSteps;
    }
    if (config_.resume) {
      load_checkpoint();
    }
    if (config_.distributed.enabled()) {
      // After loading: every rank starts from rank 0's parameters.
      parallel_ =
          std::make_unique<DataParallel>(config_.distributed, *model_, device_);
    }
  }

  const Dataset& dataset() const {
    return dataset_;
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
    // Peak memory of the training run (the data set and model included).
    torchrev::CPUMemoryMeter::instance().reset_peak();
    const auto start = std::chrono::steady_clock::now();
    const int64_t log_every = config_.log_every > 0
        ? config_.log_every
        : std::max<int64_t>(1, total_steps_ / 20);
    Progress progress(total_steps_, step_, config_.quiet || !is_main_rank());
    model_->train();

    double window_loss = 0.0;
    int64_t window_correct = 0, window_seen = 0, window_steps = 0;
    auto window_start = std::chrono::steady_clock::now();
    const int64_t last = config_.stop_after > 0
        ? std::min(total_steps_, config_.stop_after)
        : total_steps_;
    for (int64_t step = step_; step < last; ++step) {
      const int64_t epoch = step / steps_per_epoch_;
      const double lr = learning_rate(config_, step, total_steps_);
      for (auto& group : optimizer_->param_groups()) {
        static_cast<torch::optim::SGDOptions&>(group.options()).lr(lr);
      }
      auto [images, labels] = train_batch(step);
      detail::zero_grad_in_place(*optimizer_);
      auto logits = model_->forward(images);
      auto loss = torch::nn::functional::cross_entropy(logits, labels);
      if (parallel_) {
        parallel_->prepare_backward();
      }
      loss.backward();
      if (parallel_) {
        parallel_->finish_backward();
      }
      optimizer_->step();

      const double loss_value = loss.item<double>();
      result.step_losses.push_back(loss_value);
      window_loss += loss_value;
      window_correct += logits.argmax(1).eq(labels).sum().item<int64_t>();
      window_seen += labels.size(0);
      ++window_steps;
      step_ = step + 1;

      const bool log_now = step_ % log_every == 0 || step_ == last;
      const bool eval_now = step_ == total_steps_ ||
          (config_.eval_every > 0 && step_ % config_.eval_every == 0);
      double test_acc = -1.0;
      if (eval_now && is_main_rank()) {
        test_acc = evaluate();
      }
      const double seconds =
          std::chrono::duration<double>(
              std::chrono::steady_clock::now() - window_start)
              .count();
      const double ips = double(window_seen) * config_.distributed.world_size /
          std::max(seconds, 1e-9);
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
                peak_memory()});
        window_loss = 0.0;
        window_correct = window_seen = window_steps = 0;
        window_start = std::chrono::steady_clock::now();
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
    if (is_main_rank() && !config_.metrics.empty()) {
      write_metrics();
    }
    if (step_ == total_steps_ && is_main_rank()) {
      result.test_accuracy =
          last_test_accuracy_ >= 0 ? last_test_accuracy_ : evaluate();
    }
    // A run stopped by --stop-after behaves as if killed: no final save.
    if (!config_.checkpoint.empty() && is_main_rank() &&
        step_ == total_steps_) {
      save_checkpoint();
    }
    result.steps = step_;
    result.peak_memory_bytes = peak_memory();
    result.param_checksum = param_checksum(*model_);
    result.seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
            .count();
    return result;
  }

  /// Accuracy over the whole test set.
  double evaluate() {
    torch::NoGradGuard no_grad;
    model_->eval();
    int64_t correct = 0;
    const auto& test = dataset_.test;
    constexpr int64_t kEvalBatch = 500;
    for (int64_t begin = 0; begin < test.size(); begin += kEvalBatch) {
      const int64_t n = std::min(kEvalBatch, test.size() - begin);
      auto indices = torch::arange(begin, begin + n, torch::kInt64);
      auto images =
          to_device(make_batch(dataset_, test, indices, false, nullptr));
      auto labels = test.labels.narrow(0, begin, n).to(device_);
      correct +=
          model_->forward(images).argmax(1).eq(labels).sum().item<int64_t>();
    }
    model_->train();
    last_test_accuracy_ = double(correct) / double(test.size());
    return last_test_accuracy_;
  }

 private:
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
    if (config_.schedule != "step" && config_.schedule != "cosine" &&
        config_.schedule != "onecycle") {
      fail(
          "--schedule " + config_.schedule +
          ": expected step, cosine or onecycle");
    }
    if (config_.device != "cpu" && config_.device != "cuda") {
      fail("--device " + config_.device + ": expected cpu or cuda");
    }
    if (config_.augment != "auto" && config_.augment != "on" &&
        config_.augment != "off") {
      fail("--augment " + config_.augment + ": expected auto, on or off");
    }
    if (config_.batch_size <= 0 || config_.epochs < 0 ||
        config_.max_steps < 0 || config_.eval_every < 0 || config_.lr <= 0.0) {
      fail(
          "--batch-size and --lr must be positive; --epochs, --max-steps and --eval-every non-negative");
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
      auto dir = std::filesystem::absolute(path).parent_path();
      if (!std::filesystem::is_directory(dir) ||
          ::access(dir.c_str(), W_OK) != 0) {
        fail(flag + " " + path + ": cannot write into " + dir.string());
      }
    }
    if (config_.resume && config_.checkpoint.empty()) {
      fail("--resume needs --checkpoint FILE");
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
    detail::write_atomically(config_.metrics, [&](const std::string& tmp) {
      std::ofstream out(tmp);
      out << detail::csv_header() << "\n";
      for (const auto& r : rows_) {
        out << fmt::format(
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
      out.flush();
      if (!out) {
        throw std::runtime_error(
            "cannot write metrics file " + config_.metrics);
      }
    });
  }

  void save_checkpoint() const {
    detail::write_atomically(config_.checkpoint, [&](const std::string& tmp) {
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
      at::Generator generator = at::detail::getDefaultCPUGenerator();
      archive.write("rng", generator.get_state());
      std::ostringstream rows;
      for (const auto& r : rows_) {
        rows << r.step << ' ' << r.epoch << ' '
             << fmt::format("{:.17g}", r.loss) << ' '
             << fmt::format("{:.17g}", r.train_acc) << ' '
             << fmt::format("{:.17g}", r.test_acc) << ' '
             << fmt::format("{:.17g}", r.lr) << ' '
             << fmt::format("{:.17g}", r.images_per_s) << ' ' << r.peak_memory
             << '\n';
      }
      archive.write("metrics", c10::IValue(rows.str()));
      archive.save_to(tmp);
    });
  }

  void load_checkpoint() {
    const std::string& path = config_.checkpoint;
    torch::serialize::InputArchive archive;
    try {
      archive.load_from(path);
    } catch (const c10::Error& e) {
      throw std::runtime_error(
          "cannot read checkpoint " + path +
          ": not a cifar_train checkpoint or corrupt");
    }
    c10::IValue model_name, dataset_name, step, total, metrics;
    if (!archive.try_read("model_name", model_name) ||
        !archive.try_read("step", step) ||
        !archive.try_read("dataset", dataset_name) ||
        !archive.try_read("total_steps", total) ||
        !archive.try_read("metrics", metrics)) {
      throw std::runtime_error(
          "cannot read checkpoint " + path +
          ": missing fields (not a cifar_train checkpoint)");
    }
    if (model_name.toStringRef() != config_.model) {
      throw std::runtime_error(
          "checkpoint " + path + " holds model " + model_name.toStringRef() +
          ", but --model is " + config_.model);
    }
    if (dataset_name.toStringRef() != dataset_.name) {
      throw std::runtime_error(
          "checkpoint " + path + " was trained on " +
          dataset_name.toStringRef() + ", but this run uses " + dataset_.name);
    }
    if (total.toInt() != total_steps_) {
      throw std::runtime_error(fmt::format(
          "checkpoint {} belongs to a run of {} steps, but this run has {}; "
          "resume with the same --epochs/--max-steps/--batch-size",
          path,
          total.toInt(),
          total_steps_));
    }
    torch::serialize::InputArchive model_archive, optimizer_archive;
    archive.read("model", model_archive);
    archive.read("optimizer", optimizer_archive);
    model_->load(model_archive);
    optimizer_->load(optimizer_archive);
    torch::Tensor rng;
    archive.read("rng", rng);
    at::Generator generator = at::detail::getDefaultCPUGenerator();
    generator.set_state(rng);
    step_ = step.toInt();
    std::istringstream rows(metrics.toStringRef());
    Row r{};
    while (rows >> r.step >> r.epoch >> r.loss >> r.train_acc >> r.test_acc >>
           r.lr >> r.images_per_s >> r.peak_memory) {
      rows_.push_back(r);
    }
  }

  TrainConfig config_;
  torch::Device device_{torch::kCPU};
  Dataset dataset_;
  bool augment_ = false;
  std::shared_ptr<torchrev::models::ImageClassifier> model_;
  std::unique_ptr<torch::optim::SGD> optimizer_;
  std::unique_ptr<DataParallel> parallel_;
  int64_t steps_per_epoch_ = 0;
  int64_t total_steps_ = 0;
  int64_t step_ = 0;
  std::vector<int64_t> order_;
  int64_t order_epoch_ = -1;
  std::vector<Row> rows_;
  double last_test_accuracy_ = -1.0;
};

} // namespace cifar
