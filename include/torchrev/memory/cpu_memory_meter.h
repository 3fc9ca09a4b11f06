#pragma once

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>
#include <torch/version.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace torchrev {

/// A CPU allocator that counts the bytes LibTorch holds on the CPU: current,
/// peak, and optionally a budget past which allocations fail. Tests and
/// benchmarks share it to measure activation memory.
///
/// ```
/// auto& meter = torchrev::CPUMemoryMeter::install(); // before any tensor
/// meter.reset_peak();
/// train_step();
/// size_t activation_bytes = meter.peak_bytes() - meter.current_bytes();
/// ```
///
/// It counts the bytes requested by tensors allocated while it is installed
/// (allocator overhead and memory outside LibTorch's CPU allocator are not
/// counted). Install it before the first tensor is created: tensors allocated
/// earlier are never counted. There is one meter per process.
class CPUMemoryMeter final : public c10::Allocator {
 public:
  /// The process's meter (not necessarily installed).
  static CPUMemoryMeter& instance() {
    // Never destroyed: tensors it allocated may outlive static destruction.
    static auto* meter = new CPUMemoryMeter();
    return *meter;
  }

  /// Installs the meter as LibTorch's CPU allocator (once; later calls only
  /// return it) and returns it.
  static CPUMemoryMeter& install() {
    CPUMemoryMeter& meter = instance();
    if (c10::GetCPUAllocator() != &meter) {
      c10::SetCPUAllocator(&meter, /*priority=*/UINT8_MAX);
    }
    return meter;
  }

  /// True when the meter is LibTorch's current CPU allocator.
  static bool installed() {
    return c10::GetCPUAllocator() == &instance();
  }

  /// Bytes currently allocated through the meter.
  size_t current_bytes() const noexcept {
    return current_.load(std::memory_order_relaxed);
  }

  /// Highest `current_bytes()` since the last `reset_peak()`.
  size_t peak_bytes() const noexcept {
    return peak_.load(std::memory_order_relaxed);
  }

  /// Starts a new peak measurement from the current allocation.
  void reset_peak() noexcept {
    peak_.store(current_bytes(), std::memory_order_relaxed);
  }

  /// Makes allocations that would raise `current_bytes()` above `bytes` fail
  /// with `c10::OutOfMemoryError`. Zero (the default) means no budget.
  void set_budget(size_t bytes) noexcept {
    budget_.store(bytes, std::memory_order_relaxed);
  }

  /// The budget in bytes, 0 for none.
  size_t budget() const noexcept {
    return budget_.load(std::memory_order_relaxed);
  }

#if TORCH_VERSION_MAJOR > 2 || \
    (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 3)
  c10::DataPtr allocate(size_t nbytes) override {
    return allocate_counted(nbytes);
  }
  void copy_data(void* dest, const void* src, std::size_t count)
      const override {
    std::memcpy(dest, src, count);
  }
#else
  c10::DataPtr allocate(size_t nbytes) const override {
    return const_cast<CPUMemoryMeter*>(this)->allocate_counted(nbytes);
  }
#endif

  /// `raw_allocate`/`raw_deallocate` (used by oneDNN) need a deleter that
  /// takes the data pointer; ours does, since data == context.
  c10::DeleterFnPtr raw_deleter() const override {
    return &deallocate;
  }

 private:
  // Every block starts with a header that records its size, so the deleter
  // (which only receives the data pointer) can uncount it. Its size keeps the
  // data 64-byte aligned, as LibTorch's own allocator does.
  static constexpr size_t kHeader = 64;
  static constexpr size_t kAlignment = 64;

  CPUMemoryMeter() = default;

  c10::DataPtr allocate_counted(size_t nbytes) {
    const c10::Device device(c10::DeviceType::CPU);
    if (nbytes == 0) {
      return {nullptr, nullptr, &deallocate, device};
    }
    const size_t now =
        current_.fetch_add(nbytes, std::memory_order_relaxed) + nbytes;
    const size_t limit = budget();
    if (limit != 0 && now > limit) {
      current_.fetch_sub(nbytes, std::memory_order_relaxed);
      TORCH_CHECK_WITH(
          OutOfMemoryError,
          false,
          "torchrev::CPUMemoryMeter: allocating ",
          nbytes,
          " bytes would exceed the budget of ",
          limit,
          " bytes (",
          now - nbytes,
          " bytes in use)");
    }
    const size_t total =
        (kHeader + nbytes + kAlignment - 1) / kAlignment * kAlignment;
    auto* base = static_cast<char*>(std::aligned_alloc(kAlignment, total));
    if (base == nullptr) {
      current_.fetch_sub(nbytes, std::memory_order_relaxed);
      TORCH_CHECK_WITH(
          OutOfMemoryError,
          false,
          "torchrev::CPUMemoryMeter: out of memory allocating ",
          nbytes,
          " bytes");
    }
    // The peak counts only allocations that succeeded.
    size_t peak = peak_.load(std::memory_order_relaxed);
    while (now > peak &&
           !peak_.compare_exchange_weak(peak, now, std::memory_order_relaxed)) {
    }
    std::memcpy(base, &nbytes, sizeof(nbytes));
    void* data = base + kHeader;
    return {data, data, &deallocate, device};
  }

  static void deallocate(void* data) {
    if (data == nullptr) {
      return;
    }
    char* base = static_cast<char*>(data) - kHeader;
    size_t nbytes = 0;
    std::memcpy(&nbytes, base, sizeof(nbytes));
    instance().current_.fetch_sub(nbytes, std::memory_order_relaxed);
    std::free(base);
  }

  std::atomic<size_t> current_{0};
  std::atomic<size_t> peak_{0};
  std::atomic<size_t> budget_{0};
};

} // namespace torchrev
