// Multi-adapter LoRA on CPU: shrink, expand and the fused base + multi-adapter layer (math in
// kernels.h).
//
// Rows are grouped by adapter (adapter_groups.h), so each (slice, adapter) pair is one GEMM over
// that adapter's rows with k or n equal to the adapter's own rank: heterogeneous ranks cost no
// padded compute and nothing past a rank is read. The tiles of all those GEMMs form one list
// that the threads share, so many small adapters keep every thread busy in one parallel region.
#include <algorithm>
#include <new>
#include <vector>

#include "cpu/adapter_groups.h"
#include "common/arg_checks.h"
#include "cpu/dtype.h"
#include "cpu/gemm_operands.h"
#include "cpu/packed_gemm.h"
#include "lora_ops/kernels.h"

namespace lora_ops::cpu {

using args::non_negative;
using args::present;
using args::row_stride_ok;
using args::slices_valid;

namespace {

// t[s, row, j] = scale * C(i, j) for j < rank; the tile that reaches the rank zeroes the rest.
struct StoreShrink {
  float* t;
  int64_t r_max;
  const int64_t* rows;
  float scale;
  int64_t rank;

  void store(int64_t i, int64_t j0, const float* __restrict acc, int64_t n) const {
    float* __restrict o = t + rows[i] * r_max;
    for (int64_t j = 0; j < n; ++j) o[j0 + j] = scale * acc[j];
    if (j0 + n == rank) std::fill(o + rank, o + r_max, 0.0f);
  }
};

// y[row, col_offset + j] += C(i, j), or with `overwrite`, y[...] = bias[col_offset + j] + C(i, j)
// (the fused layer writes y this way before its base GEMM accumulates into it).
template <class T>
struct StoreExpand {
  T* y;
  int64_t ldy;
  const int64_t* rows;
  int64_t col_offset;
  const T* bias;
  bool overwrite;

  void store(int64_t i, int64_t j0, const float* __restrict acc, int64_t n) const {
    T* __restrict o = y + rows[i] * ldy + col_offset + j0;
    if (!overwrite) {
      for (int64_t j = 0; j < n; ++j) o[j] = from_float<T>(to_float(o[j]) + acc[j]);
    } else if (bias == nullptr) {
      for (int64_t j = 0; j < n; ++j) o[j] = from_float<T>(acc[j]);
    } else {
      const T* __restrict b = bias + col_offset + j0;
      for (int64_t j = 0; j < n; ++j) o[j] = from_float<T>(to_float(b[j]) + acc[j]);
    }
  }
};

// Tiles of every (slice, group) GEMM; cols(slice, group) is its column count, streamed(slice,
// group) whether it streams B (see packed_gemm.h).
template <class ColsFn, class StreamedFn>
std::vector<GroupTile> plan_group_tiles(const AdapterGroups& groups, int64_t num_slices,
                                        ColsFn&& cols, StreamedFn&& streamed, int threads) {
  std::vector<GroupTile> tiles;
  for (int64_t s = 0; s < num_slices; ++s) {
    for (int64_t g = 0; g < static_cast<int64_t>(groups.groups.size()); ++g) {
      const int64_t m = groups.groups[g].end - groups.groups[g].begin;
      const int64_t n = cols(s, g);
      if (n == 0) continue;
      const TileGrid grid = plan_tiles(m, n, threads, streamed(s, g));
      for (int64_t i0 = 0; i0 < m; i0 += grid.tile_m) {
        for (int64_t j0 = 0; j0 < n; j0 += grid.tile_n) {
          tiles.push_back(GroupTile{s, g, i0, std::min(grid.tile_m, m - i0), j0,
                                    std::min(grid.tile_n, n - j0)});
        }
      }
    }
  }
  return tiles;
}

template <class T>
const T* adapter_data(const AdapterStack& stack, int64_t adapter) {
  return static_cast<const T*>(stack.data) + adapter * stack.stride_l;
}

template <class T>
lora_status_t shrink(int64_t M, int64_t K, int64_t r_max, int64_t num_slices, const T* x,
                     int64_t ldx, const AdapterStack* lora_a, const float* scalings,
                     const int32_t* ranks, const AdapterGroups& groups, float* t) {
  // B(k, j) = A_s[a][j][k]: the adapter's first `rank` rows, never the ones past it.
  const auto a_t = [&](int64_t s, int64_t adapter) {
    return OperandB<T>{adapter_data<T>(lora_a[s], adapter), lora_a[s].stride_col,
                       lora_a[s].stride_row};
  };
  const auto streamed = [&](int64_t s, int64_t g) {
    const AdapterGroup& group = groups.groups[g];
    return streams_b(group.end - group.begin, K, OperandA<T>{x, ldx, 1}, a_t(s, group.adapter));
  };
  const bool threaded = worth_threads(M, num_slices * r_max, K);
  const std::vector<GroupTile> tiles = plan_group_tiles(
      groups, num_slices,
      [&](int64_t, int64_t g) -> int64_t { return ranks[groups.groups[g].adapter]; }, streamed,
      threaded ? max_threads() : 1);
  const bool ok = run_tiles(tiles, threaded, [&](const GroupTile& tile) {
    const AdapterGroup& group = groups.groups[tile.group];
    const int64_t* rows = groups.rows.data() + group.begin;
    const StoreShrink out{t + tile.slice * M * r_max, r_max, rows, scalings[group.adapter],
                          ranks[group.adapter]};
    return gemm_tile(OperandA<T>{x, ldx, 1, rows}, a_t(tile.slice, group.adapter), out, tile.i0,
                     tile.m, tile.j0, tile.n, K, streamed(tile.slice, tile.group));
  });
  for (int64_t s = 0; s < num_slices; ++s) {
    for (int64_t p = groups.idle_begin; p < M; ++p) {
      float* row = t + (s * M + groups.rows[p]) * r_max;
      std::fill(row, row + r_max, 0.0f);
    }
  }
  return ok ? LORA_OK : LORA_ERR_UNSUPPORTED;
}

template <class T>
lora_status_t expand(int64_t M, int64_t r_max, int64_t num_slices, const float* t,
                     const AdapterStack* lora_b, const int64_t* slice_offset,
                     const int64_t* slice_width, const int32_t* ranks, const AdapterGroups& groups,
                     T* y, int64_t ldy, const T* bias, bool overwrite) {
  // B(k, n) = B_s[a][n][k] for k < rank: the depth of this GEMM is the adapter's own rank.
  const auto b_t = [&](int64_t s, int64_t adapter) {
    return OperandB<T>{adapter_data<T>(lora_b[s], adapter), lora_b[s].stride_col,
                       lora_b[s].stride_row};
  };
  const auto streamed = [&](int64_t s, int64_t g) {
    const AdapterGroup& group = groups.groups[g];
    return streams_b(group.end - group.begin, ranks[group.adapter],
                     OperandA<float>{t, r_max, 1}, b_t(s, group.adapter));
  };
  int64_t total_width = 0;
  for (int64_t s = 0; s < num_slices; ++s) total_width += slice_width[s];
  const bool threaded = worth_threads(M, total_width, r_max);
  const std::vector<GroupTile> tiles = plan_group_tiles(
      groups, num_slices, [&](int64_t s, int64_t) { return slice_width[s]; }, streamed,
      threaded ? max_threads() : 1);
  const bool ok = run_tiles(tiles, threaded, [&](const GroupTile& tile) {
    const AdapterGroup& group = groups.groups[tile.group];
    const int64_t* rows = groups.rows.data() + group.begin;
    const StoreExpand<T> out{y, ldy, rows, slice_offset[tile.slice], bias, overwrite};
    return gemm_tile(OperandA<float>{t + tile.slice * M * r_max, r_max, 1, rows},
                     b_t(tile.slice, group.adapter), out, tile.i0, tile.m, tile.j0, tile.n,
                     ranks[group.adapter], streamed(tile.slice, tile.group));
  });
  return ok ? LORA_OK : LORA_ERR_UNSUPPORTED;
}

// y[row, :] = bias (or 0) for the rows without adapter work; the base GEMM adds x W^T next.
template <class T>
void fill_idle_rows(const AdapterGroups& groups, int64_t M, int64_t N, const T* bias, T* y) {
  const bool threaded = worth_threads(M - groups.idle_begin, N, 0);
#pragma omp parallel for schedule(static) if (threaded)
  for (int64_t p = groups.idle_begin; p < M; ++p) {
    T* __restrict row = y + groups.rows[p] * N;
    if (bias != nullptr) {
      std::copy(bias, bias + N, row);
    } else {
      std::fill(row, row + N, from_float<T>(0.0f));
    }
  }
}

lora_status_t check_slice_count(int64_t num_slices) {
  if (num_slices < 1) return LORA_ERR_INVALID_ARGUMENT;
  return num_slices > LORA_MAX_SLICES ? LORA_ERR_UNSUPPORTED : LORA_OK;
}

// Every stack's data is present when adapters of `rows` x `cols` elements exist.
bool stacks_present(const AdapterStack* stacks, int64_t num_slices, int64_t L, int64_t rows,
                    const int64_t* cols_per_slice, int64_t cols) {
  if (stacks == nullptr) return false;
  for (int64_t s = 0; s < num_slices; ++s) {
    const int64_t c = cols_per_slice != nullptr ? cols_per_slice[s] : cols;
    if (!present(stacks[s].data, L * rows * c)) return false;
  }
  return true;
}

lora_status_t check_shrink_args(int64_t M, int64_t K, int64_t L, int64_t r_max, int64_t num_slices,
                                const void* x, int64_t ldx, const AdapterStack* lora_a,
                                const float* scalings, const int32_t* ranks, const float* t) {
  if (!non_negative(M, K, L, r_max) || !row_stride_ok(ldx, M, K)) {
    return LORA_ERR_INVALID_ARGUMENT;
  }
  const lora_status_t slices = check_slice_count(num_slices);
  if (slices != LORA_OK) return slices;
  if (!present(x, M * K) || !present(t, num_slices * M * r_max) || !present(scalings, L) ||
      !ranks_valid(ranks, L, r_max) || !stacks_present(lora_a, num_slices, L, r_max, nullptr, K)) {
    return LORA_ERR_INVALID_ARGUMENT;
  }
  return LORA_OK;
}

// n_exact >= 0: the fused layer's N, which the slices must tile; else the slices must fit in a
// row of y (any width for a single row).
lora_status_t check_expand_args(int64_t M, int64_t L, int64_t r_max, int64_t num_slices,
                                const float* t, const AdapterStack* lora_b,
                                const int64_t* slice_offset, const int64_t* slice_width,
                                const int32_t* ranks, const void* y, int64_t ldy, int64_t n_exact) {
  if (!non_negative(M, L, r_max)) return LORA_ERR_INVALID_ARGUMENT;
  const lora_status_t slices = check_slice_count(num_slices);
  if (slices != LORA_OK) return slices;
  int64_t limit = -1;
  if (n_exact >= 0) {
    limit = n_exact;
  } else if (M > 1) {
    limit = ldy;
  }
  if (!slices_valid(slice_offset, slice_width, num_slices, limit)) {
    return LORA_ERR_INVALID_ARGUMENT;
  }
  int64_t total_width = 0;
  for (int64_t s = 0; s < num_slices; ++s) total_width += slice_width[s];
  // The fused layer writes every column of y through its slices: they must tile [0, N).
  if (n_exact >= 0 && total_width != n_exact) return LORA_ERR_INVALID_ARGUMENT;
  if (!present(t, num_slices * M * r_max) || !ranks_valid(ranks, L, r_max) ||
      !present(y, M * total_width) ||
      !stacks_present(lora_b, num_slices, L, r_max, slice_width, 0)) {
    return LORA_ERR_INVALID_ARGUMENT;
  }
  return LORA_OK;
}

// body(tag, groups) with the rows grouped by adapter and tag a value of the storage type:
// what every entry point runs once its arguments are checked. Allocation failure is
// LORA_ERR_UNSUPPORTED, never an exception across the C boundary.
template <class Body>
lora_status_t run_grouped(lora_dtype_t dtype, const lora_adapter_index_t& index, int64_t M,
                          int64_t L, const int32_t* ranks, Body&& body) {
  try {
    AdapterGroups groups;
    const lora_status_t status = group_rows_by_adapter(index, M, L, ranks, groups);
    if (status != LORA_OK) return status;
    return dispatch_dtype(dtype, [&](auto tag) { return body(tag, groups); });
  } catch (const std::bad_alloc&) {
    return LORA_ERR_UNSUPPORTED;
  }
}

}  // namespace

lora_status_t multi_lora_shrink(lora_dtype_t dtype, int64_t M, int64_t K, int64_t L, int64_t r_max,
                                int64_t num_slices, const void* x, int64_t ldx,
                                const AdapterStack* lora_a, const float* scalings,
                                const int32_t* ranks, lora_adapter_index_t index, float* t) {
  lora_status_t status =
      check_shrink_args(M, K, L, r_max, num_slices, x, ldx, lora_a, scalings, ranks, t);
  if (status != LORA_OK) return status;
  return run_grouped(dtype, index, M, L, ranks, [&](auto tag, const AdapterGroups& groups) {
    using T = decltype(tag);
    return shrink<T>(M, K, r_max, num_slices, static_cast<const T*>(x), ldx, lora_a, scalings,
                     ranks, groups, t);
  });
}

lora_status_t multi_lora_expand(lora_dtype_t dtype, int64_t M, int64_t L, int64_t r_max,
                                int64_t num_slices, const float* t, const AdapterStack* lora_b,
                                const int64_t* slice_offset, const int64_t* slice_width,
                                const int32_t* ranks, lora_adapter_index_t index, void* y,
                                int64_t ldy) {
  lora_status_t status = check_expand_args(M, L, r_max, num_slices, t, lora_b, slice_offset,
                                           slice_width, ranks, y, ldy, -1);
  if (status != LORA_OK) return status;
  return run_grouped(dtype, index, M, L, ranks, [&](auto tag, const AdapterGroups& groups) {
    using T = decltype(tag);
    return expand<T>(M, r_max, num_slices, t, lora_b, slice_offset, slice_width, ranks, groups,
                     static_cast<T*>(y), ldy, nullptr, /*overwrite=*/false);
  });
}

lora_status_t multi_lora_linear_fwd(lora_dtype_t dtype, int64_t M, int64_t N, int64_t K, int64_t L,
                                    int64_t r_max, int64_t num_slices, const void* x, int64_t ldx,
                                    const void* weight, const void* bias,
                                    const AdapterStack* lora_a, const AdapterStack* lora_b,
                                    const int64_t* slice_offset, const int64_t* slice_width,
                                    const float* scalings, const int32_t* ranks,
                                    lora_adapter_index_t index, float* t_workspace, void* y,
                                    const Gemm& gemm) {
  if (N < 0) return LORA_ERR_INVALID_ARGUMENT;
  lora_status_t status =
      check_shrink_args(M, K, L, r_max, num_slices, x, ldx, lora_a, scalings, ranks, t_workspace);
  if (status != LORA_OK) return status;
  status = check_expand_args(M, L, r_max, num_slices, t_workspace, lora_b, slice_offset,
                             slice_width, ranks, y, N, N);
  if (status != LORA_OK) return status;
  if (!present(weight, N * K) || (gemm.fn == nullptr && M * N * K > 0)) {
    return LORA_ERR_INVALID_ARGUMENT;
  }
  return run_grouped(dtype, index, M, L, ranks, [&](auto tag, const AdapterGroups& groups) {
    using T = decltype(tag);
    lora_status_t st = shrink<T>(M, K, r_max, num_slices, static_cast<const T*>(x), ldx, lora_a,
                                 scalings, ranks, groups, t_workspace);
    if (st != LORA_OK) return st;
    st = expand<T>(M, r_max, num_slices, t_workspace, lora_b, slice_offset, slice_width, ranks,
                   groups, static_cast<T*>(y), N, static_cast<const T*>(bias),
                   /*overwrite=*/true);
    if (st != LORA_OK) return st;
    fill_idle_rows<T>(groups, M, N, static_cast<const T*>(bias), static_cast<T*>(y));
    if (M > 0 && N > 0 && K > 0) {
      gemm.fn(gemm.ctx, dtype, /*b_is_nk=*/true, M, N, K, x, ldx, weight, K, 1.0f, y, N);
    }
    return LORA_OK;
  });
}

lora_status_t multi_lora_linear_dx(lora_dtype_t dtype, int64_t M, int64_t N, int64_t K, int64_t L,
                                   int64_t r_max, int64_t num_slices, const void* dy,
                                   const void* weight, const AdapterStack* lora_a,
                                   const float* dt, const int32_t* ranks,
                                   lora_adapter_index_t index, void* dx, const Gemm& gemm) {
  if (!non_negative(M, N, K, L) || r_max < 0) return LORA_ERR_INVALID_ARGUMENT;
  lora_status_t status = check_slice_count(num_slices);
  if (status != LORA_OK) return status;
  if (lora_a == nullptr) return LORA_ERR_INVALID_ARGUMENT;
  // A_s^T is the expand's B: [L, K, r_max], the strides of its rows and columns swapped.
  AdapterStack a_t[LORA_MAX_SLICES];
  for (int64_t s = 0; s < num_slices; ++s) {
    a_t[s] = AdapterStack{lora_a[s].data, lora_a[s].stride_l, lora_a[s].stride_col,
                          lora_a[s].stride_row};
  }
  const int64_t offset = 0;
  for (int64_t s = 0; s < num_slices; ++s) {  // each slice's term covers all K columns of dx
    status = check_expand_args(M, L, r_max, 1, dt, &a_t[s], &offset, &K, ranks, dx, K, K);
    if (status != LORA_OK) return status;
  }
  if (!present(dt, num_slices * M * r_max) || !present(dy, M * N) ||
      !present(weight, N * K) || (gemm.fn == nullptr && M * N * K > 0)) {
    return LORA_ERR_INVALID_ARGUMENT;
  }
  return run_grouped(dtype, index, M, L, ranks, [&](auto tag, const AdapterGroups& groups) {
    using T = decltype(tag);
    T* out = static_cast<T*>(dx);
    for (int64_t s = 0; s < num_slices; ++s) {
      const lora_status_t st = expand<T>(M, r_max, 1, dt + s * M * r_max, &a_t[s], &offset, &K,
                                         ranks, groups, out, K, nullptr, /*overwrite=*/s == 0);
      if (st != LORA_OK) return st;
    }
    fill_idle_rows<T>(groups, M, K, nullptr, out);
    if (M > 0 && N > 0 && K > 0) {
      gemm.fn(gemm.ctx, dtype, /*b_is_nk=*/false, M, K, N, dy, N, weight, K, 1.0f, out, K);
    }
    return LORA_OK;
  });
}

}  // namespace lora_ops::cpu
