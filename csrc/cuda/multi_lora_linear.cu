// The fused base + multi-adapter layer on CUDA (math in kernels.h): y = x W^T + b + the
// multi-adapter term, leaving t in t_workspace for the backward pass.
//  - decode, M <= 8: the shrink, then the GEMV that streams W once and adds b and the expand
//    term in its epilogue (fused_gemv.cu). 2 launches, no cuBLAS.
//  - otherwise: the shrink, the expand in its init form writing y = b + term on every row
//    (rows without adapter get b), then cuBLAS adds x W^T (beta = 1). 3 launches.
#include <stdint.h>

#include "common.cuh"
#include "launchers.cuh"
#include "lora_ops/kernels.h"

namespace lora_ops {
namespace cuda {

size_t multi_lora_linear_fwd_workspace_bytes(lora_dtype_t, int64_t, int64_t, int64_t, int64_t,
                                             int64_t) {
  return 0;  // t lives in the caller's t_workspace; nothing else is needed
}

lora_status_t multi_lora_linear_fwd(lora_dtype_t dtype, int64_t M, int64_t N, int64_t K,
                                    int64_t L, int64_t r_max, int64_t num_slices, const void* x,
                                    int64_t ldx, const void* weight, const void* bias,
                                    const AdapterStack* lora_a, const AdapterStack* lora_b,
                                    const int64_t* slice_offset, const int64_t* slice_width,
                                    const float* scalings, const int32_t* ranks,
                                    lora_adapter_index_t index, float* t_workspace, void* y,
                                    const Context& ctx) {
  if (N < 0) return LORA_ERR_INVALID_ARGUMENT;
  detail::ShrinkParams sp;
  LORA_RETURN_IF_ERROR(detail::make_shrink_params(M, K, L, r_max, num_slices, x, ldx, lora_a,
                                                  scalings, ranks, index, t_workspace, &sp));
  detail::ExpandParams ep;
  LORA_RETURN_IF_ERROR(detail::make_expand_params(M, L, r_max, num_slices, t_workspace, lora_b,
                                                  slice_offset, slice_width, ranks, index, y, N,
                                                  N, &ep));
  if (!detail::present(weight, N * K)) return LORA_ERR_INVALID_ARGUMENT;
  const bool decode = M <= detail::kGemvMaxRows;
  if (!decode && M > 0 && N > 0 && K > 0 && ctx.cublas == nullptr) return LORA_ERR_INVALID_ARGUMENT;
  if (M == 0) return LORA_OK;

  if (decode) {
    return detail::launch_decode_layer(dtype, sp, ep, N, weight, bias, 1.0f,  // scalings in t
                                       ctx.stream);
  }
  LORA_RETURN_IF_ERROR(detail::launch_shrink(dtype, sp, ctx.stream));
  ep.init = true;
  ep.bias = bias;
  LORA_RETURN_IF_ERROR(detail::launch_expand(dtype, ep, ctx.stream));
  return detail::gemm_add_x_wt(ctx, dtype, M, N, K, x, ldx, weight, y);
}

}  // namespace cuda
}  // namespace lora_ops
