#pragma once

// The custom autograd Function behind `torchrev::RevSequential`.
//
// Plain autograd keeps, for every block, the tensors F and G need for their
// backward: memory grows with depth. A `RevSequential` instead runs each of
// its blocks as one `RevBlockFunction` node, chained: block i's node takes
// block i-1's output and returns block i's output.
//
//   forward  (grad mode off): y_0 = x, y_i = block_i(y_{i-1}). No node saves
//            its input, and only the last node keeps its output (the stage
//            output y_n, in the stage's shared state, so that its backward
//            can release it as soon as it is used), so nothing but that and
//            small per-block RNG snapshots outlives the forward. Between blocks
//            the activation stays in two dense halves. (With `anchor_every` =
//            k, every k-th node also saves its output, so that the backward's
//            reconstruction restarts there: rounding errors then compound
//            over at most k blocks.) The stage input is never saved, freed
//            or written to: the caller may still hold it (a ReLU before the
//            stage saves it).
//
//   backward runs node by node, last block first. Node i gets its output y
//            (the kept stage output for the last block; otherwise the
//            reconstruction that node i+1 handed over through the stage's
//            shared state, which is then dropped) and its gradient dy, both
//            as halves (y1, y2), (dy1, dy2):
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
//            graph its gradients come from (about 4/3 of plain compute). The
//            node hands x = (x1, x2) to node i-1 and returns dx and block i's
//            parameter gradients.
//
//            The backward's peak is this node's live set, so it is kept
//            small: each half of x is written into the memory of G(y1) (or
//            F(x2)) once that is computed, when nothing else refers to it
//            (the backward through G does not read its own output), so
//            that y2 (or y1) is released before that backward runs; dx is
//            accumulated into dy when this node holds the only reference to
//            it besides autograd's own and no gradient the recompute
//            returned shares its memory; and every tensor is released once
//            it is used.
//
// Each block's parameters are inputs of its node, and their gradients are
// computed with `torch::autograd::grad` (never accumulated into `.grad` as a
// side effect) and returned from that node's backward. Autograd then
// accumulates each exactly once, as soon as the block is done: the stage's
// parameter gradients are never all alive at once, and per-parameter hooks
// (which data-parallel reducers rely on) fire block by block while earlier
// blocks are still being reconstructed. `loss.backward()` and
// `torch::autograd::grad(loss, parameters)` behave as with plain autograd.
// While a block is recomputed its parameters' gradient edges lead to private
// sinks, so that LibTorch 2.x does not run their hooks inside the inner `grad`
// call (`detail::GradientSinkGuard`).
//
// The recompute replays each block's random draws (dropout) from the RNG state
// the forward saw, without disturbing the caller's RNG stream; it runs under
// the forward's autocast state; and it does not update BatchNorm running
// statistics a second time (see `detail::RecomputeGuard`).

#include <torchrev/coupling_block.h>
#include <torchrev/detail/autocast_state.h>
#include <torchrev/detail/concurrent_use.h>
#include <torchrev/detail/forward_replay.h>
#include <torchrev/detail/function_state.h>
#include <torchrev/detail/gradient_sink.h>
#include <torchrev/detail/outside_dependencies.h>
#include <torchrev/detail/replay_checks.h>
#include <torchrev/detail/rng_state.h>
#include <torchrev/drift.h>
#include <torchrev/invertible_module.h>
#include <torchrev/recompute.h>

#include <ATen/core/ivalue.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/types.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace torchrev {
namespace autograd {

/// The two halves of an activation (or of its gradient), split along `dim`.
/// Between blocks the halves stay separate, dense tensors: joining and
/// re-splitting them at every block would copy the activation twice.
struct Halves {
  torch::Tensor first, second;
  int64_t dim = 1;
};

/// What the nodes of one stage share, from its forward to its backward.
struct RevStageState : torch::CustomClassHolder {
  /// The members (blocks and other invertible modules), in forward order.
  /// Holding them keeps them alive until backward, as the Python ctx of a
  /// Function would.
  std::vector<std::shared_ptr<InvertibleModule>> blocks;
  /// couplings[i]: blocks[i] as a coupling block, or nullptr for a member
  /// that is only invertible (filled by `resize`).
  std::vector<CouplingBlockBase*> couplings;
  /// How errors name each block, e.g. "torchrev::RevSequential block 3 (...)".
  std::vector<std::string> names;
  /// Whether to snapshot and replay the random generators.
  bool preserve_rng_state = true;
  /// Keep the output of every `anchor_every`-th block (0: none); see
  /// `RevSequentialOptions::anchor_every`.
  int64_t anchor_every = 0;

  /// Whether block i's node keeps its output (the stage output, or an anchor).
  bool keeps_output(size_t i) const {
    return i + 1 == blocks.size() ||
        (anchor_every > 0 && (i + 1) % static_cast<size_t>(anchor_every) == 0);
  }

  // Filled by the forward, one entry per block.

  /// The dimension each block split its input along (resolved).
  std::vector<int64_t> split_dims;
  /// The input shape of each member that is not a coupling block, which its
  /// `inverse` must give back.
  std::vector<std::vector<int64_t>> input_sizes;
  /// Generator states just before each block's F and G ran in forward.
  std::vector<detail::RngState> rng_before_f;
  std::vector<detail::RngState> rng_before_g;
  /// The training flag of each block's modules (the block and every
  /// submodule, in `modules()` order) in forward: BatchNorm and dropout
  /// behave differently in eval mode, and the recompute must match.
  std::vector<std::vector<bool>> training;
  /// Each block's parameters that required grad (its node's inputs) and
  /// their version counters in forward: a recompute with parameters changed
  /// in place since (an optimizer step) would give wrong gradients.
  std::vector<std::vector<torch::Tensor>> params;
  std::vector<std::vector<uint32_t>> param_versions;
  /// The autocast state of the forward.
  detail::AutocastState autocast;
  /// With drift tracking (`RevSequentialOptions::track_drift`): each
  /// member's input as the forward computed it (none after an anchor, which
  /// keeps it anyway), and the report the backward fills by comparing its
  /// reconstructions with them. Both empty otherwise: nothing is kept.
  std::vector<torch::Tensor> forward_inputs;
  std::shared_ptr<DriftReport> drift;

  /// The stage output (the last member's), kept by the stage rather than
  /// saved by the last node, so that the node's backward can release it as
  /// soon as it has reconstructed the last member's input (a saved variable
  /// would stay alive until the node returns); with its version when kept,
  /// to detect an in-place change. Undefined once a backward without
  /// retain_graph has used it.
  torch::Tensor output;
  uint32_t output_version = 0;

  /// Keeps `y`, the stage output, for the backward: a detached alias, which
  /// holds no reference to the graph (an output kept with its history would
  /// form a cycle through the node that keeps it, the leak other projects
  /// hit).
  void keep_output(const torch::Tensor& y) {
    output = y.detach(); // shares y's memory and version counter
    output_version = y._version();
  }

  /// The kept stage output, for the last member's backward named `where`.
  /// Released here unless the backward retains the graph (the caller may
  /// still hold the output; then its memory stays): the same errors as a
  /// saved variable for a second backward and for an in-place change.
  torch::Tensor take_output(const std::string& where) {
    TORCH_CHECK(
        output.defined(),
        "Trying to backward through the graph a second time (or directly "
        "access saved tensors after they have already been freed). Saved "
        "intermediate values of the graph are freed when you call "
        ".backward() or autograd.grad(). Specify retain_graph=True if you "
        "need to backward through the graph a second time (",
        where,
        ": the stage output)");
    TORCH_CHECK(
        output._version() == output_version,
        "one of the variables needed for gradient computation has been "
        "modified by an inplace operation: ",
        where,
        ": the stage output, which the backward reconstructs the stage from, "
        "is at version ",
        output._version(),
        "; expected version ",
        output_version,
        " instead. Clone it before changing it in place.");
    torch::Tensor y = output;
    if (!torch::autograd::get_current_graph_task_keep_graph()) {
      output = torch::Tensor();
    }
    return y;
  }

  // Filled by the backward.

  /// reconstructed[i]: block i's output, rebuilt by block i+1's node and
  /// taken (released) by block i's. At most one is alive at a time. Halves
  /// for a coupling block; for another member, its whole output in `first`.
  std::vector<Halves> reconstructed;

  /// The generator states to replay block i's F (or a member's inverse and
  /// forward) from: none, so the current ones, without `preserve_rng_state`.
  const detail::RngState& replayed_rng_before_f(size_t i) const {
    return preserve_rng_state ? rng_before_f[i] : no_rng_state();
  }

  /// The generator states to replay block i's G from, like
  /// `replayed_rng_before_f`.
  const detail::RngState& replayed_rng_before_g(size_t i) const {
    return preserve_rng_state ? rng_before_g[i] : no_rng_state();
  }

  static const detail::RngState& no_rng_state() {
    static const detail::RngState none;
    return none;
  }

  /// How many tensors block i's node takes: two halves after a coupling
  /// block, else one.
  size_t num_inputs(size_t i) const {
    return i > 0 && couplings[i - 1] != nullptr ? 2 : 1;
  }

  /// Sizes the per-block vectors for `blocks`.
  void resize() {
    const size_t n = blocks.size();
    couplings.assign(n, nullptr);
    for (size_t i = 0; i < n; ++i) {
      couplings[i] = dynamic_cast<CouplingBlockBase*>(blocks[i].get());
    }
    split_dims.assign(n, 1);
    input_sizes.assign(n, {});
    rng_before_f.assign(n, detail::RngState());
    rng_before_g.assign(n, detail::RngState());
    training.assign(n, {});
    params.assign(n, {});
    param_versions.assign(n, {});
    reconstructed.assign(n, Halves());
    if (drift) {
      forward_inputs.assign(n, torch::Tensor());
      drift->input_errors.assign(n, -1.0);
    }
  }

  /// With drift tracking: compares `rebuilt`, member j's input as the
  /// backward reconstructed it, with the forward's, and releases the
  /// forward's (a second backward of the same graph measures nothing).
  void measure_drift(size_t j, const torch::Tensor& rebuilt) {
    if (!drift || !forward_inputs[j].defined() || !rebuilt.defined()) {
      return;
    }
    torch::NoGradGuard no_grad;
    const auto reference = forward_inputs[j].to(torch::kFloat64);
    const auto scale = reference.abs().max().item<double>();
    const auto diff =
        (rebuilt.to(torch::kFloat64) - reference).abs().max().item<double>();
    const double error = scale == 0.0 ? diff : diff / scale;
    forward_inputs[j] = torch::Tensor();
    drift->input_errors[j] = error;
    // NaN is the worst, and stays so.
    if (!std::isnan(drift->worst_error) && !(error <= drift->worst_error)) {
      drift->worst_error = error;
      drift->worst_member = static_cast<int64_t>(j);
      drift->worst_name = names[j];
    }
  }
};

/// One reversible block of a stage, as a node of the autograd graph. Use it
/// through `torchrev::RevSequential`, which chains one call per block:
///
///     outputs = RevBlockFunction::apply(state, i, torch::TensorList(inputs),
///                                       torch::TensorList(params));
///
/// `inputs` is the stage input {x} for block 0, and after it the previous
/// member's outputs: two halves from a coupling block, one tensor from any
/// other member; `params` are block i's parameters that require grad. A
/// coupling block returns its output halves, or {stage output} if it is the
/// last; any other member returns {its output}.
struct RevBlockFunction : public torch::autograd::Function<RevBlockFunction> {
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx,
      const c10::intrusive_ptr<RevStageState>& state,
      int64_t index,
      torch::TensorList inputs,
      torch::TensorList params) {
    const auto i = static_cast<size_t>(index);
    TORCH_CHECK(
        i < state->blocks.size() &&
            state->split_dims.size() == state->blocks.size() &&
            state->names.size() == state->blocks.size(),
        "torchrev: RevBlockFunction: block index ",
        index,
        " is out of range for a stage of ",
        state->blocks.size(),
        " blocks (are names set, and was RevStageState::resize() called?)");
    const size_t num_inputs = state->num_inputs(i);
    TORCH_CHECK(
        inputs.size() == num_inputs,
        "torchrev: RevBlockFunction: block ",
        index,
        " expected ",
        num_inputs == 1 ? "one tensor" : "two halves",
        " but got ",
        inputs.size(),
        " tensors");
    InvertibleModule& member = *state->blocks[i];
    const std::string& where = state->names[i];
    if (i == 0) {
      state->autocast = detail::AutocastState::current();
    }

    // Grad mode is off here (Function::apply turns it off), so the block
    // keeps nothing; nor may autocast cache grad-less casts of its weights.
    detail::AutocastCacheDisabledGuard no_autocast_cache;
    state->training[i] = detail::training_flags(member);
    state->params[i] = params.vec();
    state->param_versions[i] = detail::versions(params);
    const detail::RngState& rng_before =
        i == 0 ? detail::RngState() : state->rng_before_g[i - 1];
    detail::save_state(ctx, state);
    ctx->saved_data["index"] = index;
    if (state->drift && (i == 0 || !state->keeps_output(i - 1))) {
      // Drift tracking: the input as computed, to compare the backward's
      // reconstruction with (an anchor's output is kept, not rebuilt).
      state->forward_inputs[i] = num_inputs == 1
          ? inputs[0].detach()
          : torch::cat({inputs[0], inputs[1]}, state->split_dims[i - 1]);
    }

    CouplingBlockBase* block = state->couplings[i];
    if (block == nullptr) {
      // A member that is only invertible: y = forward(x), as one tensor.
      torch::Tensor x = num_inputs == 1
          ? inputs[0]
          : torch::cat({inputs[0], inputs[1]}, state->split_dims[i - 1]);
      state->input_sizes[i] = x.sizes().vec();
      state->split_dims[i] = i == 0 ? 1 : state->split_dims[i - 1];
      if (state->preserve_rng_state) {
        state->rng_before_f[i] =
            detail::RngState::capture(x.device(), rng_before);
        state->rng_before_g[i] = state->rng_before_f[i];
      }
      torch::Tensor y = detail::checked_forward(member, x, where);
      if (y.is_alias_of(x)) {
        // An output that is (a view of) an input would share its memory with
        // the caller's tensor: the output gets its own.
        y = y.clone();
      }
      if (i + 1 == state->blocks.size()) {
        state->keep_output(y);
      } else if (state->keeps_output(i)) {
        ctx->save_for_backward({y});
      }
      return {std::move(y)};
    }

    Halves h = num_inputs == 1
        ? split_checked(*block, inputs[0], where)
        : resplit(
              *block,
              Halves{inputs[0], inputs[1], state->split_dims[i - 1]},
              where);
    state->split_dims[i] = h.dim;
    const auto device = h.first.device();
    if (state->preserve_rng_state) {
      state->rng_before_f[i] = detail::RngState::capture(device, rng_before);
    }
    auto y1 = detail::checked_couple(
        *block, h.first, detail::checked_f(*block, h.second, where), where);
    h.first = torch::Tensor(); // x1 is not needed for y2: it goes before G
    if (state->preserve_rng_state) {
      state->rng_before_g[i] =
          detail::RngState::capture(device, state->rng_before_f[i]);
    }
    auto y2 = detail::checked_couple(
        *block, h.second, detail::checked_g(*block, y1, where), where);
    h = Halves();

    if (i + 1 < state->blocks.size()) {
      if (state->keeps_output(i)) {
        // An anchor: the backward restarts the reconstruction from here.
        ctx->save_for_backward({y1, y2});
      }
      return {std::move(y1), std::move(y2)};
    }
    // Keeping the stage output (no input of any block) is what makes memory
    // independent of depth. `take_output` turns a second backward without
    // retain_graph, or an in-place change of the output, into errors, as a
    // saved variable would.
    torch::Tensor y = torch::cat({y1, y2}, state->split_dims[i]);
    state->keep_output(y);
    return {y};
  }

  static torch::autograd::variable_list backward(
      torch::autograd::AutogradContext* ctx,
      // By reference: LibTorch 2.x hands over the gradients in this vector
      // and keeps no other reference to them, so the backward can take them
      // and reuse or release their memory (1.x keeps a copy of its own).
      torch::autograd::variable_list& grad_outputs) {
    auto state = detail::state_for_backward<RevStageState>(
        ctx,
        "torchrev::RevSequential does not support double backward "
        "(create_graph=true): its backward recomputes activations outside "
        "the graph. Use plain autograd (e.g. blocks in a "
        "torch::nn::Sequential) for higher-order gradients.");
    const auto i = static_cast<size_t>(ctx->saved_data["index"].toInt());
    if (state->couplings[i] == nullptr) {
      return backward_invertible(ctx, *state, i, grad_outputs);
    }
    CouplingBlockBase& block = *state->couplings[i];
    const std::string& where = state->names[i];
    const int64_t dim = state->split_dims[i];

    // The block's output and its gradient, as halves: for the last block
    // the kept stage output, for an anchor its saved output, otherwise what
    // node i+1 reconstructed.
    Halves y, dy;
    // Whether this node holds the only reference to the memory of each
    // gradient half: then dx is accumulated into it (see add_gradients).
    bool owns_dy_first = false, owns_dy_second = false;
    // The last block's gradient, whole, when this node owns it.
    torch::Tensor dy_whole;
    auto take_gradients = [&] {
      if (i + 1 == state->blocks.size()) {
        torch::Tensor g = std::move(grad_outputs[0]);
        owns_dy_first = owns_dy_second = owned_gradient(g);
        dy = split_views(owns_dy_first ? g : g.detach(), dim);
        if (owns_dy_first) {
          dy_whole = std::move(g);
        }
        return;
      }
      torch::Tensor g1 = std::move(grad_outputs[0]);
      torch::Tensor g2 = std::move(grad_outputs[1]);
      owns_dy_first = owned_gradient(g1);
      owns_dy_second = owned_gradient(g2);
      if (!owns_dy_first && !owns_dy_second && owned_pair(g1, g2, dim)) {
        // The two halves of one gradient (from a member that is not a
        // coupling block), and nothing else refers to it.
        owns_dy_first = owns_dy_second = true;
      }
      dy = Halves{
          owns_dy_first ? std::move(g1) : g1.detach(),
          owns_dy_second ? std::move(g2) : g2.detach(),
          dim};
    };
    if (i + 1 == state->blocks.size()) {
      // Views of the stage output: its memory is released with the second
      // of them (y1, once x1 is reconstructed), unless the caller holds it.
      y = split_views(state->take_output(where), dim);
      take_gradients();
    } else if (state->keeps_output(i)) {
      auto saved = ctx->get_saved_variables();
      y = Halves{saved[0].detach(), saved[1].detach(), dim};
      take_gradients();
    } else {
      y = std::move(state->reconstructed[i]);
      state->reconstructed[i] = Halves();
      TORCH_CHECK(
          y.first.defined(),
          where,
          ": its output was not reconstructed before its backward; the "
          "blocks of a stage must be back-propagated from the stage output, "
          "last block first");
      if (state->drift) {
        state->measure_drift(i + 1, torch::cat({y.first, y.second}, y.dim));
      }
      take_gradients();
    }
    detail::check_training_flags(block, state->training[i], where);
    // The node's inputs for this block, as in forward and unchanged.
    const auto& params = state->params[i];
    detail::check_parameters_unchanged(
        block, params, state->param_versions[i], where);

    // Output slots: state, index (not tensors), the inputs, the parameters.
    const size_t num_inputs = state->num_inputs(i);
    const size_t first_param = 2 + num_inputs;
    torch::autograd::variable_list grads(first_param + params.size());

    Halves x{torch::Tensor(), torch::Tensor(), dim};
    Halves dx{torch::Tensor(), torch::Tensor(), dim};
    {
      detail::BlockUse exclusive(
          &block, detail::BlockUse::Kind::kRecompute, where);
      torch::AutoGradMode enable_grad(true);
      detail::RecomputeGuard recompute(block);
      // Until the block's gradients are taken, the recomputed graph leads to
      // private sinks, not to the parameters' accumulators: their hooks run
      // once, in the outer backward (see detail/gradient_sink.h).
      detail::GradientSinkGuard sinks(params);

      // G: reconstruct x2 and back-propagate dy2 through G.
      auto y1_leaf = y.first.detach().requires_grad_(true);
      torch::Tensor g_out =
          recompute_half(Half::kG, block, y1_leaf, *state, i, params, where);
      // dx2's share from the coupling: dy2 itself when additive.
      torch::Tensor dx2_coupling;
      torch::autograd::variable_list g_grads;
      if (detail::is_additive(block)) {
        // x2 = y2 - G(y1) goes into G(y1)'s own memory when it can, and y2
        // is released before G's backward; otherwise x2 is allocated after
        // that backward, to keep it out of the backward's peak.
        x.second = subtract_into(y.second, g_out);
        if (x.second.defined()) {
          y.second = torch::Tensor();
        }
        g_grads = differentiate(g_out, {y1_leaf}, params, dy.second);
        if (!x.second.defined()) {
          x.second = y.second - g_out.detach();
        }
      } else {
        // Any other coupling: reconstruct x2 with uncouple, then
        // differentiate y2 = couple(x2, G(y1)) with respect to y1, x2 and
        // G's parameters.
        x.second = uncouple_detached(block, y.second, g_out, *state, where);
        y.second = torch::Tensor();
        auto x2_leaf = x.second.detach().requires_grad_(true);
        auto y2 = couple_recorded(block, x2_leaf, g_out, *state, where);
        g_grads = differentiate(y2, {y1_leaf, x2_leaf}, params, dy.second);
        dx2_coupling = std::move(g_grads[1]);
        g_grads.erase(g_grads.begin() + 1);
        dy.second = torch::Tensor();
      }
      y1_leaf = torch::Tensor();
      y.second = torch::Tensor();
      g_out = torch::Tensor(); // each tensor is released once it is used
      // A gradient autograd returned may be dy itself (G adding a parameter
      // of the half's shape passes dy2 through as the parameter's gradient):
      // a half is written only if none of them shares its memory.
      const bool write_dy1 = owns_dy_first && !shares_memory(dy.first, g_grads);
      dx.first =
          add_gradients(std::move(g_grads[0]), std::move(dy.first), write_dy1);
      accumulate(grads, first_param, g_grads);
      g_grads.clear();

      // F: reconstruct x1 and back-propagate dy1 (now including G's part)
      // through F.
      auto x2_leaf = x.second.detach().requires_grad_(true);
      torch::Tensor f_out =
          recompute_half(Half::kF, block, x2_leaf, *state, i, params, where);
      if (detail::is_additive(block)) {
        // x1 = y1 - F(x2), into F(x2)'s memory when it can (as for x2).
        x.first = subtract_into(y.first, f_out);
        if (x.first.defined()) {
          y.first = torch::Tensor();
        }
        auto f_grads = differentiate(f_out, {x2_leaf}, params, dx.first);
        x2_leaf = torch::Tensor();
        if (!x.first.defined()) {
          x.first = y.first - f_out.detach();
        }
        y.first = torch::Tensor();
        f_out = torch::Tensor();
        const bool write_dy2 = owns_dy_second &&
            !shares_memory(dy.second, f_grads) &&
            !shares_memory(dy.second, grads, first_param);
        dx.second = add_gradients(
            std::move(f_grads[0]), std::move(dy.second), write_dy2);
        accumulate(grads, first_param, f_grads);
      } else {
        x.first = uncouple_detached(block, y.first, f_out, *state, where);
        y.first = torch::Tensor();
        auto x1_leaf = x.first.detach().requires_grad_(true);
        auto y1 = couple_recorded(block, x1_leaf, f_out, *state, where);
        f_out = torch::Tensor();
        auto f_grads = differentiate(y1, {x2_leaf, x1_leaf}, params, dx.first);
        y1 = torch::Tensor();
        x2_leaf = torch::Tensor();
        dx.first = std::move(f_grads[1]);
        f_grads.erase(f_grads.begin() + 1);
        dx.second = add_gradients(
            std::move(f_grads[0]), std::move(dx2_coupling), /*write_dy=*/false);
        accumulate(grads, first_param, f_grads);
      }
    }

    if (i == 0 && state->drift && x.first.defined() && x.second.defined()) {
      state->measure_drift(0, torch::cat({x.first, x.second}, dim));
    }
    if (num_inputs == 1) {
      // The stage input, or the output of a member that is not a coupling
      // block: the gradient is joined. The stage input itself is the
      // caller's and is not needed; another member gets x whole.
      if (i > 0 && ctx->needs_input_grad(0) && !state->keeps_output(i - 1)) {
        state->reconstructed[i - 1] =
            Halves{torch::cat({x.first, x.second}, dim), torch::Tensor(), dim};
      }
      x = Halves();
      if (ctx->needs_input_grad(/*the first tensor input's edge=*/0)) {
        // Accumulated into the halves of the last block's own gradient,
        // dx is already whole.
        // (Unless a parameter's gradient is part of it: the input's and the
        // parameter's `.grad` must not share memory.)
        const bool whole = dy_whole.defined() &&
            dx.first.data_ptr() == dy_whole.data_ptr() &&
            dx.second.data_ptr() == dy_whole.chunk(2, dim)[1].data_ptr() &&
            !shares_memory(dy_whole, grads, first_param);
        grads[2] = whole ? std::move(dy_whole)
                         : torch::cat({dx.first, dx.second}, dim);
      }
      return grads;
    }
    // Hand the reconstructed input to block i-1's node, split as that block
    // split its output, and return its gradient the same way.
    const int64_t previous_dim = state->split_dims[i - 1];
    if (previous_dim != dim) {
      x = split_views(torch::cat({x.first, x.second}, dim), previous_dim);
      dx = split_views(torch::cat({dx.first, dx.second}, dim), previous_dim);
    }
    // Node i-1 runs only if some gradient flows into it; otherwise the
    // reconstruction would stay alive, unused, until the graph is freed.
    // Nor does an anchor need it: it kept its own output.
    if ((ctx->needs_input_grad(0) || ctx->needs_input_grad(1)) &&
        !state->keeps_output(i - 1)) {
      state->reconstructed[i - 1] = std::move(x);
    }
    grads[2] = std::move(dx.first);
    grads[3] = std::move(dx.second);
    return grads;
  }

 private:
  /// The two functions of a coupling block.
  enum class Half { kF, kG };

  /// F(x2) or G(y1) of block `i`, recorded by autograd from `leaf`, as the
  /// forward computed it: with the random state it drew from and its
  /// autocast state. Throws when the graph reaches a tensor other than
  /// `leaf` and the block's `params` that requires grad (state the block
  /// kept from its forward).
  static torch::Tensor recompute_half(
      Half half,
      CouplingBlockBase& block,
      const torch::Tensor& leaf,
      const RevStageState& state,
      size_t i,
      const std::vector<torch::Tensor>& params,
      const std::string& where) {
    const bool is_f = half == Half::kF;
    detail::RecomputeScope scope;
    torch::Tensor out;
    {
      detail::ForwardReplayGuard replay(
          state.autocast,
          is_f ? state.replayed_rng_before_f(i)
               : state.replayed_rng_before_g(i),
          leaf.device());
      out = is_f ? detail::checked_f(block, leaf, where)
                 : detail::checked_g(block, leaf, where);
    }
    detail::check_no_outside_dependencies(
        out, leaf, params, scope, where, is_f ? "F" : "G");
    return out;
  }

  /// x = uncouple(y, h) for a coupling block, outside any graph, under the
  /// forward's autocast state (as `couple` ran).
  static torch::Tensor uncouple_detached(
      CouplingBlockBase& block,
      const torch::Tensor& y,
      const torch::Tensor& h,
      const RevStageState& state,
      const std::string& where) {
    torch::NoGradGuard no_grad;
    detail::AutocastStateGuard autocast(state.autocast);
    return detail::checked_uncouple(block, y, h.detach(), where);
  }

  /// couple(x, h), recorded by autograd, under the forward's autocast state.
  static torch::Tensor couple_recorded(
      CouplingBlockBase& block,
      const torch::Tensor& x,
      const torch::Tensor& h,
      const RevStageState& state,
      const std::string& where) {
    detail::AutocastStateGuard autocast(state.autocast);
    return detail::checked_couple(block, x, h, where);
  }

  /// The backward of a member that is only invertible (not a coupling
  /// block): x = inverse(y) without a graph, then y = forward(x) again with
  /// one, which gives dx and the member's parameter gradients. Both run with
  /// the forward's random generator and autocast states, and with
  /// normalisation statistics frozen.
  static torch::autograd::variable_list backward_invertible(
      torch::autograd::AutogradContext* ctx,
      RevStageState& state,
      size_t i,
      torch::autograd::variable_list& grad_outputs) {
    InvertibleModule& member = *state.blocks[i];
    const std::string& where = state.names[i];
    torch::Tensor y;
    if (i + 1 == state.blocks.size()) {
      y = state.take_output(where);
    } else if (state.keeps_output(i)) {
      // Throws "Trying to backward through the graph a second time" once a
      // backward without retain_graph has freed it.
      y = ctx->get_saved_variables()[0].detach();
    } else {
      y = std::move(state.reconstructed[i].first);
      state.reconstructed[i] = Halves();
      TORCH_CHECK(
          y.defined(),
          where,
          ": its output was not reconstructed before its backward; the "
          "members of a stage must be back-propagated from the stage output, "
          "last first");
      state.measure_drift(i + 1, y);
    }
    torch::Tensor dy = std::move(grad_outputs[0]);
    detail::check_training_flags(member, state.training[i], where);
    const auto& params = state.params[i];
    detail::check_parameters_unchanged(
        member, params, state.param_versions[i], where);

    const size_t num_inputs = state.num_inputs(i);
    const size_t first_param = 2 + num_inputs;
    torch::autograd::variable_list grads(first_param + params.size());
    const bool previous_needs_x = num_inputs == 2
        ? ctx->needs_input_grad(0) || ctx->needs_input_grad(1)
        : ctx->needs_input_grad(0);
    // Whether the previous member's node gets x (an anchor kept its own).
    const bool hands_over_x =
        i > 0 && previous_needs_x && !state.keeps_output(i - 1);
    torch::Tensor x, dx;
    {
      detail::BlockUse exclusive(
          &member, detail::BlockUse::Kind::kRecompute, where);
      detail::RecomputeGuard recompute(member);
      const detail::RngState& rng = state.replayed_rng_before_f(i);
      {
        torch::NoGradGuard no_grad;
        detail::ForwardReplayGuard replay(state.autocast, rng, y.device());
        x = detail::checked_inverse(member, y, state.input_sizes[i], where);
      }
      if (x.is_alias_of(y)) {
        // A view of the output (the padding dropped) would keep all of it
        // alive, and it may be the stage output the caller holds.
        x = x.clone(y.suggest_memory_format());
      }
      y = torch::Tensor();
      auto x_leaf = x.detach().requires_grad_(true);
      torch::Tensor y_again;
      torch::AutoGradMode enable_grad(true);
      detail::GradientSinkGuard sinks(params);
      detail::RecomputeScope scope;
      {
        detail::ForwardReplayGuard replay(state.autocast, rng, x_leaf.device());
        y_again = detail::checked_forward(member, x_leaf, where);
      }
      detail::check_no_outside_dependencies(
          y_again, x_leaf, params, scope, where, "forward");
      // Only y_again's graph is needed now, not its values: its memory goes
      // before the backward allocates dx (unless a node saved it).
      release_unreferenced_memory(y_again);
      if (hands_over_x && num_inputs == 2) {
        // A coupling block before this member gets x as two dense halves,
        // split as it splits: halves that were views of one tensor would
        // keep all of it alive until both went, and its backward could not
        // write x2 over y2's memory. x itself goes before dx is allocated,
        // unless the graph saved it: its only handles are then x, x_leaf
        // and x_leaf's gradient accumulator, which reads no values (the
        // gradient is captured at its edge, not accumulated).
        state.reconstructed[i - 1] = dense_halves(x, state.split_dims[i - 1]);
        if (x.use_count() == 1 && x_leaf.use_count() <= 2 &&
            x.storage().use_count() == 2) {
          x.storage().unsafeGetStorageImpl()->reset();
        }
        x = torch::Tensor();
      }
      auto member_grads = differentiate(y_again, {x_leaf}, params, dy);
      y_again = torch::Tensor();
      dy = torch::Tensor();
      dx = std::move(member_grads[0]);
      accumulate(grads, first_param, member_grads);
    }
    if (i == 0) {
      state.measure_drift(0, x);
    }
    if (hands_over_x && num_inputs == 1) {
      // Hand x to the previous member's node.
      state.reconstructed[i - 1] = Halves{std::move(x), torch::Tensor(), 1};
    }
    x = torch::Tensor();
    if (num_inputs == 1) {
      grads[2] = std::move(dx);
    } else if (dx.defined()) {
      // Views of dx: the coupling block before sums into them in place when
      // they are all that refers to dx (`owned_pair`), so copying them
      // would only add a copy to this backward's peak.
      auto halves = split_views(dx, state.split_dims[i - 1]);
      dx = torch::Tensor();
      grads[2] = std::move(halves.first);
      grads[3] = std::move(halves.second);
    }
    return grads;
  }

  /// `t`'s halves along `dim` as two dense tensors in its memory format.
  static Halves dense_halves(const torch::Tensor& t, int64_t dim) {
    const auto format = t.suggest_memory_format();
    auto views = t.chunk(2, dim);
    // A half that is already dense (a batch of one) is copied too.
    const auto copy = [format](torch::Tensor& view) {
      auto half = view.is_contiguous(format) ? view.clone(format)
                                             : view.contiguous(format);
      view = torch::Tensor();
      return half;
    };
    Halves h{copy(views[0]), torch::Tensor(), dim};
    h.second = copy(views[1]);
    return h;
  }

  /// Releases the memory of `t`, a recompute's output whose graph is still
  /// to be back-propagated, when nothing refers to that memory but `t`
  /// (`only_reference`): then no node of the graph saved it, and the
  /// backward reads only `t`'s sizes and gradient edge, never its values.
  /// `t` must not be read afterwards.
  static void release_unreferenced_memory(const torch::Tensor& t) {
    if (only_reference(t, 1)) {
      t.storage().unsafeGetStorageImpl()->reset();
    }
  }

  static Halves split_views(const torch::Tensor& t, int64_t dim) {
    auto halves = t.chunk(2, dim);
    return Halves{std::move(halves[0]), std::move(halves[1]), dim};
  }

  /// Halves that are dense in `t`'s memory format (see RevBlockBase::split),
  /// after checking that `block` can split `t`.
  static Halves split_checked(
      const CouplingBlockBase& block,
      const torch::Tensor& t,
      const std::string& where) {
    detail::check_splittable(block, t, where);
    auto [a, b] = detail::split_halves(block, t);
    return Halves{
        std::move(a), std::move(b), detail::resolved_split_dim(block, t)};
  }

  /// `h` split the way `block` splits: unchanged when the previous block
  /// used the same dimension, else joined and split again.
  static Halves resplit(
      const CouplingBlockBase& block,
      Halves h,
      const std::string& where) {
    if (detail::resolved_split_dim(block, h.first) == h.dim) {
      return h;
    }
    return split_checked(block, torch::cat({h.first, h.second}, h.dim), where);
  }

  /// True when nothing refers to `t`'s memory but `t` itself and at most
  /// `handles` handles to it in all (this one included): no view, no other
  /// tensor, no saved variable of a graph (which holds a handle, or for an
  /// output its own tensor on the same memory). Such a tensor can be
  /// written to unseen: the rule by which autograd's own input buffers
  /// decide to accumulate gradients in place. A tensor with overlapping
  /// elements (an expanded gradient, e.g. of a sum) never qualifies.
  static bool only_reference(const torch::Tensor& t, size_t handles) {
    return t.defined() && t.has_storage() && t.layout() == torch::kStrided &&
        !t.is_nested() && !t._is_zerotensor() && t.use_count() <= handles &&
        t.storage().use_count() == 1 && t.is_non_overlapping_and_dense();
  }

  /// True when this node may write into `g`, a gradient it moved out of
  /// `grad_outputs`. LibTorch 2.x moves the gradients into that vector;
  /// LibTorch 1.x's `CppNode::apply` passes copies of the handles in its own
  /// `inputs`, which the engine drops after this backward returns, and with
  /// a post hook on the node one more (then the gradient is not written).
  static bool owned_gradient(const torch::Tensor& g) {
#if TORCH_VERSION_MAJOR < 2
    constexpr size_t kAutogradHandles = 1;
#else
    constexpr size_t kAutogradHandles = 0;
#endif
    return !g.requires_grad() && only_reference(g, 1 + kAutogradHandles);
  }

  /// True when `first` and `second` are the two halves along `dim` of one
  /// tensor that does not overlap itself, and nothing else refers to its
  /// memory (as `owned_gradient` for each): then each may be written. (The
  /// halves a member's node returns, `split_views` of its dx.)
  static bool owned_pair(
      const torch::Tensor& first,
      const torch::Tensor& second,
      int64_t dim) {
#if TORCH_VERSION_MAJOR < 2
    constexpr size_t kHandles = 2;
#else
    constexpr size_t kHandles = 1;
#endif
    const auto plain = [](const torch::Tensor& t) {
      return t.defined() && !t.requires_grad() && t.has_storage() &&
          t.layout() == torch::kStrided && !t.is_nested() &&
          !t._is_zerotensor() && t.use_count() <= kHandles;
    };
    // Two views of one base (which the views keep alive; nothing else may
    // refer to it), or two tensors that share the memory with nothing else.
    const bool views_of_one_base = first.is_view() && second.is_view() &&
        first._base().is_same(second._base()) &&
        first._base().use_count() == 2 && first.storage().use_count() == 3;
    if (!plain(first) || !plain(second) || !first.is_alias_of(second) ||
        !(views_of_one_base || first.storage().use_count() == 2) ||
        first.sizes() != second.sizes() ||
        first.strides() != second.strides() || dim < 0 || dim >= first.dim() ||
        second.storage_offset() !=
            first.storage_offset() + first.size(dim) * first.stride(dim)) {
      return false;
    }
    auto whole_sizes = first.sizes().vec();
    whole_sizes[dim] *= 2;
    return first.as_strided(whole_sizes, first.strides())
        .is_non_overlapping_and_dense();
  }

  /// Computes `y - out` into `out`'s memory and returns it (detached), when
  /// that memory is `out`'s alone (`only_reference`) and the difference has
  /// `out`'s size and dtype; else returns an undefined tensor and changes
  /// nothing. `out` is a recompute's output: its graph keeps no handle to
  /// it unless a node saved it, so the backward still runs from `out` and
  /// never reads what was written. The result is the same, bit for bit, as
  /// `y - out` into new memory.
  static torch::Tensor subtract_into(
      const torch::Tensor& y,
      const torch::Tensor& out) {
    if (!only_reference(out, 1) || out.sizes() != y.sizes() ||
        out.device() != y.device() ||
        at::result_type(y, out) != out.scalar_type()) {
      return torch::Tensor();
    }
    torch::NoGradGuard no_grad;
    torch::Tensor x = out.detach();
    at::sub_out(x, y, x);
    return x;
  }

  /// True when a defined tensor of `list`, from index `from` on, shares
  /// memory with `t` (the same storage).
  static bool shares_memory(
      const torch::Tensor& t,
      const torch::autograd::variable_list& list,
      size_t from = 0) {
    for (size_t k = from; k < list.size(); ++k) {
      if (list[k].defined() && list[k].has_storage() &&
          list[k].is_alias_of(t)) {
        return true;
      }
    }
    return false;
  }

  /// `dy + d`, where `d` is the gradient a recompute produced (undefined when
  /// the input did not affect the output). The sum goes into `dy` when it may
  /// be written (`write_dy`: the node owns it, as `owned_gradient` found,
  /// and no gradient shares its memory), else into a new tensor.
  /// (Summing into `d` instead, when nothing else refers to it, saves an
  /// allocation but measured no lower peak, so it is not done.)
  // `d` by value: the caller moves its gradient in, and it is released as
  // soon as the sum is done.
  static torch::Tensor add_gradients(
      torch::Tensor d, // NOLINT(performance-unnecessary-value-param)
      torch::Tensor dy,
      bool write_dy) {
    if (!d.defined()) {
      return dy;
    }
    if (write_dy && d.sizes() == dy.sizes() && d.dtype() == dy.dtype()) {
      return dy.add_(d);
    }
    return dy + d;
  }

  /// Gradients of `out` (weighted by `grad_out`) with respect to `leaves`
  /// and `params`, without touching any `.grad`: the leaves' gradients
  /// first, then the k-th parameter's at `leaves.size() + k` (undefined when
  /// unused).
  static torch::autograd::variable_list differentiate(
      const torch::Tensor& out,
      std::vector<torch::Tensor> leaves,
      const std::vector<torch::Tensor>& params,
      const torch::Tensor& grad_out) {
    if (!out.requires_grad()) { // F or G does not depend on anything.
      return torch::autograd::variable_list(leaves.size() + params.size());
    }
    torch::autograd::variable_list inputs = std::move(leaves);
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
  /// `grads[first_param]`, `grads[first_param + 1]`, ...
  static void accumulate(
      torch::autograd::variable_list& grads,
      size_t first_param,
      const torch::autograd::variable_list& block_grads) {
    for (size_t k = 1; k < block_grads.size(); ++k) {
      const auto& g = block_grads[k];
      if (!g.defined()) {
        continue;
      }
      auto& slot = grads[first_param + k - 1];
      slot = slot.defined() ? slot + g : g;
    }
  }
};

} // namespace autograd
} // namespace torchrev
