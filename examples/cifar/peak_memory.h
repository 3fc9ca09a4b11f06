#pragma once

// The allocator's peak on the training device, as memory_bench reports it:
// CUDA's caching allocator on a GPU, torchrev's CPU meter otherwise.

#include <torchrev/memory/cpu_memory_meter.h>

#include <torch/types.h>

#ifdef TORCHREV_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#endif

#include <cstddef>

namespace cifar {

/// Starts a new peak on `device`.
inline void reset_peak_memory(torch::Device device) {
#ifdef TORCHREV_CUDA
  if (device.is_cuda()) {
    c10::cuda::CUDACachingAllocator::resetPeakStats(
        device.index() < 0 ? 0 : device.index());
    return;
  }
#endif
  (void)device;
  torchrev::CPUMemoryMeter::instance().reset_peak();
}

/// The peak allocated bytes on `device` since the last reset_peak_memory().
inline size_t peak_memory(torch::Device device) {
#ifdef TORCHREV_CUDA
  if (device.is_cuda()) {
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(
        device.index() < 0 ? 0 : device.index());
    return static_cast<size_t>(stats.allocated_bytes[0].peak);
  }
#endif
  (void)device;
  return torchrev::CPUMemoryMeter::instance().peak_bytes();
}

} // namespace cifar
