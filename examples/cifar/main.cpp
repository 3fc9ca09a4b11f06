// cifar_train: trains a torchrev zoo model on CIFAR-10/100 or Fashion-MNIST.
//
// With no arguments it runs the embedded default: revnet_mini on
// Fashion-MNIST (Debian's dataset-fashion-mnist) for 1200 steps of 128 images
// with a one-cycle learning rate. It ends by printing
//   test_accuracy=<fraction>
//   peak_memory_bytes=<bytes>
//   param_checksum=<number>
// on their own lines. See README.md for the flags.

#include "trainer.h"

#include <CLI/CLI.hpp>
#include <fmt/core.h>

#if defined(__GLIBC__) && !defined(TORCHREV_TCMALLOC)
#include <malloc.h>
#endif

#include <cmath>
#include <csignal>
#include <cstdlib>
#include <iostream>
#include <string>
#include <vector>

namespace {

std::string first_line(const std::string& message) {
  return cifar::detail::first_line_of(message);
}

/// An option taking one of the words `cifar::choices` lists for `Enum`
/// (config.h) and storing the value it names; any other word is CLI11's
/// one-line error naming the flag, the word and the choices.
template <typename Enum>
CLI::Option* add_choice(
    CLI::App& app,
    const std::string& flag,
    Enum& target,
    const std::string& help) {
  std::vector<std::string> words;
  for (const auto& choice : cifar::choices(Enum{})) {
    words.push_back(choice.first);
  }
  auto store = [&target](const std::string& word) {
    for (const auto& choice : cifar::choices(Enum{})) {
      if (choice.first == word) {
        target = choice.second;
      }
    }
  };
  return app.add_option_function<std::string>(flag, store, help)
      ->check(CLI::IsMember(words))
      ->default_str(cifar::name_of(target));
}

} // namespace

int main(int argc, char** argv) {
  // Count every CPU allocation from the start.
  torchrev::CPUMemoryMeter::install();
  // Late in training, tiny gradients and momentum values become denormal
  // floats, which slow CPU arithmetic down severalfold; flush them to zero.
  at::globalContext().setFlushDenormal(true);
  // Past a file-size limit (ulimit -f), fail the write with EFBIG and a
  // clear error instead of dying from the signal.
  std::signal(SIGXFSZ, SIG_IGN);
  // SIGINT/SIGTERM: finish the current step, write a checkpoint if one was
  // asked for, and exit with a message (a second signal kills as usual).
  for (int sig : {SIGINT, SIGTERM}) {
    struct sigaction action {};
    action.sa_handler = [](int received) {
      cifar::Trainer::stop_signal().store(received);
      struct sigaction fallback {};
      fallback.sa_handler = SIG_DFL;
      ::sigaction(received, &fallback, nullptr);
    };
    sigemptyset(&action.sa_mask);
    ::sigaction(sig, &action, nullptr);
  }
#if defined(__GLIBC__) && !defined(TORCHREV_TCMALLOC)
  // Activations of a few MB are allocated and freed at every step; served by
  // mmap/munmap they cost page faults (measured: ~15% of the step time).
  // Keep them in the heap instead. (Not needed, and without effect, when
  // the build links tcmalloc.)
  mallopt(M_MMAP_THRESHOLD, 256 << 20);
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
#endif

  cifar::TrainConfig config;
  cifar::DistributedOptions& dist = config.distributed;
  try {
    dist = cifar::DistributedOptions::from_environment();
  } catch (const std::exception& e) {
    fmt::print(stderr, "cifar_train: error: {}\n", first_line(e.what()));
    return 2;
  }

  CLI::App app{
      "Train a torchrev model zoo network on CIFAR-10/100 or Fashion-MNIST."};
  app.add_option(
         "--model",
         config.model,
         "revnet_mini, revnet38, revnet110, revnet164, resnet32, resnet110, "
         "resnet164, a RevNet fully reversible: revnet_mini_inv, "
         "revnet38_inv, revnet110_inv, revnet164_inv, or a vision "
         "transformer: vit_mini, revvit_mini (reversible)")
      ->capture_default_str();
  app.add_option(
         "--dataset",
         config.dataset,
         "auto, cifar10, cifar100 or fashion-mnist")
      ->capture_default_str();
  app.add_option(
      "--data-dir",
      config.data_dir,
      "folder with the data set files (never downloaded)");
  app.add_option(
         "--epochs", config.epochs, "epochs to train (0: use --max-steps)")
      ->capture_default_str();
  app.add_option(
         "--max-steps",
         config.max_steps,
         "stop after this many steps (0: use --epochs; both 0: 1200)")
      ->capture_default_str();
  app.add_option(
         "--batch-size", config.batch_size, "images per step (per rank)")
      ->capture_default_str();
  add_choice(
      app,
      "--optimizer",
      config.optimizer,
      "auto: AdamW for the transformers, SGD otherwise");
  app.add_option(
         "--lr",
         config.lr,
         "peak learning rate (0: 0.1 for SGD, 0.002 for AdamW)")
      ->capture_default_str();
  add_choice(app, "--schedule", config.schedule, "learning-rate schedule");
  app.add_option("--momentum", config.momentum, "SGD momentum")
      ->capture_default_str();
  app.add_option(
         "--weight-decay",
         config.weight_decay,
         "weight decay (AdamW: decoupled)")
      ->capture_default_str();
  app.add_option(
         "--threads",
         config.threads,
         "intra-op threads (0: LibTorch's default, one per core or as "
         "OMP_NUM_THREADS says, or every usable CPU where it finds one core)")
      ->capture_default_str();
  app.add_option(
         "--seed",
         config.seed,
         "seed for initialisation, shuffling and augmentation")
      ->capture_default_str();
  add_choice(app, "--device", config.device, "where to train");
  app.add_option(
         "--eval-every",
         config.eval_every,
         "evaluate on the test set every N steps (0: at the end)")
      ->capture_default_str();
  app.add_option(
         "--log-every",
         config.log_every,
         "a progress line / metrics row every N steps (0: ~20 per run)")
      ->capture_default_str();
  app.add_option(
      "--metrics", config.metrics, "write metrics rows to this CSV file");
  app.add_option(
      "--checkpoint",
      config.checkpoint,
      "checkpoint file (written atomically)");
  app.add_option(
         "--checkpoint-every",
         config.checkpoint_every,
         "checkpoint every N steps (0: at each evaluation)")
      ->capture_default_str();
  app.add_flag(
      "--resume",
      config.resume,
      "continue from --checkpoint (under torchrun: if it exists, so that a "
      "restarted group continues)");
  app.add_flag(
      "--resume-if-exists",
      config.resume_if_exists,
      "continue from --checkpoint if it exists, else start afresh");
  app.add_option(
         "--stop-after",
         config.stop_after,
         "stop after this step as if interrupted (0: never)")
      ->capture_default_str();
  add_choice(
      app,
      "--augment",
      config.augment,
      "random crops and flips (auto: CIFAR only)");
  app.add_option(
         "--channels-last",
         config.channels_last,
         "channels-last (NHWC) tensors, much faster convolutions on CPU")
      ->capture_default_str();
  app.add_flag("--quiet", config.quiet, "no progress output");
  app.add_option(
         "--world-size",
         dist.world_size,
         "number of processes (env WORLD_SIZE)")
      ->capture_default_str();
  app.add_option("--rank", dist.rank, "this process's rank (env RANK)")
      ->capture_default_str();
  app.add_option(
         "--master-addr",
         dist.master_addr,
         "rank 0's address (env MASTER_ADDR)")
      ->capture_default_str();
  app.add_option(
         "--master-port", dist.master_port, "rank 0's port (env MASTER_PORT)")
      ->capture_default_str();
  app.add_option(
         "--local-rank,--local_rank",
         dist.local_rank,
         "rank on this machine: the CUDA device used (env LOCAL_RANK)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  double timeout_s = dist.timeout.count() / 1000.0;
  app.add_option(
         "--dist-timeout",
         timeout_s,
         "seconds to wait for peers before failing")
      ->capture_default_str();

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() != 0) {
      fmt::print(stderr, "cifar_train: error: {}\n", first_line(e.what()));
      return e.get_exit_code();
    }
    return app.exit(e); // --help
  }
  // At most a week: beyond that the cast to milliseconds is not meaningful.
  if (!std::isfinite(timeout_s) || timeout_s <= 0 || timeout_s > 7 * 86400) {
    fmt::print(
        stderr,
        "cifar_train: error: --dist-timeout {}: expected seconds in (0, "
        "604800]\n",
        timeout_s);
    return 2;
  }
  dist.timeout = std::chrono::milliseconds(
      std::max<int64_t>(1, static_cast<int64_t>(timeout_s * 1000)));
  // torchrun restarts the whole group with the same command line: the first
  // attempt has no checkpoint yet, the later ones continue from it.
  // (Only a well-formed --resume: the flag errors name what was typed.)
  if (config.resume && !config.resume_if_exists && !config.checkpoint.empty() &&
      !dist.elastic_run_id.empty()) {
    config.resume = false;
    config.resume_if_exists = true;
  }

  try {
    cifar::Trainer trainer(config);
    const auto& data = trainer.dataset();
    if (trainer.is_main_rank()) {
      fmt::print(
          stderr,
          "cifar_train: dataset {} ({} train / {} test images{}), model {} "
          "({} parameters), {} steps of {} images{}, {} with peak lr {}, "
          "{} intra-op thread{}\n",
          data.name,
          data.train.size(),
          data.test.size(),
          config.dataset == "auto" ? ", chosen by --dataset auto" : "",
          config.model,
          torchrev::models::parameter_count(*trainer.model()),
          trainer.total_steps(),
          config.batch_size,
          dist.enabled() ? fmt::format(" per rank on {} ranks", dist.world_size)
                         : "",
          trainer.config().optimizer == cifar::OptimizerKind::kAdamW ? "AdamW"
                                                                     : "SGD",
          trainer.config().lr,
          torch::get_num_threads(),
          torch::get_num_threads() == 1 ? "" : "s");
    }
    if (trainer.is_main_rank() && trainer.resumed_from()) {
      fmt::print(
          stderr,
          "cifar_train: resumed from step {} of {} ({}){}\n",
          *trainer.resumed_from(),
          trainer.total_steps(),
          config.checkpoint,
          dist.restart_count > 0
              ? fmt::format(" after restart {}", dist.restart_count)
              : "");
    } else if (trainer.is_main_rank() && config.resume_if_exists) {
      fmt::print(
          stderr,
          "cifar_train: no checkpoint {} yet; starting at step 0\n",
          config.checkpoint);
    }
    const auto result = trainer.run();
    if (trainer.is_main_rank()) {
      fmt::print(
          stderr,
          "cifar_train: ran {} steps ({} to {}) in {:.1f} s, {:.0f} images/s "
          "in training\n",
          result.steps_run,
          result.steps - result.steps_run,
          result.steps,
          result.seconds,
          result.train_images_per_s);
    }
    if (result.stopped_by_signal != 0) {
      const int sig = result.stopped_by_signal;
      fmt::print(
          stderr,
          "cifar_train: error: stopped by {} after step {} of {}{}\n",
          sig > 0 ? (sig == SIGINT        ? "SIGINT"
                         : sig == SIGTERM ? "SIGTERM"
                                          : "a signal")
                  : "another rank's signal",
          result.steps,
          trainer.total_steps(),
          config.checkpoint.empty()
              ? "; no --checkpoint was given, so the progress is lost"
              : "; checkpoint " + config.checkpoint +
                  " holds it (continue with --resume)");
      return sig > 0 ? 128 + sig : 1;
    }
    if (trainer.is_main_rank() && result.steps == trainer.total_steps()) {
      fmt::print("test_accuracy={:.4f}\n", result.test_accuracy);
      fmt::print("peak_memory_bytes={}\n", result.peak_memory_bytes);
      fmt::print("eval_peak_memory_bytes={}\n", result.eval_peak_memory_bytes);
    } else if (trainer.is_main_rank()) {
      fmt::print(
          stderr,
          "cifar_train: stopped after step {} of {} as --stop-after asked{}\n",
          result.steps,
          trainer.total_steps(),
          config.checkpoint.empty()
              ? ""
              : "; continue with --resume from the last checkpoint");
    }
    fmt::print("param_checksum={:.10e}\n", result.param_checksum);
  } catch (const c10::Error& e) {
    fmt::print(
        stderr,
        "cifar_train: error: {}\n",
        first_line(e.what_without_backtrace()));
    return 1;
  } catch (const std::exception& e) {
    fmt::print(stderr, "cifar_train: error: {}\n", first_line(e.what()));
    return 1;
  }
  return 0;
}
