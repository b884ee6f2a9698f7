// What the torch binding files share: argument checks that name the op, dtype mapping, the
// dropout descriptor, the ATen-backed CPU GEMM and the CUDA context. Only csrc/torch_*.cpp
// include this (it pulls in ATen).
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

#include <optional>
#include <string>

#include "lora_ops/common.h"
#include "lora_ops/kernels.h"

namespace lora_ops::binding {

std::string shape_str(const at::Tensor& t);

// Throws ValueError-like c10::Error naming the op and argument.
void check_dim(const char* op, const char* arg, const at::Tensor& t, int64_t dim);
// t must have like's dtype and device ("lora_b has dtype Half but x has Float").
void check_matches(const char* op, const std::string& arg, const at::Tensor& t,
                   const at::Tensor& like, const char* like_name = "x");
void check_size(const char* op, const char* arg, const at::Tensor& t, int64_t dim, int64_t expected,
                const char* what);

// fp32/fp16/bf16 only; anything else is an error naming op and argument.
lora_dtype_t to_lora_dtype(const char* op, const char* arg, const at::Tensor& t);

// The adapter's scaling as the kernels take it, a float: finite (NaN, inf, or a double beyond
// float's range would make every output and gradient NaN or inf, and a zero-row backward's dB
// 0 * inf).
void check_scaling(const char* op, double scaling);

// Dropout descriptor for probability p in [0, 1) and the ops' seed argument (see dropout_hash.h):
// a one-element int64 tensor, on the CPU (read here, on the host) or on x's device (read by the
// kernels as they run); None only where p is 0.
lora_dropout_t make_dropout(const char* op, double p, const std::optional<at::Tensor>& seed,
                            const at::Tensor& x);

// A 2-D view of x whose last dim has unit stride (copies only when it has not).
at::Tensor rows_unit_stride(const at::Tensor& x);

// A kernel status turned into an error naming the op.
void check_status(const char* op, lora_status_t status);

// The base GEMM of the CPU kernels: per product, ATen's BLAS or lora_ops' own GEMM, whichever
// was measured faster for its dtype, layout and row count on CPUs like this one
// (cpu::builtin_gemm_preferred), or the one $LORA_OPS_CPU_GEMM names (`op` is for its error).
cpu::Gemm cpu_base_gemm(const char* op);

// What ATen's CPU matmul runs on in this process (MKL on Intel, AVX512-FP16, AMX), which moves
// the crossovers of cpu_base_gemm.
const cpu::BlasTraits& aten_blas_traits();

}  // namespace lora_ops::binding

#ifdef LORA_OPS_WITH_CUDA
namespace lora_ops::binding {
// Current stream and cuBLAS handle of the tensor's device, plus a workspace of `bytes` from the
// caching allocator; keep the returned tensor alive until the kernels are enqueued.
cuda::Context cuda_context(const at::Tensor& like, size_t bytes, at::Tensor& workspace_holder);

// Any operand on a GPU sends a call to the CUDA kernels. Where `t` (x, or y for an op writing
// into it) is not on one, the op's argument checks, run first, name the operand that is (a seed
// on the GPU, say); this is for a call that passes them, and comes before the CUDA guard, which
// would fail on t's device with an internal error.
void require_on_gpu(const char* op, const char* arg, const at::Tensor& t);
}  // namespace lora_ops::binding
#endif
