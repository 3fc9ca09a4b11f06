#pragma once

// Training progress on stderr: a live bar on a terminal, plain periodic
// lines otherwise (CI logs).

#include "metrics.h"

#include <fmt/core.h>

#include <cmath>

#include <sys/ioctl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

namespace cifar {

class Progress {
 public:
  Progress(int64_t total_steps, int64_t start_step, bool silent)
      : total_(total_steps),
        start_step_(start_step),
        silent_(silent),
        tty_(::isatty(STDERR_FILENO) == 1),
        start_(std::chrono::steady_clock::now()) {}

  /// Reports `row`, the state after `row.step` steps, every step. On a
  /// terminal it redraws the bar; otherwise it prints a line when
  /// `log_line` is set or the step evaluated.
  void update(const MetricsRow& row, bool log_line) {
    if (silent_ || (!tty_ && !log_line && !row.test_acc)) {
      return;
    }
    const double elapsed =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start_)
            .count();
    const double eta = row.step > start_step_
        ? elapsed / double(row.step - start_step_) * double(total_ - row.step)
        : 0.0;
    const std::string test =
        row.test_acc ? fmt::format(" test_acc {:.4f}", *row.test_acc) : "";
    // The same figures: compact before a bar on a terminal, spelled out in
    // a log.
    const std::string figures = fmt::format(
        fmt::runtime(
            tty_ ? " {}/{} ep {} loss {:.4f} acc {:.3f} {:.0f} img/s ETA {}{}"
                 : "step {}/{} epoch {} loss {:.4f} train_acc {:.4f} "
                   "images/s {:.0f} eta {}{}"),
        row.step,
        total_,
        row.epoch,
        row.loss,
        row.train_acc,
        row.images_per_s,
        format_duration(eta),
        test);
    if (!tty_) {
      fmt::print(stderr, "{}\n", figures);
      std::fflush(stderr);
      return;
    }
    // One line that fits the terminal: the figures first, then as much bar
    // as the width leaves (none below 10 characters).
    const int columns = terminal_columns();
    const int bar = std::min(30, columns - 1 - int(figures.size()) - 2);
    std::string line;
    if (bar >= 10) {
      const int filled = int(bar * row.step / std::max<int64_t>(total_, 1));
      line =
          "[" + std::string(filled, '=') + std::string(bar - filled, ' ') + "]";
    }
    line += figures;
    if (int(line.size()) > columns - 1) {
      line.resize(std::max(columns - 1, 0));
    }
    fmt::print(stderr, "\r{}\x1b[K", line);
    if (row.test_acc) {
      fmt::print(stderr, "\n");
    }
    std::fflush(stderr);
  }

  void finish() {
    if (!silent_ && tty_) {
      fmt::print(stderr, "\n");
    }
  }

  /// The terminal's width (stderr's), else $COLUMNS, else 80.
  static int terminal_columns() {
    winsize size{};
    if (::ioctl(STDERR_FILENO, TIOCGWINSZ, &size) == 0 && size.ws_col > 0) {
      return size.ws_col;
    }
    if (const char* env = std::getenv("COLUMNS")) {
      const int n = std::atoi(env);
      if (n > 0) {
        return n;
      }
    }
    return 80;
  }

  static std::string format_duration(double seconds) {
    const auto s = static_cast<int64_t>(std::llround(seconds));
    return fmt::format("{}:{:02d}", s / 60, s % 60);
  }

 private:
  int64_t total_, start_step_;
  bool silent_, tty_;
  std::chrono::steady_clock::time_point start_;
};

} // namespace cifar
