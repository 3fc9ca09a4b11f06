// Data-parallel training on c10d (Gloo over 127.0.0.1): real processes.
//
// The tests start cifar_train twice, or this test binary itself in its
// "--dp-worker" mode (see main.cpp), and compare what the ranks print.

#include "cifar_files.h"
#include "distributed_worker.h"
#include "process_util.h"
#include "scratch_dir.h"
#include "test_util.h"
#include "trainer.h"

#include <fmt/core.h>

#include <filesystem>
#include <future>
#include <thread>

namespace {

using namespace torchrev::testing;

std::string cifar_train(const std::string& args) {
  return std::string(TORCHREV_CIFAR_TRAIN) +
      " --quiet --dataset fashion-mnist " + args;
}

bool have_fashion_mnist() {
  return std::filesystem::exists(cifar::kFashionMnistDir) &&
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

TEST(Distributed, RanksWithDifferentModelsRefuseToTrainOnEveryRank) {
  const std::string self =
      std::filesystem::read_symlink("/proc/self/exe").string();
  auto check = [&](int outputs0, int outputs1) {
    const int port = free_port();
    auto command = [&](int rank, int outputs) {
      return fmt::format(
          "{} --dp-model-check {} 2 {} {}", self, rank, port, outputs);
    };
    return run_all({command(0, outputs0), command(1, outputs1)});
  };
  // The control: the same model on both ranks is accepted.
  auto same = check(5, 5);
  for (int r = 0; r < 2; ++r) {
    EXPECT_EQ(same[r].exit_code, 0) << "rank " << r << ":\n" << same[r].output;
  }
  // Linear(16, 5) against Linear(16, 6): both ranks refuse, each saying
  // whose model differs.
  auto differ = check(5, 6);
  EXPECT_NE(differ[0].exit_code, 0);
  EXPECT_NE(differ[1].exit_code, 0);
  EXPECT_THAT(
      differ[0].output,
      ::testing::HasSubstr(
          "rank 0: another rank's model differs from rank 0's"));
  EXPECT_THAT(
      differ[1].output,
      ::testing::HasSubstr("rank 1: this rank's model differs"));
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

TEST(Distributed, AStoreThatNeverAnswersEndsWithAClearErrorWithinTheTimeout) {
  if (!have_fashion_mnist()) {
    GTEST_SKIP() << "dataset-fashion-mnist is not installed";
  }
  // A port that accepts connections (the kernel completes them) but where
  // nothing ever answers.
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(fd, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  ASSERT_EQ(::listen(fd, 16), 0);
  socklen_t length = sizeof(addr);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &length);
  auto client = run(cifar_train(fmt::format(
      "--max-steps 2 --world-size 2 --rank 1 --master-port {} "
      "--dist-timeout 3",
      ntohs(addr.sin_port))));
  ::close(fd);
  EXPECT_NE(client.exit_code, 0);
  EXPECT_EQ(client.output.rfind("cifar_train: error: rank 1: ", 0), 0u)
      << client.output;
  EXPECT_NE(client.output.find("3 s"), std::string::npos) << client.output;
#if TORCH_VERSION_MAJOR < 2
  // LibTorch 1.x's client waits for the answer without a timeout of its own:
  // only the backstop ends it.
  EXPECT_NE(
      client.output.find("waiting for an answer from the store"),
      std::string::npos)
      << client.output;
#endif
  EXPECT_EQ(std::count(client.output.begin(), client.output.end(), '\n'), 1)
      << client.output;
  EXPECT_LT(client.seconds, 30.0);
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
  const ScratchDir dir("dist_eval");
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
}

namespace {

/// Two network namespaces joined by a veth pair, removed when destroyed:
/// two "hosts" on one machine, 10.213.<n>.1 and 10.213.<n>.2.
struct TwoHosts {
  std::string a, b, veth_a, veth_b, addr_a, addr_b, error;
  TwoHosts() {
    const std::string id = std::to_string(::getpid() % 100000);
    a = "trv_a" + id;
    b = "trv_b" + id;
    veth_a = "trva" + id;
    veth_b = "trvb" + id;
    const std::string net = "10.213." + std::to_string(::getpid() % 250) + ".";
    addr_a = net + "1";
    addr_b = net + "2";
    for (const std::string& step :
         {"ip netns add " + a,
          "ip netns add " + b,
          "ip link add " + veth_a + " type veth peer name " + veth_b,
          "ip link set " + veth_a + " netns " + a,
          "ip link set " + veth_b + " netns " + b,
          "ip -n " + a + " addr add " + addr_a + "/24 dev " + veth_a,
          "ip -n " + b + " addr add " + addr_b + "/24 dev " + veth_b,
          "ip -n " + a + " link set lo up",
          "ip -n " + b + " link set lo up",
          "ip -n " + a + " link set " + veth_a + " up",
          "ip -n " + b + " link set " + veth_b + " up"}) {
      auto outcome = run(step);
      if (outcome.exit_code != 0) {
        error = step + ": " + outcome.output;
        return;
      }
    }
  }
  ~TwoHosts() {
    run("ip netns del " + a);
    run("ip netns del " + b);
  }
};

} // namespace

TEST(Distributed, RanksOnTwoHostsTrainAndACutLinkEndsBothWithAClearError) {
  if (std::string(TORCHREV_CIFAR_TRAIN).empty()) {
    GTEST_SKIP() << "examples are not built";
  }
  if (::geteuid() != 0) {
    GTEST_SKIP() << "network namespaces need root";
  }
  TwoHosts hosts;
  if (!hosts.error.empty()) {
    GTEST_SKIP() << "cannot create network namespaces here: " << hosts.error;
  }
  const ScratchDir scratch("netns");
  const auto data = scratch / "cifar";
  write_cifar10_dir(data, 32, 8);
  auto rank = [&](const std::string& ns, int r, const std::string& extra) {
    return "ip netns exec " + ns + " " + std::string(TORCHREV_CIFAR_TRAIN) +
        " --quiet --data-dir " + data.string() +
        " --batch-size 8 --threads 1 --world-size 2 --rank " +
        std::to_string(r) + " --master-addr " + hosts.addr_a + " " + extra;
  };
  // Each rank sees only its own namespace: rank 1 reaches rank 0 over the
  // veth pair, and both must advertise that link's address to Gloo.
  const std::string common = fmt::format(
      "--max-steps 6 --master-port {} --dist-timeout 30", free_port());
  auto ranks = run_all({rank(hosts.a, 0, common), rank(hosts.b, 1, common)});
  for (int r = 0; r < 2; ++r) {
    ASSERT_EQ(ranks[r].exit_code, 0) << "rank " << r << ":\n"
                                     << ranks[r].output;
  }
  EXPECT_NE(
      ranks[1].output.find("gloo uses " + hosts.addr_b), std::string::npos)
      << ranks[1].output;
  const auto sum0 = value_of(ranks[0].output, "param_checksum");
  ASSERT_FALSE(sum0.empty());
  EXPECT_EQ(sum0, value_of(ranks[1].output, "param_checksum"));

  // The link cut mid-run: both ranks end with one error line, within the
  // timeout (plus start-up), instead of hanging.
  constexpr int kTimeout = 10;
  const std::string long_run = fmt::format(
      "--max-steps 5000 --master-port {} --dist-timeout {}",
      free_port(),
      kTimeout);
  auto cut = std::async(std::launch::async, [&] {
    std::this_thread::sleep_for(std::chrono::seconds(4));
    return run("ip -n " + hosts.a + " link set " + hosts.veth_a + " down");
  });
  auto cut_ranks =
      run_all({rank(hosts.a, 0, long_run), rank(hosts.b, 1, long_run)});
  EXPECT_EQ(cut.get().exit_code, 0);
  for (int r = 0; r < 2; ++r) {
    EXPECT_NE(cut_ranks[r].exit_code, 0) << cut_ranks[r].output;
    EXPECT_NE(
        cut_ranks[r].output.find("cifar_train: error: "), std::string::npos)
        << "rank " << r << ":\n"
        << cut_ranks[r].output;
    EXPECT_LT(cut_ranks[r].seconds, 4 + 3 * kTimeout) << cut_ranks[r].output;
  }
}

namespace {

/// A scratch folder with a tiny CIFAR-10 set in `tiny/`.
struct TinyCifarScratch {
  ScratchDir scratch{"elastic"};
  const std::filesystem::path& dir = scratch.path;
  TinyCifarScratch() {
    write_cifar10_dir(dir / "tiny", 8, 4);
  }
  /// cifar_train's arguments for a short run on the tiny set (no launcher).
  std::string training(int steps, const std::string& extra) const {
    return fmt::format(
        "{} --quiet --data-dir {} --model revnet_mini --batch-size 8 "
        "--max-steps {} --threads 1 --dist-timeout 30 {}",
        TORCHREV_CIFAR_TRAIN,
        (dir / "tiny").string(),
        steps,
        extra);
  }
};

std::vector<std::string> checksums_in(const std::string& output) {
  std::vector<std::string> found;
  const std::regex line("param_checksum=([^\\n]+)");
  for (auto it = std::sregex_iterator(output.begin(), output.end(), line);
       it != std::sregex_iterator();
       ++it) {
    found.push_back((*it)[1]);
  }
  return found;
}

} // namespace

TEST(Torchrun, AKilledRankRestartsTheGroupWhichResumesLikeAnUninterruptedRun) {
  if (std::string(TORCHREV_CIFAR_TRAIN).empty()) {
    GTEST_SKIP() << "examples are not built";
  }
  if (std::string(TORCHREV_TORCHRUN).empty()) {
    GTEST_SKIP() << "no torchrun found (it comes with the torch wheel of the "
                    "LibTorch 2.x leg: TORCHREV_LIBTORCH=2.13.0)";
  }
  if (run("command -v pgrep").exit_code != 0) {
    GTEST_SKIP() << "pgrep (procps) is needed to find the worker to kill";
  }
  TinyCifarScratch scratch;
  constexpr int kSteps = 100; // about 3 s for both ranks
  const std::string common =
      fmt::format("--world-size 2 --master-port {}", free_port());
  auto reference = run_all(
      {scratch.training(kSteps, common + " --rank 0"),
       scratch.training(kSteps, common + " --rank 1")});
  ASSERT_EQ(reference[0].exit_code, 0) << reference[0].output;
  ASSERT_EQ(reference[1].exit_code, 0) << reference[1].output;
  const auto expected = value_of(reference[0].output, "param_checksum");
  ASSERT_FALSE(expected.empty());

  // The same command for every attempt, as torchrun restarts it. Rank 1 is
  // killed once a checkpoint exists; torchrun stops rank 0 and starts both
  // again, and they continue from the checkpoint. The worker that has RANK=1
  // in its environment is torchrun's child (--no-python: no interpreter).
  const auto checkpoint = (scratch.dir / "ck.pt").string();
  const auto log = (scratch.dir / "torchrun.log").string();
  // A LibTorch 1.x client cannot talk to the store a torchrun 2.x hosts;
  // rank 0 then hosts its own (see README).
  const std::string launch = fmt::format(
      "{}{} --standalone --nproc-per-node 2 --max-restarts 1 --no-python {}",
      TORCH_VERSION_MAJOR < 2 ? "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 " : "",
      TORCHREV_TORCHRUN,
      scratch.training(
          kSteps,
          "--checkpoint " + checkpoint + " --checkpoint-every 1 --resume"));
  auto outcome =
      run("bash -c '" + launch + " > " + log + " 2>&1 & launcher=$!; " +
          "for i in $(seq 1200); do [ -f " + checkpoint +
          " ] && break; sleep 0.05; done; killed=0; " +
          "for p in $(pgrep -P $launcher); do " +
          "if tr \"\\0\" \"\\n\" < /proc/$p/environ | grep -qx RANK=1; then " +
          "kill -KILL $p && killed=1; fi; done; " +
          "wait $launcher; echo launcher_exit=$?; echo killed=$killed; cat " +
          log + "'");
  EXPECT_EQ(value_of(outcome.output, "killed"), "1") << outcome.output;
  ASSERT_EQ(value_of(outcome.output, "launcher_exit"), "0") << outcome.output;
  // The first attempt starts afresh although --resume was given.
  EXPECT_NE(
      outcome.output.find("no checkpoint " + checkpoint + " yet"),
      std::string::npos)
      << outcome.output;
  EXPECT_NE(outcome.output.find("after restart 1"), std::string::npos)
      << outcome.output;
  // Only the restarted ranks finish; both print the uninterrupted checksum.
  EXPECT_EQ(checksums_in(outcome.output), std::vector<std::string>(2, expected))
      << outcome.output;
}

TEST(Torchrun, RanksThatResumedDifferentCheckpointsRefuseToTrain) {
  if (std::string(TORCHREV_CIFAR_TRAIN).empty()) {
    GTEST_SKIP() << "examples are not built";
  }
  TinyCifarScratch scratch;
  // A checkpoint of a 2-rank run at step 3, which only rank 0 will find (as
  // when the machines share no file system).
  const auto shared = (scratch.dir / "ck.pt").string();
  const std::string first =
      fmt::format("--world-size 2 --master-port {}", free_port());
  auto stopped = run_all(
      {scratch.training(
           10,
           first + " --rank 0 --checkpoint " + shared +
               " --stop-after 3 "
               "--checkpoint-every 1"),
       scratch.training(10, first + " --rank 1 --stop-after 3")});
  ASSERT_EQ(stopped[0].exit_code, 0) << stopped[0].output;
  ASSERT_TRUE(std::filesystem::exists(shared));

  const std::string second =
      fmt::format("--world-size 2 --master-port {}", free_port());
  auto ranks = run_all(
      {scratch.training(
           10, second + " --rank 0 --resume --checkpoint " + shared),
       scratch.training(
           10,
           second + " --rank 1 --resume-if-exists --checkpoint " +
               (scratch.dir / "missing.pt").string())});
  for (int r = 0; r < 2; ++r) {
    EXPECT_NE(ranks[r].exit_code, 0) << ranks[r].output;
    EXPECT_NE(
        ranks[r].output.find(
            r == 0 ? "rank 0: rank 1 did not resume (no checkpoint), but "
                     "this rank resumed from step 3; every rank must read the "
                     "same --checkpoint file"
                   : "rank 1: rank 0 resumed from step 3, but this rank did "
                     "not resume (no checkpoint)"),
        std::string::npos)
        << "rank " << r << ":\n"
        << ranks[r].output;
  }
}

TEST(Torchrun, LauncherVariablesAreReadAndBadOnesNamed) {
  // Each test runs in a process of its own (CTest): the variables stay here.
  ::setenv("WORLD_SIZE", "4", 1);
  ::setenv("RANK", "3", 1);
  ::setenv("LOCAL_RANK", "1", 1);
  ::setenv("TORCHELASTIC_USE_AGENT_STORE", "True", 1);
  ::setenv("TORCHELASTIC_RESTART_COUNT", "2", 1);
  ::setenv("TORCHELASTIC_RUN_ID", "job7", 1);
  auto options = cifar::DistributedOptions::from_environment();
  EXPECT_EQ(options.world_size, 4);
  EXPECT_EQ(options.rank, 3);
  EXPECT_EQ(options.local_rank, 1);
  EXPECT_TRUE(options.launcher_hosts_store);
  EXPECT_EQ(options.restart_count, 2);
  EXPECT_EQ(options.elastic_run_id, "job7");

  ::setenv("TORCHELASTIC_USE_AGENT_STORE", "False", 1);
  EXPECT_FALSE(
      cifar::DistributedOptions::from_environment().launcher_hosts_store);
  ::setenv("LOCAL_RANK", "-1", 1);
  try {
    cifar::DistributedOptions::from_environment();
    ADD_FAILURE() << "LOCAL_RANK=-1 was accepted";
  } catch (const std::runtime_error& e) {
    EXPECT_STREQ(
        e.what(), "invalid LOCAL_RANK='-1': expected an integer in [0, 65534]");
  }
  for (const char* name :
       {"WORLD_SIZE",
        "RANK",
        "LOCAL_RANK",
        "TORCHELASTIC_USE_AGENT_STORE",
        "TORCHELASTIC_RESTART_COUNT",
        "TORCHELASTIC_RUN_ID"}) {
    ::unsetenv(name);
  }
  options = cifar::DistributedOptions::from_environment();
  EXPECT_EQ(options.local_rank, 0);
  EXPECT_FALSE(options.launcher_hosts_store);
  EXPECT_TRUE(options.elastic_run_id.empty());
}
