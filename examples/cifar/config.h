#pragma once

// cifar_train's configuration: the command-line flags as one struct, the
// words each enumerated flag accepts, and the learning-rate schedules.

#include "distributed/options.h"

#include <torch/torch.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace cifar {

/// The optimizer (--optimizer).
enum class OptimizerKind {
  kAuto, ///< AdamW for the transformers, SGD for the others
  kSgd, ///< SGD with momentum and weight decay
  kAdamW, ///< AdamW with decoupled weight decay
};

/// The learning-rate schedule over the run (--schedule).
enum class Schedule {
  kStep, ///< lr, then lr/10 from half-way, lr/100 from three quarters
  kCosine, ///< cosine annealing from lr to 0
  kOneCycle, ///< as PyTorch's OneCycleLR: warm-up, then cosine annealing
};

/// Random crops and flips of the training images (--augment).
enum class Augment {
  kAuto, ///< on for CIFAR, off for Fashion-MNIST
  kOn,
  kOff,
};

/// The words a flag accepts for each value, in the order --help lists them.
/// One table per enum: the command line, error messages and the settings a
/// checkpoint records all spell a value from here.
template <typename Enum>
using Choices = std::vector<std::pair<std::string, Enum>>;

inline const Choices<OptimizerKind>& choices(OptimizerKind /*tag*/) {
  static const Choices<OptimizerKind> words{
      {"auto", OptimizerKind::kAuto},
      {"sgd", OptimizerKind::kSgd},
      {"adamw", OptimizerKind::kAdamW}};
  return words;
}
inline const Choices<Schedule>& choices(Schedule /*tag*/) {
  static const Choices<Schedule> words{
      {"step", Schedule::kStep},
      {"cosine", Schedule::kCosine},
      {"onecycle", Schedule::kOneCycle}};
  return words;
}
inline const Choices<Augment>& choices(Augment /*tag*/) {
  static const Choices<Augment> words{
      {"auto", Augment::kAuto}, {"on", Augment::kOn}, {"off", Augment::kOff}};
  return words;
}
inline const Choices<torch::DeviceType>& choices(torch::DeviceType /*tag*/) {
  static const Choices<torch::DeviceType> words{
      {"cpu", torch::kCPU}, {"cuda", torch::kCUDA}};
  return words;
}

/// Whether `value` is one of its enum's choices (it is, unless it was cast
/// from an integer).
template <typename Enum>
bool is_choice(Enum value) {
  for (const auto& choice : choices(Enum{})) {
    if (choice.second == value) {
      return true;
    }
  }
  return false;
}

/// The word for `value` (as the command line spells it).
template <typename Enum>
const std::string& name_of(Enum value) {
  for (const auto& [word, v] : choices(Enum{})) {
    if (v == value) {
      return word;
    }
  }
  throw std::invalid_argument(
      "a value outside its enum's choices (" +
      std::to_string(static_cast<long long>(value)) + ")");
}

/// Everything a training run is configured by (the command-line flags).
struct TrainConfig {
  std::string model = "revnet_mini";
  std::string dataset = "auto";
  std::string data_dir;
  int64_t epochs = 0; // 0: bounded by max_steps only
  int64_t max_steps = 0; // 0: bounded by epochs only; both 0: kDefaultSteps
  int64_t batch_size = 128; // per rank
  /// AdamW for the transformers, SGD for the others unless told.
  OptimizerKind optimizer = OptimizerKind::kAuto;
  double lr = 0.0; // peak learning rate; 0: 0.1 for SGD, 0.002 for AdamW
  Schedule schedule = Schedule::kOneCycle;
  double momentum = 0.9;
  double weight_decay = 5e-4;
  int threads = 0; // 0: `default_threads()` (trainer.h)
  uint64_t seed = 0;
  torch::DeviceType device = torch::kCPU; // kCPU or kCUDA
  int64_t eval_every = 0; // 0: evaluate at the end only
  int64_t log_every = 0; // 0: about 20 lines per run
  std::string metrics; // CSV file
  std::string checkpoint; // checkpoint file
  int64_t checkpoint_every = 0; // 0: at each evaluation and at the end
  bool resume = false; // continue from `checkpoint`, which must exist
  bool resume_if_exists = false; // continue from `checkpoint` if it exists
  int64_t stop_after = 0; // stop after this step, as if interrupted (tests)
  Augment augment = Augment::kAuto;
  bool channels_last = true; // NHWC tensors: much faster convolutions on CPU
  DistributedOptions distributed;
  bool quiet = false; // no progress output
};

/// The default run's length, when neither --epochs nor --max-steps is given.
constexpr int64_t kDefaultSteps = 1200;

/// Learning rate at `step` of `total` for the schedule.
inline double learning_rate(
    const TrainConfig& config,
    int64_t step,
    int64_t total) {
  const double t = total > 1 ? double(step) / double(total - 1) : 1.0;
  const double pi = 3.14159265358979323846;
  if (config.schedule == Schedule::kStep) {
    return config.lr * (t < 0.5 ? 1.0 : t < 0.75 ? 0.1 : 0.01);
  }
  if (config.schedule == Schedule::kCosine) {
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

} // namespace cifar
