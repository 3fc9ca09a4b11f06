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
//            per channel, then relu), which costs one elementwise pass, and
//            gives the convolution's weight gradient. Only where z is zero is
//            kept (one byte per value) before z is released; then
//            dz = the convolution's input gradient of dy (a transposed
//            convolution), zeroed there (the ReLU's backward), and
//            BatchNorm's backward turns dz into dx in place. So besides x and
//            dy, at most one tensor of x's size is alive at a time.
//
// Not twice differentiable: a backward with create_graph=true throws.

#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/types.h>

#include <algorithm>
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
struct PreActSettings {
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

/// What the pre-activation Functions share: BatchNorm -> ReLU forward, its
/// recompute from the input, and BatchNorm's backward in place.
struct PreActivation {
  /// z = relu(batch_norm(x)) (in place), updating the running statistics in
  /// training, and the statistics the backward needs: the batch's mean and
  /// inverse standard deviation in training, copies of the running mean
  /// and variance in eval mode.
  static std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> forward(
      const torch::Tensor& x,
      const torch::Tensor& bn_weight,
      const torch::Tensor& bn_bias,
      const PreActSettings& settings) {
    const auto& running_mean = settings.running_mean;
    const auto& running_var = settings.running_var;
    TORCH_CHECK(
        settings.training || (running_mean.defined() && running_var.defined()),
        "torchrev::autograd: a pre-activation unit in eval mode needs running "
        "statistics");
    auto [z, mean, invstd] = at::native_batch_norm(
        x,
        bn_weight,
        bn_bias,
        detail::optional_tensor(running_mean),
        detail::optional_tensor(running_var),
        settings.training,
        settings.momentum,
        settings.eps);
    z.relu_();
    if (!settings.training) {
      // Copies: the buffers may change before the backward.
      mean = running_mean.clone();
      invstd = running_var.clone();
    }
    return {std::move(z), std::move(mean), std::move(invstd)};
  }

  /// z = relu(x * scale + shift), per channel, as `forward` computed it (up
  /// to rounding), from the statistics it returned.
  static torch::Tensor recompute(
      const torch::Tensor& x,
      const torch::Tensor& bn_weight,
      const torch::Tensor& bn_bias,
      const torch::Tensor& stat_a,
      const torch::Tensor& stat_b,
      bool training,
      double eps) {
    const auto invstd = training ? stat_b : (stat_b + eps).rsqrt();
    const auto per_channel = channel_shape(x);
    torch::Tensor z = x * (invstd * bn_weight).view(per_channel);
    z.add_((bn_bias - stat_a * invstd * bn_weight).view(per_channel)).relu_();
    return z;
  }

  /// BatchNorm's backward, into dz's memory: grads[0] = dx (dz itself,
  /// when x needs it), grads[1] and grads[2] the weight's and the bias's
  /// gradients (when needed, as `needs_input_grad(0..2)` say). With
  /// xhat = (x - mean) * invstd and n values per channel:
  ///   d bias   = sum dz,   d weight = sum dz * xhat,
  ///   dx = weight * invstd * (dz - [d bias + xhat * d weight] / n)
  /// in training (the batch statistics depend on x), and
  ///   dx = weight * invstd * dz
  /// in eval mode.
  static void backward_in_place(
      torch::Tensor& dz,
      const torch::Tensor& x,
      const torch::Tensor& bn_weight,
      const torch::Tensor& stat_a,
      const torch::Tensor& stat_b,
      bool training,
      double eps,
      std::array<bool, 3> needs,
      torch::autograd::variable_list& grads) {
    const auto invstd = training ? stat_b : (stat_b + eps).rsqrt();
    const auto& mean = stat_a;
    const auto per_channel = channel_shape(x);
    const std::vector<int64_t> reduce{0, 2, 3};
    const auto sum_dz = dz.sum(reduce);
    const auto sum_dz_xhat =
        centred_dot(dz, x, mean.view(per_channel)) * invstd;
    if (needs[1]) {
      grads[1] = sum_dz_xhat;
    }
    if (needs[2]) {
      grads[2] = sum_dz;
    }
    if (!needs[0]) {
      dz = torch::Tensor();
      return;
    }
    if (training) {
      const int64_t per_channel_count = x.numel() / x.size(1);
      const auto n = static_cast<double>(per_channel_count);
      // dz - sum_dz / n - (x - mean) * k, with k = invstd * sum_dz_xhat / n
      const auto k = invstd * sum_dz_xhat / n;
      dz.addcmul_(x, (-k).view(per_channel));
      dz.add_((mean * k - sum_dz / n).view(per_channel));
    }
    dz.mul_((invstd * bn_weight).view(per_channel));
    grads[0] = std::move(dz);
  }

 private:
  /// {1, -1, 1, 1}: a per-channel tensor as it broadcasts against `x`.
  static std::vector<int64_t> channel_shape(const torch::Tensor& x) {
    std::vector<int64_t> shape(x.dim(), 1);
    shape[1] = -1;
    return shape;
  }

  /// Per channel, the sum over the other dimensions of (x - mean) * dz,
  /// computed over slices of the batch so that no temporary of x's size is
  /// allocated.
  static torch::Tensor centred_dot(
      const torch::Tensor& dz,
      const torch::Tensor& x,
      const torch::Tensor& mean) {
    const int64_t batch = x.size(0);
    const int64_t step = std::max<int64_t>(1, batch / 8);
    const std::vector<int64_t> reduce{0, 2, 3};
    torch::Tensor sum;
    for (int64_t b = 0; b < batch; b += step) {
      const int64_t len = std::min(step, batch - b);
      auto part =
          ((x.narrow(0, b, len) - mean) * dz.narrow(0, b, len)).sum(reduce);
      sum = sum.defined() ? sum.add_(part) : part;
    }
    return sum;
  }
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
      const PreActSettings& settings) {
    const bool training = settings.training;
    const auto& stride = settings.stride;
    const auto& padding = settings.padding;
    auto [z, mean, invstd] =
        PreActivation::forward(x, bn_weight, bn_bias, settings);
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
    z = torch::Tensor();
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

    torch::Tensor z = PreActivation::recompute(
        x, bn_weight, bn_bias, stat_a, stat_b, training, eps);
    const bool unit_stride = std::all_of(
        stride.begin(), stride.end(), [](int64_t s) { return s == 1; });
    torch::Tensor dz;
    torch::Tensor relu_off;
    if (!unit_stride) {
      auto [d_input, d_weight, unused_bias] = at::convolution_backward(
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
      grads[3] = std::move(d_weight);
      dz = std::move(d_input);
      relu_off = needs_dz ? z <= 0 : torch::Tensor();
      z = torch::Tensor();
    } else {
      // At stride 1 the input gradient is a convolution of dy with the
      // flipped, transposed kernel, which does not read z: z is released
      // (keeping where it is zero) after the weight gradient, before dz is
      // allocated.
      if (ctx->needs_input_grad(3)) {
        grads[3] = std::get<1>(at::convolution_backward(
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
            {false, true, false}));
      }
      if (needs_dz) {
        relu_off = z <= 0;
        z = torch::Tensor();
        std::vector<int64_t> full_padding(padding.size());
        for (size_t d = 0; d < padding.size(); ++d) {
          full_padding[d] =
              conv_weight.size(static_cast<int64_t>(d) + 2) - 1 - padding[d];
        }
        const auto flipped =
            conv_weight.flip({2, 3}).transpose(0, 1).contiguous(
                conv_weight.suggest_memory_format());
        dz = at::convolution(
            dy,
            flipped,
            /*bias=*/torch::Tensor(),
            stride,
            full_padding,
            /*dilation=*/{1, 1},
            /*transposed=*/false,
            /*output_padding=*/{0, 0},
            /*groups=*/1);
      }
    }
    dy = torch::Tensor();
    if (!needs_dz) {
      return grads;
    }
    dz.masked_fill_(relu_off, 0); // the ReLU's backward

    PreActivation::backward_in_place(
        dz,
        x,
        bn_weight,
        stat_a,
        stat_b,
        training,
        eps,
        {needs_x, needs_bn_weight, needs_bn_bias},
        grads);
    return grads;
  }
};

/// BatchNorm -> ReLU -> global average pooling (N x C x H x W -> N x C) as
/// one autograd node that keeps only its input, like `PreActConvFunction`:
/// a classifier head whose backward needs one tensor of the input's size
/// besides the input. Use it through `torchrev::models::PreActPool`.
struct PreActPoolFunction
    : public torch::autograd::Function<PreActPoolFunction> {
  static torch::Tensor forward(
      torch::autograd::AutogradContext* ctx,
      const torch::Tensor& x,
      const torch::Tensor& bn_weight,
      const torch::Tensor& bn_bias,
      const PreActSettings& settings) {
    auto [z, mean, invstd] =
        PreActivation::forward(x, bn_weight, bn_bias, settings);
    auto y = z.mean({2, 3});
    z = torch::Tensor();
    ctx->save_for_backward({x, bn_weight, bn_bias, mean, invstd});
    ctx->saved_data["training"] = settings.training;
    ctx->saved_data["eps"] = settings.eps;
    return y;
  }

  static torch::autograd::variable_list backward(
      torch::autograd::AutogradContext* ctx,
      torch::autograd::variable_list grad_outputs) {
    TORCH_CHECK(
        !torch::GradMode::is_enabled(),
        "torchrev::models::PreActPool does not support double backward "
        "(create_graph=true): its backward recomputes its ReLU's output.");
    auto saved = ctx->get_saved_variables();
    const auto& x = saved[0];
    const auto& bn_weight = saved[1];
    const auto& bn_bias = saved[2];
    const auto& stat_a = saved[3];
    const auto& stat_b = saved[4];
    const bool training = ctx->saved_data["training"].toBool();
    const double eps = ctx->saved_data["eps"].toDouble();
    torch::Tensor dy = std::move(grad_outputs[0]);
    torch::autograd::variable_list grads(4);
    const bool needs_x = ctx->needs_input_grad(0);
    const bool needs_bn_weight = ctx->needs_input_grad(1);
    const bool needs_bn_bias = ctx->needs_input_grad(2);
    if (!dy.defined() || !(needs_x || needs_bn_weight || needs_bn_bias)) {
      return grads;
    }
    torch::Tensor relu_off =
        PreActivation::recompute(
            x, bn_weight, bn_bias, stat_a, stat_b, training, eps) <= 0;
    // The mean's backward: dy / (H * W) at every position.
    const auto positions = static_cast<double>(x.size(2) * x.size(3));
    torch::Tensor dz = (dy / positions)
                           .view({x.size(0), x.size(1), 1, 1})
                           .expand(x.sizes())
                           .contiguous(x.suggest_memory_format());
    dy = torch::Tensor();
    dz.masked_fill_(relu_off, 0);
    relu_off = torch::Tensor();
    PreActivation::backward_in_place(
        dz,
        x,
        bn_weight,
        stat_a,
        stat_b,
        training,
        eps,
        {needs_x, needs_bn_weight, needs_bn_bias},
        grads);
    return grads;
  }
};

} // namespace autograd
} // namespace torchrev
