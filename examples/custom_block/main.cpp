// custom_block: write your own reversible block by subclassing
// torchrev::RevBlockBase, stack it in a RevSequential, and compare the peak
// memory of a training step with plain autograd on the same blocks.

#include <torchrev/torchrev.h>

#include <fmt/core.h>
#include <torch/torch.h>

// Channels of the input (each half gets kChannels / 2).
constexpr int64_t kChannels = 32;
// Blocks in the stage.
constexpr int kDepth = 16;
// Images per batch and their side.
constexpr int64_t kBatch = 16;
constexpr int64_t kSide = 32;

/// F and G: BN-ReLU-conv3x3 on half the channels.
struct ConvBlockImpl : torchrev::RevBlockBase {
  ConvBlockImpl() {
    const int64_t half = kChannels / 2;
    f = register_module(
        "f",
        torch::nn::Sequential(
            torch::nn::BatchNorm2d(half),
            torch::nn::ReLU(),
            torch::nn::Conv2d(
                torch::nn::Conv2dOptions(half, half, 3).padding(1))));
    g = register_module(
        "g",
        torch::nn::Sequential(
            torch::nn::BatchNorm2d(half),
            torch::nn::ReLU(),
            torch::nn::Conv2d(
                torch::nn::Conv2dOptions(half, half, 3).padding(1))));
  }
  torch::Tensor forward_f(const torch::Tensor& x2) override {
    return f->forward(x2);
  }
  torch::Tensor forward_g(const torch::Tensor& y1) override {
    return g->forward(y1);
  }
  torch::nn::Sequential f{nullptr}, g{nullptr};
};
TORCH_MODULE(ConvBlock);

/// Peak bytes allocated by one training step above what was allocated before.
size_t step_peak(
    torchrev::RevSequential& stage,
    const torch::Tensor& x,
    torchrev::StageMode mode) {
  auto& meter = torchrev::CPUMemoryMeter::instance();
  const size_t before = meter.current_bytes();
  meter.reset_peak();
  // kStored: each block's own forward, with plain autograd.
  auto y = torchrev::run_stage(stage, x, mode);
  y.pow(2).mean().backward();
  return meter.peak_bytes() - before;
}

int main() {
  torchrev::CPUMemoryMeter::install(); // before the first tensor
  torch::manual_seed(0);
  torchrev::RevSequential stage;
  for (int i = 0; i < kDepth; ++i) {
    stage->push_back(ConvBlock());
  }
  auto x = torch::randn({kBatch, kChannels, kSide, kSide});
  // Warm-up: allocates the gradients.
  step_peak(stage, x, torchrev::StageMode::kReversible);
  const size_t reversible =
      step_peak(stage, x, torchrev::StageMode::kReversible);
  const size_t plain = step_peak(stage, x, torchrev::StageMode::kStored);
  fmt::print(
      "{} blocks, input {}x{}x{}x{}\n",
      kDepth,
      kBatch,
      kChannels,
      kSide,
      kSide);
  fmt::print(
      "peak activation memory, reversible:     {:>10} bytes\n", reversible);
  fmt::print(
      "peak activation memory, plain autograd: {:>10} bytes ({:.1f}x)\n",
      plain,
      double(plain) / double(reversible));
  return 0;
}
