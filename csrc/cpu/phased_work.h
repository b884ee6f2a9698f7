// Dependent products of one kernel in one parallel region.
//
// A kernel such as the fused forward runs several products in a row (the shrink, then the
// expand, then the base GEMM), each needing the one before it complete. Run as one OpenMP region
// each, every product pays for waking the thread team, and with sleeping waiters
// (OMP_WAIT_POLICY=PASSIVE, what shared cores need) that costs ~50 us per region on the 2-core
// VMs, against ~0.5 us with spinning ones: more than a decode-sized adapter product itself.
// PhasedWork runs the work items of several phases in one region instead: threads take items in
// order from one shared counter, and an item of phase p (the work added between the p-th and the
// p+1-th barrier()) starts once every item of phase p - 1 has finished (a short spin on that phase's count of finished items, then yields, while the
// other threads finish theirs).
//
// Cannot deadlock: items are taken in index order, so every item of an earlier phase has already
// been taken by a running thread when a later one waits for it, and the first unfinished item
// never waits. Work items are the tiles of the packed GEMM, whose sums do not depend on the
// tiling or on which thread runs them, so results do not depend on the thread count.
#ifndef LORA_OPS_CPU_PHASED_WORK_H_
#define LORA_OPS_CPU_PHASED_WORK_H_

#include <array>
#include <cstdint>

namespace lora_ops::cpu {

// A non-owning reference to a callable bool(int64_t item), which must outlive the reference
// (the kernels' lambdas and tile plans on their own stack frames): no allocation per phase.
class ItemFn {
 public:
  ItemFn() = default;
  template <class F>
  ItemFn(const F& f)  // NOLINT: implicit, so a phase takes any callable
      : object_(&f), call_([](const void* o, int64_t item) {
          return static_cast<bool>((*static_cast<const F*>(o))(item));
        }) {}
  // A temporary would be gone before the work runs.
  template <class F>
  ItemFn(const F&&) = delete;
  bool operator()(int64_t item) const { return call_(object_, item); }

 private:
  const void* object_ = nullptr;
  bool (*call_)(const void*, int64_t) = nullptr;
};

class PhasedWork {
 public:
  static constexpr int kMaxParts = 16;  // a part per slice (LORA_MAX_SLICES) and more

  // Appends `items` work items, body(0 .. items - 1), each returning false on failure, to the
  // current phase; nothing for items <= 0. More than kMaxParts parts is a programming error.
  void add(int64_t items, ItemFn body);
  // Starts the next phase: what is added from here on waits for what was added before.
  void barrier();

  // Runs every item, on the thread team when `threaded` and there are two items or more, else on
  // the calling thread in order. False if any item failed (every item still runs).
  bool run(bool threaded) const;

  int64_t items() const { return total_; }

 private:
  struct Part {
    int64_t begin, end;  // its items, numbered over all parts
    int phase;
    ItemFn body;
  };
  std::array<Part, kMaxParts> parts_{};
  std::array<int64_t, kMaxParts> phase_items_{};
  int parts_count_ = 0;
  int phase_ = 0;
  int64_t total_ = 0;
};

}  // namespace lora_ops::cpu

#endif  // LORA_OPS_CPU_PHASED_WORK_H_
