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
#include "cpu/base_gemm_phase.h"
#include "common/arg_checks.h"
#include "cpu/dtype.h"
#include "cpu/gemm_operands.h"
#include "cpu/packed_gemm.h"
#include "cpu/phased_work.h"
#include "lora_ops/kernels.h"

namespace lora_ops::cpu {

using args::non_negative;
using args::present;
using args::row_stride_ok;
using args::expand_slices_valid;

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

// B(k, j) = stack[adapter][j][k]: an adapter's matrix as the GEMM's B, its columns along k.
template <class T>
OperandB<T> adapter_operand(const AdapterStack& stack, int64_t adapter) {
  return OperandB<T>{static_cast<const T*>(stack.data) + adapter * stack.stride_l,
                     stack.stride_col, stack.stride_row};
}

// The shrink's work items: t[s, row, j] = scaling * x[row] . A_s[a][j] for j < rank, a tile of
// one (slice, group) GEMM each (a phase of a PhasedWork).
template <class T>
struct ShrinkArgs {
  int64_t M, K, r_max;
  const T* x;
  int64_t ldx;
  const AdapterStack* lora_a;
  const float* scalings;
  const int32_t* ranks;
  const AdapterGroups& groups;
  float* t;
};

template <class T>
struct ShrinkTiles {
  ShrinkArgs<T> a;
  bool threaded;
  std::vector<GroupTile> tiles;

  ShrinkTiles(const ShrinkArgs<T>& args, int64_t num_slices)
      : a(args), threaded(worth_threads(a.M, num_slices * a.r_max, a.K)) {
    tiles = plan_group_tiles(
        a.groups, num_slices,
        [&](int64_t, int64_t g) -> int64_t { return a.ranks[a.groups.groups[g].adapter]; },
        [&](int64_t s, int64_t g) { return streamed(s, g); }, threaded ? max_threads() : 1);
    // The idle rows' t is zero (the tiles never reach them): written here, before any tile runs.
    for (int64_t s = 0; s < num_slices; ++s) {
      for (int64_t p = a.groups.idle_begin; p < a.M; ++p) {
        float* row = a.t + (s * a.M + a.groups.rows[p]) * a.r_max;
        std::fill(row, row + a.r_max, 0.0f);
      }
    }
  }
  // B(k, j) = A_s[a][j][k]: the adapter's first `rank` rows, never the ones past it.
  OperandB<T> a_t(int64_t s, int64_t adapter) const {
    return adapter_operand<T>(a.lora_a[s], adapter);
  }
  bool streamed(int64_t s, int64_t g) const {
    const AdapterGroup& group = a.groups.groups[g];
    return streams_b(group.end - group.begin, a.ranks[group.adapter], a.K,
                     OperandA<T>{a.x, a.ldx, 1}, a_t(s, group.adapter));
  }
  int64_t items() const { return static_cast<int64_t>(tiles.size()); }
  bool operator()(int64_t item) const {
    const GroupTile& tile = tiles[item];
    const AdapterGroup& group = a.groups.groups[tile.group];
    const int64_t* rows = a.groups.rows.data() + group.begin;
    const StoreShrink out{a.t + tile.slice * a.M * a.r_max, a.r_max, rows,
                          a.scalings[group.adapter], a.ranks[group.adapter]};
    return gemm_tile(OperandA<T>{a.x, a.ldx, 1, rows}, a_t(tile.slice, group.adapter), out,
                     tile.i0, tile.m, tile.j0, tile.n, a.K, streamed(tile.slice, tile.group));
  }
};

// The expand's work items: y[row, offset_s + n] (+)= t[s, row, :rank] . B_s[a][n, :rank], with
// `overwrite` y = bias + term instead (see StoreExpand).
template <class T>
struct ExpandArgs {
  int64_t M, r_max;
  const float* t;
  const AdapterStack* lora_b;
  const int64_t* slice_offset;
  const int64_t* slice_width;
  const int32_t* ranks;
  const AdapterGroups& groups;
  T* y;
  int64_t ldy;
  const T* bias;
  bool overwrite;
};

template <class T>
struct ExpandTiles {
  ExpandArgs<T> a;
  bool threaded;
  std::vector<GroupTile> tiles;

  ExpandTiles(const ExpandArgs<T>& args, int64_t num_slices)
      : a(args), threaded(worth_threads(a.M, total_width(num_slices), a.r_max)) {
    tiles = plan_group_tiles(
        a.groups, num_slices, [&](int64_t s, int64_t) { return a.slice_width[s]; },
        [&](int64_t s, int64_t g) { return streamed(s, g); }, threaded ? max_threads() : 1);
  }
  int64_t total_width(int64_t num_slices) const {
    int64_t width = 0;
    for (int64_t s = 0; s < num_slices; ++s) width += a.slice_width[s];
    return width;
  }
  // B(k, n) = B_s[a][n][k] for k < rank: the depth of this GEMM is the adapter's own rank.
  OperandB<T> b_t(int64_t s, int64_t adapter) const {
    return adapter_operand<T>(a.lora_b[s], adapter);
  }
  bool streamed(int64_t s, int64_t g) const {
    const AdapterGroup& group = a.groups.groups[g];
    return streams_b(group.end - group.begin, a.slice_width[s], a.ranks[group.adapter],
                     OperandA<float>{a.t, a.r_max, 1}, b_t(s, group.adapter));
  }
  int64_t items() const { return static_cast<int64_t>(tiles.size()); }
  bool operator()(int64_t item) const {
    const GroupTile& tile = tiles[item];
    const AdapterGroup& group = a.groups.groups[tile.group];
    const int64_t* rows = a.groups.rows.data() + group.begin;
    const StoreExpand<T> out{a.y, a.ldy, rows, a.slice_offset[tile.slice], a.bias, a.overwrite};
    return gemm_tile(OperandA<float>{a.t + tile.slice * a.M * a.r_max, a.r_max, 1, rows},
                     b_t(tile.slice, group.adapter), out, tile.i0, tile.m, tile.j0, tile.n,
                     a.ranks[group.adapter], streamed(tile.slice, tile.group));
  }
};

// y[row, :] = bias (or 0) for the rows without adapter work, a block of rows per work item; the
// base GEMM adds x W^T next.
template <class T>
struct IdleRowFill {
  const AdapterGroups& groups;
  int64_t M, N;
  const T* bias;
  T* y;
  bool threaded;
  int64_t rows_per_item;

  IdleRowFill(const AdapterGroups& g, int64_t m, int64_t n, const T* b, T* out)
      : groups(g), M(m), N(n), bias(b), y(out),
        threaded(worth_threads(m - g.idle_begin, n, 0)),
        rows_per_item(std::max<int64_t>(
            1, ceil_div(m - g.idle_begin, threaded ? max_threads() : 1))) {}

  int64_t items() const { return ceil_div(M - groups.idle_begin, rows_per_item); }
  bool operator()(int64_t item) const {
    const int64_t begin = groups.idle_begin + item * rows_per_item;
    const int64_t end = std::min(M, begin + rows_per_item);
    for (int64_t p = begin; p < end; ++p) {
      T* __restrict row = y + groups.rows[p] * N;
      if (bias != nullptr) {
        std::copy(bias, bias + N, row);
      } else {
        std::fill(row, row + N, from_float<T>(0.0f));
      }
    }
    return true;
  }
};

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
  if (!expand_slices_valid(slice_offset, slice_width, num_slices, M, ldy, n_exact)) {
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
    const ShrinkTiles<T> shrink(ShrinkArgs<T>{M, K, r_max, static_cast<const T*>(x), ldx, lora_a,
                                              scalings, ranks, groups, t},
                                num_slices);
    return run_phase(shrink);
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
    const ExpandTiles<T> expand(ExpandArgs<T>{M, r_max, t, lora_b, slice_offset, slice_width,
                                              ranks, groups, static_cast<T*>(y), ldy, nullptr,
                                              /*overwrite=*/false},
                                num_slices);
    return run_phase(expand);
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
    const T* xt = static_cast<const T*>(x);
    T* yt = static_cast<T*>(y);
    const T* bt = static_cast<const T*>(bias);
    const ShrinkTiles<T> shrink(
        ShrinkArgs<T>{M, K, r_max, xt, ldx, lora_a, scalings, ranks, groups, t_workspace},
        num_slices);
    const IdleRowFill<T> idle(groups, M, N, bt, yt);
    const ExpandTiles<T> expand(ExpandArgs<T>{M, r_max, t_workspace, lora_b, slice_offset,
                                              slice_width, ranks, groups, yt, N, bt,
                                              /*overwrite=*/true},
                                num_slices);
    PhasedWork work;
    bool threaded = add_phase(work, shrink);
    threaded = add_phase(work, idle) || threaded;  // other rows than the shrink's and expand's
    work.barrier();
    threaded = add_phase(work, expand) || threaded;
    return run_then_base_gemm(work, threaded, gemm, dtype, /*b_is_nk=*/true, M, N, K, xt, ldx,
                              weight, K, yt, N);
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
    // Each slice's term covers the whole of dx: the first one writes it, the others add theirs
    // in slice order, one phase each.
    std::vector<ExpandTiles<T>> terms;
    terms.reserve(num_slices);
    for (int64_t s = 0; s < num_slices; ++s) {
      terms.emplace_back(ExpandArgs<T>{M, r_max, dt + s * M * r_max, &a_t[s], &offset, &K, ranks,
                                       groups, out, K, nullptr, /*overwrite=*/s == 0},
                         1);
    }
    const IdleRowFill<T> idle(groups, M, K, nullptr, out);
    PhasedWork work;
    bool threaded = add_phase(work, idle);
    for (const ExpandTiles<T>& term : terms) {
      threaded = add_phase(work, term) || threaded;
      work.barrier();
    }
    return run_then_base_gemm(work, threaded, gemm, dtype, /*b_is_nk=*/false, M, K, N,
                              static_cast<const T*>(dy), N, weight, K, out, K);
  });
}

}  // namespace lora_ops::cpu
