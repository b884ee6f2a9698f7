"""Where a lora_linear call spends its device time, kernel by kernel (torch.profiler).

For each shape, the base F.linear (forward; forward + dgrad) and the lora_ops `cuda` backend
(forward; forward + backward) run a few times under the profiler; the table lists every kernel
with its time per call, so the adapter's share (the lora_ops kernels, the y_init / dx_init round
trip inside cuBLAS's beta = 1 GEMM) can be set against the base GEMM: the split that
csrc/cuda/NOTES.md asks for before the T1/T2 kernel work. scripts/gpu_check.sh runs it on the
GPU machine; on a CPU it profiles the CPU ops instead (a smoke run).

    python benchmarks/profile_kernels.py                       # the GPU default shapes
    python benchmarks/profile_kernels.py --device cpu --shape M=8,K=64,N=48,r=4 --dtype fp32
"""
import argparse
import sys
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import lora_ops
from lora_ops.bench.cases import DTYPES, LinearCase, parse_shape

DEFAULT_SHAPES = ["M=1,K=4096,N=4096,r=16", "M=16,K=4096,N=4096,r=16",
                  "M=1024,K=4096,N=4096,r=16", "M=4096,K=4096,N=4096,r=16",
                  "M=4096,K=4096,N=4096,r=64"]


def linear_case(spec: str, dtype: str) -> LinearCase:
    """A single-adapter case in the bench's --shape syntax (lora_ops.bench.cases)."""
    try:
        case = parse_shape(spec, dtype)
    except ValueError as err:
        raise SystemExit(f"profile_kernels: --shape needs M, K, N and r: {err}") from None
    if not isinstance(case, LinearCase):
        raise SystemExit(f"profile_kernels: --shape needs M, K, N and r (one adapter), got {spec!r}")
    return case


def calls(case: LinearCase, device: str, backend: str):
    """name -> a function making one call of each timed variant."""
    M, K, N, r, dtype = case.M, case.K, case.N, case.r, DTYPES[case.dtype]
    gen = torch.Generator(device=device).manual_seed(0)
    t = lambda *s, scale=1.0: (torch.randn(*s, generator=gen, device=device) * scale).to(dtype)
    x, w, b = t(M, K), t(N, K, scale=K ** -0.5), t(N)
    a, bb = t(r, K, scale=K ** -0.5), t(N, r, scale=r ** -0.5)
    dy = t(M, N)
    xg = x.clone().requires_grad_()
    ag, bg = a.clone().requires_grad_(), bb.clone().requires_grad_()

    def base_fwd():
        with torch.no_grad():
            F.linear(x, w, b)

    def base_train():
        F.linear(xg, w, b).backward(dy)

    def lora_fwd():
        with torch.no_grad():
            lora_ops.lora_linear(x, w, b, a, bb, 2.0, backend=backend)

    def lora_train():
        lora_ops.lora_linear(xg, w, b, ag, bg, 2.0, backend=backend).backward(dy)

    return {"base fwd": base_fwd, "base fwd+dgrad": base_train,
            f"{backend} fwd": lora_fwd, f"{backend} fwd+bwd": lora_train}


def kernel_times(fn, device: str, reps: int):
    """[(kernel name, µs per call, launches per call)] from `reps` profiled calls, after warm-up."""
    for _ in range(3):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CUDA] if device == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        for _ in range(reps):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
    total, count = defaultdict(float), defaultdict(int)
    for event in prof.events():
        on_device = event.device_type == torch.autograd.DeviceType.CUDA
        if (device == "cuda") != on_device:
            continue
        if device == "cpu" and event.cpu_parent is not None:
            continue  # top-level CPU ops only: children would count twice
        total[event.name] += event.time_range.elapsed_us()
        count[event.name] += 1
    rows = [(name, total[name] / reps, count[name] / reps) for name in total]
    return sorted(rows, key=lambda row: -row[1])


def report(case: LinearCase, device: str, backend: str, reps: int) -> str:
    lines = [f"### M={case.M},K={case.K},N={case.N},r={case.r} {case.dtype} on {device}", "",
             "| call | kernel | µs per call | launches per call |", "|---|---|---|---|"]
    for name, fn in calls(case, device, backend).items():
        rows = kernel_times(fn, device, reps)
        lines.append(f"| **{name}** | all | {sum(r[1] for r in rows):.1f} | "
                     f"{sum(r[2] for r in rows):.0f} |")
        for kernel, us, launches in rows:
            short = kernel if len(kernel) <= 90 else kernel[:87] + "..."
            lines.append(f"| {name} | `{short}` | {us:.1f} | {launches:.0f} |")
    return "\n".join(lines + [""])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", action="append",
                        help="M=..,K=..,N=..,r=..[,dtype=..] as for lora-ops bench (repeatable)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--device", choices=["cuda", "cpu"],
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default=None,
                        help="lora_ops backend profiled (default: the device's compiled one)")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--out", help="also write the markdown here")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("profile_kernels: --device cuda, but no CUDA device is available")
    backend = args.backend or ("cuda" if args.device == "cuda" else "cpu")
    usable = lora_ops.available_backends().get(args.device, [])
    if backend not in usable:
        raise SystemExit(f"profile_kernels: backend {backend!r} is not available on "
                         f"{args.device} (available: {usable})")
    text = [f"# lora_linear kernel times ({backend} backend), torch {torch.__version__}", ""]
    for spec in args.shape or DEFAULT_SHAPES:
        text.append(report(linear_case(spec, args.dtype), args.device, backend, args.reps))
        print(text[-1], flush=True)
        if args.out:  # after every shape: a run stopped by a time limit keeps what it measured
            with open(args.out, "w") as f:
                f.write("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
