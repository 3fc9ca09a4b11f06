// Data-parallel training on c10d (Gloo over 127.0.0.1): real processes.
//
// The tests start cifar_train twice, or this test binary itself in its
// "--dp-worker" mode (see main.cpp), and compare what the ranks print.

#include "../examples/cifar/trainer.h"
#include "distributed_worker.h"
#include "process_util.h"
#include "test_util.h"

#include <fmt/core.h>

#include <filesystem>

namespace {

using namespace torchrev::testing;

std::string cifar_train(const std::string& args) {
  return std::string(TORCHREV_CIFAR_TRAIN) +
      " --quiet --dataset fashion-mnist " + args;
}

bool have_fashion_mnist() {
  return std::filesystem::exists("/usr/share/datasets/fashion-mnist") &&
      !std::string(TORCHREV_CIFAR_TRAIN).empty();
}

} // namespace

TEST(Distributed, TwoRanksOfCifarTrainEndWithIdenticalParameters) {
  if (!have_fashion_mnist()) {
    GTEST_SKIP() << "dataset-fashion-mnist is not installed";
  }
  const std::string common = fmt::format(
      "--max-steps 6 --batch-size 32 --threads 1 --world-size 2 "
      "--master-port {} --dist-timeout 60",
      free_port());
  auto ranks = run_all(
      {cifar_train(common + " --rank 0"), cifar_train(common + " --rank 1")});
  for (int r = 0; r < 2; ++r) {
    ASSERT_EQ(ranks[r].exit_code, 0) << "rank " << r << ":\n"
                                     << ranks[r].output;
  }
  const auto sum0 = value_of(ranks[0].output, "param_checksum");
  ASSERT_FALSE(sum0.empty()) << ranks[0].output;
  EXPECT_EQ(sum0, value_of(ranks[1].output, "param_checksum"));
  // Only rank 0 reports the test accuracy.
  EXPECT_FALSE(value_of(ranks[0].output, "test_accuracy").empty());
  EXPECT_TRUE(value_of(ranks[1].output, "test_accuracy").empty());
}

TEST(Distributed, TwoRanksWithBatchBMatchOneProcessWithBatch2B) {
  const int port = free_port();
  const std::string self =
      std::filesystem::read_symlink("/proc/self/exe").string();
  auto command = [&](int rank) {
    return fmt::format("{} --dp-worker {} 2 {}", self, rank, port);
  };
  auto ranks = run_all({command(0), command(1)});
  for (int r = 0; r < 2; ++r) {
    ASSERT_EQ(ranks[r].exit_code, 0) << "rank " << r << ":\n"
                                     << ranks[r].output;
  }
  const double rank0 = std::stod(value_of(ranks[0].output, "param_checksum"));
  const double rank1 = std::stod(value_of(ranks[1].output, "param_checksum"));
  const double single =
      torchrev::testing::dp_worker_checksum(/*rank=*/0, /*world=*/1, 0);
  EXPECT_EQ(rank0, rank1);
  EXPECT_NEAR(rank0, single, 1e-5 * std::abs(single));
}

TEST(Distributed, ARankThatExitsEarlyMakesItsPeerFailWithAClearError) {
  if (!have_fashion_mnist()) {
    GTEST_SKIP() << "dataset-fashion-mnist is not installed";
  }
  const std::string common = fmt::format(
      "--max-steps 40 --batch-size 32 --threads 1 --world-size 2 "
      "--master-port {} --dist-timeout 10",
      free_port());
  auto ranks = run_all(
      {cifar_train(common + " --rank 0"),
       cifar_train(common + " --rank 1 --stop-after 2")});
  EXPECT_EQ(ranks[1].exit_code, 0) << ranks[1].output;
  EXPECT_NE(ranks[0].exit_code, 0) << ranks[0].output;
  EXPECT_NE(
      ranks[0].output.find("cifar_train: error: rank 0"), std::string::npos)
      << ranks[0].output;
  EXPECT_LT(ranks[0].seconds, 60.0);
}

TEST(Distributed, APeerThatNeverJoinsTimesOut) {
  if (!have_fashion_mnist()) {
    GTEST_SKIP() << "dataset-fashion-mnist is not installed";
  }
  auto alone = run(cifar_train(fmt::format(
      "--max-steps 2 --world-size 2 --rank 0 --master-port {} --dist-timeout 3",
      free_port())));
  EXPECT_NE(alone.exit_code, 0);
  EXPECT_NE(
      alone.output.find("timed out after 3 s waiting for 2 ranks"),
      std::string::npos)
      << alone.output;
  EXPECT_LT(alone.seconds, 30.0);
  // No partial output: one error line, no stack trace.
  EXPECT_EQ(alone.output.find("Exception raised from"), std::string::npos)
      << alone.output;
}

TEST(Distributed, RanksWithDifferentSettingsRefuseToTrain) {
  if (!have_fashion_mnist()) {
    GTEST_SKIP() << "dataset-fashion-mnist is not installed";
  }
  const std::string common = fmt::format(
      "--max-steps 4 --batch-size 32 --threads 1 --world-size 2 "
      "--master-port {} --dist-timeout 30",
      free_port());
  auto ranks = run_all(
      {cifar_train(common + " --rank 0 --lr 0.1"),
       cifar_train(common + " --rank 1 --lr 0.2")});
  for (int r = 0; r < 2; ++r) {
    EXPECT_NE(ranks[r].exit_code, 0) << ranks[r].output;
    EXPECT_NE(ranks[r].output.find("was started with --lr"), std::string::npos)
        << "rank " << r << ":\n"
        << ranks[r].output;
  }
}

TEST(Distributed, EvaluationOnAllRanksEqualsRankZerosModelOnTheWholeTestSet) {
  if (!have_fashion_mnist()) {
    GTEST_SKIP() << "dataset-fashion-mnist is not installed";
  }
  // The shares cover the test set exactly once.
  for (int world : {1, 2, 3, 7}) {
    int64_t next = 0;
    for (int rank = 0; rank < world; ++rank) {
      const auto [first, end] = cifar::Trainer::eval_shard(10001, rank, world);
      EXPECT_EQ(first, next);
      EXPECT_GE(end, first);
      next = end;
    }
    EXPECT_EQ(next, 10001);
  }
  const auto dir = std::filesystem::temp_directory_path() /
      ("torchrev_dist_eval_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const auto checkpoint = (dir / "ck.pt").string();
  const std::string common = fmt::format(
      "--max-steps 6 --batch-size 32 --threads 1 --world-size 2 --seed 4 "
      "--master-port {} --dist-timeout 60 --checkpoint {}",
      free_port(),
      checkpoint);
  auto ranks = run_all(
      {cifar_train(common + " --rank 0"), cifar_train(common + " --rank 1")});
  for (int r = 0; r < 2; ++r) {
    ASSERT_EQ(ranks[r].exit_code, 0) << "rank " << r << ":\n"
                                     << ranks[r].output;
  }
  const auto accuracy = value_of(ranks[0].output, "test_accuracy");
  ASSERT_FALSE(accuracy.empty()) << ranks[0].output;

  // Rank 0's final model and buffers, evaluated by one process alone.
  cifar::TrainConfig config;
  config.dataset = "fashion-mnist";
  config.quiet = true;
  cifar::Trainer alone(config);
  const auto sealed = cifar::read_file_bytes(checkpoint);
  const auto payload = cifar::unseal(sealed, checkpoint);
  torch::serialize::InputArchive archive, model_archive;
  archive.load_from(payload.data(), payload.size());
  archive.read("model", model_archive);
  alone.model()->load(model_archive);
  EXPECT_EQ(fmt::format("{:.4f}", alone.evaluate()), accuracy);
  std::filesystem::remove_all(dir);
}
