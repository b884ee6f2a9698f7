"""Shared by the tests: backend/device parameters, and tolerances that scale with the problem."""
import pytest
import torch

import lora_ops
from lora_ops._backend import BACKENDS

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The backends with hand-written kernels (the reference being the oracle they are held to).
KERNEL_BACKENDS = ("cuda", "triton", "cpu")

# Error a kernel may add on top of PyTorch's own low-precision error, relative to max|ref|.
FLOOR = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def backend_params(backends=BACKENDS, devices=("cpu", "cuda")):
    """(device, backend) pairs; the ones not usable here are kept and skipped, so the report
    shows what did not run."""
    usable = lora_ops.available_backends()
    params = []
    for device in devices:
        for backend in backends:
            ok = backend in usable.get(device, [])
            marks = [] if ok else [pytest.mark.skip(reason=f"{backend} backend not available for {device} here")]
            if device == "cuda":
                marks.append(pytest.mark.cuda)
            params.append(pytest.param(device, backend, id=f"{device}-{backend}", marks=marks))
    return params


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max|out - ref| / max|ref|; NaN anywhere fails."""
    out64, ref64 = out.double().cpu(), ref.double().cpu()
    if out64.numel() == 0:
        return 0.0
    if not torch.isfinite(out64).all():
        return float("inf")
    return float((out64 - ref64).abs().max() / ref64.abs().max().clamp_min(1e-12))


def assert_close_scaled(out, ref, lowp, dtype, what=""):
    """out must be within 2x PyTorch's own low-precision error (lowp vs ref) plus a dtype floor."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err, base = rel_err(out, ref), rel_err(lowp, ref)
    assert err <= 2 * base + FLOOR[dtype], f"{what}: error {err:.3g} vs torch low-precision {base:.3g} ({dtype})"


def assert_rounded_once(out, exact, what="", slack=1e-5):
    """out (float16 or bfloat16) is `exact` (float64) rounded once to out's dtype: within half a
    unit in the last place of out's dtype, plus `slack` * max|exact| for an fp32 accumulation.
    A result rounded to the low precision on the way (a partial product or sum) misses this by
    a good part of an ulp, far more than that slack."""
    exact = exact.double().cpu()
    assert out.shape == exact.shape, f"{what}: shape {tuple(out.shape)} != {tuple(exact.shape)}"
    info = torch.finfo(out.dtype)
    _, exponent = torch.frexp(exact)
    ulp = torch.ldexp(torch.full_like(exact, info.eps), exponent - 1).clamp_min(
        info.smallest_normal * info.eps)
    err = (out.double().cpu() - exact).abs()
    bound = 0.5 * ulp + slack * exact.abs().max()
    worst = int((err - bound).argmax())
    assert (err <= bound).all(), (f"{what}: |out - exact| = {err.flatten()[worst]:.3g} at "
                                  f"{worst}, half an ulp there is {0.5 * ulp.flatten()[worst]:.3g}")


def import_triton_or_skip():
    """triton, for a test module that calls its launchers directly; the module is skipped where
    they cannot run: no triton, or no GPU and no interpreter that runs them (conftest sets
    TRITON_INTERPRET=1 without a GPU, before triton is first imported)."""
    import os
    triton = pytest.importorskip("triton")
    if not torch.cuda.is_available():
        from lora_ops import _backend
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("triton needs a GPU, or TRITON_INTERPRET=1 set before it is imported",
                        allow_module_level=True)
        if not _backend._interpreter_runs_kernels():
            pytest.skip(f"Triton {triton.__version__}'s interpreter cannot run these kernels (see "
                        "lora_ops._backend.MIN_TRITON_INTERPRETER)", allow_module_level=True)
    return triton


def nan_past_rank(stack: torch.Tensor, ranks, rank_dim: int) -> torch.Tensor:
    """stack [L, ...] with NaN in place past each adapter's rank along rank_dim (1: lora_a
    [L, r_max, K]; 2: lora_b [L, N, r_max]), where no kernel may read; returns stack."""
    for adapter, rank in enumerate(ranks):
        past = (adapter,) + (slice(None),) * (rank_dim - 1) + (slice(max(int(rank), 0), None),)
        stack[past] = float("nan")
    return stack
