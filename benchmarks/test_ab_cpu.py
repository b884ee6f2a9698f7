"""Tests of the A/B timing tool's own logic (benchmarks/ab_cpu.py); nothing asserts on time."""
import argparse
import importlib.util
import os
import sys

import pytest

_spec = importlib.util.spec_from_file_location(
    "ab_cpu", os.path.join(os.path.dirname(__file__), "ab_cpu.py"))
ab_cpu = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = ab_cpu  # dataclasses look their module up there
_spec.loader.exec_module(ab_cpu)


def test_paired_ratio_is_the_median_of_per_round_ratios():
    base = [10.0, 20.0, 30.0, 40.0, 50.0]
    new = [5.0, 20.0, 60.0, 20.0, 25.0]  # ratios 0.5, 1, 2, 0.5, 0.5
    ratio, faster = ab_cpu.paired_ratio(base, new)
    assert ratio == 0.5
    assert faster == pytest.approx(3 / 5)
    # A drift shared by both builds (round 3 three times slower) does not move the verdict.
    assert ab_cpu.paired_ratio([1.0, 1.0, 3.0], [0.9, 0.9, 2.7])[0] == pytest.approx(0.9)


def test_time_interleaved_alternates_which_build_runs_first():
    order = []
    calls = [lambda: order.append("a"), lambda: order.append("b")]
    times = ab_cpu.time_interleaved(calls, rounds=4)
    assert order[:2] == ["a", "b"]  # the warm-up
    assert order[2:] == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert [len(t) for t in times] == [4, 4] and all(s >= 0 for t in times for s in t)


def test_parse_case_reads_m_k_n_r_and_rejects_anything_else():
    case = ab_cpu.parse_case("bwd", "64,2048,1024,16", "bf16")
    assert (case.M, case.K, case.N, case.r) == (64, 2048, 1024, 16)
    assert case.label() == "bwd M=64 K=2048 N=1024 r=16 bf16"
    for bad in ("64,2048,1024", "64,2048,1024,x", "a,b,c,d,e"):
        with pytest.raises(argparse.ArgumentTypeError, match="M,K,N,r"):
            ab_cpu.parse_case("fwd", bad, "fp32")
