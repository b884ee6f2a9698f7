"""Pure-PyTorch single-adapter LoRA linear: the oracle the tests hold every backend to.

Low-precision inputs are computed in fp32 and the adapter activation S is rounded to the input
dtype before it is used, as the kernels do (they save S in the input dtype); fp64 inputs stay
fp64, which is how the tests build their oracle.
"""
from typing import Optional, Tuple, Union

import torch

from lora_ops.reference.dropout import apply_dropout, dropout_keep_mask
from lora_ops.reference.tokens import tokens_2d

# An int, or the ops' seed tensor (lora_ops/dropout_seed.py); None where dropout_p is 0.
Seed = Union[int, torch.Tensor, None]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                dropout_p: float = 0.0, seed: Seed = 0) -> torch.Tensor:
    """y = x W^T + b + scaling * (drop(x) A^T) B^T for x [..., K]; differentiable by autograd."""
    y2d, _ = lora_linear_fwd(tokens_2d(x), weight, bias, lora_a, lora_b,
                             scaling, dropout_p, seed)
    return y2d.reshape(*x.shape[:-1], weight.shape[0])


def lora_linear_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                    dropout_p: float, seed: Seed) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y, S) for 2-D x, with the semantics of the `lora_ops::lora_linear_fwd` op."""
    dtype = x.dtype
    cdt = _compute_dtype(dtype)
    xc = x.to(cdt)
    s = (apply_dropout(xc, seed, dropout_p) @ lora_a.to(cdt).t()).to(dtype)
    y = xc @ weight.to(cdt).t() + scaling * (s.to(cdt) @ lora_b.to(cdt).t())
    if bias is not None:
        y = y + bias.to(cdt)
    return y.to(dtype), s


def lora_linear_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                    lora_a: torch.Tensor, lora_b: torch.Tensor, s: torch.Tensor,
                    scaling: float, dropout_p: float, seed: Seed,
                    output_mask=(True, True, True)):
    """(dx, d_lora_a, d_lora_b) by the closed-form backward of DESIGN.md, for 2-D dy and x."""
    dtype = x.dtype
    cdt = _compute_dtype(dtype)
    dyc, xc = dy.to(cdt), x.to(cdt)
    a, b = lora_a.to(cdt), lora_b.to(cdt)
    ds = scaling * (dyc @ b)
    empty = x.new_empty(0)
    dx = d_a = d_b = empty
    if output_mask[0]:
        adapter_dx = ds @ a
        if dropout_p > 0.0:
            keep = dropout_keep_mask(seed, x.shape[0], x.shape[1], dropout_p, x.device)
            adapter_dx = torch.where(keep, adapter_dx / (1.0 - dropout_p), torch.zeros((), dtype=cdt, device=x.device))
        dx = (dyc @ weight.to(cdt) + adapter_dx).to(dtype)
    if output_mask[1]:
        d_a = (ds.t() @ apply_dropout(xc, seed, dropout_p)).to(lora_a.dtype)
    if output_mask[2]:
        d_b = (scaling * (dyc.t() @ s.to(cdt))).to(lora_b.dtype)
    return dx, d_a, d_b
