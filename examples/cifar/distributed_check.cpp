// Hand-run check of examples/cifar/distributed.h (not part of the build).
//
// Build (one translation unit):
//   g++ -std=c++17 -O1 -I include examples/cifar/distributed_check.cpp
//     -o /tmp/dcheck -D_GLIBCXX_USE_CXX11_ABI=1 -I/usr/include
//     -I/usr/include/torch/csrc/api/include -ltorch -ltorch_cpu -lc10
//     -lpthread
//
// Modes (rank, world size and rendezvous from RANK, WORLD_SIZE, MASTER_ADDR,
// MASTER_PORT):
//   dcheck train MODEL STEPS [TIMEOUT_MS] [exit|stall AFTER_STEP] [plain]
//       MODEL is mlp or rev (an MLP with a torchrev::RevSequential stage).
//       Trains STEPS SGD steps on this rank's share of a fixed 16-sample
//       batch and prints "checksum <value>". "plain" trains without
//       DataParallel (the single-process reference). "exit K" / "stall K"
//       makes rank 1 exit / sleep after step K.
//   dcheck unused [TIMEOUT_MS]   rank-dependent unused parameters
//   dcheck double [TIMEOUT_MS]   two gradients for one parameter
//   dcheck local                 shard_indices / options checks, no network
#include "distributed.h"

#include <torchrev/torchrev.h>

#include <torch/torch.h>

#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <set>
#include <string>
#include <thread>

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

torch::nn::Sequential make_model(const std::string& kind) {
  if (kind == "mlp") {
    return torch::nn::Sequential(
        torch::nn::Linear(8, 16),
        torch::nn::Tanh(),
        torch::nn::Linear(16, 16),
        torch::nn::Tanh(),
        torch::nn::Linear(16, 4));
  }
  torchrev::RevSequential stage;
  for (int i = 0; i < 2; ++i) {
    stage->push_back(
        torchrev::RevBlock<torch::nn::Sequential, torch::nn::Sequential>(
            torch::nn::Sequential(torch::nn::Linear(8, 8), torch::nn::Tanh()),
            torch::nn::Sequential(torch::nn::Linear(8, 8), torch::nn::Tanh())));
  }
  return torch::nn::Sequential(
      torch::nn::Linear(8, 16), stage, torch::nn::Linear(16, 4));
}

double checksum(torch::nn::Module& model) {
  double sum = 0;
  int64_t k = 1;
  for (const auto& p : model.parameters()) {
    auto flat = p.detach().to(torch::kDouble).reshape({-1});
    auto w =
        torch::arange(k, k + flat.numel(), torch::kDouble).remainder(7).add(1);
    sum += (flat * w).sum().item<double>();
    k += flat.numel();
  }
  return sum;
}

int train(int argc, char** argv) {
  const std::string kind = argc > 2 ? argv[2] : "mlp";
  const int steps = argc > 3 ? std::atoi(argv[3]) : 3;
  auto options = cifar::DistributedOptions::from_environment();
  if (argc > 4) {
    options.timeout = std::chrono::milliseconds(std::atoll(argv[4]));
  }
  std::string fault;
  int fault_step = -1;
  bool plain = false;
  for (int i = 5; i < argc; ++i) {
    const std::string a = argv[i];
    if ((a == "exit" || a == "stall") && i + 1 < argc) {
      fault = a;
      fault_step = std::atoi(argv[++i]);
    } else if (a == "plain") {
      plain = true;
    }
  }

  torch::manual_seed(0);
  const auto inputs = torch::randn({16, 8});
  const auto targets = torch::randint(0, 4, {16}, torch::kLong);
  // Different initialisation per rank: DataParallel must broadcast rank 0's.
  torch::manual_seed(100 + options.rank);
  auto model = make_model(kind);
  torch::optim::SGD optimizer(
      model->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));

  const auto start = Clock::now();
  std::unique_ptr<cifar::DataParallel> dp;
  int rank = 0;
  int world = 1;
  if (!plain) {
    dp = std::make_unique<cifar::DataParallel>(
        options, *model, torch::kCPU, /*bucket_bytes=*/256);
    rank = dp->rank();
    world = dp->world_size();
  }
  const int64_t per_rank = 16 / world;
  const auto x = inputs.narrow(0, rank * per_rank, per_rank);
  const auto y = targets.narrow(0, rank * per_rank, per_rank);

  for (int step = 1; step <= steps; ++step) {
    optimizer.zero_grad();
    auto loss = torch::nn::functional::cross_entropy(model->forward(x), y);
    if (dp) {
      dp->prepare_backward();
    }
    loss.backward();
    if (dp) {
      dp->finish_backward();
    }
    optimizer.step();
    double mean_loss = loss.item<double>();
    if (dp) {
      mean_loss = dp->all_reduce_sum({mean_loss * per_rank})[0] / 16.0;
    }
    std::printf("rank %d step %d loss %.10f\n", rank, step, mean_loss);
    std::fflush(stdout);
    if (rank == 1 && step == fault_step) {
      if (fault == "exit") {
        std::printf("rank 1 exiting after step %d\n", step);
        std::fflush(stdout);
        std::_Exit(0); // like a crash: no destructors, sockets just close
      }
      std::printf("rank 1 stalling after step %d\n", step);
      std::fflush(stdout);
      std::this_thread::sleep_for(std::chrono::seconds(600));
    }
  }
  if (dp) {
    dp->barrier();
  }
  std::printf(
      "rank %d world %d checksum %.12e (%.2f s)\n",
      rank,
      world,
      checksum(*model),
      seconds_since(start));
  return 0;
}

// Rank 0 uses heads a and b, rank 1 only a; head c is used by nobody.
int unused(int argc, char** argv) {
  auto options = cifar::DistributedOptions::from_environment();
  if (argc > 2) {
    options.timeout = std::chrono::milliseconds(std::atoll(argv[2]));
  }
  torch::manual_seed(1);
  torch::nn::Sequential model(
      torch::nn::Linear(4, 4),
      torch::nn::Linear(4, 1),
      torch::nn::Linear(4, 1));
  auto a = model[0]->as<torch::nn::Linear>();
  auto b = model[1]->as<torch::nn::Linear>();
  auto c = model[2]->as<torch::nn::Linear>();
  auto stat = model->register_buffer("stat", torch::zeros({3}));
  cifar::DataParallel dp(options, *model, torch::kCPU, /*bucket_bytes=*/1);
  const auto x = torch::ones({2, 4});
  bool ok = true;
  for (int step = 0; step < 3; ++step) {
    model->zero_grad();
    auto h = a->forward(x);
    auto loss = h.sum();
    if (dp.rank() == 0) {
      loss = loss + b->forward(h).sum();
    }
    // d(sum(h W^T))/dW = column sums of h: rank 0's local gradient of b.
    const auto local_b = h.detach().sum(0, /*keepdim=*/true);
    dp.prepare_backward();
    loss.backward();
    dp.finish_backward();
    if (dp.rank() == 0) {
      ok = ok && b->weight.grad().defined() &&
          b->weight.grad().allclose(local_b / 2);
    } else {
      ok = ok && b->weight.grad().defined();
    }
    ok = ok && !c->weight.grad().defined(); // globally unused: untouched
    ok = ok && a->weight.grad().defined();
  }
  // broadcast_buffers: per-rank values become rank 0's.
  {
    torch::NoGradGuard no_grad;
    stat.fill_(5 + dp.rank());
  }
  dp.broadcast_buffers();
  ok = ok && stat.eq(5).all().item<bool>();
  const auto grads = dp.all_reduce_sum(
      {a->weight.grad().sum().item<double>(), ok ? 1.0 : 0.0});
  std::printf(
      "rank %d unused-params + broadcast_buffers check %s (b.grad=%s, "
      "c.grad defined=%d, ranks ok=%g)\n",
      dp.rank(),
      ok ? "ok" : "FAILED",
      b->weight.grad().defined() ? "averaged" : "undefined",
      static_cast<int>(c->weight.grad().defined()),
      grads[1]);
  return ok ? 0 : 1;
}

int double_grad(int argc, char** argv) {
  auto options = cifar::DistributedOptions::from_environment();
  if (argc > 2) {
    options.timeout = std::chrono::milliseconds(std::atoll(argv[2]));
  }
  torch::nn::Sequential model(torch::nn::Linear(4, 1));
  cifar::DataParallel dp(options, *model, torch::kCPU);
  auto loss = model->forward(torch::ones({2, 4})).sum();
  dp.prepare_backward();
  loss.backward({}, /*retain_graph=*/true);
  try {
    loss.backward();
    std::printf("rank %d double-grad check FAILED (no error)\n", dp.rank());
    return 1;
  } catch (const std::exception& e) {
    const std::string what = cifar::detail::short_message(e);
    const bool ok = what.find("produced two gradients") != std::string::npos;
    std::printf(
        "rank %d double-grad check %s: %s\n",
        dp.rank(),
        ok ? "ok" : "FAILED",
        what.c_str());
    return ok ? 0 : 1;
  }
}

int local() {
  bool ok = true;
  auto expect = [&](bool cond, const std::string& what) {
    if (!cond) {
      std::printf("FAILED: %s\n", what.c_str());
      ok = false;
    }
  };
  for (const int64_t n : {0, 1, 5, 10, 11, 50000}) {
    for (const int world : {1, 2, 3, 4, 8}) {
      std::multiset<int64_t> all;
      const int64_t per_rank = (n + world - 1) / world;
      for (int r = 0; r < world; ++r) {
        const auto shard = cifar::shard_indices(n, 3, 42, r, world);
        expect(
            static_cast<int64_t>(shard.size()) == per_rank,
            "shard size n=" + std::to_string(n));
        all.insert(shard.begin(), shard.end());
      }
      std::set<int64_t> distinct(all.begin(), all.end());
      expect(
          static_cast<int64_t>(distinct.size()) == n,
          "coverage n=" + std::to_string(n) +
              " world=" + std::to_string(world));
      expect(
          static_cast<int64_t>(all.size()) == per_rank * world,
          "padding n=" + std::to_string(n));
      if (n > 0) {
        expect(*distinct.begin() == 0 && *distinct.rbegin() == n - 1, "range");
      }
      if (n >= world) {
        // Padding repeats at most world - 1 indices, so shards are disjoint
        // apart from those.
        expect(static_cast<int64_t>(all.size()) - n < world, "disjoint shards");
      }
    }
  }
  // Deterministic in (seed, epoch), independent of the global RNG.
  torch::manual_seed(1);
  const auto a = cifar::shard_indices(1000, 2, 7, 1, 4);
  torch::manual_seed(2);
  torch::rand({10});
  const auto b = cifar::shard_indices(1000, 2, 7, 1, 4);
  expect(a == b, "same (seed, epoch) gives the same shard");
  expect(a != cifar::shard_indices(1000, 3, 7, 1, 4), "epoch reshuffles");
  expect(a != cifar::shard_indices(1000, 2, 8, 1, 4), "seed reshuffles");
  const auto full = cifar::shard_indices(1000, 2, 7, 0, 1);
  expect(
      std::set<int64_t>(full.begin(), full.end()).size() == 1000,
      "world 1 is a permutation");
  // Rank r takes positions r, r + world, ... of the world-1 permutation.
  const auto r1 = cifar::shard_indices(1000, 2, 7, 1, 4);
  expect(r1[0] == full[1] && r1[1] == full[5], "strided split");
  const auto unshuffled = cifar::shard_indices(10, 0, 0, 2, 4, false);
  expect(
      unshuffled == std::vector<int64_t>({2, 6, 0}),
      "shuffle=false with wrap padding");

  auto throws = [&](auto fn, const std::string& needle) {
    try {
      fn();
    } catch (const std::exception& e) {
      const std::string what = e.what();
      std::printf("  error as expected: %s\n", what.c_str());
      expect(what.find(needle) != std::string::npos, "message " + needle);
      return;
    }
    expect(false, "expected an error containing " + needle);
  };
  setenv("WORLD_SIZE", "two", 1);
  throws(
      [] { cifar::DistributedOptions::from_environment(); },
      "WORLD_SIZE='two'");
  setenv("WORLD_SIZE", "2", 1);
  setenv("MASTER_PORT", "70000", 1);
  throws(
      [] { cifar::DistributedOptions::from_environment(); },
      "MASTER_PORT='70000'");
  setenv("MASTER_PORT", "29511", 1);
  setenv("RANK", "-1", 1);
  throws([] { cifar::DistributedOptions::from_environment(); }, "RANK='-1'");
  setenv("RANK", "1", 1);
  setenv("MASTER_ADDR", "10.0.0.7", 1);
  const auto env = cifar::DistributedOptions::from_environment();
  expect(
      env.world_size == 2 && env.rank == 1 && env.master_port == 29511 &&
          env.master_addr == "10.0.0.7" && env.enabled(),
      "environment parsed");
  torch::nn::Sequential model(torch::nn::Linear(2, 2));
  cifar::DistributedOptions bad;
  bad.world_size = 2;
  bad.rank = 2;
  throws(
      [&] { cifar::DataParallel(bad, *model, torch::kCPU); }, "invalid rank 2");
  bad.rank = 0;
  bad.master_port = 0;
  throws(
      [&] { cifar::DataParallel(bad, *model, torch::kCPU); },
      "invalid master port 0");
  // World size 1: no network, everything is a no-op.
  cifar::DataParallel single({}, *model, torch::kCPU);
  single.prepare_backward();
  model->forward(torch::ones({1, 2})).sum().backward();
  single.finish_backward();
  single.barrier();
  expect(
      single.all_reduce_sum({1.5, 2.5}) == std::vector<double>({1.5, 2.5}),
      "world 1 all_reduce_sum");
  expect(
      cifar::detail::format_seconds(std::chrono::milliseconds(60000)) == "60" &&
          cifar::detail::format_seconds(std::chrono::milliseconds(2500)) ==
              "2.5",
      "format_seconds");
  std::printf("local checks %s\n", ok ? "ok" : "FAILED");
  return ok ? 0 : 1;
}

} // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "train";
  const auto start = Clock::now();
  try {
    if (mode == "train") {
      return train(argc, argv);
    }
    if (mode == "unused") {
      return unused(argc, argv);
    }
    if (mode == "double") {
      return double_grad(argc, argv);
    }
    if (mode == "local") {
      return local();
    }
    std::cerr << "unknown mode " << mode << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::printf(
        "error after %.2f s: %s\n",
        seconds_since(start),
        cifar::detail::short_message(e).c_str());
    return 1;
  }
}
