"""Per-call overhead of the autograd layer around `torch.ops.lora_ops.lora_linear_fwd`.

A decode-sized call (default M=1, K=4096, N=8, r=16, fp32, CPU) does so little arithmetic that
the time is mostly dispatch. Three ways of calling the one op, timed call by call and interleaved
(one sample of each per round, so load from other processes lands on all of them alike):

  requires_grad   x, lora_a, lora_b require grad: the Autograd kernel records a graph node
  no_grad_inputs  no input requires grad: the Autograd kernel only passes the call through
  below_autograd  under torch._C._AutoDispatchBelowAutograd() (entered outside the timed
                  region): the kernel alone, the floor

`overhead µs` = median - the floor's median. A second table times, under no_grad and in blocks of
calls of one kind, what a model calls: F.linear and nn.Linear alone (the cost of the base layer),
`lora_ops.lora_linear`, `LoRALinear` and PEFT's LoRA layer (when peft is installed) around the
same tensors, and MultiLoRALinear holding the same adapter as its one slot (x as rows, then as
sequences). Nothing is asserted; this prints two small tables.

    python benchmarks/bench_op_overhead.py
    python benchmarks/bench_op_overhead.py --shape M=16,K=4096,N=4096,r=16 --calls 200
"""
import argparse
import importlib.util
import os
import statistics
import sys
import time

# OpenMP threads spinning at barriers on a shared machine make small calls noisy (see
# benchmarks/conftest.py); read when torch loads, so set before it is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from lora_ops import _backend  # noqa: E402  (loads the compiled library, which registers the ops)

VARIANTS = ("requires_grad", "no_grad_inputs", "below_autograd")


def parse_shape(spec: str) -> dict:
    dims = dict(M=1, K=4096, N=8, r=16)
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        if key not in dims:
            raise SystemExit(f"bench_op_overhead: unknown dimension {key!r} in --shape (M, K, N, r)")
        dims[key] = int(value)
    return dims


def make_timers(dims: dict, dtype: torch.dtype, device: str, sync) -> dict:
    """name -> a function that makes one call and returns its duration in µs."""
    M, K, N, r = dims["M"], dims["K"], dims["N"], dims["r"]
    t = lambda *s: torch.randn(*s, dtype=dtype, device=device)
    x, w, b, a, bb = t(M, K), t(N, K), t(N), t(r, K), t(N, r)
    op = torch.ops.lora_ops.lora_linear_fwd
    grad_args = (x.clone().requires_grad_(), w, b, a.clone().requires_grad_(),
                 bb.clone().requires_grad_(), 0.5, 0.0, None)
    plain_args = (x, w, b, a, bb, 0.5, 0.0, None)

    def timed(args) -> float:
        start = time.perf_counter_ns()
        op(*args)
        sync()
        return (time.perf_counter_ns() - start) / 1e3

    def below_autograd() -> float:
        with torch._C._AutoDispatchBelowAutograd():  # the guard's own cost stays out of the floor
            return timed(plain_args)

    return {"requires_grad": lambda: timed(grad_args),
            "no_grad_inputs": lambda: timed(plain_args),
            "below_autograd": below_autograd}


def make_layer_timers(dims: dict, dtype: torch.dtype, device: str, sync) -> dict:
    """name -> a function that makes one layer call (no_grad) and returns its duration in µs."""
    import lora_ops
    M, K, N, r = dims["M"], dims["K"], dims["N"], dims["r"]
    base = torch.nn.Linear(K, N, device=device, dtype=dtype)
    ours = lora_ops.LoRALinear.from_linear(base, r=r, lora_alpha=2 * r)
    torch.nn.init.normal_(ours.lora_B.weight)
    x = torch.randn(M, K, dtype=dtype, device=device)
    w, b, a, bb = base.weight, base.bias, ours.lora_A.weight, ours.lora_B.weight
    calls = {
        "F.linear": lambda: torch.nn.functional.linear(x, w, b),
        "nn.Linear": lambda: base(x),
        "lora_linear()": lambda: lora_ops.lora_linear(x, w, b, a, bb, ours.scaling),
        "LoRALinear": lambda: ours(x),
    }
    pool = lora_ops.MultiLoRALinear.from_linear(base, max_adapters=4, max_rank=r)
    pool.add_adapter("one", a, bb, scaling=2.0)
    slot = torch.full((M,), pool.adapter_slot("one"), dtype=torch.int32, device=device)
    x3 = x.reshape(M, 1, K)  # M sequences of one token: the segment form
    calls["MultiLoRALinear"] = lambda: pool(x, slot)
    calls["MultiLoRALinear 3-D"] = lambda: pool(x3, slot)
    if importlib.util.find_spec("peft") is not None:
        from lora_ops.bench.linear_providers import peft_lora_linear
        peft_layer = peft_lora_linear(w, b, [("default", a, bb, 2 * r)], 0.0)
        calls["peft LoRA Linear"] = lambda: peft_layer(x)

    def timed(call) -> float:
        with torch.no_grad():
            start = time.perf_counter_ns()
            call()
            sync()
            return (time.perf_counter_ns() - start) / 1e3

    return {name: (lambda call=call: timed(call)) for name, call in calls.items()}


def time_interleaved(timers: dict, n: int, warmup: int) -> dict:
    samples = {name: [] for name in timers}
    names = list(timers)
    for i in range(warmup + n):
        for name in names[i % len(names):] + names[:i % len(names)]:  # rotate the order
            us = timers[name]()
            if i >= warmup:
                samples[name].append(us)
    return {name: statistics.median(s) for name, s in samples.items()}


def time_in_blocks(timers: dict, n: int, warmup: int, rounds: int = 5) -> dict:
    """Like time_interleaved, but each round times a block of calls of one kind at a time: a
    call right after a different one pays for the state that one left (with 2 threads, one
    F.linear that woke OpenMP's sleeping team made the next lora_linear() call 3x slower)."""
    samples = {name: [] for name in timers}
    for _ in range(rounds):
        for name, timer in timers.items():
            for i in range(warmup // rounds + n // rounds):
                us = timer()
                if i >= warmup // rounds:
                    samples[name].append(us)
    return {name: statistics.median(s) for name, s in samples.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="", help="M=..,K=..,N=..,r=.. (default M=1,K=4096,N=8,r=16)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--calls", type=int, default=500, help="timed calls per variant (median taken)")
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--threads", type=int, help="torch.set_num_threads")
    args = p.parse_args(argv)
    if not _backend.compiled():
        print(f"bench_op_overhead: the compiled library is not loaded ({_backend.build_info().get('load_error')})")
        return 1
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    dims = parse_shape(args.shape)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    medians = time_interleaved(make_timers(dims, dtype, args.device, sync), args.calls, args.warmup)
    floor = medians["below_autograd"]
    shape = ",".join(f"{k}={v}" for k, v in dims.items())
    print(f"lora_ops::lora_linear_fwd  {shape} {args.dtype} {args.device}  "
          f"median of {args.calls} calls, {torch.get_num_threads()} threads")
    print(f"| {'call':<15} | {'median µs':>9} | {'overhead µs':>11} |")
    print(f"| {'-' * 15} | {'-' * 8}: | {'-' * 10}: |")
    for name in VARIANTS:
        print(f"| {name:<15} | {medians[name]:9.1f} | {medians[name] - floor:11.1f} |")
    layers = time_in_blocks(make_layer_timers(dims, dtype, args.device, sync), args.calls,
                            args.warmup)
    print("\nlayer calls under no_grad, same shape; x F.linear = median / F.linear's")
    print(f"| {'call':<19} | {'median µs':>9} | {'x F.linear':>10} |")
    print(f"| {'-' * 19} | {'-' * 8}: | {'-' * 9}: |")
    for name, median in layers.items():
        print(f"| {name:<19} | {median:9.1f} | {median / layers['F.linear']:10.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
