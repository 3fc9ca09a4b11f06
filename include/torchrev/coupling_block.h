#pragma once

#include <torchrev/activation_audit.h>
#include <torchrev/detail/concurrent_use.h>
#include <torchrev/invertible_module.h>
#include <torchrev/recompute.h>

#include <torch/nn/module.h>
#include <torch/types.h>

#include <cstdint>
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

class RevBlockBase;

/// Base class of every coupling block: a block that splits its input x along
/// a dimension into halves (x1, x2) and computes
///
///     y1 = couple(x1, F(x2))
///     y2 = couple(x2, G(y1))
///
/// where `couple(x, h)` is invertible in x for every h:
///
///     x2 = uncouple(y2, G(y1))
///     x1 = uncouple(y1, F(x2))
///
/// `RevBlockBase` is the additive coupling (couple(x, h) = x + h) of the
/// RevNet paper; `AffineBlockBase` the affine one of Glow. To define your own
/// coupling, subclass this class and implement `forward_f`, `forward_g`,
/// `couple` and `uncouple`; the stage's backward then needs no code of yours:
/// it recomputes F (or G) once, reconstructs the half with `uncouple`, and
/// differentiates `couple` with autograd.
///
/// ```
/// // y = x * exp(tanh(h)): a bounded multiplicative coupling.
/// struct ScaleBlockImpl : torchrev::CouplingBlockBase {
///   explicit ScaleBlockImpl(int64_t half)
///       : f(register_module("f", torch::nn::Linear(half, half))),
///         g(register_module("g", torch::nn::Linear(half, half))) {}
///   torch::Tensor forward_f(const torch::Tensor& x2) override {
///     return f(x2);
///   }
///   torch::Tensor forward_g(const torch::Tensor& y1) override {
///     return g(y1);
///   }
///   torch::Tensor couple(const torch::Tensor& x, const torch::Tensor& h)
///       override {
///     return x * torch::tanh(h).exp();
///   }
///   torch::Tensor uncouple(const torch::Tensor& y, const torch::Tensor& h)
///       override {
///     return y * (-torch::tanh(h)).exp();
///   }
///   torch::nn::Linear f, g;
/// };
/// ```
///
/// `couple` and `uncouple` must compute only from their arguments (no
/// parameters: put those into F and G) and must not modify them in place.
class CouplingBlockBase : public InvertibleModule {
 public:
  /// F: the function of x2 that `couple` combines with x1.
  virtual torch::Tensor forward_f(const torch::Tensor& x2) = 0;

  /// G: the function of y1 that `couple` combines with x2.
  virtual torch::Tensor forward_g(const torch::Tensor& y1) = 0;

  /// y = couple(x, h): must return a tensor of x's shape, invertible in x.
  virtual torch::Tensor couple(
      const torch::Tensor& x,
      const torch::Tensor& h) = 0;

  /// x = uncouple(y, h), the inverse of `couple` for the same h.
  virtual torch::Tensor uncouple(
      const torch::Tensor& y,
      const torch::Tensor& h) = 0;

  /// The dimension along which the input is split into halves; negative
  /// values count from the end. Dimension 1 (channels) unless overridden.
  virtual int64_t configured_split_dim() const {
    return 1;
  }

  /// y = cat(y1, y2) with plain autograd. Use a `torchrev::RevSequential` to
  /// train without storing activations.
  torch::Tensor forward(const torch::Tensor& x) final {
    const auto where = describe();
    if (auto* audit = detail::current_audit()) {
      audit->record(this, where, records_graph(x));
    }
    detail::BlockUse use(this, detail::BlockUse::Kind::kForward, where);
    return forward_checked(x, where);
  }

  /// Reconstructs the block's input from its output: x2 = uncouple(y2,
  /// G(y1)), x1 = uncouple(y1, F(x2)). Exact up to floating-point rounding
  /// when F and G are deterministic (use `eval()` or no dropout). Running
  /// statistics of normalisation layers are not updated by an inverse.
  torch::Tensor inverse(const torch::Tensor& y) final {
    return inverse_checked(y, describe());
  }

  /// True for additive couplings (`RevBlockBase`), whose backward needs no
  /// recompute of the coupling itself.
  bool is_additive() const noexcept {
    return additive_;
  }

  // The methods below are the building blocks that `RevSequential` and its
  // autograd Function use; `where` names the block in error messages.

  /// Checks that `x` can be split into two equal halves along the split
  /// dimension.
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
    const int64_t raw_dim = configured_split_dim();
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
    const int64_t dim = configured_split_dim();
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

  /// Calls F and checks its result (for an additive coupling: that it
  /// preserved the shape, dtype and device of its input). An error raised
  /// inside F gets a line naming the block.
  torch::Tensor checked_f(const torch::Tensor& x2, const std::string& where) {
    return checked_call(
        [this](const torch::Tensor& in) { return forward_f(in); },
        x2,
        "F",
        where);
  }

  /// Calls G and checks its result, like `checked_f`.
  torch::Tensor checked_g(const torch::Tensor& y1, const std::string& where) {
    return checked_call(
        [this](const torch::Tensor& in) { return forward_g(in); },
        y1,
        "G",
        where);
  }

  /// `couple(x, h)`, checked to leave its arguments unchanged and to have
  /// x's shape, dtype and device.
  torch::Tensor checked_couple(
      const torch::Tensor& x,
      const torch::Tensor& h,
      const std::string& where) {
    const auto versions = std::make_pair(x._version(), h._version());
    auto y = couple(x, h);
    check_unchanged(x, h, versions, "couple", where);
    check_same_kind(y, x, "couple", "its input half", where);
    return y;
  }

  /// `uncouple(y, h)`, checked like `checked_couple` (the output half may be
  /// the stage output the caller holds).
  torch::Tensor checked_uncouple(
      const torch::Tensor& y,
      const torch::Tensor& h,
      const std::string& where) {
    const auto versions = std::make_pair(y._version(), h._version());
    auto x = uncouple(y, h);
    check_unchanged(y, h, versions, "uncouple", where);
    check_same_kind(x, y, "uncouple", "its output half", where);
    return x;
  }

  /// The forward computation with input checks.
  torch::Tensor forward_checked(
      const torch::Tensor& x,
      const std::string& where) {
    check_splittable(x, where);
    auto [x1, x2] = split(x);
    auto y1 = checked_couple(x1, checked_f(x2, where), where);
    auto y2 = checked_couple(x2, checked_g(y1, where), where);
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
    auto x2 = checked_uncouple(y2, checked_g(y1, where), where);
    auto x1 = checked_uncouple(y1, checked_f(x2, where), where);
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

  /// "torchrev::RevBlock (<type>)" for an additive block, "torchrev
  /// coupling block (<type>)" for others: how errors name a block on its own.
  std::string describe() const {
    return (additive_ ? "torchrev::RevBlock (" : "torchrev coupling block (") +
        name() + ")";
  }

 private:
  friend class RevBlockBase;

  /// Set by `RevBlockBase`, whose `couple` and `uncouple` are final.
  bool additive_ = false;

  /// `fn(in)` (F or G, named `which`), with torchrev context on its errors
  /// and its result checked against `in`.
  template <typename Fn>
  torch::Tensor checked_call(
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
    // would change the half the block couples F's or G's output with,
    // silently in a grad-less forward. Every in-place op bumps the version
    // counter.
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
    TORCH_CHECK(
        out.defined(), where, ": ", which, " returned an undefined tensor");
    if (additive_) {
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
    }
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

  static void check_unchanged(
      const torch::Tensor& a,
      const torch::Tensor& h,
      std::pair<uint32_t, uint32_t> versions,
      const char* which,
      const std::string& where) {
    TORCH_CHECK(
        a._version() == versions.first && h._version() == versions.second,
        where,
        ": ",
        which,
        " modified an argument in place; a coupling must compute its result "
        "out of place");
  }

  static void check_same_kind(
      const torch::Tensor& out,
      const torch::Tensor& in,
      const char* which,
      const char* what,
      const std::string& where) {
    TORCH_CHECK(
        out.defined() && out.sizes() == in.sizes() &&
            out.scalar_type() == in.scalar_type() &&
            out.device() == in.device(),
        where,
        ": ",
        which,
        " must return a tensor of the shape, dtype and device of ",
        what,
        ", expected shape ",
        in.sizes(),
        " (",
        in.scalar_type(),
        " on ",
        in.device(),
        ") but got ",
        out.defined() ? c10::str(out.sizes()) : std::string("an undefined"),
        out.defined()
            ? c10::str(" (", out.scalar_type(), " on ", out.device(), ")")
            : std::string(" tensor"));
  }
};

} // namespace torchrev
