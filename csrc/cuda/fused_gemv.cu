// Decode-size fused layer: y = x W^T + bias + t_scale * (adapter expand term), M <= 8, in one
// launch that streams W once. At these sizes the layer is bound by reading W (DESIGN.md: 32 MiB
// for K = N = 4096 bf16 against a few hundred KB of adapter), so the kernel is a GEMV built for
// bandwidth: a block owns kGemvCols output columns, its 256 threads split the depth K in 16-byte
// vectors, every W row is read exactly once, and the x rows (tiny, L1-resident) are shared by
// the block's columns. The adapter term is one more dot product per (row, column) over the
// rank, split over the same threads and added to the same partial sums before the one block
// reduction, so it costs no extra pass or launch. The single-adapter forward uses it with one
// adapter (t = S rounded to dtype, t_scale = scaling); the multi-adapter layer with its index.
#include <stdint.h>

#include "block_dot.cuh"
#include "common.cuh"
#include "dtype.cuh"
#include "launchers.cuh"

namespace lora_ops {
namespace cuda {
namespace detail {
namespace {

constexpr int kGemvCols = 4;

// y[m, n] = x W^T + bias + t_scale * (the expand term of `term`) for m < term.M <= kGemvMaxRows,
// n < N. The term's own fields say where the output is (y, ldy), which adapter each row has
// (map, rank) and which slice holds column n (offset, width); its init and bias are not used.
struct GemvParams {
  ExpandParams term;
  int64_t N, K;
  const void* x;
  int64_t ldx;
  const void* w;
  const void* bias;
  float t_scale;
  bool vec_ok;  // x and W rows may be read as 16-byte vectors
};

template <typename T, int R>
__global__ void __launch_bounds__(kThreads, 2) gemv_kernel(const GemvParams p) {
  constexpr int C = kGemvCols;
  __shared__ int32_t row_adapter[R];
  __shared__ float red[kWarps * R * C];
  __shared__ float total[R * C];

  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * C;
  const int ncols = static_cast<int>(min(static_cast<int64_t>(C), p.N - n0));
  const int nrows = static_cast<int>(p.term.M);
  if (threadIdx.x < nrows) row_adapter[threadIdx.x] = p.term.map.adapter_of_row(threadIdx.x);
  __syncthreads();

  const T* w = static_cast<const T*>(p.w);
  const T* w_rows[C];
#pragma unroll
  for (int c = 0; c < C; ++c) w_rows[c] = w + (n0 + (c < ncols ? c : 0)) * p.K;
  float acc[R * C] = {};
  const lora_dropout_t no_dropout{0, 0, 1.0f, nullptr};
  block_dot_accumulate<T, R, C>(static_cast<const T*>(p.x), p.ldx, 0, nrows, w_rows, 1, ncols,
                                p.K, p.vec_ok, no_dropout, acc);

  // Adapter term: t[s, m, :rank] . B_s[a_m][n - offset_s, :rank], its rank split over the block.
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if (r >= nrows) continue;
    const int32_t a = row_adapter[r];
    if (a < 0) continue;
    const int64_t rank = p.term.rank.rank_of(a);
#pragma unroll
    for (int c = 0; c < C; ++c) {
      if (c >= ncols) continue;
      const int64_t n = n0 + c;
      int slice = -1;
#pragma unroll
      for (int s = 0; s < LORA_MAX_SLICES; ++s) {
        if (s < p.term.num_slices && n >= p.term.offset[s] &&
            n < p.term.offset[s] + p.term.width[s]) {
          slice = s;
        }
      }
      if (slice < 0) continue;
      const AdapterStack stack = select_slice(p.term.b, slice);
      const T* b_row = static_cast<const T*>(stack.data) + a * stack.stride_l +
                       (n - select_slice(p.term.offset, slice)) * stack.stride_row;
      const float* t_row = p.term.t + (slice * p.term.M + r) * p.term.r_max;
      float part = 0.0f;
      for (int64_t j = threadIdx.x; j < rank; j += kThreads) {
        part = fmaf(t_row[j], to_float(b_row[j * stack.stride_col]), part);
      }
      acc[r * C + c] = fmaf(p.t_scale, part, acc[r * C + c]);
    }
  }

  block_sum_store<T, R, C>(acc, red, total, nrows, ncols, n0, p.bias, p.term.y, p.term.ldy);
}

template <typename T>
lora_status_t launch_gemv_typed(const GemvParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(p.N, kGemvCols)));
  if (p.term.M <= 1) {
    gemv_kernel<T, 1><<<grid, kThreads, 0, stream>>>(p);
  } else if (p.term.M <= 4) {
    gemv_kernel<T, 4><<<grid, kThreads, 0, stream>>>(p);
  } else {
    gemv_kernel<T, 8><<<grid, kThreads, 0, stream>>>(p);
  }
  return launch_status();
}

lora_status_t launch_gemv(lora_dtype_t dtype, GemvParams p, cudaStream_t stream) {
  if (p.term.M == 0 || p.N == 0) return LORA_OK;
  if (p.term.M > kGemvMaxRows || ceil_div(p.N, kGemvCols) > INT32_MAX) {
    return LORA_ERR_UNSUPPORTED;
  }
  p.vec_ok = rows_vec_ok(dtype, p.x, p.ldx) && rows_vec_ok(dtype, p.w, p.K);
  return dispatch_dtype(dtype, [&](auto tag) {
    return launch_gemv_typed<typename decltype(tag)::type>(p, stream);
  });
}

}  // namespace

lora_status_t launch_decode_layer(lora_dtype_t dtype, const ShrinkParams& shrink,
                                  const ExpandParams& expand, int64_t N, const void* weight,
                                  const void* bias, float t_scale, cudaStream_t stream) {
  LORA_RETURN_IF_ERROR(launch_shrink(dtype, shrink, stream));
  GemvParams p{};
  p.term = expand;
  p.term.t = shrink.t;
  p.N = N;
  p.K = shrink.K;
  p.x = shrink.x;
  p.ldx = shrink.ldx;
  p.w = weight;
  p.bias = bias;
  p.t_scale = t_scale;
  return launch_gemv(dtype, p, stream);
}

}  // namespace detail
}  // namespace cuda
}  // namespace lora_ops
