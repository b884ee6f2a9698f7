"""Multi-adapter LoRA ops: many adapters in one batch, for serving and for training.

L adapters are stacked: lora_a [L, r_max, K] and lora_b [L, N, r_max] per output slice, with a
per-adapter rank `ranks [L]` and scaling `scalings [L]`. Token i uses adapter a_i, given per
token (`token_adapter [M]`, decode) or per segment (`seg_indptr [S+1]`, `seg_adapter [S]`,
prefill); -1 means base only. lora_ops/reference/multi_lora.py defines the semantics.

Torch ops (namespace lora_ops), each with a Triton twin named triton_<op>:
  multi_lora_shrink(x, lora_a[], scalings, ranks, token_adapter?, seg_indptr?, seg_adapter?)
      -> t [S, M, r_max] fp32
  multi_lora_expand(y!, t, lora_b[], slice_offsets, ranks, token_adapter?, seg_indptr?, seg_adapter?)
      adds t B^T into y in place
  multi_lora_linear_fwd(x, weight, bias?, lora_a[], lora_b[], slice_offsets, scalings, ranks,
                        token_adapter?, seg_indptr?, seg_adapter?) -> (y, t)
The C++ ones (csrc/torch_multi_lora.cpp) run the CPU and CUDA kernels; the Triton ones are
registered here. Fake impls and the autograd of multi_lora_linear_fwd are registered here for
both. Only multi_lora_linear is differentiable; shrink and expand are serving primitives.

The public functions check index and rank values where reading them is free: CPU tensors in
eager mode. On a GPU nothing is read back (that would be a device sync): the kernels treat an
adapter index outside [-1, L) as -1 and clamp a rank into [0, r_max], never reading out of
bounds. The raw ops behave the same on CPU for indices; the CPU op rejects bad ranks and
malformed segments itself. No op checks scaling values (MultiLoRALinear does, as adapters are
added): one that is not finite in float32 reaches only its adapter's tokens, as in the
reference. The hot path has no host sync and no data-dependent allocation, so it can be captured
in a CUDA graph.

Backward (multi_lora_linear): dT_s = s * dY_s B_s is a shrink over B viewed as [L, r_max, N_s];
dX = dY W + sum_s dT_s A_s an expand over A viewed as [L, K, r_max]; the per-adapter weight
gradients dA = dT^T x and dB = dY^T T are fixed-shape batched GEMMs over tokens sorted by
adapter (see gram_plan).
"""
import os
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from lora_ops import _backend
from lora_ops.autocast import autocast_dtype, autocast_operands, call_cast
from lora_ops.fake_impl import register_fake
from lora_ops.reference import multi_lora as reference
from lora_ops.reference.multi_lora import adapter_of_token
from lora_ops.reference.tokens import tokens_2d

MAX_SLICES = 8  # LORA_MAX_SLICES in csrc/include/lora_ops/common.h
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INDEX_DTYPES = (torch.int32, torch.int64)

Stacks = Union[Tensor, Sequence[Tensor]]
Index = Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]


# ----------------------------------------------------------------------------------------------
# Host-side argument checks (shapes, dtypes, devices; values only of CPU tensors)

def _fail(op: str, msg: str):
    raise ValueError(f"{op}: {msg}")


def _as_stacks(op: str, arg: str, stacks: Stacks) -> List[Tensor]:
    if isinstance(stacks, Tensor):
        items = [stacks]
    else:
        try:  # a list, a tuple, an nn.ParameterList...
            items = list(stacks)
        except TypeError:  # None, a number: not a sequence of stacks
            items = []
    if not items or not all(isinstance(s, Tensor) for s in items):
        _fail(op, f"{arg} must be a Tensor or a non-empty list of Tensors, got {stacks!r:.200}")
    if len(items) > MAX_SLICES:
        _fail(op, f"{arg} has {len(items)} slices; at most {MAX_SLICES} are supported")
    for s, item in enumerate(items):
        if item.dim() != 3:
            _fail(op, f"{arg}[{s}] must be 3-D (stacked adapters), got shape {tuple(item.shape)}")
    return items


def _check_like(op: str, arg: str, t: Tensor, like: Tensor, like_name: str = "x") -> None:
    if t.dtype != like.dtype:
        _fail(op, f"{arg} has dtype {t.dtype} but {like_name} has {like.dtype}; all operands must "
                  f"share one dtype")
    if t.device != like.device:
        _fail(op, f"{arg} is on {t.device} but {like_name} is on {like.device}")


def _check_float(op: str, arg: str, t: Tensor) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        _fail(op, f"{arg} has dtype {t.dtype}; supported are float32, float16 and bfloat16")


def _check_vector(op: str, arg: str, t, length: int, device: torch.device, integer: bool) -> None:
    if not isinstance(t, Tensor):
        _fail(op, f"{arg} must be a Tensor, got {type(t).__name__}")
    if t.dim() != 1 or t.shape[0] != length:
        _fail(op, f"{arg} must have shape ({length},), got {tuple(t.shape)}")
    if t.device != device:
        _fail(op, f"{arg} is on {t.device} but x is on {device}")
    if integer and t.dtype not in _INDEX_DTYPES:
        _fail(op, f"{arg} must be int32 or int64, got {t.dtype}")
    if not integer and not t.dtype.is_floating_point:
        _fail(op, f"{arg} must be a floating-point tensor, got {t.dtype}")


SYNC_CHECKS_ENV = "LORA_OPS_SYNC_CHECKS"


def _values_readable(device: torch.device) -> bool:
    """Index and rank values are checked where reading them is free: CPU tensors in eager mode
    (under torch.compile a read would break the graph). On a GPU a read is a host sync, which a
    decode step cannot afford: there the ops take an out-of-range adapter index as -1 and clamp
    ranks, unless LORA_OPS_SYNC_CHECKS=1 (read per call; for debugging) asks for the checks
    anyway, outside CUDA graph capture, where a sync is an error."""
    if torch.compiler.is_compiling():
        return False
    if device.type == "cpu":
        return True
    return (os.environ.get(SYNC_CHECKS_ENV) == "1" and device.type == "cuda"
            and not torch.cuda.is_current_stream_capturing())


def _check_adapters(op: str, scalings: Optional[Tensor], ranks: Tensor, num_adapters: int,
                    r_max: int, device: torch.device) -> None:
    if scalings is not None:
        _check_vector(op, "scalings", scalings, num_adapters, device, integer=False)
    _check_vector(op, "ranks", ranks, num_adapters, device, integer=True)
    if _values_readable(device):
        _check_rank_values(op, ranks, r_max)


def _check_rank_values(op: str, ranks: Tensor, r_max: int) -> None:
    if ranks.numel() == 0:
        return
    low, high = _min_max(ranks)
    if low < 0 or high > r_max:
        _fail(op, f"ranks must lie in [0, r_max={r_max}], got values from {low} to {high}")


def _check_index(op: str, num_tokens: int, num_adapters: int, token_adapter: Optional[Tensor],
                 seg_indptr: Optional[Tensor], seg_adapter: Optional[Tensor],
                 device: torch.device) -> Index:
    """Exactly one index form, checked, as the int32 tensors the kernels read."""
    if (token_adapter is None) == (seg_indptr is None and seg_adapter is None):
        _fail(op, "give exactly one index form: token_adapter, or seg_indptr with seg_adapter")
    if token_adapter is not None:
        _check_vector(op, "token_adapter", token_adapter, num_tokens, device, integer=True)
        if _values_readable(device):
            _check_adapter_values(op, "token_adapter", token_adapter, num_adapters)
        return _as_int32(token_adapter), None, None
    if seg_indptr is None or seg_adapter is None:
        _fail(op, "the segment form needs both seg_indptr and seg_adapter")
    if not isinstance(seg_adapter, Tensor) or seg_adapter.dim() != 1:
        _fail(op, f"seg_adapter must be a 1-D Tensor, got {seg_adapter!r:.200}")
    num_segments = seg_adapter.shape[0]
    _check_vector(op, "seg_adapter", seg_adapter, num_segments, device, integer=True)
    _check_vector(op, "seg_indptr", seg_indptr, num_segments + 1, device, integer=True)
    if _values_readable(device):
        _check_adapter_values(op, "seg_adapter", seg_adapter, num_adapters)
        _check_segment_bounds(op, seg_indptr, num_tokens)
    return None, _as_int32(seg_indptr), _as_int32(seg_adapter)


def _check_segment_bounds(op: str, seg_indptr: Tensor, num_tokens: int) -> None:
    bounds = seg_indptr.long()
    if int(bounds[0]) != 0 or int(bounds[-1]) != num_tokens or bool((bounds.diff() < 0).any()):
        _fail(op, f"seg_indptr must start at 0, never decrease and end at the token count "
                  f"{num_tokens}, got {bounds.tolist()!s:.200}")


def _min_max(t: Tensor) -> Tuple[int, int]:
    low, high = torch.aminmax(t)  # one op, not two: these checks run on every call
    return int(low), int(high)


def _check_adapter_values(op: str, arg: str, index: Tensor, num_adapters: int) -> None:
    if index.numel() == 0:
        return
    low, high = _min_max(index)
    if low < -1 or high >= num_adapters:
        _fail(op, f"{arg} values must lie in [-1, {num_adapters}) (-1: base only), "
                  f"got values from {low} to {high}")


def _check_slices(op: str, lora_b: List[Tensor], slice_offsets: Optional[Sequence[int]],
                  out_features: int, cover: bool) -> List[int]:
    """The column offset of every slice (packed one after another when not given). Slices must
    not overlap, and for the fused layer they tile all N columns (kernels.h: N = sum of the
    slice widths)."""
    widths = [b.shape[1] for b in lora_b]
    offsets = _slice_offsets(lora_b, slice_offsets)
    if len(offsets) != len(lora_b):
        _fail(op, f"slice_offsets has {len(offsets)} entries but lora_b has {len(lora_b)} slices")
    ok, end = True, 0
    for off, width in sorted(zip(offsets, widths)):
        ok = ok and off >= end and (not cover or off == end)
        end = off + width
    if not (ok and end <= out_features and (not cover or end == out_features)):
        _fail(op, f"slices (offsets {offsets}, widths {widths}) must {'tile' if cover else 'lie in'} "
                  f"the {out_features} output columns without overlapping")
    return offsets


def _check_pool(op: str, arg: str, num_adapters: int, r_max: int) -> None:
    if num_adapters < 1:
        _fail(op, f"{arg} holds no adapters (L = 0)")
    if r_max < 1:
        _fail(op, f"{arg} has r_max 0; it must be at least 1")


def _check_shrink(op: str, x: Tensor, lora_a: List[Tensor]) -> Tuple[int, int]:
    """(L, r_max) of lora_a, after checking it against x [M, K]."""
    _check_float(op, "x", x)
    L, r_max, _ = lora_a[0].shape
    _check_pool(op, "lora_a", L, r_max)
    for s, a in enumerate(lora_a):
        if tuple(a.shape) != (L, r_max, x.shape[1]):
            _fail(op, f"lora_a[{s}] must have shape ({L}, {r_max}, {x.shape[1]}) = "
                      f"(adapters, r_max, x's features), got {tuple(a.shape)}")
        _check_like(op, f"lora_a[{s}]", a, x)
    return L, r_max


def _check_expand(op: str, y: Tensor, lora_b: List[Tensor], L: int, r_max: int,
                  y_name: str) -> None:
    for s, b in enumerate(lora_b):
        if b.shape[0] != L or b.shape[2] != r_max:
            _fail(op, f"lora_b[{s}] must have shape ({L}, N_slice, {r_max}) = (adapters, slice "
                      f"width, r_max), got {tuple(b.shape)}")
        _check_like(op, f"lora_b[{s}]", b, y, y_name)


# ----------------------------------------------------------------------------------------------
# Triton twins of the C++ ops

def _kernel_args(scalings, ranks, token_adapter, seg_indptr, seg_adapter):
    """(scalings, ranks, index kwargs) in the dtypes the kernels read: float32 and int32. The
    ops take int64 and any float too, as the C++ ones do."""
    index = {"token_adapter": token_adapter, "seg_indptr": seg_indptr, "seg_adapter": seg_adapter}
    index = {k: _as_int32(v) for k, v in index.items()}
    return (None if scalings is None else scalings.to(torch.float32)), _as_int32(ranks), index


@torch.library.custom_op("lora_ops::triton_multi_lora_shrink", mutates_args=())
def _triton_shrink(x: Tensor, lora_a: List[Tensor], scalings: Tensor, ranks: Tensor,
                   token_adapter: Optional[Tensor] = None, seg_indptr: Optional[Tensor] = None,
                   seg_adapter: Optional[Tensor] = None) -> Tensor:
    from lora_ops.triton.multi_lora import multi_lora_shrink
    scalings, ranks, index = _kernel_args(scalings, ranks, token_adapter, seg_indptr, seg_adapter)
    with torch.cuda.device_of(x):  # Triton launches on the current device
        return multi_lora_shrink(x, lora_a, scalings, ranks, **index)


@torch.library.custom_op("lora_ops::triton_multi_lora_expand", mutates_args=("y",))
def _triton_expand(y: Tensor, t: Tensor, lora_b: List[Tensor], slice_offsets: List[int],
                   ranks: Tensor, token_adapter: Optional[Tensor] = None,
                   seg_indptr: Optional[Tensor] = None, seg_adapter: Optional[Tensor] = None) -> None:
    from lora_ops.triton.multi_lora import multi_lora_expand
    _, ranks, index = _kernel_args(None, ranks, token_adapter, seg_indptr, seg_adapter)
    with torch.cuda.device_of(y):
        multi_lora_expand(y, t, lora_b, slice_offsets, ranks, **index)


@torch.library.custom_op("lora_ops::triton_multi_lora_linear_fwd", mutates_args=())
def _triton_linear_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: List[Tensor],
                       lora_b: List[Tensor], slice_offsets: List[int], scalings: Tensor,
                       ranks: Tensor, token_adapter: Optional[Tensor] = None,
                       seg_indptr: Optional[Tensor] = None,
                       seg_adapter: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    from lora_ops.triton.multi_lora import multi_lora_expand, multi_lora_shrink
    scalings, ranks, index = _kernel_args(scalings, ranks, token_adapter, seg_indptr, seg_adapter)
    with torch.cuda.device_of(x):
        t = multi_lora_shrink(x, lora_a, scalings, ranks, **index)
        y = F.linear(x, weight, bias)
        multi_lora_expand(y, t, lora_b, slice_offsets, ranks, **index)
    return y, t


# ----------------------------------------------------------------------------------------------
# Fake impls and autograd, shared by the C++ ops and their Triton twins

def _shrink_fake(x, lora_a, scalings, ranks, token_adapter=None, seg_indptr=None, seg_adapter=None):
    torch._check(x.dim() == 2, lambda: f"multi_lora_shrink: x must be 2-D, got {x.dim()}-D")
    torch._check(len(lora_a) > 0, lambda: "multi_lora_shrink: lora_a is empty")
    return x.new_empty(len(lora_a), x.shape[0], lora_a[0].shape[1], dtype=torch.float32)


def _expand_fake(y, t, lora_b, slice_offsets, ranks, token_adapter=None, seg_indptr=None,
                 seg_adapter=None):
    torch._check(y.dim() == 2, lambda: f"multi_lora_expand: y must be 2-D, got {y.dim()}-D")
    torch._check(t.dim() == 3 and t.shape[1] == y.shape[0],
                 lambda: "multi_lora_expand: t must be [slices, y's rows, r_max]")


def _linear_fwd_fake(x, weight, bias, lora_a, lora_b, slice_offsets, scalings, ranks,
                     token_adapter=None, seg_indptr=None, seg_adapter=None):
    torch._check(x.dim() == 2, lambda: f"multi_lora_linear_fwd: x must be 2-D, got {x.dim()}-D")
    torch._check(x.shape[1] == weight.shape[1],
                 lambda: "multi_lora_linear_fwd: x and weight disagree on K")
    y = x.new_empty(x.shape[0], weight.shape[0])
    return y, x.new_empty(len(lora_a), x.shape[0], lora_a[0].shape[1], dtype=torch.float32)


def _linear_setup_context(ctx, inputs, output):
    (x, weight, bias, lora_a, lora_b, slice_offsets, scalings, ranks,
     token_adapter, seg_indptr, seg_adapter) = inputs
    _, t = output
    # Beyond x (alive anyway) and the frozen weight, the only activation kept is t [S, M, r_max].
    ctx.save_for_backward(x, weight, scalings, ranks, token_adapter, seg_indptr, seg_adapter, t,
                          *lora_a, *lora_b)
    ctx.num_slices = len(lora_a)
    ctx.slice_offsets = list(slice_offsets)


def _linear_dx_fake(dy, weight, lora_a, dt, ranks, token_adapter=None, seg_indptr=None,
                    seg_adapter=None):
    return dy.new_empty(dy.shape[0], weight.shape[1])


def _composed_linear_dx(expand_op):
    """multi_lora_linear_dx from ATen's matmul and `expand_op`: dX = dY W, then += dT_s A_s per
    slice, an expand over A viewed as [L, K, r_max] into all K columns. The CUDA kernel of
    lora_ops::multi_lora_linear_dx (cuBLAS is the fast base GEMM there) and the Triton backend's."""
    def linear_dx(dy, weight, lora_a, dt, ranks, token_adapter=None, seg_indptr=None,
                  seg_adapter=None):
        dx = dy @ weight
        for dt_s, a in zip(dt, lora_a):
            expand_op(dx, dt_s[None], [a.transpose(1, 2)], [0], ranks, token_adapter, seg_indptr,
                      seg_adapter)
        return dx
    return linear_dx


def _adapter_grad_fake(u, v, ranks, rank_dim, token_adapter=None, seg_indptr=None,
                       seg_adapter=None, dtype=None):
    torch._check(u.dim() == 2 and v.dim() == 2,
                 lambda: "multi_lora_adapter_grad: u and v must be 2-D")
    return u.new_empty(ranks.shape[0], u.shape[1], v.shape[1], dtype=dtype or torch.float32)


def _token_gram_plan(num_tokens: int, ranks: Tensor, index: Index) -> "GramPlan":
    """gram_plan of the tokens of one index form, over the len(ranks) adapters."""
    return gram_plan(adapter_of_token(num_tokens, ranks.shape[0], *index), ranks.shape[0])


def _composed_adapter_grad(u, v, ranks, rank_dim, token_adapter=None, seg_indptr=None,
                           seg_adapter=None, dtype=None):
    """multi_lora_adapter_grad from ATen ops (gram_plan, per_adapter_gram): its CUDA kernel."""
    grad = per_adapter_gram(u, v, _token_gram_plan(u.shape[0], ranks,
                                                   (token_adapter, seg_indptr, seg_adapter)))
    within = torch.arange(grad.shape[rank_dim], device=grad.device) < ranks.long()[:, None]
    # [L, r, 1] for rank_dim 1, [L, 1, r] for 2; a select, so nothing past a rank leaks in
    return torch.where(within.unsqueeze(3 - rank_dim), grad, 0.0).to(dtype or torch.float32)


def _planned_adapter_grads(x, dy_slices, dts, t, ranks, index, need_a, need_b):
    """Every slice's dA = dT^T x and dB = dY^T T per adapter, summed in fp32 and returned in
    x's dtype (the parameters'), all from one gram plan."""
    plan = _token_gram_plan(x.shape[0], ranks, index)
    d_a = [per_adapter_gram(dt, x, plan).to(x.dtype) if need else None
           for dt, need in zip(dts, need_a)]
    d_b = [per_adapter_gram(dy_s, t_s, plan).to(x.dtype) if need else None
           for dy_s, t_s, need in zip(dy_slices, t, need_b)]
    return d_a, d_b


def _make_linear_backward(shrink_op, dx_op):
    """The backward of a multi_lora_linear_fwd op; dx_op has multi_lora_linear_dx's signature.
    (The C++ op's autograd for CPU tensors is csrc/torch_multi_lora_autograd.cpp, the same
    formula with multi_lora_adapter_grad for the weight gradients.)"""
    def backward(ctx, dy, _dt):
        x, weight, scalings, ranks, token_adapter, seg_indptr, seg_adapter, t, *stacks = ctx.saved_tensors
        lora_a, lora_b = stacks[:ctx.num_slices], stacks[ctx.num_slices:]
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        if torch.is_grad_enabled() and any(g.requires_grad for g in (dy, x, weight, *stacks)):
            # The ops below have no derivatives: second-order terms would silently go missing.
            raise RuntimeError("multi_lora_linear: double backward is not supported (backward or "
                               "autograd.grad with create_graph=True through it); call it "
                               "without create_graph")
        index = (token_adapter, seg_indptr, seg_adapter)
        dy = dy.contiguous()
        widths = [b.shape[1] for b in lora_b]
        dy_slices = [dy[:, off:off + w] for off, w in zip(ctx.slice_offsets, widths)]
        # dT = s * dY B per slice: a shrink over B viewed as [L, r_max, N_slice].
        dts = [shrink_op(dy_s, [b.transpose(1, 2)], scalings, ranks, *index)[0]
               for dy_s, b in zip(dy_slices, lora_b)] if (need_x or any(need_a)) else None
        dx = dx_op(dy, weight, list(lora_a), torch.stack(dts), ranks, *index) if need_x else None
        d_a = [None] * len(lora_a)
        d_b = [None] * len(lora_b)
        if any(need_a) or any(need_b):
            # In x's dtype, which the op requires of every stack.
            d_a, d_b = _planned_adapter_grads(x, dy_slices, dts or d_a, t, ranks, index, need_a,
                                              need_b)
        # The base is meant to be frozen; if it is trainable anyway its gradients are the
        # plain linear ones (the adapter term does not depend on W or b).
        dw = (dy.t() @ x).to(weight.dtype) if need_w else None
        dbias = dy.sum(0) if need_bias else None
        grads = (dx, dw, dbias, d_a, d_b, None, None, None, None, None, None)
        # One per input the op was called with: the dispatcher drops trailing index arguments
        # left at their default (None), and torch 2.11's custom-op autograd refuses extra
        # gradients where later releases ignore them. needs_input_grad has the call's length.
        return grads[:len(ctx.needs_input_grad)]
    return backward


def _register(prefix: str) -> None:
    register_fake(f"lora_ops::{prefix}multi_lora_shrink", _shrink_fake)
    register_fake(f"lora_ops::{prefix}multi_lora_expand", _expand_fake)
    register_fake(f"lora_ops::{prefix}multi_lora_linear_fwd", _linear_fwd_fake)
    expand_op = getattr(torch.ops.lora_ops, f"{prefix}multi_lora_expand")
    if prefix:  # Triton: dX composed of ATen's matmul and the Triton expand
        dx_op = _composed_linear_dx(expand_op)
    else:
        # The compiled library: one op, with a C++ kernel on CPU (the kernels' own GEMM; ATen's
        # CPU matmul is slower, in fp16/bf16 by orders of magnitude) and the composition on CUDA.
        register_fake("lora_ops::multi_lora_linear_dx", _linear_dx_fake)
        torch.library.register_kernel("lora_ops::multi_lora_linear_dx", "cuda")(
            _composed_linear_dx(expand_op))
        dx_op = torch.ops.lora_ops.multi_lora_linear_dx
        register_fake("lora_ops::multi_lora_adapter_grad", _adapter_grad_fake)
        torch.library.register_kernel("lora_ops::multi_lora_adapter_grad", "cuda")(
            _composed_adapter_grad)
    # For the C++ op this serves CUDA tensors: CPU ones have a C++ autograd kernel (AutogradCPU).
    torch.library.register_autograd(
        f"lora_ops::{prefix}multi_lora_linear_fwd",
        _make_linear_backward(getattr(torch.ops.lora_ops, f"{prefix}multi_lora_shrink"), dx_op),
        setup_context=_linear_setup_context)


_register("triton_")
if _backend.compiled():
    _register("")


def _op(backend: str, name: str):
    # The overload, not the packet: a packet's call resolves the overload anew (~1.5 µs).
    return getattr(torch.ops.lora_ops, ("triton_" if backend == "triton" else "") + name).default


def shrink_op(backend: str):
    """The shrink op of a compiled or Triton backend (for tests and benchmarks)."""
    return _op(backend, "multi_lora_shrink")


def expand_op(backend: str):
    """The expand op of a compiled or Triton backend (for tests and benchmarks)."""
    return _op(backend, "multi_lora_expand")


def linear_fwd_op(backend: str):
    """The fused forward op of a compiled or Triton backend (for tests and benchmarks)."""
    return _op(backend, "multi_lora_linear_fwd")


# ----------------------------------------------------------------------------------------------
# Index helpers

def segments_from_token_adapter(token_adapter: Tensor,
                                num_adapters: int) -> Tuple[Tensor, Tensor, Tensor]:
    """The segment form of per-token indices: (perm, seg_indptr, seg_adapter).

    perm (int64 [M]) orders the tokens by adapter (stable); after it, adapter a's tokens are rows
    seg_indptr[a] .. seg_indptr[a+1]-1 and the base-only ones (-1 or out of range) come last.
    seg_adapter is [0, 1, ..., L-1, -1] (int32 [L+1]), seg_indptr int32 [L+2]; empty segments
    stay. All shapes depend on M and L only, and nothing waits on the device. Use:
    `x[perm]` in segment order; `y.index_copy_(0, perm, y_sorted)` back.
    """
    if not isinstance(token_adapter, Tensor) or token_adapter.dim() != 1:
        raise ValueError(f"segments_from_token_adapter: token_adapter must be a 1-D Tensor, "
                         f"got {token_adapter!r:.200}")
    if token_adapter.dtype not in _INDEX_DTYPES:
        raise ValueError(f"segments_from_token_adapter: token_adapter must be int32 or int64, "
                         f"got {token_adapter.dtype}")
    if isinstance(num_adapters, bool) or not isinstance(num_adapters, (int, torch.SymInt)) \
            or num_adapters < 0:
        raise ValueError(f"segments_from_token_adapter: num_adapters must be an int >= 0, "
                         f"got {num_adapters!r}")
    device = token_adapter.device
    key = token_adapter.long()
    key = torch.where((key >= 0) & (key < num_adapters), key, num_adapters)
    sorted_key, perm = torch.sort(key, stable=True)
    seg_indptr = torch.searchsorted(sorted_key, torch.arange(num_adapters + 2, device=device))
    seg_adapter = torch.arange(num_adapters + 1, device=device, dtype=torch.int32)
    seg_adapter[num_adapters] = -1
    return perm, seg_indptr.to(torch.int32), seg_adapter


# Rows of the token tiles the weight gradients are cut into (see gram_plan): at most the larger
# (a bmm batch of fewer rows than this runs well below the GEMM rate), at least the smaller.
_GRAM_TILE_MAX = 64
_GRAM_TILE_MIN = 4


class GramPlan(NamedTuple):
    """How per-adapter sums over tokens are cut into fixed-shape batches (see gram_plan)."""
    token: Tensor          # int64 [pieces, tile]: the token at each row of each piece
    inside: Tensor         # bool [pieces, tile, 1]: the row belongs to the piece
    piece_adapter: Tensor  # int64 [pieces]: the adapter a piece sums into (L: unused piece)
    num_adapters: int


def gram_tile_and_pieces(num_tokens: int, num_adapters: int) -> Tuple[int, int]:
    """(tile, pieces) of gram_plan: the rows of a piece and a bound on the pieces, from sizes
    known on the host.

    The tokens, sorted by adapter, form at most n = min(L, M) non-empty segments cut into
    ceil(M / tile) tiles; a piece is a (tile, segment) overlap, so there are at most
    ceil(M / tile) + n - 1 of them, and the rows computed are at most M + (n - 1) tile. A tile of
    about M / n rows keeps that under ~2M rows of work with ~2n batches. (A bound of
    ceil(M / tile) + L pieces of 64 rows did 17x the work at M = 64, L = 16, and ~1000x for a
    pool of 1000 adapters.)
    """
    M, L = num_tokens, num_adapters
    segments = max(1, min(L, M))
    tile = max(1, min(M, _GRAM_TILE_MAX, max(_GRAM_TILE_MIN, M // segments)))  # 1 when M = 0
    return tile, -(-M // tile) + segments - 1


def gram_plan(adapter: Tensor, num_adapters: int) -> GramPlan:
    """Tokens sorted by adapter, cut into tiles (gram_tile_and_pieces); each (tile, adapter)
    piece becomes one batch of a bmm. The bound on the pieces is known on the host, so every
    shape is fixed and nothing syncs; unused pieces sum zeros into a spare slot.
    adapter: [M] in [-1, L).
    """
    M, L, device = adapter.shape[0], num_adapters, adapter.device
    if M == 0 or L == 0:
        none = torch.zeros(0, 1, dtype=torch.int64, device=device)
        return GramPlan(none, none.bool()[..., None], none[:, 0], L)
    tile, max_pieces = gram_tile_and_pieces(M, L)
    perm, seg_indptr, _ = segments_from_token_adapter(adapter, L)
    start, end = seg_indptr[:L].long(), seg_indptr[1:L + 1].long()
    first_tile = start // tile
    pieces = torch.where(end > start, (end - 1) // tile - first_tile + 1, 0)
    pieces_end = torch.cumsum(pieces, 0)
    p = torch.arange(max_pieces, device=device)
    piece_adapter = torch.searchsorted(pieces_end, p, right=True)
    a = piece_adapter.clamp(max=L - 1)
    piece_tile = first_tile[a] + p - (pieces_end[a] - pieces[a])
    rows = piece_tile[:, None] * tile + torch.arange(tile, device=device)[None, :]
    inside = (rows >= start[a][:, None]) & (rows < end[a][:, None]) & (piece_adapter < L)[:, None]
    return GramPlan(perm[rows.clamp(0, M - 1)], inside[..., None], piece_adapter, L)


def per_adapter_gram(u: Tensor, v: Tensor, plan: GramPlan) -> Tensor:
    """fp32 [L, P, Q]: for each adapter a, the sum over its tokens i of u_i^T v_i (u [M, P],
    v [M, Q]); the per-adapter weight gradients dA = dT^T x and dB = dY^T T."""
    L = plan.num_adapters
    out = torch.zeros(L + 1, u.shape[1], v.shape[1], dtype=torch.float32, device=u.device)
    u_pieces = torch.where(plan.inside, u[plan.token].float(), 0)
    v_pieces = torch.where(plan.inside, v[plan.token].float(), 0)
    out.index_add_(0, plan.piece_adapter, torch.bmm(u_pieces.transpose(1, 2), v_pieces))
    return out[:L]


# ----------------------------------------------------------------------------------------------
# Public functions

def _checked_on_refusal(run, check):
    """run() calls a compiled op, which checks shapes, dtypes, devices and slices itself (a
    decode-sized call spent 1-3x the op's time in this module's Python checks); only if it
    refuses does check() run them, to raise the error worded for the caller's arguments."""
    try:
        return run()
    except _backend.OP_REFUSALS:
        check()
        raise


def _check_index_values(op: str, index: Index, num_adapters: int, r_max: int, ranks: Tensor,
                        num_tokens: int, device: torch.device) -> None:
    """The values of a compiled op's call, checked where they may be read (_values_readable):
    adapter indices by the public functions' own rule, which the ops do not have (they take an
    index outside [-1, L) as -1); on a GPU (LORA_OPS_SYNC_CHECKS=1) the ranks and segment bounds
    too, which the CPU ops check themselves and the GPU ones clamp."""
    if not _values_readable(device):
        return
    token_adapter, seg_indptr, seg_adapter = index
    if token_adapter is not None:
        _check_adapter_values(op, "token_adapter", token_adapter, num_adapters)
    elif seg_adapter is not None:
        _check_adapter_values(op, "seg_adapter", seg_adapter, num_adapters)
    if device.type != "cpu":
        if seg_indptr is not None:
            _check_segment_bounds(op, seg_indptr, num_tokens)
        _check_rank_values(op, ranks, r_max)


def _stack_list(stacks: Stacks) -> List[Tensor]:
    return [stacks] if isinstance(stacks, Tensor) else list(stacks)


def _kernel_index(index: Index) -> Index:
    return tuple(_as_int32(t) for t in index)


def _tokens_2d(op: str, arg: str, t: Tensor, weight: Optional[Tensor] = None) -> Tensor:
    """t [..., features] as rows, with as many features as weight [N, K] has columns if given."""
    if not isinstance(t, Tensor):
        _fail(op, f"{arg} must be a Tensor, got {type(t).__name__}")
    if t.dim() < 1:
        _fail(op, f"{arg} must have at least 1 dimension (features last), got a 0-D tensor")
    if weight is not None and t.shape[-1] != weight.shape[1]:
        _fail(op, f"{arg} has {t.shape[-1]} features but weight has {weight.shape[1]} columns "
                  f"(weight shape {tuple(weight.shape)})")
    return tokens_2d(t)


def lora_shrink(x: Tensor, lora_a: Stacks, scalings: Tensor, ranks: Tensor, *,
                token_adapter: Optional[Tensor] = None, seg_indptr: Optional[Tensor] = None,
                seg_adapter: Optional[Tensor] = None, backend: Optional[str] = None) -> Tensor:
    """t [S, M, r_max] fp32: t[s, i] = scalings[a_i] * x_i lora_a[s][a_i]^T over a_i's rank, 0 elsewhere.

    x [..., K] (M = the product of its leading dims); lora_a: a stack [L, r_max, K] or a list of
    S of them (packed slices); scalings float [L]; ranks int [L] (each <= r_max). One index
    form: token_adapter [M], or seg_indptr [S+1] with seg_adapter [S] (over the flattened
    tokens); -1 means base only. Not differentiable (multi_lora_linear is).
    """
    op = "lora_shrink"
    index = (token_adapter, seg_indptr, seg_adapter)

    def checked():
        x_cast, lora_a_cast = autocast_operands(x, lora_a)
        x2d = _tokens_2d(op, "x", x_cast)
        stacks = _as_stacks(op, "lora_a", lora_a_cast)
        L, r_max = _check_shrink(op, x2d, stacks)
        _check_adapters(op, scalings, ranks, L, r_max, x.device)
        return x2d, stacks, _check_index(op, x2d.shape[0], L, *index, x.device)

    chosen = _backend.compiled_backend(op, backend, x)
    if chosen is not None:
        def run():
            stacks = _stack_list(lora_a)
            x2d = x if x.dim() == 2 else tokens_2d(x)
            _check_index_values(op, index, stacks[0].shape[0], stacks[0].shape[1], ranks,
                                x2d.shape[0], x.device)
            return shrink_op(chosen)(x2d, stacks, _as_float32(scalings), _as_int32(ranks),
                                     *_kernel_index(index))
        return _checked_on_refusal(run, checked)
    if isinstance(x, Tensor) and autocast_dtype(x.device) is not None:
        return call_cast(lora_shrink, (x, lora_a), scalings, ranks, token_adapter=token_adapter,
                         seg_indptr=seg_indptr, seg_adapter=seg_adapter, backend=backend)
    x2d, stacks, index = checked()
    chosen = _backend.resolve_backend(op, backend, x.device)
    if chosen == "reference":
        return reference.multi_lora_shrink(x2d, stacks, scalings, ranks, token_adapter=index[0],
                                           seg_indptr=index[1], seg_adapter=index[2])
    return shrink_op(chosen)(x2d, stacks, _as_float32(scalings), _as_int32(ranks), *index)


def lora_expand(y: Tensor, t: Tensor, lora_b: Stacks, ranks: Tensor, *,
                slice_offsets: Optional[Sequence[int]] = None, token_adapter: Optional[Tensor] = None,
                seg_indptr: Optional[Tensor] = None, seg_adapter: Optional[Tensor] = None,
                backend: Optional[str] = None) -> Tensor:
    """y[i, off_s : off_s + N_s] += t[s, i] lora_b[s][a_i]^T over a_i's rank, in place; returns y.

    y [..., N] (its tokens must be viewable as [M, N]); t [S, M, r_max] fp32 (as lora_shrink
    returns it); lora_b: a stack [L, N_s, r_max] or a list of S of them; slice_offsets: the
    first column of each slice in y (default: packed from column 0). Rows whose adapter is -1
    are left untouched. Not differentiable.
    """
    op = "lora_expand"
    index = (token_adapter, seg_indptr, seg_adapter)

    def checked():
        if not isinstance(y, Tensor) or y.dim() < 1:
            _fail(op, f"y must be a Tensor with features last, got {y!r:.200}")
        try:
            y2d = y.view(-1, y.shape[-1])
        except RuntimeError:
            _fail(op, f"y (shape {tuple(y.shape)}, strides {y.stride()}) must be viewable as "
                      f"[tokens, features] to be written in place")
        _check_float(op, "y", y)
        stacks = _as_stacks(op, "lora_b", lora_b)
        L, r_max = stacks[0].shape[0], stacks[0].shape[2]
        _check_pool(op, "lora_b", L, r_max)
        _check_expand(op, y, stacks, L, r_max, "y")
        t_shape = (len(stacks), y2d.shape[0], r_max)
        if not isinstance(t, Tensor) or t.dtype != torch.float32 or tuple(t.shape) != t_shape:
            _fail(op, f"t must be float32 of shape ({len(stacks)}, {y2d.shape[0]}, {r_max}) = "
                      f"(slices, y's tokens, r_max), got {getattr(t, 'dtype', type(t).__name__)} "
                      f"{tuple(getattr(t, 'shape', ()))}")
        if t.device != y.device:
            _fail(op, f"t is on {t.device} but y is on {y.device}")
        offsets = _check_slices(op, stacks, slice_offsets, y2d.shape[1], cover=False)
        _check_adapters(op, None, ranks, L, r_max, y.device)
        return y2d, stacks, offsets, _check_index(op, y2d.shape[0], L, *index, y.device)

    chosen = _backend.compiled_backend(op, backend, y)
    if chosen is not None:
        def run():
            stacks = _stack_list(lora_b)
            y2d = y if y.dim() == 2 else y.view(-1, y.shape[-1])
            _check_index_values(op, index, stacks[0].shape[0], stacks[0].shape[2], ranks,
                                y2d.shape[0], y.device)
            expand_op(chosen)(y2d, t, stacks, _slice_offsets(stacks, slice_offsets),
                              _as_int32(ranks), *_kernel_index(index))
        _checked_on_refusal(run, checked)
        return y
    y2d, stacks, offsets, index = checked()
    chosen = _backend.resolve_backend(op, backend, y.device)
    if chosen == "reference":
        reference.multi_lora_expand(y2d, t, stacks, offsets, ranks, token_adapter=index[0],
                                    seg_indptr=index[1], seg_adapter=index[2])
    else:
        expand_op(chosen)(y2d, t, stacks, offsets, _as_int32(ranks), *index)
    return y


def _slice_offsets(b_stacks: List[Tensor], slice_offsets: Optional[Sequence[int]]) -> List[int]:
    """The given offsets as ints, or the slices packed one after another from column 0."""
    if slice_offsets is not None:
        return [int(o) for o in slice_offsets]
    offsets, end = [], 0
    for b in b_stacks:
        offsets.append(end)
        end += b.shape[1]
    return offsets


def multi_lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Stacks,
                      lora_b: Stacks, scalings: Tensor, ranks: Tensor, *,
                      token_adapter: Optional[Tensor] = None, seg_indptr: Optional[Tensor] = None,
                      seg_adapter: Optional[Tensor] = None,
                      slice_offsets: Optional[Sequence[int]] = None,
                      backend: Optional[str] = None) -> Tensor:
    """y = x W^T + b + for every slice s: y[:, off_s : off_s + N_s] += t_s B_s[a_i]^T, with
    t_s = scalings[a_i] * x A_s[a_i]^T over a_i's rank; one fused op.

    x [..., K]; weight [N, K]; bias [N] or None; lora_a: [L, r_max, K] or a list of S of them;
    lora_b: [L, N_s, r_max] or a list of S of them, whose columns start at `slice_offsets`
    (default: packed from column 0) and together tile the N output columns; scalings float [L];
    ranks int [L]; one index form over the flattened tokens (-1: base only). All floating operands
    share x's dtype (float32, float16, bfloat16) and device. Differentiable for x, lora_a and
    lora_b: each adapter's gradient is the one it would get trained alone on its own tokens
    (and for weight and bias, if they require grad).
    """
    op = "multi_lora_linear"
    index = (token_adapter, seg_indptr, seg_adapter)
    chosen = _backend.compiled_backend(op, backend, x)
    if chosen is not None:
        # Inline rather than through _checked_on_refusal: every call and closure here shows in a
        # decode step's time (Python between op calls also evicts the op's code from cache).
        try:
            return _compiled_linear(linear_fwd_op(chosen), x, weight, bias, lora_a, lora_b,
                                    scalings, ranks, index, slice_offsets)
        except _backend.OP_REFUSALS:
            _checked_linear_args(*autocast_operands(x, weight, bias, lora_a, lora_b), scalings,
                                 ranks, index, slice_offsets)
            raise
    if isinstance(x, Tensor) and autocast_dtype(x.device) is not None:
        return call_cast(multi_lora_linear, (x, weight, bias, lora_a, lora_b), scalings, ranks,
                         token_adapter=token_adapter, seg_indptr=seg_indptr,
                         seg_adapter=seg_adapter, slice_offsets=slice_offsets, backend=backend)
    x2d, a_stacks, b_stacks, offsets, index = _checked_linear_args(
        x, weight, bias, lora_a, lora_b, scalings, ranks, index, slice_offsets)
    chosen = _backend.resolve_backend(op, backend, x.device)
    if chosen == "reference":
        y2d = reference.multi_lora_linear(x2d, weight, bias, a_stacks, b_stacks, offsets, scalings,
                                          ranks, token_adapter=index[0], seg_indptr=index[1],
                                          seg_adapter=index[2])
    else:
        y2d = _run_linear_fwd(linear_fwd_op(chosen), x2d, weight, bias, a_stacks, b_stacks,
                              offsets, scalings, ranks, index)
    return y2d.reshape(*x.shape[:-1], weight.shape[0])


def _checked_linear_args(x, weight, bias, lora_a, lora_b, scalings, ranks, index, slice_offsets):
    """multi_lora_linear's arguments checked (clear errors naming the argument): x as tokens, the
    stacks as lists, the slice offsets and the index as the kernels read it."""
    op = "multi_lora_linear"
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        _fail(op, f"weight must be a 2-D Tensor [N, K], got {weight!r:.200}")
    N, K = weight.shape
    x2d = _tokens_2d(op, "x", x, weight)
    _check_like(op, "weight", weight, x2d)
    if bias is not None:
        if not isinstance(bias, Tensor) or tuple(bias.shape) != (N,):
            _fail(op, f"bias must be a Tensor of shape ({N},) (weight has {N} rows), got "
                      f"{tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__}")
        _check_like(op, "bias", bias, x2d)
    a_stacks = _as_stacks(op, "lora_a", lora_a)
    b_stacks = _as_stacks(op, "lora_b", lora_b)
    if len(a_stacks) != len(b_stacks):
        _fail(op, f"lora_a has {len(a_stacks)} slices but lora_b has {len(b_stacks)}")
    L, r_max = _check_shrink(op, x2d, a_stacks)
    _check_expand(op, x2d, b_stacks, L, r_max, "x")
    offsets = _check_slices(op, b_stacks, slice_offsets, N, cover=True)
    _check_adapters(op, scalings, ranks, L, r_max, x.device)
    index = _check_index(op, x2d.shape[0], L, *index, x.device)
    return x2d, a_stacks, b_stacks, offsets, index


def _compiled_linear(fwd_op, x, weight, bias, lora_a, lora_b, scalings, ranks, index,
                     slice_offsets) -> Tensor:
    """multi_lora_linear on a compiled backend, its arguments checked by the op itself, but for
    the values _check_index_values checks."""
    a_stacks = [lora_a] if isinstance(lora_a, Tensor) else list(lora_a)
    b_stacks = [lora_b] if isinstance(lora_b, Tensor) else list(lora_b)
    x2d = x if x.dim() == 2 else tokens_2d(x)
    _check_index_values("multi_lora_linear", index, a_stacks[0].shape[0], a_stacks[0].shape[1],
                        ranks, x2d.shape[0], x.device)
    token_adapter, seg_indptr, seg_adapter = index
    y2d = _run_linear_fwd(fwd_op, x2d, weight, bias, a_stacks, b_stacks,
                          _slice_offsets(b_stacks, slice_offsets), scalings, ranks,
                          (_as_int32(token_adapter), _as_int32(seg_indptr), _as_int32(seg_adapter)))
    return y2d if x.dim() == 2 else y2d.reshape(*x.shape[:-1], weight.shape[0])


_INT32_RANGE = (torch.iinfo(torch.int32).min, torch.iinfo(torch.int32).max)


def _as_int32(t: Optional[Tensor]) -> Optional[Tensor]:
    """An int64 index or rank tensor as the kernels' int32; anything else as it is, for the op
    to accept or refuse. Values beyond int32 saturate rather than wrap: every rule applied to
    them (an adapter index outside [0, L) is no adapter; a rank above r_max is refused on the
    CPU and clamped on a GPU; a segment bound past M is refused) compares them with numbers
    within int32, which saturation preserves and wrapping does not (2**32 + 1 would become
    adapter 1)."""
    if t is None or t.dtype != torch.int64:
        return t
    return t.clamp(*_INT32_RANGE).to(torch.int32)


def _as_float32(t: Tensor) -> Tensor:
    """Floating scalings as the kernels' float32; anything else as it is, for the op to refuse."""
    return t.to(torch.float32) if t.dtype != torch.float32 and t.dtype.is_floating_point else t


def _run_linear_fwd(fwd_op, x2d, weight, bias, a_stacks, b_stacks, offsets, scalings, ranks,
                    index) -> Tensor:
    """y [M, N] from the fused forward op of a compiled or Triton backend, through its autograd
    only when a gradient is wanted."""
    args = (x2d, weight, bias, a_stacks, b_stacks, offsets,
            _as_float32(scalings), _as_int32(ranks), *index)
    if _records_autograd(x2d, weight, bias, *a_stacks, *b_stacks):
        y2d, _ = fwd_op(*args)
    else:
        # Nothing to differentiate: straight to the kernel. For CUDA tensors and the Triton
        # twin this skips the Python autograd layer of torch.library (on CPU, before the C++
        # autograd kernel, it was half a decode-sized call); the C++ one passes through alike.
        with torch._C._AutoDispatchBelowAutograd():
            y2d, _ = fwd_op(*args)
    return y2d


def _records_autograd(*tensors: Optional[Tensor]) -> bool:
    """Whether a call on these tensors must go through the op's autograd (always while
    torch.compile traces: it sees the op whole)."""
    if torch.compiler.is_compiling():
        return True
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
