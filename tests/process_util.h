#pragma once

// Running programs from tests: cifar_train, or this test binary itself.

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <future>
#include <regex>
#include <string>
#include <vector>

namespace torchrev {
namespace testing {

/// A port that was free a moment ago on 127.0.0.1.
inline int free_port() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  socklen_t len = sizeof(addr);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  ::close(fd);
  return ntohs(addr.sin_port);
}

struct Outcome {
  int exit_code = -1;
  std::string output; // stdout and stderr
  double seconds = 0;
};

/// Runs a shell command, capturing its output and exit code.
inline Outcome run(const std::string& command) {
  Outcome outcome;
  const auto start = std::chrono::steady_clock::now();
  FILE* pipe = ::popen((command + " 2>&1").c_str(), "r");
  if (pipe == nullptr) {
    return outcome;
  }
  char buffer[4096];
  while (std::fgets(buffer, sizeof(buffer), pipe) != nullptr) {
    outcome.output += buffer;
  }
  const int status = ::pclose(pipe);
  outcome.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  outcome.seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
          .count();
  return outcome;
}

/// Runs the commands concurrently.
inline std::vector<Outcome> run_all(const std::vector<std::string>& commands) {
  std::vector<std::future<Outcome>> running;
  for (const auto& c : commands) {
    running.push_back(std::async(std::launch::async, run, c));
  }
  std::vector<Outcome> outcomes;
  for (auto& r : running) {
    outcomes.push_back(r.get());
  }
  return outcomes;
}

inline std::string value_of(const std::string& output, const std::string& key) {
  std::smatch match;
  if (std::regex_search(output, match, std::regex(key + "=([^\\n]+)"))) {
    return match[1];
  }
  return "";
}

/// The cifar_train binary (empty when examples are not built).
inline std::string cifar_train_path() {
  return TORCHREV_CIFAR_TRAIN;
}

} // namespace testing
} // namespace torchrev
