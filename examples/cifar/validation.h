#pragma once

// The checks a TrainConfig passes before anything is loaded or built: each
// refusal names the flag and the value that arrived.

#include "config.h"

#include <torchrev/models/zoo.h>

#include <fmt/core.h>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <utility>

namespace cifar {

/// Throws std::invalid_argument, naming the flag and its value, for the
/// first setting of `config` that cannot run: an unknown model, a value
/// outside its flag's choices or range, a data set without its folder, an
/// output path that cannot be written, or contradictory resume flags.
inline void validate(const TrainConfig& config) {
  auto fail = [](const std::string& message) {
    throw std::invalid_argument(message);
  };
  const auto names = torchrev::models::model_names();
  if (std::find(names.begin(), names.end(), config.model) == names.end()) {
    std::string valid;
    for (const auto& n : names) {
      valid += (valid.empty() ? "" : ", ") + n;
    }
    fail(
        "--model " + config.model + ": unknown model; expected one of " +
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
  choice("--optimizer", config.optimizer);
  choice("--schedule", config.schedule);
  choice("--device", config.device);
  choice("--augment", config.augment);
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
  positive("--batch-size", config.batch_size);
  non_negative("--epochs", config.epochs);
  non_negative("--max-steps", config.max_steps);
  non_negative("--eval-every", config.eval_every);
  non_negative("--log-every", config.log_every);
  non_negative("--checkpoint-every", config.checkpoint_every);
  non_negative("--stop-after", config.stop_after);
  non_negative("--threads", config.threads);
  if (!std::isfinite(config.lr) || config.lr < 0.0) {
    fail(fmt::format(
        "--lr {}: expected a finite positive number (or 0: 0.1 for SGD, "
        "0.002 for AdamW)",
        config.lr));
  }
  if (!std::isfinite(config.momentum) || config.momentum < 0.0) {
    fail(fmt::format(
        "--momentum {}: expected a finite number >= 0", config.momentum));
  }
  if (!std::isfinite(config.weight_decay) || config.weight_decay < 0.0) {
    fail(fmt::format(
        "--weight-decay {}: expected a finite number >= 0",
        config.weight_decay));
  }
  const auto& dist = config.distributed;
  if (dist.world_size < 1) {
    fail(fmt::format(
        "--world-size {}: expected 1 or more processes", dist.world_size));
  }
  if (dist.rank < 0 || dist.rank >= dist.world_size) {
    fail(fmt::format(
        "--rank {}: expected a rank in [0, {})", dist.rank, dist.world_size));
  }
  if ((config.dataset == "cifar10" || config.dataset == "cifar100") &&
      config.data_dir.empty()) {
    fail(
        "--dataset " + config.dataset +
        " needs --data-dir (the folder "
        "with the binary files; nothing is downloaded)");
  }
  for (const auto& [flag, path] :
       {std::pair<std::string, std::string>{"--metrics", config.metrics},
        {"--checkpoint", config.checkpoint}}) {
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
      fail(
          fmt::format("{} {}: cannot write into {}", flag, path, dir.string()));
    }
  }
  if (config.resume && config.resume_if_exists) {
    fail("--resume and --resume-if-exists: give one of them");
  }
  if (config.resume && config.checkpoint.empty()) {
    fail("--resume needs --checkpoint FILE");
  }
  if (config.resume_if_exists && config.checkpoint.empty()) {
    fail("--resume-if-exists needs --checkpoint FILE");
  }
  if (config.resume && !std::filesystem::exists(config.checkpoint)) {
    fail("--resume: checkpoint " + config.checkpoint + " does not exist");
  }
}

} // namespace cifar
