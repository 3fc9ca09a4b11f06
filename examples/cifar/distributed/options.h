#pragma once

/// Where a process sits in a multi-process run and how it finds the others:
/// the fields torchrun and `torch.distributed` read from the environment.

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <stdexcept>
#include <string>

namespace cifar {

namespace detail {

/// Parses a whole decimal integer in [lo, hi] from environment variable
/// `name`; throws a one-line std::runtime_error naming it otherwise.
inline int64_t parse_env_int(
    const char* name,
    const std::string& value,
    int64_t lo,
    int64_t hi) {
  int64_t result = 0;
  size_t used = 0;
  bool ok = !value.empty();
  if (ok) {
    try {
      result = std::stoll(value, &used, 10);
    } catch (const std::exception&) {
      ok = false;
    }
  }
  if (!ok || used != value.size() || result < lo || result > hi) {
    throw std::runtime_error(
        std::string("invalid ") + name + "='" + value +
        "': expected an integer in [" + std::to_string(lo) + ", " +
        std::to_string(hi) + "]");
  }
  return result;
}

} // namespace detail

/// Where this process sits in a multi-process run and how to rendezvous.
struct DistributedOptions {
  /// Number of processes (WORLD_SIZE env var or --world-size).
  int world_size = 1;
  /// This process's rank in [0, world_size) (RANK env var or --rank).
  int rank = 0;
  /// Address of rank 0, which hosts the TCPStore (MASTER_ADDR).
  std::string master_addr = "127.0.0.1";
  /// TCP port of the TCPStore on rank 0 (MASTER_PORT).
  int master_port = 29500;
  /// Limit for the rendezvous and for each collective.
  std::chrono::milliseconds timeout{60000};
  /// This process's index among the ranks on its machine (LOCAL_RANK, or
  /// --local-rank): the CUDA device it trains on.
  int local_rank = 0;
  /// True when a launcher already hosts the TCPStore at
  /// MASTER_ADDR:MASTER_PORT (torchrun sets TORCHELASTIC_USE_AGENT_STORE=True):
  /// then every rank, rank 0 included, connects to it as a client.
  bool launcher_hosts_store = false;
  /// How often the launcher has restarted this group
  /// (TORCHELASTIC_RESTART_COUNT). The store's keys of each attempt are kept
  /// apart, because a launcher's store outlives the attempts.
  int restart_count = 0;
  /// The launcher's run id (TORCHELASTIC_RUN_ID), empty when no elastic
  /// launcher started this process.
  std::string elastic_run_id;

  /// Fills fields from WORLD_SIZE, RANK, MASTER_ADDR, MASTER_PORT,
  /// LOCAL_RANK and torchrun's TORCHELASTIC_* variables when set (fields of
  /// unset variables keep their defaults). An invalid value throws a one-line
  /// std::runtime_error naming the variable and value.
  static DistributedOptions from_environment() {
    DistributedOptions options;
    if (const char* v = std::getenv("WORLD_SIZE")) {
      options.world_size =
          static_cast<int>(detail::parse_env_int("WORLD_SIZE", v, 1, 65535));
    }
    if (const char* v = std::getenv("RANK")) {
      options.rank =
          static_cast<int>(detail::parse_env_int("RANK", v, 0, 65534));
    }
    if (const char* v = std::getenv("MASTER_ADDR")) {
      if (*v == '\0') {
        throw std::runtime_error(
            "invalid MASTER_ADDR='': expected a host name or address");
      }
      options.master_addr = v;
    }
    if (const char* v = std::getenv("MASTER_PORT")) {
      options.master_port =
          static_cast<int>(detail::parse_env_int("MASTER_PORT", v, 1, 65535));
    }
    if (const char* v = std::getenv("LOCAL_RANK")) {
      options.local_rank =
          static_cast<int>(detail::parse_env_int("LOCAL_RANK", v, 0, 65534));
    }
    if (const char* v = std::getenv("TORCHELASTIC_USE_AGENT_STORE")) {
      // Python's torch.distributed compares with str(True) the same way.
      options.launcher_hosts_store = std::string(v) == "True";
    }
    if (const char* v = std::getenv("TORCHELASTIC_RESTART_COUNT")) {
      options.restart_count = static_cast<int>(
          detail::parse_env_int("TORCHELASTIC_RESTART_COUNT", v, 0, 1 << 30));
    }
    if (const char* v = std::getenv("TORCHELASTIC_RUN_ID")) {
      options.elastic_run_id = v;
    }
    return options;
  }

  /// True when more than one process takes part.
  bool enabled() const {
    return world_size > 1;
  }

  /// Throws a one-line std::runtime_error when a field is out of range
  /// (world size below 1, rank outside [0, world_size), a timeout that is not
  /// positive and, when enabled(), the port or an empty address).
  void validate() const {
    if (world_size < 1) {
      throw std::runtime_error(
          "invalid world size " + std::to_string(world_size) +
          ": must be >= 1");
    }
    if (rank < 0 || rank >= world_size) {
      throw std::runtime_error(
          "invalid rank " + std::to_string(rank) + ": must be in [0, " +
          std::to_string(world_size) + ") for world size " +
          std::to_string(world_size));
    }
    if (timeout.count() <= 0) {
      throw std::runtime_error(
          "invalid distributed timeout " + std::to_string(timeout.count()) +
          " ms: must be positive");
    }
    if (!enabled()) {
      return; // address and port are not used
    }
    if (master_port < 1 || master_port > 65535) {
      throw std::runtime_error(
          "invalid master port " + std::to_string(master_port) +
          ": must be in [1, 65535]");
    }
    if (master_addr.empty()) {
      throw std::runtime_error("invalid master address: empty");
    }
  }
};

} // namespace cifar
