#pragma once

// Building blocks of the CIFAR model zoo: pre-activation residual functions
// (He et al. 2016, "Identity Mappings in Deep Residual Networks") and the
// blocks that use them.

#include <torchrev/rev_block.h>

#include <torch/nn.h>
#include <torch/types.h>

#include <cstdint>
#include <ostream>
#include <utility>

namespace torchrev {
namespace models {

/// 2-d convolution without bias (every one is followed by a BatchNorm).
inline torch::nn::Conv2d conv2d(
    int64_t in,
    int64_t out,
    int64_t kernel,
    int64_t stride = 1) {
  return torch::nn::Conv2d(torch::nn::Conv2dOptions(in, out, kernel)
                               .stride(stride)
                               .padding(kernel / 2)
                               .bias(false));
}

/// Pre-activation basic residual function, two 3x3 convolutions:
/// BN-ReLU-conv3x3(in->out, stride)-BN-ReLU-conv3x3(out->out).
inline torch::nn::Sequential basic_residual(
    int64_t in,
    int64_t out,
    int64_t stride = 1) {
  return torch::nn::Sequential(
      torch::nn::BatchNorm2d(in),
      torch::nn::ReLU(),
      conv2d(in, out, 3, stride),
      torch::nn::BatchNorm2d(out),
      torch::nn::ReLU(),
      conv2d(out, out, 3));
}

/// Pre-activation bottleneck residual function, 1x1-3x3-1x1 convolutions
/// with an inner width of out / 4:
/// BN-ReLU-conv1x1(in->out/4)-BN-ReLU-conv3x3(stride)-BN-ReLU-conv1x1(->out).
inline torch::nn::Sequential bottleneck_residual(
    int64_t in,
    int64_t out,
    int64_t stride = 1) {
  TORCH_CHECK(
      out % 4 == 0,
      "torchrev::models: a bottleneck needs a width divisible by 4, got ",
      out);
  const int64_t inner = out / 4;
  return torch::nn::Sequential(
      torch::nn::BatchNorm2d(in),
      torch::nn::ReLU(),
      conv2d(in, inner, 1),
      torch::nn::BatchNorm2d(inner),
      torch::nn::ReLU(),
      conv2d(inner, inner, 3, stride),
      torch::nn::BatchNorm2d(inner),
      torch::nn::ReLU(),
      conv2d(inner, out, 1));
}

/// The residual function of a block: basic or bottleneck.
inline torch::nn::Sequential residual(
    bool bottleneck,
    int64_t in,
    int64_t out,
    int64_t stride = 1) {
  return bottleneck ? bottleneck_residual(in, out, stride)
                    : basic_residual(in, out, stride);
}

/// The shortcut of a block that changes width or resolution: a strided 1x1
/// projection; an empty Sequential (identity) otherwise.
inline torch::nn::Sequential shortcut(int64_t in, int64_t out, int64_t stride) {
  torch::nn::Sequential seq;
  if (in != out || stride != 1) {
    seq->push_back(conv2d(in, out, 1, stride));
  }
  return seq;
}

/// An ordinary (stored-activation) pre-activation residual block:
/// y = shortcut(x) + residual(x). The unit of the vanilla ResNets.
class ResidualBlockImpl : public torch::nn::Cloneable<ResidualBlockImpl> {
 public:
  ResidualBlockImpl(bool bottleneck, int64_t in, int64_t out, int64_t stride)
      : bottleneck_(bottleneck), in_(in), out_(out), stride_(stride) {
    reset();
  }

  void reset() override {
    body = register_module("body", residual(bottleneck_, in_, out_, stride_));
    skip = register_module("skip", shortcut(in_, out_, stride_));
  }

  torch::Tensor forward(const torch::Tensor& x) {
    auto identity = skip->is_empty() ? x : skip->forward(x);
    return identity + body->forward(x);
  }

  void pretty_print(std::ostream& stream) const override {
    // Square brackets: LibTorch prints the children in parentheses after.
    stream << "torchrev::models::ResidualBlock[" << in_ << " -> " << out_
           << ", stride=" << stride_ << (bottleneck_ ? ", bottleneck" : "")
           << "]";
  }

  torch::nn::Sequential body{nullptr}, skip{nullptr};

 private:
  bool bottleneck_;
  int64_t in_, out_, stride_;
};
TORCH_MODULE(ResidualBlock);

/// The block that opens a RevNet stage when width or resolution changes. It
/// has the coupling structure of a reversible block, on halves, with strided
/// F and projection shortcuts:
///
///     y1 = P1(x1) + F(x2),   y2 = P2(x2) + G(y1)
///
/// and so the same number of convolutions as a reversible unit, but it is not
/// invertible: its activations are stored (as in the RevNet paper, these few
/// blocks keep their activations; they can be checkpointed instead).
class RevTransitionBlockImpl
    : public torch::nn::Cloneable<RevTransitionBlockImpl> {
 public:
  RevTransitionBlockImpl(
      bool bottleneck,
      int64_t in,
      int64_t out,
      int64_t stride)
      : bottleneck_(bottleneck), in_(in), out_(out), stride_(stride) {
    TORCH_CHECK(
        in % 2 == 0 && out % 2 == 0,
        "torchrev::models::RevTransitionBlock: widths must be even to split "
        "into halves, got ",
        in,
        " -> ",
        out);
    reset();
  }

  void reset() override {
    f = register_module("f", residual(bottleneck_, in_ / 2, out_ / 2, stride_));
    g = register_module("g", residual(bottleneck_, out_ / 2, out_ / 2, 1));
    skip1 = register_module("skip1", shortcut(in_ / 2, out_ / 2, stride_));
    skip2 = register_module("skip2", shortcut(in_ / 2, out_ / 2, stride_));
  }

  torch::Tensor forward(const torch::Tensor& x) {
    auto halves = x.chunk(2, 1);
    auto p1 = skip1->is_empty() ? halves[0] : skip1->forward(halves[0]);
    auto p2 = skip2->is_empty() ? halves[1] : skip2->forward(halves[1]);
    auto y1 = p1 + f->forward(halves[1]);
    auto y2 = p2 + g->forward(y1);
    return torch::cat({y1, y2}, 1);
  }

  void pretty_print(std::ostream& stream) const override {
    // Square brackets: LibTorch prints the children in parentheses after.
    stream << "torchrev::models::RevTransitionBlock[" << in_ << " -> " << out_
           << ", stride=" << stride_ << (bottleneck_ ? ", bottleneck" : "")
           << "]";
  }

  torch::nn::Sequential f{nullptr}, g{nullptr}, skip1{nullptr}, skip2{nullptr};

 private:
  bool bottleneck_;
  int64_t in_, out_, stride_;
};
TORCH_MODULE(RevTransitionBlock);

/// A reversible pre-activation block of width `width` (F and G each act on
/// width / 2 channels).
using PreActRevBlock = RevBlock<torch::nn::Sequential, torch::nn::Sequential>;

inline PreActRevBlock preact_rev_block(bool bottleneck, int64_t width) {
  TORCH_CHECK(
      width % 2 == 0,
      "torchrev::models: a reversible block needs an even width, got ",
      width);
  return PreActRevBlock(
      residual(bottleneck, width / 2, width / 2),
      residual(bottleneck, width / 2, width / 2));
}

/// A residual function that acts on the first `active` of `total` channels
/// and leaves the others alone: its output has `total` channels, the last
/// `total - active` of them zero. In a fully reversible RevNet the channels
/// that space-to-depth adds beyond the stage's width are carried through
/// unchanged this way (as a multi-scale flow factors them out), so that the
/// blocks compute at the paper's width.
class SlicedResidualImpl : public torch::nn::Cloneable<SlicedResidualImpl> {
 public:
  SlicedResidualImpl(bool bottleneck, int64_t active, int64_t total)
      : bottleneck_(bottleneck), active_(active), total_(total) {
    TORCH_CHECK(
        active >= 1 && active <= total,
        "torchrev::models::SlicedResidual: expected 1 <= active <= total, got "
        "active ",
        active,
        " of ",
        total,
        " channels");
    reset();
  }

  void reset() override {
    body = register_module("body", residual(bottleneck_, active_, active_));
  }

  torch::Tensor forward(const torch::Tensor& x) {
    if (active_ == total_) {
      return body->forward(x);
    }
    const auto format = x.suggest_memory_format();
    auto h = body->forward(x.narrow(1, 0, active_).contiguous(format));
    return torch::constant_pad_nd(h, {0, 0, 0, 0, 0, total_ - active_})
        .contiguous(format);
  }

  void pretty_print(std::ostream& stream) const override {
    stream << "torchrev::models::SlicedResidual[" << active_ << " of " << total_
           << (bottleneck_ ? ", bottleneck" : "") << "]";
  }

  torch::nn::Sequential body{nullptr};

 private:
  bool bottleneck_;
  int64_t active_, total_;
};
TORCH_MODULE(SlicedResidual);

/// A residual function on `channels` channels that computes at width
/// `inner`: BN-ReLU-conv3x3 to `inner`, BN-ReLU-conv3x3 back; as a
/// bottleneck, BN-ReLU-conv1x1 to inner / 4, a 3x3 and a 1x1 back.
inline torch::nn::Sequential mixing_residual(
    bool bottleneck,
    int64_t channels,
    int64_t inner) {
  if (!bottleneck) {
    return torch::nn::Sequential(
        torch::nn::BatchNorm2d(channels),
        torch::nn::ReLU(),
        conv2d(channels, inner, 3),
        torch::nn::BatchNorm2d(inner),
        torch::nn::ReLU(),
        conv2d(inner, channels, 3));
  }
  const int64_t m = inner / 4;
  return torch::nn::Sequential(
      torch::nn::BatchNorm2d(channels),
      torch::nn::ReLU(),
      conv2d(channels, m, 1),
      torch::nn::BatchNorm2d(m),
      torch::nn::ReLU(),
      conv2d(m, m, 3),
      torch::nn::BatchNorm2d(m),
      torch::nn::ReLU(),
      conv2d(m, channels, 1));
}

/// A reversible pre-activation block on `trunk` channels whose F and G
/// compute at width `width` / 2. With `mix_all`, F and G read and write all
/// trunk / 2 channels of their halves (`mixing_residual`); otherwise they
/// read and write the first width / 2 channels and leave the rest alone
/// (`SlicedResidual`).
inline PreActRevBlock sliced_rev_block(
    bool bottleneck,
    int64_t width,
    int64_t trunk,
    bool mix_all) {
  TORCH_CHECK(
      width % 2 == 0 && trunk % 2 == 0,
      "torchrev::models: a reversible block needs even widths, got ",
      width,
      " of ",
      trunk);
  if (width == trunk) {
    return preact_rev_block(bottleneck, width);
  }
  auto residual_function = [&] {
    return mix_all ? mixing_residual(bottleneck, trunk / 2, width / 2)
                   : torch::nn::Sequential(
                         SlicedResidual(bottleneck, width / 2, trunk / 2));
  };
  return PreActRevBlock(residual_function(), residual_function());
}

} // namespace models
} // namespace torchrev
