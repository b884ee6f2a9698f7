"""Where a run happened (device, versions, commit, date) and how its results are written:
JSON (every number), a markdown summary, and the console table of verdicts."""
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
from typing import Dict, List, Optional

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMMIT_ENV = "LORA_OPS_COMMIT"  # set where the checkout has no .git (a copied working tree)


def _version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", REPO_ROOT, *args], capture_output=True, text=True,
                             timeout=10, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def commit() -> Dict[str, object]:
    given = os.environ.get(COMMIT_ENV)
    if given:
        return {"commit": given, "commit_source": COMMIT_ENV, "dirty": None}
    head = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": head or "unknown", "commit_source": "git" if head else "none",
            "dirty": bool(status) if status is not None else None}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def environment(device: torch.device) -> Dict[str, object]:
    from lora_ops import build_info, cuda_paths

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = props.name
        detail = {"sm": f"{props.major}.{props.minor}", "multiprocessors": props.multi_processor_count,
                  "memory_gib": round(props.total_memory / 2 ** 30, 1),
                  "l2_bytes": getattr(props, "L2_cache_size", None), "cuda": torch.version.cuda,
                  # the cuda backend's plans in this run (LORA_OPS_CUDA_* switches included)
                  "fast_paths": " ".join(p for p, on in cuda_paths(device.index or 0).items() if on)
                  or "none"}
    else:
        name = f"CPU: {_cpu_name()}"
        detail = {"cores": os.cpu_count(), "vector_isa": torch.backends.cpu.get_cpu_capability()}
    env = {"device_type": device.type, "device_name": name, "device_detail": detail,
           "threads": torch.get_num_threads(),
           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "torch": torch.__version__,
           "triton": _version("triton"), "triton_autotune": _triton_autotune(),
           "peft": _version("peft"),
           "python": platform.python_version(),
           "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "lora_ops_build": {k: str(v) for k, v in build_info().items()}}
    env.update(commit())
    return env


def _triton_autotune() -> Optional[bool]:
    """Whether the Triton GEMMs tuned each shape (LORA_OPS_TRITON_AUTOTUNE); None without triton."""
    try:
        from lora_ops.triton._launch import autotuning
    except ImportError:
        return None
    return autotuning()


def write_json(path: str, doc: dict) -> None:
    """Atomically (a partial run killed mid-write leaves the previous complete file)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    os.replace(tmp, path)


def _fmt(value, spec: str, missing: str = "") -> str:
    return missing if value is None else format(value, spec)


def _row_cells(r: dict) -> List[str]:
    if r.get("status") != "ok":
        return [r["case"], r["provider"] or "", r.get("status", ""), (r.get("error") or "")[:120],
                "", "", "", "", "", "", ""]
    check = ""
    if "check_ok" in r:
        check = "ok" if r["check_ok"] else f"FAIL {r['check_rel_err']:.1e}"
    return [r["case"], r["provider"], _fmt(r["median_us"], ".1f"),
            f"{r['q20_us']:.1f}–{r['q80_us']:.1f}", _fmt(r.get("ratio_to_base"), ".3f"),
            _fmt(r.get("ratio_to_eager"), ".3f"), _fmt(r.get("gbps"), ".1f"),
            _fmt(r.get("copy_frac"), ".3f"), _fmt(r.get("floor_frac"), ".3f"),
            _fmt(r.get("graph_median_us"), ".1f"), check]


def _table(header: List[str], lines: List[List[str]]) -> List[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c).replace("|", "/") for c in line) + " |" for line in lines]
    return out


def summary_markdown(doc: dict) -> str:
    env, ceil, rows = doc["environment"], doc["ceilings"], doc["rows"]
    dirty = " (uncommitted changes)" if env.get("dirty") else ""
    rates = ", ".join(f"{k} {v:.3g}" for k, v in ceil["matmul_tflops"].items())
    lines = [f"# lora_ops benchmark: {doc['config']['suite']} suite on {env['device_name']}", "",
             f"- date {env['date']}; commit {env['commit']}{dirty}",
             f"- torch {env['torch']}, triton {env['triton']}"
             + (" (default GEMM configurations, not tuned per shape: LORA_OPS_TRITON_AUTOTUNE=0)"
                if env.get("triton_autotune") is False else "")
             + f", peft {env['peft']}, python {env['python']}, "
             f"{env['threads']} threads (OMP_WAIT_POLICY={env.get('omp_wait_policy')}); "
             f"device {json.dumps(env['device_detail'])}",
             f"- ceilings measured in this run: copy {ceil['copy_gbps']:.1f} GB/s (read + write); "
             f"matmul TFLOP/s: {rates}",
             f"- timing: {doc['config']['timing']}",
             f"- host load average (1/5/15 min) at start {env.get('load_average')}, at end "
             f"{doc.get('load_average_end')}",
             f"- {doc['jobs_run']} jobs run, {len(doc['skipped'])} skipped"
             + (f"; run stopped: {doc['aborted']}" if doc.get("aborted") else ""),
             "",
             "Columns: median and 20–80% quantiles of one call; ×base = time / F.linear alone "
             "(fwd+bwd: frozen base fwd+dgrad); ×eager = time / the PEFT-style yardstick (`eager` "
             "for lora_linear, `peft` or `gather_bmm` for multi-adapter); GB/s from the byte "
             "model of DESIGN.md; copy = GB/s / measured copy bandwidth; floor = max(bytes/copy, "
             "flops/matmul) / time.", "", "## Targets", ""]
    lines += _table(["id", "backend", "what", "target", "measured", "verdict"],
                    [[v["id"], v["provider"] or "", v["what"], v["target"], v["measured"],
                      f"**{v['verdict']}**"] for v in doc["verdicts"]])
    header = ["case", "provider", "median µs", "q20–q80 µs", "×base", "×eager", "GB/s", "copy",
              "floor", "graph µs", "check"]
    for op in ("lora_linear", "shrink", "expand", "multi_lora_linear"):
        for mode in ("fwd", "fwd+bwd"):
            picked = [r for r in rows if r["op"] == op and r["mode"] == mode]
            if picked:
                lines += ["", f"## {op}, {mode}", ""] + _table(header, [_row_cells(r) for r in picked])
    probed = [r for r in rows if "saved_bytes" in r]
    if probed:
        lines += ["", "## Activation memory kept for backward (T5; training, dropout 0.1)", ""]
        lines += _table(["op", "case", "provider", "saved bytes", "M·r or T·r_max budget"],
                        [[r["op"], r["case"], r["provider"], str(r["saved_bytes"]),
                          str(r["saved_expected_bytes"])] for r in probed])
    if doc["skipped"]:
        lines += ["", f"## Skipped ({len(doc['skipped'])})", ""] + [f"- {s}" for s in doc["skipped"]]
    return "\n".join(lines) + "\n"


def verdict_lines(verdicts: List[dict]) -> List[str]:
    return [f"{v['id']:<3} {v['provider'] or '-':<18} {v['verdict']:<13} {v['measured']}"
            for v in verdicts]
