// cifar_train's checkpoints lose nothing: sealed with a checksum and refused
// when any byte changed, every field type- and range-checked, the run's
// settings compared on resume, and writes that fail leave the previous file.

#include "cifar_files.h"
#include "scratch_dir.h"
#include "trainer.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <filesystem>
#include <random>

namespace fs = std::filesystem;

using ::testing::HasSubstr;
using ::testing::ThrowsMessage;

namespace {

/// A scratch folder with a tiny CIFAR-10 set in `cifar/`.
struct Scratch : torchrev::testing::ScratchDir {
  Scratch() : ScratchDir("ckfile"), dir(path) {
    torchrev::testing::write_cifar10_dir(dir / "cifar", 16, 8);
  }
  const fs::path& dir;
};

/// A few steps of revnet_mini on a tiny generated CIFAR-10.
cifar::TrainConfig tiny_run(const Scratch& scratch) {
  cifar::TrainConfig config;
  config.model = "revnet_mini";
  config.dataset = "cifar10";
  config.data_dir = (scratch.dir / "cifar").string();
  config.max_steps = 4;
  config.batch_size = 8;
  config.lr = 0.05;
  config.quiet = true;
  config.seed = 11;
  config.checkpoint = (scratch.dir / "ck.pt").string();
  return config;
}

std::string read_bytes(const fs::path& path) {
  return cifar::read_file_bytes(path.string());
}

void write_bytes(const fs::path& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
}

/// The message of the exception constructing a resuming Trainer throws, or
/// "" when it resumes.
std::string resume_error(const cifar::TrainConfig& config) {
  auto resume = config;
  resume.resume = true;
  try {
    cifar::Trainer trainer(resume);
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

} // namespace

TEST(CheckpointFile, SealRoundTripsAndRefusesAnyChange) {
  const std::string payload = "some payload\n with bytes \x01\x02";
  const std::string sealed = cifar::seal(payload);
  EXPECT_EQ(cifar::unseal(sealed, "f"), payload);
  std::mt19937 rng(5);
  for (size_t i = 0; i < sealed.size(); ++i) {
    auto changed = sealed;
    changed[i] = static_cast<char>(changed[i] ^ (1 + rng() % 255));
    EXPECT_THROW(cifar::unseal(changed, "f"), cifar::FileError) << "byte " << i;
  }
  EXPECT_THROW(
      cifar::unseal(sealed.substr(0, sealed.size() - 1), "f"),
      cifar::FileError);
  EXPECT_THROW(cifar::unseal(sealed + "x", "f"), cifar::FileError);
  EXPECT_THROW(cifar::unseal("", "f"), cifar::FileError);
}

TEST(CheckpointFile, CorruptedCheckpointsAreRefusedNeverResumed) {
  Scratch scratch;
  auto config = tiny_run(scratch);
  cifar::Trainer(config).run();
  const auto good = read_bytes(config.checkpoint);
  // The control: the untouched checkpoint resumes.
  ASSERT_EQ(resume_error(config), "");

  std::mt19937_64 rng(2026);
  int refused = 0;
  constexpr int kTrials = 60;
  for (int trial = 0; trial < kTrials; ++trial) {
    auto bytes = good;
    const int changes = 1 + static_cast<int>(rng() % 32);
    for (int c = 0; c < changes; ++c) {
      auto& b = bytes[rng() % bytes.size()];
      b = static_cast<char>(b ^ (1 + rng() % 255));
    }
    write_bytes(config.checkpoint, bytes);
    const auto message = resume_error(config);
    EXPECT_NE(message.find("cannot read checkpoint"), std::string::npos)
        << "trial " << trial << ": " << message;
    refused += !message.empty();
  }
  EXPECT_EQ(refused, kTrials);
  // Cut short and grown.
  write_bytes(config.checkpoint, good.substr(0, good.size() / 2));
  EXPECT_NE(resume_error(config).find("truncated"), std::string::npos);
  write_bytes(config.checkpoint, good + "tail");
  EXPECT_NE(
      resume_error(config).find("truncated or extended"), std::string::npos);
}

TEST(CheckpointFile, FieldsAreTypeAndRangeChecked) {
  Scratch scratch;
  auto config = tiny_run(scratch);
  cifar::Trainer(config).run();
  // A well-sealed archive with chosen fields, as a crafted file would be.
  auto craft = [&](c10::IValue model, c10::IValue step, c10::IValue total) {
    torch::serialize::OutputArchive archive;
    archive.write("model_name", model);
    archive.write("dataset", c10::IValue(std::string("cifar10")));
    archive.write("step", step);
    archive.write("total_steps", total);
    archive.write("settings", c10::IValue(std::string("")));
    archive.write("metrics", c10::IValue(std::string("")));
    std::string payload;
    archive.save_to([&payload](const void* data, size_t size) -> size_t {
      payload.append(static_cast<const char*>(data), size);
      return size;
    });
    write_bytes(config.checkpoint, cifar::seal(payload));
    return resume_error(config);
  };
  const c10::IValue name(std::string("revnet_mini"));
  EXPECT_NE(
      craft(name, c10::IValue(int64_t(-3000)), c10::IValue(int64_t(4)))
          .find("step -3000 is outside [0, 4]"),
      std::string::npos);
  EXPECT_NE(
      craft(name, c10::IValue(int64_t(9)), c10::IValue(int64_t(4)))
          .find("step 9 is outside"),
      std::string::npos);
  EXPECT_NE(
      craft(
          c10::IValue(int64_t(7)),
          c10::IValue(int64_t(1)),
          c10::IValue(int64_t(4)))
          .find("field 'model_name' is missing or not a string"),
      std::string::npos);
  EXPECT_NE(
      craft(name, c10::IValue(std::string("1")), c10::IValue(int64_t(4)))
          .find("field 'step' is missing or not an integer"),
      std::string::npos);
  EXPECT_NE(
      craft(name, c10::IValue(int64_t(1)), c10::IValue(int64_t(4)))
          .find("incomplete settings"),
      std::string::npos);
}

TEST(CheckpointFile, ResumeWithOtherSettingsIsRefusedNamingTheFlag) {
  Scratch scratch;
  auto config = tiny_run(scratch);
  config.stop_after = 2;
  config.checkpoint_every = 1;
  cifar::Trainer(config).run();
  config.stop_after = 0;
  ASSERT_EQ(resume_error(config), ""); // the control
  auto other = config;
  other.lr = 0.1;
  EXPECT_NE(resume_error(other).find("--lr"), std::string::npos);
  other = config;
  other.seed = 12;
  EXPECT_NE(resume_error(other).find("--seed 11"), std::string::npos);
  other = config;
  other.schedule = cifar::Schedule::kCosine;
  EXPECT_NE(resume_error(other).find("--schedule onecycle"), std::string::npos);
  other = config;
  other.momentum = 0.5;
  EXPECT_NE(resume_error(other).find("--momentum"), std::string::npos);
}

TEST(CheckpointFile, FailedWritesLeaveThePreviousFileAndNoTemporary) {
  Scratch scratch;
  const auto path = (scratch.dir / "file.bin").string();
  cifar::write_file_atomically(path, "first");
  EXPECT_EQ(read_bytes(path), "first");
  // The rename fails (a directory holds the final name): nothing is lost.
  const auto blocked = (scratch.dir / "blocked").string();
  fs::create_directories(fs::path(blocked) / "inside");
  EXPECT_THAT(
      [&] { cifar::write_file_atomically(blocked, "data"); },
      ThrowsMessage<cifar::FileError>(HasSubstr("cannot write " + blocked)));
  EXPECT_TRUE(fs::is_directory(fs::path(blocked) / "inside"));
  // A vanished directory.
  EXPECT_THROW(
      cifar::write_file_atomically((scratch.dir / "gone" / "f").string(), "x"),
      cifar::FileError);
  for (const auto& entry : fs::directory_iterator(scratch.dir)) {
    EXPECT_EQ(entry.path().filename().string().find(".tmp."), std::string::npos)
        << entry.path();
  }
  EXPECT_EQ(read_bytes(path), "first");
}

TEST(CheckpointFile, StaleTemporariesOfDeadWritersAreRemoved) {
  Scratch scratch;
  const auto path = (scratch.dir / "ck.pt").string();
  // A process that has exited: its pid names a dead writer.
  const pid_t dead = ::fork();
  if (dead == 0) {
    ::_exit(0);
  }
  ::waitpid(dead, nullptr, 0);
  const auto stale = cifar::detail::temporary_name(path, dead);
  // A live process's id, but no lock: the id was handed out again after
  // the writer died, which says nothing about the file.
  const auto reused = cifar::detail::temporary_name(path, ::getppid());
  // Locked, as a writer holds its temporary file until the rename.
  const auto writing = cifar::detail::temporary_name(path, 1);
  const auto other = path + ".tmp.notapid";
  for (const auto& f : {stale, reused, writing, other}) {
    write_bytes(f, "partial");
  }
  const int writer = ::open(writing.c_str(), O_RDONLY | O_CLOEXEC);
  ASSERT_GE(writer, 0);
  ASSERT_EQ(::flock(writer, LOCK_EX), 0);
  EXPECT_EQ(cifar::remove_stale_temporaries(path), 2);
  ::close(writer);
  EXPECT_FALSE(fs::exists(stale));
  EXPECT_FALSE(fs::exists(reused));
  EXPECT_TRUE(fs::exists(writing)); // its writer is still writing
  EXPECT_TRUE(fs::exists(other));
}

TEST(CheckpointFile, ErrorMessagesKeepTheirFirstNonEmptyLine) {
  using cifar::detail::first_line_of;
  EXPECT_EQ(first_line_of("\nExpected a value\nbacktrace"), "Expected a value");
  EXPECT_EQ(first_line_of("  one  \ntwo"), "one");
  EXPECT_EQ(first_line_of("\n\n"), "(no message)");
}

TEST(CheckpointFile, MetricsRowsRoundTripExactlyWithAndWithoutATestAccuracy) {
  cifar::MetricsRow evaluated;
  evaluated.step = 7;
  evaluated.epoch = 1;
  evaluated.loss = 1.0 / 3.0;
  evaluated.train_acc = 0.1 + 0.2;
  evaluated.test_acc = 2.0 / 3.0;
  evaluated.lr = 0.1 * 3.0;
  evaluated.images_per_s = 1234.56789;
  evaluated.peak_memory = (size_t{1} << 40) + 3;
  cifar::MetricsRow logged = evaluated;
  logged.step = 9;
  logged.test_acc.reset();
  logged.peak_memory = 0;

  const auto rows = cifar::decode_metrics_rows(
      cifar::encode_metrics_rows({evaluated, logged}), 9);
  ASSERT_EQ(rows.size(), 2u);
  for (size_t k = 0; k < 2; ++k) {
    const auto& want = k == 0 ? evaluated : logged;
    EXPECT_EQ(rows[k].step, want.step);
    EXPECT_EQ(rows[k].epoch, want.epoch);
    EXPECT_EQ(rows[k].loss, want.loss);
    EXPECT_EQ(rows[k].train_acc, want.train_acc);
    EXPECT_EQ(rows[k].test_acc, want.test_acc);
    EXPECT_EQ(rows[k].lr, want.lr);
    EXPECT_EQ(rows[k].images_per_s, want.images_per_s);
    EXPECT_EQ(rows[k].peak_memory, want.peak_memory);
  }
  // The CSV leaves the missing test accuracy empty.
  EXPECT_THAT(
      cifar::metrics_csv(rows),
      HasSubstr("\n9,1,0.333333333,0.300000,,0.3,1234.6,0\n"));
}

TEST(CheckpointFile, MetricsRowsOutsideTheRunOrUnreadableAreRefused) {
  cifar::MetricsRow row;
  row.step = 5;
  const auto text = cifar::encode_metrics_rows({row});
  EXPECT_THAT(
      [&] { cifar::decode_metrics_rows(text, 4); },
      ThrowsMessage<std::invalid_argument>(
          HasSubstr("metrics row for step 5 outside [1, 4]")));
  EXPECT_THAT(
      [&] { cifar::decode_metrics_rows(text + "6 0 x", 9); },
      ThrowsMessage<std::invalid_argument>(
          HasSubstr("unreadable metrics rows")));
  EXPECT_TRUE(cifar::decode_metrics_rows("", 0).empty());
}
