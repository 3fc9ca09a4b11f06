#pragma once

// The model zoo: the RevNet paper's CIFAR configurations by name.
//
// | name       | block      | units    | channels      |
// |------------|------------|----------|---------------|
// | resnet32   | basic      | 5-5-5    | 16-16-32-64   |
// | resnet110  | basic      | 18-18-18 | 16-16-32-64   |
// | resnet164  | bottleneck | 18-18-18 | 16-16-32-64   |
// | revnet38   | basic      | 3-3-3    | 32-32-64-112  |
// | revnet110  | basic      | 9-9-9    | 32-32-64-128  |
// | revnet164  | bottleneck | 9-9-9    | 32-32-64-128  |
// | revnet_mini| basic      | 1-2-2    | 16-16-32-64   |
//
// | name        | blocks | dim (F, G) | heads | MLP    | patch |
// |-------------|--------|------------|-------|--------|-------|
// | vit_mini    | 6      | 64         | 4     | 2x dim | 4x4   |
// | revvit_mini | 6      | 64 (2x64)  | 4     | 2x dim | 4x4   |
//
// revnet_mini is a width- and depth-reduced RevNet for quick runs (the
// training example's default on Fashion-MNIST). Each RevNet also comes fully
// reversible, as `<name>_inv` (`RevNetInv`: space-to-depth instead of the
// stored transition blocks, the same widths and units).

#include <torchrev/models/nets.h>
#include <torchrev/models/transformer.h>

#include <memory>
#include <string>
#include <vector>

namespace torchrev {
namespace models {

/// Options every zoo model takes.
struct ZooOptions {
  /// Image channels: 3 for CIFAR, 1 for Fashion-MNIST.
  TORCH_ARG(int64_t, in_channels) = 3;
  /// Number of classes.
  TORCH_ARG(int64_t, num_classes) = 10;
  /// For RevNets: how the reversible stages run.
  TORCH_ARG(StageMode, mode) = StageMode::kReversible;
  /// For RevNets: checkpoint the transition blocks too.
  TORCH_ARG(bool, checkpoint_transitions) = false;
  /// For transformers: the height and width of the images (28 for
  /// Fashion-MNIST, 32 for CIFAR); the other models take any size.
  TORCH_ARG(int64_t, image_size) = 32;
  /// For transformers: the number of blocks (0: the model's own).
  TORCH_ARG(int64_t, depth) = 0;
};

/// The names `create` accepts, in table order.
inline std::vector<std::string> model_names() {
  return {
      "resnet32",
      "resnet110",
      "resnet164",
      "revnet38",
      "revnet110",
      "revnet164",
      "revnet_mini",
      "revnet38_inv",
      "revnet110_inv",
      "revnet164_inv",
      "revnet_mini_inv",
      "vit_mini",
      "revvit_mini"};
}

/// True for the names of fully reversible RevNets (`<name>_inv`).
inline bool is_fully_reversible(const std::string& name) {
  const std::string suffix = "_inv";
  return name.size() > suffix.size() &&
      name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
}

/// True for the names of RevNets, fully reversible ones included.
inline bool is_revnet(const std::string& name) {
  return name.rfind("revnet", 0) == 0;
}

/// True for the names of vision transformers, reversible or not.
inline bool is_transformer(const std::string& name) {
  return name.rfind("vit", 0) == 0 || name.rfind("revvit", 0) == 0;
}

/// True for the names of models with reversible stages (RevNets and
/// RevViTs): they run in any `StageMode`.
inline bool is_reversible(const std::string& name) {
  return is_revnet(name) || name.rfind("revvit", 0) == 0;
}

/// Builds the zoo model `name`. Throws a `c10::Error` that lists the valid
/// names for an unknown one.
inline std::shared_ptr<ImageClassifier> create(
    const std::string& name,
    const ZooOptions& options = {}) {
  auto resnet = [&](std::vector<int64_t> units, bool bottleneck) {
    return std::make_shared<ResNetImpl>(
        ResNetOptions()
            .units(std::move(units))
            .channels({16, 16, 32, 64})
            .bottleneck(bottleneck)
            .in_channels(options.in_channels())
            .num_classes(options.num_classes()));
  };
  const bool inv = is_fully_reversible(name);
  auto revnet = [&](std::vector<int64_t> units,
                    std::vector<int64_t> channels,
                    bool bottleneck) -> std::shared_ptr<ImageClassifier> {
    auto revnet_options =
        RevNetOptions()
            .units(std::move(units))
            .channels(std::move(channels))
            .bottleneck(bottleneck)
            .in_channels(options.in_channels())
            .num_classes(options.num_classes())
            .mode(options.mode())
            .checkpoint_transitions(options.checkpoint_transitions());
    if (inv) {
      return std::make_shared<RevNetInvImpl>(std::move(revnet_options));
    }
    return std::make_shared<RevNetImpl>(std::move(revnet_options));
  };
  TORCH_CHECK(
      options.depth() >= 0,
      "torchrev::models::create: depth must be >= 0 (0: the model's own), "
      "got ",
      options.depth());
  auto vit_options = [&] {
    return ViTOptions()
        .image_size(options.image_size())
        .in_channels(options.in_channels())
        .num_classes(options.num_classes())
        .depth(options.depth() > 0 ? options.depth() : ViTOptions().depth())
        .mode(options.mode());
  };
  if (name == "vit_mini")
    return std::make_shared<ViTImpl>(vit_options());
  if (name == "revvit_mini")
    return std::make_shared<RevViTImpl>(vit_options());
  const std::string base = inv ? name.substr(0, name.size() - 4) : name;
  if (name == "resnet32")
    return resnet({5, 5, 5}, false);
  if (name == "resnet110")
    return resnet({18, 18, 18}, false);
  if (name == "resnet164")
    return resnet({18, 18, 18}, true);
  if (base == "revnet38")
    return revnet({3, 3, 3}, {32, 32, 64, 112}, false);
  if (base == "revnet110")
    return revnet({9, 9, 9}, {32, 32, 64, 128}, false);
  if (base == "revnet164")
    return revnet({9, 9, 9}, {32, 32, 64, 128}, true);
  if (base == "revnet_mini")
    return revnet({1, 2, 2}, {16, 16, 32, 64}, false);
  std::string valid;
  for (const auto& n : model_names()) {
    valid += (valid.empty() ? "" : ", ") + n;
  }
  TORCH_CHECK(
      false,
      "torchrev::models::create: unknown model '",
      name,
      "'; expected one of: ",
      valid);
}

/// Converts every 4-d parameter and buffer of `module` to the channels-last
/// memory format. With channels-last inputs, convolutions on the CPU (oneDNN)
/// run several times faster than in the default layout, forward and backward.
inline void use_channels_last(torch::nn::Module& module) {
  torch::NoGradGuard no_grad;
  for (auto& p : module.parameters()) {
    if (p.dim() == 4) {
      p.set_data(p.contiguous(torch::MemoryFormat::ChannelsLast));
    }
  }
  for (auto& b : module.buffers()) {
    if (b.dim() == 4) {
      b.set_data(b.contiguous(torch::MemoryFormat::ChannelsLast));
    }
  }
}

/// The number of parameters (elements) of a module.
inline int64_t parameter_count(const torch::nn::Module& module) {
  int64_t count = 0;
  for (const auto& p : module.parameters()) {
    count += p.numel();
  }
  return count;
}

} // namespace models
} // namespace torchrev
