// Autograd of lora_ops::lora_linear_fwd, registered in C++ so that a call does not pay for a trip
// through Python: with torch.library.register_autograd a call whose inputs require grad cost
// ~55 µs more than the kernel alone (~15 µs with none requiring grad), more than a decode-sized
// layer's whole kernel time; here it is ~10 µs (and ~0). See benchmarks/bench_op_overhead.py.
// (The Triton twin keeps its Python autograd in lora_ops/lora_linear.py; the fake impls of both
// ops stay in Python too, where torch.compile looks for them.)
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

namespace lora_ops::binding {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The seed is a tensor (see torch_bindings.cpp): while torch.compile traces the training graph,
// this file's kernels run on fake tensors, the seed among them, which they only pass on.
using Seed = std::optional<at::Tensor>;
using FwdSig = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
    const at::Tensor&, double, double, const Seed&);
using BwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, double, double, const Seed&, std::array<bool, 3>);

// Looked up once: the schema lookup is a hash-map search under a lock.
const c10::TypedOperatorHandle<FwdSig>& fwd_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lora_ops::lora_linear_fwd", "")
                             .typed<FwdSig>();
  return op;
}

const c10::TypedOperatorHandle<BwdSig>& bwd_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lora_ops::lora_linear_bwd", "")
                             .typed<BwdSig>();
  return op;
}

// Autograd node of one lora_linear_fwd call. Only y is differentiable; S = drop(x) A^T is
// returned so that backward need not recompute it.
struct LoraLinearFunction : public torch::autograd::Function<LoraLinearFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x,
                               const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               const at::Tensor& lora_a, const at::Tensor& lora_b, double scaling,
                               double dropout_p, const Seed& seed) {
    // Below autograd, or the call would come back to this file's Autograd kernel.
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, s] = fwd_op().call(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed);
    // x is alive anyway (the caller holds it) and weight is a frozen parameter: the only
    // activation memory this op adds is S [M, r]; the dropout mask is re-drawn from the seed.
    // The seed is saved as a variable, not read here: it may be a fake tensor (torch.compile),
    // and a caller that changed it in place before backward gets autograd's version error
    // rather than gradients of a mask the forward did not use.
    ctx->save_for_backward({x, weight, lora_a, lora_b, s, seed.value_or(at::Tensor())});
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["dropout_p"] = dropout_p;
    // needs_input_grad counts tensor inputs only: an absent bias shifts lora_a and lora_b down.
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->mark_non_differentiable({s});
    return {y, s};
  }

  // One gradient per forward argument: x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& dy = grads[0];  // may be non-contiguous: lora_linear_bwd copies it if so
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &lora_a = saved[2], &lora_b = saved[3],
                     &s = saved[4];
    const Seed seed = saved[5].defined() ? Seed(saved[5]) : std::nullopt;
    size_t edge = 0;
    const bool need_x = ctx->needs_input_grad(edge++);
    const bool need_w = ctx->needs_input_grad(edge++);
    const bool need_bias = ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(edge++);
    const bool need_a = ctx->needs_input_grad(edge++);
    const bool need_b = ctx->needs_input_grad(edge++);

    at::Tensor dx, da, db;
    if (need_x || need_a || need_b) {
      // Through the dispatcher, not below autograd: under create_graph=True its Autograd kernel
      // (below) refuses, rather than hand back gradients that silently lack second derivatives.
      std::tie(dx, da, db) = bwd_op().call(
          dy, x, weight, lora_a, lora_b, s, ctx->saved_data["scaling"].toDouble(),
          ctx->saved_data["dropout_p"].toDouble(), seed,
          {need_x, need_a, need_b});
    }
    // The base weight is meant to be frozen; if it is trainable anyway its gradient is the plain
    // dY^T x (the adapter term does not depend on W).
    const at::Tensor dw = need_w ? dy.t().mm(x).to(weight.scalar_type()) : at::Tensor();
    const at::Tensor dbias = need_bias ? dy.sum(0) : at::Tensor();
    return {need_x ? dx : at::Tensor(), dw, dbias, need_a ? da : at::Tensor(),
            need_b ? db : at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

bool any_requires_grad(std::initializer_list<const at::Tensor*> tensors) {
  for (const at::Tensor* t : tensors) {
    if (t->defined() && t->requires_grad()) return true;
  }
  return false;
}

std::tuple<at::Tensor, at::Tensor> fwd_autograd(const at::Tensor& x, const at::Tensor& weight,
                                                const std::optional<at::Tensor>& bias,
                                                const at::Tensor& lora_a, const at::Tensor& lora_b,
                                                double scaling, double dropout_p,
                                                const Seed& seed) {
  const at::Tensor no_bias;
  if (!at::GradMode::is_enabled() ||
      !any_requires_grad({&x, &weight, bias ? &*bias : &no_bias, &lora_a, &lora_b})) {
    // Nothing to record (as torch.library's Python autograd does): skip building a graph node.
    at::AutoDispatchBelowADInplaceOrView guard;
    return fwd_op().call(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed);
  }
  variable_list out =
      LoraLinearFunction::apply(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed);
  return {out[0], out[1]};
}

// lora_linear_bwd has no derivative of its own. With grad mode on and an input that requires
// grad (backward with create_graph=True, or a direct call under autograd) its outputs would carry
// no gradient, and a second backward would silently miss terms: refuse instead.
std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_autograd(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& s, double scaling, double dropout_p,
    const Seed& seed, std::array<bool, 3> output_mask) {
  TORCH_CHECK(!at::GradMode::is_enabled() ||
                  !any_requires_grad({&dy, &x, &weight, &lora_a, &lora_b, &s}),
              "lora_linear_bwd: double backward is not supported (backward or autograd.grad "
              "with create_graph=True through lora_linear, or a call of lora_linear_bwd on "
              "tensors that require grad with grad mode on); call it without create_graph, "
              "or under torch.no_grad()");
  at::AutoDispatchBelowADInplaceOrView guard;
  return bwd_op().call(dy, x, weight, lora_a, lora_b, s, scaling, dropout_p, seed, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ops, Autograd, m) {
  m.impl("lora_linear_fwd", &fwd_autograd);
  m.impl("lora_linear_bwd", &bwd_autograd);
}

}  // namespace lora_ops::binding
