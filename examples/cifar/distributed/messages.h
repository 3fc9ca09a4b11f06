#pragma once

/// Pieces of the distributed example's one-line error messages.

#include <c10/util/Exception.h>

#include <chrono>
#include <exception>
#include <sstream>
#include <string>

namespace cifar {
namespace detail {

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

} // namespace detail
} // namespace cifar
