// Host-and-device basics shared by the CUDA kernels of lora_ops: block shape, launch checks,
// dtype dispatch and the workspace carve-up. No ATen, no torch.
#ifndef LORA_OPS_CUDA_COMMON_CUH_
#define LORA_OPS_CUDA_COMMON_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

#include "common/arg_checks.h"
#include "lora_ops/common.h"

namespace lora_ops {
namespace cuda {
namespace detail {

// Every kernel runs blocks of kThreads threads: the reductions and tile maps assume it.
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// Largest adapter rank (r, r_max) the kernels take; shared-memory staging is sized by it.
constexpr int64_t kMaxRank = 512;

// Blocks that fill an H100 twice over (132 SMs). The split-K plans aim for this many blocks;
// a fixed number rather than a device query, so a shape always gets the same plan (and the
// same bits) on every GPU.
constexpr int64_t kTargetBlocks = 264;

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ constexpr int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }
__host__ __device__ constexpr int64_t clamp64(int64_t v, int64_t lo, int64_t hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

inline bool is_aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

inline int64_t dtype_size(lora_dtype_t dtype) { return dtype == LORA_DTYPE_F32 ? 4 : 2; }

// Whether every row of `ld` elements from p starts 16-byte aligned, so rows may be read with
// 16-byte vectors.
inline bool rows_vec_ok(lora_dtype_t dtype, const void* p, int64_t ld) {
  return is_aligned16(p) && (ld * dtype_size(dtype)) % 16 == 0;
}

using args::non_negative;
using args::present;
using args::row_stride_ok;
using args::expand_slices_valid;

// Status of the launch just made.
inline lora_status_t launch_status() {
  return cudaGetLastError() == cudaSuccess ? LORA_OK : LORA_ERR_CUDA;
}

#define LORA_RETURN_IF_ERROR(expr)            \
  do {                                        \
    const lora_status_t lora_status_ = (expr); \
    if (lora_status_ != LORA_OK) return lora_status_; \
  } while (0)

template <typename T>
struct TypeTag {
  using type = T;
};

// f(TypeTag<T>{}) with T the element type of `dtype`.
template <class F>
lora_status_t dispatch_dtype(lora_dtype_t dtype, F&& f) {
  switch (dtype) {
    case LORA_DTYPE_F32:
      return f(TypeTag<float>{});
    case LORA_DTYPE_F16:
      return f(TypeTag<__half>{});
    case LORA_DTYPE_BF16:
      return f(TypeTag<__nv_bfloat16>{});
    case LORA_DTYPE_RANGE_MIN_:
    case LORA_DTYPE_RANGE_MAX_:
      break;
  }
  return LORA_ERR_UNSUPPORTED;
}

// arr[i] for a runtime i without indexing a kernel-parameter array dynamically (which would
// copy the whole array to local memory).
template <typename E, int N>
__device__ __forceinline__ E select_slice(const E (&arr)[N], int i) {
  E out = arr[0];
#pragma unroll
  for (int k = 1; k < N; ++k) {
    if (k == i) out = arr[k];
  }
  return out;
}

// Sub-buffers of Context.workspace, 256-byte aligned. Used twice with the same calls: once to
// size the workspace (*_workspace_bytes) and once to hand out the pointers, so the two agree.
class WorkspaceLayout {
 public:
  explicit WorkspaceLayout(void* base = nullptr) : base_(static_cast<char*>(base)) {}

  template <typename E>
  E* take(size_t count) {
    const size_t offset = used_;
    used_ += (count * sizeof(E) + 255) / 256 * 256;
    return base_ == nullptr ? nullptr : reinterpret_cast<E*>(base_ + offset);
  }
  size_t bytes() const { return used_; }

 private:
  char* base_;
  size_t used_ = 0;
};

}  // namespace detail
}  // namespace cuda
}  // namespace lora_ops

#endif  // LORA_OPS_CUDA_COMMON_CUH_
