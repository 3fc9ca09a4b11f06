#pragma once

// Data set files in their distribution formats, written by tests.

#include <zlib.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

namespace torchrev {
namespace testing {

/// Writes `n` CIFAR records; record i has label (i * 7) % classes and pixel
/// value (i + channel + row + col) % 256, so a test can check decoding.
inline void write_cifar(
    const std::filesystem::path& file,
    int n,
    int label_bytes,
    int classes) {
  std::ofstream out(file, std::ios::binary);
  for (int i = 0; i < n; ++i) {
    if (label_bytes == 2) {
      out.put(static_cast<char>(i % 20)); // coarse label
    }
    out.put(static_cast<char>((i * 7) % classes));
    for (int c = 0; c < 3; ++c) {
      for (int r = 0; r < 32; ++r) {
        for (int k = 0; k < 32; ++k) {
          out.put(static_cast<char>((i + c + r + k) % 256));
        }
      }
    }
  }
}

/// A CIFAR-10 folder with `per_batch` images in each of the five training
/// batches and `test` test images.
inline void write_cifar10_dir(
    const std::filesystem::path& dir,
    int per_batch,
    int test) {
  std::filesystem::create_directories(dir);
  for (int i = 1; i <= 5; ++i) {
    write_cifar(
        dir / ("data_batch_" + std::to_string(i) + ".bin"), per_batch, 1, 10);
  }
  write_cifar(dir / "test_batch.bin", test, 1, 10);
}

/// Writes a gzipped IDX file: the big-endian 32-bit `header` words, then
/// `payload`.
inline void write_idx_gz(
    const std::filesystem::path& file,
    const std::vector<uint32_t>& header,
    const std::vector<uint8_t>& payload) {
  std::string bytes;
  for (uint32_t word : header) {
    for (int shift = 24; shift >= 0; shift -= 8) {
      bytes.push_back(static_cast<char>((word >> shift) & 0xff));
    }
  }
  bytes.append(payload.begin(), payload.end());
  gzFile out = gzopen(file.c_str(), "wb");
  gzwrite(out, bytes.data(), static_cast<unsigned>(bytes.size()));
  gzclose(out);
}

} // namespace testing
} // namespace torchrev
