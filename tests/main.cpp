// The test binary's main: installs the CPU memory meter before any tensor
// exists, so memory tests see every allocation.
#include "distributed_worker.h"

#include <torchrev/memory/cpu_memory_meter.h>

#include <gtest/gtest.h>

#include <cstdio>
#include <cstring>
#include <string>

int main(int argc, char** argv) {
  torchrev::CPUMemoryMeter::install();
  // `torchrev_tests --dp-worker RANK WORLD PORT`: one rank of the
  // data-parallel equivalence test (tests/distributed_test.cpp).
  if (argc == 5 && std::strcmp(argv[1], "--dp-worker") == 0) {
    try {
      const double checksum = torchrev::testing::dp_worker_checksum(
          std::stoi(argv[2]), std::stoi(argv[3]), std::stoi(argv[4]));
      std::printf("param_checksum=%.17g\n", checksum);
      return 0;
    } catch (const std::exception& e) {
      std::fprintf(stderr, "dp-worker: %s\n", e.what());
      return 1;
    }
  }
  // `torchrev_tests --dp-model-check RANK WORLD PORT OUTPUTS`: one rank of
  // the model-mismatch test.
  if (argc == 6 && std::strcmp(argv[1], "--dp-model-check") == 0) {
    const std::string error = torchrev::testing::dp_model_check(
        std::stoi(argv[2]),
        std::stoi(argv[3]),
        std::stoi(argv[4]),
        std::stoi(argv[5]));
    std::printf("%s\n", error.empty() ? "accepted" : error.c_str());
    return error.empty() ? 0 : 1;
  }
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
