"""Timers: median and 20/80 quantiles of one call, in microseconds.

CUDA: `triton.testing.do_bench` (device events around each call, L2 flushed in between), over a
rotation of input sets whose total size exceeds L2, so weights come from memory as in a model;
and for decode sizes, replays of a CUDA graph holding the rotation back to back, which removes
the launch gaps a serving engine also removes. CPU: wall clock, the providers of one case
interleaved round by round so that load from other processes spreads over all of them alike.
"""
import itertools
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

Call = Callable[[], object]


@dataclass(frozen=True)
class Timing:
    median_us: float
    q20_us: float
    q80_us: float
    samples: Optional[int]  # None where do_bench chose the count itself
    method: str

    def as_dict(self) -> dict:
        return asdict(self)


def _from_samples(samples_s: Sequence[float], method: str) -> Timing:
    t = torch.tensor(samples_s, dtype=torch.float64) * 1e6
    q = torch.quantile(t, torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)).tolist()
    return Timing(q[0], q[1], q[2], len(samples_s), method)


def time_cuda(calls: Sequence[Call], warmup_ms: float, rep_ms: float) -> Timing:
    """do_bench over the rotation: each timed call takes the next input set."""
    from triton.testing import do_bench

    rotation = itertools.cycle(calls)
    median, q20, q80 = do_bench(lambda: next(rotation)(), warmup=warmup_ms, rep=rep_ms,
                                quantiles=[0.5, 0.2, 0.8])
    return Timing(median * 1e3, q20 * 1e3, q80 * 1e3, None, "do_bench")


def time_cuda_graph(calls: Sequence[Call], samples: int = 25, min_calls: int = 32) -> Timing:
    """Replays of one CUDA graph that runs the rotation ceil(min_calls / len(calls)) times."""
    repeats = max(1, math.ceil(min_calls / len(calls)))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # first calls outside capture: lazy init, allocator warm-up
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            for call in calls:
                call()
    graph.replay()
    torch.cuda.synchronize()
    per_replay = repeats * len(calls)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(samples):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3 / per_replay)
    del graph
    return _from_samples(times, "cuda_graph")


def time_cpu_interleaved(calls_by_name: Dict[str, Sequence[Call]], budget_s: float,
                         min_rounds: int = 5, max_rounds: int = 400,
                         min_sample_s: float = 2e-3, warmup_s: float = 0.05) -> Dict[str, Timing]:
    """Wall-clock samples, one per provider per round, rounds until `budget_s` is spent (at
    least `min_rounds`). A sample averages enough calls to last `min_sample_s`."""
    names = list(calls_by_name)
    inner: Dict[str, int] = {}
    cursor = {name: 0 for name in names}

    def run(name: str, count: int) -> float:
        calls = calls_by_name[name]
        t0 = time.perf_counter()
        for _ in range(count):
            calls[cursor[name] % len(calls)]()
            cursor[name] += 1
        return (time.perf_counter() - t0) / count

    for name in names:
        one = run(name, 1)
        spent, warm = one, 1
        while spent < warmup_s and warm < 50:
            one = run(name, 1)
            spent, warm = spent + one, warm + 1
        inner[name] = max(1, math.ceil(min_sample_s / max(one, 1e-9)))

    samples: Dict[str, List[float]] = {name: [] for name in names}
    start = time.perf_counter()
    rounds = 0
    while rounds < max_rounds and (rounds < min_rounds or time.perf_counter() - start < budget_s):
        shift = rounds % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(run(name, inner[name]))
        rounds += 1
    return {name: _from_samples(s, "wall_clock") for name, s in samples.items()}
