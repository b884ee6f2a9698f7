/* The C ABI of lora_ops: the same fused LoRA kernels the PyTorch extension runs, for other
 * frameworks' backends. Plain C; raw pointers, sizes in elements, row-major; the math, the
 * layouts and the meaning of every argument are those of lora_ops/kernels.h.
 *
 * Every function validates its arguments (LORA_ERR_INVALID_ARGUMENT names a size, pointer or
 * stride it cannot take) and never lets a C++ exception cross this boundary. A pointer may be
 * NULL when it addresses no element (an empty tensor). The lora_ops_cuda_* functions exist in
 * every build; without CUDA they return LORA_ERR_UNSUPPORTED (see lora_ops_has_cuda()).
 *
 * Link: -llora_ops (CMake target lora_ops). */
#ifndef LORA_OPS_LORA_OPS_H_
#define LORA_OPS_LORA_OPS_H_

#include <stddef.h>
#include <stdint.h>

#include "lora_ops/common.h"

#if defined(_WIN32) && defined(LORA_OPS_BUILDING_LIBRARY)
#define LORA_OPS_API __declspec(dllexport)
#elif defined(_WIN32)
#define LORA_OPS_API __declspec(dllimport)
#else
#define LORA_OPS_API __attribute__((visibility("default")))
#endif

#define LORA_OPS_VERSION_MAJOR 0
#define LORA_OPS_VERSION_MINOR 2
#define LORA_OPS_VERSION_PATCH 0

#ifdef __cplusplus
extern "C" {
#endif

/* "MAJOR.MINOR.PATCH" of the library actually loaded (compare with LORA_OPS_VERSION_*). */
LORA_OPS_API const char* lora_ops_version(void);

/* A static, human-readable name for a status ("invalid argument", ...). */
LORA_OPS_API const char* lora_ops_status_string(lora_status_t status);

/* 1 if this build has the CUDA kernels, else 0. */
LORA_OPS_API int lora_ops_has_cuda(void);

/* One slice of a stacked adapter tensor: element (l, row, col) is at
 * data + l*stride_l + row*stride_row + col*stride_col (strides in elements). */
typedef struct lora_adapter_stack {
  const void* data;
  int64_t stride_l;
  int64_t stride_row;
  int64_t stride_col;
} lora_adapter_stack_t;

/* ---- CPU ---------------------------------------------------------------------------------- */

/* The base GEMMs of the CPU kernels (x W^T, dY W) may be handed to the caller's BLAS:
 * c[m, n] = sum_k a[m, k] * op(b)[k, n] + beta * c[m, n], row-major, all of `dtype`, fp32
 * accumulation; op(b) = b^T (b is [n, k]) when b_is_nk is nonzero, else b is [k, n]. With
 * beta == 0, c must not be read. Pass NULL for the built-in blocked GEMM. */
typedef void (*lora_cpu_gemm_fn)(void* ctx, lora_dtype_t dtype, int b_is_nk, int64_t m, int64_t n,
                                 int64_t k, const void* a, int64_t lda, const void* b, int64_t ldb,
                                 float beta, void* c, int64_t ldc);
typedef struct lora_cpu_gemm {
  lora_cpu_gemm_fn fn;
  void* ctx;
} lora_cpu_gemm_t;

/* y = x W^T + b + scaling * S B^T and S = drop(x) A^T (saved for backward). */
LORA_OPS_API lora_status_t lora_ops_cpu_lora_linear_fwd(
    lora_dtype_t dtype, int64_t M, int64_t N, int64_t K, int64_t r, const void* x, int64_t ldx,
    const void* weight, const void* bias, const void* lora_a, const void* lora_b, float scaling,
    lora_dropout_t dropout, void* s_out, void* y, const lora_cpu_gemm_t* gemm);

/* dx, d_lora_a, d_lora_b may each be NULL (not wanted). */
LORA_OPS_API lora_status_t lora_ops_cpu_lora_linear_bwd(
    lora_dtype_t dtype, int64_t M, int64_t N, int64_t K, int64_t r, const void* dy, const void* x,
    int64_t ldx, const void* weight, const void* lora_a, const void* lora_b, const void* s_saved,
    float scaling, lora_dropout_t dropout, void* dx, void* d_lora_a, void* d_lora_b,
    const lora_cpu_gemm_t* gemm);

/* lora_a[num_slices]; t is [num_slices, M, r_max] fp32, every element written. */
LORA_OPS_API lora_status_t lora_ops_cpu_multi_lora_shrink(
    lora_dtype_t dtype, int64_t M, int64_t K, int64_t L, int64_t r_max, int64_t num_slices,
    const void* x, int64_t ldx, const lora_adapter_stack_t* lora_a, const float* scalings,
    const int32_t* ranks, lora_adapter_index_t index, float* t);

/* y[i, slice_offset[s] + n] += sum_j t[s, i, j] B_s[a_i][n][j]. */
LORA_OPS_API lora_status_t lora_ops_cpu_multi_lora_expand(
    lora_dtype_t dtype, int64_t M, int64_t L, int64_t r_max, int64_t num_slices, const float* t,
    const lora_adapter_stack_t* lora_b, const int64_t* slice_offset, const int64_t* slice_width,
    const int32_t* ranks, lora_adapter_index_t index, void* y, int64_t ldy);

/* y [M, N] = x W^T + b + multi-adapter term; the slices tile [0, N). */
LORA_OPS_API lora_status_t lora_ops_cpu_multi_lora_linear_fwd(
    lora_dtype_t dtype, int64_t M, int64_t N, int64_t K, int64_t L, int64_t r_max,
    int64_t num_slices, const void* x, int64_t ldx, const void* weight, const void* bias,
    const lora_adapter_stack_t* lora_a, const lora_adapter_stack_t* lora_b,
    const int64_t* slice_offset, const int64_t* slice_width, const float* scalings,
    const int32_t* ranks, lora_adapter_index_t index, float* t_workspace, void* y,
    const lora_cpu_gemm_t* gemm);

/* The multi-adapter backward. dT_s = scalings[a] * dY_s B_s[a] is a multi_lora_shrink of the
 * columns of dy in slice s over B_s viewed as [L, r_max, N_s] (its row and column strides
 * swapped). Then dx [M, K] = dy W + sum_s dT_s A_s[a_i] (dy [M, N] and weight [N, K]
 * contiguous, dt [num_slices, M, r_max] fp32): */
LORA_OPS_API lora_status_t lora_ops_cpu_multi_lora_linear_dx(
    lora_dtype_t dtype, int64_t M, int64_t N, int64_t K, int64_t L, int64_t r_max,
    int64_t num_slices, const void* dy, const void* weight, const lora_adapter_stack_t* lora_a,
    const float* dt, const int32_t* ranks, lora_adapter_index_t index, void* dx,
    const lora_cpu_gemm_t* gemm);

/* and the adapters' weight gradients, one slice and factor a call: out [L, P, Q] (out_dtype),
 * out[a] = the sum over the rows i of adapter a of u[i]^T v[i] (u [M, P], v [M, Q], row strides
 * ldu, ldv; one of them fp32), computed up to ranks[a] along rank_dim (1: P, 2: Q) and zero
 * elsewhere: dA_s with u = dT_s, v = x, rank_dim 1; dB_s with u = dy's slice s, v = t[s] (the
 * forward's t_workspace), rank_dim 2. */
LORA_OPS_API lora_status_t lora_ops_cpu_multi_lora_adapter_grad(
    lora_dtype_t u_dtype, lora_dtype_t v_dtype, int64_t M, int64_t P, int64_t Q, int64_t L,
    const void* u, int64_t ldu, const void* v, int64_t ldv, const int32_t* ranks, int rank_dim,
    lora_adapter_index_t index, lora_dtype_t out_dtype, void* out);

/* ---- CUDA --------------------------------------------------------------------------------- */
/* Device pointers, except the lora_adapter_stack_t arrays and slice_offset/slice_width (host
 * arrays; the stacks' data pointers are device pointers). `stream` is a cudaStream_t (NULL: the
 * default stream), `cublas` a cublasHandle_t. It may be NULL where the plan taken needs no cuBLAS
 * GEMM (the forwards at M <= 8; the single-adapter forward at M <= 16 on sm_90+; the backward
 * without dx): a call whose plan needs it returns LORA_ERR_INVALID_ARGUMENT before launching
 * anything. The caller owns
 * `workspace` of at least the matching *_workspace_bytes, so nothing is allocated per call and
 * the calls can be captured in a CUDA graph. */

LORA_OPS_API size_t lora_ops_cuda_lora_linear_fwd_workspace_bytes(lora_dtype_t dtype, int64_t M,
                                                                  int64_t N, int64_t K, int64_t r);
LORA_OPS_API size_t lora_ops_cuda_lora_linear_bwd_workspace_bytes(lora_dtype_t dtype, int64_t M,
                                                                  int64_t N, int64_t K, int64_t r);
LORA_OPS_API size_t lora_ops_cuda_multi_lora_linear_fwd_workspace_bytes(lora_dtype_t dtype,
                                                                        int64_t M, int64_t N,
                                                                        int64_t K, int64_t r_max,
                                                                        int64_t num_slices);

LORA_OPS_API lora_status_t lora_ops_cuda_lora_linear_fwd(
    lora_dtype_t dtype, int64_t M, int64_t N, int64_t K, int64_t r, const void* x, int64_t ldx,
    const void* weight, const void* bias, const void* lora_a, const void* lora_b, float scaling,
    lora_dropout_t dropout, void* s_out, void* y, void* stream, void* cublas, void* workspace,
    size_t workspace_bytes);

LORA_OPS_API lora_status_t lora_ops_cuda_lora_linear_bwd(
    lora_dtype_t dtype, int64_t M, int64_t N, int64_t K, int64_t r, const void* dy, const void* x,
    int64_t ldx, const void* weight, const void* lora_a, const void* lora_b, const void* s_saved,
    float scaling, lora_dropout_t dropout, void* dx, void* d_lora_a, void* d_lora_b, void* stream,
    void* cublas, void* workspace, size_t workspace_bytes);

LORA_OPS_API lora_status_t lora_ops_cuda_multi_lora_shrink(
    lora_dtype_t dtype, int64_t M, int64_t K, int64_t L, int64_t r_max, int64_t num_slices,
    const void* x, int64_t ldx, const lora_adapter_stack_t* lora_a, const float* scalings,
    const int32_t* ranks, lora_adapter_index_t index, float* t, void* stream);

LORA_OPS_API lora_status_t lora_ops_cuda_multi_lora_expand(
    lora_dtype_t dtype, int64_t M, int64_t L, int64_t r_max, int64_t num_slices, const float* t,
    const lora_adapter_stack_t* lora_b, const int64_t* slice_offset, const int64_t* slice_width,
    const int32_t* ranks, lora_adapter_index_t index, void* y, int64_t ldy, void* stream);

LORA_OPS_API lora_status_t lora_ops_cuda_multi_lora_linear_fwd(
    lora_dtype_t dtype, int64_t M, int64_t N, int64_t K, int64_t L, int64_t r_max,
    int64_t num_slices, const void* x, int64_t ldx, const void* weight, const void* bias,
    const lora_adapter_stack_t* lora_a, const lora_adapter_stack_t* lora_b,
    const int64_t* slice_offset, const int64_t* slice_width, const float* scalings,
    const int32_t* ranks, lora_adapter_index_t index, float* t_workspace, void* y, void* stream,
    void* cublas, void* workspace, size_t workspace_bytes);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* LORA_OPS_LORA_OPS_H_ */
