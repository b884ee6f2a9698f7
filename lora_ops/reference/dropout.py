"""The dropout mask shared by every backend, in PyTorch (mirror of csrc/include/lora_ops/dropout_hash.h).

The hash runs in int64 with explicit 32-bit wrapping; its multipliers are below 2**31, so no
intermediate product overflows int64.
"""
import torch

_MASK32 = 0xFFFFFFFF
_MUL1 = 0x7FEB352D
_MUL2 = 0x2C1B3C6D
_THRESHOLD_ONE = 1 << 24


def _mix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = (h * _MUL1) & _MASK32
    h = h ^ (h >> 15)
    h = (h * _MUL2) & _MASK32
    return h ^ (h >> 16)


def seed32(seed: int) -> int:
    """Fold a 64-bit seed into the 32 bits the kernels hash with."""
    seed &= (1 << 64) - 1
    return (seed ^ (seed >> 32)) & _MASK32


def dropout_threshold(p: float) -> int:
    """Elements whose top 24 hash bits fall below this are dropped: P(drop) = threshold / 2**24."""
    return min(_THRESHOLD_ONE, int(round(p * _THRESHOLD_ONE)))


def _seed32_of(seed: "int | torch.Tensor", device) -> "int | torch.Tensor":
    """seed32(seed); for a seed tensor (the ops' argument), or while torch.compile traces, as a
    0-d int64 tensor computed with tensor ops.

    A seed tensor stays where it is (on the CPU or on the operands' device, as the ops take it):
    a 0-d CPU tensor combines with tensors on any device, so no copy to the device is made, and
    one on the device is read by the mask's own kernels (on every replay of a CUDA graph). A
    traced int seed may be symbolic, and seed32's 64-bit mask cannot be applied to it (Inductor
    refuses 2**64 - 1 as an int64 constant; Dynamo cannot tell a SymInt from an int, so the
    tensor form serves every traced seed). As an int64 the seed's
    two's-complement bits are its low 64 bits, and the arithmetic shift differs from the logical
    one only in the top 32 bits, which the final mask clears: the same 32 bits as seed32.
    """
    if isinstance(seed, torch.Tensor):
        s = seed.reshape(()).to(torch.int64)
    elif torch.compiler.is_compiling():
        s = torch.full((), seed, dtype=torch.int64, device=device)
    else:
        return seed32(seed)
    return (s ^ (s >> 32)) & _MASK32


def dropout_keep_mask(seed: "int | torch.Tensor", rows: int, cols: int, p: float, device=None) -> torch.Tensor:
    """Bool [rows, cols]: True where element (row, col) of the flattened x is kept."""
    r = torch.arange(rows, dtype=torch.int64, device=device).unsqueeze(1)
    c = torch.arange(cols, dtype=torch.int64, device=device).unsqueeze(0)
    h = _mix32(((_mix32(r ^ _seed32_of(seed, device)) + c) & _MASK32))
    return (h >> 8) >= dropout_threshold(p)


def apply_dropout(x2d: torch.Tensor, seed: "int | torch.Tensor", p: float) -> torch.Tensor:
    """drop(x) = mask * x / (1 - p), in x2d's dtype: the reference passes x already in its fp32
    compute dtype, as the kernels scale each element after loading it as fp32."""
    if p == 0.0:
        return x2d
    keep = dropout_keep_mask(seed, x2d.shape[0], x2d.shape[1], p, x2d.device)
    return torch.where(keep, x2d * (1.0 / (1.0 - p)), torch.zeros((), dtype=x2d.dtype, device=x2d.device))
