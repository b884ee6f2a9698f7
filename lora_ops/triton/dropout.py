"""The lora_ops dropout mask in Triton, bit for bit csrc/include/lora_ops/dropout_hash.h.

Kernels regenerate the mask from (seed, row, col) wherever they need it, so no kernel ever
reads or writes a mask tensor.
"""
from typing import Tuple, Union

import torch
import triton
import triton.language as tl

from lora_ops.reference.dropout import dropout_threshold, seed32


@triton.jit
def _mix32(h):
    # uint32 operands: multiplications wrap and shifts are logical, as in the C header.
    h ^= h >> 16
    h *= 0x7FEB352D
    h ^= h >> 15
    h *= 0x2C1B3C6D
    h ^= h >> 16
    return h


@triton.jit
def dropout_keep(seed, threshold, rows, cols):
    """Keep-mask of the [len(rows), len(cols)] block of x at global indices rows x cols.

    `seed` is the int32 bit pattern of seed32 (see `kernel_seed`).
    """
    row_hash = _mix32(rows.to(tl.uint32) ^ seed.to(tl.uint32, bitcast=True))
    h = _mix32(row_hash[:, None] + cols.to(tl.uint32)[None, :])
    return (h >> 8) >= threshold


@triton.jit
def kernel_seed(seed, SEED_ON_DEVICE: tl.constexpr):
    """The int32 bits of seed32 that dropout_keep takes: the argument itself, or, for a seed on
    the device (a pointer to its int64), read now and folded as seed32 folds it. The arithmetic
    shift of the int64 differs from seed32's logical one only in the top 32 bits, which the
    truncation drops."""
    if SEED_ON_DEVICE:
        s = tl.load(seed)
        return (s ^ (s >> 32)).to(tl.int32)
    else:
        return seed


def dropout_args(seed: Union[int, torch.Tensor], p: float) -> Tuple[object, int, float, bool]:
    """(seed, threshold, keep_scale, seed_on_device) as the kernels take them.

    An int seed travels as the int32 with seed32's bits: a Python int >= 2**31 would make Triton
    type the argument uint32 for some seeds and int32 for others, compiling the kernel twice. A
    seed tensor (on the operands' device, see dropout_seed.launch_seed) travels as a pointer
    that kernel_seed reads as the kernel runs, so a replayed CUDA graph follows its value.
    """
    threshold = dropout_threshold(p)
    keep_scale = 1.0 / (1.0 - p) if threshold > 0 else 1.0
    if isinstance(seed, torch.Tensor):
        return seed, threshold, keep_scale, True
    s = seed32(seed)
    return s - (1 << 32) if s >= (1 << 31) else s, threshold, keep_scale, False
