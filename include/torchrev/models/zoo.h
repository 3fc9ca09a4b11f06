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
// | vit_mini    | 5      | 64         | 4     | 2x dim | 4x4   |
// | revvit_mini | 5      | 64 (2x64)  | 4     | 2x dim | 4x4   |
//
// revnet_mini is a width- and depth-reduced RevNet for quick runs (the
// training example's default on Fashion-MNIST). Each RevNet also comes fully
// reversible, as `<name>_inv` (`RevNetInv`: space-to-depth instead of the
// transition blocks, the same widths and units).

#include <torchrev/models/nets.h>
#include <torchrev/models/transformer.h>

#include <algorithm>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

namespace torchrev {
namespace models {

/// The blocks of `vit_mini` and `revvit_mini` (`ZooOptions::depth` 0): five,
/// one fewer than `ViTOptions`' default, so that the default 1200-step
/// Fashion-MNIST run of either trains in under 5 minutes on 2 CPU cores with
/// Debian's LibTorch 1.13 (with six, revvit_mini took 324 s on a virtual
/// Xeon and 317-353 s on an AMD EPYC).
inline constexpr int64_t kViTMiniDepth = 5;

/// Options every zoo model takes.
struct ZooOptions {
  /// Image channels: 3 for CIFAR, 1 for Fashion-MNIST.
  TORCH_ARG(int64_t, in_channels) = 3;
  /// Number of classes.
  TORCH_ARG(int64_t, num_classes) = 10;
  /// For RevNets: how the reversible stages run.
  TORCH_ARG(StageMode, mode) = StageMode::kReversible;
  /// For RevNets: checkpoint the transition blocks (the default; see
  /// `RevNetOptions::checkpoint_transitions`). `false` stores their
  /// activations, as in the RevNet paper.
  TORCH_ARG(bool, checkpoint_transitions) = true;
  /// For transformers: the height and width of the images (28 for
  /// Fashion-MNIST, 32 for CIFAR); the other models take any size.
  TORCH_ARG(int64_t, image_size) = 32;
  /// For transformers: the number of blocks (0: the model's own,
  /// `kViTMiniDepth`).
  TORCH_ARG(int64_t, depth) = 0;
};

/// The kinds of model in the zoo.
enum class ZooFamily {
  kResNet,
  /// RevNet: reversible stages opened by transition blocks.
  kRevNet,
  /// Fully reversible RevNet (`RevNetInv`).
  kRevNetInv,
  kViT,
  kRevViT,
};

/// One model of the zoo: its name and what it is built from. The one list
/// of the zoo; `model_names`, `create` and the `is_*` predicates read it.
struct ZooEntry {
  std::string name;
  ZooFamily family;
  /// For the convolutional networks: units per stage, channels of the stem
  /// and of each stage, and the residual function.
  std::vector<int64_t> units;
  std::vector<int64_t> channels;
  bool bottleneck = false;
};

/// Every model of the zoo, in table order (see this file's head).
inline const std::vector<ZooEntry>& zoo_entries() {
  static const std::vector<ZooEntry> entries = [] {
    const std::vector<int64_t> resnet_channels{16, 16, 32, 64};
    std::vector<ZooEntry> list{
        {"resnet32", ZooFamily::kResNet, {5, 5, 5}, resnet_channels},
        {"resnet110", ZooFamily::kResNet, {18, 18, 18}, resnet_channels},
        {"resnet164",
         ZooFamily::kResNet,
         {18, 18, 18},
         resnet_channels,
         /*bottleneck=*/true},
    };
    const std::vector<ZooEntry> revnets{
        {"revnet38", ZooFamily::kRevNet, {3, 3, 3}, {32, 32, 64, 112}},
        {"revnet110", ZooFamily::kRevNet, {9, 9, 9}, {32, 32, 64, 128}},
        {"revnet164",
         ZooFamily::kRevNet,
         {9, 9, 9},
         {32, 32, 64, 128},
         /*bottleneck=*/true},
        {"revnet_mini", ZooFamily::kRevNet, {1, 2, 2}, {16, 16, 32, 64}},
    };
    list.insert(list.end(), revnets.begin(), revnets.end());
    // Each RevNet also comes fully reversible, with the same layout.
    for (auto entry : revnets) {
      entry.name += "_inv";
      entry.family = ZooFamily::kRevNetInv;
      list.push_back(std::move(entry));
    }
    list.push_back({"vit_mini", ZooFamily::kViT, {}, {}});
    list.push_back({"revvit_mini", ZooFamily::kRevViT, {}, {}});
    return list;
  }();
  return entries;
}

/// The zoo entry named `name`, or nullptr.
inline const ZooEntry* find_zoo_entry(const std::string& name) {
  for (const auto& entry : zoo_entries()) {
    if (entry.name == name) {
      return &entry;
    }
  }
  return nullptr;
}

/// The names `create` accepts, in table order.
inline std::vector<std::string> model_names() {
  std::vector<std::string> names;
  for (const auto& entry : zoo_entries()) {
    names.push_back(entry.name);
  }
  return names;
}

namespace detail {

inline bool is_zoo_family(
    const std::string& name,
    std::initializer_list<ZooFamily> families) {
  const auto* entry = find_zoo_entry(name);
  return entry != nullptr &&
      std::find(families.begin(), families.end(), entry->family) !=
      families.end();
}

} // namespace detail

/// True for the names of fully reversible RevNets (`<name>_inv`).
inline bool is_fully_reversible(const std::string& name) {
  return detail::is_zoo_family(name, {ZooFamily::kRevNetInv});
}

/// True for the names of RevNets, fully reversible ones included.
inline bool is_revnet(const std::string& name) {
  return detail::is_zoo_family(
      name, {ZooFamily::kRevNet, ZooFamily::kRevNetInv});
}

/// True for the names of vision transformers, reversible or not.
inline bool is_transformer(const std::string& name) {
  return detail::is_zoo_family(name, {ZooFamily::kViT, ZooFamily::kRevViT});
}

/// True for the names of models with reversible stages (RevNets and
/// RevViTs): they run in any `StageMode`.
inline bool is_reversible(const std::string& name) {
  return detail::is_zoo_family(
      name, {ZooFamily::kRevNet, ZooFamily::kRevNetInv, ZooFamily::kRevViT});
}

/// Builds the zoo model `name`. Throws a `c10::Error` that lists the valid
/// names for an unknown one.
inline std::shared_ptr<ImageClassifier> create(
    const std::string& name,
    const ZooOptions& options = {}) {
  const auto* entry = find_zoo_entry(name);
  if (entry == nullptr) {
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
  TORCH_CHECK(
      options.depth() >= 0,
      "torchrev::models::create: depth must be >= 0 (0: the model's own), "
      "got ",
      options.depth());
  switch (entry->family) {
    case ZooFamily::kResNet:
      return std::make_shared<ResNetImpl>(
          ResNetOptions()
              .units(entry->units)
              .channels(entry->channels)
              .bottleneck(entry->bottleneck)
              .in_channels(options.in_channels())
              .num_classes(options.num_classes()));
    case ZooFamily::kRevNet:
    case ZooFamily::kRevNetInv: {
      auto revnet_options =
          RevNetOptions()
              .units(entry->units)
              .channels(entry->channels)
              .bottleneck(entry->bottleneck)
              .in_channels(options.in_channels())
              .num_classes(options.num_classes())
              .mode(options.mode())
              .checkpoint_transitions(options.checkpoint_transitions());
      if (entry->family == ZooFamily::kRevNetInv) {
        return std::make_shared<RevNetInvImpl>(std::move(revnet_options));
      }
      return std::make_shared<RevNetImpl>(std::move(revnet_options));
    }
    case ZooFamily::kViT:
    case ZooFamily::kRevViT: {
      auto vit_options =
          ViTOptions()
              .image_size(options.image_size())
              .in_channels(options.in_channels())
              .num_classes(options.num_classes())
              .depth(options.depth() > 0 ? options.depth() : kViTMiniDepth)
              .mode(options.mode());
      if (entry->family == ZooFamily::kRevViT) {
        return std::make_shared<RevViTImpl>(std::move(vit_options));
      }
      return std::make_shared<ViTImpl>(std::move(vit_options));
    }
  }
  TORCH_CHECK(false, "torchrev::models::create: unknown zoo family");
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
