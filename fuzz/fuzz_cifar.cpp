// libFuzzer target: the CIFAR binary-file checks (examples/cifar/formats.h).
#include "formats.h"

#include <cstddef>
#include <cstdint>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  for (int label_bytes : {1, 2}) {
    try {
      const size_t records =
          cifar::formats::check_cifar(data, size, label_bytes, "input");
      // Accepted: the records cover the input exactly.
      if (records * (label_bytes + cifar::formats::kCifarImageBytes) != size) {
        __builtin_trap();
      }
    } catch (const cifar::DataError&) {
    }
  }
  return 0;
}
