#pragma once

// The settings a run must keep to continue as the same run: recorded in
// checkpoints and compared between the ranks of a distributed run.

#include <fmt/core.h>

#include <cstddef>
#include <optional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace cifar {

/// (flag, value) pairs, for example {"--lr", "0.10000000000000001"}.
using RunSettings = std::vector<std::pair<std::string, std::string>>;

/// A setting whose value differs between two runs.
struct SettingDifference {
  std::string flag, theirs, ours;
};

/// The settings as text: one "flag value" line each.
inline std::string encode_settings(const RunSettings& settings) {
  std::string out;
  for (const auto& [flag, value] : settings) {
    out += fmt::format("{} {}\n", flag, value);
  }
  return out;
}

/// Compares `encoded` (encode_settings' format) with `ours`: the first
/// flag in `encoded` whose value differs, if any. `matched`, when given,
/// counts the flags of `encoded` found in `ours` with the same value.
inline std::optional<SettingDifference> first_difference(
    const std::string& encoded,
    const RunSettings& ours,
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

} // namespace cifar
