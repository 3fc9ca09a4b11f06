// torchrev::checkpoint and torchrev::Checkpoint against plain autograd.

#include "test_util.h"

using namespace torchrev::testing;

namespace {

torch::nn::Sequential conv_net(double dropout) {
  return torch::nn::Sequential(
      torch::nn::Conv2d(torch::nn::Conv2dOptions(2, 4, 3).padding(1)),
      torch::nn::BatchNorm2d(4),
      torch::nn::ReLU(),
      torch::nn::Dropout(dropout),
      torch::nn::Conv2d(torch::nn::Conv2dOptions(4, 3, 3).stride(2)));
}

} // namespace

TEST(Checkpoint, GradientsBatchNormStatsAndRngMatchPlainAutograd) {
  torch::manual_seed(50);
  auto net = conv_net(0.3);
  net->to(torch::kFloat64);
  auto reference = torch::nn::Sequential(
      std::dynamic_pointer_cast<torch::nn::SequentialImpl>(net->clone()));
  torchrev::Checkpoint wrapped(net);
  auto input = torch::randn({3, 2, 7, 7}, torch::kFloat64);

  auto x = input.clone().requires_grad_(true);
  torch::manual_seed(51);
  wrapped(x).pow(2).sum().backward();
  auto after = torch::rand({3});

  auto ref_x = input.clone().requires_grad_(true);
  torch::manual_seed(51);
  reference->forward(ref_x).pow(2).sum().backward();
  auto ref_after = torch::rand({3});

  EXPECT_CLOSE(x.grad(), ref_x.grad(), 1e-9);
  auto params = net->parameters();
  auto ref_params = reference->parameters();
  for (size_t i = 0; i < params.size(); ++i) {
    EXPECT_CLOSE(params[i].grad(), ref_params[i].grad(), 1e-9);
  }
  auto buffers = net->buffers();
  auto ref_buffers = reference->buffers();
  for (size_t i = 0; i < buffers.size(); ++i) {
    EXPECT_TRUE(buffers[i].allclose(ref_buffers[i], 0, 1e-12))
        << "buffer " << i;
  }
  EXPECT_TRUE(after.equal(ref_after));
}

TEST(Checkpoint, AutogradGradAndHooksSeeEachParameterOnce) {
  torch::manual_seed(52);
  auto net = conv_net(0.0);
  auto params = net->parameters();
  std::vector<int> fired(params.size(), 0);
  for (size_t i = 0; i < params.size(); ++i) {
    params[i].register_hook([&fired, i](const torch::Tensor& g) {
      ++fired[i];
      return g;
    });
  }
  auto x = torch::randn({2, 2, 7, 7}, torch::requires_grad());
  torchrev::checkpoint(net, x).sum().backward();
  for (size_t i = 0; i < params.size(); ++i) {
    EXPECT_EQ(fired[i], 1) << "parameter " << i;
  }
  // torch::autograd::grad: the values of plain autograd, and no .grad.
  for (auto& p : params) {
    p.mutable_grad() = torch::Tensor();
  }
  auto grads =
      torch::autograd::grad({torchrev::checkpoint(net, x).sum()}, params);
  auto ref_grads = torch::autograd::grad({net->forward(x).sum()}, params);
  ASSERT_EQ(grads.size(), params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    EXPECT_CLOSE(grads[i], ref_grads[i], 1e-5);
    EXPECT_FALSE(params[i].grad().defined());
  }
}

TEST(Checkpoint, AHookThatDoublesGradientsGivesTwicePlainAutogradsGradients) {
  torch::manual_seed(53);
  auto net = conv_net(0.0);
  net->to(torch::kFloat64);
  auto reference = torch::nn::Sequential(
      std::dynamic_pointer_cast<torch::nn::SequentialImpl>(net->clone()));
  auto params = net->parameters();
  for (auto& p : params) {
    p.register_hook([](const torch::Tensor& g) { return g * 2; });
  }
  auto counts = count_accumulator_runs(params);
  auto x = torch::randn({2, 2, 7, 7}, torch::kFloat64);
  torchrev::checkpoint(net, x).pow(2).sum().backward();
  reference->forward(x).pow(2).sum().backward();
  auto ref_params = reference->parameters();
  for (size_t i = 0; i < params.size(); ++i) {
    SCOPED_TRACE("parameter " + std::to_string(i));
    EXPECT_CLOSE(params[i].grad(), 2 * ref_params[i].grad(), 1e-9);
    EXPECT_EQ(*counts.runs[i], 1);
  }
}

TEST(Checkpoint, UnderNoGradItStoresNothing) {
  auto net = conv_net(0.0);
  auto x = torch::randn({2, 2, 9, 9}, torch::requires_grad());
  torch::NoGradGuard no_grad;
  auto& meter = torchrev::CPUMemoryMeter::instance();
  torchrev::checkpoint(net, x); // warm-up
  const size_t before = meter.current_bytes();
  auto y = torchrev::checkpoint(net, x);
  EXPECT_EQ(meter.current_bytes() - before, static_cast<size_t>(y.nbytes()));
}

TEST(CheckpointSequential, GradientsBatchNormStatsAndRngMatchPlainAutograd) {
  torch::manual_seed(56);
  // 7 modules in 3 segments: 2, 2 and the last 3 (run plainly).
  auto net = torch::nn::Sequential(
      torch::nn::Conv2d(torch::nn::Conv2dOptions(2, 4, 3).padding(1)),
      torch::nn::BatchNorm2d(4),
      torch::nn::ReLU(),
      torch::nn::Dropout(0.3),
      torch::nn::Conv2d(torch::nn::Conv2dOptions(4, 4, 3).padding(1)),
      torch::nn::Dropout(0.2),
      torch::nn::Conv2d(torch::nn::Conv2dOptions(4, 3, 3).stride(2)));
  net->to(torch::kFloat64);
  auto reference = torch::nn::Sequential(
      std::dynamic_pointer_cast<torch::nn::SequentialImpl>(net->clone()));
  auto input = torch::randn({3, 2, 7, 7}, torch::kFloat64);

  auto x = input.clone().requires_grad_(true);
  torch::manual_seed(57);
  auto y = torchrev::checkpoint_sequential(net, 3, x);
  y.pow(2).sum().backward();
  auto after = torch::rand({3});

  auto ref_x = input.clone().requires_grad_(true);
  torch::manual_seed(57);
  auto ref_y = reference->forward(ref_x);
  ref_y.pow(2).sum().backward();
  auto ref_after = torch::rand({3});

  EXPECT_CLOSE(y, ref_y, 1e-12);
  EXPECT_CLOSE(x.grad(), ref_x.grad(), 1e-9);
  auto params = net->parameters();
  auto ref_params = reference->parameters();
  ASSERT_EQ(params.size(), ref_params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    SCOPED_TRACE("parameter " + std::to_string(i));
    EXPECT_CLOSE(params[i].grad(), ref_params[i].grad(), 1e-9);
  }
  auto buffers = net->buffers();
  auto ref_buffers = reference->buffers();
  for (size_t i = 0; i < buffers.size(); ++i) {
    EXPECT_TRUE(buffers[i].allclose(ref_buffers[i], 0, 1e-12))
        << "buffer " << i; // BatchNorm statistics updated once
  }
  EXPECT_TRUE(after.equal(ref_after));
}

TEST(CheckpointSequential, KeepsOnlySegmentInputsAndTheLastSegment) {
  torch::manual_seed(58);
  torch::nn::Sequential net;
  for (int k = 0; k < 16; ++k) {
    net->push_back(torch::nn::Linear(64, 64));
    net->push_back(torch::nn::Tanh());
  }
  auto x = torch::randn({256, 64}, torch::requires_grad());
  auto& meter = torchrev::CPUMemoryMeter::instance();
  const auto held_by = [&](const std::function<torch::Tensor()>& run) {
    const size_t before = meter.current_bytes();
    auto y = run();
    return meter.current_bytes() - before;
  };
  // Plain autograd keeps the 16 Tanh outputs (each Linear saves its input,
  // the Tanh output before it; the last is the output). 4 segments of 8
  // modules keep the 3 segment outputs that are the next segments' inputs
  // and the last segment's 4 Tanh outputs: 7, and besides them only each
  // checkpointed segment's random generator snapshot (about 5 KB).
  const size_t checkpointed =
      held_by([&] { return torchrev::checkpoint_sequential(net, 4, x); });
  const size_t plain = held_by([&] { return net->forward(x); });
  const size_t activation = 256 * 64 * sizeof(float);
  EXPECT_EQ(plain, 16 * activation);
  EXPECT_GE(checkpointed, 7 * activation);
  EXPECT_LT(checkpointed, 7 * activation + 3 * 8192);
}

TEST(CheckpointSequential, RejectsASegmentCountOutOfRange) {
  auto net = conv_net(0.0);
  auto x = torch::randn({1, 2, 7, 7});
  for (int64_t segments : {0, 6}) {
    EXPECT_ERROR_CONTAINS(
        torchrev::checkpoint_sequential(net, segments, x),
        "torchrev::checkpoint_sequential: expected between 1 and 5 segments "
        "for a Sequential of 5 modules, but got " +
            std::to_string(segments));
  }
}
