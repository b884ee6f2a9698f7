// Which adapter, rank and scaling each row of x gets. Every kernel that touches adapters asks
// here, so the rules of kernels.h live in one place: an index outside [0, L) means "no adapter"
// and is never dereferenced, a rank is clamped into [0, r_max], nothing past a rank is read.
// The single-adapter kernels use the same code with every row on adapter 0 (kUniform).
#ifndef LORA_OPS_CUDA_ADAPTER_MAP_CUH_
#define LORA_OPS_CUDA_ADAPTER_MAP_CUH_

#include <stdint.h>

#include "common.cuh"
#include "lora_ops/common.h"
#include "lora_ops/kernels.h"

namespace lora_ops {
namespace cuda {
namespace detail {

enum class RowMapMode : int32_t { kUniform, kToken, kSegment };

struct RowAdapterMap {
  RowMapMode mode;
  const int32_t* token_adapter;  // kToken: [M]
  const int32_t* seg_indptr;     // kSegment: [num_segments + 1]
  const int32_t* seg_adapter;    // kSegment: [num_segments]
  int64_t num_segments;
  int64_t num_adapters;  // L

  // Adapter of row m, or -1.
  __device__ int32_t adapter_of_row(int64_t m) const {
    int32_t a = 0;
    if (mode == RowMapMode::kToken) {
      a = token_adapter[m];
    } else if (mode == RowMapMode::kSegment) {
      a = segment_adapter(m);
    }
    return (a >= 0 && a < num_adapters) ? a : -1;
  }

  // seg_adapter of the segment holding row m, or -1. A binary search that only ever reads
  // seg_indptr[0 .. num_segments], so even a malformed index is never read out of bounds.
  __device__ int32_t segment_adapter(int64_t m) const {
    int64_t lo = 0, hi = num_segments;  // first s with seg_indptr[s] > m
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (seg_indptr[mid] <= m) {
        lo = mid + 1;
      } else {
        hi = mid;
      }
    }
    const int64_t s = lo - 1;
    if (s < 0 || m >= seg_indptr[s + 1]) return -1;
    return seg_adapter[s];
  }
};

struct RankInfo {
  const int32_t* ranks;      // device [L], or NULL: every adapter has uniform_rank
  const float* scalings;     // device [L], or NULL: scaling 1
  int64_t uniform_rank;
  int64_t r_max;

  __device__ int64_t rank_of(int32_t a) const {
    const int64_t rank = ranks != nullptr ? ranks[a] : uniform_rank;
    return rank < 0 ? 0 : (rank > r_max ? r_max : rank);
  }
  __device__ float scaling_of(int32_t a) const { return scalings != nullptr ? scalings[a] : 1.0f; }
};

// Host side: the map of a lora_adapter_index_t, or false when the index names no usable form
// (both forms, neither, or a negative segment count).
inline bool make_row_map(const lora_adapter_index_t& index, int64_t M, int64_t L,
                         RowAdapterMap* out) {
  RowAdapterMap map{};
  map.num_adapters = L;
  if (index.seg_indptr != nullptr) {
    if (index.token_adapter != nullptr || index.num_segments < 0) return false;
    if (index.num_segments > 0 && index.seg_adapter == nullptr) return false;
    map.mode = RowMapMode::kSegment;
    map.seg_indptr = index.seg_indptr;
    map.seg_adapter = index.seg_adapter;
    map.num_segments = index.num_segments;
  } else {
    if (index.token_adapter == nullptr && M > 0) return false;
    map.mode = RowMapMode::kToken;
    map.token_adapter = index.token_adapter;
  }
  *out = map;
  return true;
}

// Whether every adapter's rows of `stack` may be read with 16-byte vectors along the columns.
inline bool stack_vec_ok(lora_dtype_t dtype, const AdapterStack& stack) {
  const int64_t size = dtype_size(dtype);
  return stack.stride_col == 1 && is_aligned16(stack.data) && (stack.stride_row * size) % 16 == 0 &&
         (stack.stride_l * size) % 16 == 0;
}

inline RowAdapterMap uniform_row_map() {
  RowAdapterMap map{};
  map.mode = RowMapMode::kUniform;
  map.num_adapters = 1;
  return map;
}

}  // namespace detail
}  // namespace cuda
}  // namespace lora_ops

#endif  // LORA_OPS_CUDA_ADAPTER_MAP_CUH_
