#include "cpu/adapter_groups.h"

#include <cstddef>
#include <new>

namespace lora_ops::cpu {

namespace {

bool segments_valid(const lora_adapter_index_t& index, int64_t M) {
  const int64_t S = index.num_segments;
  if (S < 0 || (S > 0 && index.seg_adapter == nullptr)) return false;
  if (index.seg_indptr[0] != 0 || index.seg_indptr[S] != M) return false;
  for (int64_t s = 0; s < S; ++s) {
    if (index.seg_indptr[s + 1] < index.seg_indptr[s]) return false;
  }
  return true;
}

// Calls fn(row, bucket) for every row in order; bucket L means idle.
template <class Fn>
void for_each_row_bucket(const lora_adapter_index_t& index, int64_t M, int64_t L,
                         const int32_t* ranks, Fn&& fn) {
  const auto bucket = [&](int32_t a) -> int64_t {
    return (a >= 0 && a < L && ranks[a] > 0) ? a : L;
  };
  if (index.seg_indptr == nullptr) {
    for (int64_t i = 0; i < M; ++i) fn(i, bucket(index.token_adapter[i]));
    return;
  }
  for (int64_t s = 0; s < index.num_segments; ++s) {
    const int64_t b = bucket(index.seg_adapter[s]);
    for (int64_t i = index.seg_indptr[s]; i < index.seg_indptr[s + 1]; ++i) fn(i, b);
  }
}

}  // namespace

lora_status_t group_rows_by_adapter(const lora_adapter_index_t& index, int64_t M, int64_t L,
                                    const int32_t* ranks, AdapterGroups& out) {
  if (index.seg_indptr != nullptr) {
    if (index.token_adapter != nullptr || !segments_valid(index, M)) {
      return LORA_ERR_INVALID_ARGUMENT;
    }
  } else if (index.token_adapter == nullptr && M > 0) {
    return LORA_ERR_INVALID_ARGUMENT;
  }
  try {
    // A stable counting sort by adapter; bucket L collects the idle rows.
    std::vector<int64_t> next(static_cast<size_t>(L) + 2, 0);
    for_each_row_bucket(index, M, L, ranks, [&](int64_t, int64_t b) { ++next[b + 1]; });
    for (int64_t b = 0; b <= L; ++b) next[b + 1] += next[b];
    out.groups.clear();
    for (int64_t a = 0; a < L; ++a) {
      if (next[a + 1] > next[a]) {
        out.groups.push_back(AdapterGroup{static_cast<int32_t>(a), next[a], next[a + 1]});
      }
    }
    out.idle_begin = next[L];
    out.rows.assign(static_cast<size_t>(M), 0);
    for_each_row_bucket(index, M, L, ranks, [&](int64_t i, int64_t b) { out.rows[next[b]++] = i; });
  } catch (const std::bad_alloc&) {
    return LORA_ERR_UNSUPPORTED;
  }
  return LORA_OK;
}

}  // namespace lora_ops::cpu
