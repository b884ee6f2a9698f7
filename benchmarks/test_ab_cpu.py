"""Tests of the A/B timing tool's own logic (benchmarks/ab_cpu.py); nothing asserts on time."""
import ctypes
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


def test_parse_case_takes_the_shapes_of_its_op_in_the_bench_syntax():
    case = ab_cpu.parse_case("M=64,K=2048,N=1024,r=16,dtype=bf16", "fp32", "fwd")
    assert (case.M, case.K, case.N, case.r, case.dtype) == (64, 2048, 1024, 16, "bf16")
    with pytest.raises(ValueError, match="--op bwd times M="):
        ab_cpu.parse_case("T=64,U=16,K=2048,N=2048,r=16", "fp32", "bwd")
    with pytest.raises(ValueError, match="lacks r="):
        ab_cpu.parse_case("M=64,K=2048,N=1024", "fp32", "fwd")
    multi = ab_cpu.parse_case("T=64,U=16,K=2048,N=512,r=16,dist=identical,index=segment",
                              "fp16", "multi_fwd")
    assert (multi.T, multi.U, multi.N, multi.dist, multi.index, multi.dtype) == (
        64, 16, 512, "identical", "segment", "fp16")
    with pytest.raises(ValueError, match="--op multi_fwd times T="):
        ab_cpu.parse_case("M=64,K=2048,N=1024,r=16", "fp32", "multi_fwd")


def library(version: bytes, **functions):
    """A stand-in for a ctypes.CDLL of the C ABI at `version` with these functions."""
    lib = type("Library", (), {})()
    lib.lora_ops_version = lambda: version
    for name, fn in functions.items():
        setattr(lib, name, fn)
    return lib


def test_both_builds_share_the_buffers_and_rotate_the_weight_copies():
    case = ab_cpu.parse_case("M=2,K=8,N=4,r=1", "fp32", "fwd")
    buffers = ab_cpu.linear_buffers(case, copies=3)
    assert len(buffers["weights"]) == 3
    seen = {"a": [], "b": []}

    def fake_lib(name):
        def fwd(*args):
            seen[name].append(args[7].value)  # the weight's address
            return 0
        return library(b"0.2.0", lora_ops_cpu_lora_linear_fwd=fwd)

    calls = [ab_cpu.KernelCall(fake_lib(name), "fwd", case, buffers) for name in ("a", "b")]
    for _ in range(4):
        for call in calls:
            call()
    addresses = [w.data_ptr() for w in buffers["weights"]]
    assert seen["a"] == seen["b"] == addresses + addresses[:1]


def test_outputs_are_parsed_in_the_c_abi_order_and_checked():
    assert ab_cpu.parse_outputs("db,dx") == ("dx", "db")
    for bad in ("dw", "", "dx,dq"):
        with pytest.raises(ValueError, match="--outputs"):
            ab_cpu.parse_outputs(bad)


def test_no_dropout_takes_the_layout_of_the_library_it_is_passed_to():
    """lora_dropout_t grew seed_ptr in C ABI 0.2; a base tree built before that takes the old
    3-field struct, and one of the wrong size, passed by value, would shift the arguments."""
    new, old = ab_cpu.no_dropout(library(b"0.2.0")), ab_cpu.no_dropout(library(b"0.1.0"))
    assert [name for name, _ in type(new)._fields_][-1] == "seed_ptr" and new.seed_ptr is None
    assert ctypes.sizeof(old) == 12 and ctypes.sizeof(new) == 16 + ctypes.sizeof(ctypes.c_void_p)
    assert (new.threshold, old.threshold, new.keep_scale, old.keep_scale) == (0, 0, 1.0, 1.0)
