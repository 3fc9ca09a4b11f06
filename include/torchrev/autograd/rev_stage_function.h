#pragma once

// The custom autograd Function behind `torchrev::RevSequential`.
//
// Plain autograd keeps, for every block, the tensors F and G need for their
// backward: memory grows with depth. This Function runs a whole stage of
// reversible blocks as ONE node of the autograd graph:
//
//   forward  (grad mode off): y_0 = x, y_i = block_i(y_{i-1}). Only the stage
//            output y_n is saved, plus small per-block RNG snapshots. Each
//            block's input is dropped as soon as the next block has consumed
//            it. The stage input is never saved, freed or written to: the
//            caller may still hold it (a ReLU before the stage saves it).
//
//   backward walks the blocks in reverse. For block i, given its output
//            y = (y1, y2) and the gradient dy = (dy1, dy2):
//
//              G(y1) is evaluated once, with grad, on a detached y1:
//                x2      = y2 - G(y1)            reconstructs the input half
//                dy1    += (dG/dy1)^T dy2        and gives G's gradients
//                dG/dθ_G = (dG/dθ_G)^T dy2
//              F(x2) is evaluated once, with grad, on a detached x2:
//                x1      = y1 - F(x2)
//                dx2     = dy2 + (dF/dx2)^T dy1
//                dF/dθ_F = (dF/dθ_F)^T dy1
//                dx1     = dy1
//
//            so each of F and G runs once more than in plain training, and
//            that single evaluation both reconstructs the input and is the
//            graph its gradients come from (about 4/3 of plain compute).
//
// Every parameter of every block is an input of the Function, and the
// parameter gradients are computed with `torch::autograd::grad` (never
// accumulated into `.grad` as a side effect) and returned from backward.
// Autograd then accumulates each exactly once, so `loss.backward()`,
// `torch::autograd::grad(loss, parameters)` and per-parameter hooks (which
// data-parallel reducers rely on) behave as with plain autograd. While a block
// is recomputed its parameters' gradient edges lead to private sinks, so that
// LibTorch 2.x does not run their hooks inside the inner `grad` call
// (`detail::GradientSinkGuard`).
//
// The recompute replays each block's random draws (dropout) from the RNG state
// the forward saw, without disturbing the caller's RNG stream; it runs under
// the forward's autocast state; and it does not update BatchNorm running
// statistics a second time (see `detail::RecomputeGuard`).

#include <torchrev/detail/autocast_state.h>
#include <torchrev/detail/gradient_sink.h>
#include <torchrev/detail/rng_state.h>
#include <torchrev/recompute.h>
#include <torchrev/rev_block.h>

#include <ATen/core/ivalue.h>
#include <torch/autograd.h>
#include <torch/types.h>

#include <cstddef>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace torchrev {
namespace autograd {

/// What the forward of one `RevStageFunction` call hands to its backward,
/// besides the saved output tensor.
struct RevStageState : torch::CustomClassHolder {
  /// The blocks, in forward order. Holding them keeps them alive until
  /// backward, as the Python ctx of a Function would.
  std::vector<std::shared_ptr<RevBlockBase>> blocks;
  /// How errors name each block, e.g. "torchrev::RevSequential block 3 (...)".
  std::vector<std::string> names;
  /// The number of Function inputs (parameters requiring grad) of each block;
  /// their order is the order of the `params` argument.
  std::vector<size_t> params_per_block;
  /// Whether to snapshot and replay the random generators.
  bool preserve_rng_state = true;
  /// Generator states just before each block's F and G ran in forward.
  std::vector<detail::RngState> rng_before_f;
  std::vector<detail::RngState> rng_before_g;
  /// The autocast state of the forward.
  detail::AutocastState autocast;
  /// Whether each block was in training mode in forward (BatchNorm and
  /// dropout behave differently; the recompute must match the forward).
  std::vector<bool> training;
};

/// Runs a stage of reversible blocks without storing their activations. Use
/// it through `torchrev::RevSequential`; call it directly as
/// `RevStageFunction::apply(state, x, torch::TensorList(params))`, where
/// `params` lists, block by block, the parameters that require grad.
struct RevStageFunction : public torch::autograd::Function<RevStageFunction> {
  static torch::Tensor forward(
      torch::autograd::AutogradContext* ctx,
      c10::intrusive_ptr<RevStageState> state,
      const torch::Tensor& x,
      torch::TensorList params) {
    const size_t num_blocks = state->blocks.size();
    TORCH_CHECK(num_blocks > 0, "torchrev: a stage needs at least one block");
    size_t expected_params = 0;
    for (size_t n : state->params_per_block) {
      expected_params += n;
    }
    TORCH_CHECK(
        expected_params == params.size(),
        "torchrev: RevStageFunction expected ",
        expected_params,
        " parameters for its blocks, but got ",
        params.size());

    state->autocast = detail::AutocastState::current();
    if (state->preserve_rng_state) {
      state->rng_before_f.reserve(num_blocks);
      state->rng_before_g.reserve(num_blocks);
    }

    // Grad mode is off here (Function::apply turns it off), so no block keeps
    // anything: the two halves of the current activation are all that is
    // alive between blocks.
    Halves h;
    for (size_t i = 0; i < num_blocks; ++i) {
      RevBlockBase& block = *state->blocks[i];
      const std::string& where = state->names[i];
      state->training.push_back(block.is_training());
      h = i == 0 ? split_checked(block, x, where)
                 : resplit(block, std::move(h), where);
      if (state->preserve_rng_state) {
        state->rng_before_f.push_back(detail::RngState::capture(x.device()));
      }
      auto y1 = h.first + block.checked_f(h.second, where);
      if (state->preserve_rng_state) {
        state->rng_before_g.push_back(detail::RngState::capture(x.device()));
      }
      auto y2 = h.second + block.checked_g(y1, where);
      h = Halves{std::move(y1), std::move(y2), h.dim};
    }
    torch::Tensor y = torch::cat({h.first, h.second}, h.dim);
    h = Halves();

    // Saving the output (not an input) is what makes memory independent of
    // depth. The saved-variable machinery also turns a second backward
    // without retain_graph, or an in-place change of the output, into errors.
    ctx->save_for_backward({y});
    ctx->saved_data["state"] = c10::IValue::make_capsule(state);
    return y;
  }

  static torch::autograd::variable_list backward(
      torch::autograd::AutogradContext* ctx,
      torch::autograd::variable_list grad_outputs) {
    TORCH_CHECK(
        !torch::GradMode::is_enabled(),
        "torchrev::RevSequential does not support double backward "
        "(create_graph=true): its backward recomputes activations outside "
        "the graph. Use plain autograd (e.g. blocks in a "
        "torch::nn::Sequential) for higher-order gradients.");
    // Throws "Trying to backward through the graph a second time" once the
    // graph has been freed by a backward without retain_graph.
    auto saved = ctx->get_saved_variables();
    auto state = c10::static_intrusive_pointer_cast<RevStageState>(
        ctx->saved_data["state"].toCapsule());

    const size_t num_blocks = state->blocks.size();
    size_t total_params = 0;
    for (size_t n : state->params_per_block) {
      total_params += n;
    }
    // Output slots: state (not a tensor), x, then one per parameter.
    torch::autograd::variable_list grads(2 + total_params);
    size_t param_end = 2 + total_params;

    // The output of the current block and its gradient, as halves. The
    // saved output and the incoming gradient stay alive until backward
    // returns, so their halves are views: dense copies would only add memory.
    RevBlockBase& last = *state->blocks[num_blocks - 1];
    Halves y = split_views(last, saved[0].detach(), state->names.back());
    Halves dy =
        split_views(last, grad_outputs[0].detach(), state->names.back());
    for (size_t i = num_blocks; i-- > 0;) {
      RevBlockBase& block = *state->blocks[i];
      const std::string& where = state->names[i];
      if (i + 1 < num_blocks) {
        y = resplit(block, std::move(y), where);
        dy = resplit(block, std::move(dy), where);
      }
      TORCH_CHECK(
          block.is_training() == state->training[i],
          where,
          ": the block was in ",
          state->training[i] ? "training" : "eval",
          " mode in forward but is in ",
          block.is_training() ? "training" : "eval",
          " mode in backward; call train()/eval() only between steps");
      const size_t num_params = state->params_per_block[i];
      const size_t param_begin = param_end - num_params;
      // The Function's inputs for this block, in the same order as in forward.
      auto params = detail::trainable_parameters(block);
      TORCH_CHECK(
          params.size() == num_params,
          where,
          ": the number of parameters requiring grad changed between forward "
          "and backward (",
          num_params,
          " then ",
          params.size(),
          ")");

      Halves x{torch::Tensor(), torch::Tensor(), y.dim};
      Halves dx{torch::Tensor(), torch::Tensor(), y.dim};
      {
        torch::AutoGradMode enable_grad(true);
        detail::RecomputeGuard recompute(block);
        // Until the block's gradients are taken, the recomputed graph leads
        // to private sinks, not to the parameters' accumulators: their hooks
        // run once, in the outer backward (see detail/gradient_sink.h).
        detail::GradientSinkGuard sinks(params);

        // G: reconstruct x2 and back-propagate dy2 through G.
        auto y1_leaf = y.first.detach().requires_grad_(true);
        torch::Tensor g_out;
        {
          detail::AutocastStateGuard autocast(state->autocast);
          detail::ForkedRngGuard rng(
              state->preserve_rng_state ? state->rng_before_g[i]
                                        : detail::RngState(),
              y1_leaf.device());
          g_out = block.checked_g(y1_leaf, where);
        }
        x.second = y.second - g_out.detach();
        y.second = torch::Tensor(); // each tensor is released once it is used
        auto g_grads = differentiate(g_out, y1_leaf, params, dy.second);
        g_out = torch::Tensor();
        y1_leaf = torch::Tensor();
        dx.first = g_grads[0].defined() ? dy.first + g_grads[0] : dy.first;
        dy.first = torch::Tensor();
        accumulate(grads, param_begin, g_grads);
        g_grads.clear();

        // F: reconstruct x1 and back-propagate dy1 (now including G's part)
        // through F.
        auto x2_leaf = x.second.detach().requires_grad_(true);
        torch::Tensor f_out;
        {
          detail::AutocastStateGuard autocast(state->autocast);
          detail::ForkedRngGuard rng(
              state->preserve_rng_state ? state->rng_before_f[i]
                                        : detail::RngState(),
              x2_leaf.device());
          f_out = block.checked_f(x2_leaf, where);
        }
        x.first = y.first - f_out.detach();
        y.first = torch::Tensor();
        auto f_grads = differentiate(f_out, x2_leaf, params, dx.first);
        f_out = torch::Tensor();
        dx.second = f_grads[0].defined() ? dy.second + f_grads[0] : dy.second;
        accumulate(grads, param_begin, f_grads);
      }
      // The block's input and its gradient become the previous block's
      // output and output gradient; this block's tensors are released here.
      y = std::move(x);
      dy = std::move(dx);
      param_end = param_begin;
    }
    y = Halves();
    torch::Tensor dy_merged = torch::cat({dy.first, dy.second}, dy.dim);
    grads[1] = std::move(dy_merged);
    return grads;
  }

 private:
  /// The two halves of an activation (or of its gradient), split along `dim`.
  /// Between blocks the halves stay separate, dense tensors: joining and
  /// re-splitting them at every block would copy the activation twice.
  struct Halves {
    torch::Tensor first, second;
    int64_t dim = 1;
  };

  static Halves split_views(
      const RevBlockBase& block,
      const torch::Tensor& t,
      const std::string& where) {
    block.check_splittable(t, where);
    const int64_t dim = block.split_dim(t);
    auto halves = t.chunk(2, dim);
    return Halves{std::move(halves[0]), std::move(halves[1]), dim};
  }

  /// Halves that are dense in `t`'s memory format (see RevBlockBase::split).
  /// Used where `t` is about to be dropped, so the copies are transient.
  static Halves split_checked(
      const RevBlockBase& block,
      const torch::Tensor& t,
      const std::string& where) {
    block.check_splittable(t, where);
    auto [a, b] = block.split(t);
    return Halves{std::move(a), std::move(b), block.split_dim(t)};
  }

  /// `h` split the way `block` splits: unchanged when the previous block
  /// used the same dimension, else joined and split again.
  static Halves resplit(
      const RevBlockBase& block,
      Halves h,
      const std::string& where) {
    if (block.split_dim(h.first) == h.dim) {
      return h;
    }
    return split_checked(block, torch::cat({h.first, h.second}, h.dim), where);
  }

  /// Gradients of `out` (weighted by `grad_out`) with respect to `input` and
  /// `params`, without touching any `.grad`. Entry 0 is the input's gradient,
  /// entry 1 + k the k-th parameter's (undefined when unused).
  static torch::autograd::variable_list differentiate(
      const torch::Tensor& out,
      const torch::Tensor& input,
      const std::vector<torch::Tensor>& params,
      const torch::Tensor& grad_out) {
    if (!out.requires_grad()) { // F or G does not depend on anything.
      return torch::autograd::variable_list(1 + params.size());
    }
    torch::autograd::variable_list inputs;
    inputs.reserve(1 + params.size());
    inputs.push_back(input);
    inputs.insert(inputs.end(), params.begin(), params.end());
    return torch::autograd::grad(
        {out},
        inputs,
        {grad_out},
        /*retain_graph=*/false,
        /*create_graph=*/false,
        /*allow_unused=*/true);
  }

  /// Adds the parameter gradients of `block_grads` (entries 1, 2, ...) into
  /// `grads[param_begin]`, `grads[param_begin + 1]`, ...
  static void accumulate(
      torch::autograd::variable_list& grads,
      size_t param_begin,
      const torch::autograd::variable_list& block_grads) {
    for (size_t k = 1; k < block_grads.size(); ++k) {
      const auto& g = block_grads[k];
      if (!g.defined()) {
        continue;
      }
      auto& slot = grads[param_begin + k - 1];
      slot = slot.defined() ? slot + g : g;
    }
  }
};

} // namespace autograd
} // namespace torchrev
