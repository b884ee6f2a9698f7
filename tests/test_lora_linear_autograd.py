"""The C++ autograd of lora_ops::lora_linear_fwd (csrc/torch_lora_linear_autograd.cpp), called
directly through torch.ops: gradients against the reference backend for every subset of inputs
that require grad, the non-differentiable S output, grad-free calls, and the refusal of double
backward."""
import pytest
import torch

from lora_ops import _backend, reference

pytestmark = pytest.mark.skipif(not _backend.compiled(), reason="compiled library not built")

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not (_backend.compiled_with_cuda() and torch.cuda.is_available()), reason="no CUDA build or GPU")])]
SCALING = 0.75
# Which of x, weight, bias, lora_a, lora_b require grad: the usual frozen base, each one alone
# (a trainable weight or bias included), all of them.
GRAD_SETS = [("x", "lora_a", "lora_b"), ("lora_a", "lora_b"), ("x",), ("weight",), ("bias",),
             ("lora_b",), ("x", "weight", "bias", "lora_a", "lora_b")]


def operands(device, bias=True, M=6, K=20, N=12, r=4):
    t = lambda *s: torch.randn(*s, device=device)
    return dict(x=t(M, K), weight=t(N, K) * K ** -0.5, bias=t(N) if bias else None,
                lora_a=t(r, K) * K ** -0.5, lora_b=t(N, r))


def call(fwd, ops, dropout_p=0.0, seed=0):
    """fwd called as the op is: the seed as its tensor, None without dropout."""
    return fwd(ops["x"], ops["weight"], ops["bias"], ops["lora_a"], ops["lora_b"], SCALING,
               dropout_p, torch.tensor(seed) if dropout_p else None)


def grads(fwd, ops, wanted, dy, dropout_p):
    """(y, {name: grad}) with `wanted` requiring grad and the rest frozen."""
    ops = {k: None if v is None else v.detach().clone().requires_grad_(k in wanted)
           for k, v in ops.items()}
    y, _ = call(fwd, ops, dropout_p, seed=11)
    leaves = [k for k in wanted if ops[k] is not None]
    assert y.requires_grad == bool(leaves)  # "bias" alone, without a bias: nothing to track
    got = torch.autograd.grad(y, [ops[k] for k in leaves], dy) if leaves else ()
    return y.detach(), dict(zip(leaves, got)), ops


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("wanted", GRAD_SETS, ids="+".join)
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_direct_op_call_grads_match_reference(device, has_bias, wanted, dropout_p):
    # An absent bias shifts the autograd edges of lora_a and lora_b: both layouts are covered.
    ops = operands(device, bias=has_bias)
    # Non-contiguous upstream gradient: the transpose of a contiguous [N, M] tensor.
    dy = torch.randn(ops["weight"].shape[0], ops["x"].shape[0], device=device).t()
    y, got, _ = grads(torch.ops.lora_ops.lora_linear_fwd, ops, wanted, dy, dropout_p)
    f64 = {k: None if v is None else v.double() for k, v in ops.items()}
    y_ref, want, _ = grads(reference.lora_linear_fwd, f64, wanted, dy.double(), dropout_p)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)
    assert set(got) == set(want) == {k for k in wanted if ops[k] is not None}
    for name in got:
        torch.testing.assert_close(got[name].double(), want[name], rtol=1e-4, atol=1e-4,
                                   msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("device", DEVICES)
def test_graph_node_is_the_cpp_function_and_s_has_no_grad(device):
    ops = operands(device)
    ops["lora_a"].requires_grad_()
    y, s = call(torch.ops.lora_ops.lora_linear_fwd, ops)
    assert "LoraLinearFunction" in y.grad_fn.name()  # not torch.library's Python autograd
    assert not s.requires_grad and s.grad_fn is None
    with pytest.raises(RuntimeError, match="does not require grad"):
        s.sum().backward()
    y.sum().backward()
    assert ops["lora_a"].grad is not None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode], ids=lambda c: c.__name__)
def test_grad_free_calls_build_no_graph(device, context):
    ops = operands(device)
    for k in ("x", "lora_a", "lora_b"):
        ops[k].requires_grad_()
    with context():
        y, s = call(torch.ops.lora_ops.lora_linear_fwd, ops)
    assert y.grad_fn is None and s.grad_fn is None
    assert not y.requires_grad and not s.requires_grad
    with torch.no_grad():
        y_ref, _ = reference.lora_linear_fwd(*ops.values(), SCALING, 0.0, 0)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    plain = operands(device)  # grad mode on, nothing requires grad
    y, s = call(torch.ops.lora_ops.lora_linear_fwd, plain)
    assert y.grad_fn is None and not y.requires_grad


@pytest.mark.parametrize("device", DEVICES)
def test_double_backward_raises_naming_the_op(device):
    ops = operands(device)
    for k in ("x", "lora_a", "lora_b"):
        ops[k].requires_grad_()
    y, _ = call(torch.ops.lora_ops.lora_linear_fwd, ops)
    with pytest.raises(RuntimeError, match="lora_linear_bwd: double backward is not supported"):
        (ga,) = torch.autograd.grad(y.square().sum(), [ops["lora_a"]], create_graph=True)
        ga.square().sum().backward()


@pytest.mark.parametrize("device", DEVICES)
def test_create_graph_with_only_the_base_trainable_is_exact(device):
    """dW = dY^T x is plain torch, differentiable twice; the bwd op is not called at all."""
    def penalty(fwd, ops):
        ops = {k: None if v is None else v.detach().clone() for k, v in ops.items()}
        ops["weight"].requires_grad_()
        y, _ = call(fwd, ops)
        (gw,) = torch.autograd.grad(y.square().sum(), [ops["weight"]], create_graph=True)
        (ggw,) = torch.autograd.grad(gw.square().sum(), [ops["weight"]])
        return gw.detach(), ggw

    ops = operands(device)
    got = penalty(torch.ops.lora_ops.lora_linear_fwd, ops)
    want = penalty(reference.lora_linear_fwd, {k: None if v is None else v.double() for k, v in ops.items()})
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_bwd_op_refuses_inputs_that_require_grad_only_in_grad_mode(device):
    ops = operands(device)
    _, s = call(torch.ops.lora_ops.lora_linear_fwd, ops)
    dy = torch.randn(ops["x"].shape[0], ops["weight"].shape[0], device=device, requires_grad=True)
    args = (dy, ops["x"], ops["weight"], ops["lora_a"], ops["lora_b"], s, SCALING, 0.0, None,
            [True, True, True])
    with pytest.raises(RuntimeError, match="lora_linear_bwd: double backward is not supported"):
        torch.ops.lora_ops.lora_linear_bwd(*args)
    with torch.no_grad():
        dx, da, db = torch.ops.lora_ops.lora_linear_bwd(*args)
    want = reference.lora_linear_bwd(*(a.detach() for a in args[:6]), SCALING, 0.0, None)
    for g, w in zip((dx, da, db), want):
        assert g.grad_fn is None
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
