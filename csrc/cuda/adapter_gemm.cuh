// The adapter-in-GEMM plans on Hopper: one CUTLASS GEMM whose mainloop runs K + r deep
// (adapter_gemm_sm90.cuh). Forward: y = x W^T + (scaling S) B^T + b. Backward without dropout:
// dX = dY W + dS A, the same GEMM with the weights' operands stored depth-by-output. Host side
// only here.
#ifndef LORA_OPS_CUDA_ADAPTER_GEMM_CUH_
#define LORA_OPS_CUDA_ADAPTER_GEMM_CUH_

#include <cuda_runtime.h>
#include <stdint.h>

#include "lora_ops/common.h"

namespace lora_ops {
namespace cuda {
namespace detail {

// How the weights' operands (w, b) are stored: out-by-depth as the forward's W [N, K] and
// B [N, r]; depth-by-output as the backward's W [N, K] and A [r, K], where the product's depth
// is N + r and its output width K.
enum class WeightLayout { kOutByDepth, kDepthByOut };

// y [M, N] = x [M, K] w^T + s_scaled [M, r] b^T + bias, in the forward's names; the backward
// passes dY, W, dS, A and dX with N and K swapped. Rows of w and b are dense.
struct AdapterGemmArgs {
  int64_t M, N, K, r;
  const void* x;  // [M, K], row stride ldx
  int64_t ldx;
  const void* w;         // [N, K] or [K, N]
  const void* s_scaled;  // [M, r], row stride ld_s_scaled
  int64_t ld_s_scaled;
  const void* b;     // [N, r] or [r, N]
  const void* bias;  // [N] or null
  void* y;           // [M, N]
  WeightLayout layout;
};

// Row stride of the scaled S the plan's shrink writes: r rounded up to 8 elements, so that its
// rows start 16-byte aligned as TMA needs.
inline int64_t adapter_gemm_ld_s(int64_t r) { return (r + 7) / 8 * 8; }

// Whether the plan may run a call of this dtype and shape: built with CUTLASS, fp16 / bf16,
// every depth and width a multiple of 8, at least one 128-row tile, and enough 128 x 256 output
// tiles to fill the GPU (below that the cluster plan + cuBLAS keeps more SMs busy). Depends on the shape only, so
// lora_linear_fwd_workspace_bytes can size the scaled S from it.
bool adapter_gemm_shape_ok(lora_dtype_t dtype, int64_t M, int64_t N, int64_t K, int64_t r);

// LORA_OPS_CUDA_ADAPTER_GEMM: "0" switches the plan off; "1" requires it wherever the shape
// qualifies (a call it cannot run then fails with LORA_ERR_UNSUPPORTED: the tests use this to
// know the plan ran; the forward's plan, whose s·S comes from a cluster kernel, qualifies only
// while the cluster plans run); unset, it runs where it can.
enum class AdapterGemmMode { kOff, kAuto, kRequired };
AdapterGemmMode adapter_gemm_mode();

// Whether it runs this call here: adapter_gemm_shape_ok, not switched off, sm_90a code for
// this device, 16-byte aligned operands, and CUTLASS's own can_implement (asked before any
// launch, so a call it refuses takes the other plans whole).
bool adapter_gemm_usable(lora_dtype_t dtype, const AdapterGemmArgs& a);

// y, on `stream`. Call only where adapter_gemm_usable holds.
lora_status_t adapter_gemm(lora_dtype_t dtype, const AdapterGemmArgs& a, cudaStream_t stream);

}  // namespace detail
}  // namespace cuda
}  // namespace lora_ops

#endif  // LORA_OPS_CUDA_ADAPTER_GEMM_CUH_
