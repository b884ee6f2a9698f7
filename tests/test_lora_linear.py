"""lora_linear on every backend against a float64 oracle: outputs and all gradients."""
import pytest
import torch
import torch.nn.functional as F

import lora_ops
from lora_ops import reference
from lora_ops.reference.tokens import tokens_2d
from tests.helpers import DTYPES, assert_close_scaled, assert_rounded_once, backend_params

# (leading dims of x, K, N, r): M = 0 and 1, K and N off multiples of 8, r = 1, 1-D and 3-D x, K = 0.
SHAPES = [
    ((0,), 16, 8, 4),
    ((1,), 33, 17, 1),
    ((7,), 40, 24, 8),
    ((2, 3), 13, 19, 3),
    ((5,), 64, 48, 64),
    ((4,), 24, 40, 256),
    # Either side of the CPU GEMM's streamed path (up to 16 rows), the 16 rows over two of its
    # depth blocks (1536 deep at 16 rows).
    ((4, 4), 1603, 26, 16),
    ((17,), 72, 33, 8),
    ((3, 13), 200, 45, 24),  # the CPU shrink streamed at more than 16 rows (a narrow product)
    # A 1-D x (one token, as nn.Linear takes it), and no features at all: y = b, dx empty.
    ((), 9, 7, 2),
    ((2, 3), 0, 5, 2),
    ((), 0, 6, 3),
]


def make_operands(lead, K, N, r, dtype, device, bias=True):
    g = torch.Generator().manual_seed(hash((lead, K, N, r)) % (2**31))
    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)
    x = rnd(*lead, K)
    w = rnd(N, K, scale=max(K, 1) ** -0.5)
    b = rnd(N) if bias else None
    a = rnd(r, K, scale=max(K, 1) ** -0.5)
    bb = rnd(N, r, scale=r ** -0.5)
    return x, w, b, a, bb


def eager_lowp(x, w, b, a, bb, s, p=0.0, seed=0):
    """PEFT-style eager LoRA in the operands' own dtype: PyTorch's own low-precision error."""
    x2d = tokens_2d(x)
    d = reference.apply_dropout(x2d, seed, p)
    y = F.linear(x2d, w, b) + s * F.linear(F.linear(d, a), bb)
    return y.reshape(*x.shape[:-1], w.shape[0])


def run_with_grads(fn, x, w, b, a, bb, dy):
    x, a, bb = (t.detach().clone().requires_grad_(True) for t in (x, a, bb))
    b = None if b is None else b.detach().clone().requires_grad_(True)
    y = fn(x, w, b, a, bb)
    y.backward(dy)
    return y.detach(), x.grad, a.grad, bb.grad, None if b is None else b.grad


def check_parity(device, backend, dtype, x, w, b, a, bb, s, p=0.0, seed=0):
    dy = torch.randn(*x.shape[:-1], w.shape[0], dtype=torch.float64).to(dtype).to(device)
    got = run_with_grads(lambda *t: lora_ops.lora_linear(*t, s, dropout_p=p, training=True,
                                                          seed=seed, backend=backend),
                         x, w, b, a, bb, dy)
    up = lambda t: None if t is None else t.double().cpu()
    ref = run_with_grads(lambda *t: reference.lora_linear(*t, s, p, seed),
                         up(x), up(w), up(b), up(a), up(bb), up(dy))
    low = run_with_grads(lambda *t: eager_lowp(*t, s, p, seed), x, w, b, a, bb, dy)
    for name, o, r_, l_ in zip(("y", "dx", "d_lora_a", "d_lora_b", "d_bias"), got, ref, low):
        if r_ is None:
            continue
        assert o.dtype == dtype and o.device.type == device, name
        assert_close_scaled(o, r_, l_, dtype, f"{backend}/{name}")


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_parity(device, backend, dtype, shape):
    x, w, b, a, bb = make_operands(*shape, dtype, device)
    check_parity(device, backend, dtype, x, w, b, a, bb, s=0.5)


@pytest.mark.parametrize("device,backend", backend_params(("cpu",), devices=("cpu",)))
@pytest.mark.parametrize("gemm", ["builtin", "aten"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [1, 5, 17, 70, 130])
def test_cpu_base_gemm_choices(device, backend, gemm, dtype, M, monkeypatch):
    # The CPU kernels run x W^T and dY W on their own GEMM or on ATen's matmul, chosen per dtype,
    # product and row count and by what ATen's runs on here (AMX, MKL on Intel): a machine takes
    # only some of those paths. LORA_OPS_CPU_GEMM (read per call) forces each one; rows either
    # side of every crossover, dropout included.
    monkeypatch.setenv("LORA_OPS_CPU_GEMM", gemm)
    x, w, b, a, bb = make_operands((M,), 100, 72, 8, dtype, device)
    check_parity(device, backend, dtype, x, w, b, a, bb, s=0.5, p=0.1, seed=M)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parity_dropout_no_bias(device, backend, dtype):
    x, w, _, a, bb = make_operands((9,), 24, 20, 8, dtype, device, bias=False)
    check_parity(device, backend, dtype, x, w, None, a, bb, s=2.0, p=0.3, seed=1234)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("layout", ["column_stride", "row_slice", "transposed"])
def test_non_contiguous_x(device, backend, layout):
    dtype = torch.float32
    _, w, b, a, bb = make_operands((6,), 20, 12, 4, dtype, device)
    base = torch.randn(6, 40, dtype=dtype, device=device)
    x = {"column_stride": base[:, ::2], "row_slice": base[:, 5:25],
         "transposed": torch.randn(20, 6, dtype=dtype, device=device).t()}[layout]
    assert not x.is_contiguous()
    check_parity(device, backend, dtype, x, w, b, a, bb, s=1.5, p=0.2, seed=7)


@pytest.mark.parametrize("device,backend", backend_params())
def test_frozen_weight_with_grad(device, backend):
    """A base weight that requires grad gets the plain dY^T x gradient."""
    x, w, b, a, bb = make_operands((5,), 12, 10, 2, torch.float32, device)
    w = w.clone().requires_grad_(True)
    y = lora_ops.lora_linear(x, w, b, a, bb, 0.7, backend=backend)
    dy = torch.randn_like(y)
    y.backward(dy)
    torch.testing.assert_close(w.grad, dy.t() @ x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_reference_low_precision_computes_in_fp32_and_rounds_s_as_the_ops(dtype, p):
    """The oracle's own low-precision rule (lora_ops/reference/lora_linear.py): S comes back in
    x's dtype, as the ops return it (their fake kernels say so), rounded once from an fp32
    product; y is computed in fp32 from that rounded S and rounded once at the end. Rounding a
    partial product (x W^T, S B^T) to the low precision on the way misses that by part of an ulp."""
    x, w, b, a, bb = make_operands((37,), 64, 48, 8, dtype, "cpu")
    y, s = reference.lora_linear_fwd(x, w, b, a, bb, 0.75, p, 5)
    fake_y, fake_s = x.new_empty(37, 48), x.new_empty(37, 8)  # what _fwd_fake returns
    assert (y.dtype, s.dtype, y.shape, s.shape) == (fake_y.dtype, fake_s.dtype, fake_y.shape, fake_s.shape)
    up = lambda t: t.double()
    s64 = reference.apply_dropout(up(x), 5, p) @ up(a).t()
    assert_rounded_once(s, s64, "S")
    y64 = up(x) @ up(w).t() + 0.75 * (up(s) @ up(bb).t()) + up(b)
    assert_rounded_once(y, y64, "y")
