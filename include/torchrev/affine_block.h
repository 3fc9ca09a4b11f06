#pragma once

#include <torchrev/coupling_block.h>
#include <torchrev/detail/module_pair.h>

#include <torch/arg.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include <cstdint>
#include <memory>
#include <ostream>
#include <utility>

namespace torchrev {

/// Options for an affine coupling block.
///
/// Example:
/// ```
/// auto block = torchrev::AffineBlock<torch::nn::Sequential,
///                                    torch::nn::Sequential>(
///     f, g, torchrev::AffineBlockOptions().min_scale(0.25));
/// ```
struct AffineBlockOptions {
  /// The dimension along which the input is split into the halves (x1, x2).
  TORCH_ARG(int64_t, split_dim) = 1;
  /// The smallest scale, in (0, 1]: the scale lies in (min_scale,
  /// 2 - min_scale) and is 1 where F's (or G's) raw scale is 0. Dividing by
  /// it in the inverse amplifies rounding errors by at most 1 / min_scale
  /// per half; 1 gives an additive coupling.
  TORCH_ARG(double, min_scale) = 0.5;
};

/// Base class of affine coupling blocks (Glow, Kingma and Dhariwal 2018;
/// RealNVP, Dinh et al. 2017):
///
///     (a1, b1) = F(x2),  y1 = x1 * scale(a1) + b1
///     (a2, b2) = G(y1),  y2 = x2 * scale(a2) + b2
///
/// F and G return the raw scale `a` and the shift `b` joined along the split
/// dimension (a tensor twice the half's size there, as MemCNN's affine
/// adapters do), and
///
///     scale(a) = min_scale + 2 (1 - min_scale) sigmoid(a)
///
/// a shifted sigmoid, as Glow and MemCNN use: positive, kept away from 0 so
/// that the inverse x = (y - b) / scale(a) is stable, and 1 at a = 0.
///
/// Subclass it and implement `forward_f` and `forward_g`, or use
/// `AffineBlock<F, G>` with two modules.
class AffineBlockBase : public CouplingBlockBase {
 public:
  explicit AffineBlockBase(AffineBlockOptions options_ = {})
      : options(std::move(options_)) {
    TORCH_CHECK(
        options.min_scale() > 0 && options.min_scale() <= 1,
        "torchrev::AffineBlock: min_scale must be in (0, 1] (a scale of 0 "
        "cannot be inverted), but got ",
        options.min_scale());
  }

  /// y = x * scale(a) + b, where (a, b) = h split along the split dimension.
  torch::Tensor couple(const torch::Tensor& x, const torch::Tensor& h) final {
    auto [a, b] = scale_and_shift(x, h);
    return x * scale(a) + b;
  }

  /// x = (y - b) / scale(a).
  torch::Tensor uncouple(const torch::Tensor& y, const torch::Tensor& h) final {
    auto [a, b] = scale_and_shift(y, h);
    return (y - b) / scale(a);
  }

  int64_t configured_split_dim() const final {
    return options.split_dim();
  }

  /// The options this block was constructed with.
  AffineBlockOptions options;

 private:
  torch::Tensor scale(const torch::Tensor& a) const {
    const double m = options.min_scale();
    return torch::sigmoid(a) * (2 * (1 - m)) + m;
  }

  std::pair<torch::Tensor, torch::Tensor> scale_and_shift(
      const torch::Tensor& half,
      const torch::Tensor& h) const {
    const int64_t dim = detail::resolved_split_dim(*this, half);
    auto expected = half.sizes().vec();
    expected[dim] *= 2;
    TORCH_CHECK(
        h.sizes().vec() == expected,
        "torchrev::AffineBlock (",
        name(),
        "): F and G must return the raw scale and the shift joined along the "
        "split dimension ",
        dim,
        " (twice the half's size there): expected shape ",
        c10::IntArrayRef(expected),
        " for a half of shape ",
        half.sizes(),
        ", but got ",
        h.sizes());
    auto parts = h.chunk(2, dim);
    return {parts[0], parts[1]};
  }
};

/// An affine coupling block whose F and G are modules of types `F` and `G`
/// (module holders such as `torch::nn::Sequential`), each returning the raw
/// scale and the shift joined along the split dimension, held in its public
/// members `f` and `g` and registered as submodules "f" and "g"; `clone()`
/// copies them deeply. See `AffineBlockBase`.
template <class F, class G>
class AffineBlockImpl
    : public detail::
          ModulePairImpl<AffineBlockImpl<F, G>, AffineBlockBase, F, G> {
 public:
  AffineBlockImpl(F f_, G g_, AffineBlockOptions options_ = {})
      : detail::ModulePairImpl<AffineBlockImpl<F, G>, AffineBlockBase, F, G>(
            std::move(f_),
            std::move(g_),
            std::move(options_)) {}

  /// Pretty prints `torchrev::AffineBlock(min_scale=...)`.
  void pretty_print(std::ostream& stream) const override {
    stream << "torchrev::AffineBlock(min_scale=" << this->options.min_scale();
    if (this->options.split_dim() != AffineBlockOptions().split_dim()) {
      stream << ", split_dim=" << this->options.split_dim();
    }
    stream << ")";
  }
};

/// Holder of an `AffineBlockImpl<F, G>`:
///
/// ```
/// // Halves of 4 features; F and G return 8: raw scale and shift.
/// torchrev::AffineBlock<torch::nn::Linear, torch::nn::Linear> block(
///     torch::nn::Linear(4, 8), torch::nn::Linear(4, 8));
/// ```
template <class F, class G>
class AffineBlock : public torch::nn::ModuleHolder<AffineBlockImpl<F, G>> {
 public:
  using torch::nn::ModuleHolder<AffineBlockImpl<F, G>>::ModuleHolder;
  using Impl = AffineBlockImpl<F, G>;
};

} // namespace torchrev
