"""benchmarks/bench_op_overhead.py still runs against the ops as they are (its calls of the op
carry the op's argument list, which a schema change would otherwise break unnoticed): a tiny
run, asserting only that both tables come out; nothing asserts on time."""
import importlib.util
import os

import pytest

from lora_ops import _backend

_spec = importlib.util.spec_from_file_location(
    "bench_op_overhead", os.path.join(os.path.dirname(__file__), "bench_op_overhead.py"))
bench_op_overhead = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_op_overhead)


@pytest.mark.skipif(not _backend.compiled(), reason="the compiled library is not built")
def test_tiny_run_prints_both_tables(capsys):
    assert bench_op_overhead.main(["--shape", "M=2,K=16,N=8,r=2", "--calls", "10",
                                   "--warmup", "5"]) == 0
    out = capsys.readouterr().out
    for row in ("| requires_grad ", "| below_autograd ", "| lora_linear() ", "| LoRALinear "):
        assert row in out
