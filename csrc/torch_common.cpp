#include "torch_common.h"

#include <ATen/cpu/Utils.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <sstream>

#include "lora_ops/dropout_hash.h"

#ifdef LORA_OPS_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#endif

namespace lora_ops::binding {

std::string shape_str(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

void check_dim(const char* op, const char* arg, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK_VALUE(t.dim() == dim, op, ": ", arg, " must be ", dim, "-D, got shape ",
                    shape_str(t));
}

void check_matches(const char* op, const std::string& arg, const at::Tensor& t,
                   const at::Tensor& like, const char* like_name) {
  TORCH_CHECK_VALUE(t.scalar_type() == like.scalar_type(), op, ": ", arg, " has dtype ",
                    t.scalar_type(), " but ", like_name, " has ", like.scalar_type(),
                    "; all operands must share one dtype");
  TORCH_CHECK_VALUE(t.device() == like.device(), op, ": ", arg, " is on ", t.device(), " but ",
                    like_name, " is on ", like.device());
}

void check_size(const char* op, const char* arg, const at::Tensor& t, int64_t dim,
                int64_t expected, const char* what) {
  TORCH_CHECK_VALUE(t.size(dim) == expected, op, ": ", arg, " has size ", t.size(dim),
                    " in dim ", dim, " but ", what, " is ", expected, " (", arg, " shape ",
                    shape_str(t), ")");
}

lora_dtype_t to_lora_dtype(const char* op, const char* arg, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return LORA_DTYPE_F32;
    case at::kHalf: return LORA_DTYPE_F16;
    case at::kBFloat16: return LORA_DTYPE_BF16;
    default:
      TORCH_CHECK_VALUE(false, op, ": ", arg, " has dtype ", t.scalar_type(),
                        "; supported are float32, float16 and bfloat16");
  }
  return LORA_DTYPE_F32;
}

namespace {

// Fills d's seed from the ops' seed argument (lora_ops/dropout_seed.py has the same rule): a CPU
// tensor is read here, on the host; one on x's device is left for the kernels to read as they
// run (seed_ptr), which costs no synchronisation and follows the value under CUDA graph replay.
void set_seed(const char* op, double p, const std::optional<at::Tensor>& seed,
              const at::Tensor& x, lora_dropout_t& d) {
  d.seed32 = 0;
  d.seed_ptr = nullptr;
  if (!seed || !seed->defined()) {
    TORCH_CHECK_VALUE(p == 0.0, op, ": dropout_p is ", p, " but seed is None; dropout needs a "
                      "seed (a one-element int64 tensor)");
    return;
  }
  const at::Tensor& t = *seed;
  TORCH_CHECK_VALUE(t.device().is_cpu() || t.device() == x.device(), op, ": seed must be a CPU "
                    "tensor or on x's device (", x.device(), "), got one on ", t.device());
  TORCH_CHECK_VALUE(t.scalar_type() == at::kLong, op, ": seed must have dtype int64, got ",
                    t.scalar_type());
  TORCH_CHECK_VALUE(t.numel() == 1, op, ": seed must hold one value, got shape ", shape_str(t));
  if (t.device().is_cpu()) {
    d.seed32 = lora_seed32(static_cast<uint64_t>(*t.const_data_ptr<int64_t>()));
  } else {
    d.seed_ptr = t.const_data_ptr<int64_t>();
  }
}

}  // namespace

void check_scaling(const char* op, double scaling) {
  TORCH_CHECK_VALUE(std::isfinite(static_cast<float>(scaling)), op,
                    ": scaling must be finite in float32, got ", scaling);
}

lora_dropout_t make_dropout(const char* op, double p, const std::optional<at::Tensor>& seed,
                            const at::Tensor& x) {
  TORCH_CHECK_VALUE(p >= 0.0 && p < 1.0, op, ": dropout_p must be in [0, 1), got ", p);
  lora_dropout_t d;
  set_seed(op, p, seed, x, d);
  // Round half to even, as Python's round() in the reference does.
  d.threshold = static_cast<uint32_t>(std::nearbyint(p * 16777216.0));
  d.keep_scale = static_cast<float>(1.0 / (1.0 - p));
  return d;
}

at::Tensor rows_unit_stride(const at::Tensor& x) {
  if (x.size(1) <= 1 || x.stride(1) == 1) {
    // A row stride below the row length would make rows overlap; the kernels need ldx >= K.
    if (x.size(0) <= 1 || x.stride(0) >= x.size(1)) return x;
  }
  return x.contiguous();
}

void check_status(const char* op, lora_status_t status) {
  switch (status) {
    case LORA_OK: return;
    case LORA_ERR_INVALID_ARGUMENT:
      TORCH_CHECK_VALUE(false, op, ": the kernel rejected its arguments (invalid argument)");
    case LORA_ERR_UNSUPPORTED:
      TORCH_CHECK_NOT_IMPLEMENTED(false, op, ": this build cannot run these arguments "
                                  "(unsupported rank, dtype or slice count)");
    case LORA_ERR_CUDA:
      TORCH_CHECK(false, op, ": a CUDA launch failed");
    case LORA_ERR_CUBLAS:
      TORCH_CHECK(false, op, ": a cuBLAS call failed");
    case LORA_STATUS_RANGE_MIN_:
    case LORA_STATUS_RANGE_MAX_:
      break;
  }
  TORCH_CHECK(false, op, ": unknown kernel status ", static_cast<int>(status));
}

namespace {

at::ScalarType to_scalar_type(lora_dtype_t dtype) {
  switch (dtype) {
    case LORA_DTYPE_F16: return at::kHalf;
    case LORA_DTYPE_BF16: return at::kBFloat16;
    default: return at::kFloat;
  }
}

void aten_gemm(void*, lora_dtype_t dtype, bool b_is_nk, int64_t m, int64_t n, int64_t k,
               const void* a, int64_t lda, const void* b, int64_t ldb, float beta, void* c,
               int64_t ldc) {
  if (m == 0 || n == 0) return;
  auto opts = at::TensorOptions().dtype(to_scalar_type(dtype)).device(at::kCPU);
  at::Tensor cm = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  if (k == 0) {
    if (beta == 0.0f) cm.zero_(); else cm.mul_(beta);
    return;
  }
  at::Tensor am = at::from_blob(const_cast<void*>(a), {m, k}, {lda, 1}, opts);
  at::Tensor bm = b_is_nk ? at::from_blob(const_cast<void*>(b), {n, k}, {ldb, 1}, opts).t()
                          : at::from_blob(const_cast<void*>(b), {k, n}, {ldb, 1}, opts);
  if (beta == 0.0f) {
    at::mm_out(cm, am, bm);
  } else {
    cm.addmm_(am, bm, beta, 1.0);
  }
}

// The faster of ATen's BLAS and the built-in GEMM for this product (builtin_gemm_preferred:
// ATen's fp32 BLAS is often slower at few rows, its half-precision matmul far slower on CPUs
// without native bf16 / fp16 arithmetic, and faster on those with it, by far with AMX).
bool prefers_builtin(lora_dtype_t dtype, bool b_is_nk, int64_t m) {
  return cpu::builtin_gemm_preferred(dtype, b_is_nk, m, aten_blas_traits());
}

void base_gemm(void*, lora_dtype_t dtype, bool b_is_nk, int64_t m, int64_t n, int64_t k,
               const void* a, int64_t lda, const void* b, int64_t ldb, float beta, void* c,
               int64_t ldc) {
  const cpu::Gemm gemm = prefers_builtin(dtype, b_is_nk, m)
                             ? cpu::builtin_gemm()
                             : cpu::Gemm{&aten_gemm, nullptr, nullptr};
  gemm.fn(gemm.ctx, dtype, b_is_nk, m, n, k, a, lda, b, ldb, beta, c, ldc);
}

}  // namespace

// What ATen's matmul runs on here (read once: it cannot change within a process). oneDNN takes
// AMX tiles for bf16 where the CPU has them and the OS lets the process use them, which
// init_amx() asks for; every AMX CPU so far has AMX-BF16.
const cpu::BlasTraits& aten_blas_traits() {
  static const cpu::BlasTraits traits = [] {
    cpu::BlasTraits t;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    t.intel_cpu = __builtin_cpu_is("intel");
    t.mkl_on_intel = at::hasMKL() && t.intel_cpu;
    t.fp16_native = __builtin_cpu_supports("avx512fp16");
#endif
    t.bf16_amx = at::cpu::init_amx();
    return t;
  }();
  return traits;
}

cpu::Gemm cpu_base_gemm(const char* op) {
  // LORA_OPS_CPU_GEMM=builtin|aten forces one GEMM (for comparisons, and for CPUs whose
  // crossover was never measured); unset or "auto" takes the measured choice. Read per call,
  // like the CUDA backend's switches.
  const char* choice = std::getenv("LORA_OPS_CPU_GEMM");
  if (choice == nullptr || *choice == '\0' || std::strcmp(choice, "auto") == 0) {
    return cpu::Gemm{&base_gemm, nullptr, &prefers_builtin};
  }
  if (std::strcmp(choice, "builtin") == 0) return cpu::builtin_gemm();
  TORCH_CHECK_VALUE(std::strcmp(choice, "aten") == 0, op,
                    ": LORA_OPS_CPU_GEMM must be auto, builtin or aten, got '", choice, "'");
  return cpu::Gemm{&aten_gemm, nullptr, nullptr};
}

#ifdef LORA_OPS_WITH_CUDA
cuda::Context cuda_context(const at::Tensor& like, size_t bytes, at::Tensor& workspace_holder) {
  cuda::Context ctx;
  ctx.stream = at::cuda::getCurrentCUDAStream(like.device().index()).stream();
  ctx.cublas = at::cuda::getCurrentCUDABlasHandle();
  workspace_holder = at::empty({static_cast<int64_t>(bytes)},
                               like.options().dtype(at::kByte));
  ctx.workspace = bytes ? workspace_holder.data_ptr() : nullptr;
  ctx.workspace_bytes = bytes;
  return ctx;
}

void require_on_gpu(const char* op, const char* arg, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.is_cuda(), op, ": ", arg, " is on ", t.device(),
                    "; the CUDA kernels take it on a GPU");
}
#endif

}  // namespace lora_ops::binding
