#pragma once

// check_block / check_stage: does a user's block train correctly in a
// reversible stage?
//
// A block is correct under reversible training when recomputing it in
// backward gives what its forward gave: the same random numbers (drawn from
// LibTorch's default generator, which the stage replays), no state that the
// forward changes and then reads, no writes into its inputs, and an exact
// inverse. Each mistake makes the reversible gradients differ from plain
// autograd's, usually silently. The checker runs both on deep copies, in
// float64, and compares everything that can differ.

#include <torchrev/detail/rng_state.h>
#include <torchrev/invertible_module.h>
#include <torchrev/rev_sequential.h>

#include <torch/arg.h>
#include <torch/nn/module.h>
#include <torch/types.h>
#include <torch/utils.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <exception>
#include <functional>
#include <iomanip>
#include <memory>
#include <mutex>
#include <ostream>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace torchrev {

/// Options of `check_block` and `check_stage`. An error is the relative
/// difference max |reversible - plain| / max |plain| (the absolute
/// difference where plain is all zero).
struct CheckOptions {
  /// The dtype both paths run in. In float64 a correct block agrees to
  /// about 1e-14; the default tolerances leave room for deep stages.
  TORCH_ARG(torch::Dtype, dtype) = torch::kFloat64;
  /// Training mode (dropout active, BatchNorm on batch statistics and
  /// updating its running statistics) or evaluation mode.
  TORCH_ARG(bool, train) = true;
  /// Seed of LibTorch's default generator before each forward, so that both
  /// paths draw the same random numbers.
  TORCH_ARG(uint64_t, seed) = 0;
  /// Tolerance of the outputs, the running statistics and the repeated
  /// forward.
  TORCH_ARG(double, forward_tolerance) = 1e-10;
  /// Tolerance of the input gradient and of every parameter gradient.
  TORCH_ARG(double, gradient_tolerance) = 1e-8;
  /// Tolerance of inverse(forward(x)) against x.
  TORCH_ARG(double, reconstruction_tolerance) = 1e-8;
};

/// One comparison made by the checker.
struct CheckResult {
  /// The stage member it concerns ("member 2 (MyBlockImpl)"; `check_block`
  /// checks its block as member 0), or "stage" for the whole stage of more
  /// than one member.
  std::string where;
  /// What was compared: "forward", "input gradient", "gradient of f.0.weight",
  /// "buffer g.1.running_mean", "repeated forward", "random numbers",
  /// "reconstruction", or "reversible run"/"plain run" when one threw.
  std::string what;
  /// The relative error (0 for checks that do not measure one).
  double error = 0.0;
  double tolerance = 0.0;
  bool passed = true;
  /// Why it failed and what usually causes it; or a remark.
  std::string detail;
};

/// What `check_block` or `check_stage` found.
class CheckReport {
 public:
  /// True when every comparison passed.
  bool passed() const {
    return first_failure() == nullptr;
  }

  /// The first failing comparison (members in stage order before the whole
  /// stage), or nullptr.
  const CheckResult* first_failure() const {
    for (const auto& r : results) {
      if (!r.passed) {
        return &r;
      }
    }
    return nullptr;
  }

  /// A table of every comparison, the first failure named on top.
  std::string str() const {
    std::ostringstream out;
    const CheckResult* failure = first_failure();
    if (failure == nullptr) {
      out << "torchrev check: passed (" << results.size() << " checks)\n";
    } else {
      out << "torchrev check: FAILED at " << failure->where << ": "
          << failure->what << "\n  " << failure->detail << "\n";
    }
    for (const auto& r : results) {
      out << (r.passed ? "  ok    " : "  FAIL  ") << r.where << ": " << r.what;
      if (r.tolerance > 0.0) {
        out << "  error " << std::setprecision(3) << r.error << " (tolerance "
            << r.tolerance << ")";
      }
      if (!r.detail.empty() && (r.passed || &r != failure)) {
        out << "  " << r.detail;
      }
      out << "\n";
    }
    return out.str();
  }

  std::vector<CheckResult> results;
};

inline std::ostream& operator<<(std::ostream& stream, const CheckReport& r) {
  return stream << r.str();
}

namespace detail {

/// max |a - b| / max |b| (or max |a - b| where b is all zero); an undefined
/// tensor counts as zeros of the other's shape.
inline double check_error(const torch::Tensor& a, const torch::Tensor& b) {
  if (!a.defined() && !b.defined()) {
    return 0.0;
  }
  if (!a.defined() || !b.defined()) {
    const auto& t = a.defined() ? a : b;
    return t.abs().max().item<double>();
  }
  if (a.sizes() != b.sizes()) {
    return INFINITY;
  }
  const auto a64 = a.to(torch::kFloat64), b64 = b.to(torch::kFloat64);
  const auto scale = b64.abs().max().item<double>();
  const auto diff = (a64 - b64).abs().max().item<double>();
  return scale == 0.0 ? diff : diff / scale;
}

/// Seeds the default generators that a computation on `device` draws from
/// (the CPU's, and the device's own), and no others: `check_stage` puts back
/// exactly these.
inline void seed_generators(uint64_t seed, const c10::Device& device) {
  for (auto generator : RngState::generators(device)) {
    std::lock_guard<std::mutex> lock(generator.mutex());
    generator.set_current_seed(seed);
  }
}

inline std::string first_line(const std::exception& e) {
  const auto* c10_error = dynamic_cast<const c10::Error*>(&e);
  std::string message =
      c10_error ? c10_error->what_without_backtrace() : e.what();
  return message.substr(0, message.find('\n'));
}

/// Checks the members of `prototype` (a stage, never modified) as one stage
/// on `input`; appends to `report` under the label `where`.
class StageChecker {
 public:
  StageChecker(
      const RevSequentialImpl& prototype,
      torch::Tensor input,
      const CheckOptions& options,
      std::string where,
      CheckReport& report)
      : prototype_(prototype),
        input_(std::move(input)),
        options_(options),
        where_(std::move(where)),
        report_(report) {}

  void run() {
    Outcome plain, reversible;
    if (!train_step(/*reversible=*/false, plain) ||
        !train_step(/*reversible=*/true, reversible)) {
      return;
    }
    repeated_forward();
    add("forward",
        check_error(reversible.output, plain.output),
        options_.forward_tolerance(),
        "the reversible forward differs from the plain one: the block "
        "depends on state that a previous forward changed, or draws random "
        "numbers from a generator of its own");
    add("input gradient",
        check_error(reversible.input_grad, plain.input_grad),
        options_.gradient_tolerance(),
        "the recompute in backward does not reproduce the forward (random "
        "numbers from a generator of its own, state changed by the forward, "
        "or an inexact inverse)");
    for (size_t i = 0; i < plain.grads.size(); ++i) {
      add("gradient of " + plain.grads[i].first,
          check_error(reversible.grads[i].second, plain.grads[i].second),
          options_.gradient_tolerance(),
          "the recompute in backward does not reproduce the forward");
    }
    for (size_t i = 0; i < plain.buffers.size(); ++i) {
      add("buffer " + plain.buffers[i].first,
          check_error(reversible.buffers[i].second, plain.buffers[i].second),
          options_.forward_tolerance(),
          "a buffer (running statistics) ends up different from one plain "
          "forward's update: it was updated again in backward");
    }
    random_numbers(plain.output);
    reconstruction();
  }

 private:
  struct Outcome {
    torch::Tensor output, input_grad;
    std::vector<std::pair<std::string, torch::Tensor>> grads, buffers;
  };

  std::shared_ptr<RevSequentialImpl> fresh_copy() const {
    auto copy =
        std::dynamic_pointer_cast<RevSequentialImpl>(prototype_.clone());
    copy->to(input_.device(), options_.dtype());
    copy->train(options_.train());
    return copy;
  }

  /// Each member with plain autograd, one after the other.
  static torch::Tensor run_plain(RevSequentialImpl& stage, torch::Tensor x) {
    for (const auto& member : stage) {
      x = member->forward(x);
    }
    return x;
  }

  torch::Tensor run(RevSequentialImpl& stage, const torch::Tensor& x, bool rev)
      const {
    seed_generators(options_.seed(), x.device());
    return rev ? stage.forward(x) : run_plain(stage, x);
  }

  void add(
      std::string what,
      double error,
      double tolerance,
      const std::string& failure_detail) {
    CheckResult r;
    r.where = where_;
    r.what = std::move(what);
    r.error = error;
    r.tolerance = tolerance;
    r.passed = error <= tolerance; // NaN fails
    if (!r.passed) {
      r.detail = failure_detail;
    }
    report_.results.push_back(std::move(r));
  }

  void add_remark(std::string what, bool passed, std::string detail) {
    CheckResult r;
    r.where = where_;
    r.what = std::move(what);
    r.passed = passed;
    r.detail = std::move(detail);
    report_.results.push_back(std::move(r));
  }

  /// Forward, a fixed random projection of the output as the loss, backward.
  /// False (and a failure recorded) if it threw.
  bool train_step(bool reversible, Outcome& out) {
    try {
      auto stage = fresh_copy();
      auto x = input_.detach().to(options_.dtype()).requires_grad_(true);
      out.output = run(*stage, x, reversible);
      seed_generators(options_.seed() + 1, x.device());
      const auto weights = torch::randn_like(out.output);
      (out.output * weights).sum().backward();
      out.output = out.output.detach();
      out.input_grad = x.grad();
      for (const auto& p : stage->named_parameters()) {
        if (p.value().requires_grad()) {
          out.grads.emplace_back(member_name(p.key()), p.value().grad());
        }
      }
      for (const auto& b : stage->named_buffers()) {
        if (b.value().is_floating_point()) {
          out.buffers.emplace_back(
              member_name(b.key()), b.value().detach().clone());
        }
      }
      return true;
    } catch (const std::exception& e) {
      add_remark(
          reversible ? "reversible run" : "plain run",
          false,
          "threw: " + first_line(e));
      return false;
    }
  }

  /// A parameter's or buffer's name as its member calls it, when the
  /// stage checked holds one member ("f.weight", not "0.f.weight").
  std::string member_name(const std::string& key) const {
    if (prototype_.size() == 1 && key.rfind("0.", 0) == 0) {
      return key.substr(2);
    }
    return key;
  }

  /// The same copy twice from the same generator state: a block that
  /// changes state it reads, or draws from its own generator, differs.
  void repeated_forward() {
    torch::NoGradGuard no_grad;
    auto stage = fresh_copy();
    const auto x = input_.detach().to(options_.dtype());
    const auto first = run(*stage, x, false);
    const auto second = run(*stage, x, false);
    add("repeated forward",
        check_error(second, first),
        options_.forward_tolerance(),
        "two forwards of the same module from the same generator state "
        "differ: it depends on state that its forward changes, or draws "
        "random numbers from a generator of its own (the stage replays only "
        "LibTorch's default generator)");
  }

  /// Whether the forward draws random numbers (dropout); if so, the
  /// gradient checks above were checks of their replay.
  void random_numbers(const torch::Tensor& plain_output) {
    torch::NoGradGuard no_grad;
    auto stage = fresh_copy();
    const auto x = input_.detach().to(options_.dtype());
    seed_generators(options_.seed() + 1000003, x.device());
    const auto other = run_plain(*stage, x);
    const bool random = check_error(other, plain_output) > 0.0;
    add_remark(
        "random numbers",
        true,
        random ? "the forward draws random numbers; the stage replayed them "
                 "(see the gradients)"
               : "the forward draws no random numbers");
  }

  /// inverse(forward(x)) in evaluation mode, where the forward is
  /// deterministic (the inverse of a training-mode forward with dropout
  /// needs that forward's random numbers in reverse order, which only the
  /// stage's backward has).
  void reconstruction() {
    try {
      torch::NoGradGuard no_grad;
      auto stage = fresh_copy();
      stage->eval();
      const auto x = input_.detach().to(options_.dtype());
      seed_generators(options_.seed(), x.device());
      const auto y = stage->forward(x);
      const auto back = stage->inverse(y);
      add("reconstruction inverse(forward(x)) (eval mode)",
          check_error(back, x),
          options_.reconstruction_tolerance(),
          "the inverse does not give back the input: check inverse against "
          "forward (or a state the forward changed)");
    } catch (const std::exception& e) {
      add_remark(
          "reconstruction inverse(forward(x)) (eval mode)",
          false,
          "threw: " + first_line(e));
    }
  }

  const RevSequentialImpl& prototype_;
  torch::Tensor input_;
  CheckOptions options_;
  std::string where_;
  CheckReport& report_;
};

inline std::shared_ptr<RevSequentialImpl> checked_clone(
    const RevSequentialImpl& stage,
    const char* what) {
  try {
    return std::dynamic_pointer_cast<RevSequentialImpl>(stage.clone());
  } catch (const c10::Error& e) {
    TORCH_CHECK(
        false,
        what,
        ": needs a deep copy of every member, but cloning failed (implement "
        "clone() for your block): ",
        first_line(e));
  }
}

inline void check_example(const torch::Tensor& example, const char* what) {
  TORCH_CHECK(
      example.defined() && example.is_floating_point(),
      what,
      ": expected a defined floating-point example input, got ",
      example.defined() ? c10::toString(example.scalar_type()) : "undefined");
}

} // namespace detail

/// Checks that `stage` trains correctly as a reversible stage on inputs like
/// `example`: each member on its own (on the input the members before it
/// give), then the whole stage. For each, on deep copies in
/// `options.dtype()` (float64 by default):
///
/// - repeated forward: the same copy twice from the same generator state
///   (catches state changed by the forward and private generators);
/// - forward: the stage's output against the members run with plain
///   autograd, from the same generator state;
/// - input gradient and every parameter gradient, for a fixed random
///   projection of the output as the loss;
/// - every floating-point buffer after the step (running statistics updated
///   once);
/// - random numbers: whether the forward draws any (then the gradient checks
///   checked their replay);
/// - reconstruction: inverse(forward(x)) against x, in evaluation mode.
///
/// A failure of a member names it ("member 2 (MyBlockImpl)"); an exception
/// (a member that writes into its input, for example) is a failure that
/// quotes it. Every member must implement `clone()`. Neither the stage nor
/// the caller's random number generators are changed.
///
/// ```
/// auto report = torchrev::check_stage(stage, torch::randn({4, 8, 16, 16}));
/// if (!report.passed()) {
///   std::cerr << report;
/// }
/// ```
inline CheckReport check_stage(
    const RevSequentialImpl& stage,
    const torch::Tensor& example,
    const CheckOptions& options = {}) {
  const char* what = "torchrev::check_stage";
  detail::check_example(example, what);
  TORCH_CHECK(!stage.is_empty(), what, ": the stage has no members");
  TORCH_CHECK(
      c10::isFloatingType(options.dtype()),
      what,
      ": expected a floating-point dtype in the options, got ",
      c10::toString(options.dtype()));
  // The checks seed the default generator; the caller's stream is left as
  // it was.
  const detail::ForkedRngGuard keep_caller_rng(
      detail::RngState::capture(example.device()), example.device());
  auto copy = detail::checked_clone(stage, what);
  copy->to(example.device(), options.dtype());
  copy->train(options.train());
  CheckReport report;
  torch::Tensor x = example.detach().to(options.dtype());
  for (size_t i = 0; i < copy->size(); ++i) {
    RevSequentialImpl single(copy->options);
    single.push_back(copy->ptr(i));
    const std::string where =
        "member " + std::to_string(i) + " (" + copy->ptr(i)->name() + ")";
    detail::StageChecker(single, x, options, where, report).run();
    try {
      torch::NoGradGuard no_grad;
      detail::seed_generators(options.seed(), x.device());
      x = copy->ptr(i)->forward(x);
    } catch (const std::exception& e) {
      report.results.push_back(
          {where,
           "forward to the next member",
           0.0,
           0.0,
           false,
           "threw: " + detail::first_line(e)});
      return report;
    }
  }
  if (copy->size() > 1) {
    detail::StageChecker(
        stage, example.detach().to(options.dtype()), options, "stage", report)
        .run();
  }
  return report;
}

/// `check_stage` of a `RevSequential` holder.
inline CheckReport check_stage(
    const RevSequential& stage,
    const torch::Tensor& example,
    const CheckOptions& options = {}) {
  TORCH_CHECK(
      !stage.is_empty(), "torchrev::check_stage: expected a stage, got null");
  return check_stage(*stage, example, options);
}

/// `check_stage` of a stage holding the block alone (the block is not
/// changed).
///
/// ```
/// auto report = torchrev::check_block(MyBlock(8), torch::randn({4, 16}));
/// EXPECT_TRUE(report.passed()) << report;
/// ```
inline CheckReport check_block(
    std::shared_ptr<InvertibleModule> block,
    const torch::Tensor& example,
    const CheckOptions& options = {}) {
  TORCH_CHECK(
      block != nullptr, "torchrev::check_block: expected a block, got null");
  RevSequentialImpl stage;
  stage.push_back(std::move(block));
  return check_stage(stage, example, options);
}

/// `check_block` for a module holder (`torchrev::RevBlock`, a `TORCH_MODULE`
/// of yours).
template <class ModuleType>
CheckReport check_block(
    const torch::nn::ModuleHolder<ModuleType>& block,
    const torch::Tensor& example,
    const CheckOptions& options = {}) {
  return check_block(
      std::static_pointer_cast<InvertibleModule>(block.ptr()),
      example,
      options);
}

} // namespace torchrev
