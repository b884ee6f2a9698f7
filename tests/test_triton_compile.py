"""The Triton kernels compile for a GPU (sm_90, sm_80), with the GPU's configurations and operand dtypes,
on a machine without one: lora_ops.triton.compile_check, which the interpreter-run tests cannot
stand in for (the interpreter compiles nothing and feeds tl.dot fp32 tiles).

Each test runs the check in a process of its own: this test session may have imported Triton
with TRITON_INTERPRET=1, and the check needs the JIT functions themselves.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]


def _run(args, timeout):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # lora_ops from this tree also where it is built in place, not installed (scripts/gpu_check.sh)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the Triton tests compile and run "
                    "the kernels themselves (and this would take minutes of the GPU check)")
def test_every_triton_kernel_compiles_for_sm90_and_sm80_in_every_dtype(tmp_path):
    # sm_80 too: its 163 KB of shared memory is what the default configurations are sized for.
    out = tmp_path / "compiled.json"
    proc = _run(["-m", "lora_ops.triton.compile_check", "--quick", "--arch", "90", "--arch", "80",
                 "--json", str(out)], timeout=3000)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    reports = json.loads(out.read_text())
    assert sorted(r["arch"] for r in reports) == [80, 90]
    compiled = [c for r in reports for c in r["compiled"]]
    assert compiled and all(c["error"] is None for c in compiled)
    # The coverage the check claims: every kernel with an operand dtype was compiled in each one
    # the GPU runs it in, fp32 dots as tf32 too, and the autotuned GEMMs in every configuration.
    by_kernel = {}
    for c in compiled:
        by_kernel.setdefault(c["kernel"], []).append(c["config"])
    for kernel, configs in by_kernel.items():
        if any("OPERAND=" in text for text in configs):
            for operand in ("OPERAND=fp32", "OPERAND=fp16", "OPERAND=bf16", "PRECISION=tf32"):
                assert any(operand in text for text in configs), (kernel, operand)
    from lora_ops.triton.lora_linear import _DECODE_TILES, _TILED_TILES
    for kernel in ("_fwd_gemm_kernel", "_dx_gemm_kernel"):
        tiles = set()
        for text in by_kernel[kernel]:
            v = dict(item.split("=") for item in text.split())
            if v["OPERAND"] == "bf16":
                tiles.add(tuple(int(v[k]) for k in ("BLOCK_M", "BLOCK_COL", "BLOCK_RED", "num_stages",
                                                     "num_warps")))
        # --quick compiles every configuration at M = 1 (the decode tiles of 16 rows) and
        # M = 300 (the tiled ones), and the default one at M = 64
        assert tiles >= {t for t in _DECODE_TILES if t[0] == 16} | set(_TILED_TILES), kernel

def test_what_the_interpreter_runs_but_a_gpu_cannot_is_reported(tmp_path):
    # A plain Python call in a kernel runs in the interpreter (tests/ would pass) but has no
    # body for the compiler; a 256 x 256 fp32 tl.dot tile compiles but needs 512 KB of shared
    # memory, past sm_90's 227 KB. The check names both, with the case and configuration, and
    # passes the 64 x 64 launch of the same kernel.
    script = textwrap.dedent("""
        import torch, triton, triton.language as tl
        from lora_ops.triton.compile_check import _Collector

        def _twice(v):
            return v * 2

        @triton.jit
        def _plain_call_kernel(ptr, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            tl.store(ptr + offs, _twice(tl.load(ptr + offs)))

        @triton.jit
        def _big_tile_kernel(ptr, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            a = tl.load(ptr + offs[:, None] * BLOCK + offs[None, :])
            tl.store(ptr + offs[:, None] * BLOCK + offs[None, :], tl.dot(a, a))

        collector = _Collector(90)
        collector.case = "tiny"
        with collector.instead_of_launches():
            _plain_call_kernel[(1,)](torch.empty(16), BLOCK=16)
            _big_tile_kernel[(1,)](torch.empty(256, 256), BLOCK=256)
            _big_tile_kernel[(1,)](torch.empty(64, 64), BLOCK=64)
        collector.compile_all(workers=2)
        for line in collector.failures():
            print("FAILURE", line)
    """)
    path = tmp_path / "kernels.py"  # Triton reads a kernel's source from its file
    path.write_text(script)
    proc = _run([str(path)], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    failures = sorted(line for line in proc.stdout.splitlines() if line.startswith("FAILURE"))
    assert len(failures) == 2, proc.stdout
    assert failures[0].startswith("FAILURE _big_tile_kernel [tiny]: every configuration needs more shared")
    assert "(least 524288)" in failures[0]
    assert failures[1].startswith("FAILURE _plain_call_kernel [tiny; BLOCK=16]: ")
    assert "_twice" in failures[1]
