#pragma once

/// Which samples of an epoch each rank trains on.

#include <torch/types.h>

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace cifar {

/// Disjoint per-rank shard of a shuffled epoch, like
/// torch.utils.data.DistributedSampler (drop_last=false): the permutation
/// of [0, dataset_size) depends only on (seed, epoch) (a private CPU
/// generator seeded with seed + epoch feeds randperm; the global RNG is not
/// touched), padded by wrapping so every rank gets the same count
/// ceil(n / world_size); rank r takes indices r, r + world, r + 2*world ...
/// With world_size 1 it is the full permutation. shuffle=false uses
/// 0, 1, ..., n - 1 instead of the permutation.
inline std::vector<int64_t> shard_indices(
    int64_t dataset_size,
    int64_t epoch,
    uint64_t seed,
    int rank,
    int world_size,
    bool shuffle = true) {
  if (dataset_size < 0) {
    throw std::runtime_error(
        "shard_indices: negative dataset size " + std::to_string(dataset_size));
  }
  if (world_size < 1 || rank < 0 || rank >= world_size) {
    throw std::runtime_error(
        "shard_indices: rank " + std::to_string(rank) +
        " is not in [0, world size " + std::to_string(world_size) + ")");
  }
  if (dataset_size == 0) {
    return {};
  }
  std::vector<int64_t> order(static_cast<size_t>(dataset_size));
  if (shuffle) {
    auto generator = at::make_generator<at::CPUGeneratorImpl>(
        seed + static_cast<uint64_t>(epoch));
    const auto perm = torch::randperm(
        dataset_size, generator, torch::TensorOptions().dtype(torch::kLong));
    const int64_t* data = perm.data_ptr<int64_t>();
    std::copy(data, data + dataset_size, order.begin());
  } else {
    for (int64_t i = 0; i < dataset_size; ++i) {
      order[static_cast<size_t>(i)] = i;
    }
  }
  const int64_t per_rank = (dataset_size + world_size - 1) / world_size;
  std::vector<int64_t> shard;
  shard.reserve(static_cast<size_t>(per_rank));
  for (int64_t k = 0; k < per_rank; ++k) {
    const int64_t position = rank + k * world_size; // in the padded order
    shard.push_back(order[static_cast<size_t>(position % dataset_size)]);
  }
  return shard;
}

} // namespace cifar
