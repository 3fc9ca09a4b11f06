#pragma once

// A scratch folder for tests that write files.

#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <string>
#include <system_error>

namespace torchrev {
namespace testing {

/// A new, empty folder under the system's temporary directory, named after
/// `name`, this process and a counter (tests run in parallel processes), and
/// removed with everything in it when the object goes out of scope.
class ScratchDir {
 public:
  explicit ScratchDir(const std::string& name)
      : path(
            std::filesystem::temp_directory_path() /
            ("torchrev_" + name + "_" + std::to_string(::getpid()) + "_" +
             std::to_string(counter()++))) {
    std::filesystem::remove_all(path);
    std::filesystem::create_directories(path);
  }
  ~ScratchDir() {
    std::error_code ignored; // a destructor must not throw
    std::filesystem::remove_all(path, ignored);
  }
  ScratchDir(const ScratchDir&) = delete;
  ScratchDir& operator=(const ScratchDir&) = delete;

  /// `path / child`.
  std::filesystem::path operator/(const std::string& child) const {
    return path / child;
  }

  const std::filesystem::path path;

 private:
  static std::atomic<int>& counter() {
    static std::atomic<int> next{0};
    return next;
  }
};

} // namespace testing
} // namespace torchrev
