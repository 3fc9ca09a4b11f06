// The model zoo: shapes, parameter counts, and RevNet gradients against the
// same network run with plain autograd.

#include "test_util.h"

using torchrev::models::StageMode;

namespace {

// Parameter counts from the architecture, written independently of the
// builders: conv k*k*in*out (no bias), BatchNorm 2*c, linear in*out + out.
int64_t basic(int64_t in, int64_t out) {
  return 2 * in + 9 * in * out + 2 * out + 9 * out * out;
}
int64_t bottleneck(int64_t in, int64_t out) {
  const int64_t m = out / 4;
  return 2 * in + in * m + 2 * m + 9 * m * m + 2 * m + m * out;
}
int64_t residual(bool b, int64_t in, int64_t out) {
  return b ? bottleneck(in, out) : basic(in, out);
}
int64_t head(int64_t width, int64_t classes) {
  return 2 * width + width * classes + classes;
}

int64_t resnet_params(
    std::vector<int64_t> units,
    std::vector<int64_t> ch,
    bool b,
    int64_t in_ch,
    int64_t classes) {
  int64_t n = 9 * in_ch * ch[0];
  int64_t width = ch[0];
  for (size_t s = 0; s < units.size(); ++s) {
    const int64_t out = ch[s + 1] * (b ? 4 : 1);
    for (int64_t u = 0; u < units[s]; ++u) {
      n += residual(b, width, out);
      if (width != out || (s > 0 && u == 0)) {
        n += width * out; // projection shortcut
      }
      width = out;
    }
  }
  return n + head(width, classes);
}

int64_t revnet_params(
    std::vector<int64_t> units,
    std::vector<int64_t> ch,
    bool b,
    int64_t in_ch,
    int64_t classes) {
  int64_t n = 9 * in_ch * ch[0];
  int64_t width = ch[0];
  for (size_t s = 0; s < units.size(); ++s) {
    const int64_t out = ch[s + 1] * (b ? 4 : 1);
    int64_t reversible = units[s];
    if (width != out || s > 0) {
      n += residual(b, width / 2, out / 2) + residual(b, out / 2, out / 2) +
          2 * (width / 2) * (out / 2);
      --reversible;
    }
    n += reversible * 2 * residual(b, out / 2, out / 2);
    width = out;
  }
  return n + head(width, classes);
}

// Fully reversible: the stem widens to the first stage's width, each later
// stage opens with space-to-depth (4x the channels), every unit is a
// reversible block computing at the stage's width (the first of a stage
// reading and writing the whole half of the trunk, the others a slice of
// width / 2 channels), and the head sees all trunk channels.
int64_t revnet_inv_params(
    std::vector<int64_t> units,
    std::vector<int64_t> ch,
    bool b,
    int64_t in_ch,
    int64_t classes) {
  const int64_t first = ch[1] * (b ? 4 : 1);
  int64_t n = 9 * in_ch * first;
  int64_t trunk = first;
  for (size_t s = 0; s < units.size(); ++s) {
    const int64_t width = ch[s + 1] * (b ? 4 : 1);
    if (s > 0) {
      trunk *= 4;
    }
    if (s == 0) {
      n += units[s] * 2 * residual(b, width / 2, width / 2);
      continue;
    }
    // The first block's F and G mix the whole half: down to width / 2 (a
    // bottleneck's inner width width / 8) and back.
    const int64_t half = trunk / 2;
    const int64_t mix = b ? 2 * half + half * (width / 8) + 2 * (width / 8) +
            9 * (width / 8) * (width / 8) + 2 * (width / 8) + (width / 8) * half
                          : 2 * half + 9 * half * (width / 2) +
            2 * (width / 2) + 9 * (width / 2) * half;
    n += 2 * mix + (units[s] - 1) * 2 * residual(b, width / 2, width / 2);
  }
  return n + head(trunk, classes);
}

struct ZooEntry {
  std::string name;
  int64_t expected;
  double paper; // the RevNet paper's count in millions, 0 when not checked
};

std::vector<ZooEntry> zoo(int64_t in_ch, int64_t classes) {
  return {
      {"resnet32",
       resnet_params({5, 5, 5}, {16, 16, 32, 64}, false, in_ch, classes),
       0.46},
      {"resnet110",
       resnet_params({18, 18, 18}, {16, 16, 32, 64}, false, in_ch, classes),
       1.73},
      {"resnet164",
       resnet_params({18, 18, 18}, {16, 16, 32, 64}, true, in_ch, classes),
       1.70},
      {"revnet38",
       revnet_params({3, 3, 3}, {32, 32, 64, 112}, false, in_ch, classes),
       0.0},
      {"revnet110",
       revnet_params({9, 9, 9}, {32, 32, 64, 128}, false, in_ch, classes),
       1.73},
      {"revnet164",
       revnet_params({9, 9, 9}, {32, 32, 64, 128}, true, in_ch, classes),
       1.75},
      {"revnet_mini",
       revnet_params({1, 2, 2}, {16, 16, 32, 64}, false, in_ch, classes),
       0.0},
      {"revnet38_inv",
       revnet_inv_params({3, 3, 3}, {32, 32, 64, 112}, false, in_ch, classes),
       0.0},
      {"revnet110_inv",
       revnet_inv_params({9, 9, 9}, {32, 32, 64, 128}, false, in_ch, classes),
       0.0},
      {"revnet164_inv",
       revnet_inv_params({9, 9, 9}, {32, 32, 64, 128}, true, in_ch, classes),
       0.0},
      {"revnet_mini_inv",
       revnet_inv_params({1, 2, 2}, {16, 16, 32, 64}, false, in_ch, classes),
       0.0},
  };
}

} // namespace

TEST(ModelZoo, EveryModelHasTheExpectedOutputShapeAndParameterCount) {
  for (const auto& entry : zoo(3, 10)) {
    SCOPED_TRACE(entry.name);
    auto model = torchrev::models::create(entry.name);
    EXPECT_EQ(torchrev::models::parameter_count(*model), entry.expected);
    if (entry.paper > 0) {
      EXPECT_NEAR(entry.expected / 1e6, entry.paper, 0.02 * entry.paper);
    }
    torch::NoGradGuard no_grad;
    model->eval();
    EXPECT_EQ(
        model->forward(torch::randn({2, 3, 32, 32})).sizes(),
        torch::IntArrayRef({2, 10}));
  }
}

TEST(ModelZoo, InputChannelsAndClassesAreOptions) {
  for (const auto& entry : zoo(1, 7)) {
    SCOPED_TRACE(entry.name);
    auto model = torchrev::models::create(
        entry.name,
        torchrev::models::ZooOptions().in_channels(1).num_classes(7));
    EXPECT_EQ(torchrev::models::parameter_count(*model), entry.expected);
    torch::NoGradGuard no_grad;
    model->eval();
    EXPECT_EQ(
        model->forward(torch::randn({2, 1, 28, 28})).sizes(),
        torch::IntArrayRef({2, 7}));
  }
}

TEST(ModelZoo, UnknownNameListsTheValidOnes) {
  EXPECT_ERROR_CONTAINS(
      torchrev::models::create("revnet39"),
      "unknown model 'revnet39'",
      "revnet164");
}

TEST(ModelZoo, RevNetGradientsEqualTheSameNetworkWithPlainAutograd) {
  for (const std::string name : {"revnet38", "revnet110", "revnet164"}) {
    SCOPED_TRACE(name);
    torch::manual_seed(60);
    auto rev = std::dynamic_pointer_cast<torchrev::models::RevNetImpl>(
        torchrev::models::create(name));
    ASSERT_NE(rev, nullptr);
    rev->to(torch::kFloat64);
    auto input = torch::randn({2, 3, 16, 16}, torch::kFloat64);
    auto labels = torch::tensor({3, 7});
    ASSERT_TRUE(rev->options.checkpoint_transitions()); // the default
    struct Variant {
      const char* name;
      StageMode mode;
      bool checkpoint_transitions;
    };
    // The first is the reference: plain autograd throughout.
    const std::vector<Variant> variants = {
        {"stored", StageMode::kStored, false},
        {"reversible, transitions checkpointed (default)",
         StageMode::kReversible,
         true},
        {"reversible, transitions stored", StageMode::kReversible, false},
        {"checkpointed", StageMode::kCheckpointed, true},
    };
    std::vector<std::vector<torch::Tensor>> grads;
    std::vector<torch::Tensor> input_grads;
    for (const auto& variant : variants) {
      auto net =
          std::dynamic_pointer_cast<torchrev::models::RevNetImpl>(rev->clone());
      net->options.mode(variant.mode);
      net->options.checkpoint_transitions(variant.checkpoint_transitions);
      auto x = input.clone().requires_grad_(true);
      torch::nn::functional::cross_entropy(net->forward(x), labels).backward();
      std::vector<torch::Tensor> g;
      for (const auto& p : net->parameters()) {
        g.push_back(p.grad());
      }
      grads.push_back(g);
      input_grads.push_back(x.grad());
    }
    for (size_t m = 1; m < variants.size(); ++m) {
      SCOPED_TRACE(variants[m].name);
      EXPECT_CLOSE(input_grads[m], input_grads[0], 1e-9);
      ASSERT_EQ(grads[m].size(), grads[0].size());
      for (size_t i = 0; i < grads[0].size(); ++i) {
        EXPECT_CLOSE(grads[m][i], grads[0][i], 1e-9);
      }
    }
  }
}

TEST(ModelZoo, FullyReversibleGradientsEqualTheSameNetworkWithPlainAutograd) {
  // Channels-last too, as the benchmarks and the trainer run them: the
  // halves of a channels-last tensor are strided views.
  for (const auto& [name, channels_last] :
       std::vector<std::pair<std::string, bool>>{
           {"revnet38_inv", false},
           {"revnet164_inv", false},
           {"revnet_mini_inv", false},
           {"revnet38_inv", true}}) {
    SCOPED_TRACE(name + (channels_last ? ", channels last" : ""));
    torch::manual_seed(62);
    auto rev = std::dynamic_pointer_cast<torchrev::models::RevNetInvImpl>(
        torchrev::models::create(name));
    ASSERT_NE(rev, nullptr);
    rev->to(torch::kFloat64);
    auto input = torch::randn({2, 3, 16, 16}, torch::kFloat64);
    if (channels_last) {
      torchrev::models::use_channels_last(*rev);
      input = input.contiguous(torch::MemoryFormat::ChannelsLast);
    }
    auto labels = torch::tensor({3, 7});
    std::vector<std::vector<torch::Tensor>> grads;
    std::vector<torch::Tensor> input_grads;
    for (auto mode :
         {StageMode::kReversible,
          StageMode::kStored,
          StageMode::kCheckpointed}) {
      auto net = std::dynamic_pointer_cast<torchrev::models::RevNetInvImpl>(
          rev->clone());
      net->options.mode(mode);
      auto x = input.clone().requires_grad_(true);
      torch::nn::functional::cross_entropy(net->forward(x), labels).backward();
      std::vector<torch::Tensor> g;
      for (const auto& p : net->parameters()) {
        g.push_back(p.grad());
      }
      grads.push_back(g);
      input_grads.push_back(x.grad());
    }
    for (size_t m : {0u, 2u}) {
      SCOPED_TRACE(m == 0 ? "reversible" : "checkpointed");
      EXPECT_CLOSE(input_grads[m], input_grads[1], 1e-9);
      ASSERT_EQ(grads[m].size(), grads[1].size());
      for (size_t i = 0; i < grads[1].size(); ++i) {
        SCOPED_TRACE("parameter " + std::to_string(i));
        EXPECT_CLOSE(grads[m][i], grads[1][i], 1e-9);
      }
    }
  }
}

// PreActConv against BatchNorm2d, ReLU and Conv2d with plain autograd, on
// the same parameters, in float64: output, every gradient and the running
// statistics, in training and in eval mode, with strides 1 and 2.
TEST(PreActConv, EqualsPlainBatchNormReluConvIncludingRunningStatistics) {
  for (const int64_t stride : {1, 2}) {
    for (const bool training : {true, false}) {
      SCOPED_TRACE(
          "stride " + std::to_string(stride) +
          (training ? ", training" : ", eval"));
      torch::manual_seed(63);
      torchrev::models::PreActConv lean(
          torchrev::models::PreActConvOptions(3, 5, 3).stride(stride));
      lean->to(torch::kFloat64);
      torch::NoGradGuard no_grad_init;
      lean->bn->weight.uniform_(0.5, 1.5);
      lean->bn->bias.uniform_(-0.5, 0.5);
      lean->bn->running_mean.uniform_(-0.3, 0.3);
      lean->bn->running_var.uniform_(0.5, 2.0);
      torch::nn::Sequential plain(
          torch::nn::BatchNorm2d(3),
          torch::nn::ReLU(),
          torchrev::models::conv_no_bias(3, 5, 3, stride));
      plain->to(torch::kFloat64);
      auto plain_params = plain->named_parameters();
      auto plain_buffers = plain->named_buffers();
      plain_params["0.weight"].copy_(lean->bn->weight);
      plain_params["0.bias"].copy_(lean->bn->bias);
      plain_params["2.weight"].copy_(lean->conv->weight);
      plain_buffers["0.running_mean"].copy_(lean->bn->running_mean);
      plain_buffers["0.running_var"].copy_(lean->bn->running_var);
      lean->train(training);
      plain->train(training);
      torch::GradMode::set_enabled(true);

      auto input = torch::randn({4, 3, 8, 8}, torch::kFloat64);
      auto weights =
          torch::randn({4, 5, 8 / stride, 8 / stride}, torch::kFloat64);
      auto x_lean = input.clone().requires_grad_(true);
      auto x_plain = input.clone().requires_grad_(true);
      auto y_lean = lean(x_lean);
      auto y_plain = plain->forward(x_plain);
      EXPECT_CLOSE(y_lean, y_plain, 1e-12);
      (y_lean * weights).sum().backward();
      (y_plain * weights).sum().backward();
      EXPECT_CLOSE(x_lean.grad(), x_plain.grad(), 1e-12);
      EXPECT_CLOSE(
          lean->bn->weight.grad(), plain_params["0.weight"].grad(), 1e-12);
      EXPECT_CLOSE(lean->bn->bias.grad(), plain_params["0.bias"].grad(), 1e-12);
      EXPECT_CLOSE(
          lean->conv->weight.grad(), plain_params["2.weight"].grad(), 1e-12);
      EXPECT_CLOSE(
          lean->bn->running_mean, plain_buffers["0.running_mean"], 1e-12);
      EXPECT_CLOSE(
          lean->bn->running_var, plain_buffers["0.running_var"], 1e-12);
      EXPECT_EQ(
          lean->bn->num_batches_tracked.item<int64_t>(),
          plain_buffers["0.num_batches_tracked"].item<int64_t>());
      // It is one node that keeps only its input (and parameters).
      EXPECT_NE(
          y_lean.grad_fn()->name().find("PreActConvFunction"),
          std::string::npos);
    }
  }
}

TEST(PreActConv, RejectsAnInputOfAnotherWidthAndDoubleBackward) {
  torchrev::models::PreActConv unit(
      torchrev::models::PreActConvOptions(3, 4, 1));
  EXPECT_ERROR_CONTAINS(
      unit(torch::randn({2, 5, 4, 4})),
      "PreActConv",
      "3 channels",
      "[2, 5, 4, 4]");
  auto x = torch::randn({2, 3, 4, 4}, torch::requires_grad());
  auto y = unit(x).pow(2).sum();
  EXPECT_ERROR_CONTAINS(
      torch::autograd::grad({y}, {x}, {}, true, /*create_graph=*/true),
      "PreActConv does not support double backward");
  // Under autocast, or where nothing records a graph, it runs the plain
  // modules.
  torch::NoGradGuard no_grad;
  EXPECT_EQ(unit(x).grad_fn(), nullptr);
}

TEST(ModelZoo, AFullyReversibleTrunkIsOneStageWithNoStoredBlock) {
  auto net = std::dynamic_pointer_cast<torchrev::models::RevNetInvImpl>(
      torchrev::models::create("revnet110_inv"));
  ASSERT_NE(net, nullptr);
  // 27 reversible blocks and 2 space-to-depth layers, nothing else.
  ASSERT_EQ(net->trunk->size(), 29u);
  EXPECT_NE(net->trunk->ptr<torchrev::SpaceToDepthImpl>(9), nullptr);
  EXPECT_NE(net->trunk->ptr<torchrev::SpaceToDepthImpl>(19), nullptr);
  // No torchrev block or stage stores activations: the audit records one
  // reversible stage.
  torchrev::ActivationAudit audit;
  net->forward(torch::randn({2, 3, 32, 32}));
  EXPECT_EQ(audit.entries().size(), 1u) << audit.report(*net);
  EXPECT_TRUE(audit.storing().empty()) << audit.report(*net);
}

TEST(ModelZoo, CloneIsADeepCopyWithTheSameOutputsDtypeAndFrozenParameters) {
  for (const std::string name : {"resnet32", "revnet38", "revnet38_inv"}) {
    SCOPED_TRACE(name);
    torch::manual_seed(61);
    auto net = torchrev::models::create(name);
    net->to(torch::kFloat64);
    net->parameters()[0].requires_grad_(false);
    auto copy = std::dynamic_pointer_cast<torchrev::models::ImageClassifier>(
        net->clone());
    ASSERT_NE(copy, nullptr);
    auto x = torch::randn({2, 3, 16, 16}, torch::kFloat64);
    {
      torch::NoGradGuard no_grad;
      net->eval();
      copy->eval();
      EXPECT_TRUE(copy->forward(x).equal(net->forward(x)));
    }
    auto params = net->parameters();
    auto copy_params = copy->parameters();
    ASSERT_EQ(copy_params.size(), params.size());
    EXPECT_FALSE(copy_params[0].requires_grad());
    EXPECT_TRUE(copy_params[1].requires_grad());
    EXPECT_EQ(copy_params[1].scalar_type(), torch::kFloat64);
    // Deep: changing the copy leaves the original alone.
    torch::NoGradGuard no_grad;
    copy_params[1].add_(1.0);
    EXPECT_FALSE(copy_params[1].equal(params[1]));
  }
}
