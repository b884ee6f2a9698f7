"""The dropout seed the single-adapter ops take: a one-element int64 tensor (None where dropout_p
is 0), on the CPU or on the device of the operands.

A tensor rather than an int so that a seed drawn per call can be drawn inside a traced graph
(torch.randint, no .item()): torch.compile keeps the draw in the graph, activation checkpointing
re-uses it in the recompute without a graph break, and autograd saves the very seed the forward
used. Where it lives decides who reads it:
- on the CPU, the launcher reads it on the host as the kernels launch (an int seed becomes one);
- on the operands' device, the kernels read it as they run. That costs no synchronisation, and
  a captured CUDA graph follows it: each replay applies the mask of the value the seed holds
  then, such as one that torch's generator draws inside the graph (seed=None on a GPU).
What `lora_linear(seed=...)` accepts (None, a Python int, or such a tensor) becomes one here.
"""
import operator
from typing import Optional, Union

import torch
from torch import Tensor

SeedLike = Union[int, Tensor, None]


def draw_seed(device: torch.device) -> Tensor:
    """A fresh seed on the operands' device, from torch's generator of that device: no
    synchronisation, traceable (a graph draws it on every call; checkpoint() restores the
    generator for its recompute), and on a GPU safe to capture (every replay draws anew)."""
    return torch.randint(0, 2**62, (), dtype=torch.int64, device=device)


def as_int64(seed: "int | torch.SymInt") -> "int | torch.SymInt":
    """An int's low 64 bits as a signed int64 (masks depend on no more), so that seeds beyond
    int64 (a hash, say) work on every backend. A traced seed may be symbolic: it is compared,
    which guards on its range, never read."""
    if -2**63 <= seed < 2**63:
        return seed
    return (seed + 2**63) % 2**64 - 2**63


def check_seed_tensor(op: str, seed: Tensor, device: torch.device) -> None:
    """The C++ ops' rule for their seed argument (csrc/torch_common.cpp), worded for `op`;
    `device` is that of the operands."""
    if seed.device.type != "cpu" and seed.device != device:
        raise ValueError(f"{op}: seed must be a CPU tensor or on x's device ({device}), got one "
                         f"on {seed.device}")
    if seed.dtype != torch.int64:
        raise ValueError(f"{op}: seed must have dtype int64, got {seed.dtype}")
    if seed.numel() != 1:
        raise ValueError(f"{op}: seed must hold one value, got shape {list(seed.shape)}")


def seed_tensor(op: str, seed: SeedLike, device: torch.device) -> Tensor:
    """The ops' seed argument for a caller's seed and operands on `device`: drawn there when
    None, wrapped in a CPU tensor when an integer (numpy's too), checked when a tensor."""
    if seed is None:
        return draw_seed(device)
    if isinstance(seed, Tensor):
        check_seed_tensor(op, seed, device)
        return seed
    if not isinstance(seed, (int, torch.SymInt)):
        try:
            seed = operator.index(seed)
        except TypeError:
            raise TypeError(f"{op}: seed must be an int, a one-element int64 tensor or None, got "
                            f"{type(seed).__name__}") from None
    return torch.tensor(as_int64(seed), dtype=torch.int64)


def launch_seed(op: str, dropout_p: float, seed: Optional[Tensor],
                device: torch.device) -> "int | Tensor":
    """An op's seed argument as the Triton launchers take it (the Triton op launches from
    Python): a CPU seed read on the host, as an int (0 for None, which only dropout_p == 0
    allows); a seed on the operands' device as itself, for the kernels to read."""
    if seed is None:
        if dropout_p != 0.0:
            raise ValueError(f"{op}: dropout_p is {dropout_p} but seed is None; dropout needs a "
                             f"seed (a one-element int64 tensor)")
        return 0
    check_seed_tensor(op, seed, device)
    if seed.device == device:
        return seed
    return int(seed.reshape(()))
