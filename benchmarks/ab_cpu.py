"""A/B timing of the CPU kernels of two source trees, in one process.

On the shared 2-core machines CPU timings drift by 20% or more between runs, more than most kernel
changes gain or lose, so two separate benchmark runs cannot judge a change. This builds the
standalone CPU library (CMake, no CUDA) from two trees, by default the committed HEAD and the
working tree, loads both through the C ABI (csrc/include/lora_ops/lora_ops.h), and times the same
calls on the same buffers interleaved round by round, so that both builds see the same machine. It
prints each build's median and the median over rounds of the paired ratio new / base.

    python benchmarks/ab_cpu.py                                  # HEAD vs working tree
    python benchmarks/ab_cpu.py --base HEAD~2 --op bwd --shape M=64,K=2048,N=2048,r=16,dtype=bf16
    python benchmarks/ab_cpu.py --op bwd --outputs da,db     # the adapter's gradients alone
    python benchmarks/ab_cpu.py --op multi_fwd --shape T=64,U=16,K=2048,N=2048,r=16,dist=identical

Both builds use the built-in GEMM (the C ABI's default), not ATen's BLAS.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Sequence

# Sleeping OpenMP waiters, as in benchmarks/conftest.py: spinning ones make small products on a
# shared 2-core machine many times slower. Read when the OpenMP runtime starts.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from lora_ops.bench.adapter_mix import token_adapter  # noqa: E402
from lora_ops.bench.cases import LinearCase, MultiCase, parse_shape  # noqa: E402
from lora_ops.multi_lora import segments_from_token_adapter  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = {"fp32": (torch.float32, 0), "fp16": (torch.float16, 1), "bf16": (torch.bfloat16, 2)}
DEFAULT_SHAPES = ["M=16,K=4096,N=4096,r=16", "M=64,K=2048,N=2048,r=16", "M=256,K=4096,N=1024,r=16"]
DEFAULT_MULTI_SHAPES = ["T=64,U=16,K=2048,N=2048,r=16,dist=identical",
                        "T=64,U=16,K=2048,N=2048,r=16,dist=uniform", "T=1,U=1,K=2048,N=2048,r=16"]


class Dropout(ctypes.Structure):
    """lora_dropout_t (csrc/include/lora_ops/common.h) from C ABI 0.2."""
    _fields_ = [("seed32", ctypes.c_uint32), ("threshold", ctypes.c_uint32),
                ("keep_scale", ctypes.c_float), ("seed_ptr", ctypes.c_void_p)]


class DropoutBefore02(ctypes.Structure):
    """lora_dropout_t of C ABI 0.1, before seed_ptr: a base tree may be that old."""
    _fields_ = [("seed32", ctypes.c_uint32), ("threshold", ctypes.c_uint32),
                ("keep_scale", ctypes.c_float)]


def no_dropout(lib) -> ctypes.Structure:
    """lora_dropout_t without dropout in the layout of the library's C ABI. Passed by value, a
    struct of the other size would shift every argument after it."""
    lib.lora_ops_version.restype = ctypes.c_char_p
    major, minor = (int(v) for v in lib.lora_ops_version().decode().split(".")[:2])
    return Dropout(0, 0, 1.0, None) if (major, minor) >= (0, 2) else DropoutBefore02(0, 0, 1.0)
BWD_OUTPUTS = ("dx", "da", "db")  # the backward's outputs, in the C ABI's order


class AdapterStack(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("stride_l", ctypes.c_int64),
                ("stride_row", ctypes.c_int64), ("stride_col", ctypes.c_int64)]


class AdapterIndex(ctypes.Structure):
    _fields_ = [("token_adapter", ctypes.c_void_p), ("seg_indptr", ctypes.c_void_p),
                ("seg_adapter", ctypes.c_void_p), ("num_segments", ctypes.c_int64)]


def export_tree(rev: str, dest: str) -> str:
    """Writes the files of git revision `rev` under dest; returns dest."""
    archive = subprocess.run(["git", "-C", ROOT, "archive", rev], check=True,
                             stdout=subprocess.PIPE).stdout
    subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
    return dest


def build_library(src: str, build_dir: str) -> str:
    """Builds the CPU-only liblora_ops from `src`; returns the path of the shared library."""
    configure = ["cmake", "-S", src, "-B", build_dir, "-DCMAKE_BUILD_TYPE=Release",
                 "-DLORA_OPS_WITH_CUDA=OFF", "-DLORA_OPS_BUILD_TESTS=OFF"]
    subprocess.run(configure, check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", build_dir, "--target", "lora_ops", "-j2"], check=True,
                   stdout=subprocess.DEVNULL)
    for name in sorted(os.listdir(build_dir)):
        if name.startswith("liblora_ops.so"):
            return os.path.join(build_dir, name)
    raise FileNotFoundError(f"no liblora_ops.so in {build_dir}")


def linear_buffers(case: LinearCase, copies: int = 1) -> dict:
    """The tensors of a single-adapter case, made once and shared by both builds' calls (each
    build on its own buffers measured up to 10% apart at M = 1 from where they landed in memory
    alone). `weights` holds `copies` weights, one per call in turn, so that with enough of them a
    memory-bound product reads its weight from memory rather than from the last-level cache."""
    torch_dtype = DTYPES[case.dtype][0]
    M, K, N, r = case.M, case.K, case.N, case.r

    def rand(*shape):
        return torch.randn(*shape).to(torch_dtype)

    def empty(*shape):
        return torch.empty(*shape, dtype=torch_dtype)

    return {"x": rand(M, K), "weights": [rand(N, K) for _ in range(max(copies, 1))],
            "b": rand(N), "a": rand(r, K), "bb": rand(N, r), "s": rand(M, r),
            "y": empty(M, N), "dy": rand(M, N), "dx": empty(M, K), "da": empty(r, K),
            "db": empty(N, r)}


class KernelCall:
    """One kernel call of a case through the C ABI of a library, on the buffers given (kept on
    self: the C call holds only their addresses), the next weight copy on each call."""

    def __init__(self, lib: ctypes.CDLL, op: str, case: LinearCase, buffers: dict,
                 outputs: Sequence[str] = BWD_OUTPUTS):
        code = DTYPES[case.dtype][1]
        M, K, N, r = case.M, case.K, case.N, case.r
        part = "" if op == "fwd" or tuple(outputs) == BWD_OUTPUTS else f" [{','.join(outputs)}]"
        self.label = f"{op}{part} {case.label()}"
        self.buffers = buffers
        p = {name: ctypes.c_void_p(t.data_ptr()) for name, t in buffers.items()
             if name != "weights"}
        i64, f32 = ctypes.c_int64, ctypes.c_float
        dims = (code, i64(M), i64(N), i64(K), i64(r))
        off = no_dropout(lib)
        self.fn = lib.lora_ops_cpu_lora_linear_fwd if op == "fwd" else lib.lora_ops_cpu_lora_linear_bwd
        self.variants = []
        for w in buffers["weights"]:
            w_ptr = ctypes.c_void_p(w.data_ptr())
            if op == "fwd":
                args = dims + (p["x"], i64(K), w_ptr, p["b"], p["a"], p["bb"], f32(2.0),
                               off, p["s"], p["y"], None)
            else:
                args = dims + (p["dy"], p["x"], i64(K), w_ptr, p["a"], p["bb"], p["s"],
                               f32(2.0), off, *(p[o] if o in outputs else None
                                                        for o in BWD_OUTPUTS), None)
            self.variants.append(args)
        self.calls = 0
        self.fn.restype = ctypes.c_int

    def __call__(self) -> None:
        status = self.fn(*self.variants[self.calls % len(self.variants)])
        self.calls += 1
        if status != 0:
            raise RuntimeError(f"{self.label}: the kernel returned status {status}")


def multi_buffers(case: MultiCase) -> dict:
    """The tensors of a multi-adapter case (one slice), shared by both builds' calls."""
    torch_dtype = DTYPES[case.dtype][0]
    T, U, K, N, r_max = case.T, case.U, case.K, case.N, case.r_max
    index = token_adapter(T, U, case.dist, case.none_frac)
    buffers = {
        "x": torch.randn(T, K).to(torch_dtype), "w": torch.randn(N, K).to(torch_dtype),
        "b": torch.randn(N).to(torch_dtype), "a": torch.randn(U, r_max, K).to(torch_dtype),
        "bb": torch.randn(U, N, r_max).to(torch_dtype), "scalings": torch.full((U,), 2.0),
        "ranks": torch.tensor([case.adapter_rank(a) for a in range(U)], dtype=torch.int32),
        "t": torch.empty(1, T, r_max), "y": torch.empty(T, N, dtype=torch_dtype),
        "offset": torch.zeros(1, dtype=torch.int64),
        "width": torch.full((1,), N, dtype=torch.int64)}
    if case.index == "segment":
        # The batch in segment order, as a prefill engine lays it out.
        _, seg_indptr, seg_adapter = segments_from_token_adapter(index, U)
        buffers["indptr"] = seg_indptr.to(torch.int32)
        buffers["segments"] = seg_adapter.to(torch.int32)
    else:
        buffers["index"] = index
    return buffers


class MultiKernelCall(KernelCall):
    """lora_ops_cpu_multi_lora_linear_fwd of a multi-adapter case (one slice) through the C ABI."""

    def __init__(self, lib: ctypes.CDLL, op: str, case: MultiCase, buffers: dict):
        code = DTYPES[case.dtype][1]
        T, U, K, N, r_max = case.T, case.U, case.K, case.N, case.r_max
        self.label = f"{op} {case.label()}"
        self.buffers = buffers
        if "segments" in buffers:
            idx = AdapterIndex(None, buffers["indptr"].data_ptr(), buffers["segments"].data_ptr(),
                               buffers["segments"].numel())
        else:
            idx = AdapterIndex(buffers["index"].data_ptr(), None, None, 0)
        p = {name: ctypes.c_void_p(t.data_ptr()) for name, t in buffers.items()}
        i64 = ctypes.c_int64
        a, bb = buffers["a"], buffers["bb"]
        self.stacks = (AdapterStack(a.data_ptr(), *a.stride()), AdapterStack(bb.data_ptr(), *bb.stride()))
        self.idx = idx
        self.fn = lib.lora_ops_cpu_multi_lora_linear_fwd
        self.variants = [(code, i64(T), i64(N), i64(K), i64(U), i64(r_max), i64(1), p["x"],
                          i64(K), p["w"], p["b"], ctypes.byref(self.stacks[0]),
                          ctypes.byref(self.stacks[1]), p["offset"], p["width"], p["scalings"],
                          p["ranks"], idx, p["t"], p["y"], None)]
        self.calls = 0
        self.fn.restype = ctypes.c_int


def time_interleaved(calls: Sequence[Callable[[], None]], rounds: int) -> list[list[float]]:
    """Seconds of each call in each round; the order alternates so neither build always leads."""
    for call in calls:
        call()  # warm-up: thread team, scratch buffers, page faults
    times = [[] for _ in calls]
    order = list(range(len(calls)))
    for rnd in range(rounds):
        for i in (order if rnd % 2 == 0 else order[::-1]):
            start = time.perf_counter()
            calls[i]()
            times[i].append(time.perf_counter() - start)
    return times


def paired_ratio(base: Sequence[float], new: Sequence[float]) -> tuple[float, float]:
    """Median over rounds of new / base, and the share of rounds where new was faster."""
    ratios = [n / b for b, n in zip(base, new)]
    return statistics.median(ratios), sum(r < 1.0 for r in ratios) / len(ratios)


def parse_case(spec: str, dtype: str, op: str) -> LinearCase | MultiCase:
    """A case in the bench's --shape syntax: M=64,K=2048,N=2048,r=16[,dtype=bf16] for fwd and
    bwd, T=64,U=16,K=2048,N=2048,r=16[,dist=..,index=..] for multi_fwd."""
    case = parse_shape(spec, dtype)
    want = MultiCase if op == "multi_fwd" else LinearCase
    if not isinstance(case, want):
        form = "T=..,U=.." if want is MultiCase else "M=.."
        raise ValueError(f"ab_cpu: --shape '{spec}': --op {op} times {form} cases")
    return case


def parse_outputs(spec: str) -> tuple[str, ...]:
    """--outputs: a comma list of the backward's gradients, in the C ABI's order."""
    wanted = [o for o in spec.split(",") if o]
    unknown = [o for o in wanted if o not in BWD_OUTPUTS]
    if unknown or not wanted:
        raise ValueError(f"ab_cpu: --outputs '{spec}': choose among {','.join(BWD_OUTPUTS)}")
    return tuple(o for o in BWD_OUTPUTS if o in wanted)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="HEAD", help="git revision of the baseline build")
    parser.add_argument("--new", default=None,
                        help="git revision of the build under test (default: the working tree)")
    parser.add_argument("--op", choices=["fwd", "bwd", "multi_fwd"], default="fwd")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--shape", action="append",
                        help="M=..,K=..,N=..,r=..[,dtype=..] as for lora-ops bench (repeatable)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--outputs", default=",".join(BWD_OUTPUTS),
                        help="bwd: the gradients computed, of dx,da,db (the others not asked "
                             "for), to time the adapter's products without the base GEMM")
    parser.add_argument("--copies", type=int, default=1,
                        help="fwd/bwd: weight copies rotated call by call (enough to exceed the "
                             "last-level cache times the weight read from memory)")
    args = parser.parse_args(argv)
    try:
        defaults = DEFAULT_MULTI_SHAPES if args.op == "multi_fwd" else DEFAULT_SHAPES
        cases = [parse_case(s, args.dtype, args.op) for s in args.shape or defaults]
        outputs = parse_outputs(args.outputs)
    except ValueError as err:
        parser.error(str(err))

    with tempfile.TemporaryDirectory(prefix="lora_ab_") as tmp:
        trees = {}
        for name, rev in (("base", args.base), ("new", args.new)):
            if rev is None:
                trees[name] = ROOT
            else:
                os.makedirs(os.path.join(tmp, name))
                trees[name] = export_tree(rev, os.path.join(tmp, name))
        libs = {}
        for name, src in trees.items():
            print(f"[ab] building {name} ({getattr(args, name) or 'working tree'})",
                  file=sys.stderr)
            libs[name] = ctypes.CDLL(build_library(src, os.path.join(tmp, f"build-{name}")))
        print(f"# {args.base} (base) vs {args.new or 'working tree'} (new), "
              f"{torch.get_num_threads()} threads, {args.rounds} rounds")
        for case in cases:
            if args.op == "multi_fwd":
                buffers = multi_buffers(case)
                calls = [MultiKernelCall(libs[name], args.op, case, buffers)
                         for name in ("base", "new")]
            else:
                buffers = linear_buffers(case, args.copies)
                calls = [KernelCall(libs[name], args.op, case, buffers, outputs)
                         for name in ("base", "new")]
            base_t, new_t = time_interleaved(calls, args.rounds)
            ratio, faster = paired_ratio(base_t, new_t)
            print(f"{calls[0].label:<40} base {statistics.median(base_t) * 1e3:9.3f} ms  "
                  f"new {statistics.median(new_t) * 1e3:9.3f} ms  new/base {ratio:.3f}  "
                  f"(new faster in {faster:.0%} of rounds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
