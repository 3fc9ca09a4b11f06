#pragma once

#include <torch/nn/module.h>
#include <torch/types.h>

#include <string>

namespace torchrev {

/// Base class of everything a `torchrev::RevSequential` can hold: a module
/// whose input can be computed from its output.
///
/// Reversible blocks (`RevBlockBase`, `AffineBlockBase`) are one kind; the
/// invertible layers (`SpaceToDepth`, `ChannelZeroPad`) another. Subclass it
/// to put your own invertible computation in a stage:
///
/// ```
/// // y = x * exp(s) + b, per channel.
/// struct ChannelAffineImpl : torchrev::InvertibleModule {
///   explicit ChannelAffineImpl(int64_t channels)
///       : s(register_parameter("s", torch::zeros({1, channels, 1, 1}))),
///         b(register_parameter("b", torch::zeros({1, channels, 1, 1}))) {}
///   torch::Tensor forward(const torch::Tensor& x) override {
///     return x * s.exp() + b;
///   }
///   torch::Tensor inverse(const torch::Tensor& y) override {
///     return (y - b) * (-s).exp();
///   }
///   torch::Tensor s, b;
/// };
/// TORCH_MODULE(ChannelAffine);
/// ```
///
/// The contract, which the stage relies on to train without storing the
/// member's input:
/// - `inverse(forward(x))` equals `x` up to floating-point rounding, for the
///   module in the mode (training or eval) and with the random numbers of
///   that forward. In a stage's backward, `inverse` and then `forward` are
///   run again with the forward's random generator states replayed, under
///   `torchrev::is_recomputing()`, and with BatchNorm statistics frozen.
/// - `forward` may change the shape (space-to-depth does), but `inverse`
///   must give back the shape `forward` was called on; the stage checks this
///   and names the member if not.
/// - `forward` and `inverse` compute only from their argument and the
///   module's own parameters (and buffers), and never modify their argument
///   in place.
///
/// In a stage's backward, a member that is not a coupling block costs one
/// `inverse` and one `forward` more than plain training; coupling blocks
/// (`RevBlockBase`, `AffineBlockBase`) need only one evaluation of F and G,
/// which both reconstructs their input and gives their gradients.
///
/// To deep-copy a stage (`RevSequential::clone()`), a member must implement
/// `clone()` (see `torchrev::clone_state_into`).
class InvertibleModule : public torch::nn::Module {
 public:
  /// The output, with plain autograd.
  virtual torch::Tensor forward(const torch::Tensor& x) = 0;

  /// The input that `forward` was called on, given its output.
  virtual torch::Tensor inverse(const torch::Tensor& y) = 0;
};

namespace detail {

/// `member.forward(x)` for a stage: errors raised inside get a line naming
/// the member (`where`), and the result must be a defined tensor of x's
/// dtype and device.
inline torch::Tensor checked_forward(
    InvertibleModule& member,
    const torch::Tensor& x,
    const std::string& where) {
  torch::Tensor y;
  const auto version = x._version();
  try {
    y = member.forward(x);
  } catch (c10::Error& e) {
    e.add_context(c10::str(
        "in forward of ", where, ", called on an input of shape ", x.sizes()));
    throw;
  }
  TORCH_CHECK(
      x._version() == version,
      where,
      ": forward modified its input in place; an invertible member must leave "
      "its input unchanged");
  TORCH_CHECK(
      y.defined() && y.scalar_type() == x.scalar_type() &&
          y.device() == x.device(),
      where,
      ": forward must return a defined tensor of its input's dtype and "
      "device (",
      x.scalar_type(),
      " on ",
      x.device(),
      "), but got ",
      y.defined() ? c10::str(y.scalar_type(), " on ", y.device())
                  : std::string("an undefined tensor"));
  return y;
}

/// `member.inverse(y)` for a stage: errors raised inside get a line naming
/// the member, and the result must be defined and `y` unchanged (it may be
/// the stage output the caller holds).
inline torch::Tensor checked_inverse(
    InvertibleModule& member,
    const torch::Tensor& y,
    const std::string& where) {
  torch::Tensor x;
  const auto version = y._version();
  try {
    x = member.inverse(y);
  } catch (c10::Error& e) {
    e.add_context(c10::str(
        "in inverse of ", where, ", called on an output of shape ", y.sizes()));
    throw;
  }
  TORCH_CHECK(
      y._version() == version,
      where,
      ": inverse modified its input in place; an invertible member must "
      "leave it unchanged");
  TORCH_CHECK(x.defined(), where, ": inverse returned an undefined tensor");
  return x;
}

/// As above, and checked to give back `input_sizes`, the shape forward was
/// called on.
inline torch::Tensor checked_inverse(
    InvertibleModule& member,
    const torch::Tensor& y,
    c10::IntArrayRef input_sizes,
    const std::string& where) {
  torch::Tensor x = checked_inverse(member, y, where);
  TORCH_CHECK(
      x.sizes() == input_sizes && x.scalar_type() == y.scalar_type() &&
          x.device() == y.device(),
      where,
      ": inverse must return the shape (and the dtype and device) that "
      "forward was called on: expected shape ",
      input_sizes,
      " (",
      y.scalar_type(),
      " on ",
      y.device(),
      "), but inverse returned shape ",
      x.sizes(),
      " (",
      x.scalar_type(),
      " on ",
      x.device(),
      ")");
  return x;
}

} // namespace detail

} // namespace torchrev
