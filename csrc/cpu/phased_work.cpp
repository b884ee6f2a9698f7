#include "cpu/phased_work.h"

#include <atomic>
#include <cstdlib>
#include <thread>

namespace lora_ops::cpu {

namespace {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Spins before yielding: the items waited for are tiles already running on the other threads,
// microseconds from done; a thread descheduled meanwhile (shared cores) is waited for by yields.
constexpr int kSpinsBeforeYield = 1 << 12;

void wait_for(const std::atomic<int64_t>& finished, int64_t items) {
  for (int spins = 0; finished.load(std::memory_order_acquire) < items; ++spins) {
    if (spins < kSpinsBeforeYield) {
      cpu_relax();
    } else {
      std::this_thread::yield();
    }
  }
}

}  // namespace

void PhasedWork::add(int64_t items, ItemFn body) {
  if (items <= 0) return;
  if (parts_count_ == kMaxParts) std::abort();
  parts_[parts_count_++] = Part{total_, total_ + items, phase_, body};
  phase_items_[phase_] += items;
  total_ += items;
}

void PhasedWork::barrier() {
  if (phase_items_[phase_] > 0) ++phase_;  // an empty phase is no barrier
}

bool PhasedWork::run(bool threaded) const {
  if (total_ == 0) return true;
  std::atomic<int64_t> next{0};
  std::array<std::atomic<int64_t>, kMaxParts> finished{};  // items finished, per phase
  std::atomic<bool> failed{false};
#pragma omp parallel if (threaded && total_ > 1)
  {
    int p = 0;
    for (;;) {
      const int64_t item = next.fetch_add(1, std::memory_order_relaxed);
      if (item >= total_) break;
      while (item >= parts_[p].end) ++p;  // items are taken in order: p only grows
      const Part& part = parts_[p];
      if (part.phase > 0) wait_for(finished[part.phase - 1], phase_items_[part.phase - 1]);
      if (!part.body(item - part.begin)) failed.store(true, std::memory_order_relaxed);
      finished[part.phase].fetch_add(1, std::memory_order_release);
    }
  }
  return !failed.load(std::memory_order_relaxed);
}

}  // namespace lora_ops::cpu
