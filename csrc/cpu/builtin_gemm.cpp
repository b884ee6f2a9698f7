// The portable GEMM of the C ABI and of builds without an external BLAS: the packed engine of
// packed_gemm.h with a plain `c = a op(b) + beta c` epilogue.
#include <algorithm>
#include <limits>

#include "cpu/dtype.h"
#include "cpu/gemm_operands.h"
#include "cpu/packed_gemm.h"
#include "lora_ops/kernels.h"

namespace lora_ops::cpu {

namespace {

void builtin_gemm_fn(void*, lora_dtype_t dtype, bool b_is_nk, int64_t m, int64_t n, int64_t k,
                     const void* a, int64_t lda, const void* b, int64_t ldb, float beta, void* c,
                     int64_t ldc) {
  if (m <= 0 || n <= 0 || k < 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const OperandA<T> a_op{static_cast<const T*>(a), lda, 1};
    T* ct = static_cast<T*>(c);
    const lora_status_t status =
        parallel_gemm(a_op, gemm_operand_b(static_cast<const T*>(b), ldb, b_is_nk),
                      StoreGemm<T>{ct, ldc, beta}, m, n, k);
    if (status != LORA_OK) {
      // The callback cannot return a status: a GEMM that could not run leaves NaN, never a
      // plausible-looking result.
      const T nan = from_float<T>(std::numeric_limits<float>::quiet_NaN());
      for (int64_t i = 0; i < m; ++i) std::fill(ct + i * ldc, ct + i * ldc + n, nan);
    }
    return status;
  });
}

bool always_builtin(lora_dtype_t, bool, int64_t) { return true; }

}  // namespace

Gemm builtin_gemm() { return Gemm{&builtin_gemm_fn, nullptr, &always_builtin}; }

// Measured in one process against ATen's CPU matmul on 2-core AMD EPYC machines, with the fused
// op's base products (K and N of 333-14336):
// - fp32 (MKL), AVX2 + FMA: the packed path wins up to ~1024 rows (1.1-2x at M = 17-64,
//   1.0-1.4x at M = 100-1024) and ties or loses above.
// - fp32, AVX-512: it wins at every shape measured, M = 17-8192 (MKL takes 1.2-2.4x its time
//   at M = 17-64, 1.15-1.3x at M = 512-8192).
// - fp16 and bf16 without native half-precision arithmetic: ATen's matmul is 7x to 100x slower.
// - bf16 with AVX512_BF16 (oneDNN, like our packed path from 9 rows, or 5 for dY W, uses the
//   dot-product instructions; our streamed path widens to fp32): for up to 4 rows our whole
//   fused op took 0.7-0.9x the time of ATen's bare x W^T and 0.5-0.9x its bare dY W
//   (K = N = 4096). With more rows, the fused op on our base GEMM (C ABI) against the torch op
//   on ATen's, fwd: 0.92 / 1.18 / 1.32 / 1.31 / 1.19 at M = 5 / 8 / 12 / 16 / 64; bwd (dY W):
//   0.90 / 0.84 / 0.86 / 0.96 / 0.94 / 1.00 at M = 8 / 16 / 24 / 32 / 48 / 64, and the fused bwd
//   took 1.15x ATen's bare dY W at M = 256. Before the dot-product path, ours took 2x ATen's
//   time at 16 rows and 2.3x at 64.
// - fp16, AVX-512 without AVX512_FP16: ATen's one-row x W^T product (its fp16 GEMV) is a tie
//   with our whole fused op; from 2 rows, and for dY W at any M, it is 2x to 500x slower.
// And on a 2-core Intel Xeon (Sapphire Rapids class: AVX512_BF16, AVX512_FP16, AMX) on
// 2026-12-05, the torch op on each GEMM (LORA_OPS_CPU_GEMM=builtin / aten), r = 16,
// K = N = 4096, the weight rotated through six copies (read from memory), time builtin / ATen
// for the forward and for the backward (after the streamed-B changes of that day):
// - fp32 (MKL): fwd 0.57 / 0.54 / 0.55 / 0.63 / 0.89 at M = 4 / 8 / 12 / 16 / 24; with the
//   weight in cache 0.99 / 1.00 at M = 32 / 64, 1.12 at M = 256 (N = 1024), 1.15 at M = 1024
//   (K = N = 2048); the multi-adapter fwd at T = 64 / 256, K = N = 2048 (bench): 1.08 / 1.13.
//   bwd 0.87 / 1.13 / 0.98 / 0.92 / 0.78 / 1.13 at M = 4 / 8 / 10 / 12 / 16 / 24.
//   On 2026-12-06, after gemm_tile_b_rows (fp32 W read in place at 17-128 rows) and its
//   one-vector last panel, the torch op's time over F.linear's (MKL) in one process, the weight
//   rotated through ten copies, K = N = 4096, on the built-in GEMM / on MKL: 0.96 / 1.04,
//   0.91 / 1.04, 0.93 / 1.03, 0.98 / 1.04, 0.98 / 1.04, 1.02 / 1.03, 1.03 / 1.05 at M = 40 / 48 /
//   64 / 80 / 96 / 112 / 128; at M = 64 with N = 1024 / 14336, 1.00 / 1.09 and 0.90 / 1.03; at
//   M = 96 with K = 14336, 0.98 / 1.01; at M = 256, 1.07 / 1.04. Hence 128 rows. (Later that
//   day gemm_tile_b_rows' depth blocks went from 256 to 2048: the fused op then took 0.74-0.97x
//   its former time at M = 24-128, 0.78x F.linear's at M = 64 in the bench. Tiles of 129-256
//   rows took that path later still, in runs of 1024 (b_rows_depth): see kBRowsMaxM.) On
//   2026-12-07 (benchmarks/cpu_gemm_crossover.py, three runs, paired time builtin / MKL): at
//   129-256 rows 0.85-1.16, above 1 in most runs at M = 256 (1.04-1.16 at N = 1024, 2048 and
//   4096), so MKL keeps them; at 128 rows 0.91-0.97 with N = 4096, 0.98 at K = N = 2048, but
//   1.07-1.11 at K = 4096, N = 1024 (and 1.07-1.10 at 112 rows there, 0.97 at 96). Later that
//   day the in-place path's tiles became fewer and wider (plan_tiles), and then: 0.98 / 1.01 /
//   1.02 at 96 / 112 / 128 rows there, 1.04 at 128 rows with K = 2048, 0.97 at 128 and 0.98 at
//   160 rows with K = N = 4096, 1.03 / 1.10 at 192 / 256 rows with N = 1024. So 128 rows still,
//   and no limit that falls with N (the choice does not see N; it would gain 1-2% there).
// - bf16 without AMX (on a Xeon of that class whose VM exposes no AMX; oneDNN's AVX512_BF16
//   kernels), 2026-12-07, benchmarks/cpu_gemm_crossover.py, paired builtin / ATen: fwd 0.58 /
//   0.77-0.80 / 0.73-0.76 / 1.04 / 0.94-0.98 / 1.03-1.05 at M = 4 / 5 / 8 / 10 / 12 / 16
//   (K = N = 4096); at M = 8 0.67 (N = 1024) and 0.76 (K = N = 2048); at M = 12 0.97 / 0.91 /
//   1.05 / 1.05 (N = 1024; K = N = 2048; N = 14336; K = 14336). Hence 8 rows on Intel, where
//   the AMD machines gave 4. bwd 0.48 / 0.50 / 0.57 / 1.01 / 0.97 / 0.99 / 0.99 at M = 4 / 8 /
//   16 / 32 / 48 / 64 / 96: the 48 rows measured on AMD hold.
// - bf16 (oneDNN on AMX): fwd 0.73 / 0.98 / 1.07 / 1.21 / 2.2 / 2.4 at M = 4 / 5 / 6 / 8 / 12 /
//   16 (5.1 at M = 64, in cache); bwd 0.53 / 0.61 / 0.65 / 0.71 / 0.89 / 1.04 at M = 4 / 5 / 6 /
//   8 / 12 / 16.
// - fp16 (AVX512_FP16): fwd 0.46 / 0.71 / 0.90 / 1.08 / 1.35 at M = 4 / 8 / 12 / 16 / 24; bwd
//   0.52 / 0.55 / 0.62 / 0.71 / 1.18 / 1.25 at M = 4 / 8 / 12 / 16 / 24 / 32.
// With other vector units only the streamed path (up to kBuiltinGemmStreamRows) has been
// measured against a BLAS.
// The most rows of a product the built-in GEMM takes, x W^T / dY W: bf16 with AVX512_BF16
// (x W^T: on AMD, and on Intel without AMX), bf16 on AMX, fp16 on AVX512_FP16, fp32 against
// MKL on Intel.
constexpr int64_t kBf16MaxRows = 4, kIntelBf16MaxRows = 8, kBf16MaxRowsDyW = 48;
constexpr int64_t kAmxBf16MaxRows = 4, kAmxBf16MaxRowsDyW = 12;
constexpr int64_t kFp16NativeMaxRows = 12, kFp16NativeMaxRowsDyW = 16;
constexpr int64_t kMklIntelMaxRows = 128, kMklIntelMaxRowsDyW = 16;

const char* cpu_vector_isa() {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
  return "avx2";
#else
  return "baseline";
#endif
}

bool builtin_gemm_preferred(lora_dtype_t dtype, bool b_is_nk, int64_t m,
                            const BlasTraits& blas) {
  const auto rows_up_to = [&](int64_t x_wt, int64_t dy_w) {
    return m <= (b_is_nk ? x_wt : dy_w);
  };
  switch (dtype) {
    case LORA_DTYPE_BF16:
      if (blas.bf16_amx) return rows_up_to(kAmxBf16MaxRows, kAmxBf16MaxRowsDyW);
#if defined(__AVX512BF16__)
      return rows_up_to(blas.intel_cpu ? kIntelBf16MaxRows : kBf16MaxRows, kBf16MaxRowsDyW);
#else
      return true;
#endif
    case LORA_DTYPE_F16:
      if (blas.fp16_native) return rows_up_to(kFp16NativeMaxRows, kFp16NativeMaxRowsDyW);
      return true;
    case LORA_DTYPE_F32:
#if defined(__AVX512F__)
      if (blas.mkl_on_intel) return rows_up_to(kMklIntelMaxRows, kMklIntelMaxRowsDyW);
      return true;
#elif defined(__AVX2__) && defined(__FMA__)
      return m <= 1024;
#else
      return m <= kBuiltinGemmStreamRows;
#endif
    default: return true;
  }
}

}  // namespace lora_ops::cpu
