// Adapter shrink: t[s, m, :] = scaling * x[m, :] A_s[a_m]^T for both index forms (math in
// kernels.h). Bandwidth bound at decode sizes, so the depth K is split over the whole block
// with 16-byte loads (block_dot.cuh) rather than tiled.
//
// Block = (a tile of rows, one slice, kShrinkRanks consecutive ranks). The rows of the tile are
// walked as runs of consecutive rows on the same adapter (a segment, or equal token indices),
// and each run kShrinkRows rows at a time: those rows share every load of the adapter's rows,
// which is how the segment form reuses its adapter's weights across a segment's tokens. Ranks
// at or past the run's rank are never loaded; their t entries are written as 0.
#include <stdint.h>

#include "block_dot.cuh"
#include "common.cuh"
#include "dtype.cuh"
#include "launchers.cuh"
#include "lora_ops/kernels.h"

namespace lora_ops {
namespace cuda {
namespace detail {
namespace {

constexpr int kShrinkRows = 4;   // rows of x per pass over the weights
constexpr int kShrinkRanks = 4;  // adapter rows (ranks) per block

template <typename T>
__global__ void __launch_bounds__(kThreads, 2) shrink_kernel(const ShrinkParams p) {
  constexpr int R = kShrinkRows, C = kShrinkRanks;
  __shared__ int32_t row_adapter[kShrinkRows];
  __shared__ float red[kWarps * R * C];
  __shared__ float total[R * C];

  const int rank_chunks = static_cast<int>(ceil_div(p.r_max, C));  // r_max <= kMaxRank
  const int slice = static_cast<int>(blockIdx.y) / rank_chunks;
  const int64_t j0 = static_cast<int64_t>(static_cast<int>(blockIdx.y) % rank_chunks) * C;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * p.rows_per_block;
  const int64_t m1 = min(m0 + p.rows_per_block, p.M);

  if (threadIdx.x < m1 - m0) row_adapter[threadIdx.x] = p.map.adapter_of_row(m0 + threadIdx.x);
  __syncthreads();

  const AdapterStack stack = select_slice(p.a, slice);
  const bool vec_ok = select_slice(p.vec_ok, slice);
  const T* x = static_cast<const T*>(p.x);
  float* t = p.t + slice * p.M * p.r_max;

  for (int64_t m = m0; m < m1;) {
    const int32_t a = row_adapter[m - m0];
    int64_t run_end = m + 1;
    while (run_end < m1 && row_adapter[run_end - m0] == a) ++run_end;
    const int64_t rank = a >= 0 ? p.rank.rank_of(a) : 0;
    const float scale = a >= 0 ? p.rank.scaling_of(a) : 0.0f;
    const int ncols = static_cast<int>(clamp64(rank - j0, 0, C));

    for (int64_t sub = m; sub < run_end; sub += R) {
      const int nrows = static_cast<int>(min(static_cast<int64_t>(R), run_end - sub));
      if (ncols > 0) {
        const T* base = static_cast<const T*>(stack.data) + a * stack.stride_l;
        const T* w[C];
#pragma unroll
        for (int c = 0; c < C; ++c) w[c] = base + (j0 + (c < ncols ? c : 0)) * stack.stride_row;
        float acc[R * C] = {};
        block_dot_accumulate<T, R, C>(x, p.ldx, sub, nrows, w, stack.stride_col, ncols, p.K,
                                      vec_ok, seeded(p.dropout), acc);
        block_sum(acc, red, total);
      }
      for (int i = threadIdx.x; i < nrows * C; i += kThreads) {
        const int c = i % C;
        const int64_t j = j0 + c, row = sub + i / C;
        if (j >= p.r_max) continue;
        float v = c < ncols ? total[i] * scale : 0.0f;
        if (p.round_t) v = round_to<T>(v);
        t[row * p.r_max + j] = v;
        if (p.s_out != nullptr) static_cast<T*>(p.s_out)[row * p.r_max + j] = from_float<T>(v);
      }
    }
    m = run_end;
  }
}

}  // namespace

lora_status_t launch_shrink(lora_dtype_t dtype, ShrinkParams p, cudaStream_t stream) {
  if (p.M == 0 || p.r_max == 0) return LORA_OK;
  for (int s = 0; s < p.num_slices; ++s) {
    p.vec_ok[s] = rows_vec_ok(dtype, p.x, p.ldx) && stack_vec_ok(dtype, p.a[s]);
  }
  const int64_t grid_y = p.num_slices * ceil_div(p.r_max, kShrinkRanks);
  // Fewer rows per block while that leaves too few blocks to cover the GPU (decode): the
  // weights are then re-read from L2 by more blocks, but more of DRAM is in flight.
  int rows = kShrinkRows;
  while (rows > 1 && ceil_div(p.M, rows) * grid_y < kTargetBlocks) rows /= 2;
  p.rows_per_block = rows;
  const int64_t grid_x = ceil_div(p.M, rows);
  if (grid_x > INT32_MAX) return LORA_ERR_UNSUPPORTED;
  const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y));
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    shrink_kernel<T><<<grid, kThreads, 0, stream>>>(p);
    return launch_status();
  });
}

lora_status_t make_shrink_params(int64_t M, int64_t K, int64_t L, int64_t r_max,
                                 int64_t num_slices, const void* x, int64_t ldx,
                                 const AdapterStack* lora_a, const float* scalings,
                                 const int32_t* ranks, const lora_adapter_index_t& index,
                                 float* t, ShrinkParams* out) {
  if (!non_negative(M, K, L, r_max) || !row_stride_ok(ldx, M, K)) {
    return LORA_ERR_INVALID_ARGUMENT;
  }
  if (num_slices < 1 || lora_a == nullptr) return LORA_ERR_INVALID_ARGUMENT;
  if (num_slices > LORA_MAX_SLICES || r_max > kMaxRank) return LORA_ERR_UNSUPPORTED;
  if (!present(x, M * K) || !present(t, num_slices * M * r_max) || !present(scalings, L) ||
      !present(ranks, L)) {
    return LORA_ERR_INVALID_ARGUMENT;
  }
  ShrinkParams p{};
  for (int64_t s = 0; s < num_slices; ++s) {
    if (!present(lora_a[s].data, L * r_max * K)) return LORA_ERR_INVALID_ARGUMENT;
    p.a[s] = lora_a[s];
  }
  if (!make_row_map(index, M, L, &p.map)) return LORA_ERR_INVALID_ARGUMENT;
  p.M = M;
  p.K = K;
  p.r_max = r_max;
  p.num_slices = static_cast<int>(num_slices);
  p.x = x;
  p.ldx = ldx;
  p.rank = RankInfo{ranks, scalings, 0, r_max};
  p.dropout = lora_dropout_t{0, 0, 1.0f, nullptr};
  p.t = t;
  *out = p;
  return LORA_OK;
}

}  // namespace detail

lora_status_t multi_lora_shrink(lora_dtype_t dtype, int64_t M, int64_t K, int64_t L,
                                int64_t r_max, int64_t num_slices, const void* x, int64_t ldx,
                                const AdapterStack* lora_a, const float* scalings,
                                const int32_t* ranks, lora_adapter_index_t index, float* t,
                                const Context& ctx) {
  detail::ShrinkParams p;
  LORA_RETURN_IF_ERROR(detail::make_shrink_params(M, K, L, r_max, num_slices, x, ldx, lora_a,
                                                  scalings, ranks, index, t, &p));
  return detail::launch_shrink(dtype, p, ctx.stream);
}

}  // namespace cuda
}  // namespace lora_ops
