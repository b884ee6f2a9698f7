"""The single-adapter fused LoRA linear op: y = x W^T + b + s * (drop(x) A^T) B^T.

Two torch custom ops carry it, each with a backward op of its own:
  lora_ops::lora_linear_fwd / lora_linear_bwd                 C++ (csrc/), CPU and CUDA kernels
  lora_ops::triton_lora_linear_fwd / triton_lora_linear_bwd   Triton (lora_ops/triton/)
The fake (meta) implementations of all four are registered here, so both trace under
torch.compile. The autograd formula of the Triton op is registered here too; the C++ op has the
same formula registered in C++ (csrc/torch_lora_linear_autograd.cpp), which spares each call a
trip through Python (~45 µs on CPU; benchmarks/bench_op_overhead.py). The `reference` backend
is plain PyTorch differentiated by autograd, an oracle independent of the hand-written
backward passes.
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from lora_ops import _backend
from lora_ops import reference
from lora_ops.autocast import autocast_dtype, autocast_operands, call_cast
from lora_ops.dropout_seed import SeedLike, check_seed_tensor, launch_seed, seed_tensor
from lora_ops.fake_impl import register_fake
from lora_ops.reference.tokens import tokens_2d

OP = "lora_linear"
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_args(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor,
                lora_b: Tensor, scaling: float, dropout_p: float) -> None:
    """Clear errors for bad input, before any backend sees it (the C++ ops check again)."""
    def fail(msg: str):
        raise ValueError(f"{OP}: {msg}")

    for name, t, dim in (("weight", weight, 2), ("lora_a", lora_a, 2), ("lora_b", lora_b, 2)):
        if not isinstance(t, Tensor):
            fail(f"{name} must be a Tensor, got {type(t).__name__}")
        if t.dim() != dim:
            fail(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if not isinstance(x, Tensor):
        fail(f"x must be a Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        fail("x must have at least 1 dimension (features last), got a 0-D tensor")
    n, k = weight.shape
    r = lora_a.shape[0]
    if x.shape[-1] != k:
        fail(f"x has {x.shape[-1]} features but weight has {k} columns (weight shape {tuple(weight.shape)})")
    if r == 0:
        fail(f"lora_a has rank 0 (shape {tuple(lora_a.shape)}); the rank must be at least 1")
    if lora_a.shape[1] != k:
        fail(f"lora_a has {lora_a.shape[1]} columns but x has {k} features (lora_a shape {tuple(lora_a.shape)})")
    if tuple(lora_b.shape) != (n, r):
        fail(f"lora_b must have shape ({n}, {r}) = (weight rows, lora_a rows), got {tuple(lora_b.shape)}")
    if bias is not None and not isinstance(bias, Tensor):
        fail(f"bias must be a Tensor or None, got {type(bias).__name__}")
    if bias is not None and tuple(bias.shape) != (n,):
        fail(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        fail(f"x has dtype {x.dtype}; supported are float32, float16 and bfloat16")
    named = [("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b)]
    if bias is not None:
        named.append(("bias", bias))
    dtype, device = x.dtype, x.device
    # Checked on every call: the common case costs one pass, the messages below only on failure.
    if not all(t.dtype == dtype and t.device == device for _, t in named):
        for name, t in named:
            if t.dtype != dtype:
                fail(f"{name} has dtype {t.dtype} but x has {dtype}; all operands must share one dtype")
            if t.device != device:
                fail(f"{name} is on {t.device} but x is on {device}")
    if not 0.0 <= dropout_p < 1.0:
        fail(f"dropout_p must be in [0, 1), got {dropout_p}")
    if not isinstance(scaling, (int, float)):
        fail(f"scaling must be a Python number, got {type(scaling).__name__}")
    check_scaling(OP, scaling)


_FLOAT32_MAX = torch.finfo(torch.float32).max


def check_scaling(op: str, scaling: float) -> None:
    """The C++ ops' rule (check_scaling in csrc/torch_common.cpp): the kernels take the scaling
    as a float32, which must be finite (NaN, inf or a double past float32's range would make
    every output and gradient NaN or inf, and a zero-row backward's dB 0 * inf)."""
    if not abs(scaling) <= _FLOAT32_MAX:  # NaN fails this too
        raise ValueError(f"{op}: scaling must be finite in float32, got {scaling}")


def _fwd_fake(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed):
    torch._check(x.dim() == 2, lambda: f"{OP}: x must be 2-D here, got {x.dim()}-D")
    torch._check(x.shape[1] == weight.shape[1], lambda: f"{OP}: x and weight disagree on K")
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_a.shape[0])


def _bwd_fake(dy, x, weight, lora_a, lora_b, s, scaling, dropout_p, seed, output_mask):
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if output_mask[0] else x.new_empty(0)
    da = torch.empty_like(lora_a) if output_mask[1] else x.new_empty(0)
    db = torch.empty_like(lora_b) if output_mask[2] else x.new_empty(0)
    return dx, da, db


@torch.library.custom_op("lora_ops::triton_lora_linear_fwd", mutates_args=())
def _triton_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
                scaling: float, dropout_p: float, seed: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    check_scaling("triton_lora_linear_fwd", scaling)
    from lora_ops.triton.lora_linear import lora_linear_fwd
    seed = launch_seed("triton_lora_linear_fwd", dropout_p, seed, x.device)
    with torch.cuda.device_of(x):  # Triton launches on the current device
        return lora_linear_fwd(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed)


@torch.library.custom_op("lora_ops::triton_lora_linear_bwd", mutates_args=())
def _triton_bwd(dy: Tensor, x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, s: Tensor,
                scaling: float, dropout_p: float, seed: Optional[Tensor],
                output_mask: List[bool]) -> Tuple[Tensor, Tensor, Tensor]:
    check_scaling("triton_lora_linear_bwd", scaling)
    from lora_ops.triton.lora_linear import lora_linear_bwd
    seed = launch_seed("triton_lora_linear_bwd", dropout_p, seed, x.device)
    with torch.cuda.device_of(x):
        return lora_linear_bwd(dy, x, weight, lora_a, lora_b, s, scaling, dropout_p, seed, tuple(output_mask))


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed = inputs
    _, s = output
    # x is alive anyway (the caller holds it) and weight is a frozen parameter: the only
    # activation memory this op adds is S [M, r]; the dropout mask is re-drawn from the seed,
    # saved as a variable for the reasons csrc/torch_lora_linear_autograd.cpp gives.
    ctx.save_for_backward(x, weight, lora_a, lora_b, s, seed)
    ctx.scaling, ctx.dropout_p = scaling, dropout_p


def _make_backward(bwd_op):
    # The same formula as LoraLinearFunction::backward in csrc/torch_lora_linear_autograd.cpp.
    def backward(ctx, dy, _ds):
        x, weight, lora_a, lora_b, s, seed = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        dx = da = db = None
        if need_x or need_a or need_b:  # not for a trainable base alone
            dx, da, db = bwd_op(dy, x, weight, lora_a, lora_b, s, ctx.scaling, ctx.dropout_p,
                                seed, [need_x, need_a, need_b])
        # The base weight is meant to be frozen; if it is trainable anyway its gradient is the
        # plain dY^T x (the adapter term does not depend on W).
        dw = (dy.t() @ x).to(weight.dtype) if need_w else None
        dbias = dy.sum(0) if need_bias else None
        return (dx if need_x else None, dw, dbias, da if need_a else None,
                db if need_b else None, None, None, None)
    return backward


def _register(fwd_name: str, bwd_name: str, autograd: bool) -> None:
    seed_rule = {"seed": check_seed_tensor}  # dropout_seed's rule, also at trace time
    register_fake(f"lora_ops::{fwd_name}", _fwd_fake, host_args=seed_rule)
    register_fake(f"lora_ops::{bwd_name}", _bwd_fake, host_args=seed_rule)
    if autograd:
        torch.library.register_autograd(f"lora_ops::{fwd_name}",
                                        _make_backward(getattr(torch.ops.lora_ops, bwd_name)),
                                        setup_context=_setup_context)


_register("triton_lora_linear_fwd", "triton_lora_linear_bwd", autograd=True)
if _backend.compiled():
    # Its autograd comes with the compiled library (csrc/torch_lora_linear_autograd.cpp).
    _register("lora_linear_fwd", "lora_linear_bwd", autograd=False)


def _capturing_cuda_graph(x) -> bool:
    """Whether this eager call on x is being captured into a CUDA graph."""
    return (isinstance(x, Tensor) and x.is_cuda and not torch.compiler.is_compiling()
            and torch.cuda.is_current_stream_capturing())


def _refuse_cpu_seed_in_capture(p: float) -> None:
    """A seed tensor on the CPU is read on the host once, as the graph is captured: every
    replay would apply that one mask while the caller expects masks that follow the tensor. A
    seed on the GPU (seed=None draws one there) is read by the kernels on every replay, and an
    int seed fixes the mask on purpose: both may be captured."""
    raise RuntimeError(
        f"{OP}: dropout (p={p}) with a CPU seed tensor under CUDA graph capture: it is read on "
        f"the host, once, as the graph is captured, so every replay would apply the same mask. "
        f"Put the seed tensor on x's device (the kernels then read it on every replay), pass "
        f"seed=None for a fresh mask per replay, or an int seed= to fix the mask on purpose")


def lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
                scaling: float, *, dropout_p: float = 0.0, training: bool = False,
                seed: SeedLike = None, backend: Optional[str] = None) -> Tensor:
    """Fused LoRA linear layer: x W^T + b + scaling * (dropout(x) A^T) B^T.

    x [..., K]; weight [N, K]; bias [N] or None; lora_a [r, K]; lora_b [N, r]; all one dtype
    (float32, float16 or bfloat16) and device. Dropout on the adapter path applies only when
    `training`; `seed` fixes its mask (the same on every backend): a Python int, or a one-element
    int64 tensor on the CPU or on x's device (which a graph may compute; on the device the
    kernels read it as they run, also on every replay of a captured CUDA graph); else a fresh
    one is drawn on x's device from torch's generator there (CUDA-graph safe: a fresh mask on
    every replay).
    Gradients flow to x, lora_a, lora_b and bias (and weight, if it requires grad).
    `backend`: "cuda", "triton", "cpu" or "reference"; default by device (see available_backends).
    """
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{OP}: dropout_p must be in [0, 1), got {dropout_p}")
    if type(scaling) not in (float, int) or not isinstance(x, Tensor):
        _check_args(x, weight, bias, lora_a, lora_b, scaling, dropout_p)  # a bool passes
    p = float(dropout_p) if training else 0.0
    seed_arg = None
    if p > 0.0:
        if isinstance(seed, Tensor) and seed.device.type == "cpu" and _capturing_cuda_graph(x):
            _refuse_cpu_seed_in_capture(p)
        seed_arg = seed_tensor(OP, seed, x.device)
    scaling = float(scaling)
    device = x.device
    chosen = _backend.compiled_backend(OP, backend, x)
    if chosen is not None:
        # The compiled op checks every argument itself (operands on several devices included:
        # the fake kernel that a meta operand routes the call to refuses them too), and casts
        # them itself in an autocast region (csrc/torch_autocast.cpp). The Python checks (~2.5
        # µs, a fifth of a decode-sized call) run only when the op refuses, to word the error for
        # this function's arguments (x before flattening, say) rather than the op's.
        try:
            return _on_tokens(_fwd_of(chosen), x, weight, bias, lora_a, lora_b, scaling, p,
                              seed_arg)
        except _backend.OP_REFUSALS:
            _check_args(*autocast_operands(x, weight, bias, lora_a, lora_b), scaling, dropout_p)
            raise
    operands = (x, weight, bias, lora_a, lora_b)
    if autocast_dtype(device) is not None:  # cast as the compiled ops cast (csrc/torch_autocast.cpp)
        return call_cast(_on_python_backend, operands, scaling, dropout_p, p, seed_arg, backend)
    return _on_python_backend(*operands, scaling, dropout_p, p, seed_arg, backend)


def _on_python_backend(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor,
                       lora_b: Tensor, scaling: float, dropout_p: float, p: float,
                       seed: Optional[Tensor], backend: Optional[str]) -> Tensor:
    """lora_linear on the reference or Triton backend (or a compiled one asked for where it
    cannot run, for resolve_backend to refuse), whose checks are all here."""
    _check_args(x, weight, bias, lora_a, lora_b, scaling, dropout_p)
    fwd = _fwd_of(_backend.resolve_backend(OP, backend, x.device))
    return _on_tokens(fwd, x, weight, bias, lora_a, lora_b, scaling, p, seed)


def _fwd_of(backend: str):
    """The forward of a backend: (x [M, K], weight, bias, lora_a, lora_b, scaling, p, seed)
    -> (y [M, N], S [M, r])."""
    if backend == "reference":
        return reference.lora_linear_fwd
    # The overloads, not the packets: a packet's call resolves the overload anew (~1.5 µs).
    if backend == "triton":
        return torch.ops.lora_ops.triton_lora_linear_fwd.default
    return torch.ops.lora_ops.lora_linear_fwd.default


def _on_tokens(fwd, x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor,
               lora_b: Tensor, scaling: float, p: float, seed: Optional[Tensor]) -> Tensor:
    """fwd on x flattened to tokens, y in x's leading shape."""
    flat = x.dim() == 2  # the common case: no views to make on the way in and out
    x2d = x if flat else tokens_2d(x)
    y2d, _ = fwd(x2d, weight, bias, lora_a, lora_b, scaling, p, seed)
    return y2d if flat else y2d.reshape(*x.shape[:-1], weight.shape[0])


def fwd_op(backend: str):
    """The forward op of a compiled or Triton backend (for tests and benchmarks)."""
    return {"triton": torch.ops.lora_ops.triton_lora_linear_fwd}.get(
        backend, getattr(torch.ops.lora_ops, "lora_linear_fwd", None))


def bwd_op(backend: str):
    """The backward op of a compiled or Triton backend (for tests and benchmarks)."""
    return {"triton": torch.ops.lora_ops.triton_lora_linear_bwd}.get(
        backend, getattr(torch.ops.lora_ops, "lora_linear_bwd", None))
