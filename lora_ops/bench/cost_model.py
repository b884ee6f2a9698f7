"""The least work each op must do: bytes through memory (each input read once, each output
written once) and floating-point operations, as DESIGN.md counts them.

Achieved GB/s is bytes / time; the floor of a row is max(bytes / copy bandwidth,
flops / matmul rate), both ceilings measured in the same run (ceilings.py).
Multi-adapter decode: 2*U*r*(K+N) + 2*T*K + 4*T*N bytes in bf16, generalised here to any
dtype, per-adapter ranks, and tokens on -1 (which read and write nothing for the adapter).
"""
from dataclasses import dataclass
from typing import Tuple

import torch

from lora_ops.bench.cases import DTYPES, LinearCase, MultiCase

FP32_BYTES = 4  # the shrink output t is fp32 for every dtype (kernels.h)


@dataclass(frozen=True)
class Cost:
    bytes: int
    flops: int


def element_bytes(dtype: str) -> int:
    return torch.empty((), dtype=DTYPES[dtype]).element_size()


def linear_cost(case: LinearCase, mode: str, with_adapter: bool = True) -> Cost:
    """Fused LoRA linear (or the base layer alone, with_adapter=False), forward or fwd+dgrad
    (frozen W: dx, d_lora_a, d_lora_b)."""
    e = element_bytes(case.dtype)
    m, k, n, r = case.M, case.K, case.N, case.r
    adapter = r * (k + n) if with_adapter else 0  # A and B elements
    fwd = Cost(e * (m * k + n * k + n + adapter + m * n),
               2 * m * n * k + (2 * m * r * (k + n) if with_adapter else 0))
    if mode == "fwd":
        return fwd
    base_bwd = e * (m * n + n * k + m * k)  # read dy and W, write dx
    if not with_adapter:
        return Cost(fwd.bytes + base_bwd, 2 * fwd.flops)
    # + S written in forward and read back, x read again for dA, A and B read, dA and dB written
    adapter_bwd = e * (2 * m * r + m * k + 2 * adapter)
    return Cost(fwd.bytes + base_bwd + adapter_bwd,
                fwd.flops + 2 * m * n * k + 4 * m * r * (k + n))


@dataclass(frozen=True)
class AdapterUse:
    """What a batch asks of the adapters: tokens with an adapter, the sum of their ranks, and
    the sum of the ranks of the distinct adapters used."""
    active_tokens: int
    token_rank_sum: int
    used_rank_sum: int
    used_adapters: int


def adapter_use(case: MultiCase, token_adapter_cpu: torch.Tensor) -> AdapterUse:
    idx = [int(a) for a in token_adapter_cpu.tolist() if a >= 0]
    used = sorted(set(idx))
    return AdapterUse(active_tokens=len(idx),
                      token_rank_sum=sum(case.adapter_rank(a) for a in idx),
                      used_rank_sum=sum(case.adapter_rank(a) for a in used),
                      used_adapters=len(used))


def multi_cost(op: str, case: MultiCase, use: AdapterUse, mode: str) -> Cost:
    """shrink, expand (accumulating into y), or the fused base + multi-adapter layer."""
    e = element_bytes(case.dtype)
    t, k, n = case.T, case.K, case.N
    if op == "shrink":
        bytes_ = e * (use.active_tokens * k + use.used_rank_sum * k) + FP32_BYTES * t * case.r_max
        return Cost(bytes_, 2 * use.token_rank_sum * k)
    if op == "expand":
        bytes_ = (FP32_BYTES * use.token_rank_sum
                  + e * (use.used_rank_sum * n + 2 * use.active_tokens * n))
        return Cost(bytes_, 2 * use.token_rank_sum * n)
    if op != "multi_lora_linear":
        raise ValueError(f"bench: no cost model for op '{op}'")
    adapters = use.used_rank_sum * (k + n)  # elements of the used adapters' own ranks
    fwd = Cost(e * (t * k + n * k + n + adapters + t * n),
               2 * t * n * k + 2 * use.token_rank_sum * (k + n))
    if mode == "fwd":
        return fwd
    # + t saved and read back (fp32), read dy and W, x again for dA, A and B; write dx, dA, dB
    bwd_bytes = (2 * FP32_BYTES * use.token_rank_sum
                 + e * (t * n + n * k + 2 * t * k + 2 * adapters))
    bwd_flops = 2 * t * n * k + 4 * use.token_rank_sum * (k + n)
    return Cost(fwd.bytes + bwd_bytes, fwd.flops + bwd_flops)


def base_linear_cost(tokens: int, k: int, n: int, dtype: str, mode: str) -> Cost:
    """F.linear with bias, forward or forward + dgrad."""
    return linear_cost(LinearCase(tokens, k, n, 1, dtype), mode, with_adapter=False)


def floor_seconds(cost: Cost, copy_bytes_per_s: float, flops_per_s: float) -> Tuple[float, str]:
    """The larger of the memory and the arithmetic time, and which one it is."""
    t_mem = cost.bytes / copy_bytes_per_s if copy_bytes_per_s > 0 else 0.0
    t_math = cost.flops / flops_per_s if flops_per_s > 0 else 0.0
    return (t_mem, "memory") if t_mem >= t_math else (t_math, "compute")
