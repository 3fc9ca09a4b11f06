#pragma once

/// Multi-process data-parallel training for the CIFAR example, on c10d.
///
/// One process per rank. Rank 0 hosts a `c10d::TCPStore` at
/// MASTER_ADDR:MASTER_PORT (or, under torchrun, the launcher already hosts
/// it there), every rank joins it, and a Gloo process group
/// (NCCL for CUDA devices when LibTorch was built with it) carries the
/// collectives. `DataParallel` broadcasts rank 0's parameters and buffers,
/// then averages gradients bucket by bucket while backward is still running,
/// like `torch.nn.parallel.DistributedDataParallel`. `shard_indices` splits
/// each epoch between ranks like `torch.utils.data.DistributedSampler`.
///
/// ```
/// auto dist = cifar::DistributedOptions::from_environment();
/// cifar::DataParallel dp(dist, *model, device);
/// for (int64_t epoch = 0; epoch < epochs; ++epoch) {
///   auto indices = cifar::shard_indices(
///       train_size, epoch, seed, dp.rank(), dp.world_size());
///   for (/* each batch drawn from indices */) {
///     optimizer.zero_grad();
///     auto loss = criterion(model->forward(x), y);
///     dp.backward(loss); // loss.backward(), gradients averaged over ranks
///     optimizer.step();
///   }
/// }
/// ```
///
/// The parts, one concern each, in `distributed/`: `options.h` (the
/// environment), `rendezvous.h` (store and process group),
/// `communicator.h` (collectives with deadlines), `gradient_reducer.h`
/// (bucketed averaging during backward), `model_check.h`, `sampler.h`
/// (shard_indices), `data_parallel.h` (the facade above) and `compat.h`
/// (LibTorch version shims).
///
/// Build: link torch_cpu (the CMake `torch` target also defines
/// USE_DISTRIBUTED and USE_C10D_GLOO). Only LibTorch built with Gloo (Debian,
/// pip and the official archives are) provides the symbols used here.

#include "distributed/compat.h"
#include "distributed/data_parallel.h"
#include "distributed/options.h"
#include "distributed/sampler.h"
