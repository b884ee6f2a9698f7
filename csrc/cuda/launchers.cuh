// Kernels that more than one entry point launches, behind host functions so each is compiled in
// one translation unit only: the adapter shrink and expand (multi-adapter ops, and the
// single-adapter forward's decode path as the one-adapter case), the decode layer (shrink, then
// a GEMV with the adapter term in its epilogue), and the cuBLAS base GEMM.
#ifndef LORA_OPS_CUDA_LAUNCHERS_CUH_
#define LORA_OPS_CUDA_LAUNCHERS_CUH_

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "adapter_map.cuh"
#include "lora_ops/common.h"
#include "lora_ops/kernels.h"

namespace lora_ops {
namespace cuda {
namespace detail {

// t[s, m, j] = scaling(a_m) * sum_k drop(x)[m, k] A_s[a_m][j][k] for j < rank(a_m), else 0; every
// element of t [num_slices, M, r_max] is written. With round_t the values are rounded to dtype
// (the single-adapter S), and s_out, if set, receives them as dtype [M, r_max] (slice 0).
struct ShrinkParams {
  int64_t M, K, r_max;
  int num_slices;
  const void* x;
  int64_t ldx;
  AdapterStack a[LORA_MAX_SLICES];
  RowAdapterMap map;
  RankInfo rank;
  lora_dropout_t dropout;
  float* t;
  bool round_t;
  void* s_out;
  // Filled by launch_shrink.
  bool vec_ok[LORA_MAX_SLICES];
  int rows_per_block;
};
lora_status_t launch_shrink(lora_dtype_t dtype, ShrinkParams p, cudaStream_t stream);

// Checks the arguments of a multi-adapter shrink as the CPU backend does and fills *out.
lora_status_t make_shrink_params(int64_t M, int64_t K, int64_t L, int64_t r_max,
                                 int64_t num_slices, const void* x, int64_t ldx,
                                 const AdapterStack* lora_a, const float* scalings,
                                 const int32_t* ranks, const lora_adapter_index_t& index,
                                 float* t, ShrinkParams* out);

// y[m, offset_s + n] (+)= sum_{j < rank(a_m)} t[s, m, j] B_s[a_m][n][j] for n < width_s.
// Without init, rows without adapter are not touched; with init, y is overwritten with
// bias[offset_s + n] (or 0) plus the term on every row.
struct ExpandParams {
  int64_t M, r_max;
  int num_slices;
  const float* t;
  AdapterStack b[LORA_MAX_SLICES];
  int64_t offset[LORA_MAX_SLICES];
  int64_t width[LORA_MAX_SLICES];
  RowAdapterMap map;
  RankInfo rank;
  void* y;
  int64_t ldy;
  bool init;
  const void* bias;
  // Filled by launch_expand.
  bool vec_ok[LORA_MAX_SLICES];
  int rows_per_block;
};
lora_status_t launch_expand(lora_dtype_t dtype, ExpandParams p, cudaStream_t stream);

// Checks the arguments of an expand as the CPU backend does and fills *out (init off). n_exact
// >= 0: the slices must tile [0, n_exact) exactly (the fused layer writes all of y through them).
lora_status_t make_expand_params(int64_t M, int64_t L, int64_t r_max, int64_t num_slices,
                                 const float* t, const AdapterStack* lora_b,
                                 const int64_t* slice_offset, const int64_t* slice_width,
                                 const int32_t* ranks, const lora_adapter_index_t& index,
                                 void* y, int64_t ldy, int64_t n_exact, ExpandParams* out);

// Decode sizes, M <= kGemvMaxRows, in two launches: the shrink `shrink` (writing shrink.t), then
// y[m, n] = x W^T + bias + t_scale * (the expand term of `expand` over that t) for n < N,
// streaming W once (fused_gemv.cu). Column n belongs to the slice of `expand` whose
// [offset, offset + width) holds it; expand.init is not used.
constexpr int64_t kGemvMaxRows = 8;
lora_status_t launch_decode_layer(lora_dtype_t dtype, const ShrinkParams& shrink,
                                  const ExpandParams& expand, int64_t N, const void* weight,
                                  const void* bias, float t_scale, cudaStream_t stream);

// The base GEMM added onto the output's current contents (cuBLAS, beta = 1), row-major, fp32
// accumulation; nothing to do when a size is 0:
//   y[M, N] += x[M, K] W[N, K]^T      (x rows of stride ldx; W, y contiguous)
//   dx[M, K] += dy[M, N] W[N, K]       (all contiguous)
lora_status_t gemm_add_x_wt(const Context& ctx, lora_dtype_t dtype, int64_t M, int64_t N,
                            int64_t K, const void* x, int64_t ldx, const void* w, void* y);
lora_status_t gemm_add_dy_w(const Context& ctx, lora_dtype_t dtype, int64_t M, int64_t N,
                            int64_t K, const void* dy, const void* w, void* dx);

}  // namespace detail
}  // namespace cuda
}  // namespace lora_ops

#endif  // LORA_OPS_CUDA_LAUNCHERS_CUH_
