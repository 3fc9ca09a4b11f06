#pragma once

#include <torch/nn/module.h>
#include <torch/types.h>

#include <memory>
#include <type_traits>
#include <utility>

namespace torchrev {
namespace detail {

/// What `RevBlockImpl` and `AffineBlockImpl` share: a coupling block of
/// class `Derived`, whose base `Base` (`RevBlockBase`, `AffineBlockBase`) is
/// constructed from its `options` member's type and declares
/// `forward_f`/`forward_g`, computed by the modules `f` and `g` of holder
/// types `F` and `G` (such as `torch::nn::Sequential`). Registers them as
/// submodules "f" and "g", forwards to them, and clones them deeply.
template <class Derived, class Base, class F, class G>
class ModulePairImpl : public Base {
 public:
  /// The base's options type (`RevBlockOptions`, `AffineBlockOptions`).
  using Options = std::decay_t<decltype(std::declval<Base&>().options)>;

  ModulePairImpl(F f_, G g_, Options options_)
      : Base(std::move(options_)),
        f(this->register_module("f", std::move(f_))),
        g(this->register_module("g", std::move(g_))) {}

  torch::Tensor forward_f(const torch::Tensor& x2) override {
    return f->forward(x2);
  }

  torch::Tensor forward_g(const torch::Tensor& y1) override {
    return g->forward(y1);
  }

  /// Deep copy: clones F and G (and with them their parameters and buffers).
  std::shared_ptr<torch::nn::Module> clone(
      const torch::optional<torch::Device>& device =
          torch::nullopt) const override {
    auto f_copy =
        std::dynamic_pointer_cast<typename F::ContainedType>(f->clone(device));
    auto g_copy =
        std::dynamic_pointer_cast<typename G::ContainedType>(g->clone(device));
    return std::make_shared<Derived>(F(f_copy), G(g_copy), this->options);
  }

  /// The module computing F from x2.
  F f;
  /// The module computing G from y1.
  G g;
};

} // namespace detail
} // namespace torchrev
