"""Single-adapter fused LoRA linear in Triton: forward in 2 kernels, backward in 3.

Forward:  (1) S = drop(x) A^T, dropout regenerated from the seed inside the K loop; at decode
          sizes the K reduction is split and kernel 2 sums the fp32 partials.
          (2) one tiled GEMM: the K loop of x W^T, then a loop over r adding (scaling S) B^T
          into the same accumulator, then bias, then one store of y.
Backward: (1) dS = scaling dY B and dB = scaling dY^T S from one pass over dY (dB by fp32
          atomics across row blocks); (2) dA = dS^T drop(x); (3) dX = dY W + mask (dS A) /
          (1-p) as one GEMM with an extra loop over r and the mask applied in the epilogue.
Every tile is converted to the operand dtype right after tl.load; accumulation is fp32.
"""
import functools
from typing import Optional, Sequence, Tuple, Union

import torch
import triton
import triton.language as tl

from lora_ops.triton._launch import (
    INTERPRETED, TUNING_BENCH, dot_precision, launch_tuned, m_bucket, operand_dtype, rank_block,
    row_block, split_reduction)
from lora_ops.triton.dropout import dropout_args, dropout_keep, kernel_seed

# ---------------------------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------------------------

# The two GEMM kernels (forward y, backward dX) share one configuration space, written with
# generic names: BLOCK_COL tiles the output columns, BLOCK_RED the reduced dimension.
# Decode configurations (BLOCK_RED >= 128, small BLOCK_M) stream the weight with many thin
# column tiles; tiled configurations (BLOCK_RED <= 64) are for M > 64.
_DECODE_TILES = [(bm, bc, br, 4, 4) for bm in (16, 32, 64) for bc, br in
                 ((16, 256), (32, 256), (32, 128), (64, 128), (64, 256), (128, 128))]
_TILED_TILES = [(128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 128, 64, 4, 8),
                (128, 128, 64, 3, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
                (128, 128, 32, 4, 4), (64, 64, 64, 4, 4)]
_INTERPRETER_TILE = (32, 32, 32, 1, 4)


def _gemm_config(bm, bc, br, stages, warps):
    return triton.Config({"BLOCK_M": bm, "BLOCK_COL": bc, "BLOCK_RED": br, "GROUP_M": 8},
                         num_stages=stages, num_warps=warps)


def _gemm_configs():
    tiles = [_INTERPRETER_TILE] if INTERPRETED else _DECODE_TILES + _TILED_TILES
    return [_gemm_config(*tile) for tile in tiles]


def _default_gemm_tile(m_bucket: int, element_size: int):
    """The GPU tile the GEMMs take when tuning is off, one of the tuned set that the pruning keeps
    for this M: thin column tiles streaming the weight at decode sizes, 128 x 128 tiles above
    (64 x 64 in fp32). Each fits sm_80's 163 KB of shared memory in its dtype (the compile check
    fails otherwise); Triton keeps num_stages - 1 tiles of each operand."""
    if m_bucket <= 64:
        cols, depth = (16, 256) if element_size <= 2 else (32, 128)
        return (max(16, m_bucket), cols, depth, 4, 4)
    return (128, 128, 64, 3, 4) if element_size <= 2 else (64, 64, 64, 4, 4)


@functools.lru_cache(maxsize=None)  # a launcher asks on every call; the answer is a constant
def _default_gemm_config(m_bucket: int, element_size: int) -> triton.Config:
    return _gemm_config(*(_INTERPRETER_TILE if INTERPRETED else _default_gemm_tile(m_bucket, element_size)))


def _prune_gemm_configs(configs, named_args, **kwargs):
    bucket = named_args.get("M_BUCKET", kwargs.get("M_BUCKET"))
    if bucket <= 64:
        return [c for c in configs if c.kwargs["BLOCK_RED"] >= 128 and c.kwargs["BLOCK_M"] == max(16, bucket)]
    return [c for c in configs if c.kwargs["BLOCK_RED"] <= 64]


# dA's tiles (BLOCK_M, BLOCK_K, stages); the default, when tuning is off, takes at most 96 KB of
# shared memory (fp32, r = 128).
_DA_TILES = [(bm, bk, stages) for bm in (64, 128) for bk in (32, 64, 128) for stages in (3, 4)]
_DA_DEFAULT_TILE = (64, 64, 3)
_DA_INTERPRETER_TILE = (32, 32, 1)


def _da_config(bm, bk, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_stages=stages, num_warps=4)


def _da_configs():
    return [_da_config(*tile) for tile in ([_DA_INTERPRETER_TILE] if INTERPRETED else _DA_TILES)]


_DA_DEFAULT = _da_config(*(_DA_INTERPRETER_TILE if INTERPRETED else _DA_DEFAULT_TILE))


_PRUNE = None if INTERPRETED else {"early_config_prune": _prune_gemm_configs}
_CAST_BLOCK = 1024

# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _grouped_tile(pid, M, COLS, BLOCK_M: tl.constexpr, BLOCK_COL: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program `pid`, GROUP_M row tiles at a time so that the
    programs running together share weight tiles in L2."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_col = tl.cdiv(COLS, BLOCK_COL)
    per_group = GROUP_M * num_col
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_rows, (pid % per_group) // group_rows


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, out_ptr, M, K, R, k_per_split,
                   stride_xm, stride_xk, stride_ar, stride_ak, stride_om, stride_op,
                   seed, threshold, keep_scale,
                   HAS_DROPOUT: tl.constexpr, SEED_ON_DEVICE: tl.constexpr,
                   OPERAND: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[split] = drop(x) A^T over this split's share of K."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rows = offs_m.to(tl.int64)
    m_mask = offs_m < M
    r_mask = offs_r < R
    k_start = pid_k * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if HAS_DROPOUT:
        seed32 = kernel_seed(seed, SEED_ON_DEVICE)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_end
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0).to(OPERAND)
        if HAS_DROPOUT:
            # keep_scale is applied once to the accumulator: masking alone is exact in any dtype.
            x = tl.where(dropout_keep(seed32, threshold, offs_m, offs_k), x, 0.0)
        a = tl.load(a_ptr + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
                    mask=r_mask[None, :] & k_mask[:, None], other=0.0).to(OPERAND)
        acc = tl.dot(x, a, acc, input_precision=PRECISION)
    if HAS_DROPOUT:
        acc *= keep_scale
    out = out_ptr + pid_k * stride_op + rows[:, None] * stride_om + offs_r[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & r_mask[None, :])


@triton.autotune(configs=_gemm_configs(), key=["M_BUCKET", "N", "K", "R"], prune_configs_by=_PRUNE,
                 do_bench=TUNING_BENCH)
@triton.jit
def _fwd_gemm_kernel(x_ptr, w_ptr, bias_ptr, s_ptr, s_parts_ptr, b_ptr, y_ptr,
                     M, N, K, R, num_s_parts,
                     stride_xm, stride_xk, stride_wn, stride_wk, stride_sm, stride_sp,
                     stride_bn, stride_br, stride_ym, scaling, M_BUCKET,
                     HAS_BIAS: tl.constexpr, S_FROM_PARTS: tl.constexpr,
                     OPERAND: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_COL: tl.constexpr, BLOCK_RED: tl.constexpr,
                     GROUP_M: tl.constexpr):
    """y = x W^T + (scaling S) B^T + b in one accumulator.

    With S_FROM_PARTS, S is the sum of the shrink's fp32 split-K partials, rounded to x's dtype
    here (as the unsplit shrink rounds it) and saved by the programs of column tile 0.
    """
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_COL, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_COL + tl.arange(0, BLOCK_COL)
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_COL), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_RED):
        offs_k = k0 + tl.arange(0, BLOCK_RED)
        k_mask = offs_k < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0).to(OPERAND)
        w = tl.load(w_ptr + cols[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                    mask=n_mask[None, :] & k_mask[:, None], other=0.0).to(OPERAND)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        sr_mask = m_mask[:, None] & (offs_r < R)[None, :]
        s_offs = rows[:, None] * stride_sm + offs_r[None, :]
        if S_FROM_PARTS:
            s32 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for p in range(0, num_s_parts):
                s32 += tl.load(s_parts_ptr + p * stride_sp + s_offs, mask=sr_mask, other=0.0)
            s = s32.to(s_ptr.dtype.element_ty)
            if pid_n == 0:
                tl.store(s_ptr + s_offs, s, mask=sr_mask)
        else:
            s = tl.load(s_ptr + s_offs, mask=sr_mask, other=0.0)
        s = (s.to(tl.float32) * scaling).to(OPERAND)
        b = tl.load(b_ptr + cols[None, :] * stride_bn + offs_r[:, None] * stride_br,
                    mask=n_mask[None, :] & (offs_r < R)[:, None], other=0.0).to(OPERAND)
        acc = tl.dot(s, b, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _ds_db_kernel(dy_ptr, b_ptr, s_ptr, ds_ptr, db_ptr, M, N, R, n_per_split,
                  stride_dym, stride_dyn, stride_bn, stride_br, stride_sm, stride_dsm, stride_dbn,
                  scaling,
                  COMPUTE_DS: tl.constexpr, COMPUTE_DB: tl.constexpr, DS_ATOMIC: tl.constexpr,
                  OPERAND: tl.constexpr, PRECISION: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """dS = scaling dY B and dB += scaling dY^T S (fp32) from each dY tile read once.

    dB reduces over rows, which live in other programs, hence atomics; dS reduces over this
    program's share of N (atomics only when N is split, at small M)."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_n = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rows = offs_m.to(tl.int64)
    m_mask = offs_m < M
    r_mask = offs_r < R
    n_start = pid_n * n_per_split
    n_end = tl.minimum(N, n_start + n_per_split)
    if COMPUTE_DB:
        s = tl.load(s_ptr + rows[:, None] * stride_sm + offs_r[None, :],
                    mask=m_mask[:, None] & r_mask[None, :], other=0.0).to(OPERAND)
    ds = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_end
        cols = offs_n.to(tl.int64)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + cols[None, :] * stride_dyn,
                     mask=m_mask[:, None] & n_mask[None, :], other=0.0).to(OPERAND)
        if COMPUTE_DS:
            b = tl.load(b_ptr + cols[:, None] * stride_bn + offs_r[None, :] * stride_br,
                        mask=n_mask[:, None] & r_mask[None, :], other=0.0).to(OPERAND)
            ds = tl.dot(dy, b, ds, input_precision=PRECISION)
        if COMPUTE_DB:
            db = tl.dot(tl.trans(dy), s, input_precision=PRECISION)
            tl.atomic_add(db_ptr + cols[:, None] * stride_dbn + offs_r[None, :], db * scaling,
                          mask=n_mask[:, None] & r_mask[None, :], sem="relaxed")
    if COMPUTE_DS:
        ds_ptrs = ds_ptr + rows[:, None] * stride_dsm + offs_r[None, :]
        if DS_ATOMIC:
            tl.atomic_add(ds_ptrs, ds * scaling, mask=m_mask[:, None] & r_mask[None, :], sem="relaxed")
        else:
            tl.store(ds_ptrs, ds * scaling, mask=m_mask[:, None] & r_mask[None, :])


@triton.autotune(configs=_da_configs(), key=["M_BUCKET", "K", "R"], do_bench=TUNING_BENCH)
@triton.jit
def _da_kernel(ds_ptr, x_ptr, da_ptr, db32_ptr, db_ptr, M, K, R, db_numel,
               stride_dsm, stride_xm, stride_xk, stride_dar, seed, threshold, keep_scale, M_BUCKET,
               COMPUTE_DA: tl.constexpr, HAS_DROPOUT: tl.constexpr, SEED_ON_DEVICE: tl.constexpr,
               OPERAND: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
               CAST_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """dA = dS^T drop(x). Programs past the dA tiles round the finished fp32 dB to its dtype,
    which saves a launch."""
    pid = tl.program_id(0)
    num_k = tl.cdiv(K, BLOCK_K)
    num_da = tl.cdiv(R, BLOCK_R) * num_k if COMPUTE_DA else 0
    if pid >= num_da:
        offs = (pid - num_da).to(tl.int64) * CAST_BLOCK + tl.arange(0, CAST_BLOCK)
        db = tl.load(db32_ptr + offs, mask=offs < db_numel)
        tl.store(db_ptr + offs, db.to(db_ptr.dtype.element_ty), mask=offs < db_numel)
        return
    offs_r = (pid // num_k) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = (pid % num_k) * BLOCK_K + tl.arange(0, BLOCK_K)
    r_mask = offs_r < R
    k_mask = offs_k < K
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    if HAS_DROPOUT:
        seed32 = kernel_seed(seed, SEED_ON_DEVICE)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        rows = offs_m.to(tl.int64)
        m_mask = offs_m < M
        ds_t = tl.load(ds_ptr + rows[None, :] * stride_dsm + offs_r[:, None],
                       mask=m_mask[None, :] & r_mask[:, None], other=0.0).to(OPERAND)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0).to(OPERAND)
        if HAS_DROPOUT:
            x = tl.where(dropout_keep(seed32, threshold, offs_m, offs_k), x, 0.0)
        acc = tl.dot(ds_t, x, acc, input_precision=PRECISION)
    if HAS_DROPOUT:
        acc *= keep_scale
    tl.store(da_ptr + offs_r[:, None] * stride_dar + offs_k[None, :], acc.to(da_ptr.dtype.element_ty),
             mask=r_mask[:, None] & k_mask[None, :])


@triton.autotune(configs=_gemm_configs(), key=["M_BUCKET", "N", "K", "R"], prune_configs_by=_PRUNE,
                 do_bench=TUNING_BENCH)
@triton.jit
def _dx_gemm_kernel(dy_ptr, w_ptr, ds_ptr, a_ptr, dx_ptr, M, N, K, R,
                    stride_dym, stride_dyn, stride_wn, stride_wk, stride_dsm, stride_ar, stride_ak,
                    stride_dxm, seed, threshold, keep_scale, M_BUCKET,
                    HAS_DROPOUT: tl.constexpr, SEED_ON_DEVICE: tl.constexpr,
                    OPERAND: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_COL: tl.constexpr,
                    BLOCK_RED: tl.constexpr, GROUP_M: tl.constexpr):
    """dX = dY W + keep_scale mask (dS A): the N loop, then an r loop, mask in the epilogue."""
    pid_m, pid_k = _grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_COL, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_COL + tl.arange(0, BLOCK_COL)
    rows = offs_m.to(tl.int64)
    m_mask = offs_m < M
    k_mask = offs_k < K
    acc = tl.zeros((BLOCK_M, BLOCK_COL), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_RED):
        offs_n = n0 + tl.arange(0, BLOCK_RED)
        n_mask = offs_n < N
        cols = offs_n.to(tl.int64)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + cols[None, :] * stride_dyn,
                     mask=m_mask[:, None] & n_mask[None, :], other=0.0).to(OPERAND)
        w = tl.load(w_ptr + cols[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                    mask=n_mask[:, None] & k_mask[None, :], other=0.0).to(OPERAND)
        acc = tl.dot(dy, w, acc, input_precision=PRECISION)
    # The mask multiplies dS A only, so under dropout that term needs its own accumulator.
    if HAS_DROPOUT:
        adapter = tl.zeros((BLOCK_M, BLOCK_COL), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < R
        ds = tl.load(ds_ptr + rows[:, None] * stride_dsm + offs_r[None, :],
                     mask=m_mask[:, None] & r_mask[None, :], other=0.0).to(OPERAND)
        a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                    mask=r_mask[:, None] & k_mask[None, :], other=0.0).to(OPERAND)
        if HAS_DROPOUT:
            adapter = tl.dot(ds, a, adapter, input_precision=PRECISION)
        else:
            acc = tl.dot(ds, a, acc, input_precision=PRECISION)
    if HAS_DROPOUT:
        keep = dropout_keep(kernel_seed(seed, SEED_ON_DEVICE), threshold, offs_m, offs_k)
        acc += tl.where(keep, adapter * keep_scale, 0.0)
    tl.store(dx_ptr + rows[:, None] * stride_dxm + offs_k[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=m_mask[:, None] & k_mask[None, :])


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _check(op: str, x, weight, lora_a, lora_b, dropout_p: float, bias=None):
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be 2-D [M, K], got shape {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"{op}: weight must be [N, {x.shape[1]}] for x of shape {tuple(x.shape)}, "
                         f"got {tuple(weight.shape)}")
    n, k = weight.shape
    if lora_a.dim() != 2 or lora_a.shape[1] != k:
        raise ValueError(f"{op}: lora_a must be [r, {k}], got {tuple(lora_a.shape)}")
    r = lora_a.shape[0]
    if tuple(lora_b.shape) != (n, r):
        raise ValueError(f"{op}: lora_b must be [{n}, {r}] (N, r), got {tuple(lora_b.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"{op}: bias must be [{n}], got {tuple(bias.shape)}")
    tensors = {"x": x, "weight": weight, "lora_a": lora_a, "lora_b": lora_b, "bias": bias}
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
        if t is not None:
            operand_dtype(t.dtype)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{op}: dropout_p must be in [0, 1), got {dropout_p}")


def _gemm_grid(rows: int, cols: int):
    return lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(cols, meta["BLOCK_COL"]),)


def _shrink_block_k(m: int, block_m: int, block_r: int, element_size: int) -> int:
    """Depth per step of the shrink: 128 for decode sizes, 64 above, halved while the x and A
    tiles of its 3 pipeline stages would pass 160 KB of shared memory (fp32 at 33-64 rows and
    r > 64 asked for 288 KB; a block gets 163 KB on sm_80, 227 KB on sm_90)."""
    if INTERPRETED:
        return 32
    block_k = 128 if m <= 64 else 64
    while block_k > 32 and 3 * (block_m + block_r) * block_k * element_size > 160 * 1024:
        block_k //= 2
    return block_k


def lora_linear_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                    dropout_p: float, seed: Union[int, torch.Tensor]
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y [M, N], S [M, r]) in x's dtype: y = x W^T + b + scaling S B^T, S = drop(x) A^T."""
    _check("lora_linear_fwd", x, weight, lora_a, lora_b, dropout_p, bias)
    M, K = x.shape
    N, R = weight.shape[0], lora_a.shape[0]
    y = x.new_empty(M, N)
    s = x.new_empty(M, R)
    if M == 0:
        return y, s
    seed_arg, threshold, keep_scale, seed_on_device = dropout_args(seed, dropout_p)
    operand, precision = operand_dtype(x.dtype), dot_precision(x.dtype)

    block_m, block_r = row_block(M), rank_block(R, 128)
    block_k = _shrink_block_k(M, block_m, block_r, max(x.element_size(), lora_a.element_size()))
    shrink_programs = triton.cdiv(M, block_m) * triton.cdiv(R, block_r)
    # Without column tiles nothing would sum the partials, so N == 0 never splits.
    splits, k_per_split = (split_reduction(shrink_programs, K, block_k, 512, x.device) if N > 0
                           else (1, max(K, 1)))
    s_parts = s if splits == 1 else torch.empty(splits, M, R, device=x.device, dtype=torch.float32)
    if R > 0:
        _shrink_kernel[(triton.cdiv(M, block_m), triton.cdiv(R, block_r), splits)](
            x, lora_a, s_parts, M, K, R, k_per_split,
            x.stride(0), x.stride(1), lora_a.stride(0), lora_a.stride(1), R, M * R,
            seed_arg, threshold, keep_scale,
            HAS_DROPOUT=threshold > 0, SEED_ON_DEVICE=seed_on_device, OPERAND=operand,
            PRECISION=precision, BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k, num_warps=4)
    if N > 0:
        launch_tuned(
            _fwd_gemm_kernel, _gemm_grid(M, N), _default_gemm_config(m_bucket(M), x.element_size()),
            x, weight, bias.contiguous() if bias is not None else weight, s, s_parts, lora_b, y,
            M, N, K, R, splits,
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), R, M * R,
            lora_b.stride(0), lora_b.stride(1), N, scaling, m_bucket(M),
            HAS_BIAS=bias is not None, S_FROM_PARTS=splits > 1,
            OPERAND=operand, PRECISION=precision, BLOCK_R=rank_block(R, 64))
    return y, s


def lora_linear_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                    lora_a: torch.Tensor, lora_b: torch.Tensor, s: torch.Tensor,
                    scaling: float, dropout_p: float, seed: Union[int, torch.Tensor],
                    output_mask: Sequence[bool] = (True, True, True)
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, d_lora_a, d_lora_b); an output not asked for in output_mask is x.new_empty(0)."""
    op = "lora_linear_bwd"
    _check(op, x, weight, lora_a, lora_b, dropout_p)
    M, K = x.shape
    N, R = weight.shape[0], lora_a.shape[0]
    if tuple(dy.shape) != (M, N):
        raise ValueError(f"{op}: dy must be [{M}, {N}], got {tuple(dy.shape)}")
    if tuple(s.shape) != (M, R):
        raise ValueError(f"{op}: s must be [{M}, {R}], got {tuple(s.shape)}")
    want_dx, want_da, want_db = (bool(v) for v in output_mask)
    dx = x.new_empty(M, K) if want_dx else x.new_empty(0)
    if M == 0:
        return (dx, lora_a.new_zeros(R, K) if want_da else x.new_empty(0),
                lora_b.new_zeros(N, R) if want_db else x.new_empty(0))
    seed_arg, threshold, keep_scale, seed_on_device = dropout_args(seed, dropout_p)
    operand, precision = operand_dtype(x.dtype), dot_precision(x.dtype)
    need_ds = (want_dx or want_da) and R > 0

    block_m, block_n = row_block(M), 32 if INTERPRETED else 64
    block_r = rank_block(R, 128)
    row_programs = triton.cdiv(M, block_m) * triton.cdiv(R, block_r)
    # Splitting N makes dS a sum over programs; without dS to compute there is no reason to.
    n_splits, n_per_split = (split_reduction(row_programs, N, block_n, 1024, x.device) if need_ds
                             else (1, max(N, 1)))
    ds = (torch.zeros if n_splits > 1 else torch.empty)(M, R, device=x.device, dtype=torch.float32)
    db32 = torch.zeros(N, R, device=x.device, dtype=torch.float32) if want_db else x.new_empty(0)
    if (need_ds or want_db) and R > 0:
        _ds_db_kernel[(triton.cdiv(M, block_m), triton.cdiv(R, block_r), n_splits)](
            dy, lora_b, s, ds, db32, M, N, R, n_per_split,
            dy.stride(0), dy.stride(1), lora_b.stride(0), lora_b.stride(1), s.stride(0), R, R,
            scaling,
            COMPUTE_DS=need_ds, COMPUTE_DB=want_db, DS_ATOMIC=n_splits > 1,
            OPERAND=operand, PRECISION=precision,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, num_warps=8 if block_r >= 128 else 4)

    # d_lora_b is the fp32 accumulator itself, or its rounding by the dA kernel's extra programs.
    compute_da = want_da and need_ds and K > 0
    cast_db = want_db and lora_b.dtype != torch.float32 and db32.numel() > 0
    da = (lora_a.new_empty if compute_da else lora_a.new_zeros)(R, K) if want_da else x.new_empty(0)
    db = lora_b.new_empty(N, R) if cast_db else db32
    if compute_da or cast_db:
        da_block_r = rank_block(R, 128)
        cast_programs = triton.cdiv(db32.numel(), _CAST_BLOCK) if cast_db else 0

        def da_grid(meta):
            da_programs = triton.cdiv(R, da_block_r) * triton.cdiv(K, meta["BLOCK_K"]) if compute_da else 0
            return (da_programs + cast_programs,)

        launch_tuned(
            _da_kernel, da_grid, _DA_DEFAULT,
            ds, x, da if compute_da else ds, db32, db if cast_db else db32, M, K, R, db32.numel(),
            R, x.stride(0), x.stride(1), K, seed_arg, threshold, keep_scale, m_bucket(M),
            COMPUTE_DA=compute_da, HAS_DROPOUT=threshold > 0, SEED_ON_DEVICE=seed_on_device,
            OPERAND=operand, PRECISION=precision,
            BLOCK_R=da_block_r, CAST_BLOCK=_CAST_BLOCK)

    if want_dx and K > 0:
        launch_tuned(
            _dx_gemm_kernel, _gemm_grid(M, K), _default_gemm_config(m_bucket(M), dy.element_size()),
            dy, weight, ds, lora_a, dx, M, N, K, R,
            dy.stride(0), dy.stride(1), weight.stride(0), weight.stride(1), R,
            lora_a.stride(0), lora_a.stride(1), K, seed_arg, threshold, keep_scale, m_bucket(M),
            HAS_DROPOUT=threshold > 0, SEED_ON_DEVICE=seed_on_device, OPERAND=operand,
            PRECISION=precision, BLOCK_R=rank_block(R, 64))
    return dx, da, db
