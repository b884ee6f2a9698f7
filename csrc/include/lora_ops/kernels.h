// The kernel entry points of lora_ops, one set per device (lora_ops::cpu, lora_ops::cuda), with
// the same arguments. Raw pointers, sizes in elements, row-major; no torch types. The torch
// binding (csrc/torch_*.cpp) and the C ABI (csrc/c_api.cpp) both call these.
//
// Single adapter (see DESIGN.md for the math):
//   S  = drop(x) A^T                        [M, r]   (rounded to dtype, saved for backward)
//   y  = x W^T + b + scaling * S B^T        [M, N]
//   dS = scaling * dY B                     [M, r]   (fp32, scratch)
//   dB = scaling * dY^T S                   [N, r]
//   dA = dS^T drop(x)                       [r, K]
//   dX = dY W + keep_scale * mask * (dS A)  [M, K]
// Accumulation is fp32 for every dtype. x rows have stride ldx (unit column stride); every other
// tensor is contiguous: weight [N, K], bias [N] or NULL, lora_a [r, K], lora_b [N, r].
//
// Multi-adapter (L adapters stacked, per-adapter rank ranks[a] <= r_max, scaling scalings[a]):
//   shrink: t[s, i, j] = scalings[a_i] * sum_k x[i, k] A_s[a_i][j][k]     j < ranks[a_i]
//           t[s, i, j] = 0 for j >= ranks[a_i], and for every j when a_i is -1 or out of range
//   expand: y[i, offset_s + n] += sum_{j < ranks[a_i]} t[s, i, j] B_s[a_i][n][j]
//           rows with a_i == -1 (or out of range) are not touched
// Rows or columns of an adapter past its rank are never read: they may hold anything, NaN too.
// Adapter stacks are addressed by strides, so the backward pass reuses shrink and expand on
// transposed views (dY B is a shrink over B viewed as [L, r, N]; dT A an expand over A viewed
// as [L, K, r]). Slices of one expand call must not overlap in y and must fit in a row of y;
// the slices of multi_lora_linear_fwd tile [0, N) exactly (a layer with no adapter on one
// slice passes a zero-rank or zero slice for it).
// Ranks outside [0, r_max]: the CPU kernels return LORA_ERR_INVALID_ARGUMENT; the CUDA kernels
// clamp them into range on the device (checking would need a host sync). The torch layer
// rejects them wherever it can read them without a sync.
#ifndef LORA_OPS_KERNELS_H_
#define LORA_OPS_KERNELS_H_

#include <stddef.h>
#include <stdint.h>

#include "lora_ops/common.h"

#ifdef __CUDACC__
#include <cublas_v2.h>
#include <cuda_runtime.h>
#elif defined(LORA_OPS_WITH_CUDA)
#include <cublas_v2.h>
#include <cuda_runtime_api.h>
#endif

namespace lora_ops {

// One slice of a stacked adapter tensor: element (l, row, col) is at
// data + l*stride_l + row*stride_row + col*stride_col (strides in elements).
struct AdapterStack {
  const void* data;
  int64_t stride_l;
  int64_t stride_row;
  int64_t stride_col;
};

namespace cpu {

// c[m, n] = sum_k a[m, k] * op(b)[k, n] + beta * c[m, n], row-major, fp32 accumulation.
// op(b) = b^T when b_is_nk (b is [n, k], row stride ldb), else b is [k, n] with row stride ldb.
// Pluggable so the torch binding can hand the base GEMM to ATen's BLAS while the C ABI uses the
// built-in one; the fused adapter work around it stays in the lora_ops kernels either way.
struct Gemm {
  void (*fn)(void* ctx, lora_dtype_t dtype, bool b_is_nk, int64_t m, int64_t n, int64_t k,
             const void* a, int64_t lda, const void* b, int64_t ldb, float beta, void* c,
             int64_t ldc);
  void* ctx;
  // Whether fn would run builtin_gemm for such a product (null: never). A kernel then runs the
  // product's tiles itself, in the parallel region of its adapter products (one wake-up of the
  // thread team per kernel instead of one per product: cpu/phased_work.h).
  bool (*uses_builtin)(lora_dtype_t dtype, bool b_is_nk, int64_t m) = nullptr;

  bool runs_builtin(lora_dtype_t dtype, bool b_is_nk, int64_t m) const {
    return uses_builtin != nullptr && uses_builtin(dtype, b_is_nk, m);
  }
};

// Portable blocked GEMM (OpenMP, fp32 accumulation) used when no other GEMM is supplied.
Gemm builtin_gemm();

// Up to this many rows of A, builtin_gemm streams B once in long contiguous runs instead of
// packing it, several rows of A against several rows of B at a time: a decode-sized product is
// then one pass over the weight, at memory speed for a few rows. BLAS GEMMs often are slower
// there (MKL on a 2-core AMD EPYC, fp32 x W^T, K = 4096: 1.2-1.4x slower at M = 1, ~3x at
// M = 2-4, ~1.5x at M = 16), so callers with a BLAS may prefer the built-in GEMM up to here.
inline constexpr int64_t kBuiltinGemmStreamRows = 16;

// What the BLAS that builtin_gemm is weighed against (ATen's CPU matmul) runs on, where that
// moves the crossover. All false: what the CPU kernels were compiled for decides alone.
struct BlasTraits {
  bool mkl_on_intel = false;  // fp32 on MKL on an Intel CPU (its fast paths; not so on AMD)
  bool fp16_native = false;   // fp16 products on AVX512-FP16 arithmetic
  bool bf16_amx = false;      // bf16 products on AMX tiles
  bool intel_cpu = false;     // an Intel CPU (without AMX, oneDNN's bf16 products there trail
                              // the built-in GEMM's to more rows than on AMD)
};

// Whether builtin_gemm is faster than that BLAS for a product of m rows in `dtype` with B
// stored [n, k] (b_is_nk, x W^T) or [k, n] (dY W) (see builtin_gemm.cpp for the measurements;
// decided by the vector units the CPU kernels were compiled for and by `blas`).
bool builtin_gemm_preferred(lora_dtype_t dtype, bool b_is_nk, int64_t m,
                            const BlasTraits& blas = {});

// The vector units the CPU kernels were compiled for ("avx512", "avx2" or "baseline"): their
// GEMM's tiles and builtin_gemm_preferred depend on it.
const char* cpu_vector_isa();

lora_status_t lora_linear_fwd(lora_dtype_t dtype, int64_t M, int64_t N, int64_t K, int64_t r,
                              const void* x, int64_t ldx, const void* weight, const void* bias,
                              const void* lora_a, const void* lora_b, float scaling,
                              lora_dropout_t dropout, void* s_out, void* y, const Gemm& gemm);

// dx, d_lora_a, d_lora_b may each be NULL (not wanted). dy [M, N] contiguous.
lora_status_t lora_linear_bwd(lora_dtype_t dtype, int64_t M, int64_t N, int64_t K, int64_t r,
                              const void* dy, const void* x, int64_t ldx, const void* weight,
                              const void* lora_a, const void* lora_b, const void* s_saved,
                              float scaling, lora_dropout_t dropout, void* dx, void* d_lora_a,
                              void* d_lora_b, const Gemm& gemm);

// lora_a[s] viewed as [L, r_max, K]; t is [num_slices, M, r_max] fp32, every element written.
lora_status_t multi_lora_shrink(lora_dtype_t dtype, int64_t M, int64_t K, int64_t L,
                                int64_t r_max, int64_t num_slices, const void* x, int64_t ldx,
                                const AdapterStack* lora_a, const float* scalings,
                                const int32_t* ranks, lora_adapter_index_t index, float* t);

// lora_b[s] viewed as [L, slice_width[s], r_max]; slice_offset/slice_width are host arrays.
lora_status_t multi_lora_expand(lora_dtype_t dtype, int64_t M, int64_t L, int64_t r_max,
                                int64_t num_slices, const float* t, const AdapterStack* lora_b,
                                const int64_t* slice_offset, const int64_t* slice_width,
                                const int32_t* ranks, lora_adapter_index_t index, void* y,
                                int64_t ldy);

// y [M, N] = x W^T + b + multi-adapter term (shrink into t_workspace, then expand), where
// N = sum of slice widths laid out by slice_offset. t_workspace: [num_slices, M, r_max] fp32,
// left holding t (the backward pass needs it).
lora_status_t multi_lora_linear_fwd(lora_dtype_t dtype, int64_t M, int64_t N, int64_t K,
                                    int64_t L, int64_t r_max, int64_t num_slices, const void* x,
                                    int64_t ldx, const void* weight, const void* bias,
                                    const AdapterStack* lora_a, const AdapterStack* lora_b,
                                    const int64_t* slice_offset, const int64_t* slice_width,
                                    const float* scalings, const int32_t* ranks,
                                    lora_adapter_index_t index, float* t_workspace, void* y,
                                    const Gemm& gemm);

// The input gradient of multi_lora_linear_fwd: dx [M, K] = dy W + sum_s dt[s] A_s, each row
// with its own adapter's A (lora_a[s] viewed as [L, r_max, K], as for the forward), where dt
// [num_slices, M, r_max] fp32 holds s * dY_s B_s (a shrink of dy). The adapter terms are written
// first and the base GEMM (dy [M, N] times weight [N, K]) accumulates onto them: dx is written
// once and read once.
lora_status_t multi_lora_linear_dx(lora_dtype_t dtype, int64_t M, int64_t N, int64_t K, int64_t L,
                                   int64_t r_max, int64_t num_slices, const void* dy,
                                   const void* weight, const AdapterStack* lora_a,
                                   const float* dt, const int32_t* ranks,
                                   lora_adapter_index_t index, void* dx, const Gemm& gemm);

// The adapter weight gradients of multi_lora_linear_fwd, one slice and one factor per call:
// out [L, P, Q], out[a] = sum over the rows i whose adapter is a of u[i]^T v[i], where u
// [M, P] and v [M, Q] have row strides ldu and ldv and unit column stride, and one of them is
// fp32 (the other fp32, fp16 or bf16). rank_dim names the dimension of out that is the
// adapter's rank (P or Q <= r_max): only out[a]'s first ranks[a] rows (rank_dim 1) or columns
// (rank_dim 2) are computed, the rest is zero, and so is out[a] for an adapter with no rows.
// out is stored as out_dtype (fp32 sums rounded once, as the parameter's gradient).
//   dA_s = multi_lora_adapter_grad(u = dt[s] [M, r_max], v = x [M, K], rank_dim 1)
//   dB_s = multi_lora_adapter_grad(u = dy_s [M, N_s], v = t[s] [M, r_max], rank_dim 2)
// Sums are fp32, over each adapter's rows in order.
lora_status_t multi_lora_adapter_grad(lora_dtype_t u_dtype, lora_dtype_t v_dtype, int64_t M,
                                      int64_t P, int64_t Q, int64_t L, const void* u, int64_t ldu,
                                      const void* v, int64_t ldv, const int32_t* ranks,
                                      int rank_dim, lora_adapter_index_t index,
                                      lora_dtype_t out_dtype, void* out);

}  // namespace cpu

#if defined(__CUDACC__) || defined(LORA_OPS_WITH_CUDA)
namespace cuda {

// Where a CUDA kernel runs. `cublas` may be NULL for entry points that do not use it. The
// caller owns `workspace` (>= the *_workspace_bytes of the call), so torch's caching allocator
// can provide it and nothing is allocated on the hot path (CUDA-graph safe).
struct Context {
  cudaStream_t stream;
  cublasHandle_t cublas;
  void* workspace;
  size_t workspace_bytes;
};

size_t lora_linear_fwd_workspace_bytes(lora_dtype_t dtype, int64_t M, int64_t N, int64_t K,
                                       int64_t r);
size_t lora_linear_bwd_workspace_bytes(lora_dtype_t dtype, int64_t M, int64_t N, int64_t K,
                                       int64_t r);

lora_status_t lora_linear_fwd(lora_dtype_t dtype, int64_t M, int64_t N, int64_t K, int64_t r,
                              const void* x, int64_t ldx, const void* weight, const void* bias,
                              const void* lora_a, const void* lora_b, float scaling,
                              lora_dropout_t dropout, void* s_out, void* y, const Context& ctx);

lora_status_t lora_linear_bwd(lora_dtype_t dtype, int64_t M, int64_t N, int64_t K, int64_t r,
                              const void* dy, const void* x, int64_t ldx, const void* weight,
                              const void* lora_a, const void* lora_b, const void* s_saved,
                              float scaling, lora_dropout_t dropout, void* dx, void* d_lora_a,
                              void* d_lora_b, const Context& ctx);

// As the cpu versions; pointers are device pointers except lora_a/lora_b (host arrays of
// AdapterStack whose data pointers are device pointers) and slice_offset/slice_width (host).
lora_status_t multi_lora_shrink(lora_dtype_t dtype, int64_t M, int64_t K, int64_t L,
                                int64_t r_max, int64_t num_slices, const void* x, int64_t ldx,
                                const AdapterStack* lora_a, const float* scalings,
                                const int32_t* ranks, lora_adapter_index_t index, float* t,
                                const Context& ctx);

lora_status_t multi_lora_expand(lora_dtype_t dtype, int64_t M, int64_t L, int64_t r_max,
                                int64_t num_slices, const float* t, const AdapterStack* lora_b,
                                const int64_t* slice_offset, const int64_t* slice_width,
                                const int32_t* ranks, lora_adapter_index_t index, void* y,
                                int64_t ldy, const Context& ctx);

size_t multi_lora_linear_fwd_workspace_bytes(lora_dtype_t dtype, int64_t M, int64_t N, int64_t K,
                                             int64_t r_max, int64_t num_slices);

lora_status_t multi_lora_linear_fwd(lora_dtype_t dtype, int64_t M, int64_t N, int64_t K,
                                    int64_t L, int64_t r_max, int64_t num_slices, const void* x,
                                    int64_t ldx, const void* weight, const void* bias,
                                    const AdapterStack* lora_a, const AdapterStack* lora_b,
                                    const int64_t* slice_offset, const int64_t* slice_width,
                                    const float* scalings, const int32_t* ranks,
                                    lora_adapter_index_t index, float* t_workspace, void* y,
                                    const Context& ctx);

// Whether this build has the Hopper adapter-in-GEMM kernel of lora_linear_fwd/_bwd (CUTLASS's
// headers were found at build time); where it has, it runs on sm_90 GPUs.
bool adapter_gemm_built();

// Whether the plans admit a product of this shape (out [M, N], depths K and r; the weights as
// the forward's [N, K], r <= 128, or, depth_by_out, the backward's [K, N]) and CUTLASS's
// can_implement takes it with dense rows. Host only, no GPU needed: the tests check the two
// rules agree, since a shape the plans admit but CUTLASS refuses would quietly never take the
// plan.
bool adapter_gemm_accepts(lora_dtype_t dtype, int64_t M, int64_t N, int64_t K, int64_t r,
                          bool depth_by_out);

// Which of the CUDA backend's fast paths run on the current device, with this build's code for
// it and the environment switches as they are now: thread block cluster plans (sm_90 code,
// LORA_OPS_CUDA_CLUSTERS), tensor-core adapter tiles (sm_80 code, LORA_OPS_CUDA_MMA), the
// adapter-in-GEMM kernel (sm_90a code and CUTLASS, LORA_OPS_CUDA_ADAPTER_GEMM). A build for the
// wrong architecture (plain 9.0 for an H100, say) shows here as a path that does not run.
struct CudaPaths {
  bool clusters = false, mma = false, adapter_gemm = false;
};
CudaPaths cuda_paths();

}  // namespace cuda
#endif

}  // namespace lora_ops

#endif  // LORA_OPS_KERNELS_H_
