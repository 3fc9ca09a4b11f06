#pragma once

// The data set file formats, checked byte by byte without LibTorch (so that
// the fuzz targets in fuzz/ exercise exactly this code):
//   CIFAR-10/100  records of `label_bytes` label bytes + 3072 pixel bytes
//   IDX (MNIST)   big-endian header: magic, count[, rows, cols], then bytes
// Every check names the file and says what was expected and what arrived.
// Sizes from headers are compared with the bytes present before anything is
// multiplied or allocated, so a crafted header cannot overflow or make the
// reader allocate what the file does not hold.

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace cifar {

/// Thrown for missing, unreadable, truncated or corrupt data.
struct DataError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

namespace formats {

constexpr size_t kCifarImageBytes = size_t{3} * 32 * 32;

/// The number of records in a CIFAR binary file's bytes (`label_bytes` 1 for
/// CIFAR-10, 2 for CIFAR-100, whose fine label comes last). Throws DataError
/// naming `name` for a size that is not a positive multiple of the record
/// or a label out of range.
inline size_t check_cifar(
    const uint8_t* data,
    size_t size,
    int label_bytes,
    const std::string& name) {
  if (label_bytes != 1 && label_bytes != 2) {
    throw DataError(
        name + ": CIFAR records have 1 or 2 label bytes, not " +
        std::to_string(label_bytes));
  }
  const size_t record = static_cast<size_t>(label_bytes) + kCifarImageBytes;
  if (size == 0 || size % record != 0) {
    throw DataError(
        name + ": truncated or not a CIFAR binary file (" +
        std::to_string(size) + " bytes is not a positive multiple of the " +
        std::to_string(record) + "-byte record)");
  }
  const unsigned max_label = label_bytes == 1 ? 9 : 99;
  for (size_t offset = 0; offset < size; offset += record) {
    const unsigned label = data[offset + label_bytes - 1];
    if (label > max_label) {
      throw DataError(
          name + ": corrupt record " + std::to_string(offset / record) +
          " (label " + std::to_string(label) + " > " +
          std::to_string(max_label) + ")");
    }
  }
  return size / record;
}

inline uint32_t big_endian_u32(const uint8_t* data) {
  return (uint32_t(data[0]) << 24) | (uint32_t(data[1]) << 16) |
      (uint32_t(data[2]) << 8) | uint32_t(data[3]);
}

/// The header of an IDX image file.
struct IdxImages {
  uint64_t count = 0, rows = 0, cols = 0;
  static constexpr size_t kHeaderBytes = 16;
};

/// The largest image side accepted (real files have 28).
constexpr uint64_t kMaxIdxSide = 1 << 14;

/// Checks an IDX image file's bytes (magic 0x803, count, rows, cols, then
/// count*rows*cols pixel bytes) and returns its header.
inline IdxImages check_idx_images(
    const uint8_t* data,
    size_t size,
    const std::string& name) {
  if (size < IdxImages::kHeaderBytes || big_endian_u32(data) != 0x00000803) {
    throw DataError(name + ": not an IDX image file (bad magic number)");
  }
  IdxImages h;
  h.count = big_endian_u32(data + 4);
  h.rows = big_endian_u32(data + 8);
  h.cols = big_endian_u32(data + 12);
  if (h.count == 0 || h.rows == 0 || h.cols == 0 || h.rows > kMaxIdxSide ||
      h.cols > kMaxIdxSide) {
    throw DataError(
        name + ": header claims " + std::to_string(h.count) + " images of " +
        std::to_string(h.rows) + "x" + std::to_string(h.cols) +
        " pixels; expected at least one image of 1 to " +
        std::to_string(kMaxIdxSide) + " pixels a side");
  }
  const uint64_t pixels = size - IdxImages::kHeaderBytes;
  const uint64_t image = h.rows * h.cols; // at most 2^28: no overflow
  if (pixels % image != 0 || pixels / image != h.count) {
    throw DataError(
        name + ": truncated or corrupt (the header claims " +
        std::to_string(h.count) + " images of " + std::to_string(h.rows) + "x" +
        std::to_string(h.cols) + ", the file holds " + std::to_string(pixels) +
        " bytes of pixels)");
  }
  return h;
}

/// Checks an IDX label file's bytes (magic 0x801, count, then one byte per
/// label, each at most `max_label`) against `count` images.
inline void check_idx_labels(
    const uint8_t* data,
    size_t size,
    uint64_t count,
    unsigned max_label,
    const std::string& name) {
  constexpr size_t kHeaderBytes = 8;
  if (size < kHeaderBytes || big_endian_u32(data) != 0x00000801) {
    throw DataError(name + ": not an IDX label file (bad magic number)");
  }
  if (big_endian_u32(data + 4) != count || size - kHeaderBytes != count) {
    throw DataError(
        name + ": expected " + std::to_string(count) +
        " labels to match the images, got a file of " + std::to_string(size) +
        " bytes");
  }
  for (size_t i = kHeaderBytes; i < size; ++i) {
    if (data[i] > max_label) {
      throw DataError(
          name + ": corrupt (label " + std::to_string(data[i]) + " > " +
          std::to_string(max_label) + " at entry " +
          std::to_string(i - kHeaderBytes) + ")");
    }
  }
}

} // namespace formats
} // namespace cifar
