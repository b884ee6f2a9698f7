"""The lora_ops dropout mask in Triton, bit for bit csrc/include/lora_ops/dropout_hash.h.

Kernels regenerate the mask from (seed, row, col) wherever they need it, so no kernel ever
reads or writes a mask tensor.
"""
from typing import Tuple

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

    `seed` is the int32 bit pattern of seed32 (see `dropout_args`).
    """
    row_hash = _mix32(rows.to(tl.uint32) ^ seed.to(tl.uint32, bitcast=True))
    h = _mix32(row_hash[:, None] + cols.to(tl.uint32)[None, :])
    return (h >> 8) >= threshold


def dropout_args(seed: int, p: float) -> Tuple[int, int, float]:
    """(seed, threshold, keep_scale) as the kernels take them.

    The seed travels as the int32 with seed32's bits: a Python int >= 2**31 would make Triton
    type the argument uint32 for some seeds and int32 for others, compiling the kernel twice.
    """
    s = seed32(seed)
    threshold = dropout_threshold(p)
    keep_scale = 1.0 / (1.0 - p) if threshold > 0 else 1.0
    return s - (1 << 32) if s >= (1 << 31) else s, threshold, keep_scale
