// Entry points of the adapter-in-GEMM kernel for one element type, or stubs that say "not
// here" when the build has no CUTLASS headers (setup.py and CMakeLists.txt add them when the
// nvidia-cutlass package or LORA_OPS_CUTLASS_DIR provides them).
#ifndef LORA_OPS_CUDA_ADAPTER_GEMM_SM90_ENTRY_CUH_
#define LORA_OPS_CUDA_ADAPTER_GEMM_SM90_ENTRY_CUH_

// CUTLASS's device-side asserts are calls: ptxas then serialises every wgmma of the kernel
// (warning C7510) unless they compile away. The per-dtype files include this header first.
#ifndef NDEBUG
#define NDEBUG
#endif

#include "adapter_gemm.cuh"

#if __has_include(<cutlass/cutlass.h>)
// CUTLASS 4.2's newer collectives capture `this` implicitly in lambdas, which the C++20 of
// torch's build deprecates (warning 2908, a dozen times per file); nothing of ours is affected.
#pragma nv_diag_suppress 2908
#include "adapter_gemm_sm90.cuh"
#define LORA_OPS_ADAPTER_GEMM_ENTRY(tag, E)                                                 \
  namespace lora_ops::cuda::detail::sm90 {                                                  \
  lora_status_t run_##tag(const AdapterGemmArgs& a, int sm_count, cudaStream_t stream) {    \
    return a.layout == WeightLayout::kOutByDepth                                            \
               ? run<E, WeightLayout::kOutByDepth>(a, sm_count, stream)                     \
               : run<E, WeightLayout::kDepthByOut>(a, sm_count, stream);                    \
  }                                                                                         \
  bool runs_here_##tag() {                                                                  \
    return kernel_runs_here<E, WeightLayout::kOutByDepth>() &&                              \
           kernel_runs_here<E, WeightLayout::kDepthByOut>();                                \
  }                                                                                         \
  bool can_run_##tag(const AdapterGemmArgs& a) {                                            \
    return a.layout == WeightLayout::kOutByDepth ? can_run<E, WeightLayout::kOutByDepth>(a)  \
                                                 : can_run<E, WeightLayout::kDepthByOut>(a); \
  }                                                                                         \
  bool built_##tag() { return true; }                                                       \
  }
#else
#define LORA_OPS_ADAPTER_GEMM_ENTRY(tag, E)                                                 \
  namespace lora_ops::cuda::detail::sm90 {                                                  \
  lora_status_t run_##tag(const AdapterGemmArgs&, int, cudaStream_t) {                      \
    return LORA_ERR_UNSUPPORTED;                                                            \
  }                                                                                         \
  bool runs_here_##tag() { return false; }                                                  \
  bool can_run_##tag(const AdapterGemmArgs&) { return false; }                              \
  bool built_##tag() { return false; }                                                      \
  }
#endif

#endif  // LORA_OPS_CUDA_ADAPTER_GEMM_SM90_ENTRY_CUH_
