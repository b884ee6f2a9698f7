"""A provider is one implementation of an op that the benchmark times beside the others.

`bind(inputs, training, dropout_p)` ties it to one input set and returns the forward as a
zero-argument call plus the tensors a training step differentiates (`wrt`); the runner wraps
that into the forward-only call (under no_grad) or the forward + backward call.
"""
from dataclasses import dataclass
from typing import Callable, Tuple

import torch
from torch import Tensor

# roles: "base" (F.linear alone, the floor the targets divide by), "eager" (the PEFT-style
# yardstick), "peer" (another implementation measured for comparison), "lora_ops" (a backend)
ROLES = ("base", "eager", "peer", "lora_ops")

# Relative Frobenius error against a float64 oracle above which a provider's output is wrong.
# fp32 allows TF32 (Triton's default for fp32 dots, ~3e-4).
CHECK_TOLERANCE = {"fp32": 2e-3, "fp16": 1e-2, "bf16": 3e-2}


@dataclass(frozen=True)
class Bound:
    forward: Callable[[], Tensor]
    wrt: Tuple[Tensor, ...] = ()


@dataclass(frozen=True)
class Provider:
    name: str
    role: str
    bind: Callable[..., Bound]
    modes: Tuple[str, ...] = ("fwd", "fwd+bwd")
    graph_safe: bool = True     # no host sync or host-built index: may be captured in a CUDA graph
    memory_probe: bool = True   # its saved-for-backward tensors can be counted (not compiled code)


def relative_error(out: Tensor, ref: Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; inf when out holds NaN or inf."""
    out64 = out.detach().to(torch.float64)
    if not bool(torch.isfinite(out64).all()):
        return float("inf")
    ref64 = ref.to(device=out64.device, dtype=torch.float64)
    return float(torch.linalg.vector_norm(out64 - ref64) / torch.linalg.vector_norm(ref64).clamp_min(1e-30))
