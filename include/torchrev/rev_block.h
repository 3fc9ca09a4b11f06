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
#include <sstream>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

namespace torchrev {

/// Options for a reversible block.
///
/// Example:
/// ```
/// auto block = torchrev::RevBlock<torch::nn::Sequential,
/// torch::nn::Sequential>(
///     f, g, torchrev::RevBlockOptions().split_dim(1));
/// ```
struct RevBlockOptions {
  /// The dimension along which the input is split into the halves (x1, x2)
  /// and the output is joined from (y1, y2). Dimension 1 is the channel
  /// dimension of NCHW images and of (batch, features) inputs.
  TORCH_ARG(int64_t, split_dim) = 1;
};

/// Base class of every reversible residual block.
///
/// A block splits its input x along `options.split_dim()` into halves
/// (x1, x2) and computes
///
///     y1 = x1 + F(x2)
///     y2 = x2 + G(y1)
///
/// which can be inverted exactly:
///
///     x2 = y2 - G(y1)
///     x1 = y1 - F(x2)
///
/// Subclass it and implement `forward_f` and `forward_g` (each must return a
/// tensor of its input's shape) to write your own block:
///
/// ```
/// struct MyBlockImpl : torchrev::RevBlockBase {
///   explicit MyBlockImpl(int64_t half)
///       : f(register_module("f", torch::nn::Linear(half, half))),
///         g(register_module("g", torch::nn::Linear(half, half))) {}
///   torch::Tensor forward_f(const torch::Tensor& x2) override {
///     return torch::tanh(f(x2));
///   }
///   torch::Tensor forward_g(const torch::Tensor& y1) override {
///     return torch::tanh(g(y1));
///   }
///   torch::nn::Linear f, g;
/// };
/// TORCH_MODULE(MyBlock);
/// ```
///
/// Memory is saved only when blocks run inside a `torchrev::RevSequential`,
/// which trains them in one custom autograd Function that keeps no block
/// inputs. A block called on its own (`block(x)`, or inside a
/// `torch::nn::Sequential`) computes the same values and gradients with plain
/// autograd, and so stores its activations like any other module.
///
/// To deep-copy a stage (`RevSequential::clone()`), a block must implement
/// `clone()`. Do not derive from both `RevBlockBase` and
/// `torch::nn::Cloneable`: each is a `torch::nn::Module`, and since LibTorch
/// 2.2 `Cloneable` inherits it non-virtually, so the block would have two.
class RevBlockBase : public CouplingBlockBase {
 public:
  explicit RevBlockBase(RevBlockOptions options_ = {})
      : options(std::move(options_)) {
    additive_ = true;
  }

  /// y = x + h.
  torch::Tensor couple(const torch::Tensor& x, const torch::Tensor& h) final {
    return x + h;
  }

  /// x = y - h.
  torch::Tensor uncouple(const torch::Tensor& y, const torch::Tensor& h) final {
    return y - h;
  }

  /// `options.split_dim()`.
  int64_t configured_split_dim() const final {
    return options.split_dim();
  }

  /// The options this block was constructed with.
  RevBlockOptions options;
};

/// A reversible block whose F and G are modules of types `F` and `G` (module
/// holders such as `torch::nn::Sequential`, each with a
/// `forward(const torch::Tensor&)`), held in its public members `f` and `g`
/// and registered as submodules "f" and "g"; `clone()` copies them deeply.
/// See `RevBlockBase` for the computation.
template <class F, class G>
class RevBlockImpl
    : public detail::ModulePairImpl<RevBlockImpl<F, G>, RevBlockBase, F, G> {
 public:
  RevBlockImpl(F f_, G g_, RevBlockOptions options_ = {})
      : detail::ModulePairImpl<RevBlockImpl<F, G>, RevBlockBase, F, G>(
            std::move(f_),
            std::move(g_),
            std::move(options_)) {}

  /// Pretty prints `torchrev::RevBlock` and its options that differ from the
  /// defaults.
  void pretty_print(std::ostream& stream) const override {
    stream << "torchrev::RevBlock";
    if (this->options.split_dim() != RevBlockOptions().split_dim()) {
      stream << "(split_dim=" << this->options.split_dim() << ")";
    }
  }
};

/// Holder of a `RevBlockImpl<F, G>`, as `TORCH_MODULE` would declare it:
///
/// ```
/// torch::nn::Sequential f(torch::nn::Linear(4, 4), torch::nn::Tanh());
/// torch::nn::Sequential g(torch::nn::Linear(4, 4), torch::nn::Tanh());
/// torchrev::RevBlock<torch::nn::Sequential, torch::nn::Sequential> block(f,
/// g);
/// ```
template <class F, class G>
class RevBlock : public torch::nn::ModuleHolder<RevBlockImpl<F, G>> {
 public:
  using torch::nn::ModuleHolder<RevBlockImpl<F, G>>::ModuleHolder;
  using Impl = RevBlockImpl<F, G>;
};

} // namespace torchrev
