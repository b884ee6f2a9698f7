// The base GEMM of the fused layers, on cuBLAS: row-major products expressed as the column-major
// products of the transposes (a row-major [m, n] matrix is a column-major [n, m] one), fp32
// accumulation (CUBLAS_COMPUTE_32F) and beta = 1, so cuBLAS adds onto what the adapter kernel
// wrote. cuBLAS picks tensor-core algorithms for fp16/bf16 by itself (CUBLAS_GEMM_DEFAULT).
#include <cublas_v2.h>
#include <limits.h>
#include <stdint.h>

#include "common.cuh"
#include "launchers.cuh"

namespace lora_ops {
namespace cuda {
namespace detail {
namespace {

cudaDataType_t cuda_data_type(lora_dtype_t dtype) {
  switch (dtype) {
    case LORA_DTYPE_F16:
      return CUDA_R_16F;
    case LORA_DTYPE_BF16:
      return CUDA_R_16BF;
    default:
      return CUDA_R_32F;
  }
}

bool fits_int(int64_t v) { return v >= 0 && v <= INT_MAX; }

// C[m, n] += op(A) op(B), column-major, on ctx.stream. The handle belongs to the caller: its
// stream and pointer mode (alpha and beta are host values) are set for the call only where they
// differ, and put back after. cublasSetStream also resets the handle's workspace to cuBLAS's
// default pool, dropping the one torch gives its handles (from its allocator, as CUDA graph
// capture needs), so it is not called when the stream is already the one (torch's current
// stream, which its handle already has).
lora_status_t gemm_add_col_major(const Context& ctx, lora_dtype_t dtype, cublasOperation_t op_a,
                                 cublasOperation_t op_b, int64_t m, int64_t n, int64_t k,
                                 const void* a, int64_t lda, const void* b, int64_t ldb, void* c,
                                 int64_t ldc) {
  if (m == 0 || n == 0 || k == 0) return LORA_OK;
  if (ctx.cublas == nullptr) return LORA_ERR_INVALID_ARGUMENT;
  if (!fits_int(m) || !fits_int(n) || !fits_int(k) || !fits_int(lda) || !fits_int(ldb) ||
      !fits_int(ldc)) {
    return LORA_ERR_UNSUPPORTED;
  }
  cudaStream_t stream = nullptr;
  if (cublasGetStream(ctx.cublas, &stream) != CUBLAS_STATUS_SUCCESS) return LORA_ERR_CUBLAS;
  if (stream != ctx.stream &&
      cublasSetStream(ctx.cublas, ctx.stream) != CUBLAS_STATUS_SUCCESS) {
    return LORA_ERR_CUBLAS;
  }
  cublasPointerMode_t mode;
  if (cublasGetPointerMode(ctx.cublas, &mode) != CUBLAS_STATUS_SUCCESS ||
      (mode != CUBLAS_POINTER_MODE_HOST &&
       cublasSetPointerMode(ctx.cublas, CUBLAS_POINTER_MODE_HOST) != CUBLAS_STATUS_SUCCESS)) {
    if (stream != ctx.stream) cublasSetStream(ctx.cublas, stream);
    return LORA_ERR_CUBLAS;
  }
  const float alpha = 1.0f, beta = 1.0f;
  const cudaDataType_t type = cuda_data_type(dtype);
  const cublasStatus_t status = cublasGemmEx(
      ctx.cublas, op_a, op_b, static_cast<int>(m), static_cast<int>(n), static_cast<int>(k),
      &alpha, a, type, static_cast<int>(lda), b, type, static_cast<int>(ldb), &beta, c, type,
      static_cast<int>(ldc), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  if (mode != CUBLAS_POINTER_MODE_HOST) cublasSetPointerMode(ctx.cublas, mode);
  if (stream != ctx.stream) cublasSetStream(ctx.cublas, stream);
  return status == CUBLAS_STATUS_SUCCESS ? LORA_OK : LORA_ERR_CUBLAS;
}

}  // namespace

// y^T [N, M] = W [N, K] x^T [K, M]: W (row-major [N, K]) is column-major [K, N], transposed;
// x (row-major, stride ldx) is column-major [K, M] with leading dimension ldx (any value will do
// for a single row, which may come with any stride).
lora_status_t gemm_add_x_wt(const Context& ctx, lora_dtype_t dtype, int64_t M, int64_t N,
                            int64_t K, const void* x, int64_t ldx, const void* w, void* y) {
  const int64_t ld = M <= 1 ? K : ldx;
  return gemm_add_col_major(ctx, dtype, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, w, K, x, ld, y, N);
}

// dx^T [K, M] = W^T [K, N] dy^T [N, M]: W row-major [N, K] is column-major [K, N] as is;
// dy row-major [M, N] is column-major [N, M].
lora_status_t gemm_add_dy_w(const Context& ctx, lora_dtype_t dtype, int64_t M, int64_t N,
                            int64_t K, const void* dy, const void* w, void* dx) {
  return gemm_add_col_major(ctx, dtype, CUBLAS_OP_N, CUBLAS_OP_N, K, M, N, w, K, dy, N, dx, K);
}

}  // namespace detail
}  // namespace cuda
}  // namespace lora_ops
