#pragma once

/// The c10d headers the distributed example uses, and shims for the
/// LibTorch versions it builds with (1.13 and 2.x).

#include <torch/optim/optimizer.h>
#include <torch/version.h>

#include <c10/util/Exception.h>

// ProcessGroupGloo.hpp is empty unless USE_C10D_GLOO is defined; LibTorch's
// CMake package defines it, a hand-written compile line usually does not.
#ifndef USE_C10D_GLOO
#define USE_C10D_GLOO
#define CIFAR_DISTRIBUTED_DEFINED_USE_C10D_GLOO
#endif
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#ifdef CIFAR_DISTRIBUTED_DEFINED_USE_C10D_GLOO
#undef USE_C10D_GLOO
#undef CIFAR_DISTRIBUTED_DEFINED_USE_C10D_GLOO
#endif
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

// Defined (by the CMake `torch` target) only for LibTorch built with NCCL.
#ifdef USE_C10D_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#include <torch/cuda.h>
#endif

#include <string>

namespace cifar {
namespace detail {

// LibTorch 2.0 split ProcessGroup into a dispatching front end and Backend
// implementations (ProcessGroupGloo/NCCL derive from c10d::Backend there);
// in 1.13 they derive from c10d::ProcessGroup. Both bases expose the
// collectives used here with the same signatures.
#if TORCH_VERSION_MAJOR >= 2
using CommBackend = c10d::Backend;
#else
using CommBackend = c10d::ProcessGroup;
#endif

// 1.13 moved Work out of ProcessGroup into c10d::Work (Work.hpp); 1.12 and
// older only have the nested ProcessGroup::Work.
#if TORCH_VERSION_MAJOR == 1 && TORCH_VERSION_MINOR < 13
using CommWork = c10d::ProcessGroup::Work;
#else
using CommWork = c10d::Work;
#endif

/// A TCPStore. LibTorch 2.4 made the libuv server the default; a LibTorch
/// built without libuv throws for it, so fall back to the classic server.
inline c10::intrusive_ptr<c10d::TCPStore> make_tcp_store(
    const std::string& host,
    c10d::TCPStoreOptions options) {
#if TORCH_VERSION_MAJOR > 2 || \
    (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)
  if (options.useLibUV) {
    try {
      return c10::make_intrusive<c10d::TCPStore>(host, options);
    } catch (const c10::Error& e) {
      const std::string what = e.what_without_backtrace();
      if (what.find("libuv") == std::string::npos &&
          what.find("libUV") == std::string::npos) {
        throw;
      }
      options.useLibUV = false;
    }
  }
#endif
  return c10::make_intrusive<c10d::TCPStore>(host, options);
}

/// Zeroes every gradient in place, keeping its memory, on every LibTorch:
/// `Optimizer::zero_grad()` does this in 1.13 but frees the gradients (sets
/// them to none) by default since 2.0, which would change measured peaks.
inline void zero_grad_in_place(torch::optim::Optimizer& optimizer) {
#if TORCH_VERSION_MAJOR >= 2
  optimizer.zero_grad(/*set_to_none=*/false);
#else
  optimizer.zero_grad();
#endif
}

} // namespace detail
} // namespace cifar
