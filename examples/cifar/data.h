#pragma once

// Image classification data sets in their distribution formats:
//   CIFAR-10   data_batch_{1..5}.bin, test_batch.bin   (1 label byte + 3072)
//   CIFAR-100  train.bin, test.bin                     (2 label bytes + 3072)
//   Fashion-MNIST  {train,t10k}-{images-idx3,labels-idx1}-ubyte.gz (IDX)
// Nothing is ever downloaded. Every reader checks sizes and headers and
// reports a truncated or corrupt file by name.

#include "formats.h"

#include <torch/torch.h>
#include <zlib.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace cifar {

namespace fs = std::filesystem;

/// Where Debian's dataset-fashion-mnist package installs Fashion-MNIST.
inline const char* kFashionMnistDir = "/usr/share/datasets/fashion-mnist";

/// Images as uint8 (N, C, H, W) and labels as int64 (N).
struct Split {
  torch::Tensor images;
  torch::Tensor labels;
  int64_t size() const {
    return images.size(0);
  }
};

struct Dataset {
  std::string name; // "cifar10", "cifar100" or "fashion-mnist"
  int64_t num_classes = 10;
  Split train, test;
  /// Per-channel mean and standard deviation of the training images in
  /// [0, 1], used to normalise both splits.
  torch::Tensor mean, std;
  int64_t channels() const {
    return train.images.size(1);
  }
  /// Height (and width) of the images: 32 for CIFAR, 28 for Fashion-MNIST.
  int64_t image_size() const {
    return train.images.size(2);
  }
};

namespace detail {

/// Throws DataError unless `path` is an existing regular file.
inline void check_regular_file(const fs::path& path) {
  std::error_code ec;
  const auto status = fs::status(path, ec);
  if (!fs::exists(status)) {
    throw DataError(path.string() + ": missing");
  }
  if (!fs::is_regular_file(status)) {
    throw DataError(path.string() + ": not a regular file");
  }
}

inline std::vector<uint8_t> read_file(const fs::path& path) {
  check_regular_file(path);
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    throw DataError("cannot open " + path.string());
  }
  return std::vector<uint8_t>(
      std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

inline std::vector<uint8_t> read_gzip(const fs::path& path) {
  check_regular_file(path);
  gzFile file = gzopen(path.c_str(), "rb");
  if (file == nullptr) {
    throw DataError("cannot open " + path.string());
  }
  std::vector<uint8_t> data;
  std::vector<uint8_t> chunk(1 << 20);
  int n = 0;
  while ((n = gzread(file, chunk.data(), static_cast<unsigned>(chunk.size()))) >
         0) {
    data.insert(data.end(), chunk.begin(), chunk.begin() + n);
  }
  int error = Z_OK;
  const char* message = gzerror(file, &error);
  const bool failed = n < 0 || (error != Z_OK && error != Z_STREAM_END);
  const std::string what = failed ? std::string(message) : "";
  gzclose(file);
  if (failed) {
    throw DataError(path.string() + ": corrupt gzip data (" + what + ")");
  }
  return data;
}

/// Appends the records of one CIFAR binary file to images/labels.
inline void read_cifar_file(
    const fs::path& path,
    int label_bytes,
    std::vector<uint8_t>& images,
    std::vector<int64_t>& labels) {
  const auto data = read_file(path);
  const size_t records = formats::check_cifar(
      data.data(), data.size(), label_bytes, path.string());
  const size_t record = label_bytes + formats::kCifarImageBytes;
  for (size_t r = 0; r < records; ++r) {
    const size_t offset = r * record;
    labels.push_back(data[offset + label_bytes - 1]); // fine label last
    images.insert(
        images.end(),
        data.begin() + offset + label_bytes,
        data.begin() + offset + record);
  }
}

inline Split cifar_split(const std::vector<fs::path>& files, int label_bytes) {
  std::vector<uint8_t> images;
  std::vector<int64_t> labels;
  for (const auto& file : files) {
    read_cifar_file(file, label_bytes, images, labels);
  }
  const auto n = static_cast<int64_t>(labels.size());
  Split split;
  split.images =
      torch::from_blob(images.data(), {n, 3, 32, 32}, torch::kUInt8).clone();
  split.labels = torch::from_blob(labels.data(), {n}, torch::kInt64).clone();
  return split;
}

inline Split idx_split(
    const fs::path& images_path,
    const fs::path& labels_path) {
  const auto images = read_gzip(images_path);
  const auto labels = read_gzip(labels_path);
  const auto header = formats::check_idx_images(
      images.data(), images.size(), images_path.string());
  formats::check_idx_labels(
      labels.data(), labels.size(), header.count, 9, labels_path.string());
  const auto count = static_cast<int64_t>(header.count);
  Split split;
  split.images = torch::from_blob(
                     const_cast<uint8_t*>(images.data()) +
                         formats::IdxImages::kHeaderBytes,
                     {count, 1, int64_t(header.rows), int64_t(header.cols)},
                     torch::kUInt8)
                     .clone();
  split.labels =
      torch::from_blob(
          const_cast<uint8_t*>(labels.data()) + 8, {count}, torch::kUInt8)
          .to(torch::kInt64);
  return split;
}

/// Per-channel mean and standard deviation over the training images, in
/// chunks so that no float copy of the whole set is ever allocated.
inline void set_statistics(Dataset& dataset) {
  const auto& images = dataset.train.images;
  const int64_t c = images.size(1);
  auto sum = torch::zeros({c}, torch::kFloat64);
  auto sum_sq = torch::zeros({c}, torch::kFloat64);
  constexpr int64_t kChunk = 2000;
  for (int64_t begin = 0; begin < images.size(0); begin += kChunk) {
    auto x = images.narrow(0, begin, std::min(kChunk, images.size(0) - begin))
                 .to(torch::kFloat64)
                 .div_(255.0);
    sum += x.sum({0, 2, 3});
    sum_sq += x.pow(2).sum({0, 2, 3});
  }
  // Values per channel (numel is a multiple of c).
  const int64_t per_channel = images.numel() / c;
  const auto count = static_cast<double>(per_channel);
  auto mean = sum / count;
  auto var = (sum_sq / count - mean * mean) * (count / (count - 1.0));
  dataset.mean = mean.to(torch::kFloat32);
  dataset.std = var.clamp_min(1e-12).sqrt().to(torch::kFloat32);
}

} // namespace detail

/// True when `dir` holds the CIFAR-10 binary files.
inline bool has_cifar10(const fs::path& dir) {
  return fs::exists(dir / "data_batch_1.bin") &&
      fs::exists(dir / "test_batch.bin");
}

/// True when `dir` holds the CIFAR-100 binary files.
inline bool has_cifar100(const fs::path& dir) {
  return fs::exists(dir / "train.bin") && fs::exists(dir / "test.bin");
}

/// CIFAR-10 from `dir` (the extracted cifar-10-batches-bin folder).
inline Dataset load_cifar10(const fs::path& dir) {
  if (!has_cifar10(dir)) {
    throw DataError(
        dir.string() + ": no CIFAR-10 binary files (data_batch_1.bin ... " +
        "data_batch_5.bin, test_batch.bin)");
  }
  std::vector<fs::path> train;
  for (int i = 1; i <= 5; ++i) {
    auto file = dir / ("data_batch_" + std::to_string(i) + ".bin");
    if (!fs::exists(file)) {
      throw DataError(
          file.string() + ": missing (CIFAR-10 has 5 training batches)");
    }
    train.push_back(file);
  }
  Dataset dataset;
  dataset.name = "cifar10";
  dataset.num_classes = 10;
  dataset.train = detail::cifar_split(train, 1);
  dataset.test = detail::cifar_split({dir / "test_batch.bin"}, 1);
  detail::set_statistics(dataset);
  return dataset;
}

/// CIFAR-100 (fine labels) from `dir` (the extracted cifar-100-binary folder).
inline Dataset load_cifar100(const fs::path& dir) {
  if (!has_cifar100(dir)) {
    throw DataError(
        dir.string() + ": no CIFAR-100 binary files (train.bin, test.bin)");
  }
  Dataset dataset;
  dataset.name = "cifar100";
  dataset.num_classes = 100;
  dataset.train = detail::cifar_split({dir / "train.bin"}, 2);
  dataset.test = detail::cifar_split({dir / "test.bin"}, 2);
  detail::set_statistics(dataset);
  return dataset;
}

/// Fashion-MNIST from `dir` (gzipped IDX files, as Debian installs them).
inline Dataset load_fashion_mnist(const fs::path& dir = kFashionMnistDir) {
  const char* files[] = {
      "train-images-idx3-ubyte.gz",
      "train-labels-idx1-ubyte.gz",
      "t10k-images-idx3-ubyte.gz",
      "t10k-labels-idx1-ubyte.gz"};
  for (const char* file : files) {
    if (!fs::exists(dir / file)) {
      throw DataError(
          (dir / file).string() + ": missing (install Debian's " +
          "dataset-fashion-mnist package)");
    }
  }
  Dataset dataset;
  dataset.name = "fashion-mnist";
  dataset.num_classes = 10;
  dataset.train = detail::idx_split(dir / files[0], dir / files[1]);
  dataset.test = detail::idx_split(dir / files[2], dir / files[3]);
  detail::set_statistics(dataset);
  return dataset;
}

/// Loads `name` ("auto", "cifar10", "cifar100", "fashion-mnist"). "auto"
/// means CIFAR-10 when `data_dir` holds it, else Fashion-MNIST from
/// `data_dir` if it holds it (an error when it holds neither), and
/// Fashion-MNIST from Debian's location when no `data_dir` is given.
inline Dataset load_dataset(
    const std::string& name,
    const std::string& data_dir) {
  if (!data_dir.empty() && !fs::is_directory(data_dir)) {
    throw DataError("--data-dir " + data_dir + ": no such directory");
  }
  if (name == "cifar10") {
    return load_cifar10(data_dir);
  }
  if (name == "cifar100") {
    return load_cifar100(data_dir);
  }
  if (name == "fashion-mnist") {
    return load_fashion_mnist(data_dir.empty() ? kFashionMnistDir : data_dir);
  }
  if (name == "auto") {
    if (!data_dir.empty() && has_cifar10(data_dir)) {
      return load_cifar10(data_dir);
    }
    if (!data_dir.empty() &&
        fs::exists(fs::path(data_dir) / "train-images-idx3-ubyte.gz")) {
      return load_fashion_mnist(data_dir);
    }
    if (!data_dir.empty()) {
      // A data dir was given for a reason: falling back to another data set
      // would silently train on something else.
      throw DataError(
          "--data-dir " + data_dir +
          " holds neither CIFAR-10 (data_batch_1.bin, test_batch.bin) nor "
          "Fashion-MNIST (train-images-idx3-ubyte.gz); for CIFAR-100 pass "
          "--dataset cifar100");
    }
    return load_fashion_mnist(kFashionMnistDir);
  }
  throw DataError(
      "unknown dataset '" + name +
      "'; expected auto, cifar10, cifar100 or fashion-mnist");
}

/// A batch as float images normalised per channel, with CIFAR-style
/// augmentation when `augment`: random crop with 4-pixel zero padding and a
/// random horizontal flip, drawn from `generator` only.
inline torch::Tensor make_batch(
    const Dataset& dataset,
    const Split& split,
    const torch::Tensor& indices,
    bool augment,
    torch::Generator* generator) {
  auto images =
      split.images.index_select(0, indices).to(torch::kFloat32).div_(255.0);
  images = (images - dataset.mean.view({1, -1, 1, 1})) /
      dataset.std.view({1, -1, 1, 1});
  if (!augment) {
    return images;
  }
  const int64_t n = images.size(0), h = images.size(2), w = images.size(3);
  constexpr int64_t kPad = 4;
  auto padded = torch::constant_pad_nd(images, {kPad, kPad, kPad, kPad}, 0.0);
  auto offsets =
      torch::randint(0, 2 * kPad + 1, {n, 2}, *generator, torch::kInt64);
  auto flips = torch::randint(0, 2, {n}, *generator, torch::kInt64);
  auto out = torch::empty_like(images);
  auto offsets_a = offsets.accessor<int64_t, 2>();
  auto flips_a = flips.accessor<int64_t, 1>();
  for (int64_t i = 0; i < n; ++i) {
    auto crop =
        padded[i].narrow(1, offsets_a[i][0], h).narrow(2, offsets_a[i][1], w);
    out[i].copy_(flips_a[i] ? crop.flip({2}) : crop);
  }
  return out;
}

} // namespace cifar
