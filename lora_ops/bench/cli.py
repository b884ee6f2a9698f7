"""`lora-ops bench` / `python -m lora_ops.bench`: time LoRA layers side by side on this device."""
import argparse
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from lora_ops.bench import ceilings as ceilings_mod
from lora_ops.bench import report
from lora_ops.bench.cases import DTYPES, MODES, OPS, SUITES, Job, explicit_jobs, select_jobs
from lora_ops.bench.runner import RunConfig, Runner, default_backends
from lora_ops.bench.verdicts import judge

PEERS = ("eager", "eager_compiled", "peft", "gather_bmm")
RECOMPILE_LIMIT = 64  # every shape of a suite through one compiled eager function


def _csv(text: str, allowed: Sequence[str], what: str) -> List[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad:
        raise ValueError(f"bench: unknown {what} {', '.join(bad)}; choose from {', '.join(allowed)}")
    return items


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lora-ops bench",
        description="Time base F.linear, PEFT-style eager LoRA (and under torch.compile), PEFT's "
                    "LoRA layer, a gather+bmm multi-adapter peer and every lora_ops backend, "
                    "side by side on this device; judge DESIGN.md's targets.")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma list of {', '.join(OPS)} (default all)")
    p.add_argument("--suite", choices=sorted(SUITES),
                   help="shape suite: full (DESIGN.md), gpu (bounded, for gpu_check.sh), cpu "
                        "(reduced, minutes on 2 cores), quick (smoke); default gpu on CUDA, else cpu")
    p.add_argument("--shape", action="append", default=[], metavar="SPEC",
                   help="explicit case instead of a suite (repeatable): M=16,K=4096,N=4096,r=16 or "
                        "T=64,U=16,K=2048,N=2048,r=16|8/16/64|mixed,dist=uniform,"
                        "index=token|segment,none=0.1")
    p.add_argument("--backends", help="comma list of lora_ops backends (default: all usable here, "
                                      "Triton's CPU interpreter excepted)")
    p.add_argument("--peers", default=",".join(PEERS), help=f"comma list of {', '.join(PEERS)}")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="run every case in this dtype")
    p.add_argument("--mode", choices=MODES + ("both",), default="both")
    p.add_argument("--dropout", type=float, default=0.0, help="adapter dropout in the fwd+bwd timing")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--json", help="write every row here (rewritten after each job)")
    p.add_argument("--summary", help="write the markdown summary here")
    p.add_argument("--plot", help="write a PNG of time / base per case (matplotlib)")
    p.add_argument("--out-dir", help="write JSON, summary and PNG here, named by date, device, commit")
    p.add_argument("--from-json", help="only rebuild summary/plot/verdicts from a JSON of an earlier run")
    p.add_argument("--time-budget", type=float, help="seconds; jobs not started by then are skipped")
    p.add_argument("--cpu-budget", type=float, default=1.0, help="CPU: sampling seconds per job and mode")
    p.add_argument("--warmup-ms", type=float, default=25.0, help="CUDA: do_bench warm-up")
    p.add_argument("--rep-ms", type=float, default=100.0, help="CUDA: do_bench repetition time")
    p.add_argument("--no-graph", action="store_true", help="CUDA: skip CUDA-graph timing of decode sizes")
    p.add_argument("--no-check", action="store_true", help="skip the float64 oracle check")
    p.add_argument("--threads", type=int, help="CPU: torch threads (default: torch's choice)")
    p.add_argument("--list", action="store_true", help="print the jobs and exit")
    return p


def _device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("bench: --device cuda, but torch sees no CUDA device")
    return torch.device(choice)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")


def _out_paths(args, env: dict, suite: str) -> None:
    """Fill --json/--summary/--plot from --out-dir: <date>_<device>_<commit>_<suite>.*"""
    if not args.out_dir:
        return
    os.makedirs(args.out_dir, exist_ok=True)
    device = "cpu" if env["device_type"] == "cpu" else _slug(env["device_name"].lower())
    stem = f"{env['date'][:10]}_{device}_{_slug(str(env['commit']))[:12]}_{suite}"
    stem = os.path.join(args.out_dir, stem)
    args.json = args.json or stem + ".json"
    args.summary = args.summary or stem + ".md"
    args.plot = args.plot or stem + ".png"


def _dynamo_limits():
    """A context in which one compiled function may hold a suite's worth of shapes, and where
    hitting the limit is an error rather than a silent fall-back to eager."""
    import torch._dynamo

    cfg = torch._dynamo.config
    patch = {}
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    patch[name] = RECOMPILE_LIMIT
    if hasattr(cfg, "fail_on_recompile_limit_hit"):
        patch["fail_on_recompile_limit_hit"] = True
    return cfg.patch(**patch)


def _warn_if_crowded(device: torch.device, env: dict) -> None:
    load = env.get("load_average")
    crowded = load and load[0] > (os.cpu_count() or 1) / 2
    if device.type == "cpu" and crowded and not env.get("omp_wait_policy"):
        print(f"[bench] warning: load average {load[0]:.1f} on {os.cpu_count()} cores; OpenMP threads "
              f"spinning at barriers can make CPU timings many times slower. Consider "
              f"OMP_WAIT_POLICY=PASSIVE (set before Python starts) or --threads 1.", file=sys.stderr)


def _write_outputs(args, doc: dict) -> None:
    if args.json and not args.from_json:
        report.write_json(args.json, doc)
    if args.summary:
        with open(args.summary, "w") as f:
            f.write(report.summary_markdown(doc))
    if args.plot:
        from lora_ops.bench.plot import plot
        try:
            plot(doc, args.plot)
        except Exception as err:  # a missing plot must not lose the numbers
            print(f"[bench] --plot failed: {type(err).__name__}: {err}", file=sys.stderr)


def _rebuild(args) -> int:
    import json

    with open(args.from_json) as f:
        doc = json.load(f)
    doc["verdicts"] = judge(doc["rows"], doc["environment"]["device_type"])
    _write_outputs(args, doc)
    print("\n".join(report.verdict_lines(doc["verdicts"])))
    return 0


@dataclass(frozen=True)
class _Plan:
    device: torch.device
    suite: str
    ops: List[str]
    peers: List[str]
    backends: List[str]
    modes: Tuple[str, ...]
    jobs: List[Job]


def _plan(args) -> _Plan:
    """What to run, from the command line (ValueError on bad options)."""
    device = _device(args.device)
    ops = _csv(args.ops, OPS, "op")
    peers = _csv(args.peers, PEERS, "peer")
    backends = (_csv(args.backends, ("cuda", "triton", "cpu", "reference"), "backend")
                if args.backends else default_backends(device))
    modes = MODES if args.mode == "both" else (args.mode,)
    if args.shape:
        suite = "explicit"
        default_dtype = "bf16" if device.type == "cuda" else "fp32"
        jobs = explicit_jobs(args.shape, ops, args.dtype or default_dtype)
    else:
        suite = args.suite or ("gpu" if device.type == "cuda" else "cpu")
        jobs = SUITES[suite]()
    return _Plan(device, suite, ops, peers, backends, modes, select_jobs(jobs, ops, modes, args.dtype))


def _timing_text(cfg: RunConfig) -> str:
    if cfg.device.type == "cuda":
        return (f"CUDA: triton.testing.do_bench (warmup {cfg.warmup_ms:g} ms, rep {cfg.rep_ms:g} ms, "
                f"quantiles 0.5/0.2/0.8) over input sets rotated beyond L2, and CUDA-graph replays "
                f"for forward at <= {cfg.graph_max_tokens} tokens")
    return (f"CPU wall clock, providers interleaved round by round, {cfg.cpu_budget_s:g} s of "
            f"samples per job and mode, input sets rotated beyond the last-level cache")


def main(argv: Optional[List[str]] = None) -> int:
    """Run the benchmark; 0 when every lora_ops row ran and matched the oracle (targets met or
    not), 1 when one failed, 2 on bad options."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        if args.from_json:
            return _rebuild(args)
        plan = _plan(args)
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2
    if args.list:
        for job in plan.jobs:
            print(f"{job.op:<18} {'/'.join(job.modes):<12} {job.case.label()}")
        return 0

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = report.environment(plan.device)
    _out_paths(args, env, plan.suite)
    _warn_if_crowded(plan.device, env)
    t0 = time.perf_counter()
    ceil = ceilings_mod.measure(plan.device, sorted({job.case.dtype for job in plan.jobs}))
    print(f"[bench] {env['device_name']}, torch {env['torch']}, commit {env['commit']}; "
          f"copy {ceil.copy_gbps:.1f} GB/s, matmul TFLOP/s {ceil.matmul_tflops}; "
          f"backends {plan.backends}; {len(plan.jobs)} jobs", flush=True)
    cfg = RunConfig(device=plan.device, peers=tuple(plan.peers), backends=tuple(plan.backends),
                    dropout=args.dropout, time_budget_s=args.time_budget,
                    cpu_budget_s=args.cpu_budget, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms,
                    graph=not args.no_graph, check=not args.no_check)
    doc = {"config": {"suite": plan.suite, "ops": plan.ops, "peers": plan.peers,
                      "backends": plan.backends, "modes": list(plan.modes), "dtype": args.dtype,
                      "dropout": args.dropout, "timing": _timing_text(cfg), "argv": argv},
           "environment": env, "ceilings": ceil.as_dict(), "rows": [], "skipped": [],
           "jobs_run": 0, "verdicts": []}
    runner = Runner(cfg, ceil, env, log=lambda s: print(s, flush=True))

    def checkpoint(rows, skipped):
        doc.update(rows=rows, skipped=skipped, aborted=runner.aborted,
                   load_average_end=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
                   jobs_run=len({(r["op"], r["case"]) for r in rows}),
                   verdicts=judge(rows, plan.device.type), wall_s=time.perf_counter() - t0)
        if args.json:
            report.write_json(args.json, doc)

    with _dynamo_limits():
        rows, skipped = runner.run(plan.jobs, checkpoint)
    checkpoint(rows, skipped)
    _write_outputs(args, doc)
    print(f"\n[bench] verdicts ({'GPU' if plan.device.type == 'cuda' else 'CPU'} run):")
    print("\n".join(report.verdict_lines(doc["verdicts"])))
    for path in (args.json, args.summary, args.plot):
        if path:
            print(f"[bench] wrote {path}")
    broken = [r for r in rows if r.get("role") == "lora_ops"
              and (r.get("status") != "ok" or r.get("check_ok") is False)]
    if broken or runner.aborted:
        print(f"[bench] {len(broken)} lora_ops rows failed (error or oracle check)"
              + (f"; {runner.aborted}" if runner.aborted else ""), file=sys.stderr)
        return 1
    return 0
