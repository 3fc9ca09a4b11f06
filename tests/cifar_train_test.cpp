// cifar_train's command line: bad input gives one line and a non-zero exit,
// and leaves no output file behind.

#include "process_util.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

namespace fs = std::filesystem;
using namespace torchrev::testing;

namespace {

struct Scratch {
  fs::path dir = fs::temp_directory_path() /
      ("torchrev_cli_" + std::to_string(::getpid()));
  Scratch() {
    fs::create_directories(dir);
  }
  ~Scratch() {
    fs::remove_all(dir);
  }
};

/// Runs cifar_train with `args` and checks the failure is clean.
void expect_clean_failure(
    const std::string& args,
    const std::string& expected,
    const fs::path& dir,
    bool add_metrics = true) {
  const auto metrics = dir / "metrics.csv";
  auto outcome =
      run(cifar_train_path() + " --quiet " +
          (add_metrics ? "--metrics " + metrics.string() + " " : "") + args);
  EXPECT_NE(outcome.exit_code, 0) << args;
  EXPECT_EQ(outcome.output.rfind("cifar_train: error: ", 0), 0u)
      << outcome.output;
  EXPECT_NE(outcome.output.find(expected), std::string::npos) << outcome.output;
  // Exactly one line: no stack trace, no progress output.
  EXPECT_EQ(std::count(outcome.output.begin(), outcome.output.end(), '\n'), 1)
      << outcome.output;
  EXPECT_FALSE(fs::exists(metrics)) << args;
}

} // namespace

TEST(CifarTrainCli, BadInputFailsWithOneLineAndNoOutputFiles) {
  if (cifar_train_path().empty()) {
    GTEST_SKIP() << "examples are not built";
  }
  Scratch scratch;
  expect_clean_failure(
      "--model revnet39", "--model revnet39: unknown model", scratch.dir);
  expect_clean_failure(
      "--data-dir /nonexistent/cifar", "no such directory", scratch.dir);
  expect_clean_failure(
      "--dataset cifar10", "--dataset cifar10 needs --data-dir", scratch.dir);
  expect_clean_failure("--schedule linear", "--schedule linear", scratch.dir);
  expect_clean_failure("--batch-size", "--batch-size", scratch.dir);

  // A truncated CIFAR-10 batch.
  const auto cifar = scratch.dir / "cifar";
  fs::create_directories(cifar);
  for (const char* f :
       {"data_batch_1.bin",
        "data_batch_2.bin",
        "data_batch_3.bin",
        "data_batch_4.bin",
        "data_batch_5.bin",
        "test_batch.bin"}) {
    std::ofstream(cifar / f, std::ios::binary) << std::string(3073, '\1');
  }
  fs::resize_file(cifar / "data_batch_4.bin", 3000);
  expect_clean_failure(
      "--data-dir " + cifar.string(),
      "data_batch_4.bin: truncated",
      scratch.dir);

  // A checkpoint that is not one, and one that does not exist.
  const auto bad = scratch.dir / "bad.pt";
  std::ofstream(bad) << "garbage";
  expect_clean_failure(
      "--checkpoint " + bad.string() + " --resume --data-dir " +
          cifar.string() + "/../nothing",
      "no such directory",
      scratch.dir);
  if (fs::exists("/usr/share/datasets/fashion-mnist")) {
    expect_clean_failure(
        "--checkpoint " + bad.string() + " --resume",
        "cannot read checkpoint",
        scratch.dir);
    EXPECT_EQ(fs::file_size(bad), 7u); // left as it was
  }
  expect_clean_failure(
      "--checkpoint " + (scratch.dir / "none.pt").string() + " --resume",
      "does not exist",
      scratch.dir);
  expect_clean_failure(
      "--metrics /nonexistent/dir/m.csv",
      "/nonexistent/dir",
      scratch.dir,
      /*add_metrics=*/false);
}
