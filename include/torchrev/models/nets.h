#pragma once

// The CIFAR networks of the RevNet paper (Gomez et al. 2017): vanilla
// pre-activation ResNets and RevNets with the same stage layout.
//
// Both have a 3x3 stem convolution, three stages at full, 1/2 and 1/4
// resolution, and a BN-ReLU-global-average-pool-linear head. A ResNet stage is
// a chain of ordinary residual blocks; a RevNet stage is a `RevSequential`
// of reversible blocks, opened by a transition block where the width or the
// resolution changes (checkpointed by default, see `RevNetOptions`).
// Bottleneck blocks are 4x wider than the listed channel count (expansion 4),
// as in ResNet-164.

#include <torchrev/checkpoint.h>
#include <torchrev/clone_state.h>
#include <torchrev/models/blocks.h>
#include <torchrev/rev_sequential.h>
#include <torchrev/stage_mode.h>

#include <torch/arg.h>
#include <torch/nn.h>
#include <torch/types.h>

#include <cmath>
#include <cstdint>
#include <memory>
#include <ostream>
#include <string>
#include <vector>

namespace torchrev {
namespace models {

/// Common interface of the zoo's networks: images in, class logits out.
class ImageClassifier : public torch::nn::Module {
 public:
  virtual torch::Tensor forward(const torch::Tensor& images) = 0;
};

namespace detail {

/// An `ImageClassifier` that deep-copies itself like `torch::nn::Cloneable`:
/// `clone()` builds a new `Derived` from the same options and copies every
/// parameter (with its `requires_grad`) and buffer. The zoo's networks cannot
/// derive from both `Cloneable` and `ImageClassifier`: since LibTorch 2.2
/// `Cloneable` inherits `Module` non-virtually, which would give them two
/// `Module` base objects.
template <class Derived>
class CloneableClassifier : public ImageClassifier {
 public:
  /// Builds the network's submodules; `clone()` relies on the constructor
  /// calling it.
  virtual void reset() = 0;

  std::shared_ptr<torch::nn::Module> clone(
      const torch::optional<torch::Device>& device =
          torch::nullopt) const override {
    const auto& self = static_cast<const Derived&>(*this);
    return clone_state_into(
        self, std::make_shared<Derived>(self.options), device);
  }
};

} // namespace detail

/// Options of a vanilla pre-activation ResNet. Defaults: ResNet-32.
///
/// Example:
/// ```
/// torchrev::models::ResNet net(torchrev::models::ResNetOptions()
///                                  .units({18, 18, 18})
///                                  .bottleneck(true)); // ResNet-164
/// ```
struct ResNetOptions {
  /// Units (blocks) per stage.
  TORCH_ARG(std::vector<int64_t>, units) = std::vector<int64_t>{5, 5, 5};
  /// Channels of the stem and of each stage (before bottleneck expansion).
  TORCH_ARG(std::vector<int64_t>, channels) =
      std::vector<int64_t>{16, 16, 32, 64};
  /// Bottleneck (1x1-3x3-1x1, 4x wider output) instead of basic (3x3-3x3)
  /// blocks.
  TORCH_ARG(bool, bottleneck) = false;
  /// Image channels: 3 for CIFAR, 1 for Fashion-MNIST.
  TORCH_ARG(int64_t, in_channels) = 3;
  /// Number of classes.
  TORCH_ARG(int64_t, num_classes) = 10;
};

/// How a RevNet runs the blocks of its reversible stages (the core
/// `torchrev::StageMode`, here for the models' options).
using StageMode = torchrev::StageMode;

/// Options of a RevNet. Defaults: RevNet-38.
///
/// Example:
/// ```
/// torchrev::models::RevNet net(torchrev::models::RevNetOptions()
///                                  .units({9, 9, 9})
///                                  .channels({32, 32, 64, 128})
///                                  .checkpoint_transitions(false));
/// ```
struct RevNetOptions {
  /// Units per stage, the transition block included.
  TORCH_ARG(std::vector<int64_t>, units) = std::vector<int64_t>{3, 3, 3};
  /// Channels of the stem and of each stage (before bottleneck expansion).
  TORCH_ARG(std::vector<int64_t>, channels) =
      std::vector<int64_t>{32, 32, 64, 112};
  /// Bottleneck instead of basic residual functions.
  TORCH_ARG(bool, bottleneck) = false;
  /// Image channels: 3 for CIFAR, 1 for Fashion-MNIST.
  TORCH_ARG(int64_t, in_channels) = 3;
  /// Number of classes.
  TORCH_ARG(int64_t, num_classes) = 10;
  /// How the reversible blocks run (to compare memory and time on the same
  /// blocks). For plain autograd throughout, also set
  /// `checkpoint_transitions(false)`.
  TORCH_ARG(StageMode, mode) = StageMode::kReversible;
  /// Checkpoint the non-invertible transition blocks, so that they store only
  /// their input and recompute their forward in backward (the "hybrid"
  /// RevNet, the default). A transition's input is the previous stage's
  /// output, which that stage keeps anyway, so checkpointing costs no memory
  /// and one extra forward of two blocks; RevNet-110 then peaks 14% lower
  /// (20.1 instead of 23.4 MiB at batch 32). `false` stores the transitions'
  /// activations, as in the RevNet paper.
  TORCH_ARG(bool, checkpoint_transitions) = true;
};

namespace detail {

template <class Options>
void check_layout(const Options& options, const char* what) {
  TORCH_CHECK(
      !options.units().empty() &&
          options.channels().size() == options.units().size() + 1,
      what,
      ": expected one channel count for the stem and one per stage (",
      options.units().size() + 1,
      "), got ",
      options.channels().size());
  for (auto n : options.units()) {
    TORCH_CHECK(n >= 1, what, ": every stage needs at least 1 unit, got ", n);
  }
  TORCH_CHECK(
      options.in_channels() >= 1 && options.num_classes() >= 1,
      what,
      ": in_channels and num_classes must be positive");
}

template <class Options>
int64_t stage_width(const Options& options, size_t stage) {
  return options.channels()[stage + 1] * (options.bottleneck() ? 4 : 1);
}

/// BN-ReLU-pool-flatten: the head before the classifier layer.
inline torch::nn::Sequential pool_head(int64_t width) {
  return torch::nn::Sequential(
      torch::nn::BatchNorm2d(width),
      torch::nn::ReLU(),
      torch::nn::AdaptiveAvgPool2d(1),
      torch::nn::Flatten());
}

} // namespace detail

/// A pre-activation ResNet for CIFAR-sized images (the vanilla baseline).
class ResNetImpl : public detail::CloneableClassifier<ResNetImpl> {
 public:
  explicit ResNetImpl(ResNetOptions options_ = {})
      : options(std::move(options_)) {
    detail::check_layout(options, "torchrev::models::ResNet");
    reset();
  }

  void reset() override {
    stem = register_module(
        "stem", conv_no_bias(options.in_channels(), options.channels()[0], 3));
    stages = register_module("stages", torch::nn::ModuleList());
    int64_t width = options.channels()[0];
    for (size_t s = 0; s < options.units().size(); ++s) {
      const int64_t out = detail::stage_width(options, s);
      torch::nn::Sequential stage;
      for (int64_t u = 0; u < options.units()[s]; ++u) {
        const int64_t stride = (s > 0 && u == 0) ? 2 : 1;
        stage->push_back(
            ResidualBlock(ResidualBlockOptions(width, out)
                              .stride(stride)
                              .kind(residual_kind(options.bottleneck()))));
        width = out;
      }
      stages->push_back(stage);
    }
    head = register_module("head", detail::pool_head(width));
    fc = register_module("fc", torch::nn::Linear(width, options.num_classes()));
  }

  torch::Tensor forward(const torch::Tensor& images) override {
    auto x = stem(images);
    for (const auto& stage : *stages) {
      x = stage->as<torch::nn::Sequential>()->forward(x);
    }
    return fc(head->forward(x));
  }

  void pretty_print(std::ostream& stream) const override {
    stream << "torchrev::models::ResNet";
  }

  ResNetOptions options;
  torch::nn::Conv2d stem{nullptr};
  torch::nn::ModuleList stages{nullptr};
  torch::nn::Sequential head{nullptr};
  torch::nn::Linear fc{nullptr};
};
TORCH_MODULE(ResNet);

/// A RevNet for CIFAR-sized images: ResNet layout, reversible stages.
class RevNetImpl : public detail::CloneableClassifier<RevNetImpl> {
 public:
  explicit RevNetImpl(RevNetOptions options_ = {})
      : options(std::move(options_)) {
    detail::check_layout(options, "torchrev::models::RevNet");
    reset();
  }

  void reset() override {
    stem = register_module(
        "stem", conv_no_bias(options.in_channels(), options.channels()[0], 3));
    transitions = register_module("transitions", torch::nn::ModuleList());
    stages = register_module("stages", torch::nn::ModuleList());
    stage_transitions_.clear();
    int64_t width = options.channels()[0];
    for (size_t s = 0; s < options.units().size(); ++s) {
      const int64_t out = detail::stage_width(options, s);
      const int64_t stride = s > 0 ? 2 : 1;
      int64_t reversible_units = options.units()[s];
      std::shared_ptr<RevTransitionBlockImpl> transition;
      if (width != out || stride != 1) {
        transition = std::make_shared<RevTransitionBlockImpl>(
            ResidualBlockOptions(width, out)
                .stride(stride)
                .kind(residual_kind(options.bottleneck())));
        transitions->push_back(RevTransitionBlock(transition));
        --reversible_units;
      }
      stage_transitions_.push_back(std::move(transition));
      RevSequential stage;
      for (int64_t u = 0; u < reversible_units; ++u) {
        stage->push_back(
            preact_rev_block(out, residual_kind(options.bottleneck())));
      }
      stages->push_back(stage);
      width = out;
    }
    head = register_module("head", detail::pool_head(width));
    fc = register_module("fc", torch::nn::Linear(width, options.num_classes()));
  }

  torch::Tensor forward(const torch::Tensor& images) override {
    auto x = stem(images);
    for (size_t s = 0; s < stages->size(); ++s) {
      if (const auto& block = stage_transitions_[s]) {
        x = options.checkpoint_transitions()
            ? checkpoint(RevTransitionBlock(block), x)
            : block->forward(x);
      }
      auto stage = stages->ptr<RevSequentialImpl>(s);
      if (!stage->is_empty()) {
        x = run_stage(*stage, std::move(x), options.mode());
      }
    }
    return fc(head->forward(x));
  }

  void pretty_print(std::ostream& stream) const override {
    stream << "torchrev::models::RevNet";
  }

  /// The transition block that opens stage `stage`, or nullptr if
  /// the stage has none.
  std::shared_ptr<RevTransitionBlockImpl> transition(size_t stage) const {
    TORCH_CHECK(
        stage < stage_transitions_.size(),
        "torchrev::models::RevNet: no stage ",
        stage);
    return stage_transitions_[stage];
  }

  RevNetOptions options;
  torch::nn::Conv2d stem{nullptr};
  /// The stored (non-invertible) blocks that open stages, registered as
  /// `transitions.0`, `transitions.1`, ... (the names saved checkpoints
  /// use); `transition(s)` finds stage s's.
  torch::nn::ModuleList transitions{nullptr};
  /// One `RevSequential` per stage.
  torch::nn::ModuleList stages{nullptr};
  torch::nn::Sequential head{nullptr};
  torch::nn::Linear fc{nullptr};

 private:
  /// Per stage, the transition block that opens it, or nullptr.
  std::vector<std::shared_ptr<RevTransitionBlockImpl>> stage_transitions_;
};
TORCH_MODULE(RevNet);

/// A fully reversible RevNet: the RevNet layout with no stored block. The
/// stem widens straight to the first stage's width; each later stage opens
/// with `SpaceToDepth(2)` instead of a strided transition block, so that the
/// whole trunk is one `RevSequential` and training stores only the network
/// input (for the stem), the trunk output (and the head's activations) and
/// one block's recompute graph.
///
/// Space-to-depth quadruples the channels at each downsampling while the
/// paper's widths only double, so the trunk carries more channels than a
/// stage computes on. Every block's F and G compute at the paper's width:
/// the first block of a stage reads and writes all channels of its halves
/// (convolving down to the stage's width and back up, `mixing_residual`), as
/// the paper's transition block mixes all channels of the previous stage;
/// the other blocks read and write only the first channels of their halves
/// (`SlicedResidual`), and the remaining channels pass through them
/// unchanged, as a multi-scale flow (RealNVP, Glow) factors them out. The
/// head (BN-ReLU-pool-linear) sees all trunk channels. Units per stage are the
/// paper's, the transition unit becoming a reversible block. Its
/// BN-ReLU-convs are `PreActConv`s and its head's BN-ReLU-pool a
/// `PreActPool`, which keep only their input, so that the one block's
/// recompute graph and the head are small too (not twice differentiable;
/// build a `RevNet` for that). Options as for
/// `RevNet`; `channels()[0]` and `checkpoint_transitions` are not used.
class RevNetInvImpl : public detail::CloneableClassifier<RevNetInvImpl> {
 public:
  explicit RevNetInvImpl(RevNetOptions options_ = {})
      : options(std::move(options_)) {
    detail::check_layout(options, "torchrev::models::RevNetInv");
    reset();
  }

  void reset() override {
    int64_t trunk_width = detail::stage_width(options, 0);
    stem = register_module(
        "stem", conv_no_bias(options.in_channels(), trunk_width, 3));
    trunk = register_module("trunk", RevSequential());
    for (size_t s = 0; s < options.units().size(); ++s) {
      const int64_t width = detail::stage_width(options, s);
      if (s > 0) {
        trunk->push_back(SpaceToDepth(2));
        trunk_width *= 4;
      }
      TORCH_CHECK(
          width <= trunk_width,
          "torchrev::models::RevNetInv: stage ",
          s,
          " is ",
          width,
          " channels wide, more than the ",
          trunk_width,
          " that space-to-depth gives it");
      for (int64_t u = 0; u < options.units()[s]; ++u) {
        // The first block of a stage mixes all channels of its halves, as
        // the paper's transition block mixes all of the previous stage's.
        trunk->push_back(sliced_rev_block(
            residual_kind(options.bottleneck()),
            width,
            trunk_width,
            /*mix_all=*/u == 0,
            /*lean=*/true));
      }
    }
    // BN-ReLU-pool as one `PreActPool`: the head then keeps only the trunk
    // output, which the trunk keeps anyway.
    head =
        register_module("head", torch::nn::Sequential(PreActPool(trunk_width)));
    fc = register_module(
        "fc", torch::nn::Linear(trunk_width, options.num_classes()));
  }

  torch::Tensor forward(const torch::Tensor& images) override {
    auto x = run_stage(*trunk, stem(images), options.mode());
    return fc(head->forward(x));
  }

  void pretty_print(std::ostream& stream) const override {
    stream << "torchrev::models::RevNetInv";
  }

  RevNetOptions options;
  torch::nn::Conv2d stem{nullptr};
  /// Every block and downsampling of the network, in one stage.
  RevSequential trunk{nullptr};
  torch::nn::Sequential head{nullptr};
  torch::nn::Linear fc{nullptr};
};
TORCH_MODULE(RevNetInv);

} // namespace models
} // namespace torchrev
