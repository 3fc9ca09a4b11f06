// cifar_train's training loop on real Fashion-MNIST: the loss falls, and a
// checkpointed run resumes exactly.

#include "scratch_dir.h"
#include "trainer.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>

namespace fs = std::filesystem;

using ::testing::HasSubstr;
using ::testing::ThrowsMessage;

namespace {

cifar::TrainConfig small_run() {
  cifar::TrainConfig config;
  config.model = "revnet_mini";
  config.dataset = "fashion-mnist";
  config.max_steps = 24;
  config.batch_size = 32;
  config.lr = 0.05;
  config.log_every = 1;
  config.quiet = true;
  config.seed = 3;
  return config;
}

} // namespace

TEST(Training, EnumeratedSettingsOutsideTheirChoicesAreRefused) {
  // The command line can only spell a choice; a program can cast any value.
  auto config = small_run();
  config.schedule = static_cast<cifar::Schedule>(7);
  EXPECT_THAT(
      [&] { cifar::Trainer trainer(config); },
      ThrowsMessage<std::invalid_argument>(
          HasSubstr("--schedule 7: not one of the flag's values")));
  config = small_run();
  config.augment = static_cast<cifar::Augment>(-1);
  EXPECT_THAT(
      [&] { cifar::Trainer trainer(config); },
      ThrowsMessage<std::invalid_argument>(
          HasSubstr("--augment -1: not one of the flag's values")));
  // Every choice's word names it back (the checkpoint records the words).
  for (const auto& [word, value] : cifar::choices(cifar::Schedule{})) {
    EXPECT_EQ(cifar::name_of(value), word);
  }
  EXPECT_EQ(cifar::name_of(cifar::OptimizerKind::kAdamW), "adamw");
  EXPECT_EQ(cifar::name_of(torch::kCUDA), "cuda");
}

TEST(Training, LossFallsOnFashionMnist) {
  if (!fs::exists(cifar::kFashionMnistDir)) {
    GTEST_SKIP() << "dataset-fashion-mnist is not installed";
  }
  auto config = small_run();
  config.max_steps = 40;
  cifar::Trainer trainer(config);
  auto result = trainer.run();
  ASSERT_EQ(result.step_losses.size(), 40u);
  auto mean = [&](size_t begin, size_t end) {
    double sum = 0;
    for (size_t i = begin; i < end; ++i)
      sum += result.step_losses[i];
    return sum / double(end - begin);
  };
  EXPECT_LT(mean(30, 40), 0.8 * mean(0, 10));
  EXPECT_GT(result.test_accuracy, 0.3); // 10 classes: chance is 0.1
}

TEST(Training, CheckpointRoundTripAndExactResume) {
  if (!fs::exists(cifar::kFashionMnistDir)) {
    GTEST_SKIP() << "dataset-fashion-mnist is not installed";
  }
  const torchrev::testing::ScratchDir scratch("train");
  const auto checkpoint = scratch / "ckpt.pt";
  const auto metrics = scratch / "metrics.csv";

  auto full = small_run();
  cifar::Trainer uninterrupted(full);
  auto expected = uninterrupted.run();

  auto first = small_run();
  first.checkpoint = checkpoint.string();
  first.checkpoint_every = 5;
  first.stop_after = 12; // "killed" after step 12; last checkpoint at 10
  first.metrics = metrics.string();
  cifar::Trainer interrupted(first);
  auto partial = interrupted.run();
  ASSERT_EQ(partial.steps, 12);
  ASSERT_TRUE(fs::exists(checkpoint));

  auto second = small_run();
  second.checkpoint = checkpoint.string();
  second.resume = true;
  second.metrics = metrics.string();
  cifar::Trainer resumed(second);
  auto rest = resumed.run();
  // The run resumes from the checkpoint of step 10.
  ASSERT_EQ(rest.step_losses.size(), 14u);
  for (size_t i = 0; i < rest.step_losses.size(); ++i) {
    EXPECT_EQ(rest.step_losses[i], expected.step_losses[10 + i])
        << "step " << 11 + i;
  }
  EXPECT_EQ(rest.param_checksum, expected.param_checksum);
  EXPECT_EQ(rest.test_accuracy, expected.test_accuracy);

  // The metrics file has one row per step, 1..24, across both runs.
  std::ifstream in(metrics);
  std::string line;
  int rows = 0;
  std::getline(in, line);
  EXPECT_EQ(line, cifar::detail::csv_header());
  while (std::getline(in, line)) {
    ++rows;
    EXPECT_EQ(line.substr(0, line.find(',')), std::to_string(rows));
  }
  EXPECT_EQ(rows, 24);

  // A resumed run must match its checkpoint's configuration.
  auto mismatched = small_run();
  mismatched.checkpoint = checkpoint.string();
  mismatched.resume = true;
  mismatched.max_steps = 30;
  EXPECT_THROW(cifar::Trainer{mismatched}, std::runtime_error);

  // A corrupt checkpoint is refused with a clear error, and left as it was.
  {
    std::ofstream corrupt(checkpoint, std::ios::binary | std::ios::trunc);
    corrupt << "not a checkpoint";
  }
  EXPECT_THAT(
      [&] { cifar::Trainer{second}; },
      ThrowsMessage<std::runtime_error>(HasSubstr("cannot read checkpoint")));
}

TEST(Training, DefaultThreadsUseEveryCpuWhereLibTorchFindsOneCore) {
  // LibTorch 1.13 finds a single core on some virtual machines (one thread
  // where 2.13 uses two); `--threads 0` must not train on one of several
  // CPUs, unless the environment asks for it.
  if (std::getenv("OMP_NUM_THREADS") || std::getenv("MKL_NUM_THREADS")) {
    GTEST_SKIP() << "OMP_NUM_THREADS or MKL_NUM_THREADS is set";
  }
  if (!fs::exists(cifar::kFashionMnistDir)) {
    GTEST_SKIP() << "dataset-fashion-mnist is not installed";
  }
  // The thread count is process-wide: the tests after this one get it back.
  struct RestoreThreads {
    int threads = torch::get_num_threads();
    ~RestoreThreads() {
      torch::set_num_threads(threads);
    }
  } restore;
  torch::set_num_threads(1); // what LibTorch 1.13 chooses there
  EXPECT_EQ(cifar::default_threads(), cifar::available_cpus());
  torch::set_num_threads(3); // a working detection is left alone
  EXPECT_EQ(cifar::default_threads(), 3);
  auto config = small_run();
  config.max_steps = 1;
  torch::set_num_threads(1);
  cifar::Trainer trainer(config);
  EXPECT_EQ(torch::get_num_threads(), cifar::available_cpus());
}
