// The adapter weight gradients of the multi-adapter layer on CPU (math in kernels.h): for each
// adapter, the sum over its rows of u_i^T v_i, as one GEMM whose depth runs over those rows.
//
// Rows are grouped by adapter (adapter_groups.h). A group whose rows are consecutive (the segment
// form, or tokens that happen to be sorted) is read in place; the rows of the other groups are
// first copied into group order, so that every GEMM reads its depth as a strided matrix. Only
// the first `rank` rows (dA) or columns (dB) of an adapter's gradient are computed; the rest,
// and the whole gradient of an adapter without rows, is written as zeros. The tiles of all the
// adapters' GEMMs run as one list the threads share.
#include <algorithm>
#include <cstring>
#include <new>
#include <type_traits>
#include <vector>

#include "common/arg_checks.h"
#include "cpu/adapter_groups.h"
#include "cpu/dtype.h"
#include "cpu/gemm_operands.h"
#include "cpu/packed_gemm.h"
#include "lora_ops/kernels.h"

namespace lora_ops::cpu {

using args::non_negative;
using args::present;
using args::row_stride_ok;

namespace {

// Elements copied or zeroed from which a pass over memory is split over the threads.
constexpr int64_t kThreadedFillElements = int64_t{1} << 20;

bool rows_consecutive(const AdapterGroups& groups, const AdapterGroup& g) {
  return groups.rows[g.end - 1] - groups.rows[g.begin] == g.end - g.begin - 1;
}

// A matrix whose rows are the depth of a group's GEMM: row p of the group at data + p * ld.
template <class T>
struct GroupRows {
  const T* data;
  int64_t ld;
};

// The rows of u (or v) of each group in group order: in place for consecutive rows, else from
// `copy`, which receives the rows of every group that needs it (at the group's positions, row
// stride `cols`).
template <class T>
class GroupedRows {
 public:
  GroupedRows(const AdapterGroups& groups, const std::vector<char>& copied, const T* m, int64_t ld,
              int64_t cols)
      : groups_(groups), m_(m), ld_(ld), cols_(cols) {
    const int64_t rows = groups.idle_begin;
    if (std::find(copied.begin(), copied.end(), 1) == copied.end()) return;
    copy_.resize(static_cast<size_t>(rows * cols));
    T* dst = copy_.data();
#pragma omp parallel for schedule(static) if (rows * cols >= kThreadedFillElements)
    for (int64_t p = 0; p < rows; ++p) {
      if (copied[p]) std::memcpy(dst + p * cols, m + groups.rows[p] * ld, sizeof(T) * cols);
    }
  }

  GroupRows<T> of(const AdapterGroup& g, bool in_place) const {
    if (in_place) return {m_ + groups_.rows[g.begin] * ld_, ld_};
    return {copy_.data() + g.begin * cols_, cols_};
  }

 private:
  const AdapterGroups& groups_;
  const T* m_;
  int64_t ld_, cols_;
  std::vector<T> copy_;
};

// Rows of fp32 sums rounded to the gradient's storage type.
template <class TO>
void store_row(TO* __restrict out, const float* __restrict src, int64_t n) {
  if constexpr (std::is_same_v<TO, float>) {
    std::memcpy(out, src, sizeof(float) * n);
  } else {
    for (int64_t e = 0; e < n; ++e) out[e] = from_float<TO>(src[e]);
  }
}

// out[a] (storage type TO) as the GEMMs write it: C(i, j) at out[i * ld + j], or with
// `transposed` (the rank is out's last dimension) at out[j * ld + i].
template <class TO>
void store_grad_tile(TO* out, int64_t ld, bool transposed, int64_t i0, int64_t m, int64_t j0,
                     int64_t n, const float* __restrict c, int64_t ldc) {
  if (!transposed) {
    for (int64_t i = 0; i < m; ++i) store_row(out + (i0 + i) * ld + j0, c + i * ldc, n);
  } else {
    store_tile_transposed(out, ld, 1.0f, i0, m, j0, n, c, ldc);
  }
}

// The gradient of one adapter: out points at it, in the storage type `dtype`.
struct StoreGrad {
  void* out;
  lora_dtype_t dtype;
  int64_t ld;
  bool transposed;

  void store_tile(int64_t i0, int64_t m, int64_t j0, int64_t n, const float* c,
                  int64_t ldc) const {
    dispatch_dtype(dtype, [&](auto tag) {
      using TO = decltype(tag);
      store_grad_tile(static_cast<TO*>(out), ld, transposed, i0, m, j0, n, c, ldc);
      return LORA_OK;
    });
  }
};

// Zeroes what the GEMMs leave alone: out[a] past its rank (rows when out is rank x wide, else
// columns), all of out[a] for an adapter without rows.
template <class TO>
void zero_outside_ranks(TO* out, int64_t L, int64_t wide, int64_t r_max, const int32_t* ranks,
                        bool transposed, const std::vector<int64_t>& group_of) {
  const int64_t size = wide * r_max;
  const TO zero = from_float<TO>(0.0f);
#pragma omp parallel for schedule(static) if (L * size >= kThreadedFillElements && L > 1)
  for (int64_t a = 0; a < L; ++a) {
    TO* o = out + a * size;
    const int64_t rank = group_of[a] < 0 ? 0 : ranks[a];
    if (!transposed) {
      std::fill(o + rank * wide, o + size, zero);
    } else {
      for (int64_t j = 0; j < wide; ++j) std::fill(o + j * r_max + rank, o + (j + 1) * r_max, zero);
    }
  }
}

// For each adapter a with rows, C = R_g^T W_g (ranks[a] x wide) over its rows g, where R [M,
// r_max] is the operand whose columns are the rank (dt or t) and W [M, wide] the other (x or dY):
// the rank is always the GEMM's row count, so a rank of 16 does not pad the micro-kernel's
// columns, and the wide side is its columns. Stored into out[a] as rank x wide, or `transposed`.
template <class TR, class TW>
lora_status_t adapter_grad(int64_t r_max, int64_t wide, int64_t L, const TR* r_mat, int64_t ldr,
                           const TW* w_mat, int64_t ldw, const int32_t* ranks, bool transposed,
                           const AdapterGroups& groups, lora_dtype_t out_dtype, void* out) {
  const int64_t num_groups = static_cast<int64_t>(groups.groups.size());
  std::vector<int64_t> group_of(static_cast<size_t>(L), -1);
  std::vector<char> copied(static_cast<size_t>(groups.idle_begin), 0);
  std::vector<char> in_place(static_cast<size_t>(num_groups), 1);
  for (int64_t g = 0; g < num_groups; ++g) {
    const AdapterGroup& group = groups.groups[g];
    group_of[group.adapter] = g;
    if (!rows_consecutive(groups, group)) {
      in_place[g] = 0;
      std::fill(copied.begin() + group.begin, copied.begin() + group.end, 1);
    }
  }
  dispatch_dtype(out_dtype, [&](auto tag) {
    zero_outside_ranks(static_cast<decltype(tag)*>(out), L, wide, r_max, ranks, transposed,
                       group_of);
    return LORA_OK;
  });
  const size_t out_bytes = out_dtype == LORA_DTYPE_F32 ? 4 : 2;
  const GroupedRows<TR> r_rows(groups, copied, r_mat, ldr, r_max);
  const GroupedRows<TW> w_rows(groups, copied, w_mat, ldw, wide);

  // Group g's GEMM: A(i, k) = R_g[k][i], B(k, j) = W_g[k][j], depth k over the group's rows.
  const auto operands = [&](int64_t g) {
    const AdapterGroup& group = groups.groups[g];
    const GroupRows<TR> rg = r_rows.of(group, in_place[g]);
    const GroupRows<TW> wg = w_rows.of(group, in_place[g]);
    return std::make_pair(OperandA<TR>{rg.data, 1, rg.ld}, OperandB<TW>{wg.data, wg.ld, 1});
  };
  const auto depth = [&](int64_t g) { return groups.groups[g].end - groups.groups[g].begin; };
  // Counted as worth_threads does (a few tokens' gradients are mostly stores, which one thread
  // does faster than the team wakes up: one token at K = N = 2048, r = 16 took ~110 us a call
  // threaded, 23-29 us on one thread).
  int64_t work = 0;
  for (int64_t g = 0; g < num_groups; ++g) {
    work += ranks[groups.groups[g].adapter] * wide * (depth(g) + 2);
  }
  const bool threaded = worth_threads_for(work);
  std::vector<GroupTile> tiles;
  std::vector<char> streamed(static_cast<size_t>(num_groups), 0);
  for (int64_t g = 0; g < num_groups; ++g) {
    const int64_t m = ranks[groups.groups[g].adapter];
    if (m == 0 || wide == 0) continue;
    const auto [a_op, b_op] = operands(g);
    streamed[g] = streams_b(m, wide, depth(g), a_op, b_op);
    const TileGrid grid = plan_tiles(m, wide, threaded ? max_threads() : 1, streamed[g]);
    for (int64_t i0 = 0; i0 < m; i0 += grid.tile_m) {
      for (int64_t j0 = 0; j0 < wide; j0 += grid.tile_n) {
        tiles.push_back(GroupTile{0, g, i0, std::min(grid.tile_m, m - i0), j0,
                                  std::min(grid.tile_n, wide - j0)});
      }
    }
  }
  const bool ok = run_tiles(tiles, threaded, [&](const GroupTile& tile) {
    const AdapterGroup& group = groups.groups[tile.group];
    const auto [a_op, b_op] = operands(tile.group);
    const StoreGrad store{static_cast<char*>(out) + group.adapter * r_max * wide * out_bytes,
                          out_dtype, transposed ? r_max : wide, transposed};
    return gemm_tile(a_op, b_op, store, tile.i0, tile.m, tile.j0, tile.n, depth(tile.group),
                     streamed[tile.group] != 0);
  });
  return ok ? LORA_OK : LORA_ERR_UNSUPPORTED;
}

bool dtype_known(lora_dtype_t dtype) {
  return dtype == LORA_DTYPE_F32 || dtype == LORA_DTYPE_F16 || dtype == LORA_DTYPE_BF16;
}

// fn(u_tag, v_tag) with tags of the storage types; one of the two must be fp32.
template <class Fn>
lora_status_t dispatch_dtype_pair(lora_dtype_t u_dtype, lora_dtype_t v_dtype, Fn&& fn) {
  if (!dtype_known(u_dtype) || !dtype_known(v_dtype)) return LORA_ERR_INVALID_ARGUMENT;
  if (u_dtype == LORA_DTYPE_F32) {
    return dispatch_dtype(v_dtype, [&](auto v_tag) { return fn(float{}, v_tag); });
  }
  if (v_dtype == LORA_DTYPE_F32) {
    return dispatch_dtype(u_dtype, [&](auto u_tag) { return fn(u_tag, float{}); });
  }
  return LORA_ERR_UNSUPPORTED;
}

}  // namespace

lora_status_t multi_lora_adapter_grad(lora_dtype_t u_dtype, lora_dtype_t v_dtype, int64_t M,
                                      int64_t P, int64_t Q, int64_t L, const void* u, int64_t ldu,
                                      const void* v, int64_t ldv, const int32_t* ranks,
                                      int rank_dim, lora_adapter_index_t index,
                                      lora_dtype_t out_dtype, void* out) {
  if (!non_negative(M, P, Q, L) || (rank_dim != 1 && rank_dim != 2) ||
      !row_stride_ok(ldu, M, P) || !row_stride_ok(ldv, M, Q)) {
    return LORA_ERR_INVALID_ARGUMENT;
  }
  if (!present(u, M * P) || !present(v, M * Q) || !present(out, L * P * Q) ||
      !ranks_valid(ranks, L, rank_dim == 1 ? P : Q) || !dtype_known(out_dtype)) {
    return LORA_ERR_INVALID_ARGUMENT;
  }
  try {
    AdapterGroups groups;
    const lora_status_t status = group_rows_by_adapter(index, M, L, ranks, groups);
    if (status != LORA_OK) return status;
    return dispatch_dtype_pair(u_dtype, v_dtype, [&](auto u_tag, auto v_tag) {
      using TU = decltype(u_tag);
      using TV = decltype(v_tag);
      const auto* u_t = static_cast<const TU*>(u);
      const auto* v_t = static_cast<const TV*>(v);
      if (rank_dim == 1) {  // out[a] = U^T V: U's columns are the rank
        return adapter_grad<TU, TV>(P, Q, L, u_t, ldu, v_t, ldv, ranks, false, groups, out_dtype,
                                    out);
      }
      // out[a] = U^T V = (V^T U)^T: V's columns are the rank
      return adapter_grad<TV, TU>(Q, P, L, v_t, ldv, u_t, ldu, ranks, true, groups, out_dtype,
                                  out);
    });
  } catch (const std::bad_alloc&) {
    return LORA_ERR_UNSUPPORTED;
  }
}

}  // namespace lora_ops::cpu
