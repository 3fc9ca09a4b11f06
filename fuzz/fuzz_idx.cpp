// libFuzzer target: the IDX image and label checks (examples/cifar/formats.h).
// The first byte chooses the file kind (even: images, odd: labels); for
// labels, the second byte is the image count to match.
#include "formats.h"

#include <cstddef>
#include <cstdint>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 2) {
    return 0;
  }
  try {
    if (data[0] % 2 == 0) {
      const auto h =
          cifar::formats::check_idx_images(data + 1, size - 1, "images");
      // Accepted: the header's sizes describe the bytes exactly.
      if (cifar::formats::IdxImages::kHeaderBytes + h.count * h.rows * h.cols !=
          size - 1) {
        __builtin_trap();
      }
    } else {
      cifar::formats::check_idx_labels(
          data + 2, size - 2, data[1], 9, "labels");
    }
  } catch (const cifar::DataError&) {
  }
  return 0;
}
