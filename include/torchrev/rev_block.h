#pragma once

#include <torchrev/activation_audit.h>
#include <torchrev/detail/concurrent_use.h>
#include <torchrev/recompute.h>

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
namespace detail {

/// The parameters of `module` that require grad, in `parameters()` order,
/// each once (a submodule registered twice must not get its gradient twice).
inline std::vector<torch::Tensor> trainable_parameters(
    const torch::nn::Module& module) {
  std::vector<torch::Tensor> params;
  std::unordered_set<const void*> seen;
  for (const auto& p : module.parameters()) {
    if (p.requires_grad() && seen.insert(p.unsafeGetTensorImpl()).second) {
      params.push_back(p);
    }
  }
  return params;
}

} // namespace detail

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
class RevBlockBase : public torch::nn::Module {
 public:
  explicit RevBlockBase(RevBlockOptions options_ = {})
      : options(std::move(options_)) {}

  /// F: the residual function applied to x2; must preserve its input's shape.
  virtual torch::Tensor forward_f(const torch::Tensor& x2) = 0;

  /// G: the residual function applied to y1; must preserve its input's shape.
  virtual torch::Tensor forward_g(const torch::Tensor& y1) = 0;

  /// y = cat(x1 + F(x2), x2 + G(y1)) with plain autograd. Use a
  /// `torchrev::RevSequential` to train without storing activations.
  torch::Tensor forward(const torch::Tensor& x) {
    const auto where = describe();
    if (auto* audit = detail::current_audit()) {
      audit->record(this, where, records_graph(x));
    }
    detail::BlockUse use(this, detail::BlockUse::Kind::kForward, where);
    return forward_checked(x, where);
  }

  /// Reconstructs the block's input from its output: x2 = y2 - G(y1),
  /// x1 = y1 - F(x2). Exact up to floating-point rounding when F and G are
  /// deterministic (use `eval()` or no dropout). Running statistics of
  /// normalisation layers are not updated by an inverse.
  torch::Tensor inverse(const torch::Tensor& y) {
    return inverse_checked(y, describe());
  }

  /// The options this block was constructed with.
  RevBlockOptions options;

  // The methods below are the building blocks that `RevSequential` and its
  // autograd Function use; `where` names the block in error messages.

  /// Checks that `x` can be split into two equal halves along `split_dim`.
  void check_splittable(const torch::Tensor& x, const std::string& where)
      const {
    TORCH_CHECK(
        x.defined(),
        where,
        ": expected a defined input tensor, but got an undefined one");
    TORCH_CHECK(
        x.dim() >= 2,
        where,
        ": expected an input with at least 2 dimensions (batch, channels, "
        "...), but got a ",
        x.dim(),
        "-d tensor of shape ",
        x.sizes());
    const int64_t raw_dim = options.split_dim();
    TORCH_CHECK(
        raw_dim >= -x.dim() && raw_dim < x.dim(),
        where,
        ": split_dim ",
        raw_dim,
        " is out of range for an input with ",
        x.dim(),
        " dimensions (shape ",
        x.sizes(),
        ")");
    const int64_t dim = split_dim(x);
    TORCH_CHECK(
        x.size(dim) % 2 == 0,
        where,
        ": expected an even size along the split dimension ",
        dim,
        " to split the input into two halves, but got size ",
        x.size(dim),
        " (input shape ",
        x.sizes(),
        ")");
  }

  /// The split dimension resolved against `x` (negative values count from
  /// the end).
  int64_t split_dim(const torch::Tensor& x) const {
    const int64_t dim = options.split_dim();
    TORCH_CHECK(
        dim >= -x.dim() && dim < x.dim(),
        "torchrev: split_dim ",
        dim,
        " is out of range for an input with ",
        x.dim(),
        " dimensions");
    return dim < 0 ? dim + x.dim() : dim;
  }

  /// Splits `x` into the halves (x1, x2), each dense in `x`'s memory format.
  /// A half along the channels is a strided view, on which BatchNorm and
  /// convolutions take slow paths and make (and keep) dense copies of their
  /// own; copying once here is faster and, with plain autograd, measured to
  /// use less memory (benchmarks/results).
  /// Both halves are always new tensors, never views of `x` (a half that is
  /// already dense, as with a batch of one, is copied), so that F and G never
  /// see, and can never write to, the caller's tensor.
  std::pair<torch::Tensor, torch::Tensor> split(const torch::Tensor& x) const {
    const auto format = x.suggest_memory_format();
    auto halves = x.chunk(2, split_dim(x));
    const auto dense_copy = [format](const torch::Tensor& half) {
      return half.is_contiguous(format) ? half.clone(format)
                                        : half.contiguous(format);
    };
    return {dense_copy(halves[0]), dense_copy(halves[1])};
  }

  /// Joins (a, b) along the split dimension.
  torch::Tensor merge(const torch::Tensor& a, const torch::Tensor& b) const {
    return torch::cat({a, b}, split_dim(a));
  }

  /// Calls F and checks that it preserved the shape, dtype and device of its
  /// input. An error raised inside F gets a line naming the block.
  torch::Tensor checked_f(const torch::Tensor& x2, const std::string& where) {
    return checked_call(
        [this](const torch::Tensor& in) { return forward_f(in); },
        x2,
        "F",
        where);
  }

  /// Calls G and checks that it preserved the shape, dtype and device of its
  /// input. An error raised inside G gets a line naming the block.
  torch::Tensor checked_g(const torch::Tensor& y1, const std::string& where) {
    return checked_call(
        [this](const torch::Tensor& in) { return forward_g(in); },
        y1,
        "G",
        where);
  }

  /// The forward computation with input checks.
  torch::Tensor forward_checked(
      const torch::Tensor& x,
      const std::string& where) {
    check_splittable(x, where);
    auto [x1, x2] = split(x);
    auto y1 = x1 + checked_f(x2, where);
    auto y2 = x2 + checked_g(y1, where);
    return merge(y1, y2);
  }

  /// The inverse computation with input checks. Normalisation layers do not
  /// update their running statistics.
  torch::Tensor inverse_checked(
      const torch::Tensor& y,
      const std::string& where) {
    check_splittable(y, where);
    detail::BlockUse exclusive(this, detail::BlockUse::Kind::kRecompute, where);
    detail::RecomputeGuard recompute(*this);
    auto [y1, y2] = split(y);
    auto x2 = y2 - checked_g(y1, where);
    auto x1 = y1 - checked_f(x2, where);
    return merge(x1, x2);
  }

  /// Whether running on `x` now builds an autograd graph that keeps this
  /// block's activations (grad mode on, something requires grad, and not a
  /// torchrev recompute).
  bool records_graph(const torch::Tensor& x) const {
    if (!torch::GradMode::is_enabled() || is_recomputing()) {
      return false;
    }
    if (x.requires_grad()) {
      return true;
    }
    for (const auto& p : parameters()) {
      if (p.requires_grad()) {
        return true;
      }
    }
    return false;
  }

  /// "torchrev::RevBlock (<type>)": how errors name a block on its own.
  std::string describe() const {
    return "torchrev::RevBlock (" + name() + ")";
  }

 private:
  /// `fn(in)` (F or G, named `which`), with torchrev context on its errors
  /// and its result checked against `in`.
  template <typename Fn>
  static torch::Tensor checked_call(
      Fn&& fn,
      const torch::Tensor& in,
      const char* which,
      const std::string& where) {
    torch::Tensor out;
    const auto version = in._version();
    try {
      out = fn(in);
    } catch (c10::Error& e) {
      add_block_context(e, in, which, where);
      throw;
    }
    // An in-place op on the input (a ReLU(inplace=true) as the first layer)
    // would change the half the block adds F's or G's output to, silently
    // in a grad-less forward. Every in-place op bumps the version counter.
    TORCH_CHECK(
        in._version() == version,
        where,
        ": ",
        which,
        " modified its input in place (for example a ReLU with "
        "inplace(true) as its first layer); ",
        which,
        "'s input is also the block's other output term, so ",
        which,
        " must leave it unchanged: make that first operation out of place");
    check_residual(out, in, which, where);
    return out;
  }

  static void add_block_context(
      c10::Error& e,
      const torch::Tensor& in,
      const char* which,
      const std::string& where) {
    std::ostringstream context;
    context << "in " << which << " of " << where << ", called on a half of "
            << "shape " << in.sizes() << " (" << which
            << " acts on half the split dimension and must not modify its "
            << "input in place)";
    e.add_context(context.str());
  }

  static void check_residual(
      const torch::Tensor& out,
      const torch::Tensor& in,
      const char* which,
      const std::string& where) {
    TORCH_CHECK(
        out.defined(), where, ": ", which, " returned an undefined tensor");
    TORCH_CHECK(
        out.sizes() == in.sizes(),
        where,
        ": ",
        which,
        " must preserve the shape of its input (a residual function), "
        "expected shape ",
        in.sizes(),
        " but ",
        which,
        " returned shape ",
        out.sizes());
    TORCH_CHECK(
        out.scalar_type() == in.scalar_type() && out.device() == in.device(),
        where,
        ": ",
        which,
        " must return a tensor of its input's dtype and device, expected ",
        in.scalar_type(),
        " on ",
        in.device(),
        " but ",
        which,
        " returned ",
        out.scalar_type(),
        " on ",
        out.device());
  }
};

/// A reversible block whose F and G are modules of types `F` and `G` (module
/// holders such as `torch::nn::Sequential`, each with a
/// `forward(const torch::Tensor&)`). See `RevBlockBase` for the computation.
template <class F, class G>
class RevBlockImpl : public RevBlockBase {
 public:
  RevBlockImpl(F f_, G g_, RevBlockOptions options_ = {})
      : RevBlockBase(std::move(options_)),
        f(register_module("f", std::move(f_))),
        g(register_module("g", std::move(g_))) {}

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
    return std::make_shared<RevBlockImpl>(F(f_copy), G(g_copy), options);
  }

  /// Pretty prints `torchrev::RevBlock` and its options that differ from the
  /// defaults.
  void pretty_print(std::ostream& stream) const override {
    stream << "torchrev::RevBlock";
    if (options.split_dim() != RevBlockOptions().split_dim()) {
      stream << "(split_dim=" << options.split_dim() << ")";
    }
  }

  /// The module computing F(x2).
  F f;
  /// The module computing G(y1).
  G g;
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
