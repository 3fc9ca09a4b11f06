#pragma once

// Building blocks of the CIFAR model zoo: pre-activation residual functions
// (He et al. 2016, "Identity Mappings in Deep Residual Networks") and the
// blocks that use them.

#include <torchrev/autograd/preact_conv_function.h>
#include <torchrev/detail/autocast_state.h>
#include <torchrev/rev_block.h>

#include <torch/nn.h>
#include <torch/types.h>

#include <cstdint>
#include <ostream>
#include <utility>
#include <vector>

namespace torchrev {
namespace models {

/// The zoo's convolution: no bias (every one feeds a BatchNorm, whose shift
/// makes a bias redundant) and a padding of kernel / 2, which keeps the
/// input's height and width at stride 1. Unlike a plain `torch::nn::Conv2d`
/// with default options.
inline torch::nn::Conv2d conv_no_bias(
    int64_t in,
    int64_t out,
    int64_t kernel,
    int64_t stride = 1) {
  return torch::nn::Conv2d(torch::nn::Conv2dOptions(in, out, kernel)
                               .stride(stride)
                               .padding(kernel / 2)
                               .bias(false));
}

/// Options of `PreActConv`.
struct PreActConvOptions {
  PreActConvOptions(int64_t in, int64_t out, int64_t kernel)
      : in_(in), out_(out), kernel_(kernel) {}
  /// Input channels (BatchNorm's width).
  TORCH_ARG(int64_t, in);
  /// Output channels.
  TORCH_ARG(int64_t, out);
  /// Square kernel size; the padding is kernel / 2.
  TORCH_ARG(int64_t, kernel);
  /// Stride of the convolution.
  TORCH_ARG(int64_t, stride) = 1;
};

/// A pre-activation unit, BatchNorm2d -> ReLU -> Conv2d (no bias, padding
/// kernel / 2), that keeps only its input for its backward and recomputes
/// the ReLU's output there (`autograd::PreActConvFunction`): half the
/// activation memory of the three plain modules, for one more elementwise
/// pass. Same parameters, buffers and results as
/// `Sequential(BatchNorm2d(in), ReLU(), conv_no_bias(in, out, kernel,
/// stride))`. Under autocast, without anything that requires grad, or with
/// grad mode off it runs those plain modules.
///
/// ```
/// torchrev::models::PreActConv unit(
///     torchrev::models::PreActConvOptions(16, 32, 3).stride(2));
/// auto y = unit(torch::randn({8, 16, 32, 32})); // 8 x 32 x 16 x 16
/// ```
class PreActConvImpl : public torch::nn::Cloneable<PreActConvImpl> {
 public:
  explicit PreActConvImpl(PreActConvOptions options_)
      : options(std::move(options_)) {
    reset();
  }

  void reset() override;

  torch::Tensor forward(const torch::Tensor& x);

  void pretty_print(std::ostream& stream) const override {
    stream << "torchrev::models::PreActConv[" << options.in() << " -> "
           << options.out() << ", kernel=" << options.kernel()
           << ", stride=" << options.stride() << "]";
  }

  PreActConvOptions options;
  torch::nn::BatchNorm2d bn{nullptr};
  torch::nn::Conv2d conv{nullptr};
};
TORCH_MODULE(PreActConv);

inline void PreActConvImpl::reset() {
  bn = register_module("bn", torch::nn::BatchNorm2d(options.in()));
  conv = register_module(
      "conv",
      conv_no_bias(
          options.in(), options.out(), options.kernel(), options.stride()));
}

namespace detail {

/// Whether a pre-activation unit on `x` runs as its autograd Function: when
/// it records a graph (grad mode on, something requires grad) outside
/// autocast. Otherwise it runs the plain modules.
inline bool runs_pre_activation_node(
    const torch::Tensor& x,
    const std::vector<torch::Tensor>& params) {
  bool records_graph = torch::GradMode::is_enabled() && x.requires_grad();
  for (const auto& p : params) {
    records_graph = records_graph ||
        (torch::GradMode::is_enabled() && p.defined() && p.requires_grad());
  }
  const auto autocast = torchrev::detail::AutocastState::current();
  return records_graph && !autocast.cpu_enabled && !autocast.cuda_enabled;
}

/// BatchNorm's own bookkeeping before a forward (as
/// `BatchNormImplBase::forward` does it: the batch count and the momentum),
/// and what the pre-activation Functions need from it. A torchrev recompute
/// has detached the running statistics, so nothing is updated then.
inline autograd::PreActSettings pre_activation_settings(
    torch::nn::BatchNorm2dImpl& norm,
    const torch::Tensor& x,
    const char* who) {
  const auto& bn_options = norm.options;
  double momentum = bn_options.momentum().value_or(0.0);
  if (norm.is_training() && bn_options.track_running_stats() &&
      norm.num_batches_tracked.defined()) {
    norm.num_batches_tracked += 1;
    if (!bn_options.momentum().has_value()) {
      momentum = 1.0 / norm.num_batches_tracked.item<double>();
    }
  }
  autograd::PreActSettings settings;
  settings.training = norm.is_training() || !bn_options.track_running_stats();
  TORCH_CHECK(
      !settings.training || x.numel() / x.size(1) > 1,
      who,
      ": expected more than 1 value per channel when training, got input "
      "size ",
      x.sizes());
  settings.running_mean = norm.running_mean;
  settings.running_var = norm.running_var;
  settings.momentum = momentum;
  settings.eps = bn_options.eps();
  return settings;
}

/// Checks that `x` is N x `channels` x H x W.
inline void check_pre_activation_input(
    const torch::Tensor& x,
    int64_t channels,
    const char* who) {
  TORCH_CHECK(
      x.dim() == 4 && x.size(1) == channels,
      who,
      ": expected a 4-D input with ",
      channels,
      " channels (N x C x H x W), got shape ",
      x.sizes());
}

} // namespace detail

inline torch::Tensor PreActConvImpl::forward(const torch::Tensor& x) {
  constexpr const char* kWho = "torchrev::models::PreActConv";
  detail::check_pre_activation_input(x, options.in(), kWho);
  if (!detail::runs_pre_activation_node(
          x, {bn->weight, bn->bias, conv->weight})) {
    // In place: BatchNorm keeps its input, not its output.
    return conv(bn(x).relu_());
  }
  auto settings = detail::pre_activation_settings(*bn, x, kWho);
  const int64_t pad = options.kernel() / 2;
  settings.stride = {options.stride(), options.stride()};
  settings.padding = {pad, pad};
  return autograd::PreActConvFunction::apply(
      x, bn->weight, bn->bias, conv->weight, settings);
}

/// A classifier head's pre-activation pooling, BatchNorm2d -> ReLU ->
/// global average pooling (N x C x H x W -> N x C), that keeps only its
/// input for its backward, like `PreActConv`
/// (`autograd::PreActPoolFunction`). Same parameters, buffers and results
/// as `Sequential(BatchNorm2d(channels), ReLU(), AdaptiveAvgPool2d(1),
/// Flatten())`; the same fallbacks as `PreActConv`.
class PreActPoolImpl : public torch::nn::Cloneable<PreActPoolImpl> {
 public:
  explicit PreActPoolImpl(int64_t channels) : channels_(channels) {
    reset();
  }

  void reset() override {
    bn = register_module("bn", torch::nn::BatchNorm2d(channels_));
  }

  torch::Tensor forward(const torch::Tensor& x) {
    constexpr const char* kWho = "torchrev::models::PreActPool";
    detail::check_pre_activation_input(x, channels_, kWho);
    if (!detail::runs_pre_activation_node(x, {bn->weight, bn->bias})) {
      return bn(x).relu_().mean({2, 3});
    }
    return autograd::PreActPoolFunction::apply(
        x, bn->weight, bn->bias, detail::pre_activation_settings(*bn, x, kWho));
  }

  void pretty_print(std::ostream& stream) const override {
    stream << "torchrev::models::PreActPool[" << channels_ << "]";
  }

  torch::nn::BatchNorm2d bn{nullptr};

 private:
  int64_t channels_;
};
TORCH_MODULE(PreActPool);

/// Which residual function a block computes.
enum class ResidualKind {
  /// Two 3x3 convolutions (`basic_residual`).
  kBasic,
  /// 1x1, 3x3 and 1x1 convolutions at a quarter of the width
  /// (`bottleneck_residual`).
  kBottleneck,
};

/// `ResidualKind::kBottleneck` if `bottleneck`, else `kBasic`.
inline ResidualKind residual_kind(bool bottleneck) {
  return bottleneck ? ResidualKind::kBottleneck : ResidualKind::kBasic;
}

/// Options of the blocks that change width or resolution
/// (`ResidualBlock`, `RevTransitionBlock`).
///
/// ```
/// torchrev::models::RevTransitionBlock block(
///     torchrev::models::ResidualBlockOptions(32, 64).stride(2));
/// ```
struct ResidualBlockOptions {
  ResidualBlockOptions(int64_t in, int64_t out) : in_(in), out_(out) {}
  /// Input channels.
  TORCH_ARG(int64_t, in);
  /// Output channels.
  TORCH_ARG(int64_t, out);
  /// Stride of the first convolution (and of the projection shortcut).
  TORCH_ARG(int64_t, stride) = 1;
  /// Basic or bottleneck residual function.
  TORCH_ARG(ResidualKind, kind) = ResidualKind::kBasic;
};

namespace detail {

/// Appends BatchNorm -> ReLU -> conv(in -> out) to `seq`: one `PreActConv`
/// when `lean`, else the three plain modules.
inline void append_preact(
    torch::nn::Sequential& seq,
    int64_t in,
    int64_t out,
    int64_t kernel,
    int64_t stride,
    bool lean) {
  if (lean) {
    seq->push_back(
        PreActConv(PreActConvOptions(in, out, kernel).stride(stride)));
    return;
  }
  seq->push_back(torch::nn::BatchNorm2d(in));
  seq->push_back(torch::nn::ReLU());
  seq->push_back(conv_no_bias(in, out, kernel, stride));
}

} // namespace detail

/// Pre-activation basic residual function, two 3x3 convolutions:
/// BN-ReLU-conv3x3(in->out, stride)-BN-ReLU-conv3x3(out->out). With `lean`,
/// each BN-ReLU-conv is a `PreActConv` (same parameters, half the
/// activation memory).
inline torch::nn::Sequential basic_residual(
    int64_t in,
    int64_t out,
    int64_t stride = 1,
    bool lean = false) {
  torch::nn::Sequential seq;
  detail::append_preact(seq, in, out, 3, stride, lean);
  detail::append_preact(seq, out, out, 3, 1, lean);
  return seq;
}

/// Pre-activation bottleneck residual function, 1x1-3x3-1x1 convolutions
/// with an inner width of out / 4:
/// BN-ReLU-conv1x1(in->out/4)-BN-ReLU-conv3x3(stride)-BN-ReLU-conv1x1(->out).
/// With `lean`, each BN-ReLU-conv is a `PreActConv`.
inline torch::nn::Sequential bottleneck_residual(
    int64_t in,
    int64_t out,
    int64_t stride = 1,
    bool lean = false) {
  TORCH_CHECK(
      out % 4 == 0,
      "torchrev::models: a bottleneck needs a width divisible by 4, got ",
      out);
  const int64_t inner = out / 4;
  torch::nn::Sequential seq;
  detail::append_preact(seq, in, inner, 1, 1, lean);
  detail::append_preact(seq, inner, inner, 3, stride, lean);
  detail::append_preact(seq, inner, out, 1, 1, lean);
  return seq;
}

/// The residual function of a block: basic or bottleneck, lean or plain.
inline torch::nn::Sequential residual(
    ResidualKind kind,
    int64_t in,
    int64_t out,
    int64_t stride = 1,
    bool lean = false) {
  return kind == ResidualKind::kBottleneck
      ? bottleneck_residual(in, out, stride, lean)
      : basic_residual(in, out, stride, lean);
}

/// The shortcut of a block that changes width or resolution: a strided 1x1
/// projection; an empty Sequential (identity) otherwise.
inline torch::nn::Sequential shortcut(int64_t in, int64_t out, int64_t stride) {
  torch::nn::Sequential seq;
  if (in != out || stride != 1) {
    seq->push_back(conv_no_bias(in, out, 1, stride));
  }
  return seq;
}

namespace detail {

/// "[in -> out, stride=s, bottleneck]": square brackets, as LibTorch prints
/// a module's children in parentheses after.
inline void print_block_options(
    std::ostream& stream,
    const ResidualBlockOptions& options) {
  stream << "[" << options.in() << " -> " << options.out()
         << ", stride=" << options.stride()
         << (options.kind() == ResidualKind::kBottleneck ? ", bottleneck" : "")
         << "]";
}

} // namespace detail

/// An ordinary (stored-activation) pre-activation residual block:
/// y = shortcut(x) + residual(x). The unit of the vanilla ResNets.
class ResidualBlockImpl : public torch::nn::Cloneable<ResidualBlockImpl> {
 public:
  explicit ResidualBlockImpl(ResidualBlockOptions options_)
      : options(std::move(options_)) {
    reset();
  }

  void reset() override {
    body = register_module(
        "body",
        residual(
            options.kind(), options.in(), options.out(), options.stride()));
    skip = register_module(
        "skip", shortcut(options.in(), options.out(), options.stride()));
  }

  torch::Tensor forward(const torch::Tensor& x) {
    auto identity = skip->is_empty() ? x : skip->forward(x);
    return identity + body->forward(x);
  }

  void pretty_print(std::ostream& stream) const override {
    stream << "torchrev::models::ResidualBlock";
    detail::print_block_options(stream, options);
  }

  ResidualBlockOptions options;
  torch::nn::Sequential body{nullptr}, skip{nullptr};
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
  explicit RevTransitionBlockImpl(ResidualBlockOptions options_)
      : options(std::move(options_)) {
    TORCH_CHECK(
        options.in() % 2 == 0 && options.out() % 2 == 0,
        "torchrev::models::RevTransitionBlock: widths must be even to split "
        "into halves, got ",
        options.in(),
        " -> ",
        options.out());
    reset();
  }

  void reset() override {
    const int64_t in = options.in() / 2, out = options.out() / 2;
    const int64_t stride = options.stride();
    f = register_module("f", residual(options.kind(), in, out, stride));
    g = register_module("g", residual(options.kind(), out, out, 1));
    skip1 = register_module("skip1", shortcut(in, out, stride));
    skip2 = register_module("skip2", shortcut(in, out, stride));
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
    stream << "torchrev::models::RevTransitionBlock";
    detail::print_block_options(stream, options);
  }

  ResidualBlockOptions options;
  torch::nn::Sequential f{nullptr}, g{nullptr}, skip1{nullptr}, skip2{nullptr};
};
TORCH_MODULE(RevTransitionBlock);

/// A reversible pre-activation block of width `width` (F and G each act on
/// width / 2 channels), of `PreActConv`s when `lean`.
using PreActRevBlock = RevBlock<torch::nn::Sequential, torch::nn::Sequential>;

inline PreActRevBlock preact_rev_block(
    int64_t width,
    ResidualKind kind = ResidualKind::kBasic,
    bool lean = false) {
  TORCH_CHECK(
      width % 2 == 0,
      "torchrev::models: a reversible block needs an even width, got ",
      width);
  return PreActRevBlock(
      residual(kind, width / 2, width / 2, 1, lean),
      residual(kind, width / 2, width / 2, 1, lean));
}

/// A residual function that acts on the first `active` of `total` channels
/// and leaves the others alone: its output has `total` channels, the last
/// `total - active` of them zero. In a fully reversible RevNet the channels
/// that space-to-depth adds beyond the stage's width are carried through
/// unchanged this way (as a multi-scale flow factors them out), so that the
/// blocks compute at the paper's width.
class SlicedResidualImpl : public torch::nn::Cloneable<SlicedResidualImpl> {
 public:
  SlicedResidualImpl(
      int64_t active,
      int64_t total,
      ResidualKind kind,
      bool lean = false)
      : kind_(kind), active_(active), total_(total), lean_(lean) {
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
    body = register_module("body", residual(kind_, active_, active_, 1, lean_));
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
           << (kind_ == ResidualKind::kBottleneck ? ", bottleneck" : "")
           << (lean_ ? ", lean" : "") << "]";
  }

  torch::nn::Sequential body{nullptr};

 private:
  ResidualKind kind_;
  int64_t active_, total_;
  bool lean_;
};
TORCH_MODULE(SlicedResidual);

/// A residual function on `channels` channels that computes at width
/// `inner`: BN-ReLU-conv3x3 to `inner`, BN-ReLU-conv3x3 back; as a
/// bottleneck, BN-ReLU-conv1x1 to inner / 4, a 3x3 and a 1x1 back. With
/// `lean`, each BN-ReLU-conv is a `PreActConv`.
inline torch::nn::Sequential mixing_residual(
    ResidualKind kind,
    int64_t channels,
    int64_t inner,
    bool lean = false) {
  torch::nn::Sequential seq;
  if (kind == ResidualKind::kBasic) {
    detail::append_preact(seq, channels, inner, 3, 1, lean);
    detail::append_preact(seq, inner, channels, 3, 1, lean);
    return seq;
  }
  const int64_t m = inner / 4;
  detail::append_preact(seq, channels, m, 1, 1, lean);
  detail::append_preact(seq, m, m, 3, 1, lean);
  detail::append_preact(seq, m, channels, 1, 1, lean);
  return seq;
}

/// A reversible pre-activation block on `trunk` channels whose F and G
/// compute at width `width` / 2. With `mix_all`, F and G read and write all
/// trunk / 2 channels of their halves (`mixing_residual`); otherwise they
/// read and write the first width / 2 channels and leave the rest alone
/// (`SlicedResidual`). With `lean`, their BN-ReLU-convs are `PreActConv`s.
inline PreActRevBlock sliced_rev_block(
    ResidualKind kind,
    int64_t width,
    int64_t trunk,
    bool mix_all,
    bool lean = false) {
  TORCH_CHECK(
      width % 2 == 0 && trunk % 2 == 0,
      "torchrev::models: a reversible block needs even widths, got ",
      width,
      " of ",
      trunk);
  if (width == trunk) {
    return preact_rev_block(width, kind, lean);
  }
  auto residual_function = [&] {
    return mix_all ? mixing_residual(kind, trunk / 2, width / 2, lean)
                   : torch::nn::Sequential(
                         SlicedResidual(width / 2, trunk / 2, kind, lean));
  };
  return PreActRevBlock(residual_function(), residual_function());
}

} // namespace models
} // namespace torchrev
