#pragma once

// Which reversible blocks of a model really train without storing their
// activations.
//
// A `RevBlock` saves memory only inside a `RevSequential`: called on its own,
// or in a `torch::nn::Sequential`, it trains with plain autograd and stores
// its activations like any module, which is correct but easy to miss. An
// `ActivationAudit` records, while it is alive on the current thread, every
// block and stage that runs:
//
//     torchrev::ActivationAudit audit;
//     auto loss = model->forward(x).sum();
//     std::cout << audit.report(*model);
//
// prints, for example,
//
//     torchrev activation audit: 2 of 3 recorded parts store activations
//       stages.0 (torchrev::RevSequential, 8 blocks): reversible, keeps only
//       its output block (torchrev::RevBlock (MyBlockImpl)): STORES ACTIVATIONS
//       (plain autograd outside a RevSequential)
//       ...
//
// Only torchrev's blocks and stages are recorded (plain modules always store
// what their backward needs). Recording costs a map look-up per block call
// and nothing when no audit is alive.

#include <torch/nn/module.h>

#include <cstdint>
#include <map>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace torchrev {

/// One block or stage seen by an `ActivationAudit`.
struct AuditEntry {
  /// The module that ran (to find its name in a model).
  const torch::nn::Module* module = nullptr;
  /// How torchrev describes it, e.g. "torchrev::RevSequential, 8 blocks".
  std::string kind;
  /// True when it ran with plain autograd and kept its activations.
  bool stores_activations = false;
  /// How many times it ran while the audit was alive.
  int64_t calls = 0;
};

class ActivationAudit;

namespace detail {

inline ActivationAudit*& current_audit() {
  static thread_local ActivationAudit* audit = nullptr;
  return audit;
}

} // namespace detail

/// Records, while alive, every torchrev block and stage that runs on this
/// thread and whether it stored its activations. Audits nest: the innermost
/// one records.
class ActivationAudit {
 public:
  ActivationAudit() : previous_(detail::current_audit()) {
    detail::current_audit() = this;
  }
  ~ActivationAudit() {
    detail::current_audit() = previous_;
  }
  ActivationAudit(const ActivationAudit&) = delete;
  ActivationAudit& operator=(const ActivationAudit&) = delete;

  /// Everything recorded, in the order it first ran.
  const std::vector<AuditEntry>& entries() const {
    return entries_;
  }

  /// The entries that stored activations.
  std::vector<AuditEntry> storing() const {
    std::vector<AuditEntry> out;
    for (const auto& e : entries_) {
      if (e.stores_activations) {
        out.push_back(e);
      }
    }
    return out;
  }

  /// A readable report; with `model`, parts are named by their path in it.
  std::string report(const torch::nn::Module* model = nullptr) const {
    std::map<const torch::nn::Module*, std::string> names;
    if (model != nullptr) {
      for (const auto& item : model->named_modules()) {
        names.emplace(item.value().get(), item.key());
      }
    }
    std::ostringstream out;
    out << "torchrev activation audit: " << storing().size() << " of "
        << entries_.size() << " recorded parts store activations\n";
    for (const auto& e : entries_) {
      auto name = names.find(e.module);
      out << "  "
          << (name != names.end() && !name->second.empty() ? name->second
                                                           : "(unnamed)")
          << " (" << e.kind << "): "
          << (e.stores_activations
                  ? "STORES ACTIVATIONS (plain autograd outside a "
                    "RevSequential)"
                  : "reversible, keeps no activations")
          << ", ran " << e.calls << (e.calls == 1 ? " time\n" : " times\n");
    }
    return out.str();
  }

  /// A model's `report` (see above).
  std::string report(const torch::nn::Module& model) const {
    return report(&model);
  }

  /// Records one run; called by torchrev's blocks and stages.
  void record(
      const torch::nn::Module* module,
      std::string kind,
      bool stores_activations) {
    auto key = std::make_pair(module, stores_activations);
    auto found = index_.find(key);
    if (found == index_.end()) {
      index_.emplace(key, entries_.size());
      entries_.push_back(
          AuditEntry{module, std::move(kind), stores_activations, 1});
    } else {
      ++entries_[found->second].calls;
    }
  }

 private:
  ActivationAudit* previous_;
  std::vector<AuditEntry> entries_;
  std::map<std::pair<const torch::nn::Module*, bool>, size_t> index_;
};

namespace detail {

/// Records `module` in the current thread's audit, if any; `kind` is only
/// evaluated then.
template <typename KindFn>
void audit(const torch::nn::Module* module, KindFn&& kind, bool stores) {
  if (auto* audit = current_audit()) {
    audit->record(module, kind(), stores);
  }
}

} // namespace detail
} // namespace torchrev
