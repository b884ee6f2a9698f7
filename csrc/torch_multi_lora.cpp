// torch binding of the multi-adapter ops: their schemas (a fragment of the lora_ops library),
// input checks, output allocation, and the calls into lora_ops::cpu / lora_ops::cuda.
//
// Index and rank *values* are not checked here: reading them would cost a device sync on a GPU.
// The kernels treat an adapter index outside [-1, L) as -1 and clamp a rank into [0, r_max];
// lora_ops/multi_lora.py rejects bad values on the host where they are free to read (CPU).
#include <algorithm>
#include <limits>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "torch_common.h"

#ifdef LORA_OPS_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#endif

TORCH_LIBRARY_FRAGMENT(lora_ops, m) {
  m.def("multi_lora_shrink(Tensor x, Tensor[] lora_a, Tensor scalings, Tensor ranks, "
        "Tensor? token_adapter=None, Tensor? seg_indptr=None, Tensor? seg_adapter=None) "
        "-> Tensor t");
  m.def("multi_lora_expand(Tensor(a!) y, Tensor t, Tensor[] lora_b, int[] slice_offsets, "
        "Tensor ranks, Tensor? token_adapter=None, Tensor? seg_indptr=None, "
        "Tensor? seg_adapter=None) -> ()");
  m.def("multi_lora_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor[] lora_a, "
        "Tensor[] lora_b, int[] slice_offsets, Tensor scalings, Tensor ranks, "
        "Tensor? token_adapter=None, Tensor? seg_indptr=None, Tensor? seg_adapter=None) "
        "-> (Tensor y, Tensor t)");
  // The input gradient of multi_lora_linear_fwd, dx = dy W + sum_s dt[s] A_s (kernels.h), for
  // its backward on CPU (on CUDA the backward keeps cuBLAS plus an expand).
  m.def("multi_lora_linear_dx(Tensor dy, Tensor weight, Tensor[] lora_a, Tensor dt, "
        "Tensor ranks, Tensor? token_adapter=None, Tensor? seg_indptr=None, "
        "Tensor? seg_adapter=None) -> Tensor dx");
  // The adapter weight gradients of multi_lora_linear_fwd, per slice and factor: [L, P, Q] in
  // `dtype` (default float32; else u's or v's), grad[a] = sum over a's rows of u_i^T v_i in
  // fp32, computed only up to ranks[a] along rank_dim (kernels.h). On CUDA it is composed of
  // ATen ops (lora_ops/multi_lora.py).
  m.def("multi_lora_adapter_grad(Tensor u, Tensor v, Tensor ranks, int rank_dim, "
        "Tensor? token_adapter=None, Tensor? seg_indptr=None, Tensor? seg_adapter=None, "
        "ScalarType? dtype=None) -> Tensor grad");
}

namespace lora_ops::binding {
namespace {

constexpr const char* kShrink = "multi_lora_shrink";
constexpr const char* kExpand = "multi_lora_expand";
constexpr const char* kLinear = "multi_lora_linear_fwd";
constexpr const char* kLinearDx = "multi_lora_linear_dx";
constexpr const char* kAdapterGrad = "multi_lora_adapter_grad";

using OptTensor = std::optional<at::Tensor>;

// `what` names the tensor the others must match ("x" or "y").
// A 1-D tensor of `length` on like's device; integer (int32/int64) or floating.
at::Tensor checked_vector(const char* op, const char* arg, const at::Tensor& t, int64_t length,
                          const at::Tensor& like, const char* what, bool integer) {
  check_dim(op, arg, t, 1);
  TORCH_CHECK_VALUE(t.size(0) == length, op, ": ", arg, " must have shape [", length,
                    "], got ", shape_str(t));
  TORCH_CHECK_VALUE(t.device() == like.device(), op, ": ", arg, " is on ", t.device(), " but ",
                    what, " is on ", like.device());
  if (integer) {
    TORCH_CHECK_VALUE(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, op, ": ",
                      arg, " must be int32 or int64, got ", t.scalar_type());
    // int64 values beyond int32 saturate rather than wrap: every rule applied to them (an
    // adapter index outside [0, L) is no adapter; a rank above r_max is refused on the CPU and
    // clamped on a GPU; a segment bound past M is refused) compares them with numbers within
    // int32, which saturation preserves.
    if (t.scalar_type() == at::kLong) {
      return t.clamp(std::numeric_limits<int32_t>::min(), std::numeric_limits<int32_t>::max())
          .to(at::kInt)
          .contiguous();
    }
    return t.contiguous();
  }
  TORCH_CHECK_VALUE(at::isFloatingType(t.scalar_type()), op, ": ", arg,
                    " must be a floating-point tensor, got ", t.scalar_type());
  return t.to(at::kFloat).contiguous();
}

// The adapter index as the kernels read it: int32, contiguous, exactly one form.
struct Index {
  at::Tensor token_adapter, seg_indptr, seg_adapter;

  lora_adapter_index_t view() const {
    lora_adapter_index_t v{nullptr, nullptr, nullptr, 0};
    if (token_adapter.defined()) {
      v.token_adapter = token_adapter.data_ptr<int32_t>();
    } else {
      v.seg_indptr = seg_indptr.data_ptr<int32_t>();
      v.seg_adapter = seg_adapter.data_ptr<int32_t>();
      v.num_segments = seg_adapter.size(0);
    }
    return v;
  }
};

Index prepare_index(const char* op, int64_t M, const at::Tensor& like, const char* what,
                    const OptTensor& token_adapter, const OptTensor& seg_indptr,
                    const OptTensor& seg_adapter) {
  const bool segments = seg_indptr.has_value() || seg_adapter.has_value();
  TORCH_CHECK_VALUE(token_adapter.has_value() != segments, op,
                    ": give exactly one index form: token_adapter, or seg_indptr with "
                    "seg_adapter");
  Index index;
  if (token_adapter) {
    index.token_adapter = checked_vector(op, "token_adapter", *token_adapter, M, like, what, true);
    return index;
  }
  TORCH_CHECK_VALUE(seg_indptr && seg_adapter, op,
                    ": the segment form needs both seg_indptr and seg_adapter");
  check_dim(op, "seg_adapter", *seg_adapter, 1);
  const int64_t num_segments = seg_adapter->size(0);
  index.seg_adapter =
      checked_vector(op, "seg_adapter", *seg_adapter, num_segments, like, what, true);
  index.seg_indptr =
      checked_vector(op, "seg_indptr", *seg_indptr, num_segments + 1, like, what, true);
  return index;
}

// Shape [L, rows, cols] of a list of adapter stacks, and their strided views.
struct Stacks {
  int64_t L = 0, rows = 0, cols = 0;
  std::vector<AdapterStack> views;
};

Stacks checked_stacks(const char* op, const char* arg, at::TensorList stacks,
                      const at::Tensor& like, const char* what) {
  const int64_t num = static_cast<int64_t>(stacks.size());
  TORCH_CHECK_VALUE(num >= 1 && num <= LORA_MAX_SLICES, op, ": ", arg, " has ", num,
                    " slices; between 1 and ", LORA_MAX_SLICES, " are supported");
  Stacks s;
  for (int64_t i = 0; i < num; ++i) {
    const at::Tensor& t = stacks[i];
    const std::string name = std::string(arg) + "[" + std::to_string(i) + "]";
    check_dim(op, name.c_str(), t, 3);
    check_matches(op, name, t, like, what);
    if (i == 0) {
      s.L = t.size(0);
      s.rows = t.size(1);
      s.cols = t.size(2);
      TORCH_CHECK_VALUE(s.L >= 1, op, ": ", arg, " holds no adapters (shape ", shape_str(t), ")");
    }
    TORCH_CHECK_VALUE(t.size(0) == s.L, op, ": ", name, " stacks ", t.size(0), " adapters but ",
                      arg, "[0] stacks ", s.L);
    s.views.push_back(AdapterStack{t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)});
  }
  return s;
}

// The slice widths, after checking the slices fit y's N columns without overlapping (and, for
// the fused layer, cover them all: kernels.h defines its N as the sum of the widths).
std::vector<int64_t> checked_slices(const char* op, at::TensorList lora_b,
                                    at::IntArrayRef slice_offsets, int64_t N, bool cover) {
  const int64_t num = static_cast<int64_t>(lora_b.size());
  TORCH_CHECK_VALUE(static_cast<int64_t>(slice_offsets.size()) == num, op, ": slice_offsets has ",
                    slice_offsets.size(), " entries but lora_b has ", num, " slices");
  std::vector<int64_t> widths(num);
  std::vector<std::pair<int64_t, int64_t>> spans(num);
  for (int64_t i = 0; i < num; ++i) {
    widths[i] = lora_b[i].size(1);
    spans[i] = {slice_offsets[i], widths[i]};
  }
  std::sort(spans.begin(), spans.end());
  bool ok = true;
  int64_t end = 0;  // where the previous slice ends
  for (const auto& [offset, width] : spans) {
    // offset <= N - width before offset + width is formed: an offset near 2**63 wrapped the end
    // negative and passed, and the kernels wrote outside y (widths and N are sizes, >= 0).
    ok = ok && offset >= end && offset <= N - width && (!cover || offset == end);
    if (!ok) break;
    end = offset + width;
  }
  ok = ok && end <= N && (!cover || end == N);
  TORCH_CHECK_VALUE(ok, op, ": slices (offsets ", slice_offsets, ", widths ",
                    at::IntArrayRef(widths), ") must ", cover ? "tile" : "lie in", " the ", N,
                    " output columns without overlapping");
  return widths;
}

// What the CPU kernels would reject, said clearly: they read these on the host anyway.
// (Adapter index values are left alone: out of range means "no adapter" on every device.)
void check_host_values(const char* op, const at::Tensor& ranks, int64_t r_max,
                       const Index& index, int64_t M) {
  const int32_t* r = ranks.data_ptr<int32_t>();
  const auto [low, high] = std::minmax_element(r, r + ranks.numel());
  TORCH_CHECK_VALUE(ranks.numel() == 0 || (*low >= 0 && *high <= r_max), op,
                    ": ranks must lie in [0, r_max=", r_max, "], got values from ",
                    ranks.numel() ? *low : 0, " to ", ranks.numel() ? *high : 0);
  if (!index.seg_indptr.defined()) return;
  const int32_t* bounds = index.seg_indptr.data_ptr<int32_t>();
  const int64_t S = index.seg_indptr.size(0) - 1;
  TORCH_CHECK_VALUE(bounds[0] == 0 && bounds[S] == M && std::is_sorted(bounds, bounds + S + 1),
                    op, ": seg_indptr must start at 0, never decrease and end at the token "
                    "count ", M);
}

void check_r_max(const char* op, const char* arg, int64_t r_max) {
  TORCH_CHECK_VALUE(r_max >= 1, op, ": ", arg, " has r_max 0; it must be at least 1");
}

struct ShrinkArgs {
  int64_t M, K, L, r_max, S;
  at::Tensor x, scalings, ranks, t;
  Stacks lora_a;
  Index index;
};

ShrinkArgs prepare_shrink(const at::Tensor& x, at::TensorList lora_a, const at::Tensor& scalings,
                          const at::Tensor& ranks, const OptTensor& token_adapter,
                          const OptTensor& seg_indptr, const OptTensor& seg_adapter) {
  ShrinkArgs a;
  check_dim(kShrink, "x", x, 2);
  to_lora_dtype(kShrink, "x", x);
  a.lora_a = checked_stacks(kShrink, "lora_a", lora_a, x, "x");
  a.M = x.size(0);
  a.K = x.size(1);
  a.L = a.lora_a.L;
  a.r_max = a.lora_a.rows;
  a.S = static_cast<int64_t>(lora_a.size());
  check_r_max(kShrink, "lora_a", a.r_max);
  for (int64_t i = 0; i < a.S; ++i) {
    check_size(kShrink, "lora_a", lora_a[i], 1, a.r_max, "lora_a[0]'s r_max");
    check_size(kShrink, "lora_a", lora_a[i], 2, a.K, "x's feature count");
  }
  a.scalings = checked_vector(kShrink, "scalings", scalings, a.L, x, "x", false);
  a.ranks = checked_vector(kShrink, "ranks", ranks, a.L, x, "x", true);
  a.index = prepare_index(kShrink, a.M, x, "x", token_adapter, seg_indptr, seg_adapter);
  a.x = rows_unit_stride(x);
  a.t = at::empty({a.S, a.M, a.r_max}, x.options().dtype(at::kFloat));
  return a;
}

struct ExpandArgs {
  int64_t M, N, L, r_max, S;
  at::Tensor t, ranks;
  Stacks lora_b;
  std::vector<int64_t> offsets, widths;
  Index index;
};

ExpandArgs prepare_expand(const at::Tensor& y, const at::Tensor& t, at::TensorList lora_b,
                          at::IntArrayRef slice_offsets, const at::Tensor& ranks,
                          const OptTensor& token_adapter, const OptTensor& seg_indptr,
                          const OptTensor& seg_adapter) {
  ExpandArgs a;
  check_dim(kExpand, "y", y, 2);
  to_lora_dtype(kExpand, "y", y);
  a.M = y.size(0);
  a.N = y.size(1);
  // y is written in place, so it cannot be copied into a friendlier layout.
  TORCH_CHECK_VALUE((a.N <= 1 || y.stride(1) == 1) && (a.M <= 1 || y.stride(0) >= a.N), kExpand,
                    ": y must have unit column stride and non-overlapping rows to be written in "
                    "place, got strides ", y.strides(), " for shape ", shape_str(y));
  a.lora_b = checked_stacks(kExpand, "lora_b", lora_b, y, "y");
  a.L = a.lora_b.L;
  a.r_max = a.lora_b.cols;
  a.S = static_cast<int64_t>(lora_b.size());
  check_r_max(kExpand, "lora_b", a.r_max);
  for (int64_t i = 0; i < a.S; ++i) {
    check_size(kExpand, "lora_b", lora_b[i], 2, a.r_max, "lora_b[0]'s r_max");
  }
  a.widths = checked_slices(kExpand, lora_b, slice_offsets, a.N, false);
  a.offsets = slice_offsets.vec();
  check_dim(kExpand, "t", t, 3);
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat, kExpand, ": t must be float32, got ",
                    t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == y.device(), kExpand, ": t is on ", t.device(),
                    " but y is on ", y.device());
  check_size(kExpand, "t", t, 0, a.S, "the slice count of lora_b");
  check_size(kExpand, "t", t, 1, a.M, "y's row count");
  check_size(kExpand, "t", t, 2, a.r_max, "lora_b's r_max");
  a.t = t.contiguous();
  a.ranks = checked_vector(kExpand, "ranks", ranks, a.L, y, "y", true);
  a.index = prepare_index(kExpand, a.M, y, "y", token_adapter, seg_indptr, seg_adapter);
  return a;
}

struct LinearArgs {
  int64_t M, N, K, L, r_max, S;
  at::Tensor x, weight, bias, scalings, ranks, y, t;
  Stacks lora_a, lora_b;
  std::vector<int64_t> offsets, widths;
  Index index;
};

LinearArgs prepare_linear(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                          at::TensorList lora_a, at::TensorList lora_b,
                          at::IntArrayRef slice_offsets, const at::Tensor& scalings,
                          const at::Tensor& ranks, const OptTensor& token_adapter,
                          const OptTensor& seg_indptr, const OptTensor& seg_adapter) {
  LinearArgs a;
  check_dim(kLinear, "x", x, 2);
  check_dim(kLinear, "weight", weight, 2);
  to_lora_dtype(kLinear, "x", x);
  check_matches(kLinear, "weight", weight, x, "x");
  a.M = x.size(0);
  a.N = weight.size(0);
  a.K = weight.size(1);
  check_size(kLinear, "x", x, 1, a.K, "weight's column count");
  if (bias) {
    check_dim(kLinear, "bias", *bias, 1);
    check_size(kLinear, "bias", *bias, 0, a.N, "weight's row count");
    check_matches(kLinear, "bias", *bias, x, "x");
  }
  a.lora_a = checked_stacks(kLinear, "lora_a", lora_a, x, "x");
  a.lora_b = checked_stacks(kLinear, "lora_b", lora_b, x, "x");
  a.L = a.lora_a.L;
  a.r_max = a.lora_a.rows;
  a.S = static_cast<int64_t>(lora_a.size());
  check_r_max(kLinear, "lora_a", a.r_max);
  TORCH_CHECK_VALUE(static_cast<int64_t>(lora_b.size()) == a.S, kLinear, ": lora_a has ", a.S,
                    " slices but lora_b has ", lora_b.size());
  for (int64_t i = 0; i < a.S; ++i) {
    check_size(kLinear, "lora_a", lora_a[i], 1, a.r_max, "lora_a[0]'s r_max");
    check_size(kLinear, "lora_a", lora_a[i], 2, a.K, "x's feature count");
    check_size(kLinear, "lora_b", lora_b[i], 0, a.L, "the adapter count of lora_a");
    check_size(kLinear, "lora_b", lora_b[i], 2, a.r_max, "lora_a's r_max");
  }
  a.widths = checked_slices(kLinear, lora_b, slice_offsets, a.N, true);
  a.offsets = slice_offsets.vec();
  a.scalings = checked_vector(kLinear, "scalings", scalings, a.L, x, "x", false);
  a.ranks = checked_vector(kLinear, "ranks", ranks, a.L, x, "x", true);
  a.index = prepare_index(kLinear, a.M, x, "x", token_adapter, seg_indptr, seg_adapter);
  a.x = rows_unit_stride(x);
  a.weight = weight.contiguous();
  a.bias = bias ? bias->contiguous() : at::Tensor();
  a.y = at::empty({a.M, a.N}, x.options());
  a.t = at::empty({a.S, a.M, a.r_max}, x.options().dtype(at::kFloat));
  return a;
}

const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

at::Tensor shrink_cpu(const at::Tensor& x, at::TensorList lora_a, const at::Tensor& scalings,
                      const at::Tensor& ranks, const OptTensor& token_adapter,
                      const OptTensor& seg_indptr, const OptTensor& seg_adapter) {
  ShrinkArgs a = prepare_shrink(x, lora_a, scalings, ranks, token_adapter, seg_indptr,
                                seg_adapter);
  check_host_values(kShrink, a.ranks, a.r_max, a.index, a.M);
  if (a.M == 0) return a.t;
  check_status(kShrink, cpu::multi_lora_shrink(
      to_lora_dtype(kShrink, "x", x), a.M, a.K, a.L, a.r_max, a.S, a.x.data_ptr(),
      a.x.stride(0), a.lora_a.views.data(), a.scalings.data_ptr<float>(),
      a.ranks.data_ptr<int32_t>(), a.index.view(), a.t.data_ptr<float>()));
  return a.t;
}

void expand_cpu(const at::Tensor& y, const at::Tensor& t, at::TensorList lora_b,
                at::IntArrayRef slice_offsets, const at::Tensor& ranks,
                const OptTensor& token_adapter, const OptTensor& seg_indptr,
                const OptTensor& seg_adapter) {
  ExpandArgs a = prepare_expand(y, t, lora_b, slice_offsets, ranks, token_adapter, seg_indptr,
                                seg_adapter);
  check_host_values(kExpand, a.ranks, a.r_max, a.index, a.M);
  if (a.M == 0) return;
  check_status(kExpand, cpu::multi_lora_expand(
      to_lora_dtype(kExpand, "y", y), a.M, a.L, a.r_max, a.S, a.t.data_ptr<float>(),
      a.lora_b.views.data(), a.offsets.data(), a.widths.data(), a.ranks.data_ptr<int32_t>(),
      a.index.view(), y.data_ptr(), y.stride(0)));
}

std::tuple<at::Tensor, at::Tensor> linear_fwd_cpu(
    const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias, at::TensorList lora_a,
    at::TensorList lora_b, at::IntArrayRef slice_offsets, const at::Tensor& scalings,
    const at::Tensor& ranks, const OptTensor& token_adapter, const OptTensor& seg_indptr,
    const OptTensor& seg_adapter) {
  LinearArgs a = prepare_linear(x, weight, bias, lora_a, lora_b, slice_offsets, scalings, ranks,
                                token_adapter, seg_indptr, seg_adapter);
  check_host_values(kLinear, a.ranks, a.r_max, a.index, a.M);
  if (a.M == 0) return {a.y, a.t};
  check_status(kLinear, cpu::multi_lora_linear_fwd(
      to_lora_dtype(kLinear, "x", x), a.M, a.N, a.K, a.L, a.r_max, a.S, a.x.data_ptr(),
      a.x.stride(0), a.weight.data_ptr(), ptr_or_null(a.bias), a.lora_a.views.data(),
      a.lora_b.views.data(), a.offsets.data(), a.widths.data(), a.scalings.data_ptr<float>(),
      a.ranks.data_ptr<int32_t>(), a.index.view(), a.t.data_ptr<float>(), a.y.data_ptr(),
      cpu_base_gemm(kLinear)));
  return {a.y, a.t};
}

at::Tensor linear_dx_cpu(const at::Tensor& dy, const at::Tensor& weight, at::TensorList lora_a,
                         const at::Tensor& dt, const at::Tensor& ranks,
                         const OptTensor& token_adapter, const OptTensor& seg_indptr,
                         const OptTensor& seg_adapter) {
  check_dim(kLinearDx, "dy", dy, 2);
  check_dim(kLinearDx, "weight", weight, 2);
  const lora_dtype_t dtype = to_lora_dtype(kLinearDx, "dy", dy);
  check_matches(kLinearDx, "weight", weight, dy, "dy");
  const int64_t M = dy.size(0), N = weight.size(0), K = weight.size(1);
  check_size(kLinearDx, "dy", dy, 1, N, "weight's row count");
  const Stacks a = checked_stacks(kLinearDx, "lora_a", lora_a, dy, "dy");
  const int64_t S = static_cast<int64_t>(lora_a.size());
  check_r_max(kLinearDx, "lora_a", a.rows);
  for (int64_t i = 0; i < S; ++i) {
    check_size(kLinearDx, "lora_a", lora_a[i], 1, a.rows, "lora_a[0]'s r_max");
    check_size(kLinearDx, "lora_a", lora_a[i], 2, K, "weight's column count");
  }
  check_dim(kLinearDx, "dt", dt, 3);
  TORCH_CHECK_VALUE(dt.scalar_type() == at::kFloat, kLinearDx, ": dt must be float32, got ",
                    dt.scalar_type());
  TORCH_CHECK_VALUE(dt.device() == dy.device(), kLinearDx, ": dt is on ", dt.device(),
                    " but dy is on ", dy.device());
  check_size(kLinearDx, "dt", dt, 0, S, "the slice count of lora_a");
  check_size(kLinearDx, "dt", dt, 1, M, "dy's row count");
  check_size(kLinearDx, "dt", dt, 2, a.rows, "lora_a's r_max");
  const at::Tensor ranks32 = checked_vector(kLinearDx, "ranks", ranks, a.L, dy, "dy", true);
  const Index index =
      prepare_index(kLinearDx, M, dy, "dy", token_adapter, seg_indptr, seg_adapter);
  check_host_values(kLinearDx, ranks32, a.rows, index, M);
  at::Tensor dx = at::empty({M, K}, dy.options());
  if (M == 0) return dx;
  const at::Tensor dy_c = dy.contiguous(), weight_c = weight.contiguous(), dt_c = dt.contiguous();
  check_status(kLinearDx, cpu::multi_lora_linear_dx(
      dtype, M, N, K, a.L, a.rows, S, dy_c.data_ptr(), weight_c.data_ptr(), a.views.data(),
      dt_c.data_ptr<float>(), ranks32.data_ptr<int32_t>(), index.view(), dx.data_ptr(),
      cpu_base_gemm(kLinearDx)));
  return dx;
}

at::Tensor adapter_grad_cpu(const at::Tensor& u, const at::Tensor& v, const at::Tensor& ranks,
                            int64_t rank_dim, const OptTensor& token_adapter,
                            const OptTensor& seg_indptr, const OptTensor& seg_adapter,
                            std::optional<at::ScalarType> dtype) {
  check_dim(kAdapterGrad, "u", u, 2);
  check_dim(kAdapterGrad, "v", v, 2);
  const lora_dtype_t u_dtype = to_lora_dtype(kAdapterGrad, "u", u);
  const lora_dtype_t v_dtype = to_lora_dtype(kAdapterGrad, "v", v);
  TORCH_CHECK_VALUE(u.scalar_type() == at::kFloat || v.scalar_type() == at::kFloat,
                    kAdapterGrad, ": one of u and v must be float32, got u ", u.scalar_type(),
                    " and v ", v.scalar_type());
  TORCH_CHECK_VALUE(v.device() == u.device(), kAdapterGrad, ": v is on ", v.device(),
                    " but u is on ", u.device());
  const int64_t M = u.size(0), P = u.size(1), Q = v.size(1);
  check_size(kAdapterGrad, "v", v, 0, M, "u's row count");
  TORCH_CHECK_VALUE(rank_dim == 1 || rank_dim == 2, kAdapterGrad,
                    ": rank_dim must be 1 (the rows of each gradient) or 2 (its columns), got ",
                    rank_dim);
  check_dim(kAdapterGrad, "ranks", ranks, 1);
  const int64_t L = ranks.size(0);
  const at::Tensor ranks32 = checked_vector(kAdapterGrad, "ranks", ranks, L, u, "u", true);
  const Index index = prepare_index(kAdapterGrad, M, u, "u", token_adapter, seg_indptr,
                                    seg_adapter);
  check_host_values(kAdapterGrad, ranks32, rank_dim == 1 ? P : Q, index, M);
  const at::ScalarType out_type = dtype.value_or(at::kFloat);
  TORCH_CHECK_VALUE(out_type == at::kFloat || out_type == u.scalar_type() ||
                        out_type == v.scalar_type(),
                    kAdapterGrad, ": dtype must be float32 or the dtype of u or v, got ", out_type);
  const at::Tensor u2 = rows_unit_stride(u), v2 = rows_unit_stride(v);
  at::Tensor grad = at::empty({L, P, Q}, u.options().dtype(out_type));
  check_status(kAdapterGrad, cpu::multi_lora_adapter_grad(
      u_dtype, v_dtype, M, P, Q, L, u2.data_ptr(), u2.stride(0), v2.data_ptr(), v2.stride(0),
      ranks32.data_ptr<int32_t>(), static_cast<int>(rank_dim), index.view(),
      to_lora_dtype(kAdapterGrad, "dtype", grad), grad.data_ptr()));
  return grad;
}

#ifdef LORA_OPS_WITH_CUDA
at::Tensor shrink_cuda(const at::Tensor& x, at::TensorList lora_a, const at::Tensor& scalings,
                       const at::Tensor& ranks, const OptTensor& token_adapter,
                       const OptTensor& seg_indptr, const OptTensor& seg_adapter) {
  if (!x.is_cuda()) {
    prepare_shrink(x, lora_a, scalings, ranks, token_adapter, seg_indptr, seg_adapter);
  }
  require_on_gpu(kShrink, "x", x);
  const c10::cuda::CUDAGuard guard(x.device());
  ShrinkArgs a = prepare_shrink(x, lora_a, scalings, ranks, token_adapter, seg_indptr,
                                seg_adapter);
  if (a.M == 0) return a.t;
  at::Tensor workspace;
  const cuda::Context ctx = cuda_context(x, 0, workspace);
  check_status(kShrink, cuda::multi_lora_shrink(
      to_lora_dtype(kShrink, "x", x), a.M, a.K, a.L, a.r_max, a.S, a.x.data_ptr(),
      a.x.stride(0), a.lora_a.views.data(), a.scalings.data_ptr<float>(),
      a.ranks.data_ptr<int32_t>(), a.index.view(), a.t.data_ptr<float>(), ctx));
  return a.t;
}

void expand_cuda(const at::Tensor& y, const at::Tensor& t, at::TensorList lora_b,
                 at::IntArrayRef slice_offsets, const at::Tensor& ranks,
                 const OptTensor& token_adapter, const OptTensor& seg_indptr,
                 const OptTensor& seg_adapter) {
  if (!y.is_cuda()) {
    prepare_expand(y, t, lora_b, slice_offsets, ranks, token_adapter, seg_indptr, seg_adapter);
  }
  require_on_gpu(kExpand, "y", y);
  const c10::cuda::CUDAGuard guard(y.device());
  ExpandArgs a = prepare_expand(y, t, lora_b, slice_offsets, ranks, token_adapter, seg_indptr,
                                seg_adapter);
  if (a.M == 0) return;
  at::Tensor workspace;
  const cuda::Context ctx = cuda_context(y, 0, workspace);
  check_status(kExpand, cuda::multi_lora_expand(
      to_lora_dtype(kExpand, "y", y), a.M, a.L, a.r_max, a.S, a.t.data_ptr<float>(),
      a.lora_b.views.data(), a.offsets.data(), a.widths.data(), a.ranks.data_ptr<int32_t>(),
      a.index.view(), y.data_ptr(), y.stride(0), ctx));
}

std::tuple<at::Tensor, at::Tensor> linear_fwd_cuda(
    const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias, at::TensorList lora_a,
    at::TensorList lora_b, at::IntArrayRef slice_offsets, const at::Tensor& scalings,
    const at::Tensor& ranks, const OptTensor& token_adapter, const OptTensor& seg_indptr,
    const OptTensor& seg_adapter) {
  if (!x.is_cuda()) {
    prepare_linear(x, weight, bias, lora_a, lora_b, slice_offsets, scalings, ranks,
                   token_adapter, seg_indptr, seg_adapter);
  }
  require_on_gpu(kLinear, "x", x);
  const c10::cuda::CUDAGuard guard(x.device());
  LinearArgs a = prepare_linear(x, weight, bias, lora_a, lora_b, slice_offsets, scalings, ranks,
                                token_adapter, seg_indptr, seg_adapter);
  if (a.M == 0) return {a.y, a.t};
  const lora_dtype_t dt = to_lora_dtype(kLinear, "x", x);
  at::Tensor workspace;
  const cuda::Context ctx = cuda_context(
      x, cuda::multi_lora_linear_fwd_workspace_bytes(dt, a.M, a.N, a.K, a.r_max, a.S), workspace);
  check_status(kLinear, cuda::multi_lora_linear_fwd(
      dt, a.M, a.N, a.K, a.L, a.r_max, a.S, a.x.data_ptr(), a.x.stride(0), a.weight.data_ptr(),
      ptr_or_null(a.bias), a.lora_a.views.data(), a.lora_b.views.data(), a.offsets.data(),
      a.widths.data(), a.scalings.data_ptr<float>(), a.ranks.data_ptr<int32_t>(),
      a.index.view(), a.t.data_ptr<float>(), a.y.data_ptr(), ctx));
  return {a.y, a.t};
}
#endif

}  // namespace

TORCH_LIBRARY_IMPL(lora_ops, CPU, m) {
  m.impl("multi_lora_shrink", &shrink_cpu);
  m.impl("multi_lora_expand", &expand_cpu);
  m.impl("multi_lora_linear_fwd", &linear_fwd_cpu);
  m.impl("multi_lora_linear_dx", &linear_dx_cpu);
  m.impl("multi_lora_adapter_grad", &adapter_grad_cpu);
}

#ifdef LORA_OPS_WITH_CUDA
TORCH_LIBRARY_IMPL(lora_ops, CUDA, m) {
  m.impl("multi_lora_shrink", &shrink_cuda);
  m.impl("multi_lora_expand", &expand_cuda);
  m.impl("multi_lora_linear_fwd", &linear_fwd_cuda);
}
#endif

}  // namespace lora_ops::binding
