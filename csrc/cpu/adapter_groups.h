// Rows of a multi-adapter batch grouped by adapter, so that each adapter's rows become one GEMM
// against that adapter's weights (read once per group instead of once per token), and the tiles
// of those GEMMs run as one list the threads share.
#ifndef LORA_OPS_CPU_ADAPTER_GROUPS_H_
#define LORA_OPS_CPU_ADAPTER_GROUPS_H_

#include <cstdint>
#include <vector>

#include "cpu/phased_work.h"
#include "lora_ops/common.h"

namespace lora_ops::cpu {

struct AdapterGroup {
  int32_t adapter;
  int64_t begin;  // rows[begin .. end) use `adapter`
  int64_t end;
};

struct AdapterGroups {
  std::vector<int64_t> rows;         // [M]: the rows of each group in order, then the idle rows
  std::vector<AdapterGroup> groups;  // adapters with at least one row and rank > 0
  int64_t idle_begin = 0;            // rows[idle_begin .. M) get no adapter work
};

// Groups the M rows of `index` (either form, see common.h). Rows whose adapter is -1, outside
// [0, L) or of rank 0 are idle. Rows keep their order within a group. LORA_ERR_INVALID_ARGUMENT
// for a malformed index (both or neither form, segments not covering 0 .. M in order).
lora_status_t group_rows_by_adapter(const lora_adapter_index_t& index, int64_t M, int64_t L,
                                    const int32_t* ranks, AdapterGroups& out);

// Whether every one of the L ranks lies in [0, r_max].
inline bool ranks_valid(const int32_t* ranks, int64_t L, int64_t r_max) {
  if (L == 0) return true;
  if (ranks == nullptr) return false;
  for (int64_t a = 0; a < L; ++a) {
    if (ranks[a] < 0 || ranks[a] > r_max) return false;
  }
  return true;
}

// A tile of the GEMM of one (slice, adapter group).
struct GroupTile {
  int64_t slice;
  int64_t group;
  int64_t i0, m, j0, n;
};

// body(tile) for every tile, spread over the threads; false if any body failed.
template <class Body>
bool run_tiles(const std::vector<GroupTile>& tiles, bool threaded, Body&& body) {
  const auto item = [&](int64_t t) { return body(tiles[t]); };
  PhasedWork work;
  work.add(static_cast<int64_t>(tiles.size()), item);
  return work.run(threaded);
}

}  // namespace lora_ops::cpu

#endif  // LORA_OPS_CPU_ADAPTER_GROUPS_H_
