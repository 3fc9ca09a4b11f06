#pragma once

#include <torchrev/affine_block.h>
#include <torchrev/autograd/rev_block_function.h>
#include <torchrev/coupling_block.h>
#include <torchrev/detail/concurrent_use.h>
#include <torchrev/invertible_layers.h>
#include <torchrev/invertible_module.h>
#include <torchrev/rev_block.h>

#include <torch/arg.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include <c10/util/Type.h>

#include <cstddef>
#include <deque>
#include <memory>
#include <ostream>
#include <string>
#include <type_traits>
#include <typeinfo>
#include <utility>
#include <vector>

namespace torchrev {

/// Options for a `RevSequential` stage.
///
/// Example:
/// ```
/// torchrev::RevSequential stage(
///     torchrev::RevSequentialOptions().preserve_rng_state(false));
/// ```
struct RevSequentialOptions {
  /// Snapshot the random generators (CPU, and CUDA for CUDA inputs) before
  /// each F and G in forward and replay them in the backward recompute, so
  /// dropout masks match the forward's exactly and the caller's RNG stream is
  /// left untouched. Costs two small snapshots per block; set false only when
  /// no block draws random numbers.
  TORCH_ARG(bool, preserve_rng_state) = true;

  /// Bounded drift: keep the activation after every `anchor_every`-th block
  /// (0, the default: keep none but the stage output). The backward
  /// reconstructs each block's input from its output, so rounding errors
  /// compound over the blocks between two kept activations; with anchors they
  /// compound over at most `anchor_every` blocks, for depth / anchor_every
  /// more activations in memory. Worth it for deep stages in float32 or
  /// lower precision whose blocks amplify errors (see the README's drift
  /// table for measured errors).
  ///
  /// Example: `RevSequentialOptions().anchor_every(16)`.
  TORCH_ARG(int64_t, anchor_every) = 0;

  /// Drift diagnostics: in training, keep every member's output as the
  /// forward computed it, and in backward measure how far each reconstructed
  /// member input is from it; `drift()` reports the last backward's errors
  /// and the worst member. This keeps all activations, like plain autograd:
  /// turn it on to decide whether a deep, low-precision stage needs anchors
  /// (or checkpointing), not for training runs. Gradients are unchanged.
  TORCH_ARG(bool, track_drift) = false;
};

/// A stage of reversible blocks trained without storing activations.
///
/// In training (grad mode on, and the input or a parameter requires grad) each
/// block runs as one `autograd::RevBlockFunction` node: forward keeps only the
/// stage output, backward reconstructs each block's input from its output.
/// Activation memory is then that of about one block, whatever the depth, for
/// about 4/3 of the compute. Under `torch::NoGradGuard`, or when nothing
/// requires grad, it is a plain forward that saves nothing.
///
/// A stage holds any `InvertibleModule`: additive (`RevBlock`) and affine
/// (`AffineBlock`) coupling blocks, the invertible layers `SpaceToDepth` and
/// `ChannelZeroPad`, and modules of your own with `forward` and `inverse`
/// (see `InvertibleModule` for the contract). The guarantees above hold for
/// all of them; a member that is not a coupling block costs one `inverse`
/// and one `forward` more in backward. `inverse()` of a stage inverts every
/// member, last first.
///
/// ```
/// torchrev::RevSequential stage;
/// for (int i = 0; i < 16; ++i) {
///   stage->push_back(torchrev::RevBlock<torch::nn::Sequential,
///                                       torch::nn::Sequential>(
///       torch::nn::Sequential(torch::nn::Linear(4, 4), torch::nn::Tanh()),
///       torch::nn::Sequential(torch::nn::Linear(4, 4), torch::nn::Tanh())));
/// }
/// auto y = stage(torch::randn({32, 8}, torch::requires_grad()));
/// ```
///
/// Blocks are registered as submodules "0", "1", ..., so a stage can be saved
/// and loaded with `torch::save` / `torch::load` and embedded in any model.
class RevSequentialImpl : public torch::nn::Cloneable<RevSequentialImpl> {
 public:
  RevSequentialImpl() = default;

  explicit RevSequentialImpl(RevSequentialOptions options_)
      : options(std::move(options_)) {}

  /// Constructs the stage from members: module holders (such as
  /// `RevBlock<F, G>` or `SpaceToDepth`) or `std::shared_ptr`s of
  /// `InvertibleModule` subclasses.
  template <
      typename First,
      typename... Rest,
      typename = std::enable_if_t<
          !std::is_same<std::decay_t<First>, RevSequentialOptions>::value &&
          !std::is_base_of<RevSequentialImpl, std::decay_t<First>>::value>>
  explicit RevSequentialImpl(First&& first, Rest&&... rest) {
    push_back(std::forward<First>(first));
    (push_back(std::forward<Rest>(rest)), ...);
  }

  /// Constructs the stage with options, then blocks.
  template <typename... Blocks>
  explicit RevSequentialImpl(RevSequentialOptions options_, Blocks&&... blocks)
      : options(std::move(options_)) {
    (push_back(std::forward<Blocks>(blocks)), ...);
  }

  /// Appends a member held by a module holder, e.g. a `RevBlock<F, G>`, an
  /// `AffineBlock<F, G>`, a `SpaceToDepth`, or a holder declared with
  /// `TORCH_MODULE` around an `InvertibleModule` subclass.
  template <typename M>
  void push_back(const torch::nn::ModuleHolder<M>& block) {
    push_back(block.ptr());
  }

  /// Appends a member given as a shared pointer to an `InvertibleModule`
  /// subclass.
  template <typename T>
  void push_back(std::shared_ptr<T> block) {
    static_assert(
        std::is_base_of<InvertibleModule, T>::value,
        "torchrev::RevSequential holds invertible modules only: the type "
        "must derive from torchrev::InvertibleModule (for example "
        "torchrev::RevBlockBase)");
    TORCH_CHECK(
        block != nullptr,
        "torchrev::RevSequential::push_back: expected a block, got a null "
        "pointer");
    register_module(std::to_string(blocks_.size()), block);
    blocks_.push_back(
        std::static_pointer_cast<InvertibleModule>(std::move(block)));
  }

  /// Runs the stage; see the class comment for when activations are stored.
  torch::Tensor forward(const torch::Tensor& x) {
    return run(x);
  }

  /// Runs the stage as `forward` does, but takes the input over: the stage
  /// drops its handle to `x` once the first member has read it, so that
  /// the input's memory is released then, rather than when the stage
  /// returns, if the caller holds no other handle (pass a temporary, or
  /// `std::move` yours). `run_stage` runs a stage this way.
  torch::Tensor forward_consuming(torch::Tensor x) {
    return run(std::move(x));
  }

 private:
  torch::Tensor run(torch::Tensor x) {
    TORCH_CHECK(
        !blocks_.empty(),
        "torchrev::RevSequential: cannot run an empty stage; push_back at "
        "least one reversible block first");
    TORCH_CHECK(
        x.defined(),
        "torchrev::RevSequential: expected a defined input tensor, but got an "
        "undefined one");

    if (auto* audit = detail::current_audit()) {
      audit->record(
          this,
          "torchrev::RevSequential, " + std::to_string(blocks_.size()) +
              " blocks",
          /*stores_activations=*/false);
    }

    // Another thread must not recompute these blocks meanwhile (see
    // detail/concurrent_use.h).
    std::deque<detail::BlockUse> uses;
    for (size_t i = 0; i < blocks_.size(); ++i) {
      uses.emplace_back(
          blocks_[i].get(), detail::BlockUse::Kind::kForward, block_name(i));
    }

    std::vector<std::vector<torch::Tensor>> params;
    params.reserve(blocks_.size());
    bool any_param = false;
    for (const auto& block : blocks_) {
      params.push_back(detail::trainable_parameters(*block));
      any_param = any_param || !params.back().empty();
    }

    const bool train =
        torch::GradMode::is_enabled() && (x.requires_grad() || any_param);
    if (!train) {
      torch::Tensor y = std::move(x);
      for (size_t i = 0; i < blocks_.size(); ++i) {
        auto* coupling = dynamic_cast<CouplingBlockBase*>(blocks_[i].get());
        y = coupling != nullptr
            ? detail::forward_checked(*coupling, y, block_name(i))
            : detail::checked_forward(*blocks_[i], y, block_name(i));
      }
      return y;
    }

    // One autograd node per block, chained; see autograd/rev_block_function.h.
    auto state = c10::make_intrusive<autograd::RevStageState>();
    state->blocks = blocks_;
    state->names.reserve(blocks_.size());
    for (size_t i = 0; i < blocks_.size(); ++i) {
      state->names.push_back(block_name(i));
    }
    state->preserve_rng_state = options.preserve_rng_state();
    TORCH_CHECK(
        options.anchor_every() >= 0,
        "torchrev::RevSequential: anchor_every must be 0 (no anchors) or "
        "positive, but got ",
        options.anchor_every());
    state->anchor_every = options.anchor_every();
    drift_.reset();
    if (options.track_drift()) {
      state->drift = std::make_shared<DriftReport>();
      drift_ = state->drift;
    }
    state->resize();
    torch::autograd::variable_list h{std::move(x)};
    for (size_t i = 0; i < blocks_.size(); ++i) {
      h = autograd::RevBlockFunction::apply(
          state,
          static_cast<int64_t>(i),
          torch::TensorList(h),
          torch::TensorList(params[i]));
    }
    return h[0];
  }

 public:
  /// With `options.track_drift`, what the first backward of the last
  /// training forward's graph measured (every error -1 until it has run;
  /// an empty report without the option).
  DriftReport drift() const {
    return drift_ ? *drift_ : DriftReport();
  }

  /// Reconstructs the stage input from its output, last block first. Exact up
  /// to rounding for deterministic blocks; updates no running statistics.
  torch::Tensor inverse(const torch::Tensor& y) {
    TORCH_CHECK(
        !blocks_.empty(),
        "torchrev::RevSequential: cannot invert an empty stage");
    torch::Tensor x = y;
    for (size_t i = blocks_.size(); i-- > 0;) {
      auto* coupling = dynamic_cast<CouplingBlockBase*>(blocks_[i].get());
      if (coupling != nullptr) {
        x = detail::inverse_checked(*coupling, x, block_name(i));
      } else {
        detail::RecomputeGuard recompute(*blocks_[i]);
        x = detail::checked_inverse(*blocks_[i], x, block_name(i));
      }
    }
    return x;
  }

  /// The number of blocks.
  size_t size() const noexcept {
    return blocks_.size();
  }

  /// True when the stage holds no block.
  bool is_empty() const noexcept {
    return blocks_.empty();
  }

  /// The member at `index`, as the base class.
  std::shared_ptr<InvertibleModule> ptr(size_t index) const {
    check_index(index);
    return blocks_[index];
  }

  /// The block at `index`, cast to `T` (nullptr if it is not a `T`).
  template <typename T>
  std::shared_ptr<T> ptr(size_t index) const {
    static_assert(
        std::is_base_of<InvertibleModule, T>::value,
        "T must derive from torchrev::InvertibleModule");
    return std::dynamic_pointer_cast<T>(ptr(index));
  }

  /// The member at `index`, cast to `T`; an error names both types if it is
  /// not a `T` (like `torch::nn::Sequential::at`).
  template <typename T>
  T& at(size_t index) const {
    static_assert(
        std::is_base_of<InvertibleModule, T>::value,
        "T must derive from torchrev::InvertibleModule");
    auto member = ptr(index);
    auto* cast = dynamic_cast<T*>(member.get());
    TORCH_CHECK(
        cast != nullptr,
        "torchrev::RevSequential: could not cast member ",
        index,
        " (",
        member->name(),
        ") to type ",
        c10::demangle(typeid(T).name()));
    return *cast;
  }

  /// The member at `index`, as the base class (like
  /// `torch::nn::Sequential::operator[]`).
  std::shared_ptr<InvertibleModule> operator[](size_t index) const {
    return ptr(index);
  }

  /// Iterators over the members, each a
  /// `std::shared_ptr<InvertibleModule>`.
  using ConstIterator =
      std::vector<std::shared_ptr<InvertibleModule>>::const_iterator;
  ConstIterator begin() const {
    return blocks_.begin();
  }
  ConstIterator end() const {
    return blocks_.end();
  }

  /// Deep copy: clones every block (each block type must implement clone()).
  std::shared_ptr<torch::nn::Module> clone(
      const torch::optional<torch::Device>& device =
          torch::nullopt) const override {
    auto copy = std::make_shared<RevSequentialImpl>(options);
    for (const auto& block : blocks_) {
      auto cloned =
          std::dynamic_pointer_cast<InvertibleModule>(block->clone(device));
      TORCH_CHECK(
          cloned != nullptr,
          "torchrev::RevSequential::clone: clone() of ",
          block->name(),
          " did not return an InvertibleModule");
      copy->push_back(std::move(cloned));
    }
    return copy;
  }

  /// A stage has no parameters of its own.
  void reset() override {}

  /// Pretty prints `torchrev::RevSequential`, with options that differ from
  /// the defaults.
  void pretty_print(std::ostream& stream) const override {
    stream << "torchrev::RevSequential";
    const RevSequentialOptions defaults;
    const char* separator = "(";
    if (options.preserve_rng_state() != defaults.preserve_rng_state()) {
      stream << separator << "preserve_rng_state=false";
      separator = ", ";
    }
    if (options.anchor_every() != defaults.anchor_every()) {
      stream << separator << "anchor_every=" << options.anchor_every();
      separator = ", ";
    }
    if (options.track_drift()) {
      stream << separator << "track_drift=true";
      separator = ", ";
    }
    if (separator[0] == ',') {
      stream << ")";
    }
  }

  /// The options this stage was constructed with.
  RevSequentialOptions options;

 private:
  void check_index(size_t index) const {
    TORCH_CHECK(
        index < blocks_.size(),
        "torchrev::RevSequential: index ",
        index,
        " is out of range for a stage of ",
        blocks_.size(),
        " blocks");
  }

  std::string block_name(size_t index) const {
    return "torchrev::RevSequential block " + std::to_string(index) + " (" +
        blocks_[index]->name() + ")";
  }

  std::vector<std::shared_ptr<InvertibleModule>> blocks_;
  std::shared_ptr<DriftReport> drift_;
};

/// Holder of a `RevSequentialImpl`; see there.
TORCH_MODULE(RevSequential);

} // namespace torchrev
