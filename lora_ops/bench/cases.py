"""What one benchmark measures: an op on one shape, and the suites of DESIGN.md built from them.

A `Job` is one op on one case, timed in one or more modes ("fwd", "fwd+bwd"). Suites are lists
of jobs in priority order: a run with a time budget measures the head of the list and records
the rest as skipped, so the targets' shapes come first.
"""
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from lora_ops.bench.adapter_mix import DISTRIBUTIONS, check_distribution

DTYPES: Dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SINGLE_OP = "lora_linear"
MULTI_OPS = ("shrink", "expand", "multi_lora_linear")
OPS = (SINGLE_OP,) + MULTI_OPS
MODES = ("fwd", "fwd+bwd")
INDEX_FORMS = ("token", "segment")

# DESIGN.md's mixed ranks, in the order adapters take them (adapter a has rank MIXED[a % 3]),
# so a pool of one adapter has the middle rank.
MIXED_RANKS = (16, 64, 8)
NONE_FRACTION = 0.10  # share of tokens on -1 (base only) in the multi-adapter suite

LLAMA_LAYERS = ((4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096))  # (K, N)
SUITE_M = (1, 16, 64, 256, 1024, 4096, 16384)
SUITE_RANKS = (8, 16, 64, 128)
SUITE_T = (1, 16, 64, 256, 2048)
SUITE_U = (1, 4, 16, 64)


@dataclass(frozen=True)
class LinearCase:
    """Single adapter: x [M, K], weight [N, K], lora_a [r, K], lora_b [N, r]."""
    M: int
    K: int
    N: int
    r: int
    dtype: str

    def label(self) -> str:
        return f"M={self.M} K={self.K} N={self.N} r={self.r} {self.dtype}"

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class MultiCase:
    """Multi-adapter: T tokens over a pool of U adapters drawn by `dist`, some on -1.

    Adapter a has rank ranks[a % len(ranks)]; the stacks are [U, r_max, K] and [U, N, r_max].
    `index` is the index form the lora_ops ops receive ("token": token_adapter, "segment":
    tokens grouped by adapter, seg_indptr + seg_adapter).
    """
    T: int
    U: int
    K: int
    N: int
    ranks: Tuple[int, ...]
    dist: str
    index: str
    none_frac: float
    dtype: str

    @property
    def r_max(self) -> int:
        return max(self.ranks[a % len(self.ranks)] for a in range(self.U))

    def adapter_rank(self, adapter: int) -> int:
        return self.ranks[adapter % len(self.ranks)]

    def label(self) -> str:
        ranks = "/".join(str(r) for r in self.ranks)
        return (f"T={self.T} U={self.U} K={self.K} N={self.N} r={ranks} {self.dist} "
                f"{self.index} -1:{round(100 * self.none_frac)}% {self.dtype}")

    def as_dict(self) -> dict:
        d = asdict(self)
        d["ranks"] = list(self.ranks)
        d["r_max"] = self.r_max
        return d


Case = Union[LinearCase, MultiCase]


@dataclass(frozen=True)
class Job:
    op: str
    case: Case
    modes: Tuple[str, ...]


def allowed_modes(op: str) -> Tuple[str, ...]:
    """shrink and expand are inference kernels (their backward is shrink/expand again)."""
    return MODES if op in (SINGLE_OP, "multi_lora_linear") else ("fwd",)


def _linear_jobs(layers, ms, ranks, dtype) -> List[Job]:
    return [Job(SINGLE_OP, LinearCase(m, k, n, r, dtype), MODES)
            for r in ranks for (k, n) in layers for m in ms]


def _multi_jobs(tu_pairs, dists, index_forms, dtype, k=4096, n=4096, ranks=MIXED_RANKS,
                ops=MULTI_OPS, layer_modes=MODES) -> List[Job]:
    jobs = []
    for t, u in tu_pairs:
        for dist in dists:
            if dist == "distinct" and u < t:
                continue
            for index in index_forms:
                case = MultiCase(t, u, k, n, tuple(ranks), dist, index, NONE_FRACTION, dtype)
                for op in ops:
                    modes = layer_modes if op == "multi_lora_linear" else ("fwd",)
                    jobs.append(Job(op, case, modes))
    return jobs


def _design_tu_pairs() -> List[Tuple[int, int]]:
    return [(t, u) for t in SUITE_T for u in SUITE_U if u <= t]


def full_suite() -> List[Job]:
    """All of DESIGN.md: 4 layers x 7 M x 4 ranks in bf16, fp16/fp32 spot checks, and the
    multi-adapter grid (T x U <= T x 5 distributions x both index forms, mixed ranks)."""
    jobs = _linear_jobs(LLAMA_LAYERS, SUITE_M, (16, 8, 64, 128), "bf16")
    for dtype in ("fp16", "fp32"):
        jobs += _linear_jobs(LLAMA_LAYERS[:1], (16, 4096), (16,), dtype)
    jobs += _multi_jobs(_design_tu_pairs(), DISTRIBUTIONS, INDEX_FORMS, "bf16")
    return jobs


def gpu_suite() -> List[Job]:
    """The bounded GPU suite of scripts/gpu_check.sh, most telling jobs first: T1/T2 at r=16 on
    the square layer, decode multi-adapter (T4), the other layers, prefill, the other
    distributions, the other ranks, then fp16/fp32 spot checks."""
    jobs = _linear_jobs(LLAMA_LAYERS[:1], SUITE_M, (16,), "bf16")
    jobs += _multi_jobs([(1, 1), (16, 4), (16, 16), (64, 16), (64, 64)], ("uniform",),
                        ("token",), "bf16")
    jobs += _linear_jobs(LLAMA_LAYERS[1:], SUITE_M, (16,), "bf16")
    jobs += _multi_jobs([(256, 16), (2048, 64)], ("uniform",), INDEX_FORMS, "bf16")
    jobs += _multi_jobs([(64, 16)], ("uniform",), ("segment",), "bf16")
    jobs += _multi_jobs([(64, 16), (2048, 64)], ("zipf:1.5", "skewed", "identical"),
                        ("token",), "bf16", layer_modes=("fwd",))
    jobs += _multi_jobs([(16, 16), (64, 64)], ("distinct",), ("token",), "bf16",
                        layer_modes=("fwd",))
    jobs += _linear_jobs(LLAMA_LAYERS[:1], (1, 16, 1024, 4096), (8, 64, 128), "bf16")
    for dtype in ("fp16", "fp32"):
        jobs += _linear_jobs(LLAMA_LAYERS[:1], (16, 4096), (16,), dtype)
    return jobs


def cpu_suite() -> List[Job]:
    """The reduced CPU suite (a few minutes on 2 cores), fp32 unless named: C1's decode shapes
    (M = 1 and 16 at 4096x4096) and C2's mixed batch (T=64, U=16, K=N=2048, r=16) first."""
    jobs = _linear_jobs(LLAMA_LAYERS[:1], (1, 16), (16,), "fp32")
    jobs += _multi_jobs([(64, 16)], ("uniform",), INDEX_FORMS, "fp32", k=2048, n=2048,
                        ranks=(16,))
    jobs += _linear_jobs(LLAMA_LAYERS[:1], (64,), (16,), "fp32")
    jobs += _linear_jobs(LLAMA_LAYERS[1:2], (1, 16, 256), (16,), "fp32")
    jobs += _linear_jobs(LLAMA_LAYERS[2:], (16,), (16,), "fp32")
    jobs += _linear_jobs(LLAMA_LAYERS[:1], (16,), (64,), "fp32")
    jobs += _linear_jobs(LLAMA_LAYERS[:1], (16,), (16,), "bf16")
    jobs += _multi_jobs([(64, 16)], ("zipf:1.5", "skewed", "identical"), ("token",), "fp32",
                        k=2048, n=2048, ranks=(16,), ops=("multi_lora_linear",),
                        layer_modes=("fwd",))
    jobs += _multi_jobs([(16, 16)], ("distinct",), ("token",), "fp32", k=2048, n=2048,
                        ranks=(16,), ops=("multi_lora_linear",), layer_modes=("fwd",))
    jobs += _multi_jobs([(64, 16)], ("uniform",), ("token",), "fp32", k=2048, n=2048,
                        ops=("multi_lora_linear",), layer_modes=("fwd",))
    jobs += _multi_jobs([(1, 1), (256, 16)], ("uniform",), ("token",), "fp32", k=2048,
                        n=2048, ranks=(16,), ops=("multi_lora_linear",))
    return jobs


def quick_suite() -> List[Job]:
    """Small shapes that run in seconds anywhere: a smoke test of the engine, not a measurement."""
    jobs = _linear_jobs([(256, 384)], (1, 33), (8,), "fp32")
    jobs += _multi_jobs([(7, 3)], ("uniform",), INDEX_FORMS, "fp32", k=256, n=384,
                        ranks=(8, 4))
    return jobs


SUITES = {"full": full_suite, "gpu": gpu_suite, "cpu": cpu_suite, "quick": quick_suite}


def parse_shape(spec: str, default_dtype: str) -> Case:
    """A case from 'M=16,K=4096,N=4096,r=16[,dtype=bf16]' (single adapter) or
    'T=64,U=16,K=2048,N=2048,r=16|8/16/64|mixed[,dist=uniform][,index=token][,none=0.1][,dtype=..]'."""
    fields = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not value:
            raise ValueError(f"bench: --shape '{spec}': '{part}' is not key=value")
        fields[key.strip()] = value.strip()
    dtype = fields.pop("dtype", default_dtype)
    if dtype not in DTYPES:
        raise ValueError(f"bench: --shape '{spec}': dtype '{dtype}' is not one of {', '.join(DTYPES)}")

    def take_int(key: str, default: Optional[int] = None) -> int:
        if key not in fields:
            if default is None:
                raise ValueError(f"bench: --shape '{spec}' lacks {key}=")
            return default
        value = int(fields.pop(key))
        if value < 1 and key != "M":
            raise ValueError(f"bench: --shape '{spec}': {key} must be >= 1, got {value}")
        return value

    if "M" in fields:
        case: Case = LinearCase(take_int("M"), take_int("K"), take_int("N"), take_int("r"), dtype)
    elif "T" in fields:
        t, u, k, n = take_int("T"), take_int("U"), take_int("K"), take_int("N")
        ranks_text = fields.pop("r", "mixed")
        ranks = MIXED_RANKS if ranks_text == "mixed" else tuple(int(v) for v in ranks_text.split("/"))
        dist = fields.pop("dist", "uniform")
        index = fields.pop("index", "token")
        none_frac = float(fields.pop("none", NONE_FRACTION))
        check_distribution(dist, t, u)
        if index not in INDEX_FORMS:
            raise ValueError(f"bench: --shape '{spec}': index '{index}' is not one of "
                             f"{', '.join(INDEX_FORMS)}")
        if min(ranks) < 1 or not 0.0 <= none_frac <= 1.0:
            raise ValueError(f"bench: --shape '{spec}': ranks must be >= 1 and none in [0, 1]")
        case = MultiCase(t, u, k, n, ranks, dist, index, none_frac, dtype)
    else:
        raise ValueError(f"bench: --shape '{spec}' names neither M= (lora_linear) nor T= (multi-adapter)")
    if fields:
        raise ValueError(f"bench: --shape '{spec}': unknown keys {', '.join(sorted(fields))}")
    return case


def select_jobs(jobs: Sequence[Job], ops: Sequence[str], modes: Sequence[str],
                dtype: Optional[str]) -> List[Job]:
    """Keep the jobs of `ops`, restricted to `modes`; with `dtype`, every case takes that dtype
    (duplicates that this creates are dropped, first kept)."""
    out, seen = [], set()
    for job in jobs:
        if job.op not in ops:
            continue
        case = job.case
        if dtype is not None and case.dtype != dtype:
            case = type(case)(**{**case.__dict__, "dtype": dtype})
        kept = tuple(m for m in job.modes if m in modes and m in allowed_modes(job.op))
        key = (job.op, case)
        if kept and key not in seen:
            seen.add(key)
            out.append(Job(job.op, case, kept))
    return out


def explicit_jobs(specs: Sequence[str], ops: Sequence[str], default_dtype: str) -> List[Job]:
    """Jobs for --shape specs: single-adapter specs feed lora_linear, multi specs the multi ops."""
    jobs = []
    for spec in specs:
        case = parse_shape(spec, default_dtype)
        wanted = [SINGLE_OP] if isinstance(case, LinearCase) else list(MULTI_OPS)
        jobs += [Job(op, case, allowed_modes(op)) for op in wanted if op in ops]
    return jobs
