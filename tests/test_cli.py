"""The `lora-ops` command: demo (quick), bench (arguments handed over), info, python -m lora_ops."""
import importlib.metadata
import json
import subprocess
import sys
import types

import pytest
import torch

from lora_ops import build_info
from lora_ops.cli import main


def test_info_reports_versions_device_and_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert importlib.metadata.version("torch") in out
    assert "backends:" in out and "reference" in out


def test_info_json_is_machine_readable(capsys):
    assert main(["info", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["versions"]["torch"] == importlib.metadata.version("torch")
    assert "reference" in report["backends"]["cpu"]
    assert "compiled" in report["build"]


def test_info_names_the_vector_units_the_cpu_kernels_were_built_for(capsys):
    """The CPU GEMM's choices depend on them; a build this CPU lacks could not have run at all."""
    if not build_info()["compiled"]:
        pytest.skip("no compiled library")
    assert main(["info", "--json"]) == 0
    isa = json.loads(capsys.readouterr().out)["build"]["cpu_vector_isa"]
    assert isa in {"avx512", "avx2", "baseline"}
    if isa == "avx512":
        assert torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def test_bench_hands_its_arguments_to_lora_ops_bench(monkeypatch):
    seen = []
    fake = types.ModuleType("lora_ops.bench")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "lora_ops.bench", fake)
    assert main(["bench", "--ops", "lora_linear", "--json", "out.json"]) == 0
    assert seen == [["--ops", "lora_linear", "--json", "out.json"]]


def test_bench_lists_its_cases(capsys):
    assert main(["bench", "--list", "--suite", "quick"]) == 0
    assert "lora_linear" in capsys.readouterr().out


def test_bad_arguments_exit_with_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--steps", "0"])
    assert exit_info.value.code == 2
    assert "must be a positive integer" in capsys.readouterr().err


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "demo" in capsys.readouterr().out


def test_demo_quick_runs_checks_and_saves_peft_adapters(tmp_path, capsys):
    assert main(["demo", "--quick", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "FAILED" not in out and "All checks passed." in out
    for name in ("add1", "add3", "add5"):
        config = json.loads((tmp_path / name / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA"
        assert (tmp_path / name / "adapter_model.safetensors").is_file()


def test_demo_options_each_change_the_run(tmp_path, capsys):
    """--dtype, --steps, --no-compare, --seed and --output-dir all reach the demo."""
    from safetensors.torch import load_file
    adapters = {}
    for seed in (1, 2):
        out_dir = tmp_path / f"seed{seed}"
        assert main(["demo", "--quick", "--no-compare", "--dtype", "bfloat16", "--steps", "16",
                     "--seed", str(seed), "--output-dir", str(out_dir)]) == 0
        out = capsys.readouterr().out
        assert "(bfloat16)" in out and "16 steps" in out
        assert "lockstep with PEFT" not in out and "than PEFT's eager layers" not in out
        adapters[seed] = load_file(str(out_dir / "add1" / "adapter_model.safetensors"))
        assert {t.dtype for t in adapters[seed].values()} == {torch.bfloat16}
    assert adapters[1].keys() == adapters[2].keys()
    assert not any(torch.equal(adapters[1][k], adapters[2][k]) for k in adapters[1]), "--seed had no effect"


def test_info_lists_the_backend_override_and_switches(capsys, monkeypatch):
    monkeypatch.setenv("LORA_OPS_BACKEND", "reference")
    assert main(["info", "--json"]) == 0
    overrides = json.loads(capsys.readouterr().out)["backend_override"]
    assert overrides["LORA_OPS_BACKEND"] == "reference"
    assert "TRITON_INTERPRET" in overrides


def test_demo_unknown_device_is_a_clear_error(capsys):
    assert main(["demo", "--quick", "--device", "tpu"]) == 2
    assert "not supported" in capsys.readouterr().out


def test_python_dash_m_runs_the_command():
    result = subprocess.run([sys.executable, "-m", "lora_ops", "info"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "backends:" in result.stdout


def test_kernel_profile_script_runs_and_lists_each_call(tmp_path, capsys):
    """benchmarks/profile_kernels.py, which gpu_check.sh runs on the GPU machine, on CPU ops."""
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).parent.parent / "benchmarks" / "profile_kernels.py"
    spec = importlib.util.spec_from_file_location("profile_kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "kernels.md"
    backend = "cpu" if build_info()["compiled"] else "reference"
    assert module.main(["--device", "cpu", "--backend", backend, "--shape", "M=3,K=20,N=12,r=2",
                        "--dtype", "fp32", "--reps", "2", "--out", str(out)]) == 0
    text = out.read_text()
    for call in ("base fwd", "base fwd+dgrad", f"{backend} fwd", f"{backend} fwd+bwd"):
        assert f"| **{call}** | all |" in text
    assert "aten::linear" in text
    with pytest.raises(SystemExit, match="needs M, K, N and r"):
        module.main(["--device", "cpu", "--shape", "M=3,K=20"])
