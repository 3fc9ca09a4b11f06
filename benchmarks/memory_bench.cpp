// memory_bench: activation memory and step time of the model zoo, reversible
// against stored (plain autograd) and checkpointed training of the same
// blocks, plus a depth sweep and the largest batch that fits a budget.
//
// Measured per configuration, after one warm-up step (which allocates the
// gradients and the optimizer state, so they are not counted):
//   peak_activation_bytes  peak bytes allocated during a training step
//                          (forward, backward, SGD step) minus the bytes
//                          allocated just before it (CPUMemoryMeter; on
//                          CUDA the caching allocator's peak statistics)
//   step_seconds           median over the timed steps and repeats
//   maxrss_kib             the process's peak resident set so far
// Configurations are interleaved within each repeat, so that the machine's
// noise hits all of them alike; medians over repeats are reported.

#include <torchrev/torchrev.h>

#include <CLI/CLI.hpp>
#include <fmt/core.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#ifdef TORCHREV_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#endif

#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <ctime>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

namespace {

using torchrev::models::StageMode;

struct Config {
  std::string model; // zoo name, "revnet-sweep" or "one-stage"
  std::string mode; // reversible, stored, checkpointed, hybrid
  std::vector<int64_t> units; // sweep only
  int64_t batch = 32;
  int64_t depth = 0; // transformers: blocks (0: the model's own)
};

struct Sample {
  std::vector<double> seconds;
  std::vector<double> peaks;
  int64_t params = 0;
  long maxrss_kib = 0;
};

double median(std::vector<double> v) {
  if (v.empty()) {
    return 0.0;
  }
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

long maxrss_kib() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_maxrss;
}

StageMode stage_mode(const std::string& mode) {
  if (mode == "stored")
    return StageMode::kStored;
  if (mode == "checkpointed")
    return StageMode::kCheckpointed;
  return StageMode::kReversible;
}

std::shared_ptr<torchrev::models::ImageClassifier> build(const Config& c) {
  if (c.model == "one-stage") {
    // RevLib's benchmark shape: a stem convolution and one stage of basic
    // blocks on 16 + 16 channels at 32x32 (then the head and classifier).
    return std::make_shared<torchrev::models::RevNetImpl>(
        torchrev::models::RevNetOptions()
            .units(c.units)
            .channels({32, 32})
            .mode(stage_mode(c.mode)));
  }
  if (c.model == "revnet-sweep") {
    return std::make_shared<torchrev::models::RevNetImpl>(
        torchrev::models::RevNetOptions()
            .units(c.units)
            .channels({32, 32, 64, 128})
            .mode(stage_mode(c.mode))
            .checkpoint_transitions(c.mode == "hybrid"));
  }
  return torchrev::models::create(
      c.model,
      torchrev::models::ZooOptions()
          .mode(stage_mode(c.mode))
          .checkpoint_transitions(c.mode == "hybrid")
          .depth(c.depth));
}

class Meter {
 public:
  explicit Meter(torch::Device device) : device_(device) {}
  size_t current() const {
#ifdef TORCHREV_CUDA
    if (device_.is_cuda()) {
      return c10::cuda::CUDACachingAllocator::getDeviceStats(device_.index())
          .allocated_bytes[0]
          .current;
    }
#endif
    return torchrev::CPUMemoryMeter::instance().current_bytes();
  }
  void reset_peak() const {
#ifdef TORCHREV_CUDA
    if (device_.is_cuda()) {
      c10::cuda::CUDACachingAllocator::resetPeakStats(device_.index());
      return;
    }
#endif
    torchrev::CPUMemoryMeter::instance().reset_peak();
  }
  size_t peak() const {
#ifdef TORCHREV_CUDA
    if (device_.is_cuda()) {
      return c10::cuda::CUDACachingAllocator::getDeviceStats(device_.index())
          .allocated_bytes[0]
          .peak;
    }
#endif
    return torchrev::CPUMemoryMeter::instance().peak_bytes();
  }
  void synchronize() const {
#ifdef TORCHREV_CUDA
    if (device_.is_cuda()) {
      c10::cuda::device_synchronize();
    }
#endif
  }

 private:
  torch::Device device_;
};

struct Runner {
  torch::Device device{torch::kCPU};
  bool channels_last = true;

  /// Builds the model, runs a warm-up step and `steps` timed steps; appends
  /// to `sample`. Throws c10::OutOfMemoryError past a budget.
  void measure(const Config& c, Sample& sample, int64_t steps_to_time) const {
    Meter meter(device);
    torch::manual_seed(0);
    auto model = build(c);
    model->to(device);
    if (channels_last) {
      torchrev::models::use_channels_last(*model);
    }
    sample.params = torchrev::models::parameter_count(*model);
    if (steps_to_time == 0) {
      sample.maxrss_kib = maxrss_kib();
      return;
    }
    torch::optim::SGD optimizer(
        model->parameters(),
        torch::optim::SGDOptions(0.01).momentum(0.9).weight_decay(2e-4));
    auto images = torch::randn({c.batch, 3, 32, 32})
                      .to(device)
                      .contiguous(
                          channels_last ? torch::MemoryFormat::ChannelsLast
                                        : torch::MemoryFormat::Contiguous);
    auto labels = torch::randint(10, {c.batch}).to(device);
    auto step = [&] {
      auto loss =
          torch::nn::functional::cross_entropy(model->forward(images), labels);
      loss.backward();
      optimizer.step();
    };
    step(); // warm-up: gradients and momentum buffers now exist
    for (int64_t s = 0; s < steps_to_time; ++s) {
      for (auto& p : model->parameters()) {
        p.mutable_grad().zero_(); // keep, don't free: not activation memory
      }
      meter.synchronize();
      const size_t before = meter.current();
      meter.reset_peak();
      const auto start = std::chrono::steady_clock::now();
      step();
      meter.synchronize();
      const double seconds = std::chrono::duration<double>(
                                 std::chrono::steady_clock::now() - start)
                                 .count();
      sample.seconds.push_back(seconds);
      sample.peaks.push_back(double(meter.peak() - before));
    }
    sample.maxrss_kib = maxrss_kib();
  }

  /// The largest batch whose training step fits `budget` bytes of
  /// activation memory on top of the model (CPU meter budget).
  int64_t largest_batch(Config c, size_t budget) const {
    auto& cpu = torchrev::CPUMemoryMeter::instance();
    auto fits = [&](int64_t batch) {
      c.batch = batch;
      // Build and warm up under no budget, then enforce it for one step.
      torch::manual_seed(0);
      auto model = build(c);
      if (channels_last) {
        torchrev::models::use_channels_last(*model);
      }
      auto images = torch::randn({batch, 3, 32, 32})
                        .contiguous(
                            channels_last ? torch::MemoryFormat::ChannelsLast
                                          : torch::MemoryFormat::Contiguous);
      auto labels = torch::randint(10, {batch});
      torch::optim::SGD optimizer(
          model->parameters(), torch::optim::SGDOptions(0.01).momentum(0.9));
      for (auto& p : model->parameters()) {
        p.mutable_grad() = torch::zeros_like(p);
      }
      optimizer.step(); // momentum buffers
      cpu.set_budget(cpu.current_bytes() + budget);
      bool ok = true;
      try {
        torch::nn::functional::cross_entropy(model->forward(images), labels)
            .backward();
        optimizer.step();
      } catch (const c10::OutOfMemoryError&) {
        ok = false;
      }
      cpu.set_budget(0);
      return ok;
    };
    int64_t lo = 0, hi = 8;
    while (fits(hi)) {
      lo = hi;
      hi *= 2;
      if (hi > (1 << 16)) {
        return lo;
      }
    }
    while (hi - lo > std::max<int64_t>(1, lo / 32)) { // within ~3%
      const int64_t mid = (lo + hi) / 2;
      (fits(mid) ? lo : hi) = mid;
    }
    return lo;
  }
};

std::vector<std::string> split_list(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (!item.empty()) {
      out.push_back(item);
    }
  }
  return out;
}

nlohmann::json machine_info(int threads, const torch::Device& device) {
  std::string cpu = "unknown";
  std::ifstream cpuinfo("/proc/cpuinfo");
  for (std::string line; std::getline(cpuinfo, line);) {
    if (line.rfind("model name", 0) == 0) {
      cpu = line.substr(line.find(':') + 2);
      break;
    }
  }
  char host[256] = {0};
  gethostname(host, sizeof(host) - 1);
  const std::time_t now = std::time(nullptr);
  char date[32];
  std::strftime(date, sizeof(date), "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
  return {
      {"cpu", cpu},
      {"logical_cores", sysconf(_SC_NPROCESSORS_ONLN)},
      {"threads", threads},
      {"device", device.str()},
      {"libtorch", TORCH_VERSION},
      {"torchrev", TORCHREV_VERSION_STRING},
      {"date", date}};
}

} // namespace

int main(int argc, char** argv) {
  torchrev::CPUMemoryMeter::install();

  std::string models =
      "resnet32,resnet110,resnet164,revnet38,revnet110,revnet164";
  std::string modes = "reversible,stored,checkpointed,hybrid";
  std::string sweep_units, depths;
  std::string sweep_modes = "reversible,stored";
  int64_t stage_blocks = 0;
  int64_t batch = 32, steps = 3, repeats = 3;
  int threads = 0;
  torch::DeviceType device_type = torch::kCPU;
  std::string json_path;
  double budget_mib = 0;
  bool channels_last = true;

  CLI::App app{"Peak activation memory and step time of torchrev's model zoo."};
  app.add_option("--models", models, "comma-separated zoo models")
      ->capture_default_str();
  app.add_option(
         "--modes",
         modes,
         "RevNet modes: reversible, stored, checkpointed, hybrid")
      ->capture_default_str();
  app.add_option("--batch", batch, "images per step")->capture_default_str();
  app.add_option(
         "--steps",
         steps,
         "timed steps after one warm-up step (0: build the model and exit)")
      ->capture_default_str();
  app.add_option(
         "--repeats", repeats, "interleaved repeats of every configuration")
      ->capture_default_str();
  app.add_option(
         "--threads", threads, "intra-op threads (0: LibTorch's default)")
      ->capture_default_str();
  const std::map<std::string, torch::DeviceType> devices{
      {"cpu", torch::kCPU}, {"cuda", torch::kCUDA}};
  app.add_option_function<std::string>(
         "--device",
         [&](const std::string& word) { device_type = devices.at(word); },
         "where to measure")
      ->check(CLI::IsMember(devices))
      ->default_str("cpu");
  app.add_option("--json", json_path, "write the results as JSON to this file");
  app.add_option(
      "--depth",
      depths,
      "transformers (vit_mini, revvit_mini): comma-separated numbers of "
      "blocks to measure, e.g. 6,12,24 (default: the model's own)");
  app.add_option(
      "--sweep-units",
      sweep_units,
      "depth sweep instead of the zoo: units per stage, e.g. 3,9,18,36,72 (RevNet-110 widths)");
  app.add_option("--sweep-modes", sweep_modes, "modes of the depth sweep")
      ->capture_default_str();
  app.add_option(
      "--stage-blocks",
      stage_blocks,
      "instead of the zoo: a stem convolution and one stage of this many "
      "basic blocks (16 + 16 channels, 32x32), in the --sweep-modes");
  app.add_option(
         "--budget-mib",
         budget_mib,
         "also find the largest batch whose step fits this activation budget (CPU)")
      ->capture_default_str();
  app.add_option(
         "--channels-last",
         channels_last,
         "NHWC tensors (fast CPU convolutions)")
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  try {
    if (threads > 0) {
      torch::set_num_threads(threads);
    }
    Runner runner;
    runner.device = device_type == torch::kCUDA ? torch::Device(torch::kCUDA, 0)
                                                : torch::Device(torch::kCPU);
    TORCH_CHECK(
        !runner.device.is_cuda() || torch::cuda::is_available(),
        "--device cuda: no CUDA device is available");
    runner.channels_last = channels_last;
    TORCH_CHECK(
        steps >= 0 && repeats >= 1 && batch >= 1,
        "--steps must be >= 0, --repeats and --batch >= 1");

    std::vector<Config> configs;
    TORCH_CHECK(
        stage_blocks == 0 || sweep_units.empty(),
        "--stage-blocks and --sweep-units exclude each other");
    if (stage_blocks != 0) {
      TORCH_CHECK(
          stage_blocks >= 1, "--stage-blocks must be >= 1, got ", stage_blocks);
      for (const auto& mode : split_list(sweep_modes)) {
        configs.push_back({"one-stage", mode, {stage_blocks}, batch});
      }
    } else if (!sweep_units.empty()) {
      for (const auto& u : split_list(sweep_units)) {
        const int64_t n = std::stoll(u);
        TORCH_CHECK(n >= 2, "--sweep-units: each entry must be >= 2, got ", n);
        for (const auto& mode : split_list(sweep_modes)) {
          configs.push_back({"revnet-sweep", mode, {n, n, n}, batch});
        }
      }
    } else {
      const auto names = torchrev::models::model_names();
      std::vector<int64_t> depth_list;
      for (const auto& d : split_list(depths)) {
        const int64_t n = std::stoll(d);
        TORCH_CHECK(n >= 1, "--depth: each entry must be >= 1, got ", n);
        depth_list.push_back(n);
      }
      for (const auto& m : split_list(models)) {
        TORCH_CHECK(
            std::find(names.begin(), names.end(), m) != names.end(),
            "--models: unknown model '",
            m,
            "'");
        using torchrev::models::is_transformer;
        std::vector<int64_t> model_depths = {0};
        if (is_transformer(m) && !depth_list.empty()) {
          model_depths = depth_list;
        }
        for (const int64_t depth : model_depths) {
          if (!torchrev::models::is_reversible(m)) {
            configs.push_back({m, "stored", {}, batch, depth});
            continue;
          }
          for (const auto& mode : split_list(modes)) {
            TORCH_CHECK(
                mode == "reversible" || mode == "stored" ||
                    mode == "checkpointed" || mode == "hybrid",
                "--modes: unknown mode '",
                mode,
                "'");
            if (mode == "hybrid" &&
                (torchrev::models::is_fully_reversible(m) ||
                 is_transformer(m))) {
              continue; // no transition blocks to checkpoint
            }
            configs.push_back({m, mode, {}, batch, depth});
          }
        }
      }
    }

    std::vector<Sample> samples(configs.size());
    for (int64_t r = 0; r < (steps == 0 ? 1 : repeats); ++r) {
      for (size_t i = 0; i < configs.size(); ++i) {
        runner.measure(configs[i], samples[i], steps);
        fmt::print(
            stderr,
            "repeat {}/{}: {} {} done\n",
            r + 1,
            repeats,
            configs[i].model,
            configs[i].mode);
      }
    }

    nlohmann::json results = nlohmann::json::array();
    fmt::print(
        "{:<14} {:<13} {:>6} {:>10} {:>14} {:>10} {:>11}\n",
        "model",
        "mode",
        "batch",
        "params",
        "peak act. MiB",
        "step s",
        "maxrss MiB");
    for (size_t i = 0; i < configs.size(); ++i) {
      const auto& c = configs[i];
      const auto& s = samples[i];
      const double peak = median(s.peaks);
      const double secs = median(s.seconds);
      std::string name = c.model;
      if (c.model == "one-stage") {
        name = fmt::format("stage-{}", c.units[0]);
      } else if (!c.units.empty()) {
        name = fmt::format("revnet-{}x3", c.units[0]);
      } else if (c.depth > 0) {
        name = fmt::format("{}-d{}", c.model, c.depth);
      }
      fmt::print(
          "{:<14} {:<13} {:>6} {:>10} {:>14.1f} {:>10.3f} {:>11.1f}\n",
          name,
          c.mode,
          c.batch,
          s.params,
          peak / (1 << 20),
          secs,
          s.maxrss_kib / 1024.0);
      nlohmann::json row = {
          {"model", name},
          {"mode", c.mode},
          {"batch", c.batch},
          {"threads", torch::get_num_threads()},
          {"params", s.params},
          {"peak_activation_bytes", static_cast<int64_t>(peak)},
          {"step_seconds", secs},
          {"maxrss_kib", s.maxrss_kib},
          {"repeats", s.seconds.size() / std::max<int64_t>(steps, 1)},
          {"step_seconds_all", s.seconds}};
      if (!c.units.empty()) {
        row["units_per_stage"] = c.units[0];
      }
      if (c.depth > 0) {
        row["depth"] = c.depth;
      }
      results.push_back(row);
    }

    if (budget_mib > 0) {
      const size_t budget = static_cast<size_t>(budget_mib * (1 << 20));
      fmt::print(
          "\nlargest batch whose training step fits {} MiB of activations:\n",
          budget_mib);
      for (size_t i = 0; i < configs.size(); ++i) {
        const int64_t b = runner.largest_batch(configs[i], budget);
        fmt::print(
            "{:<14} {:<13} {:>6}\n",
            results[i]["model"].get<std::string>(),
            configs[i].mode,
            b);
        results[i]["largest_batch"] = b;
        results[i]["budget_bytes"] = budget;
      }
    }

    if (!json_path.empty()) {
      nlohmann::json doc = {
          {"machine", machine_info(torch::get_num_threads(), runner.device)},
          {"command",
           [&] {
             std::string cmd;
             for (int a = 0; a < argc; ++a) {
               cmd += (a ? " " : "") + std::string(argv[a]);
             }
             return cmd;
           }()},
          {"results", results}};
      const std::string tmp = json_path + ".tmp";
      {
        std::ofstream out(tmp);
        out << doc.dump(2) << "\n";
        TORCH_CHECK(out.good(), "cannot write ", tmp);
      }
      std::rename(tmp.c_str(), json_path.c_str());
    }
  } catch (const c10::Error& e) {
    const std::string m = e.what_without_backtrace();
    fmt::print(stderr, "memory_bench: error: {}\n", m.substr(0, m.find('\n')));
    return 1;
  } catch (const std::exception& e) {
    fmt::print(stderr, "memory_bench: error: {}\n", e.what());
    return 1;
  }
  return 0;
}
