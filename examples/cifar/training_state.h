#pragma once

// cifar_train's checkpoint: the model, the optimizer, the global CPU random
// state and the run's record (model and data set names, step, settings,
// metrics rows), in one LibTorch archive sealed by files.h.

#include "files.h"
#include "metrics.h"

#include <fmt/core.h>
#include <torch/nn/module.h>
#include <torch/optim/optimizer.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>
#include <torch/types.h>

#include <ATen/CPUGeneratorImpl.h>
#include <c10/util/Exception.h>

#include <cctype>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace cifar {

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

} // namespace detail

/// What a checkpoint records about its run, besides the model, the
/// optimizer and the random state.
struct RunRecord {
  std::string model_name;
  std::string dataset;
  int64_t step = 0; ///< the steps completed
  int64_t total_steps = 0; ///< the run's length
  std::string settings; ///< encode_settings of the run's settings
  std::vector<MetricsRow> rows; ///< the metrics rows so far
};

/// The checkpoint of a run at `record.step`, serialized in memory and
/// sealed, so that writing it is one checked write and reading it starts
/// with an integrity check.
inline std::string checkpoint_bytes(
    const RunRecord& record,
    const torch::nn::Module& model,
    const torch::optim::Optimizer& optimizer) {
  torch::serialize::OutputArchive archive;
  torch::serialize::OutputArchive model_archive, optimizer_archive;
  model.save(model_archive);
  optimizer.save(optimizer_archive);
  archive.write("model", model_archive);
  archive.write("optimizer", optimizer_archive);
  archive.write("model_name", c10::IValue(record.model_name));
  archive.write("dataset", c10::IValue(record.dataset));
  archive.write("step", c10::IValue(record.step));
  archive.write("total_steps", c10::IValue(record.total_steps));
  archive.write("settings", c10::IValue(record.settings));
  const at::Generator& generator = at::detail::getDefaultCPUGenerator();
  archive.write("rng", generator.get_state());
  archive.write("metrics", c10::IValue(encode_metrics_rows(record.rows)));
  std::string payload;
  archive.save_to([&payload](const void* data, size_t size) -> size_t {
    payload.append(static_cast<const char*>(data), size);
    return size;
  });
  return seal(payload);
}

/// A checkpoint file, read, checked for integrity and its record parsed;
/// nothing of the running program changes until restore().
class LoadedCheckpoint {
 public:
  /// Throws a one-line std::runtime_error ("checkpoint PATH: ...") for a
  /// file that cannot be read, is damaged, or is not a cifar_train
  /// checkpoint of this version.
  explicit LoadedCheckpoint(std::string path) : path_(std::move(path)) {
    // Nothing parses the file before its integrity is established.
    const std::string sealed = read_file_bytes(path_);
    std::string_view payload;
    try {
      payload = unseal(sealed, path_);
    } catch (const FileError& e) {
      throw std::runtime_error(
          std::string("cannot read checkpoint ") + e.what() +
          "; nothing was loaded");
    }
    try {
      archive_.load_from(payload.data(), payload.size());
    } catch (const c10::Error&) {
      fail(
          "cannot read: not a cifar_train checkpoint (no LibTorch archive "
          "inside)");
    }
    // Every field, checked for presence and type before it is used.
    record_.model_name =
        field("model_name", &c10::IValue::isString, "a string").toStringRef();
    record_.dataset =
        field("dataset", &c10::IValue::isString, "a string").toStringRef();
    record_.step = field("step", &c10::IValue::isInt, "an integer").toInt();
    record_.total_steps =
        field("total_steps", &c10::IValue::isInt, "an integer").toInt();
    record_.settings =
        field("settings", &c10::IValue::isString, "a string").toStringRef();
    const auto metrics = field("metrics", &c10::IValue::isString, "a string");
    if (record_.step < 0 || record_.step > record_.total_steps) {
      fail(fmt::format(
          "step {} is outside [0, {}]", record_.step, record_.total_steps));
    }
    try {
      record_.rows = decode_metrics_rows(metrics.toStringRef(), record_.step);
    } catch (const std::invalid_argument& e) {
      fail(e.what());
    }
  }

  /// The run's record.
  const RunRecord& record() const {
    return record_;
  }

  /// Throws "checkpoint PATH: `what`".
  [[noreturn]] void fail(const std::string& what) const {
    throw std::runtime_error("checkpoint " + path_ + ": " + what);
  }

  /// Loads the model, the optimizer and the global CPU random state. A
  /// failure throws part-way: the caller must not train the half-restored
  /// model.
  void restore(torch::nn::Module& model, torch::optim::Optimizer& optimizer) {
    torch::serialize::InputArchive model_archive, optimizer_archive;
    torch::Tensor rng;
    try {
      archive_.read("model", model_archive);
      archive_.read("optimizer", optimizer_archive);
      archive_.read("rng", rng);
    } catch (const c10::Error&) {
      fail("the model, optimizer or random state is missing");
    }
    try {
      model.load(model_archive);
      optimizer.load(optimizer_archive);
      at::Generator generator = at::detail::getDefaultCPUGenerator();
      generator.set_state(rng);
    } catch (const c10::Error& e) {
      fail(
          "does not fit this model: " +
          detail::first_line_of(e.what_without_backtrace()));
    }
  }

 private:
  c10::IValue field(
      const char* name,
      bool (c10::IValue::*is)() const,
      const char* kind) {
    c10::IValue value;
    if (!archive_.try_read(name, value) || !(value.*is)()) {
      fail(fmt::format(
          "field '{}' is missing or not {} (not a cifar_train checkpoint "
          "of this version)",
          name,
          kind));
    }
    return value;
  }

  std::string path_;
  torch::serialize::InputArchive archive_;
  RunRecord record_;
};

} // namespace cifar
