#pragma once

/// How the ranks of a run find each other: rank 0 (or the launcher) hosts a
/// c10d::TCPStore at MASTER_ADDR:MASTER_PORT, every rank joins it, and a Gloo
/// process group (NCCL for CUDA devices when LibTorch has it) is created on
/// top of it.

#include "communicator.h"
#include "compat.h"
#include "messages.h"
#include "options.h"

#include <torch/types.h>

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <future>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace cifar {

namespace detail {

/// This host's IPv4 address on the route to `host`, or "" when `host`
/// does not resolve or no route leads there.
inline std::string local_address_towards(const std::string& host) {
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_DGRAM;
  addrinfo* found = nullptr;
  if (::getaddrinfo(host.c_str(), "9", &hints, &found) != 0 ||
      found == nullptr) {
    return "";
  }
  std::string local;
  const int fd = ::socket(AF_INET, SOCK_DGRAM, 0);
  if (fd >= 0 && ::connect(fd, found->ai_addr, found->ai_addrlen) == 0) {
    sockaddr_in bound{};
    socklen_t length = sizeof(bound);
    char text[INET_ADDRSTRLEN] = {};
    if (::getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &length) == 0 &&
        ::inet_ntop(AF_INET, &bound.sin_addr, text, sizeof(text)) != nullptr) {
      local = text;
    }
  }
  if (fd >= 0) {
    ::close(fd);
  }
  ::freeaddrinfo(found);
  return local;
}

/// Gloo transport device: the interface in GLOO_SOCKET_IFNAME if set, the
/// loopback address when the master is local, else this host's address.
inline std::shared_ptr<::gloo::transport::Device> gloo_device(
    const std::string& master_addr) {
  if (const char* ifname = std::getenv("GLOO_SOCKET_IFNAME")) {
    if (*ifname != '\0') {
      return c10d::ProcessGroupGloo::createDeviceForInterface(ifname);
    }
  }
  if (master_addr == "localhost" || master_addr.rfind("127.", 0) == 0) {
    return c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1");
  }
  // Gloo's default resolves this host's name, which on many machines maps
  // to a loopback address that peers cannot reach. Use the local address
  // that routes to the master instead: what a connected UDP socket is
  // bound to (nothing is sent).
  const std::string local = local_address_towards(master_addr);
  if (!local.empty()) {
    std::fprintf(
        stderr,
        "cifar_train: gloo uses %s, the local address that routes to %s "
        "(set GLOO_SOCKET_IFNAME to choose an interface)\n",
        local.c_str(),
        master_addr.c_str());
    return c10d::ProcessGroupGloo::createDeviceForHostname(local);
  }
  return c10d::ProcessGroupGloo::createDefaultDevice();
}

} // namespace detail

/// Connects this process to the other `options.world_size - 1` ranks and
/// returns its Communicator. Validates `options` first. A peer that never
/// joins makes this throw within `options.timeout` with a message like
/// "rank 1: timed out after 60 s waiting for 2 ranks at 127.0.0.1:29500"
/// instead of hanging; every other failure is a one-line
/// std::runtime_error naming the endpoint.
inline std::shared_ptr<Communicator> rendezvous(
    const DistributedOptions& o,
    torch::Device device) {
  o.validate();
  const std::string where = "rank " + std::to_string(o.rank) + ": ";
  const std::string endpoint =
      o.master_addr + ":" + std::to_string(o.master_port);
  const auto start = std::chrono::steady_clock::now();
  auto fail = [&](const std::exception& e) {
    const auto elapsed = std::chrono::steady_clock::now() - start;
    const std::string cause = detail::short_message(e);
    const bool timed_out = elapsed >= o.timeout * 9 / 10 ||
        cause.find("imed out") != std::string::npos ||
        cause.find("imeout") != std::string::npos;
    if (timed_out) {
      return std::runtime_error(
          where + "timed out after " + detail::format_seconds(o.timeout) +
          " s waiting for " + std::to_string(o.world_size) + " ranks at " +
          endpoint + " (" + cause + ")");
    }
    return std::runtime_error(
        where + "rendezvous with " + std::to_string(o.world_size) +
        " ranks at " + endpoint + " failed: " + cause);
  };

  // Joining runs on a thread of its own: a store that accepts the
  // connection but never answers (a torchrun 2.x store and a LibTorch 1.x
  // client speak different protocols) would otherwise block past every
  // timeout. The thread owns what it uses; a hung one is abandoned.
  auto joining =
      std::make_shared<std::promise<c10::intrusive_ptr<c10d::Store>>>();
  auto joined_store = joining->get_future();
  std::thread([joining, o, start] {
    try {
      c10d::TCPStoreOptions store_options;
      store_options.port = static_cast<std::uint16_t>(o.master_port);
      store_options.isServer = o.rank == 0 && !o.launcher_hosts_store;
      // TCPStore's own waitWorkers (1.13) returns silently on timeout, so
      // the ranks count themselves in below instead.
      store_options.waitWorkers = false;
      store_options.timeout = o.timeout;
      // Each attempt of a restarted group has keys of its own: a
      // launcher's store keeps the previous attempt's (its join count
      // included).
      c10::intrusive_ptr<c10d::Store> store =
          c10::make_intrusive<c10d::PrefixStore>(
              "torchrev/attempt" + std::to_string(o.restart_count),
              detail::make_tcp_store(o.master_addr, store_options));
      const auto joined = store->add("cifar_dp/joined", 1);
      if (joined == o.world_size) {
        store->set("cifar_dp/all_joined", std::vector<uint8_t>{1});
      }
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
          start + o.timeout - std::chrono::steady_clock::now());
      store->wait(
          {"cifar_dp/all_joined"},
          std::max(left, std::chrono::milliseconds(1)));
      joining->set_value(std::move(store));
    } catch (...) {
      joining->set_exception(std::current_exception());
    }
  }).detach();
  // The store's own timeouts end the wait first; this is the backstop.
  if (joined_store.wait_for(o.timeout + std::chrono::seconds(5)) !=
      std::future_status::ready) {
    throw std::runtime_error(
        where + "timed out after " + detail::format_seconds(o.timeout) +
        " s waiting for an answer from the store at " + endpoint +
        (o.launcher_hosts_store
             ? " (hosted by the launcher: a LibTorch 1.x build cannot use "
               "the store of a torchrun from torch 2.x; launch "
               "with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 so that rank 0 "
               "hosts one)"
             : ""));
  }
  c10::intrusive_ptr<c10d::Store> store;
  try {
    store = joined_store.get();
  } catch (const std::exception& e) {
    throw fail(e);
  }
  auto connected = [&](c10::intrusive_ptr<detail::CommBackend> backend,
                       torch::Device comm_device) {
    return std::make_shared<Communicator>(
        o.rank,
        o.world_size,
        o.timeout,
        store,
        std::move(backend),
        comm_device);
  };

#ifdef USE_C10D_NCCL
  if (device.is_cuda() && torch::cuda::is_available()) {
    try {
      auto nccl_options = c10d::ProcessGroupNCCL::Options::create();
      nccl_options->timeout = o.timeout;
      return connected(
          c10::make_intrusive<c10d::ProcessGroupNCCL>(
              store, o.rank, o.world_size, nccl_options),
          device);
    } catch (const std::exception& e) {
      throw fail(e);
    }
  }
#endif
  (void)device;
  try {
    auto gloo_options = c10d::ProcessGroupGloo::Options::create(o.timeout);
    gloo_options->devices.push_back(detail::gloo_device(o.master_addr));
    // Gloo reduces CUDA tensors only in CUDA builds; keep CPU otherwise.
    return connected(
        c10::make_intrusive<c10d::ProcessGroupGloo>(
            store, o.rank, o.world_size, gloo_options),
        torch::kCPU);
  } catch (const std::exception& e) {
    throw fail(e);
  }
}

} // namespace cifar
