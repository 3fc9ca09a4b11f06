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
