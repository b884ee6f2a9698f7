"""Pure-PyTorch multi-adapter LoRA: the oracle of the multi-adapter kernels, and their
`reference` backend.

It is also the definition of what an adapter index means (see kernels.h and common.h):
  - token i uses adapter a_i from `token_adapter[i]`, or from the segment holding row i
    (`seg_indptr[s] <= i < seg_indptr[s+1]` uses `seg_adapter[s]`);
  - a_i == -1, a_i outside [0, L), and rows outside every segment all mean "base only";
  - an adapter's rank is `ranks[a]` clamped into [0, r_max]; rows of lora_a and columns of
    lora_b past it are never used, so they may hold anything, NaN included.

Every adapter is computed at once through one GEMM against all L stacked adapters and a gather
of each token's block: fixed shapes, no host sync, and differentiable by autograd, so its
gradients are an oracle independent of the kernels' backward. It costs L times the adapter
FLOPs of the kernels (fine for an oracle and a fallback). Tokens are placed in their adapter's
block with torch.where, never multiplied by a 0/1 mask, so a token's NaN or inf stays out of
the other adapters' outputs and lora_b gradients; it does reach the other adapters' lora_a
gradients (0 * inf in the one GEMM's backward), where the kernels keep it to the token's own
adapter: keeping it out here would take a copy of x per adapter. Low-precision inputs are computed
in fp32 (t stays fp32, as the kernels keep it); fp64 inputs stay fp64, which is how the tests
build their oracle.
"""
from typing import List, Optional, Sequence

import torch
from torch import Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def adapter_of_token(num_tokens: int, num_adapters: int, token_adapter: Optional[Tensor] = None,
                     seg_indptr: Optional[Tensor] = None,
                     seg_adapter: Optional[Tensor] = None) -> Tensor:
    """The adapter of every token as int64 [num_tokens], -1 where it gets no adapter.

    `seg_indptr` must be non-decreasing (a precondition of the segment form).
    """
    if token_adapter is not None:
        adapter = token_adapter.long()
    else:
        rows = torch.arange(num_tokens, device=seg_indptr.device)
        num_segments = seg_adapter.shape[0]
        seg = torch.searchsorted(seg_indptr.long(), rows, right=True) - 1
        in_segment = (seg >= 0) & (seg < num_segments)
        adapter = seg_adapter.long()[seg.clamp(0, max(num_segments - 1, 0))] if num_segments \
            else torch.full_like(rows, -1)
        adapter = torch.where(in_segment, adapter, -1)
    return torch.where((adapter >= 0) & (adapter < num_adapters), adapter, -1)


def _rank_mask(ranks: Tensor, r_max: int) -> Tensor:
    """[L, r_max] bool: column j of adapter a is within its rank."""
    return torch.arange(r_max, device=ranks.device)[None, :] < ranks.long()[:, None]


def _token_blocks(t: Tensor, adapter: Tensor, num_adapters: int) -> Tensor:
    """t [M, r_max] placed in its token's adapter block of an [M, L * r_max] matrix (zeros elsewhere)."""
    M, r_max = t.shape
    onehot = adapter[:, None] == torch.arange(num_adapters, device=t.device)[None, :]
    return torch.where(onehot[:, :, None], t[:, None, :], 0).reshape(M, num_adapters * r_max)


def _shrink(x: Tensor, lora_a: Sequence[Tensor], scalings: Tensor, keep: Tensor,
            adapter: Tensor, cdt: torch.dtype) -> Tensor:
    M, K = x.shape
    L, r_max = keep.shape
    active = adapter >= 0
    slot = adapter.clamp(min=0)
    token_keep = keep[slot] & active[:, None]
    token_scaling = scalings.to(cdt)[slot][:, None]
    xc = x.to(cdt)
    out = []
    for a in lora_a:
        a_used = torch.where(keep[:, :, None], a.to(cdt), 0)
        every_adapter = (xc @ a_used.reshape(L * r_max, K).t()).reshape(M, L, r_max)
        own = every_adapter.gather(1, slot[:, None, None].expand(M, 1, r_max)).squeeze(1)
        out.append(torch.where(token_keep, own * token_scaling, 0))
    return torch.stack(out) if out else xc.new_zeros(0, M, r_max)


def _expand_deltas(t: Tensor, lora_b: Sequence[Tensor], keep: Tensor, adapter: Tensor,
                   cdt: torch.dtype) -> List[Tensor]:
    """Per slice, the term added to y: [M, N_s] = t_i B_{a_i}^T over each adapter's rank."""
    L, r_max = keep.shape
    token_keep = keep[adapter.clamp(min=0)] & (adapter >= 0)[:, None]
    deltas = []
    for s, b in enumerate(lora_b):
        t_used = torch.where(token_keep, t[s].to(cdt), 0)
        b_used = torch.where(keep[:, None, :], b.to(cdt), 0)
        b_rows = b_used.permute(0, 2, 1).reshape(L * r_max, b.shape[1])
        deltas.append(_token_blocks(t_used, adapter, L) @ b_rows)
    return deltas


def multi_lora_shrink(x: Tensor, lora_a: Sequence[Tensor], scalings: Tensor, ranks: Tensor, *,
                      token_adapter: Optional[Tensor] = None, seg_indptr: Optional[Tensor] = None,
                      seg_adapter: Optional[Tensor] = None) -> Tensor:
    """t [S, M, r_max]: t[s, i, j] = scalings[a_i] * x_i . lora_a[s][a_i, j] for j < rank, else 0.

    x [M, K]; lora_a: S stacks [L, r_max, K]. fp32 (fp64 for fp64 inputs).
    """
    L, r_max = lora_a[0].shape[0], lora_a[0].shape[1]
    keep = _rank_mask(ranks, r_max)
    adapter = adapter_of_token(x.shape[0], L, token_adapter, seg_indptr, seg_adapter)
    return _shrink(x, lora_a, scalings, keep, adapter, _compute_dtype(x.dtype))


def multi_lora_expand(y: Tensor, t: Tensor, lora_b: Sequence[Tensor], slice_offsets: Sequence[int],
                      ranks: Tensor, *, token_adapter: Optional[Tensor] = None,
                      seg_indptr: Optional[Tensor] = None,
                      seg_adapter: Optional[Tensor] = None) -> Tensor:
    """y[i, off_s : off_s + N_s] += t[s, i] lora_b[s][a_i]^T over the rank, in place; returns y.

    y [M, N]; t [S, M, r_max]; lora_b: S stacks [L, N_s, r_max]. Rows without an adapter are
    left untouched (bit for bit).
    """
    L, r_max = lora_b[0].shape[0], lora_b[0].shape[2]
    keep = _rank_mask(ranks, r_max)
    adapter = adapter_of_token(y.shape[0], L, token_adapter, seg_indptr, seg_adapter)
    cdt = _compute_dtype(y.dtype)
    active = (adapter >= 0)[:, None]
    for off, b, delta in zip(slice_offsets, lora_b, _expand_deltas(t, lora_b, keep, adapter, cdt)):
        part = y[:, off:off + b.shape[1]]
        part.copy_(torch.where(active, (part.to(cdt) + delta).to(y.dtype), part))
    return y


def multi_lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Sequence[Tensor],
                      lora_b: Sequence[Tensor], slice_offsets: Sequence[int], scalings: Tensor,
                      ranks: Tensor, *, token_adapter: Optional[Tensor] = None,
                      seg_indptr: Optional[Tensor] = None,
                      seg_adapter: Optional[Tensor] = None) -> Tensor:
    """y = x W^T + b + the multi-adapter term of every slice, for 2-D x; differentiable by autograd.

    Rounded to x's dtype once, at the end.
    """
    cdt = _compute_dtype(x.dtype)
    L, r_max = lora_a[0].shape[0], lora_a[0].shape[1]
    keep = _rank_mask(ranks, r_max)
    adapter = adapter_of_token(x.shape[0], L, token_adapter, seg_indptr, seg_adapter)
    t = _shrink(x, lora_a, scalings, keep, adapter, cdt)
    y = x.to(cdt) @ weight.to(cdt).t()
    if bias is not None:
        y = y + bias.to(cdt)
    delta = torch.zeros_like(y)
    for off, b, d in zip(slice_offsets, lora_b, _expand_deltas(t, lora_b, keep, adapter, cdt)):
        delta[:, off:off + b.shape[1]] = d
    return (y + delta).to(x.dtype)
