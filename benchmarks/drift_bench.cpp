// drift_bench: how far float32 reversible training drifts from exact
// gradients as a stage gets deeper, and how much `anchor_every` bounds it.
//
// For each depth and weight scale it builds one stage of BN(eval)-ReLU-conv
// reversible blocks (8 + 8 channels), multiplies the conv weights by the
// scale (blocks that amplify errors), and compares, against float64 plain
// autograd on the same modules:
//   inverse_error      stage.inverse(stage(x)) against x, float32
//   plain_grad_x/params  float32 plain autograd's gradients
//   grad_x/params      float32 reversible gradients, per anchor_every
//   peak_bytes         the reversible training step's peak activation bytes
// Errors are max |a - b| / max |b| (parameters: over all of them at once).
//
// With --dtypes, instead: for each dtype (float32, bfloat16), kind of block
// (BN(eval)-ReLU-conv, or a transformer block: LayerNorm-attention and
// LayerNorm-MLP) and depth, one training step of a stage with
// `track_drift`, reporting the worst reconstructed member input and the
// gradients' errors against float64 plain autograd.

#include <torchrev/torchrev.h>

#include <CLI/CLI.hpp>
#include <fmt/core.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <ctime>
#include <fstream>
#include <string>
#include <vector>

namespace {

constexpr int64_t kHalf = 8; // channels of each half
constexpr int64_t kBatch = 4;
constexpr int64_t kSize = 16; // image height and width
constexpr uint64_t kSeed = 2026;

using Block = torchrev::RevBlock<torch::nn::Sequential, torch::nn::Sequential>;

torch::nn::Sequential residual() {
  return torch::nn::Sequential(
      torch::nn::BatchNorm2d(kHalf),
      torch::nn::ReLU(),
      torch::nn::Conv2d(torch::nn::Conv2dOptions(kHalf, kHalf, 3).padding(1)));
}

torchrev::RevSequential make_stage(int64_t blocks, double scale) {
  torch::manual_seed(kSeed);
  torchrev::RevSequential stage;
  for (int64_t i = 0; i < blocks; ++i) {
    stage->push_back(Block(residual(), residual()));
  }
  torch::NoGradGuard no_grad;
  for (auto& p : stage->parameters()) {
    if (p.dim() == 4) {
      p.mul_(scale);
    }
  }
  stage->eval(); // BatchNorm normalises with its running statistics
  return stage;
}

double relative_error(const torch::Tensor& a, const torch::Tensor& b) {
  const auto a64 = a.to(torch::kFloat64);
  const double scale = b.abs().max().item<double>();
  const double diff = (a64 - b).abs().max().item<double>();
  return scale == 0.0 ? diff : diff / scale;
}

struct Gradients {
  torch::Tensor x, params; // params: all parameter gradients, flattened
};

Gradients step(
    torchrev::RevSequential& stage,
    const torch::Tensor& input,
    torchrev::StageMode mode) {
  stage->zero_grad();
  auto x = input.detach().clone().requires_grad_(true);
  auto y = torchrev::run_stage(stage, x, mode);
  (y * y).mean().backward();
  std::vector<torch::Tensor> flat;
  for (const auto& p : stage->parameters()) {
    flat.push_back(p.grad().reshape(-1));
  }
  return {x.grad(), torch::cat(flat)};
}

torchrev::RevSequential make_kind_stage(
    const std::string& kind,
    int64_t blocks) {
  torch::manual_seed(kSeed);
  if (kind == "conv") {
    return make_stage(blocks, 1.0);
  }
  TORCH_CHECK(
      kind == "transformer",
      "--kinds: expected conv or transformer, got ",
      kind);
  torchrev::RevSequential stage;
  for (int64_t i = 0; i < blocks; ++i) {
    stage->push_back(torchrev::models::rev_transformer_block(
        torchrev::models::TransformerBlockOptions(32, 4)));
  }
  stage->eval();
  return stage;
}

torch::Tensor kind_input(const std::string& kind) {
  torch::manual_seed(kSeed + 1);
  return kind == "conv" ? torch::randn({kBatch, 2 * kHalf, kSize, kSize})
                        : torch::randn({kBatch, 16, 64});
}

torch::Dtype parse_dtype(const std::string& name) {
  if (name == "float32") {
    return torch::kFloat32;
  }
  TORCH_CHECK(
      name == "bfloat16", "--dtypes: expected float32 or bfloat16, got ", name);
  return torch::kBFloat16;
}

/// The --dtypes mode: reconstruction drift measured by the stage itself.
nlohmann::json dtype_drift(
    const std::vector<std::string>& dtypes,
    const std::vector<std::string>& kinds,
    const std::vector<int64_t>& depths) {
  nlohmann::json results = nlohmann::json::array();
  fmt::print(
      "{:>9} {:>12} {:>6} {:>12} {:>7} {:>10} {:>10} {:>10} {:>10}\n",
      "dtype",
      "kind",
      "blocks",
      "worst input",
      "member",
      "rev x",
      "rev p",
      "plain x",
      "plain p");
  for (const auto& kind : kinds) {
    for (int64_t blocks : depths) {
      auto base = make_kind_stage(kind, blocks);
      auto reference = torchrev::RevSequential(
          std::dynamic_pointer_cast<torchrev::RevSequentialImpl>(
              base->clone()));
      reference->to(torch::kFloat64);
      const auto x = kind_input(kind);
      const auto exact =
          step(reference, x.to(torch::kFloat64), torchrev::StageMode::kStored);
      for (const auto& dtype_name : dtypes) {
        const auto dtype = parse_dtype(dtype_name);
        auto stage = torchrev::RevSequential(
            std::dynamic_pointer_cast<torchrev::RevSequentialImpl>(
                base->clone()));
        stage->to(dtype);
        const auto plain =
            step(stage, x.to(dtype), torchrev::StageMode::kStored);
        stage->options.track_drift(true);
        const auto rev =
            step(stage, x.to(dtype), torchrev::StageMode::kReversible);
        const auto drift = stage->drift();
        nlohmann::json row{
            {"dtype", dtype_name},
            {"kind", kind},
            {"blocks", blocks},
            {"worst_input_error", drift.worst_error},
            {"worst_member", drift.worst_member},
            {"input_errors", drift.input_errors},
            {"grad_x_error", relative_error(rev.x, exact.x)},
            {"grad_params_error", relative_error(rev.params, exact.params)},
            {"plain_grad_x_error", relative_error(plain.x, exact.x)},
            {"plain_grad_params_error",
             relative_error(plain.params, exact.params)}};
        fmt::print(
            "{:>9} {:>12} {:>6} {:>12.2e} {:>7} {:>10.2e} {:>10.2e} {:>10.2e} "
            "{:>10.2e}\n",
            dtype_name,
            kind,
            blocks,
            drift.worst_error,
            drift.worst_member,
            row["grad_x_error"].get<double>(),
            row["grad_params_error"].get<double>(),
            row["plain_grad_x_error"].get<double>(),
            row["plain_grad_params_error"].get<double>());
        std::fflush(stdout);
        results.push_back(row);
      }
    }
  }
  return results;
}

} // namespace

int main(int argc, char** argv) {
  auto& meter = torchrev::CPUMemoryMeter::install();
  CLI::App app{"drift_bench: float32 reversible gradient drift vs depth"};
  std::vector<int64_t> depths{16, 64, 256};
  std::vector<int64_t> anchors{0, 8, 16, 32};
  std::vector<double> scales{1.0, 3.0};
  int threads = 2;
  std::string json_path;
  app.add_option("--blocks", depths, "stage depths")->delimiter(',');
  app.add_option("--anchors", anchors, "anchor_every values (0: none)")
      ->delimiter(',');
  app.add_option("--scales", scales, "conv weight scales")->delimiter(',');
  app.add_option("--threads", threads, "intra-op threads");
  app.add_option("--json", json_path, "write the results here");
  std::vector<std::string> dtypes, kinds{"conv", "transformer"};
  app.add_option(
         "--dtypes",
         dtypes,
         "instead: the drift the stage measures (track_drift) in these "
         "dtypes (float32, bfloat16)")
      ->delimiter(',');
  app.add_option("--kinds", kinds, "with --dtypes: conv, transformer")
      ->delimiter(',');
  CLI11_PARSE(app, argc, argv);
  torch::set_num_threads(threads);

  nlohmann::json results = nlohmann::json::array();
  if (!dtypes.empty()) {
    results = dtype_drift(dtypes, kinds, depths);
    scales.clear(); // and skip the anchor sweep
  } else {
    fmt::print(
        "{:>6} {:>5} {:>10} {:>10} {:>10} {:>7} {:>10} {:>10} {:>9}\n",
        "blocks",
        "scale",
        "inverse",
        "plain x",
        "plain p",
        "anchor",
        "rev x",
        "rev p",
        "peak MiB");
  }
  for (double scale : scales) {
    for (int64_t blocks : depths) {
      auto stage = make_stage(blocks, scale);
      auto reference = torchrev::RevSequential(
          std::dynamic_pointer_cast<torchrev::RevSequentialImpl>(
              stage->clone()));
      reference->to(torch::kFloat64);
      torch::manual_seed(kSeed + 1);
      auto x = torch::randn({kBatch, 2 * kHalf, kSize, kSize});
      const auto exact =
          step(reference, x.to(torch::kFloat64), torchrev::StageMode::kStored);
      const auto plain = step(stage, x, torchrev::StageMode::kStored);
      double inverse_error = 0.0;
      {
        torch::NoGradGuard no_grad;
        inverse_error =
            relative_error(stage->inverse(stage(x)), x.to(torch::kFloat64));
      }
      for (int64_t every : anchors) {
        stage->options.anchor_every(every);
        step(
            stage,
            x,
            torchrev::StageMode::kReversible); // warm-up: the .grad tensors
                                               // exist afterwards
        const size_t before = meter.current_bytes();
        meter.reset_peak();
        const auto rev = step(stage, x, torchrev::StageMode::kReversible);
        const size_t peak = meter.peak_bytes() - before;
        nlohmann::json row{
            {"blocks", blocks},
            {"scale", scale},
            {"anchor_every", every},
            {"inverse_error", inverse_error},
            {"plain_grad_x_error", relative_error(plain.x, exact.x)},
            {"plain_grad_params_error",
             relative_error(plain.params, exact.params)},
            {"grad_x_error", relative_error(rev.x, exact.x)},
            {"grad_params_error", relative_error(rev.params, exact.params)},
            {"peak_activation_bytes", peak}};
        fmt::print(
            "{:>6} {:>5} {:>10.2e} {:>10.2e} {:>10.2e} {:>7} {:>10.2e} "
            "{:>10.2e} {:>9.2f}\n",
            blocks,
            scale,
            inverse_error,
            row["plain_grad_x_error"].get<double>(),
            row["plain_grad_params_error"].get<double>(),
            every,
            row["grad_x_error"].get<double>(),
            row["grad_params_error"].get<double>(),
            static_cast<double>(peak) / (1 << 20));
        std::fflush(stdout);
        results.push_back(row);
      }
    }
  }

  if (!json_path.empty()) {
    std::string command;
    for (int i = 0; i < argc; ++i) {
      command += (i ? " " : "") + std::string(argv[i]);
    }
    const std::time_t now = std::time(nullptr);
    char stamp[32];
    std::strftime(stamp, sizeof stamp, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
    nlohmann::json doc{
        {"command", command},
        {"date", stamp},
        {"libtorch", TORCH_VERSION},
        {"threads", threads},
        {"config",
         {{"half_channels", kHalf},
          {"batch", kBatch},
          {"size", kSize},
          {"block", "BN(eval)-ReLU-conv3x3 for F and G"},
          {"transformer_block",
           "RevTransformerBlock, 32 + 32 features, 4 heads, MLP 4x, 16 "
           "tokens, eval mode"}}},
        {"results", results}};
    const std::string tmp = json_path + ".tmp";
    {
      std::ofstream out(tmp);
      out << doc.dump(2) << "\n";
      if (!out) {
        fmt::print(stderr, "drift_bench: cannot write {}\n", tmp);
        return 1;
      }
    }
    if (std::rename(tmp.c_str(), json_path.c_str()) != 0) {
      fmt::print(
          stderr, "drift_bench: cannot rename {} to {}\n", tmp, json_path);
      return 1;
    }
  }
  return 0;
}
