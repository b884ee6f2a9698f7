// The single-adapter forward's arguments as all its kernels take them, and the plans that live
// outside lora_linear_fwd.cu.
#ifndef LORA_OPS_CUDA_LORA_LINEAR_FWD_CUH_
#define LORA_OPS_CUDA_LORA_LINEAR_FWD_CUH_

#include <cuda_runtime.h>
#include <stdint.h>

#include "lora_ops/common.h"

namespace lora_ops {
namespace cuda {
namespace detail {

struct FwdArgs {
  int64_t M, N, K, r;
  const void* x;
  int64_t ldx;
  const void* w;
  const void* bias;
  const void* a;
  const void* b;
  float scaling;
  lora_dropout_t dropout;
  void* s_out;
  void* y;
  // Filled by the plans that use them.
  float* s_part;      // split plan: [splits, M, r]
  int splits;         // split plan
  int64_t split_len;  // split and cluster plans: the depth of one split / one cluster block
  bool vec_ok;        // decode cluster plan: x, W and A rows may be read as 16-byte vectors
  // Adapter-in-GEMM plan: the cluster kernel only computes S (s_out) and scaling * S into
  // s_scaled (row stride ld_s_scaled) for the GEMM that then writes y.
  bool shrink_only;
  void* s_scaled;
  int64_t ld_s_scaled;
};

// Largest rank the cluster plan takes (S partials and sums of a row tile in shared memory);
// also the forward adapter-in-GEMM plan's, whose s·S that kernel computes.
constexpr int64_t kClusterMaxRank = 128;

// Decode on GPUs with thread block clusters (cluster.cuh), M <= kDecodeClusterMaxRows: y and
// s_out in one launch (decode_cluster.cu). LORA_OK with *launched = false, having done nothing,
// when the plan does not apply here (no clusters, switched off, r past kMaxRank): the caller
// then runs its other plans. Up to 16 rows a CUDA-core GEMV that reads W once still keeps up
// with W's stream (16 FMAs per weight); cuBLAS plus the adapter kernels is 2 launches there.
constexpr int64_t kDecodeClusterMaxRows = 16;
lora_status_t launch_decode_cluster(lora_dtype_t dtype, FwdArgs p, cudaStream_t stream,
                                    bool* launched);

}  // namespace detail
}  // namespace cuda
}  // namespace lora_ops

#endif  // LORA_OPS_CUDA_LORA_LINEAR_FWD_CUH_
