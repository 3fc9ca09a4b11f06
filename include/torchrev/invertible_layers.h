#pragma once

// Parameter-free invertible layers that change the shape of an activation,
// so that a `RevSequential` can downsample and widen without storing
// anything (i-RevNet, Jacobsen et al. 2018).

#include <torchrev/detail/dims.h>
#include <torchrev/invertible_module.h>

#include <torch/arg.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include <cstdint>
#include <memory>
#include <ostream>

namespace torchrev {

/// Options for `SpaceToDepth`.
struct SpaceToDepthOptions {
  /* implicit */ SpaceToDepthOptions(int64_t block_size = 2)
      : block_size_(block_size) {}
  /// The side of the square of pixels that becomes one pixel with
  /// block_size^2 times the channels.
  TORCH_ARG(int64_t, block_size);
};

/// Invertible downsampling: (N, C, H, W) -> (N, C*b*b, H/b, W/b), every
/// b x b square of pixels moved into the channels (`torch::pixel_unshuffle`);
/// the inverse is `torch::pixel_shuffle`. Exact, with no parameters. The
/// output keeps the input's memory format (channels-last stays so).
///
/// ```
/// torchrev::RevSequential stage(block_a, torchrev::SpaceToDepth(2), block_b);
/// ```
class SpaceToDepthImpl : public InvertibleModule {
 public:
  explicit SpaceToDepthImpl(SpaceToDepthOptions options_ = {})
      : options(options_) {
    TORCH_CHECK(
        options.block_size() >= 1,
        "torchrev::SpaceToDepth: block_size must be positive, but got ",
        options.block_size());
  }

  torch::Tensor forward(const torch::Tensor& x) override {
    const int64_t b = options.block_size();
    TORCH_CHECK(
        x.defined() && x.dim() == 4,
        "torchrev::SpaceToDepth: expected a 4-d input (N, C, H, W), but got ",
        x.defined() ? c10::str(x.dim(), "-d tensor of shape ", x.sizes())
                    : std::string("an undefined tensor"));
    TORCH_CHECK(
        x.size(2) % b == 0 && x.size(3) % b == 0,
        "torchrev::SpaceToDepth: expected height and width divisible by "
        "block_size ",
        b,
        ", but got an input of shape ",
        x.sizes());
    return torch::pixel_unshuffle(x, b).contiguous(x.suggest_memory_format());
  }

  torch::Tensor inverse(const torch::Tensor& y) override {
    const int64_t b = options.block_size();
    TORCH_CHECK(
        y.defined() && y.dim() == 4 && y.size(1) % (b * b) == 0,
        "torchrev::SpaceToDepth::inverse: expected a 4-d input whose channels "
        "are divisible by block_size^2 = ",
        b * b,
        ", but got ",
        y.defined() ? c10::str("shape ", y.sizes())
                    : std::string("an undefined tensor"));
    return torch::pixel_shuffle(y, b).contiguous(y.suggest_memory_format());
  }

  std::shared_ptr<torch::nn::Module> clone(
      const torch::optional<torch::Device>& /*device*/ =
          torch::nullopt) const override {
    return std::make_shared<SpaceToDepthImpl>(options);
  }

  void pretty_print(std::ostream& stream) const override {
    stream << "torchrev::SpaceToDepth(block_size=" << options.block_size()
           << ")";
  }

  SpaceToDepthOptions options;
};

/// Holder of a `SpaceToDepthImpl`.
TORCH_MODULE(SpaceToDepth);

/// Options for `ChannelZeroPad`.
struct ChannelZeroPadOptions {
  /* implicit */ ChannelZeroPadOptions(int64_t extra) : extra_(extra) {}
  /// How many zero entries to append.
  TORCH_ARG(int64_t, extra);
  /// The dimension to widen (1: channels).
  TORCH_ARG(int64_t, dim) = 1;
};

/// Invertible widening: appends `extra` zero channels (an injective map, as
/// i-RevNet widens). The inverse drops them again; it is exact on outputs of
/// `forward`, and on anything else it is the left inverse (the appended
/// entries are discarded, not checked).
///
/// ```
/// torchrev::ChannelZeroPad pad(16); // 16 -> 32 channels
/// ```
class ChannelZeroPadImpl : public InvertibleModule {
 public:
  explicit ChannelZeroPadImpl(ChannelZeroPadOptions options_)
      : options(options_) {
    TORCH_CHECK(
        options.extra() >= 0,
        "torchrev::ChannelZeroPad: extra must be 0 or more, but got ",
        options.extra());
  }

  torch::Tensor forward(const torch::Tensor& x) override {
    const int64_t dim = resolved_dim(x, "");
    auto sizes = x.sizes().vec();
    sizes[dim] = options.extra();
    auto zeros = torch::zeros(sizes, x.options());
    return torch::cat({x, zeros}, dim).contiguous(x.suggest_memory_format());
  }

  torch::Tensor inverse(const torch::Tensor& y) override {
    const int64_t dim = resolved_dim(y, "::inverse");
    TORCH_CHECK(
        y.size(dim) > options.extra(),
        "torchrev::ChannelZeroPad::inverse: expected more than ",
        options.extra(),
        " entries along dimension ",
        dim,
        " (the padding), but got shape ",
        y.sizes());
    return y.narrow(dim, 0, y.size(dim) - options.extra());
  }

  std::shared_ptr<torch::nn::Module> clone(
      const torch::optional<torch::Device>& /*device*/ =
          torch::nullopt) const override {
    return std::make_shared<ChannelZeroPadImpl>(options);
  }

  void pretty_print(std::ostream& stream) const override {
    stream << "torchrev::ChannelZeroPad(extra=" << options.extra();
    if (options.dim() != 1) {
      stream << ", dim=" << options.dim();
    }
    stream << ")";
  }

  ChannelZeroPadOptions options;

 private:
  int64_t resolved_dim(const torch::Tensor& t, const char* method) const {
    TORCH_CHECK(
        t.defined(),
        "torchrev::ChannelZeroPad",
        method,
        ": expected a defined tensor");
    return detail::resolve_dim(
        options.dim(), t, "dim", "torchrev::ChannelZeroPad", method);
  }
};

/// Holder of a `ChannelZeroPadImpl`.
TORCH_MODULE(ChannelZeroPad);

} // namespace torchrev
