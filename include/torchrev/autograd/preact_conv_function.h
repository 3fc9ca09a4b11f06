#pragma once

// The custom autograd Function behind `torchrev::models::PreActConv`, a
// pre-activation unit BatchNorm -> ReLU -> convolution that keeps only its
// input.
//
// Plain autograd keeps two tensors of the input's size for such a unit: the
// ReLU's output (which the convolution and the ReLU's backward read) besides
// the input (which BatchNorm's backward reads). Inside a reversible block,
// whose F and G are recorded once more during the stage's backward, those
// are most of the block's recompute graph, and so of the stage's peak.
//
//   forward  z = relu(batch_norm(x)), in place; y = conv(z). Keeps x, the
//            weights and BatchNorm's per-channel statistics (the batch's
//            mean and inverse standard deviation in training, copies of the
//            running ones in eval mode); z is released before returning.
//            Running statistics are updated here, as BatchNorm's forward
//            does.
//
//   backward z is recomputed from x and the kept statistics (an affine map
//            per channel, then relu), which costs one elementwise pass; then
//            dz = conv's input gradient of dy, masked where z <= 0 (in
//            place), and z is released before BatchNorm's backward gives dx
//            and BatchNorm's parameter gradients. At most x, dy, z and dz are
//            alive at once.
//
// Not twice differentiable: a backward with create_graph=true throws.

#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/types.h>

#include <array>
#include <cstdint>
#include <tuple>
#include <vector>

namespace torchrev {
namespace detail {
/// `t`, or none when undefined (ATen's optional tensor arguments).
inline c10::optional<at::Tensor> optional_tensor(const at::Tensor& t) {
  return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt;
}
} // namespace detail

namespace autograd {

/// What a `PreActConvFunction` needs besides its tensor inputs.
struct PreActConvSettings {
  /// BatchNorm's running statistics, updated in place in training; undefined
  /// when it keeps none (or a torchrev recompute froze them).
  torch::Tensor running_mean, running_var;
  /// Normalise with the batch's statistics (else with the running ones).
  bool training = true;
  double momentum = 0.1;
  double eps = 1e-5;
  /// The convolution's stride and padding (no bias, no dilation, one group).
  std::vector<int64_t> stride{1, 1};
  std::vector<int64_t> padding{0, 0};
};

/// BatchNorm -> ReLU -> convolution as one autograd node that keeps only its
/// input (see the file comment). Use it through `torchrev::models::PreActConv`:
///
///     y = PreActConvFunction::apply(x, bn_weight, bn_bias, conv_weight,
///                                   settings);
struct PreActConvFunction
    : public torch::autograd::Function<PreActConvFunction> {
  static torch::Tensor forward(
      torch::autograd::AutogradContext* ctx,
      const torch::Tensor& x,
      const torch::Tensor& bn_weight,
      const torch::Tensor& bn_bias,
      const torch::Tensor& conv_weight,
      const PreActConvSettings& settings) {
    const auto& running_mean = settings.running_mean;
    const auto& running_var = settings.running_var;
    const bool training = settings.training;
    const auto& stride = settings.stride;
    const auto& padding = settings.padding;
    TORCH_CHECK(
        training || (running_mean.defined() && running_var.defined()),
        "torchrev::autograd::PreActConvFunction: eval mode needs running "
        "statistics");
    auto [z, mean, invstd] = at::native_batch_norm(
        x,
        bn_weight,
        bn_bias,
        detail::optional_tensor(running_mean),
        detail::optional_tensor(running_var),
        training,
        settings.momentum,
        settings.eps);
    z.relu_();
    auto y = at::convolution(
        z,
        conv_weight,
        /*bias=*/torch::Tensor(),
        stride,
        padding,
        /*dilation=*/{1, 1},
        /*transposed=*/false,
        /*output_padding=*/{0, 0},
        /*groups=*/1);
    if (!training) {
      // Copies: the buffers may change before the backward.
      mean = running_mean.clone();
      invstd = running_var.clone();
    }
    ctx->save_for_backward({x, bn_weight, bn_bias, conv_weight, mean, invstd});
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = settings.eps;
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    return y;
  }

  static torch::autograd::variable_list backward(
      torch::autograd::AutogradContext* ctx,
      torch::autograd::variable_list grad_outputs) {
    TORCH_CHECK(
        !torch::GradMode::is_enabled(),
        "torchrev::models::PreActConv does not support double backward "
        "(create_graph=true): its backward recomputes its ReLU's output. "
        "Build the model with plain BatchNorm, ReLU and Conv2d modules for "
        "higher-order gradients.");
    auto saved = ctx->get_saved_variables();
    const auto& x = saved[0];
    const auto& bn_weight = saved[1];
    const auto& bn_bias = saved[2];
    const auto& conv_weight = saved[3];
    // Training: the batch's mean and inverse standard deviation. Eval: the
    // running mean and variance.
    const auto& stat_a = saved[4];
    const auto& stat_b = saved[5];
    const bool training = ctx->saved_data["training"].toBool();
    const double eps = ctx->saved_data["eps"].toDouble();
    const auto stride = ctx->saved_data["stride"].toIntVector();
    const auto padding = ctx->saved_data["padding"].toIntVector();
    torch::Tensor dy = std::move(grad_outputs[0]);
    torch::autograd::variable_list grads(5);
    if (!dy.defined()) {
      return grads;
    }

    const bool needs_x = ctx->needs_input_grad(0);
    const bool needs_bn_weight = ctx->needs_input_grad(1);
    const bool needs_bn_bias = ctx->needs_input_grad(2);
    const bool needs_dz = needs_x || needs_bn_weight || needs_bn_bias;

    // z = relu(x * scale + shift), per channel, as the forward computed it
    // (up to rounding).
    const auto invstd = training ? stat_b : (stat_b + eps).rsqrt();
    const auto mean = stat_a;
    const auto scale = invstd * bn_weight;
    const auto shift = bn_bias - mean * scale;
    std::vector<int64_t> per_channel(x.dim(), 1);
    per_channel[1] = -1;
    torch::Tensor z = x * scale.view(per_channel);
    z.add_(shift.view(per_channel)).relu_();

    auto [dz, d_conv_weight, unused_bias] = at::convolution_backward(
        dy,
        z,
        conv_weight,
        /*bias_sizes=*/c10::nullopt,
        stride,
        padding,
        /*dilation=*/{1, 1},
        /*transposed=*/false,
        /*output_padding=*/{0, 0},
        /*groups=*/1,
        {needs_dz, ctx->needs_input_grad(3), false});
    dy = torch::Tensor();
    grads[3] = std::move(d_conv_weight);
    if (!needs_dz) {
      return grads;
    }
    dz.masked_fill_(z <= 0, 0); // the ReLU's backward
    z = torch::Tensor();
    auto [dx, d_bn_weight, d_bn_bias] = at::native_batch_norm_backward(
        dz,
        x,
        bn_weight,
        detail::optional_tensor(training ? torch::Tensor() : stat_a),
        detail::optional_tensor(training ? torch::Tensor() : stat_b),
        detail::optional_tensor(training ? stat_a : torch::Tensor()),
        detail::optional_tensor(training ? stat_b : torch::Tensor()),
        training,
        eps,
        {needs_x, needs_bn_weight, needs_bn_bias});
    grads[0] = std::move(dx);
    grads[1] = std::move(d_bn_weight);
    grads[2] = std::move(d_bn_bias);
    return grads;
  }
};

} // namespace autograd
} // namespace torchrev
