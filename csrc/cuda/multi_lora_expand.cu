// Adapter expand: y[m, offset_s + n] += t[s, m, :] B_s[a_m][n, :rank]^T for both index forms
// (math in kernels.h), and its "init" form y = bias + term used by the fused multi-adapter layer.
//
// Block = (a tile of rows, one slice, kThreads consecutive output columns of the slice); a
// thread owns one column n, so the y updates are coalesced and no two threads touch the same
// element. The rows of the tile are walked as runs on one adapter, kExpandRows rows at a time:
// their t rows (up to the run's rank) are staged in shared memory and every B_s[a][n, :rank]
// loaded (16-byte vectors along the rank in the unit-stride layout) serves all of them. The
// transposed views of the backward pass (stride_row == 1) read neighbouring columns at
// neighbouring addresses, so the scalar path is coalesced for them too.
#include <stdint.h>

#include "common.cuh"
#include "dtype.cuh"
#include "launchers.cuh"
#include "lora_ops/kernels.h"

namespace lora_ops {
namespace cuda {
namespace detail {
namespace {

constexpr int kExpandRows = 8;

template <typename T>
__global__ void __launch_bounds__(kThreads, 4) expand_kernel(const ExpandParams p) {
  constexpr int R = kExpandRows, V = vec_width<T>();
  __shared__ int32_t row_adapter[kExpandRows];
  // Rows of t up to the rank rounded up to 8 (zeros past the rank), so whole vectors of B
  // always meet defined values.
  __shared__ __align__(16) float t_rows[R][kMaxRank];

  const int slice = static_cast<int>(blockIdx.y);
  const int64_t width = select_slice(p.width, slice);
  const int64_t n_begin = static_cast<int64_t>(blockIdx.z) * kThreads;
  if (n_begin >= width) return;  // whole block: before any barrier
  const int64_t n = n_begin + threadIdx.x;
  const bool active = n < width;
  const int64_t col = select_slice(p.offset, slice) + n;  // column of y

  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * p.rows_per_block;
  const int64_t m1 = min(m0 + p.rows_per_block, p.M);
  if (threadIdx.x < m1 - m0) row_adapter[threadIdx.x] = p.map.adapter_of_row(m0 + threadIdx.x);
  __syncthreads();

  const AdapterStack stack = select_slice(p.b, slice);
  const bool vec_ok = select_slice(p.vec_ok, slice);
  const float* t = p.t + slice * p.M * p.r_max;
  T* y = static_cast<T*>(p.y);
  const float bias = (p.init && active && p.bias != nullptr)
                         ? to_float(static_cast<const T*>(p.bias)[col])
                         : 0.0f;

  for (int64_t m = m0; m < m1;) {
    const int32_t a = row_adapter[m - m0];
    int64_t run_end = m + 1;
    while (run_end < m1 && row_adapter[run_end - m0] == a) ++run_end;
    const int64_t rank = a >= 0 ? p.rank.rank_of(a) : 0;

    if (rank == 0) {
      if (p.init && active) {
        for (int64_t row = m; row < run_end; ++row) y[row * p.ldy + col] = from_float<T>(bias);
      }
      m = run_end;
      continue;
    }

    const int rank_padded = static_cast<int>(round_up(rank, 8));  // <= kMaxRank
    const T* b_row = static_cast<const T*>(stack.data) + a * stack.stride_l + n * stack.stride_row;
    for (int64_t sub = m; sub < run_end; sub += R) {
      const int nrows = static_cast<int>(min(static_cast<int64_t>(R), run_end - sub));
      __syncthreads();  // the previous rows' reads of t_rows are done
      for (int i = threadIdx.x; i < nrows * rank_padded; i += kThreads) {
        const int rr = i / rank_padded, j = i % rank_padded;
        t_rows[rr][j] = j < rank ? t[(sub + rr) * p.r_max + j] : 0.0f;
      }
      __syncthreads();
      if (!active) continue;

      float acc[R] = {};
      if (vec_ok) {
        for (int64_t j0 = 0; j0 < rank; j0 += V) {
          float bv[V];
          load_vec(b_row, j0, rank, bv);
#pragma unroll
          for (int r = 0; r < R; ++r) {
            if (r < nrows) {
#pragma unroll
              for (int e = 0; e < V; ++e) acc[r] = fmaf(t_rows[r][j0 + e], bv[e], acc[r]);
            }
          }
        }
      } else {
        for (int64_t j = 0; j < rank; ++j) {
          const float bj = to_float(b_row[j * stack.stride_col]);
#pragma unroll
          for (int r = 0; r < R; ++r) {
            if (r < nrows) acc[r] = fmaf(t_rows[r][j], bj, acc[r]);
          }
        }
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (r < nrows) {
          T* out = y + (sub + r) * p.ldy + col;
          const float base = p.init ? bias : to_float(*out);
          *out = from_float<T>(base + acc[r]);
        }
      }
    }
    m = run_end;
  }
}

}  // namespace

lora_status_t launch_expand(lora_dtype_t dtype, ExpandParams p, cudaStream_t stream) {
  if (p.M == 0) return LORA_OK;
  int64_t max_width = 0;
  for (int s = 0; s < p.num_slices; ++s) {
    p.vec_ok[s] = stack_vec_ok(dtype, p.b[s]);
    max_width = p.width[s] > max_width ? p.width[s] : max_width;
  }
  if (max_width == 0) return LORA_OK;
  const int64_t grid_z = ceil_div(max_width, kThreads);
  if (grid_z > 65535) return LORA_ERR_UNSUPPORTED;
  // As in the shrink: fewer rows per block while too few blocks would cover the GPU.
  int rows = kExpandRows;
  while (rows > 1 && ceil_div(p.M, rows) * p.num_slices * grid_z < kTargetBlocks) rows /= 2;
  p.rows_per_block = rows;
  const int64_t grid_x = ceil_div(p.M, rows);
  if (grid_x > INT32_MAX) return LORA_ERR_UNSUPPORTED;
  const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(p.num_slices),
                  static_cast<unsigned>(grid_z));
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    expand_kernel<T><<<grid, kThreads, 0, stream>>>(p);
    return launch_status();
  });
}

lora_status_t make_expand_params(int64_t M, int64_t L, int64_t r_max, int64_t num_slices,
                                 const float* t, const AdapterStack* lora_b,
                                 const int64_t* slice_offset, const int64_t* slice_width,
                                 const int32_t* ranks, const lora_adapter_index_t& index,
                                 void* y, int64_t ldy, int64_t n_exact, ExpandParams* out) {
  if (M < 0 || L < 0 || r_max < 0) return LORA_ERR_INVALID_ARGUMENT;
  if (num_slices < 1 || lora_b == nullptr) return LORA_ERR_INVALID_ARGUMENT;
  if (num_slices > LORA_MAX_SLICES || r_max > kMaxRank) return LORA_ERR_UNSUPPORTED;
  if (!expand_slices_valid(slice_offset, slice_width, num_slices, M, ldy, n_exact)) {
    return LORA_ERR_INVALID_ARGUMENT;
  }
  int64_t total_width = 0;
  for (int64_t s = 0; s < num_slices; ++s) total_width += slice_width[s];
  // The fused layer writes every column of y through its slices: they must tile [0, N).
  if (n_exact >= 0 && total_width != n_exact) return LORA_ERR_INVALID_ARGUMENT;
  if (!present(t, num_slices * M * r_max) || !present(ranks, L) ||
      !present(y, M * total_width)) {
    return LORA_ERR_INVALID_ARGUMENT;
  }
  ExpandParams p{};
  for (int64_t s = 0; s < num_slices; ++s) {
    if (!present(lora_b[s].data, L * slice_width[s] * r_max)) return LORA_ERR_INVALID_ARGUMENT;
    p.b[s] = lora_b[s];
    p.offset[s] = slice_offset[s];
    p.width[s] = slice_width[s];
  }
  if (!make_row_map(index, M, L, &p.map)) return LORA_ERR_INVALID_ARGUMENT;
  p.M = M;
  p.r_max = r_max;
  p.num_slices = static_cast<int>(num_slices);
  p.t = t;
  p.rank = RankInfo{ranks, nullptr, 0, r_max};
  p.y = y;
  p.ldy = ldy;
  *out = p;
  return LORA_OK;
}

}  // namespace detail

lora_status_t multi_lora_expand(lora_dtype_t dtype, int64_t M, int64_t L, int64_t r_max,
                                int64_t num_slices, const float* t, const AdapterStack* lora_b,
                                const int64_t* slice_offset, const int64_t* slice_width,
                                const int32_t* ranks, lora_adapter_index_t index, void* y,
                                int64_t ldy, const Context& ctx) {
  detail::ExpandParams p;
  LORA_RETURN_IF_ERROR(detail::make_expand_params(M, L, r_max, num_slices, t, lora_b,
                                                  slice_offset, slice_width, ranks, index, y,
                                                  ldy, -1, &p));
  return detail::launch_expand(dtype, p, ctx.stream);
}

}  // namespace cuda
}  // namespace lora_ops
