// torch binding of the single-adapter ops: input checks, output allocation, and the calls into
// lora_ops::cpu / lora_ops::cuda. Schemas are in torch_bindings.cpp, the autograd of these ops in
// torch_lora_linear_autograd.cpp.
#include <array>
#include <optional>
#include <tuple>

#include "torch_common.h"

#ifdef LORA_OPS_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#endif

namespace lora_ops::binding {
namespace {

constexpr const char* kFwd = "lora_linear_fwd";
constexpr const char* kBwd = "lora_linear_bwd";

struct Dims {
  int64_t M, N, K, r;
};

// Shapes, dtypes and devices of the operands shared by forward and backward.
Dims check_operands(const char* op, const at::Tensor& x, const at::Tensor& weight,
                    const at::Tensor& lora_a, const at::Tensor& lora_b) {
  check_dim(op, "x", x, 2);
  check_dim(op, "weight", weight, 2);
  check_dim(op, "lora_a", lora_a, 2);
  check_dim(op, "lora_b", lora_b, 2);
  to_lora_dtype(op, "x", x);
  Dims d{x.size(0), weight.size(0), weight.size(1), lora_a.size(0)};
  TORCH_CHECK_VALUE(d.r >= 1, op, ": lora_a has rank 0 (shape ", shape_str(lora_a),
                    "); the rank must be at least 1");
  check_size(op, "x", x, 1, d.K, "weight's column count");
  check_size(op, "lora_a", lora_a, 1, d.K, "x's feature count");
  check_size(op, "lora_b", lora_b, 0, d.N, "weight's row count");
  check_size(op, "lora_b", lora_b, 1, d.r, "the rank (lora_a rows)");
  for (auto [name, t] : {std::pair{"weight", &weight}, {"lora_a", &lora_a}, {"lora_b", &lora_b}}) {
    check_matches(op, name, *t, x);
  }
  return d;
}

void check_bias(const std::optional<at::Tensor>& bias, const at::Tensor& x, int64_t N) {
  if (!bias) return;
  check_dim(kFwd, "bias", *bias, 1);
  check_size(kFwd, "bias", *bias, 0, N, "weight's row count");
  check_matches(kFwd, "bias", *bias, x);
}

struct FwdArgs {
  Dims d;
  at::Tensor x, weight, bias, lora_a, lora_b, y, s;
  lora_dropout_t dropout;
};

FwdArgs prepare_fwd(const at::Tensor& x, const at::Tensor& weight,
                    const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                    const at::Tensor& lora_b, double scaling, double dropout_p,
                    const std::optional<at::Tensor>& seed) {
  FwdArgs a;
  a.d = check_operands(kFwd, x, weight, lora_a, lora_b);
  check_scaling(kFwd, scaling);
  check_bias(bias, x, a.d.N);
  a.dropout = make_dropout(kFwd, dropout_p, seed, x);
  a.x = rows_unit_stride(x);
  a.weight = weight.contiguous();
  a.bias = bias ? bias->contiguous() : at::Tensor();
  a.lora_a = lora_a.contiguous();
  a.lora_b = lora_b.contiguous();
  a.y = at::empty({a.d.M, a.d.N}, x.options());
  a.s = at::empty({a.d.M, a.d.r}, x.options());
  return a;
}

struct BwdArgs {
  Dims d;
  at::Tensor dy, x, weight, lora_a, lora_b, s, dx, da, db;
  lora_dropout_t dropout;
};

BwdArgs prepare_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                    const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& s,
                    double scaling, double dropout_p, const std::optional<at::Tensor>& seed,
                    std::array<bool, 3> mask) {
  BwdArgs a;
  a.d = check_operands(kBwd, x, weight, lora_a, lora_b);
  check_scaling(kBwd, scaling);
  check_dim(kBwd, "dy", dy, 2);
  check_size(kBwd, "dy", dy, 0, a.d.M, "x's row count");
  check_size(kBwd, "dy", dy, 1, a.d.N, "weight's row count");
  check_dim(kBwd, "s", s, 2);
  check_size(kBwd, "s", s, 0, a.d.M, "x's row count");
  check_size(kBwd, "s", s, 1, a.d.r, "the rank");
  for (auto [name, t] : {std::pair{"dy", &dy}, {"s", &s}}) {
    check_matches(kBwd, name, *t, x);
  }
  a.dropout = make_dropout(kBwd, dropout_p, seed, x);
  a.dy = dy.contiguous();
  a.x = rows_unit_stride(x);
  a.weight = weight.contiguous();
  a.lora_a = lora_a.contiguous();
  a.lora_b = lora_b.contiguous();
  a.s = s.contiguous();
  a.dx = mask[0] ? at::empty({a.d.M, a.d.K}, x.options()) : x.new_empty({0});
  a.da = mask[1] ? at::empty({a.d.r, a.d.K}, x.options()) : x.new_empty({0});
  a.db = mask[2] ? at::empty({a.d.N, a.d.r}, x.options()) : x.new_empty({0});
  return a;
}

void* ptr_or_null(const at::Tensor& t, bool wanted) { return wanted ? t.data_ptr() : nullptr; }

std::tuple<at::Tensor, at::Tensor> fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                           const std::optional<at::Tensor>& bias,
                                           const at::Tensor& lora_a, const at::Tensor& lora_b,
                                           double scaling, double dropout_p,
                                           const std::optional<at::Tensor>& seed) {
  FwdArgs a = prepare_fwd(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed);
  check_status(kFwd, cpu::lora_linear_fwd(
      to_lora_dtype(kFwd, "x", x), a.d.M, a.d.N, a.d.K, a.d.r, a.x.data_ptr(), a.x.stride(0),
      a.weight.data_ptr(), a.bias.defined() ? a.bias.data_ptr() : nullptr, a.lora_a.data_ptr(),
      a.lora_b.data_ptr(), static_cast<float>(scaling), a.dropout, a.s.data_ptr(),
      a.y.data_ptr(), cpu_base_gemm(kFwd)));
  return {a.y, a.s};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_cpu(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& s, double scaling, double dropout_p,
    const std::optional<at::Tensor>& seed, std::array<bool, 3> mask) {
  BwdArgs a = prepare_bwd(dy, x, weight, lora_a, lora_b, s, scaling, dropout_p, seed, mask);
  check_status(kBwd, cpu::lora_linear_bwd(
      to_lora_dtype(kBwd, "x", x), a.d.M, a.d.N, a.d.K, a.d.r, a.dy.data_ptr(), a.x.data_ptr(),
      a.x.stride(0), a.weight.data_ptr(), a.lora_a.data_ptr(), a.lora_b.data_ptr(),
      a.s.data_ptr(), static_cast<float>(scaling), a.dropout, ptr_or_null(a.dx, mask[0]),
      ptr_or_null(a.da, mask[1]), ptr_or_null(a.db, mask[2]), cpu_base_gemm(kBwd)));
  return {a.dx, a.da, a.db};
}

#ifdef LORA_OPS_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                                            const std::optional<at::Tensor>& bias,
                                            const at::Tensor& lora_a, const at::Tensor& lora_b,
                                            double scaling, double dropout_p,
                                            const std::optional<at::Tensor>& seed) {
  if (!x.is_cuda()) prepare_fwd(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed);
  require_on_gpu(kFwd, "x", x);
  const c10::cuda::CUDAGuard guard(x.device());
  FwdArgs a = prepare_fwd(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed);
  const lora_dtype_t dt = to_lora_dtype(kFwd, "x", x);
  at::Tensor workspace;
  cuda::Context ctx = cuda_context(
      x, cuda::lora_linear_fwd_workspace_bytes(dt, a.d.M, a.d.N, a.d.K, a.d.r), workspace);
  check_status(kFwd, cuda::lora_linear_fwd(
      dt, a.d.M, a.d.N, a.d.K, a.d.r, a.x.data_ptr(), a.x.stride(0), a.weight.data_ptr(),
      a.bias.defined() ? a.bias.data_ptr() : nullptr, a.lora_a.data_ptr(), a.lora_b.data_ptr(),
      static_cast<float>(scaling), a.dropout, a.s.data_ptr(), a.y.data_ptr(), ctx));
  return {a.y, a.s};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_cuda(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& s, double scaling, double dropout_p,
    const std::optional<at::Tensor>& seed, std::array<bool, 3> mask) {
  if (!x.is_cuda()) prepare_bwd(dy, x, weight, lora_a, lora_b, s, scaling, dropout_p, seed, mask);
  require_on_gpu(kBwd, "x", x);
  const c10::cuda::CUDAGuard guard(x.device());
  BwdArgs a = prepare_bwd(dy, x, weight, lora_a, lora_b, s, scaling, dropout_p, seed, mask);
  const lora_dtype_t dt = to_lora_dtype(kBwd, "x", x);
  at::Tensor workspace;
  cuda::Context ctx = cuda_context(
      x, cuda::lora_linear_bwd_workspace_bytes(dt, a.d.M, a.d.N, a.d.K, a.d.r), workspace);
  check_status(kBwd, cuda::lora_linear_bwd(
      dt, a.d.M, a.d.N, a.d.K, a.d.r, a.dy.data_ptr(), a.x.data_ptr(), a.x.stride(0),
      a.weight.data_ptr(), a.lora_a.data_ptr(), a.lora_b.data_ptr(), a.s.data_ptr(),
      static_cast<float>(scaling), a.dropout, ptr_or_null(a.dx, mask[0]),
      ptr_or_null(a.da, mask[1]), ptr_or_null(a.db, mask[2]), ctx));
  return {a.dx, a.da, a.db};
}
#endif

}  // namespace

TORCH_LIBRARY_IMPL(lora_ops, CPU, m) {
  m.impl("lora_linear_fwd", &fwd_cpu);
  m.impl("lora_linear_bwd", &bwd_cpu);
}

#ifdef LORA_OPS_WITH_CUDA
TORCH_LIBRARY_IMPL(lora_ops, CUDA, m) {
  m.impl("lora_linear_fwd", &fwd_cuda);
  m.impl("lora_linear_bwd", &bwd_cuda);
}
#endif

}  // namespace lora_ops::binding
