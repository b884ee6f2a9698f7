// The C ABI (lora_ops/lora_ops.h): translates C arguments to the lora_ops::cpu and
// lora_ops::cuda kernels, and is the wall no C++ exception crosses.
#include <new>

#include "lora_ops/kernels.h"
#include "lora_ops/lora_ops.h"

namespace {

using lora_ops::AdapterStack;

template <class Body>
lora_status_t guarded(Body&& body) noexcept {
  try {
    return body();
  } catch (...) {
    // The kernels throw nothing but std::bad_alloc; common.h has no out-of-memory status.
    return LORA_ERR_UNSUPPORTED;
  }
}

// lora_adapter_stack_t[num_slices] as the kernels' AdapterStack (same fields, C++ type).
struct Stacks {
  AdapterStack slice[LORA_MAX_SLICES];
};

lora_status_t copy_stacks(const lora_adapter_stack_t* in, int64_t num_slices, Stacks& out) {
  if (num_slices < 1 || in == nullptr) return LORA_ERR_INVALID_ARGUMENT;
  if (num_slices > LORA_MAX_SLICES) return LORA_ERR_UNSUPPORTED;
  for (int64_t s = 0; s < num_slices; ++s) {
    out.slice[s] = AdapterStack{in[s].data, in[s].stride_l, in[s].stride_row, in[s].stride_col};
  }
  return LORA_OK;
}

void call_user_gemm(void* ctx, lora_dtype_t dtype, bool b_is_nk, int64_t m, int64_t n, int64_t k,
                    const void* a, int64_t lda, const void* b, int64_t ldb, float beta, void* c,
                    int64_t ldc) {
  const auto* user = static_cast<const lora_cpu_gemm_t*>(ctx);
  user->fn(user->ctx, dtype, b_is_nk ? 1 : 0, m, n, k, a, lda, b, ldb, beta, c, ldc);
}

// The caller's GEMM, or the built-in one for NULL; false for a callback without a function.
bool to_gemm(const lora_cpu_gemm_t* user, lora_ops::cpu::Gemm& out) {
  if (user == nullptr) {
    out = lora_ops::cpu::builtin_gemm();
    return true;
  }
  if (user->fn == nullptr) return false;
  out = lora_ops::cpu::Gemm{&call_user_gemm, const_cast<lora_cpu_gemm_t*>(user), nullptr};
  return true;
}

}  // namespace

extern "C" {

#define LORA_OPS_STR_(x) #x
#define LORA_OPS_STR(x) LORA_OPS_STR_(x)

const char* lora_ops_version(void) {
  return LORA_OPS_STR(LORA_OPS_VERSION_MAJOR) "." LORA_OPS_STR(
      LORA_OPS_VERSION_MINOR) "." LORA_OPS_STR(LORA_OPS_VERSION_PATCH);
}

const char* lora_ops_status_string(lora_status_t status) {
  switch (status) {
    case LORA_OK:
      return "ok";
    case LORA_ERR_INVALID_ARGUMENT:
      return "invalid argument";
    case LORA_ERR_UNSUPPORTED:
      return "unsupported by this build (or out of memory)";
    case LORA_ERR_CUDA:
      return "CUDA error";
    case LORA_ERR_CUBLAS:
      return "cuBLAS error";
    case LORA_STATUS_RANGE_MIN_:
    case LORA_STATUS_RANGE_MAX_:
      break;
  }
  return "unknown status";
}

int lora_ops_has_cuda(void) {
#ifdef LORA_OPS_WITH_CUDA
  return 1;
#else
  return 0;
#endif
}

lora_status_t lora_ops_cpu_lora_linear_fwd(lora_dtype_t dtype, int64_t M, int64_t N, int64_t K,
                                           int64_t r, const void* x, int64_t ldx,
                                           const void* weight, const void* bias, const void* lora_a,
                                           const void* lora_b, float scaling,
                                           lora_dropout_t dropout, void* s_out, void* y,
                                           const lora_cpu_gemm_t* gemm) {
  return guarded([&] {
    lora_ops::cpu::Gemm g;
    if (!to_gemm(gemm, g)) return LORA_ERR_INVALID_ARGUMENT;
    return lora_ops::cpu::lora_linear_fwd(dtype, M, N, K, r, x, ldx, weight, bias, lora_a, lora_b,
                                          scaling, dropout, s_out, y, g);
  });
}

lora_status_t lora_ops_cpu_lora_linear_bwd(lora_dtype_t dtype, int64_t M, int64_t N, int64_t K,
                                           int64_t r, const void* dy, const void* x, int64_t ldx,
                                           const void* weight, const void* lora_a,
                                           const void* lora_b, const void* s_saved, float scaling,
                                           lora_dropout_t dropout, void* dx, void* d_lora_a,
                                           void* d_lora_b, const lora_cpu_gemm_t* gemm) {
  return guarded([&] {
    lora_ops::cpu::Gemm g;
    if (!to_gemm(gemm, g)) return LORA_ERR_INVALID_ARGUMENT;
    return lora_ops::cpu::lora_linear_bwd(dtype, M, N, K, r, dy, x, ldx, weight, lora_a, lora_b,
                                          s_saved, scaling, dropout, dx, d_lora_a, d_lora_b, g);
  });
}

lora_status_t lora_ops_cpu_multi_lora_shrink(lora_dtype_t dtype, int64_t M, int64_t K, int64_t L,
                                             int64_t r_max, int64_t num_slices, const void* x,
                                             int64_t ldx, const lora_adapter_stack_t* lora_a,
                                             const float* scalings, const int32_t* ranks,
                                             lora_adapter_index_t index, float* t) {
  return guarded([&] {
    Stacks a;
    const lora_status_t status = copy_stacks(lora_a, num_slices, a);
    if (status != LORA_OK) return status;
    return lora_ops::cpu::multi_lora_shrink(dtype, M, K, L, r_max, num_slices, x, ldx, a.slice,
                                            scalings, ranks, index, t);
  });
}

lora_status_t lora_ops_cpu_multi_lora_expand(lora_dtype_t dtype, int64_t M, int64_t L,
                                             int64_t r_max, int64_t num_slices, const float* t,
                                             const lora_adapter_stack_t* lora_b,
                                             const int64_t* slice_offset,
                                             const int64_t* slice_width, const int32_t* ranks,
                                             lora_adapter_index_t index, void* y, int64_t ldy) {
  return guarded([&] {
    Stacks b;
    const lora_status_t status = copy_stacks(lora_b, num_slices, b);
    if (status != LORA_OK) return status;
    return lora_ops::cpu::multi_lora_expand(dtype, M, L, r_max, num_slices, t, b.slice,
                                            slice_offset, slice_width, ranks, index, y, ldy);
  });
}

lora_status_t lora_ops_cpu_multi_lora_linear_fwd(
    lora_dtype_t dtype, int64_t M, int64_t N, int64_t K, int64_t L, int64_t r_max,
    int64_t num_slices, const void* x, int64_t ldx, const void* weight, const void* bias,
    const lora_adapter_stack_t* lora_a, const lora_adapter_stack_t* lora_b,
    const int64_t* slice_offset, const int64_t* slice_width, const float* scalings,
    const int32_t* ranks, lora_adapter_index_t index, float* t_workspace, void* y,
    const lora_cpu_gemm_t* gemm) {
  return guarded([&] {
    lora_ops::cpu::Gemm g;
    if (!to_gemm(gemm, g)) return LORA_ERR_INVALID_ARGUMENT;
    Stacks a, b;
    lora_status_t status = copy_stacks(lora_a, num_slices, a);
    if (status == LORA_OK) status = copy_stacks(lora_b, num_slices, b);
    if (status != LORA_OK) return status;
    return lora_ops::cpu::multi_lora_linear_fwd(
        dtype, M, N, K, L, r_max, num_slices, x, ldx, weight, bias, a.slice, b.slice, slice_offset,
        slice_width, scalings, ranks, index, t_workspace, y, g);
  });
}

lora_status_t lora_ops_cpu_multi_lora_linear_dx(
    lora_dtype_t dtype, int64_t M, int64_t N, int64_t K, int64_t L, int64_t r_max,
    int64_t num_slices, const void* dy, const void* weight, const lora_adapter_stack_t* lora_a,
    const float* dt, const int32_t* ranks, lora_adapter_index_t index, void* dx,
    const lora_cpu_gemm_t* gemm) {
  return guarded([&] {
    lora_ops::cpu::Gemm g;
    if (!to_gemm(gemm, g)) return LORA_ERR_INVALID_ARGUMENT;
    Stacks a;
    const lora_status_t status = copy_stacks(lora_a, num_slices, a);
    if (status != LORA_OK) return status;
    return lora_ops::cpu::multi_lora_linear_dx(dtype, M, N, K, L, r_max, num_slices, dy, weight,
                                               a.slice, dt, ranks, index, dx, g);
  });
}

lora_status_t lora_ops_cpu_multi_lora_adapter_grad(
    lora_dtype_t u_dtype, lora_dtype_t v_dtype, int64_t M, int64_t P, int64_t Q, int64_t L,
    const void* u, int64_t ldu, const void* v, int64_t ldv, const int32_t* ranks, int rank_dim,
    lora_adapter_index_t index, lora_dtype_t out_dtype, void* out) {
  return guarded([&] {
    return lora_ops::cpu::multi_lora_adapter_grad(u_dtype, v_dtype, M, P, Q, L, u, ldu, v, ldv,
                                                  ranks, rank_dim, index, out_dtype, out);
  });
}

}  // extern "C"

#ifdef LORA_OPS_WITH_CUDA

namespace {

// The kernels check the workspace against their own *_workspace_bytes.
lora_ops::cuda::Context cuda_context(void* stream, void* cublas, void* workspace,
                                     size_t workspace_bytes) {
  return lora_ops::cuda::Context{static_cast<cudaStream_t>(stream),
                                 static_cast<cublasHandle_t>(cublas), workspace, workspace_bytes};
}

lora_ops::cuda::Context stream_only(void* stream) {
  return cuda_context(stream, nullptr, nullptr, 0);
}

// A size query that failed asks for no workspace; the call itself then reports the error.
template <class Body>
size_t guarded_bytes(Body&& body) noexcept {
  try {
    return body();
  } catch (...) {
    return 0;
  }
}

}  // namespace

extern "C" {

size_t lora_ops_cuda_lora_linear_fwd_workspace_bytes(lora_dtype_t dtype, int64_t M, int64_t N,
                                                     int64_t K, int64_t r) {
  return guarded_bytes(
      [&] { return lora_ops::cuda::lora_linear_fwd_workspace_bytes(dtype, M, N, K, r); });
}

size_t lora_ops_cuda_lora_linear_bwd_workspace_bytes(lora_dtype_t dtype, int64_t M, int64_t N,
                                                     int64_t K, int64_t r) {
  return guarded_bytes(
      [&] { return lora_ops::cuda::lora_linear_bwd_workspace_bytes(dtype, M, N, K, r); });
}

size_t lora_ops_cuda_multi_lora_linear_fwd_workspace_bytes(lora_dtype_t dtype, int64_t M, int64_t N,
                                                           int64_t K, int64_t r_max,
                                                           int64_t num_slices) {
  return guarded_bytes([&] {
    return lora_ops::cuda::multi_lora_linear_fwd_workspace_bytes(dtype, M, N, K, r_max, num_slices);
  });
}

lora_status_t lora_ops_cuda_lora_linear_fwd(lora_dtype_t dtype, int64_t M, int64_t N, int64_t K,
                                            int64_t r, const void* x, int64_t ldx,
                                            const void* weight, const void* bias,
                                            const void* lora_a, const void* lora_b, float scaling,
                                            lora_dropout_t dropout, void* s_out, void* y,
                                            void* stream, void* cublas, void* workspace,
                                            size_t workspace_bytes) {
  return guarded([&] {
    return lora_ops::cuda::lora_linear_fwd(
        dtype, M, N, K, r, x, ldx, weight, bias, lora_a, lora_b, scaling, dropout, s_out, y,
        cuda_context(stream, cublas, workspace, workspace_bytes));
  });
}

lora_status_t lora_ops_cuda_lora_linear_bwd(lora_dtype_t dtype, int64_t M, int64_t N, int64_t K,
                                            int64_t r, const void* dy, const void* x, int64_t ldx,
                                            const void* weight, const void* lora_a,
                                            const void* lora_b, const void* s_saved, float scaling,
                                            lora_dropout_t dropout, void* dx, void* d_lora_a,
                                            void* d_lora_b, void* stream, void* cublas,
                                            void* workspace, size_t workspace_bytes) {
  return guarded([&] {
    return lora_ops::cuda::lora_linear_bwd(
        dtype, M, N, K, r, dy, x, ldx, weight, lora_a, lora_b, s_saved, scaling, dropout, dx,
        d_lora_a, d_lora_b, cuda_context(stream, cublas, workspace, workspace_bytes));
  });
}

lora_status_t lora_ops_cuda_multi_lora_shrink(lora_dtype_t dtype, int64_t M, int64_t K, int64_t L,
                                              int64_t r_max, int64_t num_slices, const void* x,
                                              int64_t ldx, const lora_adapter_stack_t* lora_a,
                                              const float* scalings, const int32_t* ranks,
                                              lora_adapter_index_t index, float* t, void* stream) {
  return guarded([&] {
    Stacks a;
    const lora_status_t status = copy_stacks(lora_a, num_slices, a);
    if (status != LORA_OK) return status;
    return lora_ops::cuda::multi_lora_shrink(dtype, M, K, L, r_max, num_slices, x, ldx, a.slice,
                                             scalings, ranks, index, t, stream_only(stream));
  });
}

lora_status_t lora_ops_cuda_multi_lora_expand(
    lora_dtype_t dtype, int64_t M, int64_t L, int64_t r_max, int64_t num_slices, const float* t,
    const lora_adapter_stack_t* lora_b, const int64_t* slice_offset, const int64_t* slice_width,
    const int32_t* ranks, lora_adapter_index_t index, void* y, int64_t ldy, void* stream) {
  return guarded([&] {
    Stacks b;
    const lora_status_t status = copy_stacks(lora_b, num_slices, b);
    if (status != LORA_OK) return status;
    return lora_ops::cuda::multi_lora_expand(dtype, M, L, r_max, num_slices, t, b.slice,
                                             slice_offset, slice_width, ranks, index, y, ldy,
                                             stream_only(stream));
  });
}

lora_status_t lora_ops_cuda_multi_lora_linear_fwd(
    lora_dtype_t dtype, int64_t M, int64_t N, int64_t K, int64_t L, int64_t r_max,
    int64_t num_slices, const void* x, int64_t ldx, const void* weight, const void* bias,
    const lora_adapter_stack_t* lora_a, const lora_adapter_stack_t* lora_b,
    const int64_t* slice_offset, const int64_t* slice_width, const float* scalings,
    const int32_t* ranks, lora_adapter_index_t index, float* t_workspace, void* y, void* stream,
    void* cublas, void* workspace, size_t workspace_bytes) {
  return guarded([&] {
    Stacks a, b;
    lora_status_t status = copy_stacks(lora_a, num_slices, a);
    if (status == LORA_OK) status = copy_stacks(lora_b, num_slices, b);
    if (status != LORA_OK) return status;
    return lora_ops::cuda::multi_lora_linear_fwd(
        dtype, M, N, K, L, r_max, num_slices, x, ldx, weight, bias, a.slice, b.slice, slice_offset,
        slice_width, scalings, ranks, index, t_workspace, y,
        cuda_context(stream, cublas, workspace, workspace_bytes));
  });
}

}  // extern "C"

#else  // !LORA_OPS_WITH_CUDA: the same symbols, so one header serves every build.

extern "C" {

size_t lora_ops_cuda_lora_linear_fwd_workspace_bytes(lora_dtype_t, int64_t, int64_t, int64_t,
                                                     int64_t) {
  return 0;
}

size_t lora_ops_cuda_lora_linear_bwd_workspace_bytes(lora_dtype_t, int64_t, int64_t, int64_t,
                                                     int64_t) {
  return 0;
}

size_t lora_ops_cuda_multi_lora_linear_fwd_workspace_bytes(lora_dtype_t, int64_t, int64_t, int64_t,
                                                           int64_t, int64_t) {
  return 0;
}

lora_status_t lora_ops_cuda_lora_linear_fwd(lora_dtype_t, int64_t, int64_t, int64_t, int64_t,
                                            const void*, int64_t, const void*, const void*,
                                            const void*, const void*, float, lora_dropout_t, void*,
                                            void*, void*, void*, void*, size_t) {
  return LORA_ERR_UNSUPPORTED;
}

lora_status_t lora_ops_cuda_lora_linear_bwd(lora_dtype_t, int64_t, int64_t, int64_t, int64_t,
                                            const void*, const void*, int64_t, const void*,
                                            const void*, const void*, const void*, float,
                                            lora_dropout_t, void*, void*, void*, void*, void*,
                                            void*, size_t) {
  return LORA_ERR_UNSUPPORTED;
}

lora_status_t lora_ops_cuda_multi_lora_shrink(lora_dtype_t, int64_t, int64_t, int64_t, int64_t,
                                              int64_t, const void*, int64_t,
                                              const lora_adapter_stack_t*, const float*,
                                              const int32_t*, lora_adapter_index_t, float*, void*) {
  return LORA_ERR_UNSUPPORTED;
}

lora_status_t lora_ops_cuda_multi_lora_expand(lora_dtype_t, int64_t, int64_t, int64_t, int64_t,
                                              const float*, const lora_adapter_stack_t*,
                                              const int64_t*, const int64_t*, const int32_t*,
                                              lora_adapter_index_t, void*, int64_t, void*) {
  return LORA_ERR_UNSUPPORTED;
}

lora_status_t lora_ops_cuda_multi_lora_linear_fwd(
    lora_dtype_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, const void*, int64_t,
    const void*, const void*, const lora_adapter_stack_t*, const lora_adapter_stack_t*,
    const int64_t*, const int64_t*, const float*, const int32_t*, lora_adapter_index_t, float*,
    void*, void*, void*, void*, size_t) {
  return LORA_ERR_UNSUPPORTED;
}

}  // extern "C"

#endif  // LORA_OPS_WITH_CUDA
