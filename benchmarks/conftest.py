import os

# On a small shared machine (CI's 2 cores, other jobs beside), OpenMP threads that spin at
# barriers while a core is taken make a small GEMM 20x slower (seen here: 16 ms instead of
# 0.8 ms for a 64x512x768 linear); sleeping waiters do not. Read when torch loads, so set
# before torch is first imported. Every provider shares the one OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def measure(benchmark, device):
    """measure(group, call): time `call` with pytest-benchmark, grouped so that the providers of
    one case sit in one table; on CUDA each call is synchronized so device time is counted."""
    def run(group: str, call) -> None:
        benchmark.group = group
        timed = call if device.type != "cuda" else (lambda: (call(), torch.cuda.synchronize()))
        benchmark.pedantic(timed, rounds=15, iterations=3, warmup_rounds=3)
    return run
