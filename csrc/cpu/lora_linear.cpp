// Single-adapter LoRA linear on CPU (math in kernels.h).
//
// Forward: one pass over x computes S = drop(x) A^T (dropout applied while packing x); one pass
// writes y = b + scaling * S B^T; the base GEMM then accumulates x W^T into y (beta = 1), so y
// is written once and read once by the GEMM, with no intermediate [M, N] tensor.
// Backward: dS = scaling * dY B (fp32 scratch), dB = scaling * dY^T S, dA = dS^T drop(x)
// (mask applied while packing x), dX = keep_scale * mask * (dS A) written first,
// then dY W added by the base GEMM.
#include <memory>
#include <new>

#include "common/arg_checks.h"
#include "cpu/base_gemm_phase.h"
#include "cpu/dtype.h"
#include "cpu/gemm_operands.h"
#include "cpu/packed_gemm.h"
#include "cpu/phased_work.h"
#include "lora_ops/kernels.h"

namespace lora_ops::cpu {

using args::non_negative;
using args::present;
using args::row_stride_ok;

namespace {

// y[i, j] = bias[j] + scaling * C(i, j).
template <class T>
struct StoreBiasScaled {
  T* y;
  int64_t ld;
  const T* bias;
  float scaling;

  void store(int64_t i, int64_t j0, const float* __restrict acc, int64_t n) const {
    T* __restrict o = y + i * ld + j0;
    if (bias == nullptr) {
      for (int64_t j = 0; j < n; ++j) o[j] = from_float<T>(scaling * acc[j]);
      return;
    }
    const T* __restrict b = bias + j0;
    for (int64_t j = 0; j < n; ++j) o[j] = from_float<T>(to_float(b[j]) + scaling * acc[j]);
  }
};

// dx[i, j] = keep(i, j) ? keep_scale * C(i, j) : 0, the adapter's share of dX.
template <class T>
struct StoreMaskedDx {
  T* dx;
  int64_t ld;
  lora_dropout_t dropout;

  void store(int64_t i, int64_t j0, const float* __restrict acc, int64_t n) const {
    T* __restrict o = dx + i * ld + j0;
    if (dropout.threshold == 0) {
      for (int64_t j = 0; j < n; ++j) o[j] = from_float<T>(acc[j]);
      return;
    }
    const uint32_t row = static_cast<uint32_t>(i);
    const uint32_t col0 = static_cast<uint32_t>(j0);
    const float keep_scale = dropout.keep_scale;
    for (int64_t j = 0; j < n; ++j) {
      const bool keep = lora_dropout_keep(dropout.seed32, dropout.threshold, row,
                                          col0 + static_cast<uint32_t>(j)) != 0;
      o[j] = from_float<T>(keep_or_zero(keep, keep_scale * acc[j]));
    }
  }
};

template <class T>
lora_status_t fwd(int64_t M, int64_t N, int64_t K, int64_t r, const T* x, int64_t ldx,
                  const void* weight, const T* bias, const T* lora_a, const T* lora_b,
                  float scaling, lora_dropout_t dropout, T* s_out, T* y, lora_dtype_t dtype,
                  const Gemm& gemm) {
  // S is rounded to T as it is stored; the second pass reads it back, as backward will.
  const auto shrink = plan_gemm(OperandA<T>{x, ldx, 1, nullptr, dropout},
                                OperandB<T>{lora_a, 1, K}, StoreScaled<T>{s_out, r, 1.0f}, M, r, K);
  const auto expand = plan_gemm(OperandA<T>{s_out, r, 1}, OperandB<T>{lora_b, 1, r},
                                StoreBiasScaled<T>{y, N, bias, scaling}, M, N, r);
  PhasedWork work;
  bool threaded = add_phase(work, shrink);
  work.barrier();
  threaded = add_phase(work, expand) || threaded;
  return run_then_base_gemm(work, threaded, gemm, dtype, /*b_is_nk=*/true, M, N, K, x, ldx,
                            weight, K, y, N);
}

template <class T>
lora_status_t bwd(int64_t M, int64_t N, int64_t K, int64_t r, const T* dy, const T* x, int64_t ldx,
                  const void* weight, const T* lora_a, const T* lora_b, const T* s_saved,
                  float scaling, lora_dropout_t dropout, T* dx, T* d_lora_a, T* d_lora_b,
                  lora_dtype_t dtype, const Gemm& gemm) {
  const bool want_ds = dx != nullptr || d_lora_a != nullptr;
  std::unique_ptr<float[]> ds_buffer;
  if (want_ds && M * r > 0) {
    ds_buffer.reset(new (std::nothrow) float[M * r]);
    if (!ds_buffer) return LORA_ERR_UNSUPPORTED;
  }
  float* ds = ds_buffer.get();
  // dB is computed transposed, dB^T = S^T dY, so that the rank is the GEMM's row count: as its
  // column count it left half of the micro-kernel's 32 columns idle at r = 16. dS likewise
  // above kSmallM rows, dS^T = B^T dY^T, kept as it is (element (m, i) at ds[i * M + m]; its
  // readers take either layout); up to kSmallM rows dS = dY B, which reads lora_b in place
  // once, where dS^T first gathers lora_b^T's rows for each tile. C ABI, dA alone (the dS and dA
  // products), K = N = 4096, r = 16: dS^T took 1.51 / 1.24 / 1.05x dS's time at M = 1 / 4 / 16;
  // dS 1.65 / 1.50x dS^T's at M = 17 / 32, 1.15x at M = 256 (N = 1024), 1.03x there at r = 64.
  const bool ds_transposed = M > kSmallM;
  const int64_t ds_stride_m = ds_transposed ? 1 : r, ds_stride_r = ds_transposed ? M : 1;
  // A product not asked for is planned with no rows: no work items.
  const auto d_b = plan_gemm(OperandA<T>{s_saved, 1, r}, OperandB<T>{dy, N, 1},
                             StoreTransposedScaled<T>{d_lora_b, r, scaling}, d_lora_b ? r : 0, N,
                             M);
  const int64_t ds_rows = want_ds ? (ds_transposed ? r : M) : 0;
  const auto d_s = ds_transposed
                       ? plan_gemm(OperandA<T>{lora_b, 1, r}, OperandB<T>{dy, 1, N},
                                   StoreScaled<float>{ds, M, scaling}, ds_rows, M, N)
                       : plan_gemm(OperandA<T>{dy, N, 1}, OperandB<T>{lora_b, r, 1},
                                   StoreScaled<float>{ds, r, scaling}, ds_rows, r, N);
  const auto d_a = plan_gemm(OperandA<float>{ds, ds_stride_r, ds_stride_m},
                             OperandB<T>{x, ldx, 1, dropout}, StoreScaled<T>{d_lora_a, K, 1.0f},
                             d_lora_a ? r : 0, K, M);
  const auto dx_adapter = plan_gemm(OperandA<float>{ds, ds_stride_m, ds_stride_r},
                                    OperandB<T>{lora_a, K, 1}, StoreMaskedDx<T>{dx, K, dropout},
                                    dx ? M : 0, K, r);
  PhasedWork work;
  bool threaded = add_phase(work, d_b);
  threaded = add_phase(work, d_s) || threaded;
  work.barrier();  // dA and dX read dS
  threaded = add_phase(work, d_a) || threaded;
  threaded = add_phase(work, dx_adapter) || threaded;
  if (dx == nullptr) return work.run(threaded) ? LORA_OK : LORA_ERR_UNSUPPORTED;
  return run_then_base_gemm(work, threaded, gemm, dtype, /*b_is_nk=*/false, M, K, N, dy, N,
                            weight, K, dx, K);
}

// The descriptor with its seed in seed32: a seed the caller left in memory (seed_ptr, host
// memory here) is read once, before any kernel hashes with it; without dropout it is not read.
lora_dropout_t with_seed_read(lora_dropout_t d) {
  if (d.threshold != 0 && d.seed_ptr != nullptr) {
    d.seed32 = lora_seed32(static_cast<uint64_t>(*d.seed_ptr));
  }
  d.seed_ptr = nullptr;
  return d;
}

}  // namespace

lora_status_t lora_linear_fwd(lora_dtype_t dtype, int64_t M, int64_t N, int64_t K, int64_t r,
                              const void* x, int64_t ldx, const void* weight, const void* bias,
                              const void* lora_a, const void* lora_b, float scaling,
                              lora_dropout_t dropout, void* s_out, void* y, const Gemm& gemm) {
  if (!non_negative(M, N, K, r) || !row_stride_ok(ldx, M, K)) return LORA_ERR_INVALID_ARGUMENT;
  if (!present(x, M * K) || !present(weight, N * K) || !present(lora_a, r * K) ||
      !present(lora_b, N * r) || !present(s_out, M * r) || !present(y, M * N)) {
    return LORA_ERR_INVALID_ARGUMENT;
  }
  if (gemm.fn == nullptr && M * N * K > 0) return LORA_ERR_INVALID_ARGUMENT;
  dropout = with_seed_read(dropout);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return fwd<T>(M, N, K, r, static_cast<const T*>(x), ldx, weight, static_cast<const T*>(bias),
                  static_cast<const T*>(lora_a), static_cast<const T*>(lora_b), scaling, dropout,
                  static_cast<T*>(s_out), static_cast<T*>(y), dtype, gemm);
  });
}

lora_status_t lora_linear_bwd(lora_dtype_t dtype, int64_t M, int64_t N, int64_t K, int64_t r,
                              const void* dy, const void* x, int64_t ldx, const void* weight,
                              const void* lora_a, const void* lora_b, const void* s_saved,
                              float scaling, lora_dropout_t dropout, void* dx, void* d_lora_a,
                              void* d_lora_b, const Gemm& gemm) {
  if (!non_negative(M, N, K, r)) return LORA_ERR_INVALID_ARGUMENT;
  const bool want_dx = dx != nullptr, want_da = d_lora_a != nullptr;
  const bool want_db = d_lora_b != nullptr, want_ds = want_dx || want_da;
  // Inputs are needed only by the outputs asked for.
  if (!present(dy, (want_ds || want_db) ? M * N : 0) || !present(x, want_da ? M * K : 0) ||
      (want_da && !row_stride_ok(ldx, M, K)) || !present(weight, want_dx ? N * K : 0) ||
      !present(lora_a, want_dx ? r * K : 0) || !present(lora_b, want_ds ? N * r : 0) ||
      !present(s_saved, want_db ? M * r : 0)) {
    return LORA_ERR_INVALID_ARGUMENT;
  }
  if (want_dx && gemm.fn == nullptr && M * N * K > 0) return LORA_ERR_INVALID_ARGUMENT;
  dropout = with_seed_read(dropout);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return bwd<T>(M, N, K, r, static_cast<const T*>(dy), static_cast<const T*>(x), ldx, weight,
                  static_cast<const T*>(lora_a), static_cast<const T*>(lora_b),
                  static_cast<const T*>(s_saved), scaling, dropout, static_cast<T*>(dx),
                  static_cast<T*>(d_lora_a), static_cast<T*>(d_lora_b), dtype, gemm);
  });
}

}  // namespace lora_ops::cpu
