// Autograd of lora_ops::multi_lora_linear_fwd for CPU tensors, in C++: through
// torch.library.register_autograd a decode-sized call whose stacks require grad cost ~110 µs more
// than the kernel (Python setup_context and backward, pytree over the stack lists), more than
// the kernel itself at small widths. Registered for AutogradCPU only: on CUDA (and for the
// Triton twin) lora_ops/multi_lora.py keeps the same formula in Python, where one gram plan is
// shared by every slice's weight gradients (fewer launches than an op per slice).
//
// Backward: dT_s = s dY_s B_s (a shrink over B_s viewed transposed), dx = dY W + sum_s dT_s A_s
// (multi_lora_linear_dx), dA_s = dT_s^T x and dB_s = dY_s^T T_s per adapter
// (multi_lora_adapter_grad, in the stacks' dtype).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

namespace lora_ops::binding {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

using FwdSig = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const OptTensor&, at::TensorList, at::TensorList,
    at::IntArrayRef, const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
    const OptTensor&);
using ShrinkSig = at::Tensor(const at::Tensor&, at::TensorList, const at::Tensor&,
                             const at::Tensor&, const OptTensor&, const OptTensor&,
                             const OptTensor&);
using DxSig = at::Tensor(const at::Tensor&, const at::Tensor&, at::TensorList, const at::Tensor&,
                         const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&);
using GradSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                           const OptTensor&, const OptTensor&, const OptTensor&,
                           std::optional<at::ScalarType>);

template <class Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// The ops the autograd kernel calls, looked up once (a schema lookup is a hash-map search under
// a lock).
struct Ops {
  c10::TypedOperatorHandle<FwdSig> fwd = find_op<FwdSig>("lora_ops::multi_lora_linear_fwd");
  c10::TypedOperatorHandle<ShrinkSig> shrink = find_op<ShrinkSig>("lora_ops::multi_lora_shrink");
  c10::TypedOperatorHandle<DxSig> dx = find_op<DxSig>("lora_ops::multi_lora_linear_dx");
  c10::TypedOperatorHandle<GradSig> grad = find_op<GradSig>("lora_ops::multi_lora_adapter_grad");
};

const Ops& ops() {
  static const Ops handles;
  return handles;
}

OptTensor saved_optional(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// Whether any of the tensors requires grad (an absent optional one does not).
bool any_requires_grad(const at::Tensor& first, const at::Tensor& second, const OptTensor& third,
                       at::TensorList more, at::TensorList rest) {
  if (first.requires_grad() || second.requires_grad() || (third && third->requires_grad())) {
    return true;
  }
  for (const at::TensorList list : {more, rest}) {
    for (const at::Tensor& t : list) {
      if (t.requires_grad()) return true;
    }
  }
  return false;
}

struct MultiLoraLinearFunction : public torch::autograd::Function<MultiLoraLinearFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const OptTensor& bias, at::TensorList lora_a, at::TensorList lora_b,
                               at::IntArrayRef slice_offsets, const at::Tensor& scalings,
                               const at::Tensor& ranks, const OptTensor& token_adapter,
                               const OptTensor& seg_indptr, const OptTensor& seg_adapter) {
    at::AutoDispatchBelowADInplaceOrView guard;  // or the call would come back here
    auto [y, t] = ops().fwd.call(x, weight, bias, lora_a, lora_b, slice_offsets, scalings, ranks,
                                token_adapter, seg_indptr, seg_adapter);
    // Beyond x (alive anyway) and the parameters, the only activation kept is t [S, M, r_max].
    variable_list saved = {x, weight, scalings, ranks, t,
                           token_adapter.value_or(at::Tensor()), seg_indptr.value_or(at::Tensor()),
                           seg_adapter.value_or(at::Tensor())};
    saved.insert(saved.end(), lora_a.begin(), lora_a.end());
    saved.insert(saved.end(), lora_b.begin(), lora_b.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["slice_offsets"] = slice_offsets.vec();
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->mark_non_differentiable({t});
    return {y, t};
  }

  // One gradient per forward argument, a list counting one per tensor: x, weight, bias,
  // lora_a[0..S), lora_b[0..S), slice_offsets, scalings, ranks and the three index tensors.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor dy = grads[0].contiguous();
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &scalings = saved[2], &ranks = saved[3],
                     &t = saved[4];
    const OptTensor token_adapter = saved_optional(saved[5]), seg_indptr = saved_optional(saved[6]),
                    seg_adapter = saved_optional(saved[7]);
    const std::vector<int64_t> offsets = ctx->saved_data["slice_offsets"].toIntVector();
    const size_t S = offsets.size();
    const std::vector<at::Tensor> lora_a(saved.begin() + 8, saved.begin() + 8 + S);
    const std::vector<at::Tensor> lora_b(saved.begin() + 8 + S, saved.begin() + 8 + 2 * S);
    // The ops below have no derivatives of their own: with create_graph=True the gradients
    // would silently lack their second-order terms, so refuse (as lora_linear does).
    TORCH_CHECK(!at::GradMode::is_enabled() ||
                    !any_requires_grad(dy, x, weight, lora_a, lora_b),
                "multi_lora_linear: double backward is not supported (backward or autograd.grad "
                "with create_graph=True through it); call it without create_graph");

    // needs_input_grad counts tensor inputs only: an absent bias shifts the stacks down.
    size_t edge = 0;
    const bool need_x = ctx->needs_input_grad(edge++);
    const bool need_w = ctx->needs_input_grad(edge++);
    const bool need_bias = ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(edge++);
    std::vector<bool> need_a(S), need_b(S);
    bool any_a = false;
    for (size_t s = 0; s < S; ++s) any_a |= need_a[s] = ctx->needs_input_grad(edge++);
    for (size_t s = 0; s < S; ++s) need_b[s] = ctx->needs_input_grad(edge++);

    std::vector<at::Tensor> dy_slices(S);
    for (size_t s = 0; s < S; ++s) dy_slices[s] = dy.narrow(1, offsets[s], lora_b[s].size(1));
    std::vector<at::Tensor> dts(S);
    if (need_x || any_a) {  // dT_s = scalings * dY_s B_s: a shrink over B_s as [L, r_max, N_s]
      for (size_t s = 0; s < S; ++s) {
        dts[s] = ops().shrink.call(dy_slices[s], {lora_b[s].transpose(1, 2)}, scalings, ranks,
                                  token_adapter, seg_indptr, seg_adapter)[0];
      }
    }
    const at::Tensor dx = need_x ? ops().dx.call(dy, weight, lora_a, at::stack(dts), ranks,
                                                token_adapter, seg_indptr, seg_adapter)
                                 : at::Tensor();
    const auto adapter_grad = [&](const at::Tensor& u, const at::Tensor& v, int64_t rank_dim) {
      return ops().grad.call(u, v, ranks, rank_dim, token_adapter, seg_indptr, seg_adapter,
                            x.scalar_type());
    };
    variable_list out = {dx};
    // The base is meant to be frozen; if it is trainable anyway its gradients are the plain
    // linear ones (the adapter term depends on neither W nor b).
    out.push_back(need_w ? dy.t().mm(x).to(weight.scalar_type()) : at::Tensor());
    out.push_back(need_bias ? dy.sum(0) : at::Tensor());
    for (size_t s = 0; s < S; ++s) out.push_back(need_a[s] ? adapter_grad(dts[s], x, 1) : at::Tensor());
    for (size_t s = 0; s < S; ++s) {
      out.push_back(need_b[s] ? adapter_grad(dy_slices[s], t[s], 2) : at::Tensor());
    }
    out.resize(out.size() + 6);  // slice_offsets, scalings, ranks, the index: no gradient
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> fwd_autograd(
    const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias, at::TensorList lora_a,
    at::TensorList lora_b, at::IntArrayRef slice_offsets, const at::Tensor& scalings,
    const at::Tensor& ranks, const OptTensor& token_adapter, const OptTensor& seg_indptr,
    const OptTensor& seg_adapter) {
  if (!at::GradMode::is_enabled() || !any_requires_grad(x, weight, bias, lora_a, lora_b)) {
    at::AutoDispatchBelowADInplaceOrView guard;  // nothing to record
    return ops().fwd.call(x, weight, bias, lora_a, lora_b, slice_offsets, scalings, ranks,
                         token_adapter, seg_indptr, seg_adapter);
  }
  variable_list out = MultiLoraLinearFunction::apply(x, weight, bias, lora_a, lora_b,
                                                     slice_offsets, scalings, ranks,
                                                     token_adapter, seg_indptr, seg_adapter);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ops, AutogradCPU, m) {
  m.impl("multi_lora_linear_fwd", &fwd_autograd);
}

}  // namespace lora_ops::binding
