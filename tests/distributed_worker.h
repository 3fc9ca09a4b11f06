#pragma once

// The workers that tests/distributed_test.cpp starts as ranks (through the
// test binary's --dp-worker and --dp-model-check): a network without
// BatchNorm (a reversible MLP stage and a linear head) trained for a few SGD
// steps on its share of a fixed batch, under cifar::DataParallel when
// world > 1; and a model handed to cifar::DataParallel only to see whether
// the ranks agree on it.

#include "distributed.h"
#include "test_util.h"

namespace torchrev {
namespace testing {

inline double dp_worker_checksum(int rank, int world, int port) {
  constexpr int64_t kBatch = 16; // per rank when world == 2
  constexpr int kSteps = 4;
  torch::manual_seed(123);
  auto stage = mlp_stage(3, 8);
  torch::nn::Linear head(16, 5);
  torch::nn::Sequential model(stage, head);
  auto x = torch::randn({2 * kBatch, 16});
  auto y = torch::randint(5, {2 * kBatch});
  const int64_t per_rank = 2 * kBatch / world;
  auto xs = x.narrow(0, rank * per_rank, per_rank);
  auto ys = y.narrow(0, rank * per_rank, per_rank);

  std::unique_ptr<cifar::DataParallel> parallel;
  if (world > 1) {
    cifar::DistributedOptions options;
    options.world_size = world;
    options.rank = rank;
    options.master_port = port;
    options.timeout = std::chrono::milliseconds(30000);
    parallel =
        std::make_unique<cifar::DataParallel>(options, *model, torch::kCPU);
  }
  torch::optim::SGD optimizer(
      model->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
  for (int s = 0; s < kSteps; ++s) {
    cifar::detail::zero_grad_in_place(optimizer);
    auto loss = torch::nn::functional::cross_entropy(model->forward(xs), ys);
    if (parallel) {
      parallel->prepare_backward();
    }
    loss.backward();
    if (parallel) {
      parallel->finish_backward();
    }
    optimizer.step();
  }
  double sum = 0;
  int64_t k = 0;
  for (const auto& p : model->parameters()) {
    sum +=
        (p.detach().to(torch::kFloat64).flatten() *
         torch::arange(p.numel(), torch::kFloat64).remainder_(13).add_(1 + k))
            .sum()
            .item<double>();
    ++k;
  }
  return sum;
}

/// One rank of Distributed.RanksWithDifferentModelsRefuseToTrainOnEveryRank:
/// a Linear(16, `outputs`) handed to cifar::DataParallel. Returns its error,
/// or an empty string where the ranks agreed.
inline std::string dp_model_check(int rank, int world, int port, int outputs) {
  torch::nn::Linear model(16, outputs);
  cifar::DistributedOptions options;
  options.world_size = world;
  options.rank = rank;
  options.master_port = port;
  options.timeout = std::chrono::milliseconds(30000);
  try {
    cifar::DataParallel parallel(options, *model, torch::kCPU);
  } catch (const std::runtime_error& e) {
    return e.what();
  }
  return "";
}

} // namespace testing
} // namespace torchrev
