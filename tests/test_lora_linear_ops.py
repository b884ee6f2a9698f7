"""The torch custom ops: opcheck, torch.compile, and clear errors for bad input."""
import warnings

import pytest
import torch
from torch import nn

import lora_ops
from lora_ops import _backend
from lora_ops.lora_linear import bwd_op, fwd_op
from tests.helpers import KERNEL_BACKENDS, backend_params


def op_args(device, dtype=torch.float32, M=5, K=12, N=10, r=3):
    t = lambda *s: torch.randn(*s, dtype=dtype, device=device)
    return t(M, K), t(N, K), t(N), t(r, K), t(N, r)


@pytest.mark.parametrize("device,backend", backend_params(KERNEL_BACKENDS))
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_opcheck_forward(device, backend, dropout_p):
    x, w, b, a, bb = op_args(device)
    for args in ((x.requires_grad_(), w, b, a.requires_grad_(), bb.requires_grad_(), 0.5, dropout_p,
                  torch.tensor(17)),
                 (x.detach(), w, None, a.detach(), bb.detach(), 2.0, dropout_p, torch.tensor(3))):
        torch.library.opcheck(fwd_op(backend), args)


@pytest.mark.parametrize("device,backend", backend_params(KERNEL_BACKENDS))
@pytest.mark.parametrize("mask", [[True, True, True], [False, True, False]], ids=str)
def test_opcheck_backward(device, backend, mask):
    x, w, _, a, bb = op_args(device)
    _, s = fwd_op(backend)(x, w, None, a, bb, 0.5, 0.2, torch.tensor(5))
    dy = torch.randn(x.shape[0], w.shape[0], device=device)
    torch.library.opcheck(bwd_op(backend), (dy, x, w, a, bb, s, 0.5, 0.2, torch.tensor(5), mask))


@pytest.mark.parametrize("device,backend", backend_params(KERNEL_BACKENDS))
def test_opcheck_backward_non_contiguous_x(device, backend):
    """dx comes back contiguous whatever x's layout (the fake kernel must say so too, or a
    compiled graph would assume x's strides for it)."""
    x, w, _, a, bb = op_args(device)
    xt = torch.randn(x.shape[1], x.shape[0], device=device).t()
    assert not xt.is_contiguous()
    _, s = fwd_op(backend)(xt, w, None, a, bb, 0.5, 0.2, torch.tensor(5))
    dy = torch.randn(x.shape[0], w.shape[0], device=device)
    dx, _, _ = bwd_op(backend)(dy, xt, w, a, bb, s, 0.5, 0.2, torch.tensor(5), [True, True, True])
    assert dx.is_contiguous()
    torch.library.opcheck(bwd_op(backend), (dy, xt, w, a, bb, s, 0.5, 0.2, torch.tensor(5),
                                            [True, True, True]))


@pytest.mark.parametrize("device,backend", backend_params())
def test_compile_fullgraph_training_step(device, backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    base = nn.Linear(24, 16, device=device)
    layer = lora_ops.LoRALinear.from_linear(base, r=4, lora_alpha=8, backend=backend)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 5, 24, device=device)

    def step(module):
        module.lora_A.weight.grad = module.lora_B.weight.grad = None
        out = module(x)
        out.square().mean().backward()
        return out.detach(), module.lora_A.weight.grad.clone(), module.lora_B.weight.grad.clone()

    eager = step(layer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = step(torch.compile(layer, fullgraph=True))
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)
    # Nothing of lora_ops for Dynamo to warn about (it warned once about tracing into the
    # backend lookup's lru_cache).
    ours = [str(w.message) for w in caught if "lora_ops" in str(w.message) or "lora_ops" in w.filename]
    assert not ours, ours


def test_errors_name_op_argument_and_what_was_seen():
    x, w, b, a, bb = op_args("cpu")
    cases = [
        (dict(x=torch.randn(5, 11)), "x has 11 features but weight has 12"),
        (dict(lora_a=torch.randn(3, 7)), "lora_a has 7 columns"),
        (dict(lora_b=torch.randn(10, 4)), "lora_b must have shape (10, 3)"),
        (dict(lora_a=torch.randn(0, 12), lora_b=torch.randn(10, 0)), "rank 0"),
        (dict(bias=torch.randn(9)), "bias must have shape (10,)"),
        (dict(bias=1.0), "bias must be a Tensor or None, got float"),
        (dict(weight=torch.randn(10, 12, 1)), "weight must be 2-D"),
        (dict(lora_a=torch.randn(3, 12, dtype=torch.float64)), "lora_a has dtype torch.float64"),
        (dict(x=torch.randint(0, 3, (5, 12))), "x has dtype torch.int64"),
        (dict(lora_b=torch.randn(10, 3, device="meta")), "lora_b is on meta"),
        (dict(bias=torch.randn(10, device="meta")), "bias is on meta"),
        (dict(weight="w"), "weight must be a Tensor, got str"),
        # Worded for the caller's x, not the flattened [tokens, K] the op sees.
        (dict(x=torch.randn(2, 5, 11)), "x has 11 features but weight has 12"),
        (dict(x=torch.tensor(1.0)), "x must have at least 1 dimension"),
    ]
    for override, message in cases:
        args = dict(x=x, weight=w, bias=b, lora_a=a, lora_b=bb) | override
        with pytest.raises(ValueError, match=r"^lora_linear: .*" + message.replace("(", r"\(").replace(")", r"\)")):
            lora_ops.lora_linear(args["x"], args["weight"], args["bias"], args["lora_a"], args["lora_b"], 1.0)
    with pytest.raises(ValueError, match="dropout_p must be in"):
        lora_ops.lora_linear(x, w, b, a, bb, 1.0, dropout_p=1.0, training=True)
    for scaling in (float("nan"), float("inf"), -1e300):  # the last is -inf as a float32
        for backend in lora_ops.available_backends()["cpu"]:
            with pytest.raises(ValueError, match=r"^lora_linear: scaling must be finite in "
                                                 r"float32, got"):
                lora_ops.lora_linear(x, w, b, a, bb, scaling, backend=backend)
    with pytest.raises(ValueError, match="'fast' is not a lora_ops backend"):
        lora_ops.lora_linear(x, w, b, a, bb, 1.0, backend="fast")
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available for cpu tensors"):
        lora_ops.lora_linear(x, w, b, a, bb, 1.0, backend="cuda")


@pytest.mark.parametrize("backend", [b for b in KERNEL_BACKENDS if b in lora_ops.available_backends()["cpu"]])
@pytest.mark.parametrize("arg,shape", [("dy", (5, 9)), ("dy", (4, 10)), ("s", (4, 3)), ("s", (5, 2)),
                                       ("s", (5, 4))])
def test_backward_op_refuses_dy_and_s_of_the_wrong_shape(backend, arg, shape):
    """The backward op reads dY as [M, N] and S as [M, r]: an S with fewer columns than the rank
    would be read past its end, one with more at the wrong offsets. Refused, naming it."""
    x, w, _, a, bb = op_args("cpu")
    args = dict(dy=torch.randn(5, 10), s=torch.randn(5, 3)) | {arg: torch.randn(*shape)}
    with pytest.raises(ValueError, match=rf"^lora_linear_bwd: {arg} (has size|must be)"):
        bwd_op(backend)(args["dy"], x, w, a, bb, args["s"], 0.5, 0.0, None, [True, True, True])


@pytest.mark.parametrize("backend", lora_ops.available_backends()["cpu"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("dropout_p", [1.0, 1.5, -0.1, float("nan")], ids=str)
def test_bad_dropout_p_is_refused_in_eval_mode_too(backend, training, dropout_p):
    """dropout_p is checked whether or not dropout applies: a layer built with a bad p must not
    run in eval mode only to fail once it trains."""
    x, w, b, a, bb = op_args("cpu")
    with pytest.raises(ValueError, match=r"^lora_linear: dropout_p must be in \[0, 1\), got"):
        lora_ops.lora_linear(x, w, b, a, bb, 1.0, dropout_p=dropout_p, training=training,
                             backend=backend)


@pytest.mark.parametrize("backend", lora_ops.available_backends()["cpu"])
@pytest.mark.parametrize("scaling", [torch.tensor(0.5), "0.5", None], ids=["tensor", "str", "none"])
def test_scaling_must_be_a_python_number(backend, scaling):
    """The kernels take the scaling as a float: a tensor (which float() would read on the host,
    a sync on a GPU and a constant in a graph) or a string is refused, naming its type."""
    x, w, b, a, bb = op_args("cpu")
    with pytest.raises(ValueError, match=r"^lora_linear: scaling must be a Python number, got "
                                         + type(scaling).__name__):
        lora_ops.lora_linear(x, w, b, a, bb, scaling, backend=backend)


@pytest.mark.parametrize("version,usable", [("3.6.0", False), ("3.7.1", True), ("3.8.0+git1a2b", True)])
def test_interpreted_triton_needs_an_interpreter_that_runs_the_kernels(monkeypatch, version, usable):
    """Triton 3.6's interpreter fails inside every kernel: on CPU tensors under TRITON_INTERPRET=1
    the triton backend is then not offered, and asking for it says why."""
    if not _backend._triton_importable():
        pytest.skip("triton is not installed")
    x, w, b, a, bb = op_args("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_backend.importlib.metadata, "version", lambda name: version)
    _backend.triton_version.cache_clear()
    _backend._usable.cache_clear()
    try:
        assert ("triton" in lora_ops.available_backends()["cpu"]) == usable
        if torch.cuda.is_available():  # compiled for the GPU, any version
            assert "triton" in lora_ops.available_backends()["cuda"]
        if not usable:
            with pytest.raises(RuntimeError, match=r"backend 'triton' is not available for cpu tensors "
                                                   r".*Triton 3\.6\.0's interpreter cannot run these "
                                                   r"kernels .* Triton 3\.7 or later's can"):
                lora_ops.lora_linear(x, w, b, a, bb, 1.0, backend="triton")
    finally:
        monkeypatch.undo()
        _backend.triton_version.cache_clear()
        _backend._usable.cache_clear()


def test_env_var_picks_backend(monkeypatch):
    """Read on every call, from however the process last set it (unset and empty: the default)."""
    cpu = torch.device("cpu")
    default = lora_ops.available_backends()["cpu"][0]
    monkeypatch.setenv("LORA_OPS_BACKEND", "reference")
    assert _backend.resolve_backend("lora_linear", None, cpu) == "reference"
    assert _backend.resolve_backend("lora_linear", default, cpu) == default  # backend= wins
    monkeypatch.setenv("LORA_OPS_BACKEND", "")
    assert _backend.resolve_backend("lora_linear", None, cpu) == default
    monkeypatch.setenv("LORA_OPS_BACKEND", "bogus")
    with pytest.raises(ValueError, match=r"\$LORA_OPS_BACKEND='bogus'"):
        _backend.resolve_backend("lora_linear", None, cpu)
    monkeypatch.delenv("LORA_OPS_BACKEND")
    assert _backend.env_backend() is None
    assert _backend.resolve_backend("lora_linear", None, cpu) == default


@pytest.mark.skipif("cpu" not in lora_ops.available_backends()["cpu"], reason="no CPU kernels")
def test_bad_cpu_gemm_choice_names_the_op(monkeypatch):
    x, w, b, a, bb = op_args("cpu")
    monkeypatch.setenv("LORA_OPS_CPU_GEMM", "mkl")
    with pytest.raises(ValueError, match="lora_linear_fwd: LORA_OPS_CPU_GEMM must be auto, "
                                         "builtin or aten, got 'mkl'"):
        lora_ops.lora_linear(x, w, b, a, bb, 1.0, backend="cpu")


@pytest.mark.skipif(not _backend.compiled(), reason="compiled library not built")
def test_compiled_op_checks_its_own_input():
    """Callers of torch.ops.lora_ops.* from other frameworks get the same clear errors."""
    x, w, b, a, bb = op_args("cpu")
    with pytest.raises(ValueError, match="lora_linear_fwd: lora_b has size 9 in dim 0"):
        torch.ops.lora_ops.lora_linear_fwd(x, w, b, a, torch.randn(9, 3), 1.0, 0.0, None)
    with pytest.raises(ValueError, match="lora_linear_fwd: dropout_p must be in"):
        torch.ops.lora_ops.lora_linear_fwd(x, w, b, a, bb, 1.0, 1.5, None)
    with pytest.raises(ValueError, match="lora_linear_bwd: dy has size 4 in dim 0"):
        torch.ops.lora_ops.lora_linear_bwd(torch.randn(4, 10), x, w, a, bb, torch.randn(5, 3), 1.0,
                                           0.0, None, [True, True, True])
    # Also on zero rows, where the backward's dB would be 0 * inf = NaN.
    for fwd, bwd in ((torch.ops.lora_ops.lora_linear_fwd, torch.ops.lora_ops.lora_linear_bwd),
                     (torch.ops.lora_ops.triton_lora_linear_fwd,
                      torch.ops.lora_ops.triton_lora_linear_bwd)):
        name = fwd.__name__.split(".")[0]
        with pytest.raises(ValueError, match=f"{name}: scaling must be finite in float32"):
            fwd(x, w, b, a, bb, float("inf"), 0.0, None)
        with pytest.raises(ValueError, match=f"{name.replace('fwd', 'bwd')}: scaling must be"):
            bwd(torch.randn(0, 10), x[:0], w, a, bb, torch.randn(0, 3), float("nan"), 0.0, None,
                [True, True, True])
    # One meta operand sends the call to the fake kernel, which refuses mixed devices instead of
    # returning its uninitialised output.
    with pytest.raises(ValueError, match="lora_linear_fwd: operands are on several devices: bias is on meta but x is on cpu"):
        torch.ops.lora_ops.lora_linear_fwd(x, w, b.to("meta"), a, bb, 1.0, 0.0, None)
    with pytest.raises(ValueError, match="lora_linear_bwd: operands are on several devices: weight is on meta but dy is on cpu"):
        torch.ops.lora_ops.lora_linear_bwd(torch.randn(5, 10), x, w.to("meta"), a, bb,
                                           torch.randn(5, 3), 1.0, 0.0, None, [True, True, True])
