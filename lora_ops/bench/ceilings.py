"""The two ceilings of the device, measured in the run that uses them (METHOD: datasheet rates
are leads, not yardsticks): copy bandwidth (bytes read + written by one large device copy)
and the matrix-multiply rate of torch.matmul per dtype."""
from dataclasses import dataclass
from typing import Dict, Sequence

import torch

from lora_ops.bench.cases import DTYPES
from lora_ops.bench.timing import time_cpu_interleaved, time_cuda

CUDA_COPY_BYTES = 1 << 30
CPU_COPY_BYTES = 1 << 28
CUDA_MATMUL_SIZE = 8192
CPU_MATMUL_SIZE = {"fp32": 2048, "bf16": 512, "fp16": 512}  # CPUs without bf16 units: ~1 GFLOP/s


@dataclass(frozen=True)
class Ceilings:
    copy_gbps: float                  # GB/s, read + write counted
    matmul_tflops: Dict[str, float]   # per dtype name

    def as_dict(self) -> dict:
        return {"copy_gbps": self.copy_gbps, "matmul_tflops": dict(self.matmul_tflops)}


def _copy_gbps(device: torch.device) -> float:
    nbytes = CUDA_COPY_BYTES if device.type == "cuda" else CPU_COPY_BYTES
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    if device.type == "cuda":
        t_us = time_cuda([lambda: dst.copy_(src)], warmup_ms=25, rep_ms=200).median_us
    else:
        t_us = time_cpu_interleaved({"copy": [lambda: dst.copy_(src)]}, budget_s=1.0)["copy"].median_us
    return 2 * nbytes / (t_us * 1e-6) / 1e9


def _matmul_tflops(device: torch.device, dtype: str) -> float:
    n = CUDA_MATMUL_SIZE if device.type == "cuda" else CPU_MATMUL_SIZE[dtype]
    a = torch.randn(n, n, device=device, dtype=DTYPES[dtype])
    b = torch.randn(n, n, device=device, dtype=DTYPES[dtype])
    if device.type == "cuda":
        t_us = time_cuda([lambda: torch.matmul(a, b)], warmup_ms=25, rep_ms=200).median_us
    else:
        t_us = time_cpu_interleaved({"mm": [lambda: torch.matmul(a, b)]}, budget_s=1.0,
                                    min_rounds=3)["mm"].median_us
    return 2 * n ** 3 / (t_us * 1e-6) / 1e12


def measure(device: torch.device, dtypes: Sequence[str]) -> Ceilings:
    copy = _copy_gbps(device)
    rates = {dtype: _matmul_tflops(device, dtype) for dtype in sorted(set(dtypes))}
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Ceilings(copy, rates)
