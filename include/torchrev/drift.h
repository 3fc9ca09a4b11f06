#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace torchrev {

/// What a stage with `RevSequentialOptions::track_drift` measured in its
/// last backward: how far each reconstructed member input is from the one
/// the forward computed.
///
/// The backward rebuilds each member's input from its output, so rounding
/// errors compound from the stage output down. In float64 they stay near
/// 1e-15; in float32 or bfloat16, deep stages of blocks that amplify errors
/// can drift far enough to spoil the gradients. Then keep some activations
/// (`RevSequentialOptions::anchor_every`) or checkpoint instead.
struct DriftReport {
  /// input_errors[i]: max |reconstructed - forward| / max |forward| of
  /// member i's input, or -1 where the backward rebuilt none (the output of
  /// an anchor, which is kept; anything before the backward has run).
  std::vector<double> input_errors;
  /// The member whose reconstructed input is farthest off, its name
  /// ("torchrev::RevSequential block 3 (...)") and its error; -1 and "" when
  /// nothing was measured.
  int64_t worst_member = -1;
  std::string worst_name;
  double worst_error = -1.0;
};

} // namespace torchrev
