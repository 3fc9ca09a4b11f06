// The example's data readers: CIFAR binary files written by the test in the
// real format, and Debian's real Fashion-MNIST files.

#include "cifar_files.h"
#include "data.h"
#include "scratch_dir.h"
#include "test_util.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <random>

namespace fs = std::filesystem;
using torchrev::testing::write_cifar;

namespace {

/// A scratch folder removed at the end of the test.
struct TempDir : torchrev::testing::ScratchDir {
  TempDir() : ScratchDir("data") {}
};

std::string error_of(const std::function<void()>& fn) {
  return torchrev::testing::error_of<cifar::DataError>(fn);
}

} // namespace

TEST(CifarReader, ReadsCifar10BinaryBatches) {
  TempDir dir;
  for (int b = 1; b <= 5; ++b) {
    write_cifar(
        dir.path / ("data_batch_" + std::to_string(b) + ".bin"), 4, 1, 10);
  }
  write_cifar(dir.path / "test_batch.bin", 3, 1, 10);
  auto data = cifar::load_cifar10(dir.path);
  EXPECT_EQ(data.name, "cifar10");
  EXPECT_EQ(data.train.images.sizes(), torch::IntArrayRef({20, 3, 32, 32}));
  EXPECT_EQ(data.test.images.sizes(), torch::IntArrayRef({3, 3, 32, 32}));
  EXPECT_EQ(data.train.labels[2].item<int64_t>(), 14 % 10);
  EXPECT_EQ(data.test.images[2][1][3][4].item<int>(), (2 + 1 + 3 + 4) % 256);
  EXPECT_EQ(data.mean.sizes(), torch::IntArrayRef({3}));
  // --dataset auto picks CIFAR-10 when the folder holds it.
  EXPECT_EQ(cifar::load_dataset("auto", dir.path.string()).name, "cifar10");
}

TEST(CifarReader, ReadsCifar100FineLabels) {
  TempDir dir;
  write_cifar(dir.path / "train.bin", 6, 2, 100);
  write_cifar(dir.path / "test.bin", 2, 2, 100);
  auto data = cifar::load_cifar100(dir.path);
  EXPECT_EQ(data.num_classes, 100);
  EXPECT_EQ(data.train.labels[5].item<int64_t>(), 35);
  EXPECT_EQ(data.train.images[5][0][0][0].item<int>(), 5);
}

TEST(CifarReader, TruncatedFileIsAClearError) {
  TempDir dir;
  for (int b = 1; b <= 5; ++b) {
    write_cifar(
        dir.path / ("data_batch_" + std::to_string(b) + ".bin"), 2, 1, 10);
  }
  write_cifar(dir.path / "test_batch.bin", 2, 1, 10);
  fs::resize_file(dir.path / "data_batch_3.bin", 3073 + 100);
  const auto message = error_of([&] { cifar::load_cifar10(dir.path); });
  EXPECT_NE(message.find("data_batch_3.bin"), std::string::npos) << message;
  EXPECT_NE(message.find("truncated"), std::string::npos) << message;
}

TEST(CifarReader, CorruptLabelAndMissingFilesAreClearErrors) {
  TempDir dir;
  write_cifar(dir.path / "train.bin", 2, 1, 10); // 1-byte labels: wrong format
  write_cifar(dir.path / "test.bin", 2, 2, 100);
  EXPECT_NE(
      error_of([&] { cifar::load_cifar100(dir.path); }).find("train.bin"),
      std::string::npos);
  EXPECT_NE(
      error_of([&] { cifar::load_cifar10(dir.path); }).find("no CIFAR-10"),
      std::string::npos);
  EXPECT_NE(
      error_of([&] {
        cifar::load_dataset("auto", (dir.path / "nope").string());
      }).find("no such directory"),
      std::string::npos);
}

TEST(FashionMnistReader, ReadsDebiansFiles) {
  if (!fs::exists(cifar::kFashionMnistDir)) {
    GTEST_SKIP() << "dataset-fashion-mnist is not installed";
  }
  auto data = cifar::load_fashion_mnist();
  EXPECT_EQ(data.train.images.sizes(), torch::IntArrayRef({60000, 1, 28, 28}));
  EXPECT_EQ(data.test.images.sizes(), torch::IntArrayRef({10000, 1, 28, 28}));
  EXPECT_EQ(data.test.labels.sizes(), torch::IntArrayRef({10000}));
  // Balanced classes: 1000 test images each.
  auto counts = torch::bincount(data.test.labels);
  EXPECT_TRUE(counts.eq(1000).all().item<bool>());
  EXPECT_NEAR(data.mean.item<double>(), 0.286, 0.01);
}

TEST(FashionMnistReader, TruncatedGzipIsAClearError) {
  if (!fs::exists(cifar::kFashionMnistDir)) {
    GTEST_SKIP() << "dataset-fashion-mnist is not installed";
  }
  TempDir dir;
  for (const char* f :
       {"train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz"}) {
    fs::copy_file(fs::path(cifar::kFashionMnistDir) / f, dir.path / f);
  }
  fs::resize_file(dir.path / "t10k-images-idx3-ubyte.gz", 100000);
  const auto message = error_of([&] { cifar::load_fashion_mnist(dir.path); });
  EXPECT_NE(message.find("t10k-images-idx3-ubyte.gz"), std::string::npos)
      << message;
}

TEST(FashionMnistReader, CraftedHeadersAreClearErrorsWithoutOverflow) {
  using torchrev::testing::write_idx_gz;
  TempDir dir;
  // Valid labels for 2 images; the image file varies.
  auto write_labels = [&](const char* name, uint32_t n) {
    write_idx_gz(dir.path / name, {0x801, n}, std::vector<uint8_t>(n, 3));
  };
  write_labels("train-labels-idx1-ubyte.gz", 2);
  write_labels("t10k-labels-idx1-ubyte.gz", 2);
  write_idx_gz(
      dir.path / "t10k-images-idx3-ubyte.gz",
      {0x803, 2, 4, 4},
      std::vector<uint8_t>(32, 7));
  const auto images = dir.path / "train-images-idx3-ubyte.gz";
  auto message_for = [&](const std::vector<uint32_t>& header, size_t bytes) {
    write_idx_gz(images, header, std::vector<uint8_t>(bytes, 1));
    return error_of([&] { cifar::load_fashion_mnist(dir.path); });
  };
  // Sizes whose product overflows 64 bits, or claims gigabytes.
  for (const auto& header : std::vector<std::vector<uint32_t>>{
           {0x803, 0xffffffffu, 0xffffffffu, 0xffffffffu},
           {0x803, 0xffffffffu, 16384, 16384},
           {0x803, 2, 0x80000000u, 2},
           {0x803, 0, 4, 4}, // no images at all
           {0x803, 2, 0, 4}}) {
    const auto message = message_for(header, 32);
    EXPECT_NE(message.find("train-images-idx3-ubyte.gz"), std::string::npos)
        << message;
  }
  EXPECT_NE(
      message_for({0x803, 0xffffffffu, 0xffffffffu, 0xffffffffu}, 32)
          .find("header claims"),
      std::string::npos);
  EXPECT_NE(
      message_for({0x803, 3, 4, 4}, 32).find("truncated"), std::string::npos);
  // An empty file (no labels at all) is named too.
  write_idx_gz(images, {0x803, 2, 4, 4}, std::vector<uint8_t>(32, 1));
  write_idx_gz(dir.path / "train-labels-idx1-ubyte.gz", {0x801, 0}, {});
  const auto message = error_of([&] { cifar::load_fashion_mnist(dir.path); });
  EXPECT_NE(message.find("train-labels-idx1-ubyte.gz"), std::string::npos)
      << message;
  // The control: the same files, well formed, load.
  write_labels("train-labels-idx1-ubyte.gz", 2);
  EXPECT_EQ(cifar::load_fashion_mnist(dir.path).train.size(), 2);
}

TEST(CifarReader, DirectoryInPlaceOfAFileIsNamed) {
  TempDir dir;
  torchrev::testing::write_cifar10_dir(dir.path, 2, 2);
  fs::remove(dir.path / "data_batch_3.bin");
  fs::create_directory(dir.path / "data_batch_3.bin");
  const auto message = error_of([&] { cifar::load_cifar10(dir.path); });
  EXPECT_NE(
      message.find("data_batch_3.bin: not a regular file"), std::string::npos)
      << message;
}

TEST(CifarReader, AutoWithADataDirHoldingNoDataSetIsAnError) {
  TempDir dir;
  const auto message =
      error_of([&] { cifar::load_dataset("auto", dir.path.string()); });
  EXPECT_NE(message.find("holds neither CIFAR-10"), std::string::npos)
      << message;
  // With the files present, auto picks CIFAR-10.
  torchrev::testing::write_cifar10_dir(dir.path, 2, 2);
  EXPECT_EQ(cifar::load_dataset("auto", dir.path.string()).name, "cifar10");
}
