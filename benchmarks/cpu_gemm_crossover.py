"""Where the CPU backend should leave its built-in GEMM for ATen's: the torch op on each, paired.

The CPU ops run the base product x W^T (and dY W in the backward) either on the built-in packed
GEMM or on ATen's matmul (MKL, oneDNN), choosing by dtype, vector unit and row count
(cpu::builtin_gemm_preferred in csrc/cpu/builtin_gemm.cpp). Those row limits come from
measurements like this one. $LORA_OPS_CPU_GEMM=builtin|aten forces one GEMM and is read on every
call, so both run in one process on the same buffers, interleaved round by round (the shared
2-core machines drift by 20% between runs), with the bare base product as the yardstick
(`base`: F.linear, or dY W for the backward). The weight is rotated through enough copies to be
read from memory, as in a model whose layers do not share a cache.

    python benchmarks/cpu_gemm_crossover.py --shape M=192,K=4096,N=1024 --shape M=256,K=2048,N=2048
    python benchmarks/cpu_gemm_crossover.py --op bwd --dtype bf16 --shape M=16,K=4096,N=4096

It prints, per shape, each provider's median time and the median over rounds of the paired ratio
builtin / aten (below 1: the built-in GEMM is faster there), and builtin / base.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable, Dict, List, Sequence

# Sleeping OpenMP waiters, as in benchmarks/conftest.py. Read when the OpenMP runtime starts.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import lora_ops  # noqa: E402
from lora_ops.bench.cases import DTYPES  # noqa: E402

GEMMS = ("builtin", "aten")
CACHE_BYTES = 64 << 20  # more than the last-level cache of the machines measured


def parse_shape(text: str) -> Dict[str, int]:
    """'M=192,K=4096,N=1024[,r=16]' -> {'M': 192, 'K': 4096, 'N': 1024, 'r': 16}."""
    shape = {"r": 16}
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key not in ("M", "K", "N", "r") or not value.isdigit():
            raise SystemExit(f"--shape: expected M=..,K=..,N=..[,r=..], got {text!r}")
        shape[key] = int(value)
    if not {"M", "K", "N"} <= shape.keys():
        raise SystemExit(f"--shape: M, K and N are required, got {text!r}")
    return shape


def calls(op: str, shape: Dict[str, int], dtype: torch.dtype, copies: int) -> Dict[str, Callable]:
    """The timed calls: the op (on whichever GEMM the environment names) and the bare base's."""
    M, K, N, r = shape["M"], shape["K"], shape["N"], shape["r"]
    gen = torch.Generator().manual_seed(0)

    def rand(*size):
        return torch.randn(*size, generator=gen).to(dtype)

    x, a, b, dy = rand(M, K), rand(r, K) * 0.02, rand(N, r) * 0.02, rand(M, N)
    weights = [rand(N, K) for _ in range(copies)]
    turn = [0]

    def weight():
        turn[0] = (turn[0] + 1) % copies
        return weights[turn[0]]

    fwd = torch.ops.lora_ops.lora_linear_fwd.default
    bwd = torch.ops.lora_ops.lora_linear_bwd.default
    s = fwd(x, weights[0], None, a, b, 2.0, 0.0, None)[1]
    if op == "fwd":
        return {"op": lambda: fwd(x, weight(), None, a, b, 2.0, 0.0, None),
                "base": lambda: F.linear(x, weight())}
    return {"op": lambda: bwd(dy, x, weight(), a, b, s, 2.0, 0.0, None, [True, True, True]),
            "base": lambda: torch.mm(dy, weight())}  # the frozen base's dgrad


def measure(op: str, shape: Dict[str, int], dtype: torch.dtype,
            rounds: int) -> Dict[str, List[float]]:
    """Per provider, the seconds of one call in each round; providers interleaved each round."""
    weight_bytes = shape["N"] * shape["K"] * dtype.itemsize
    fns = calls(op, shape, dtype, copies=max(2, -(-CACHE_BYTES // weight_bytes) + 1))
    times: Dict[str, List[float]] = {name: [] for name in (*GEMMS, "base")}
    previous = os.environ.get("LORA_OPS_CPU_GEMM")
    try:
        for rnd in range(rounds + 2):  # the first two rounds warm up
            for name in times:
                if name in GEMMS:
                    os.environ["LORA_OPS_CPU_GEMM"] = name
                fn = fns["op" if name in GEMMS else name]
                start = time.perf_counter()
                fn()
                if rnd >= 2:
                    times[name].append(time.perf_counter() - start)
    finally:
        if previous is None:
            os.environ.pop("LORA_OPS_CPU_GEMM", None)
        else:
            os.environ["LORA_OPS_CPU_GEMM"] = previous
    return times


def report(label: str, times: Dict[str, List[float]]) -> str:
    med = {name: statistics.median(t) * 1e6 for name, t in times.items()}
    paired = statistics.median(b / a for b, a in zip(times["builtin"], times["aten"]))
    base = statistics.median(b / f for b, f in zip(times["builtin"], times["base"]))
    return (f"{label:<28} builtin {med['builtin']:9.1f} µs  aten {med['aten']:9.1f} µs  "
            f"base {med['base']:9.1f} µs  builtin/aten {paired:.3f}  builtin/base {base:.3f}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--op", choices=["fwd", "bwd"], default="fwd",
                        help="fwd: x W^T + adapter; bwd: all three gradients (dY W for dx)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--shape", action="append", required=True, help="M=..,K=..,N=..[,r=..]")
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args(argv)
    if "cpu" not in lora_ops.available_backends()["cpu"]:
        raise SystemExit("cpu_gemm_crossover: the compiled CPU backend (lora_ops._C) is not built")
    print(f"# {args.op} {args.dtype}, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds, weight read from memory")
    for text in args.shape:
        shape = parse_shape(text)
        times = measure(args.op, shape, DTYPES[args.dtype], args.rounds)
        print(report(text, times), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
