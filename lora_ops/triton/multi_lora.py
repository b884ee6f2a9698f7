"""Multi-adapter LoRA shrink and expand in Triton, for both index forms.

Per-token index (decode): one program per (token, slice, K split or column tile) runs a GEMV
against its token's adapter; tokens of one adapter meet its weights in L2.
Segments (prefill): every segment is cut into its own BLOCK_M-row tiles, so a tile has one
adapter and runs as tl.dot tiles; a program finds its tile from a cumulative sum over
seg_indptr, which spares the host a sync to learn segment lengths.
Every loop over the rank stops at the adapter's own rank and every load past it is masked off,
so rows and columns past an adapter's rank are never read (they may hold NaN).
The up to 8 slices are a tuple of tensors: the kernel body is instantiated once per slice
under `if slice == s`, which lets each slice keep its own pointer, strides and width.
"""
from typing import List, Optional, Sequence

import torch
import triton
import triton.language as tl

from lora_ops.triton._launch import (
    INTERPRETED, dot_precision, operand_dtype, rank_block, row_block, split_reduction)

MAX_SLICES = 8


@triton.jit
def _segment_tile(seg_indptr_ptr, num_segments, M, pid, BLOCK_M: tl.constexpr, SEG_BLOCK: tl.constexpr):
    """(segment, first row, end row) of tile `pid` when each segment is cut into its own
    BLOCK_M-row tiles; segment == num_segments for a pid past the last tile. Bounds are
    clamped into [0, M], so a malformed seg_indptr never sends a row out of bounds."""
    segs = tl.arange(0, SEG_BLOCK)
    seg_mask = segs < num_segments
    starts = tl.minimum(tl.maximum(tl.load(seg_indptr_ptr + segs, mask=seg_mask, other=0), 0), M)
    ends = tl.minimum(tl.maximum(tl.load(seg_indptr_ptr + segs + 1, mask=seg_mask, other=0), 0), M)
    tiles = tl.where(seg_mask, tl.cdiv(tl.maximum(ends - starts, 0), BLOCK_M), 0).to(tl.int32)
    tiles_through = tl.cumsum(tiles, 0)
    seg = tl.sum((tiles_through <= pid).to(tl.int32), 0)
    here = segs == seg
    first_tile = tl.sum(tl.where(here, tiles_through - tiles, 0), 0)
    row_start = tl.sum(tl.where(here, starts, 0), 0) + (pid - first_tile) * BLOCK_M
    return seg, row_start, tl.sum(tl.where(here, ends, 0), 0)


@triton.jit
def _adapter_of(index_ptr, i, L):
    """Adapter index at position i, or -1 when it names no adapter (-1 or out of range)."""
    adapter = tl.load(index_ptr + i).to(tl.int64)
    return tl.where((adapter >= 0) & (adapter < L), adapter, -1)


@triton.jit
def _segment_work(seg_indptr_ptr, seg_adapter_ptr, num_segments, M, L,
                  BLOCK_M: tl.constexpr, SEG_BLOCK: tl.constexpr):
    """(adapter, first row, end row) of this program's segment tile (program_id 0, see
    _segment_tile); adapter -1 when the tile has no adapter work: past the last tile, or a
    segment that names no adapter."""
    seg, row_start, row_end = _segment_tile(seg_indptr_ptr, num_segments, M, tl.program_id(0),
                                            BLOCK_M, SEG_BLOCK)
    in_range = seg < num_segments
    adapter = tl.load(seg_adapter_ptr + seg, mask=in_range, other=-1).to(tl.int64)
    return tl.where(in_range & (adapter >= 0) & (adapter < L), adapter, -1), row_start, row_end


@triton.jit
def _gemv_shrink(x_row, stride_xk, a_ptr, stride_ar, stride_ak, t_row, rank, scale, k_start, k_end,
                 ATOMIC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < k_end
            x = tl.load(x_row + offs_k * stride_xk, mask=k_mask, other=0.0).to(tl.float32)
            a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                        mask=r_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
            acc += a * x[None, :]
        out = tl.sum(acc, 1) * scale
        if ATOMIC:
            tl.atomic_add(t_row + offs_r, out, mask=r_mask, sem="relaxed")
        else:
            tl.store(t_row + offs_r, out, mask=r_mask)


@triton.jit
def _tile_shrink(x_ptr, stride_xm, stride_xk, a_ptr, stride_ar, stride_ak, t_ptr, stride_tm,
                 row_start, row_end, rank, scale, k_start, k_end,
                 ATOMIC: tl.constexpr, OPERAND: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = row_start + tl.arange(0, BLOCK_M)
    m_mask = offs_m < row_end
    rows = offs_m.to(tl.int64)
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < k_end
            x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=m_mask[:, None] & k_mask[None, :], other=0.0).to(OPERAND)
            a = tl.load(a_ptr + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
                        mask=r_mask[None, :] & k_mask[:, None], other=0.0).to(OPERAND)
            acc = tl.dot(x, a, acc, input_precision=PRECISION)
        out_ptrs = t_ptr + rows[:, None] * stride_tm + offs_r[None, :]
        out_mask = m_mask[:, None] & r_mask[None, :]
        if ATOMIC:
            tl.atomic_add(out_ptrs, acc * scale, mask=out_mask, sem="relaxed")
        else:
            tl.store(out_ptrs, acc * scale, mask=out_mask)


@triton.jit
def _shrink_token_kernel(x_ptr, token_adapter_ptr, ranks_ptr, scalings_ptr, t_ptr,
                         a_ptrs, a_stride_l, a_stride_r, a_stride_k,
                         L, R_MAX, K, k_per_split, stride_xm, stride_xk, stride_ts, stride_tm,
                         NUM_SLICES: tl.constexpr, ATOMIC: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    slice_id = tl.program_id(1)
    adapter = _adapter_of(token_adapter_ptr, i, L)
    if adapter < 0:
        return
    rank = tl.minimum(tl.load(ranks_ptr + adapter).to(tl.int32), R_MAX)
    scale = tl.load(scalings_ptr + adapter).to(tl.float32)
    k_start = tl.program_id(2) * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    for s in tl.static_range(NUM_SLICES):
        if slice_id == s:
            _gemv_shrink(x_ptr + i * stride_xm, stride_xk, a_ptrs[s] + adapter * a_stride_l[s],
                         a_stride_r[s], a_stride_k[s], t_ptr + s * stride_ts + i * stride_tm,
                         rank, scale, k_start, k_end, ATOMIC, BLOCK_R, BLOCK_K)


@triton.jit
def _shrink_segment_kernel(x_ptr, seg_indptr_ptr, seg_adapter_ptr, ranks_ptr, scalings_ptr, t_ptr,
                           a_ptrs, a_stride_l, a_stride_r, a_stride_k,
                           num_segments, M, L, R_MAX, K, k_per_split,
                           stride_xm, stride_xk, stride_ts, stride_tm,
                           NUM_SLICES: tl.constexpr, ATOMIC: tl.constexpr,
                           OPERAND: tl.constexpr, PRECISION: tl.constexpr, SEG_BLOCK: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    adapter, row_start, row_end = _segment_work(seg_indptr_ptr, seg_adapter_ptr, num_segments, M, L,
                                                BLOCK_M, SEG_BLOCK)
    if adapter < 0:
        return
    slice_id = tl.program_id(1)
    rank = tl.minimum(tl.load(ranks_ptr + adapter).to(tl.int32), R_MAX)
    scale = tl.load(scalings_ptr + adapter).to(tl.float32)
    k_start = tl.program_id(2) * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    for s in tl.static_range(NUM_SLICES):
        if slice_id == s:
            _tile_shrink(x_ptr, stride_xm, stride_xk, a_ptrs[s] + adapter * a_stride_l[s],
                         a_stride_r[s], a_stride_k[s], t_ptr + s * stride_ts, stride_tm,
                         row_start, row_end, rank, scale, k_start, k_end,
                         ATOMIC, OPERAND, PRECISION, BLOCK_M, BLOCK_R, BLOCK_K)


@triton.jit
def _gemv_expand(t_row, stride_tr, b_ptr, stride_bn, stride_br, y_row, stride_yn, width, rank, pid_n,
                 BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < width
    cols = offs_n.to(tl.int64)
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        t = tl.load(t_row + offs_r * stride_tr, mask=r_mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols[:, None] * stride_bn + offs_r[None, :] * stride_br,
                    mask=n_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
        acc += b * t[None, :]
    y_ptrs = y_row + cols * stride_yn
    y = tl.load(y_ptrs, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + tl.sum(acc, 1)).to(y_row.dtype.element_ty), mask=n_mask)


@triton.jit
def _tile_expand(t_ptr, stride_tm, stride_tr, b_ptr, stride_bn, stride_br, y_ptr, stride_ym, stride_yn,
                 width, row_start, row_end, rank, pid_n,
                 OPERAND: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    offs_m = row_start + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < row_end
    n_mask = offs_n < width
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        t = tl.load(t_ptr + rows[:, None] * stride_tm + offs_r[None, :] * stride_tr,
                    mask=m_mask[:, None] & r_mask[None, :], other=0.0).to(OPERAND)
        b = tl.load(b_ptr + cols[None, :] * stride_bn + offs_r[:, None] * stride_br,
                    mask=n_mask[None, :] & r_mask[:, None], other=0.0).to(OPERAND)
        acc = tl.dot(t, b, acc, input_precision=PRECISION)
    y_ptrs = y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn
    y_mask = m_mask[:, None] & n_mask[None, :]
    y = tl.load(y_ptrs, mask=y_mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + acc).to(y_ptr.dtype.element_ty), mask=y_mask)


@triton.jit
def _expand_token_kernel(t_ptr, token_adapter_ptr, ranks_ptr, y_ptr,
                         b_ptrs, b_stride_l, b_stride_n, b_stride_r, slice_offsets, slice_widths,
                         L, R_MAX, stride_ts, stride_tm, stride_tr, stride_ym, stride_yn,
                         NUM_SLICES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    slice_id = tl.program_id(1)
    pid_n = tl.program_id(2)
    adapter = _adapter_of(token_adapter_ptr, i, L)
    if adapter < 0:
        return
    rank = tl.minimum(tl.load(ranks_ptr + adapter).to(tl.int32), R_MAX)
    for s in tl.static_range(NUM_SLICES):
        if (slice_id == s) & (pid_n * BLOCK_N < slice_widths[s]):
            _gemv_expand(t_ptr + s * stride_ts + i * stride_tm, stride_tr,
                         b_ptrs[s] + adapter * b_stride_l[s], b_stride_n[s], b_stride_r[s],
                         y_ptr + i * stride_ym + slice_offsets[s] * stride_yn, stride_yn,
                         slice_widths[s], rank, pid_n, BLOCK_N, BLOCK_R)


@triton.jit
def _expand_segment_kernel(t_ptr, seg_indptr_ptr, seg_adapter_ptr, ranks_ptr, y_ptr,
                           b_ptrs, b_stride_l, b_stride_n, b_stride_r, slice_offsets, slice_widths,
                           num_segments, M, L, R_MAX, stride_ts, stride_tm, stride_tr, stride_ym, stride_yn,
                           NUM_SLICES: tl.constexpr, OPERAND: tl.constexpr, PRECISION: tl.constexpr,
                           SEG_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_R: tl.constexpr):
    adapter, row_start, row_end = _segment_work(seg_indptr_ptr, seg_adapter_ptr, num_segments, M, L,
                                                BLOCK_M, SEG_BLOCK)
    if adapter < 0:
        return
    slice_id = tl.program_id(1)
    pid_n = tl.program_id(2)
    rank = tl.minimum(tl.load(ranks_ptr + adapter).to(tl.int32), R_MAX)
    for s in tl.static_range(NUM_SLICES):
        if (slice_id == s) & (pid_n * BLOCK_N < slice_widths[s]):
            _tile_expand(t_ptr + s * stride_ts, stride_tm, stride_tr,
                         b_ptrs[s] + adapter * b_stride_l[s], b_stride_n[s], b_stride_r[s],
                         y_ptr + slice_offsets[s] * stride_yn, stride_ym, stride_yn,
                         slice_widths[s], row_start, row_end, rank, pid_n,
                         OPERAND, PRECISION, BLOCK_M, BLOCK_N, BLOCK_R)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _check_index(op: str, M: int, L: int, ranks, device, token_adapter, seg_indptr, seg_adapter) -> int:
    """Validates the adapter index; returns the number of segments (0 for the per-token form)."""
    if tuple(ranks.shape) != (L,):
        raise ValueError(f"{op}: ranks must be [{L}] (one per adapter), got {tuple(ranks.shape)}")
    index = {"token_adapter": token_adapter, "seg_indptr": seg_indptr, "seg_adapter": seg_adapter,
             "ranks": ranks}
    for name, t in index.items():
        if t is None:
            continue
        if t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{op}: {name} must be int32 or int64, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {device}")
    if token_adapter is not None:
        if seg_indptr is not None or seg_adapter is not None:
            raise ValueError(f"{op}: pass either token_adapter or seg_indptr/seg_adapter, not both")
        if tuple(token_adapter.shape) != (M,):
            raise ValueError(f"{op}: token_adapter must be [{M}], got {tuple(token_adapter.shape)}")
        return 0
    if seg_indptr is None or seg_adapter is None:
        raise ValueError(f"{op}: needs token_adapter, or both seg_indptr and seg_adapter")
    if seg_adapter.dim() != 1 or tuple(seg_indptr.shape) != (seg_adapter.shape[0] + 1,):
        raise ValueError(f"{op}: seg_indptr must be [num_segments + 1] and seg_adapter [num_segments], "
                         f"got {tuple(seg_indptr.shape)} and {tuple(seg_adapter.shape)}")
    return seg_adapter.shape[0]


def _unit_stride(*vectors):
    """The 1-D index and per-adapter vectors as the kernels read them: element i at ptr + i."""
    return [None if v is None else v.contiguous() for v in vectors]


def _check_stacks(op: str, name: str, stacks: Sequence[torch.Tensor], device) -> None:
    if not 1 <= len(stacks) <= MAX_SLICES:
        raise ValueError(f"{op}: {name} must hold 1 to {MAX_SLICES} slices, got {len(stacks)}")
    for s, t in enumerate(stacks):
        if t.dim() != 3:
            raise ValueError(f"{op}: {name}[{s}] must be 3-D, got shape {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"{op}: {name}[{s}] is on {t.device} but x is on {device}")
        operand_dtype(t.dtype)


def multi_lora_shrink(x: torch.Tensor, lora_a: List[torch.Tensor], scalings: torch.Tensor,
                      ranks: torch.Tensor, *, token_adapter: Optional[torch.Tensor] = None,
                      seg_indptr: Optional[torch.Tensor] = None,
                      seg_adapter: Optional[torch.Tensor] = None) -> torch.Tensor:
    """t [num_slices, M, r_max] fp32, t[s, i, j] = scalings[a_i] x[i] . lora_a[s][a_i][j] for
    j < ranks[a_i], else 0; lora_a[s] is [L, r_max, K] with any strides."""
    op = "multi_lora_shrink"
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be 2-D [M, K], got shape {tuple(x.shape)}")
    _check_stacks(op, "lora_a", lora_a, x.device)
    M, K = x.shape
    L, r_max = lora_a[0].shape[:2]
    for s, a in enumerate(lora_a):
        if tuple(a.shape) != (L, r_max, K):
            raise ValueError(f"{op}: lora_a[{s}] must be [{L}, {r_max}, {K}] like lora_a[0] and x, "
                             f"got {tuple(a.shape)}")
    if tuple(scalings.shape) != (L,) or scalings.device != x.device:
        raise ValueError(f"{op}: scalings must be [{L}] on {x.device}, "
                         f"got {tuple(scalings.shape)} on {scalings.device}")
    num_segments = _check_index(op, M, L, ranks, x.device, token_adapter, seg_indptr, seg_adapter)
    scalings, ranks, token_adapter, seg_indptr, seg_adapter = _unit_stride(
        scalings, ranks, token_adapter, seg_indptr, seg_adapter)
    num_slices = len(lora_a)
    # Zeros first: the kernels write only within each adapter's rank (split-K partials add
    # atomically) and skip rows without an adapter.
    t = torch.zeros(num_slices, M, r_max, device=x.device, dtype=torch.float32)
    if M == 0 or r_max == 0 or K == 0:
        return t

    stacks = (tuple(lora_a), tuple(a.stride(0) for a in lora_a), tuple(a.stride(1) for a in lora_a),
              tuple(a.stride(2) for a in lora_a))
    block_r = rank_block(r_max, 64)
    if token_adapter is not None:
        block_k = 32 if INTERPRETED else max(64, 4096 // block_r)
        splits, k_per_split = split_reduction(M * num_slices, K, block_k, 1024, x.device)
        _shrink_token_kernel[(M, num_slices, splits)](
            x, token_adapter, ranks, scalings, t, *stacks,
            L, r_max, K, k_per_split, x.stride(0), x.stride(1), t.stride(0), t.stride(1),
            NUM_SLICES=num_slices, ATOMIC=splits > 1, BLOCK_R=block_r, BLOCK_K=block_k, num_warps=4)
    elif num_segments > 0:
        block_m, block_k = row_block(M), 32 if INTERPRETED else 64
        splits, k_per_split = split_reduction(triton.cdiv(M, block_m) * num_slices, K, block_k, 1024,
                                             x.device)
        # Cutting each segment into its own tiles adds at most one tile per segment.
        _shrink_segment_kernel[(triton.cdiv(M, block_m) + num_segments, num_slices, splits)](
            x, seg_indptr, seg_adapter, ranks, scalings, t, *stacks,
            num_segments, M, L, r_max, K, k_per_split, x.stride(0), x.stride(1), t.stride(0), t.stride(1),
            NUM_SLICES=num_slices, ATOMIC=splits > 1,
            OPERAND=operand_dtype(x.dtype), PRECISION=dot_precision(x.dtype),
            SEG_BLOCK=triton.next_power_of_2(num_segments),
            BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k, num_warps=4)
    return t


def multi_lora_expand(y: torch.Tensor, t: torch.Tensor, lora_b: List[torch.Tensor],
                      slice_offsets: Sequence[int], ranks: torch.Tensor, *,
                      token_adapter: Optional[torch.Tensor] = None,
                      seg_indptr: Optional[torch.Tensor] = None,
                      seg_adapter: Optional[torch.Tensor] = None) -> None:
    """y[i, off_s:off_s+N_s] += t[s, i, :rank] @ lora_b[s][a_i][:, :rank]^T in place, where
    lora_b[s] is [L, N_s, r_max] with any strides; rows without an adapter are untouched."""
    op = "multi_lora_expand"
    if y.dim() != 2:
        raise ValueError(f"{op}: y must be 2-D [M, N], got shape {tuple(y.shape)}")
    _check_stacks(op, "lora_b", lora_b, y.device)
    M, N = y.shape
    num_slices = len(lora_b)
    L, r_max = lora_b[0].shape[0], lora_b[0].shape[2]
    if t.dim() != 3 or tuple(t.shape) != (num_slices, M, r_max) or t.device != y.device:
        raise ValueError(f"{op}: t must be [{num_slices}, {M}, {r_max}] on {y.device}, "
                         f"got {tuple(t.shape)} on {t.device}")
    if len(slice_offsets) != num_slices:
        raise ValueError(f"{op}: slice_offsets has {len(slice_offsets)} entries for {num_slices} slices")
    widths = tuple(b.shape[1] for b in lora_b)
    offsets = tuple(int(o) for o in slice_offsets)
    for s, b in enumerate(lora_b):
        if b.shape[0] != L or b.shape[2] != r_max:
            raise ValueError(f"{op}: lora_b[{s}] must be [{L}, N_{s}, {r_max}] like lora_b[0], "
                             f"got {tuple(b.shape)}")
        if offsets[s] < 0 or offsets[s] + widths[s] > N:
            raise ValueError(f"{op}: slice {s} spans columns {offsets[s]}..{offsets[s] + widths[s]} "
                             f"but y has {N}")
    num_segments = _check_index(op, M, L, ranks, y.device, token_adapter, seg_indptr, seg_adapter)
    ranks, token_adapter, seg_indptr, seg_adapter = _unit_stride(ranks, token_adapter, seg_indptr, seg_adapter)
    if M == 0 or r_max == 0 or max(widths) == 0:
        return

    stacks = (tuple(lora_b), tuple(b.stride(0) for b in lora_b), tuple(b.stride(1) for b in lora_b),
              tuple(b.stride(2) for b in lora_b), offsets, widths)
    block_r = rank_block(r_max, 64)
    if token_adapter is not None:
        block_n = 32 if INTERPRETED else 128
        _expand_token_kernel[(M, num_slices, triton.cdiv(max(widths), block_n))](
            t, token_adapter, ranks, y, *stacks,
            L, r_max, t.stride(0), t.stride(1), t.stride(2), y.stride(0), y.stride(1),
            NUM_SLICES=num_slices, BLOCK_N=block_n, BLOCK_R=block_r, num_warps=4)
    elif num_segments > 0:
        block_m, block_n = row_block(M), 32 if INTERPRETED else 64
        b_dtype = lora_b[0].dtype
        _expand_segment_kernel[(triton.cdiv(M, block_m) + num_segments, num_slices,
                                triton.cdiv(max(widths), block_n))](
            t, seg_indptr, seg_adapter, ranks, y, *stacks,
            num_segments, M, L, r_max, t.stride(0), t.stride(1), t.stride(2), y.stride(0), y.stride(1),
            NUM_SLICES=num_slices, OPERAND=operand_dtype(b_dtype), PRECISION=dot_precision(b_dtype),
            SEG_BLOCK=triton.next_power_of_2(num_segments),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, num_warps=4)
