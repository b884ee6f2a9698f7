"""The dropout seed the single-adapter ops take: a one-element int64 CPU tensor (None where
dropout_p is 0), read on the host when a kernel launches.

A tensor rather than an int so that a seed drawn per call can be drawn inside a traced graph
(torch.randint, no .item()): torch.compile keeps the draw in the graph, activation checkpointing
re-uses it in the recompute without a graph break, and autograd saves the very seed the forward
used. What `lora_linear(seed=...)` accepts (None, a Python int, or such a tensor) becomes one here.
"""
import operator
from typing import Optional, Union

import torch
from torch import Tensor

SeedLike = Union[int, Tensor, None]


def draw_seed() -> Tensor:
    """A fresh seed from torch's default CPU generator: no device sync, and traceable (a graph
    draws it on every call; checkpoint() restores the generator for its recompute)."""
    return torch.randint(0, 2**62, (), dtype=torch.int64)


def as_int64(seed: "int | torch.SymInt") -> "int | torch.SymInt":
    """An int's low 64 bits as a signed int64 (masks depend on no more), so that seeds beyond
    int64 (a hash, say) work on every backend. A traced seed may be symbolic: it is compared,
    which guards on its range, never read."""
    if -2**63 <= seed < 2**63:
        return seed
    return (seed + 2**63) % 2**64 - 2**63


def check_seed_tensor(op: str, seed: Tensor) -> None:
    """The C++ ops' rule for their seed argument (csrc/torch_common.cpp), worded for `op`."""
    if seed.device.type != "cpu":
        raise ValueError(f"{op}: seed must be a CPU tensor (its launcher reads it on the host), "
                         f"got one on {seed.device}")
    if seed.dtype != torch.int64:
        raise ValueError(f"{op}: seed must have dtype int64, got {seed.dtype}")
    if seed.numel() != 1:
        raise ValueError(f"{op}: seed must hold one value, got shape {list(seed.shape)}")


def seed_tensor(op: str, seed: SeedLike) -> Tensor:
    """The ops' seed argument for a caller's seed: drawn when None, wrapped when an integer
    (numpy's too), checked when a tensor."""
    if seed is None:
        return draw_seed()
    if isinstance(seed, Tensor):
        check_seed_tensor(op, seed)
        return seed
    if not isinstance(seed, (int, torch.SymInt)):
        try:
            seed = operator.index(seed)
        except TypeError:
            raise TypeError(f"{op}: seed must be an int, a one-element int64 CPU tensor or None, "
                            f"got {type(seed).__name__}") from None
    return torch.tensor(as_int64(seed), dtype=torch.int64)


def read_seed(op: str, dropout_p: float, seed: Optional[Tensor]) -> int:
    """The value of an op's seed argument, on the host (for the Triton op, which launches from
    Python): None only where dropout_p is 0."""
    if seed is None:
        if dropout_p != 0.0:
            raise ValueError(f"{op}: dropout_p is {dropout_p} but seed is None; dropout needs a "
                             f"seed (a one-element int64 CPU tensor)")
        return 0
    check_seed_tensor(op, seed)
    return int(seed.reshape(()))
