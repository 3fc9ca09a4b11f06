// libFuzzer target: reading a sealed file (examples/cifar/files.h), the
// integrity check every checkpoint passes before LibTorch parses it.
#include "files.h"

#include <cstddef>
#include <cstdint>
#include <string_view>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  try {
    const auto payload = cifar::unseal(input, "input");
    // Accepted: sealing the payload again gives back the input exactly.
    if (cifar::seal(payload) != input) {
      __builtin_trap();
    }
  } catch (const cifar::FileError&) {
  }
  return 0;
}
