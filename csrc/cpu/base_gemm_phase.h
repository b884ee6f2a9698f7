// The base product of a fused kernel (x W^T forward, dY W backward), run after the kernel's
// adapter products have written their share of the output.
#ifndef LORA_OPS_CPU_BASE_GEMM_PHASE_H_
#define LORA_OPS_CPU_BASE_GEMM_PHASE_H_

#include "cpu/gemm_operands.h"
#include "cpu/packed_gemm.h"
#include "cpu/phased_work.h"
#include "lora_ops/kernels.h"

namespace lora_ops::cpu {

// Runs `work` and then c += a op(b) (beta = 1 onto what `work` wrote; b of `dtype`, which is T,
// laid out as in Gemm). When `gemm` would run the built-in GEMM for this product, its tiles are
// the last phase of the same parallel region, so the whole kernel wakes the thread team once;
// otherwise gemm.fn runs after the region. `threaded`: whether `work` wants the team.
template <class T>
lora_status_t run_then_base_gemm(PhasedWork& work, bool threaded, const Gemm& gemm,
                                 lora_dtype_t dtype, bool b_is_nk, int64_t m, int64_t n,
                                 int64_t k, const T* a, int64_t lda, const void* b, int64_t ldb,
                                 T* c, int64_t ldc) {
  const bool has_base = m > 0 && n > 0 && k > 0;
  if (has_base && gemm.runs_builtin(dtype, b_is_nk, m)) {
    const auto tiles = plan_gemm(OperandA<T>{a, lda, 1},
                                 gemm_operand_b(static_cast<const T*>(b), ldb, b_is_nk),
                                 StoreGemm<T>{c, ldc, 1.0f}, m, n, k);
    work.barrier();
    threaded = add_phase(work, tiles) || threaded;
    return work.run(threaded) ? LORA_OK : LORA_ERR_UNSUPPORTED;
  }
  if (!work.run(threaded)) return LORA_ERR_UNSUPPORTED;
  if (has_base) gemm.fn(gemm.ctx, dtype, b_is_nk, m, n, k, a, lda, b, ldb, 1.0f, c, ldc);
  return LORA_OK;
}

}  // namespace lora_ops::cpu

#endif  // LORA_OPS_CPU_BASE_GEMM_PHASE_H_
