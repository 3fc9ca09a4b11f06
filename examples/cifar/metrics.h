#pragma once

// A training run's metrics: one row per logged step, written to --metrics as
// CSV and kept in checkpoints, so that a resumed run's file continues the
// interrupted one's.

#include <fmt/core.h>

#include <cstddef>
#include <cstdint>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace cifar {

/// The metrics of the steps since the previous row, as logged at `step`.
struct MetricsRow {
  int64_t step = 0;
  int64_t epoch = 0;
  double loss = 0.0; ///< mean training loss of the window
  double train_acc = 0.0; ///< training accuracy of the window
  std::optional<double> test_acc; ///< when the step evaluated
  double lr = 0.0;
  double images_per_s = 0.0; ///< of the training steps, all ranks
  size_t peak_memory = 0; ///< bytes, of the training steps so far
};

namespace detail {

/// The first line of the --metrics CSV.
inline std::string csv_header() {
  return "step,epoch,loss,train_acc,test_acc,lr,images_per_s,peak_memory_bytes";
}

} // namespace detail

/// The --metrics file: the header, then one line per row (test_acc empty
/// where the step did not evaluate).
inline std::string metrics_csv(const std::vector<MetricsRow>& rows) {
  std::string csv = detail::csv_header() + "\n";
  for (const auto& r : rows) {
    csv += fmt::format(
        "{},{},{:.9g},{:.6f},{},{:.6g},{:.1f},{}\n",
        r.step,
        r.epoch,
        r.loss,
        r.train_acc,
        r.test_acc ? fmt::format("{:.6f}", *r.test_acc) : "",
        r.lr,
        r.images_per_s,
        r.peak_memory);
  }
  return csv;
}

/// The rows as a checkpoint keeps them: one line each, numbers at full
/// precision, -1 for a missing test accuracy (the format of every
/// checkpoint written so far). decode_metrics_rows reads it back exactly.
inline std::string encode_metrics_rows(const std::vector<MetricsRow>& rows) {
  std::string out;
  for (const auto& r : rows) {
    out += fmt::format(
        "{} {} {:.17g} {:.17g} {:.17g} {:.17g} {:.17g} {}\n",
        r.step,
        r.epoch,
        r.loss,
        r.train_acc,
        r.test_acc ? *r.test_acc : -1.0,
        r.lr,
        r.images_per_s,
        r.peak_memory);
  }
  return out;
}

/// Reads encode_metrics_rows' text. Throws std::invalid_argument for text it
/// cannot read or for a row whose step is outside [1, last_step].
inline std::vector<MetricsRow> decode_metrics_rows(
    const std::string& text,
    int64_t last_step) {
  std::vector<MetricsRow> rows;
  std::istringstream lines(text);
  MetricsRow r;
  double test_acc = 0.0;
  while (lines >> r.step >> r.epoch >> r.loss >> r.train_acc >> test_acc >>
         r.lr >> r.images_per_s >> r.peak_memory) {
    if (r.step < 1 || r.step > last_step) {
      throw std::invalid_argument(fmt::format(
          "metrics row for step {} outside [1, {}]", r.step, last_step));
    }
    r.test_acc =
        test_acc >= 0.0 ? std::optional<double>(test_acc) : std::nullopt;
    rows.push_back(r);
  }
  if (!lines.eof()) {
    throw std::invalid_argument("unreadable metrics rows");
  }
  return rows;
}

} // namespace cifar
