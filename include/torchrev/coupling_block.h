#pragma once

#include <torchrev/activation_audit.h>
#include <torchrev/detail/concurrent_use.h>
#include <torchrev/detail/dims.h>
#include <torchrev/detail/unique_tensors.h>
#include <torchrev/invertible_module.h>
#include <torchrev/recompute.h>

#include <torch/nn/module.h>
#include <torch/types.h>

#include <cstdint>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace torchrev {

class CouplingBlockBase;
class RevBlockBase;

namespace detail {

/// True for additive couplings (`RevBlockBase`), whose backward needs no
/// recompute of the coupling itself.
bool is_additive(const CouplingBlockBase& block) noexcept;

} // namespace detail

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
  torch::Tensor forward(const torch::Tensor& x) final;

  /// Reconstructs the block's input from its output: x2 = uncouple(y2,
  /// G(y1)), x1 = uncouple(y1, F(x2)). Exact up to floating-point rounding
  /// when F and G are deterministic (use `eval()` or no dropout). Running
  /// statistics of normalisation layers are not updated by an inverse.
  torch::Tensor inverse(const torch::Tensor& y) final;

 private:
  friend class RevBlockBase;
  friend bool detail::is_additive(const CouplingBlockBase& block) noexcept;

  /// Set by `RevBlockBase`, whose `couple` and `uncouple` are final.
  bool additive_ = false;
};

namespace detail {

// The steps a stage and its autograd Function run a coupling block by; `where`
// names the block in error messages.

inline bool is_additive(const CouplingBlockBase& block) noexcept {
  return block.additive_;
}

/// "torchrev::RevBlock (<type>)" for an additive block, "torchrev
/// coupling block (<type>)" for others: how errors name a block on its own.
inline std::string describe(const CouplingBlockBase& block) {
  return (is_additive(block) ? "torchrev::RevBlock ("
                             : "torchrev coupling block (") +
      block.name() + ")";
}

/// The block's split dimension resolved against `x` (negative values count
/// from the end).
inline int64_t resolved_split_dim(
    const CouplingBlockBase& block,
    const torch::Tensor& x) {
  return resolve_dim(block.configured_split_dim(), x, "split_dim", "torchrev");
}

/// Checks that `x` can be split into two equal halves along the block's
/// split dimension.
inline void check_splittable(
    const CouplingBlockBase& block,
    const torch::Tensor& x,
    const std::string& where) {
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
  const int64_t dim =
      resolve_dim(block.configured_split_dim(), x, "split_dim", where);
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

/// Splits `x` into the halves (x1, x2), each dense in `x`'s memory format.
/// A half along the channels is a strided view, on which BatchNorm and
/// convolutions take slow paths and make (and keep) dense copies of their
/// own; copying once here is faster and, with plain autograd, measured to
/// use less memory (benchmarks/results).
/// Both halves are always new tensors, never views of `x` (a half that is
/// already dense, as with a batch of one, is copied), so that F and G never
/// see, and can never write to, the caller's tensor.
inline std::pair<torch::Tensor, torch::Tensor> split_halves(
    const CouplingBlockBase& block,
    const torch::Tensor& x) {
  const auto format = x.suggest_memory_format();
  auto halves = x.chunk(2, resolved_split_dim(block, x));
  const auto dense_copy = [format](const torch::Tensor& half) {
    return half.is_contiguous(format) ? half.clone(format)
                                      : half.contiguous(format);
  };
  return {dense_copy(halves[0]), dense_copy(halves[1])};
}

/// Joins (a, b) along the block's split dimension.
inline torch::Tensor merge_halves(
    const CouplingBlockBase& block,
    const torch::Tensor& a,
    const torch::Tensor& b) {
  return torch::cat({a, b}, resolved_split_dim(block, a));
}

inline void add_block_context(
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

/// `fn(in)` (F or G of `block`, named `which`), with torchrev context on its
/// errors and its result checked against `in` (for an additive coupling:
/// that it preserved the shape, dtype and device of its input).
template <typename Fn>
torch::Tensor checked_residual(
    const CouplingBlockBase& block,
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
  if (is_additive(block)) {
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

/// F(x2), checked as `checked_residual` says. An error raised inside F gets
/// a line naming the block.
inline torch::Tensor checked_f(
    CouplingBlockBase& block,
    const torch::Tensor& x2,
    const std::string& where) {
  return checked_residual(
      block,
      [&block](const torch::Tensor& in) { return block.forward_f(in); },
      x2,
      "F",
      where);
}

/// G(y1), checked like `checked_f`.
inline torch::Tensor checked_g(
    CouplingBlockBase& block,
    const torch::Tensor& y1,
    const std::string& where) {
  return checked_residual(
      block,
      [&block](const torch::Tensor& in) { return block.forward_g(in); },
      y1,
      "G",
      where);
}

inline void check_unchanged(
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

inline void check_same_kind(
    const torch::Tensor& out,
    const torch::Tensor& in,
    const char* which,
    const char* what,
    const std::string& where) {
  TORCH_CHECK(
      out.defined() && out.sizes() == in.sizes() &&
          out.scalar_type() == in.scalar_type() && out.device() == in.device(),
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

/// `block.couple(x, h)`, checked to leave its arguments unchanged and to
/// have x's shape, dtype and device.
inline torch::Tensor checked_couple(
    CouplingBlockBase& block,
    const torch::Tensor& x,
    const torch::Tensor& h,
    const std::string& where) {
  const auto versions = std::make_pair(x._version(), h._version());
  auto y = block.couple(x, h);
  check_unchanged(x, h, versions, "couple", where);
  check_same_kind(y, x, "couple", "its input half", where);
  return y;
}

/// `block.uncouple(y, h)`, checked like `checked_couple` (the output half
/// may be the stage output the caller holds).
inline torch::Tensor checked_uncouple(
    CouplingBlockBase& block,
    const torch::Tensor& y,
    const torch::Tensor& h,
    const std::string& where) {
  const auto versions = std::make_pair(y._version(), h._version());
  auto x = block.uncouple(y, h);
  check_unchanged(y, h, versions, "uncouple", where);
  check_same_kind(x, y, "uncouple", "its output half", where);
  return x;
}

/// The block's forward computation with input checks.
inline torch::Tensor forward_checked(
    CouplingBlockBase& block,
    const torch::Tensor& x,
    const std::string& where) {
  check_splittable(block, x, where);
  auto [x1, x2] = split_halves(block, x);
  auto y1 = checked_couple(block, x1, checked_f(block, x2, where), where);
  auto y2 = checked_couple(block, x2, checked_g(block, y1, where), where);
  return merge_halves(block, y1, y2);
}

/// The block's inverse computation with input checks. Normalisation layers
/// do not update their running statistics.
inline torch::Tensor inverse_checked(
    CouplingBlockBase& block,
    const torch::Tensor& y,
    const std::string& where) {
  check_splittable(block, y, where);
  BlockUse exclusive(&block, BlockUse::Kind::kRecompute, where);
  RecomputeGuard recompute(block);
  auto [y1, y2] = split_halves(block, y);
  auto x2 = checked_uncouple(block, y2, checked_g(block, y1, where), where);
  auto x1 = checked_uncouple(block, y1, checked_f(block, x2, where), where);
  return merge_halves(block, x1, x2);
}

/// Whether running `block` on `x` now builds an autograd graph that keeps
/// its activations (grad mode on, something requires grad, and not a
/// torchrev recompute).
inline bool records_graph(
    const CouplingBlockBase& block,
    const torch::Tensor& x) {
  if (!torch::GradMode::is_enabled() || is_recomputing()) {
    return false;
  }
  if (x.requires_grad()) {
    return true;
  }
  for (const auto& p : block.parameters()) {
    if (p.requires_grad()) {
      return true;
    }
  }
  return false;
}

} // namespace detail

inline torch::Tensor CouplingBlockBase::forward(const torch::Tensor& x) {
  const auto where = detail::describe(*this);
  if (auto* audit = detail::current_audit()) {
    audit->record(this, where, detail::records_graph(*this, x));
  }
  detail::BlockUse use(this, detail::BlockUse::Kind::kForward, where);
  return detail::forward_checked(*this, x, where);
}

inline torch::Tensor CouplingBlockBase::inverse(const torch::Tensor& y) {
  return detail::inverse_checked(*this, y, detail::describe(*this));
}

} // namespace torchrev
