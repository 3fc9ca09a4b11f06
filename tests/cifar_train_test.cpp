// cifar_train's command line: bad input gives one line and a non-zero exit,
// and leaves no output file behind.

#include "cifar_files.h"
#include "data.h"
#include "process_util.h"
#include "scratch_dir.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <csignal>
#include <filesystem>
#include <fstream>
#include <random>
#include <thread>

namespace fs = std::filesystem;
using namespace torchrev::testing;

namespace {

struct Scratch : torchrev::testing::ScratchDir {
  Scratch() : ScratchDir("cli"), dir(path) {}
  const fs::path& dir;
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
  expect_clean_failure(
      "--schedule linear",
      "--schedule: linear not in {step,cosine,onecycle}",
      scratch.dir);
  expect_clean_failure(
      "--optimizer adam",
      "--optimizer: adam not in {auto,sgd,adamw}",
      scratch.dir);
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
  if (fs::exists(cifar::kFashionMnistDir)) {
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
      "--resume-if-exists",
      "--resume-if-exists needs --checkpoint FILE",
      scratch.dir);
  expect_clean_failure(
      "--checkpoint " + (scratch.dir / "none.pt").string() +
          " --resume --resume-if-exists",
      "--resume and --resume-if-exists: give one of them",
      scratch.dir);
  expect_clean_failure("--local-rank -1", "--local-rank", scratch.dir);
  expect_clean_failure(
      "--metrics /nonexistent/dir/m.csv",
      "/nonexistent/dir",
      scratch.dir,
      /*add_metrics=*/false);

  // Numbers that would crash, overflow or train on NaN, each refused up
  // front with the value that arrived.
  write_cifar10_dir(scratch.dir / "tiny", 8, 4);
  const std::string tiny =
      " --batch-size 8 --data-dir " + (scratch.dir / "tiny").string();
  expect_clean_failure("--world-size 0" + tiny, "--world-size 0", scratch.dir);
  expect_clean_failure(
      "--world-size 2 --rank 2" + tiny, "--rank 2", scratch.dir);
  expect_clean_failure(
      "--epochs 9223372036854775807" + tiny, "--epochs", scratch.dir);
  expect_clean_failure("--lr inf" + tiny, "--lr", scratch.dir);
  expect_clean_failure("--lr nan" + tiny, "--lr", scratch.dir);
  expect_clean_failure("--momentum -1" + tiny, "--momentum", scratch.dir);
  expect_clean_failure("--log-every -5" + tiny, "--log-every -5", scratch.dir);
  expect_clean_failure(
      "--dist-timeout nan" + tiny, "--dist-timeout", scratch.dir);
  expect_clean_failure(
      "--dist-timeout 1e300" + tiny, "--dist-timeout", scratch.dir);
  // Output paths that are directories fail before training, not after.
  expect_clean_failure(
      "--checkpoint " + scratch.dir.string() + tiny,
      "is a directory",
      scratch.dir);
  expect_clean_failure(
      "--metrics " + scratch.dir.string() + tiny,
      "is a directory",
      scratch.dir,
      /*add_metrics=*/false);
  // A data dir without a data set is an error, not Fashion-MNIST.
  expect_clean_failure(
      "--data-dir " + (scratch.dir / "cifar").string() + "/..",
      "holds neither",
      scratch.dir);
}

namespace {

std::string tiny_training(
    const fs::path& dir,
    const std::string& extra,
    int steps = 12) {
  return cifar_train_path() + " --data-dir " + (dir / "tiny").string() +
      " --model revnet_mini --batch-size 8 --max-steps " +
      std::to_string(steps) + " --threads 1 --checkpoint " +
      (dir / "ck.pt").string() + " " + extra;
}

std::vector<std::string> temporaries(const fs::path& dir) {
  std::vector<std::string> found;
  for (const auto& entry : fs::directory_iterator(dir)) {
    const auto name = entry.path().filename().string();
    if (name.find(".tmp.") != std::string::npos) {
      found.push_back(name);
    }
  }
  return found;
}

std::string file_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(
      std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

} // namespace

TEST(CifarTrainCli, FullyReversibleRevNet110Trains) {
  if (cifar_train_path().empty()) {
    GTEST_SKIP() << "examples are not built";
  }
  Scratch scratch;
  write_cifar10_dir(scratch.dir / "tiny", 8, 4);
  auto result = run(
      cifar_train_path() + " --data-dir " + (scratch.dir / "tiny").string() +
      " --model revnet110_inv --batch-size 4 --max-steps 2 --threads 1");
  ASSERT_EQ(result.exit_code, 0) << result.output;
  EXPECT_NE(
      result.output.find("model revnet110_inv (2237034 parameters)"),
      std::string::npos)
      << result.output;
  EXPECT_FALSE(value_of(result.output, "test_accuracy").empty())
      << result.output;
}

TEST(CifarTrainCli, TransformersTrainOn32And28PixelImagesWithAdamW) {
  if (cifar_train_path().empty()) {
    GTEST_SKIP() << "examples are not built";
  }
  Scratch scratch;
  write_cifar10_dir(scratch.dir / "cifar", 8, 4);
  // A Fashion-MNIST folder of 28x28 images.
  const auto fashion = scratch.dir / "fashion";
  fs::create_directories(fashion);
  for (const std::string split : {"train", "t10k"}) {
    const uint32_t n = 8;
    torchrev::testing::write_idx_gz(
        fashion / (split + "-labels-idx1-ubyte.gz"),
        {0x801, n},
        std::vector<uint8_t>(n, 3));
    std::vector<uint8_t> pixels(n * 28 * 28);
    for (size_t i = 0; i < pixels.size(); ++i) {
      pixels[i] = static_cast<uint8_t>(i * 7);
    }
    torchrev::testing::write_idx_gz(
        fashion / (split + "-images-idx3-ubyte.gz"),
        {0x803, n, 28, 28},
        pixels);
  }
  for (const std::string model : {"vit_mini", "revvit_mini"}) {
    for (const auto& data :
         {std::string(" --data-dir ") + (scratch.dir / "cifar").string(),
          " --dataset fashion-mnist --data-dir " + fashion.string()}) {
      SCOPED_TRACE(model + data);
      const auto checkpoint = scratch.dir / (model + ".pt");
      fs::remove(checkpoint);
      const std::string common = cifar_train_path() + data + " --model " +
          model + " --batch-size 4 --max-steps 2 --threads 1 --checkpoint " +
          checkpoint.string();
      auto result = run(common);
      ASSERT_EQ(result.exit_code, 0) << result.output;
      EXPECT_NE(result.output.find("model " + model + " ("), std::string::npos)
          << result.output;
      EXPECT_NE(
          result.output.find("AdamW with peak lr 0.002, 1 intra-op thread\n"),
          std::string::npos)
          << result.output;
      EXPECT_FALSE(value_of(result.output, "test_accuracy").empty())
          << result.output;
      // The optimizer is one of the run's settings.
      auto resumed = run(common + " --resume --optimizer sgd");
      EXPECT_NE(resumed.exit_code, 0) << resumed.output;
      EXPECT_NE(
          resumed.output.find(
              "was written with --optimizer adamw, but this run has "
              "--optimizer sgd"),
          std::string::npos)
          << resumed.output;
    }
  }
}

TEST(CifarTrainCli, DiskFullDuringACheckpointLosesNothing) {
  if (cifar_train_path().empty()) {
    GTEST_SKIP() << "examples are not built";
  }
  Scratch scratch;
  write_cifar10_dir(scratch.dir / "tiny", 8, 4);
  auto first =
      run(tiny_training(scratch.dir, "--checkpoint-every 1 --stop-after 3"));
  ASSERT_EQ(first.exit_code, 0) << first.output;
  EXPECT_NE(
      first.output.find("stopped after step 3 of 12 as --stop-after asked"),
      std::string::npos)
      << first.output;
  const auto before = file_bytes(scratch.dir / "ck.pt");
  ASSERT_GT(before.size(), 4096u);
  // A file-size limit of half the checkpoint: the next write fails the way
  // a full disk does (EFBIG instead of ENOSPC).
  auto full = run(
      "bash -c 'ulimit -f " + std::to_string(before.size() / 2048) + "; exec " +
      tiny_training(scratch.dir, "--checkpoint-every 1 --resume --quiet") +
      "'");
  EXPECT_NE(full.exit_code, 0) << full.output;
  EXPECT_NE(
      full.output.find("cifar_train: error: cannot write "), std::string::npos)
      << full.output;
  EXPECT_NE(
      full.output.find("the previous file is unchanged"), std::string::npos)
      << full.output;
  EXPECT_EQ(full.output.find("terminate"), std::string::npos) << full.output;
  EXPECT_EQ(file_bytes(scratch.dir / "ck.pt"), before);
  EXPECT_THAT(temporaries(scratch.dir), ::testing::IsEmpty());
  // Without the limit the run resumes from step 3 and finishes.
  auto resumed =
      run(tiny_training(scratch.dir, "--checkpoint-every 1 --resume"));
  EXPECT_EQ(resumed.exit_code, 0) << resumed.output;
  EXPECT_NE(resumed.output.find("resumed from step 3 of 12"), std::string::npos)
      << resumed.output;
  EXPECT_NE(resumed.output.find("ran 9 steps (3 to 12)"), std::string::npos)
      << resumed.output;
}

TEST(CifarTrainCli, KilledWritersLoseNothingAndResumeExactly) {
  if (cifar_train_path().empty()) {
    GTEST_SKIP() << "examples are not built";
  }
  Scratch scratch;
  write_cifar10_dir(scratch.dir / "tiny", 8, 4);
  const auto reference_dir = scratch.dir / "reference";
  fs::create_directories(reference_dir);
  fs::create_directory_symlink(scratch.dir / "tiny", reference_dir / "tiny");
  // About 25 ms a step here: a run of 60 outlasts most kill delays.
  constexpr int kSteps = 60;
  auto reference = run(tiny_training(reference_dir, "--quiet", kSteps));
  ASSERT_EQ(reference.exit_code, 0) << reference.output;
  const auto expected = value_of(reference.output, "param_checksum");
  ASSERT_FALSE(expected.empty());

  // SIGKILL at random moments of a run that checkpoints every step.
  std::mt19937 rng(7);
  int killed = 0;
  for (int kill = 0; kill < 4; ++kill) {
    const bool resume = fs::exists(scratch.dir / "ck.pt");
    const int delay_ms = 300 + static_cast<int>(rng() % 1200);
    auto outcome =
        run("timeout -s KILL " + std::to_string(delay_ms / 1000.0) + " " +
            tiny_training(
                scratch.dir,
                std::string("--checkpoint-every 1 --quiet") +
                    (resume ? " --resume" : ""),
                kSteps));
    if (outcome.exit_code == 0) {
      break; // finished before the kill
    }
    EXPECT_EQ(outcome.exit_code, 128 + SIGKILL) << outcome.output;
    ++killed;
  }
  EXPECT_GE(killed, 1);
  // A writer that died mid-write, as a kill can leave one.
  const pid_t dead = ::fork();
  if (dead == 0) {
    ::_exit(0);
  }
  ::waitpid(dead, nullptr, 0);
  std::ofstream(scratch.dir / ("ck.pt.tmp." + std::to_string(dead)))
      << "partial";

  const bool resume = fs::exists(scratch.dir / "ck.pt");
  auto finished = run(tiny_training(
      scratch.dir,
      std::string("--checkpoint-every 1 --quiet") + (resume ? " --resume" : ""),
      kSteps));
  ASSERT_EQ(finished.exit_code, 0) << finished.output;
  EXPECT_EQ(value_of(finished.output, "param_checksum"), expected);
  EXPECT_THAT(temporaries(scratch.dir), ::testing::IsEmpty())
      << "the dead writer was " << dead << "; " << finished.output;
}

TEST(CifarTrainCli, SigtermStopsAtAStepBoundaryAndTheCheckpointResumesExactly) {
  if (cifar_train_path().empty()) {
    GTEST_SKIP() << "examples are not built";
  }
  Scratch scratch;
  write_cifar10_dir(scratch.dir / "tiny", 8, 4);
  const auto reference_dir = scratch.dir / "reference";
  fs::create_directories(reference_dir);
  fs::create_directory_symlink(scratch.dir / "tiny", reference_dir / "tiny");
  constexpr int kSteps = 100; // about 2.5 s here
  auto reference = run(tiny_training(reference_dir, "--quiet", kSteps));
  ASSERT_EQ(reference.exit_code, 0) << reference.output;

  // No --checkpoint-every: the only checkpoint is the one the signal writes.
  // SIGTERM goes out once the first step is logged (start-up takes seconds
  // under the sanitizers; before main() the default action would kill).
  const auto log = (scratch.dir / "stopped.log").string();
  auto stopped = run(
      "bash -c '" + tiny_training(scratch.dir, "--log-every 1", kSteps) +
      " > " + log + " 2>&1 & pid=$!; for i in $(seq 1200); do grep -q " +
      "\"^step \" " + log + " && break; sleep 0.05; done; kill -TERM $pid; " +
      "wait $pid; echo exit=$?; cat " + log + "'");
  ASSERT_EQ(value_of(stopped.output, "exit"), std::to_string(128 + SIGTERM))
      << stopped.output;
  EXPECT_NE(
      stopped.output.find("cifar_train: error: stopped by SIGTERM after step"),
      std::string::npos)
      << stopped.output;
  EXPECT_NE(
      stopped.output.find("holds it (continue with --resume)"),
      std::string::npos)
      << stopped.output;
  ASSERT_TRUE(fs::exists(scratch.dir / "ck.pt"));
  auto resumed = run(tiny_training(scratch.dir, "--quiet --resume", kSteps));
  ASSERT_EQ(resumed.exit_code, 0) << resumed.output;
  EXPECT_EQ(
      value_of(resumed.output, "param_checksum"),
      value_of(reference.output, "param_checksum"));
}

TEST(CifarTrainCli, AReadOnlyOutputDirectoryLosesNothing) {
  if (cifar_train_path().empty()) {
    GTEST_SKIP() << "examples are not built";
  }
  if (::geteuid() != 0 || run("unshare --mount true").exit_code != 0) {
    GTEST_SKIP() << "needs root and unshare --mount (a read-only bind mount "
                    "is the one read-only directory root cannot write)";
  }
  Scratch scratch;
  write_cifar10_dir(scratch.dir / "tiny", 8, 4);
  const auto out = scratch.dir / "out";
  fs::create_directories(out);
  constexpr int kSteps = 200; // about 5 s here
  auto training = [&](const std::string& extra) {
    return cifar_train_path() + " --data-dir " +
        (scratch.dir / "tiny").string() +
        " --model revnet_mini --batch-size 8 --threads 1 --max-steps " +
        std::to_string(kSteps) + " --checkpoint " + (out / "ck.pt").string() +
        " " + extra;
  };
  auto reference =
      run("(" + training("--quiet --checkpoint-every 0") + " && rm " +
          (out / "ck.pt").string() + ")");
  ASSERT_EQ(reference.exit_code, 0) << reference.output;
  const auto expected = value_of(reference.output, "param_checksum");
  auto first = run(training("--quiet --checkpoint-every 1 --stop-after 3"));
  ASSERT_EQ(first.exit_code, 0) << first.output;
  const auto before = file_bytes(out / "ck.pt");

  // In a mount namespace of its own (nothing outlives the test): the output
  // folder read-only from the start, then made read-only mid-run.
  const std::string o = out.string(), logs = scratch.dir.string();
  auto outcome =
      run("unshare --mount --propagation private bash -c '"
          "mount --bind " +
          o + " " + o + " && mount -o remount,ro,bind " + o +
          " || { echo mounted=0; exit 0; }; echo mounted=1; " +
          training("--quiet --checkpoint-every 1 --resume") + " > " + logs +
          "/start.log 2>&1; echo start_exit=$?; cp " + o + "/ck.pt " + logs +
          "/after_start.pt; mount -o remount,rw,bind " + o + "; " +
          training("--log-every 1 --checkpoint-every 1 --resume") + " > " +
          logs + "/mid.log 2>&1 & pid=$!; " +
          "for i in $(seq 1200); do grep -q \"^step \" " + logs +
          "/mid.log && break; sleep 0.05; done; " +
          // The remount fails (EBUSY) while a checkpoint is open for writing.
          "for i in $(seq 1000); do mount -o remount,ro,bind " + o +
          " 2>/dev/null && { echo read_only=1; break; }; sleep 0.005; done; " +
          "wait $pid; echo mid_exit=$?; umount " + o + "'");
  if (value_of(outcome.output, "mounted") != "1") {
    GTEST_SKIP() << "cannot make a read-only bind mount here:\n"
                 << outcome.output;
  }
  // Read-only from the start: refused before training, nothing touched.
  const auto start = file_bytes(scratch.dir / "start.log");
  EXPECT_NE(value_of(outcome.output, "start_exit"), "0") << outcome.output;
  EXPECT_EQ(start.rfind("cifar_train: error: --checkpoint ", 0), 0u) << start;
  EXPECT_NE(start.find("cannot write into " + o), std::string::npos) << start;
  EXPECT_EQ(std::count(start.begin(), start.end(), '\n'), 1) << start;
  EXPECT_TRUE(file_bytes(scratch.dir / "after_start.pt") == before);

  // Read-only mid-run: one line, the last checkpoint written before intact.
  const auto mid = file_bytes(scratch.dir / "mid.log");
  ASSERT_EQ(value_of(outcome.output, "read_only"), "1") << outcome.output;
  EXPECT_NE(value_of(outcome.output, "mid_exit"), "0") << outcome.output;
  EXPECT_NE(mid.find("cifar_train: error: cannot write "), std::string::npos)
      << mid;
  EXPECT_NE(mid.find("Read-only file system"), std::string::npos) << mid;
  EXPECT_NE(mid.find("the previous file is unchanged"), std::string::npos)
      << mid;
  EXPECT_EQ(mid.find("terminate"), std::string::npos) << mid;
  EXPECT_TRUE(temporaries(out).empty());

  // Writable again: the run resumes from that checkpoint and ends exactly
  // like the uninterrupted one.
  auto resumed = run(training("--checkpoint-every 1 --resume"));
  ASSERT_EQ(resumed.exit_code, 0) << resumed.output;
  EXPECT_NE(resumed.output.find("resumed from step "), std::string::npos)
      << resumed.output;
  EXPECT_EQ(value_of(resumed.output, "param_checksum"), expected);
}
