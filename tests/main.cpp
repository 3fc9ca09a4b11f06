// The test binary's main: installs the CPU memory meter before any tensor
// exists, so memory tests see every allocation.
#include <torchrev/memory/cpu_memory_meter.h>

#include <gtest/gtest.h>

int main(int argc, char** argv) {
  torchrev::CPUMemoryMeter::install();
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
