"""Compile every lora_ops Triton kernel for a GPU target, on a machine without a GPU.

The tests run the Triton kernels in Triton's interpreter when there is no GPU. The interpreter
never compiles a kernel, feeds every tile to tl.dot as fp32 (see _launch.operand_dtype) and
takes the small interpreter tiles, so a kernel that the compiler rejects for a GPU, in the
fp16/bf16 operand types or at the block sizes the GPU configurations use, would pass every
test here and fail on its first GPU call. This check calls the real launchers on CPU tensors
with the GPU's choices (configurations, operand dtypes, split counts), but each kernel launch
compiles the kernel for the target (Triton's front end, LLVM and ptxas, all shipped in the
triton package) and launches nothing. Every autotune configuration is compiled, since the
autotuner may pick any of them (--quick: for bf16 and fp32 at one rank, see _single_cases), and
every case also runs with tuning off (LORA_OPS_TRITON_AUTOTUNE=0), where the launchers take their
default configurations.

It fails when a kernel does not compile, or when a kernel launched without autotuning (tuning
off included), or every configuration of an autotuned launch, needs more shared memory than the
target has (an autotuner skips single configurations that do not fit, so those are counted, not
failed).

    python -m lora_ops.triton.compile_check                 # sm_90 and sm_80, every case
    python -m lora_ops.triton.compile_check --quick --arch 90 --json out.json

It must run without TRITON_INTERPRET=1 (the kernels must be JIT functions, not interpreted
ones). It uses two of Triton's internal functions (the argument binder and _pack_args, both
in triton.runtime.jit, the same in Triton 3.6 and 3.8); a Triton that changes them makes this
check fail with that error, not pass.
"""
import argparse
import contextlib
import functools
import itertools
import json
import multiprocessing
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("lora_ops.triton.compile_check: unset TRITON_INTERPRET; it compiles the kernels "
                     "instead of interpreting them")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.compiler import compile as triton_compile  # noqa: E402
from triton.runtime import autotuner as triton_autotuner  # noqa: E402
from triton.runtime import jit as triton_jit  # noqa: E402

from lora_ops.triton import _launch  # noqa: E402
from lora_ops.triton import lora_linear as single  # noqa: E402
from lora_ops.triton import multi_lora as multi  # noqa: E402

# Shared memory one block may use, opt-in maximum, per compute capability (CUDA programming
# guide, "Technical Specifications per Compute Capability").
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# Programs that fill an H100 (2 x 132 SMs), so the launchers split reductions as on the GPU.
GPU_PROGRAMS = 2 * 132


@dataclass
class Compiled:
    """One specialization of one kernel, compiled for one target."""
    kernel: str
    arch: int
    case: str  # the first case that launched it
    config: str
    shared: int = 0
    error: Optional[str] = None


@dataclass
class Launch:
    """One kernel launch of a case: one specialization, or an autotuned launch's configurations
    (every one of them when `complete`)."""
    kernel: str
    case: str
    complete: bool
    specs: List[int] = field(default_factory=list)  # indexes into _Collector.compiled


# The fork-started compile workers find their work here: (JIT function, signature, constexprs,
# attrs, options) per unique specialization, in _Collector.compiled's order.
_JOBS: List[tuple] = []
_TARGET: Optional[GPUTarget] = None


def _compile_job(index: int) -> Tuple[int, int, Optional[str]]:
    fn, signature, constexprs, attrs, options = _JOBS[index]
    try:
        kernel = triton_compile(ASTSource(fn, signature, constexprs, attrs), target=_TARGET, options=options)
        return index, int(kernel.metadata.shared), None
    except Exception as exc:  # any compiler error is a finding, reported with its last line
        return index, 0, f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"


def _config_text(kwargs: dict) -> str:
    keys = sorted(k for k in kwargs if k.isupper() or k in ("num_warps", "num_stages"))
    return " ".join(f"{k}={kwargs[k]}" for k in keys)


class _Collector:
    """Stands in for kernel launches: binds each launch's arguments as Triton would for the
    target and keeps the distinct specializations, to be compiled afterwards."""

    def __init__(self, arch: int):
        self.arch = arch
        self.target = GPUTarget("cuda", arch, 32)
        self.backend = make_backend(self.target)
        self.compiled: List[Compiled] = []
        self.launches: List[Launch] = []
        self.jobs: List[tuple] = []
        self.case = ""
        self._index: Dict[tuple, int] = {}
        self._binders: Dict[int, Callable] = {}

    def add(self, fn, args, kwargs, launch: Launch) -> None:
        kwargs = dict(kwargs)
        kwargs.setdefault("debug", False)
        binder = self._binders.get(id(fn))
        if binder is None:
            binder = triton_jit.create_function_from_signature(fn.signature, fn.params, self.backend)
            self._binders[id(fn)] = binder
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(self.backend, kwargs, bound,
                                                              specialization, options)
        key = (fn.__name__, str(signature), str(constexprs), str(attrs), str(options.__dict__))
        if key not in self._index:
            self._index[key] = len(self.compiled)
            self.compiled.append(Compiled(fn.__name__, self.arch, self.case, _config_text(kwargs)))
            self.jobs.append((fn, signature, constexprs, attrs, options.__dict__))
        launch.specs.append(self._index[key])

    @contextlib.contextmanager
    def instead_of_launches(self):
        collector = self

        def jit_run(fn, *args, grid, warmup, **kwargs):
            launch = Launch(fn.__name__, collector.case, True)
            collector.launches.append(launch)
            collector.add(fn, args, kwargs, launch)

        def autotune_run(tuner, *args, **kwargs):
            kwargs.pop("grid", None)
            kwargs.pop("warmup", None)
            tuner.nargs = dict(zip(tuner.arg_names, args))
            configs = tuner.prune_configs(kwargs)
            launch = Launch(tuner.fn.__name__, collector.case, True)
            collector.launches.append(launch)
            for config in configs:
                options = {k: v for k, v in config.all_kwargs().items() if v is not None}
                collector.add(tuner.fn, args, {**kwargs, **options}, launch)

        saved = (triton_jit.JITFunction.run, triton_autotuner.Autotuner.run, _launch._device_programs)
        triton_jit.JITFunction.run = jit_run
        triton_autotuner.Autotuner.run = autotune_run
        _launch._device_programs = lambda device: GPU_PROGRAMS
        try:
            yield
        finally:
            triton_jit.JITFunction.run, triton_autotuner.Autotuner.run, _launch._device_programs = saved

    def compile_all(self, workers: int) -> None:
        """Compiles every collected specialization, in `workers` forked processes (a Triton
        compile is single-threaded; fork hands the workers the JIT functions as they are)."""
        global _JOBS, _TARGET
        _JOBS, _TARGET = self.jobs, self.target
        try:
            if workers > 1 and len(self.jobs) > 1:
                with multiprocessing.get_context("fork").Pool(workers) as pool:
                    results = list(pool.imap_unordered(_compile_job, range(len(self.jobs))))
            else:
                results = [_compile_job(i) for i in range(len(self.jobs))]
        finally:
            _JOBS, _TARGET = [], None
        for index, shared, error in results:
            self.compiled[index].shared, self.compiled[index].error = shared, error

    def failures(self) -> List[str]:
        limit = SHARED_LIMIT[self.arch]
        out = [f"{c.kernel} [{c.case}; {c.config}]: {c.error}" for c in self.compiled if c.error]
        for launch in self.launches:
            built = [self.compiled[i] for i in launch.specs if not self.compiled[i].error]
            if launch.complete and built and all(c.shared > limit for c in built):
                out.append(f"{launch.kernel} [{launch.case}]: every configuration needs more shared memory "
                           f"than sm_{self.arch}'s {limit} bytes (least {min(c.shared for c in built)})")
        return out


# ---------------------------------------------------------------------------------------------
# What the launchers are called with: every constexpr branch and block-size choice they make
# ---------------------------------------------------------------------------------------------

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _single_cases(quick: bool) -> Iterator[Tuple[str, bool, Callable[[], None]]]:
    # M = 1, 16, 64 are the decode configurations' three BLOCK_M; 300 takes the tiled ones. 64
    # is also the most rows at the shrink's deepest step (its shared memory, _shrink_block_k).
    # r = 1, 64, 256: the rank blocks 16, 64 and 128 (64 in the GEMMs). (33, 17): K and N with
    # no divisibility for Triton to specialize on.
    rows = (1, 64, 300) if quick else (1, 16, 64, 300)
    ranks = (16, 256) if quick else (1, 64, 256)
    for dname, M, r, (K, N), p in itertools.product(DTYPES, rows, ranks, ((256, 384), (33, 17)), (0.0, 0.1)):
        dtype = DTYPES[dname]
        if quick and K == 33 and r != 16:
            continue

        def run(M=M, r=r, K=K, N=N, p=p, dtype=dtype, seed=1234):
            x, w, b = torch.empty(M, K, dtype=dtype), torch.empty(N, K, dtype=dtype), torch.empty(N, dtype=dtype)
            a, bb = torch.empty(r, K, dtype=dtype), torch.empty(N, r, dtype=dtype)
            _, s = single.lora_linear_fwd(x, w, b, a, bb, 0.5, p, seed)
            dy = torch.empty(M, N, dtype=dtype)
            single.lora_linear_bwd(dy, x, w, a, bb, s, 0.5, p, seed, (True, True, True))
            if M == 1:  # the output masks that change what the backward's kernels compute
                single.lora_linear_bwd(dy, x, w, a, bb, s, 0.5, p, seed, (True, False, False))
                single.lora_linear_bwd(dy, x, w, a, bb, s, 0.5, p, seed, (False, False, True))

        # --quick compiles every autotune configuration for bf16 (what the GPU targets are set
        # in) and fp32 without dropout (the most shared memory; ieee dots only, see run_check), at
        # the largest rank block and aligned sizes, and the default configuration for every
        # other set of constexpr flags.
        every_config = not quick or (r == max(ranks) and K == 256 and M != 64 and
                                     (dname == "bf16" or (dname == "fp32" and p == 0.0)))
        yield f"lora_linear {dname} M={M} r={r} K={K} N={N} p={p}", every_config, run
        if p > 0 and (not quick or (K == 256 and r == min(ranks) and M != 64)):
            # The kernels that read a seed on the device (a pointer; SEED_ON_DEVICE), in their
            # default configurations: the load adds nothing a configuration, a tile or a rank
            # block could fail on (--quick: each dtype, at the decode and the tiled row blocks).
            yield (f"lora_linear {dname} M={M} r={r} K={K} N={N} p={p} seed on device", False,
                   functools.partial(run, seed=torch.tensor(1234)))


def _multi_cases(quick: bool) -> Iterator[Tuple[str, bool, Callable[[], None]]]:
    # Token form (decode) and segment form (prefill); one slice and packed q|k|v; r_max 16 / 128.
    rows = (300,) if quick else (4, 300)
    index_dtypes = (torch.int32,) if quick else (torch.int32, torch.int64)
    for dname, M, r_max, slices, idx in itertools.product(DTYPES, rows, (16, 128), (1, 3), index_dtypes):
        dtype = DTYPES[dname]

        def run(M=M, r_max=r_max, slices=slices, idx=idx, dtype=dtype):
            L, K, width = 3, 256, 128
            x = torch.empty(M, K, dtype=dtype)
            lora_a = [torch.empty(L, r_max, K, dtype=dtype) for _ in range(slices)]
            lora_b = [torch.empty(L, width, r_max, dtype=dtype) for _ in range(slices)]
            scalings, ranks = torch.ones(L), torch.full((L,), r_max, dtype=idx)
            y = torch.empty(M, width * slices, dtype=dtype)
            offsets = [s * width for s in range(slices)]
            token = {"token_adapter": torch.zeros(M, dtype=idx)}
            segments = {"seg_indptr": torch.tensor([0, M // 2, M], dtype=idx),
                        "seg_adapter": torch.tensor([0, 2], dtype=idx)}
            for index in (token, segments):
                t = multi.multi_lora_shrink(x, lora_a, scalings, ranks, **index)
                multi.multi_lora_expand(y, t, lora_b, offsets, ranks, **index)

        yield f"multi_lora {dname} M={M} r_max={r_max} slices={slices} {str(idx)[6:]}", True, run


def cases(quick: bool) -> List[Tuple[str, bool, Callable[[], None]]]:
    """(name, whether autotuned launches compile every configuration, the launcher calls)"""
    return list(_single_cases(quick)) + list(_multi_cases(quick))


def kernels() -> List[str]:
    """Every kernel the launchers can launch: the module-level JIT functions named *_kernel."""
    names = []
    for module in (single, multi):
        for name, obj in vars(module).items():
            fn = obj.fn if isinstance(obj, triton_autotuner.Autotuner) else obj
            if name.endswith("_kernel") and isinstance(fn, triton_jit.JITFunction):
                names.append(name)
    return sorted(names)


@contextlib.contextmanager
def _tuning(on: bool) -> Iterator[None]:
    saved = os.environ.get(_launch.AUTOTUNE_ENV)
    os.environ[_launch.AUTOTUNE_ENV] = "1" if on else "0"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(_launch.AUTOTUNE_ENV)
        else:
            os.environ[_launch.AUTOTUNE_ENV] = saved


def run_check(arch: int, quick: bool, workers: int) -> _Collector:
    """Every case's launches for sm_`arch` with tuning off (the default configurations, which
    must fit), then, for the cases that take every configuration, with tuning on; fp32 cases
    twice (torch's allow_tf32 off and on, which switches the fp32 dots to tf32). Then the
    compiles; a specialization launched both ways is compiled once."""
    collector = _Collector(arch)
    saved_tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        with collector.instead_of_launches():
            for allow_tf32 in (False, True):
                torch.backends.cuda.matmul.allow_tf32 = allow_tf32
                for name, every_config, run in cases(quick):
                    if allow_tf32 and "fp32" not in name:
                        continue
                    collector.case = name + (" tf32" if allow_tf32 else "")
                    with _tuning(False):
                        run()
                    # tf32 changes the dots' instructions, not the tiles' shared memory
                    if every_config and not (quick and allow_tf32):
                        with _tuning(True):
                            run()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved_tf32
    collector.compile_all(workers)
    return collector


def summary(collector: _Collector) -> str:
    limit = SHARED_LIMIT[collector.arch]
    lines = [f"sm_{collector.arch} (shared memory limit {limit} bytes), Triton {triton.__version__}:",
             f"  {'kernel':<24} {'compiled':>8} {'errors':>6} {'over shared':>11} {'max shared':>10}"]
    for name in kernels():
        mine = [c for c in collector.compiled if c.kernel == name]
        lines.append(f"  {name:<24} {len(mine):>8} {sum(bool(c.error) for c in mine):>6} "
                     f"{sum(c.shared > limit for c in mine):>11} {max((c.shared for c in mine), default=0):>10}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_ops.triton.compile_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, action="append", choices=sorted(SHARED_LIMIT),
                        help="compute capability as 80 or 90 (repeatable; default both)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer shapes and configurations, every kernel, dtype and flag kept (for CI)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="compile processes")
    parser.add_argument("--json", help="write every compiled specialization here")
    args = parser.parse_args(argv)
    failed, done = [], []
    for arch in args.arch or sorted(SHARED_LIMIT, reverse=True):
        start = time.perf_counter()
        collector = run_check(arch, args.quick, args.workers)
        done.append(collector)
        print(summary(collector))
        print(f"  {len(collector.compiled)} specializations in {time.perf_counter() - start:.0f} s")
        missing = [k for k in kernels() if not any(c.kernel == k for c in collector.compiled)]
        failed += [f"sm_{arch}: {k}: no case launched it" for k in missing]
        failed += [f"sm_{arch}: {f}" for f in collector.failures()]
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"arch": c.arch, "triton": triton.__version__,
                        "compiled": [asdict(x) for x in c.compiled]} for c in done], f, indent=1)
    for line in failed:
        print("FAILED", line)
    print("compile check:", "failed" if failed else "passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
