"""scripts/gpu_probe.py's bookkeeping, with fake child processes: a family that hangs, crashes or
computes wrongly is switched off for the families after it and for the rest of the GPU check,
and the probe always ends. (Its GPU part runs in scripts/gpu_check.sh.)"""
import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("gpu_probe", os.path.join(ROOT, "scripts", "gpu_probe.py"))
gpu_probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_probe)
FAMILIES = list(gpu_probe.FAMILIES)


class FakeChildren:
    """Runs like run_child: each family's outcome is 'ok', 'wrong', 'error' (reported, then the
    child exits), 'hang' or 'crash' (no result line), or 'dies' (before printing anything)."""

    def __init__(self, outcomes):
        self.outcomes, self.calls = outcomes, []

    def __call__(self, families, env):
        self.calls.append((list(families), dict(env)))
        lines = []
        for family in families:
            outcome = self.outcomes.get(family, "ok")
            if outcome == "dies":
                return lines, "crashed (exit 1)", "ImportError: no module"
            lines.append(f"start {family}")
            if outcome == "hang":
                return lines, "hung (no result in 45 s)", ""
            if outcome == "crash":
                return lines, "crashed (exit -11)", ""
            if outcome == "error":
                lines.append(f"result {family} error: RuntimeError: illegal memory access")
                return lines, "crashed (exit 1)", ""
            lines.append(f"result {family} " + ("ok" if outcome == "ok" else "wrong: y off by 0.5"))
        return lines, "crashed (exit 0)", ""


def test_all_families_pass_in_one_child():
    run = FakeChildren({})
    results, _ = gpu_probe.triage(run, {})
    assert results == {f: "ok" for f in FAMILIES}
    assert len(run.calls) == 1
    assert gpu_probe.exports(results) == "" and gpu_probe.deselection(results) == ""


@pytest.mark.parametrize("outcome,verdict", [("hang", "hung"), ("crash", "crashed (exit -11)"),
                                             ("error", "error: RuntimeError")])
def test_a_family_that_stops_its_child_is_switched_off_for_the_next(outcome, verdict):
    run = FakeChildren({"clusters": outcome})
    results, env = gpu_probe.triage(run, {"PATH": "/bin"})
    assert results["clusters"].startswith(verdict)
    assert results["simt"] == results["mma"] == results["adapter_gemm"] == "ok"
    assert [families for families, _ in run.calls] == [FAMILIES, ["adapter_gemm"]]
    assert run.calls[1][1]["LORA_OPS_CUDA_CLUSTERS"] == "0" and run.calls[1][1]["PATH"] == "/bin"
    assert env["LORA_OPS_CUDA_CLUSTERS"] == "0"
    assert gpu_probe.exports(results) == "export LORA_OPS_CUDA_CLUSTERS=0\n"
    assert gpu_probe.deselection(results) == "not cluster_and_fallback"


def test_wrong_results_switch_off_each_failed_family_and_deselect_its_tests():
    results, _ = gpu_probe.triage(FakeChildren({"mma": "wrong", "adapter_gemm": "hang"}), {})
    assert results["mma"].startswith("wrong") and results["adapter_gemm"].startswith("hung")
    assert gpu_probe.exports(results) == ("export LORA_OPS_CUDA_MMA=0\n"
                                          "export LORA_OPS_CUDA_ADAPTER_GEMM=0\n")
    assert gpu_probe.deselection(results) == "not tensor_core_and_simt and not adapter_in_gemm"


def test_a_child_that_dies_before_any_family_still_ends_the_probe():
    run = FakeChildren({f: "dies" for f in FAMILIES})
    results, _ = gpu_probe.triage(run, {})
    assert all(v.startswith("crashed (exit 1) ImportError") for v in results.values())
    assert len(run.calls) == len(FAMILIES)


def test_the_simt_family_has_no_switch_but_is_reported():
    results, env = gpu_probe.triage(FakeChildren({"simt": "hang"}), {})
    assert results["simt"].startswith("hung") and not any(k.startswith("LORA_OPS") for k in env)
    assert gpu_probe.exports(results) == "" and gpu_probe.deselection(results) == ""


def test_deselected_names_match_the_tests_that_require_each_family():
    """The -k expressions name real tests (a renamed test would silently stay selected)."""
    with open(os.path.join(ROOT, "tests", "test_lora_linear_cuda.py")) as f:
        source = f.read()
    for family, (_, _, tests) in gpu_probe.FAMILIES.items():
        assert tests is None or f"def test_{tests}" in source, family


def test_families_left_when_the_time_runs_out_are_not_switched_off():
    def run(families, env):
        return [], gpu_probe.NOT_PROBED, ""
    results, env = gpu_probe.triage(run, {})
    assert all(v == gpu_probe.NOT_PROBED for v in results.values())
    assert gpu_probe.exports(results) == "" and not any(k.startswith("LORA_OPS") for k in env)


def test_gpu_check_script_parses_and_defines_its_default_phases():
    """gpu_check.sh first runs on the GPU machine's few minutes: a syntax error or a phase
    without a function there would cost the whole session."""
    import re
    import subprocess
    script = os.path.join(ROOT, "scripts", "gpu_check.sh")
    subprocess.run(["bash", "-n", script], check=True)
    with open(script) as f:
        text = f.read()
    default = re.search(r'PHASES=\$\{PHASES:-"([^"]+)"\}', text).group(1).split()
    assert "probe" in default and default.index("probe") == default.index("build") + 1
    for phase in default + ["plans", "race"]:
        assert f"phase_{phase}()" in text, phase
    assert 'export PYTHONPATH="$PWD' in text  # lora_ops is built in place there, not installed


def test_each_family_runs_under_its_own_switches_not_the_last_ones(monkeypatch):
    """One child probes the families in turn: the tensor-core family must not inherit the SIMT
    family's MMA=0 (it would test the SIMT tiles again, or be skipped as switched off), while a
    family that failed stays off for those after it."""
    names = (gpu_probe.CLUSTERS, gpu_probe.MMA, gpu_probe.ADAPTER_GEMM)
    for name in names:
        monkeypatch.delenv(name, raising=False)
    switches = lambda: tuple(os.environ.get(n) for n in names)
    gpu_probe.set_switches("simt", set())
    assert switches() == ("0", "0", "0")
    gpu_probe.set_switches("mma", set())
    assert switches() == ("0", None, "0")
    gpu_probe.set_switches("clusters", {gpu_probe.MMA})
    assert switches() == ("1", "0", "0")
    gpu_probe.set_switches("adapter_gemm", {gpu_probe.CLUSTERS})
    assert switches() == ("0", None, "1")
