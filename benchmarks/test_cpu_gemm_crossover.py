"""Tests of the CPU GEMM crossover tool's own logic (benchmarks/cpu_gemm_crossover.py); nothing
asserts on time."""
import importlib.util
import os

import pytest
import torch

import lora_ops

_spec = importlib.util.spec_from_file_location(
    "cpu_gemm_crossover", os.path.join(os.path.dirname(__file__), "cpu_gemm_crossover.py"))
crossover = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(crossover)

needs_cpu_ops = pytest.mark.skipif("cpu" not in lora_ops.available_backends().get("cpu", []),
                                   reason="the compiled CPU backend is not built")


def test_parse_shape_takes_m_k_n_and_an_optional_rank():
    assert crossover.parse_shape("M=192,K=4096,N=1024") == {"M": 192, "K": 4096, "N": 1024, "r": 16}
    assert crossover.parse_shape("M=1,K=8,N=4,r=3")["r"] == 3
    for bad in ("M=1,K=8", "M=1,K=8,N=x", "M=1,K=8,N=4,T=2"):
        with pytest.raises(SystemExit, match="--shape"):
            crossover.parse_shape(bad)


@needs_cpu_ops
@pytest.mark.parametrize("op", ["fwd", "bwd"])
def test_measure_times_each_gemm_and_restores_the_environment(monkeypatch, op):
    monkeypatch.setenv("LORA_OPS_CPU_GEMM", "auto")
    seen = []
    real = crossover.calls

    def spying_calls(*args, **kwargs):
        fns = real(*args, **kwargs)
        timed = fns["op"]
        fns["op"] = lambda: (seen.append(os.environ["LORA_OPS_CPU_GEMM"]), timed())
        return fns

    monkeypatch.setattr(crossover, "calls", spying_calls)
    times = crossover.measure(op, {"M": 5, "K": 24, "N": 7, "r": 2}, torch.float32, rounds=3)
    assert {name: len(t) for name, t in times.items()} == {"builtin": 3, "aten": 3, "base": 3}
    assert seen == ["builtin", "aten"] * 5  # two warm-up rounds, then three timed, alternating
    assert os.environ["LORA_OPS_CPU_GEMM"] == "auto"
    line = crossover.report("M=5,K=24,N=7", times)
    assert "builtin/aten" in line and "builtin/base" in line

