"""Which of the CUDA backend's plan families work on this GPU, before the GPU check spends its
minutes on them: a few lora_linear calls (forward and backward) per family, against the reference
backend on the same device, each family in a child process under a time limit.

None of the CUDA code had run on a GPU when this was written. A plan that hangs (a cluster
barrier or a CUTLASS pipeline waiting forever) would otherwise stall every later phase of
scripts/gpu_check.sh that reaches it: the test suite, memcheck, the benchmark. Families, in the
order probed, each with the switches of the families before it that failed:

  simt          every fast path off (the plans of GPUs older than sm_80)
  mma           tensor-core tiles for the adapter products (sm_80+)
  clusters      thread block cluster plans, required (sm_90+)
  adapter_gemm  the adapter inside a CUTLASS GEMM, required (sm_90a builds with CUTLASS)

A family that hangs, crashes or computes a wrong result is switched off (LORA_OPS_CUDA_*=0) for
the rest of the check: --env-out gets the exports, --deselect-out the pytest -k expression that
leaves out the tests requiring it. simt has no switch: if it fails, the backend itself is broken.

    python scripts/gpu_probe.py --env-out probe.env --deselect-out probe.k
"""
import argparse
import importlib
import os
import subprocess
import sys
import time

CLUSTERS, MMA, ADAPTER_GEMM = ("LORA_OPS_CUDA_CLUSTERS", "LORA_OPS_CUDA_MMA",
                               "LORA_OPS_CUDA_ADAPTER_GEMM")
# family -> (its switch, the switches it runs under: "0" off, "1" required, None unset (as the
# library would choose), the tests that require it)
FAMILIES = {
    "simt": (None, {CLUSTERS: "0", MMA: "0", ADAPTER_GEMM: "0"}, None),
    "mma": (MMA, {CLUSTERS: "0", MMA: None, ADAPTER_GEMM: "0"}, "tensor_core_and_simt"),
    "clusters": (CLUSTERS, {CLUSTERS: "1", MMA: None, ADAPTER_GEMM: "0"}, "cluster_and_fallback"),
    "adapter_gemm": (ADAPTER_GEMM, {CLUSTERS: None, MMA: None, ADAPTER_GEMM: "1"},
                     "adapter_in_gemm"),
}
# (M, K, N, r, dtype, dropout_p): each family's plans (csrc/cuda/NOTES.md, launch counts)
CASES = {
    "simt": [(1, 1000, 520, 16, "bfloat16", 0.25), (133, 520, 264, 64, "bfloat16", 0.25),
             (8200, 264, 136, 16, "bfloat16", 0.0), (133, 100, 72, 8, "float32", 0.25)],
    "mma": [(133, 520, 264, 72, "bfloat16", 0.25), (8200, 264, 136, 72, "float16", 0.0)],
    "clusters": [(1, 1000, 520, 16, "bfloat16", 0.25), (16, 520, 264, 64, "bfloat16", 0.25),
                 (133, 520, 264, 64, "bfloat16", 0.25)],
    # the forward's plan (K + r deep), then the backward's dX (N + r deep, no dropout)
    "adapter_gemm": [(1030, 72, 4104, 24, "bfloat16", 0.25), (520, 8200, 72, 24, "bfloat16", 0.0)],
}
TOLERANCE = {"float32": 1e-3, "float16": 1e-2, "bfloat16": 3e-2}
NOT_PROBED = "not probed (the probe's time ran out)"


def set_switches(family: str, off) -> None:
    """This family's switches, every one in `off` (families that failed) kept at "0"."""
    for name, value in FAMILIES[family][1].items():
        value = "0" if name in off else value
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def probe(family: str) -> str:
    """'ok', 'skipped: ...' or 'wrong: ...' for one family, run in this process under its
    switches (set_switches)."""
    import torch
    import lora_ops

    if not torch.cuda.is_available():
        return "skipped: no CUDA device"
    if family != "simt" and not lora_ops.cuda_paths(0).get(family):
        return "skipped: not on this GPU or build, or switched off"
    gen = torch.Generator(device="cuda").manual_seed(0)
    for M, K, N, r, dtype_name, p in CASES[family]:
        dtype = getattr(torch, dtype_name)
        rand = lambda *s, scale=1.0: (torch.randn(*s, device="cuda", generator=gen) * scale).to(dtype)
        x, w, b = rand(M, K), rand(N, K, scale=K ** -0.5), rand(N, scale=0.1)
        a, bb = rand(r, K, scale=K ** -0.5), rand(N, r, scale=r ** -0.5)
        dy = rand(M, N)
        results = []
        for backend, cast in (("cuda", dtype), ("reference", torch.float32)):
            leaves = [t.to(cast).requires_grad_() for t in (x, a, bb)]
            y = lora_ops.lora_linear(leaves[0], w.to(cast), b.to(cast), leaves[1], leaves[2], 0.5,
                                     dropout_p=p, training=True, seed=M, backend=backend)
            results.append([y] + list(torch.autograd.grad(y, leaves, dy.to(cast))))
        torch.cuda.synchronize()
        for name, got, want in zip(("y", "dx", "da", "db"), *results):
            err = float((got.float() - want).abs().max() / want.abs().max().clamp_min(1e-12))
            if not err <= TOLERANCE[dtype_name]:
                return f"wrong: {name} off by {err:.3g} (relative) at M={M} K={K} N={N} r={r} {dtype_name}"
    return "ok"


def child(families):
    # switched off before this child: by the parent for a family that failed in an earlier
    # child, or by the caller's environment
    off = {name for name in (CLUSTERS, MMA, ADAPTER_GEMM) if os.environ.get(name) == "0"}
    for family in families:
        print(f"start {family}", flush=True)
        set_switches(family, off)
        try:
            verdict = probe(family)
        except Exception as error:  # a CUDA error may have spoilt the context: stop here
            print(f"result {family} error: {type(error).__name__}: {str(error)[:300]}", flush=True)
            sys.exit(1)
        print(f"result {family} {verdict}", flush=True)
        switch = FAMILIES[family][0]
        if switch and not passed(verdict):
            off.add(switch)  # the families after it run without it


def run_child(families, env, timeout):
    """One child process probing `families` in order: (its output lines, what to call a family it
    left unfinished, the last line of its stderr)."""
    try:
        done = subprocess.run([sys.executable, __file__, "--child", *families], env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as stopped:
        out = stopped.stdout or b""
        out = out.decode() if isinstance(out, bytes) else out
        return out.splitlines(), f"hung (no result in {timeout:.0f} s)", ""
    tail = (done.stderr.strip().splitlines() or [""])[-1][:200]
    return done.stdout.splitlines(), f"crashed (exit {done.returncode})", tail


def triage(run, env):
    """Every family's verdict, and the environment the later families ran in (failed families
    switched off). `run(families, env)` is run_child with its time limit."""
    pending, results, env = list(FAMILIES), {}, dict(env)
    while pending:
        # One child for the families left (one CUDA start-up for all of them in the usual case);
        # a family that hangs or kills its child is marked, and the next child starts after it.
        lines, failure, tail = run(pending, env)
        for line in lines:
            if line.startswith("result "):
                _, family, verdict = line.split(" ", 2)
                results[family] = verdict
        started = [line.split(" ", 1)[1] for line in lines if line.startswith("start ")]
        unfinished = [f for f in started if f not in results]
        if unfinished or not any(f in results for f in pending):
            # the family it was in, or the first if it died before starting one
            results[(unfinished or pending)[0]] = f"{failure} {tail}".strip()
        for family in [f for f in pending if f in results]:
            pending.remove(family)
            switch = FAMILIES[family][0]
            if switch and not passed(results[family]):
                env[switch] = "0"  # the families after it run without it
    return results, env


def passed(verdict: str) -> bool:
    """ok, skipped (a path this GPU or build does not have) or not probed: nothing to switch off."""
    return verdict == "ok" or verdict.startswith(("skipped", NOT_PROBED))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--env-out", help="write the exports that switch failed families off")
    parser.add_argument("--deselect-out", help="write the pytest -k expression leaving out their tests")
    parser.add_argument("--timeout", type=float, default=45.0, help="seconds per child process")
    parser.add_argument("--budget", type=float, default=150.0,
                        help="seconds for the whole probe: a child gets at most what is left")
    args = parser.parse_args()
    if args.child is not None:
        child(args.child)
        return 0
    try:  # the children import it the same way: fail once, clearly, rather than per family
        importlib.import_module("lora_ops")
    except ImportError as error:
        print(f"gpu_probe: cannot import lora_ops ({error}); build it in place and put the "
              f"repository root on PYTHONPATH, or install it. Nothing was switched off.")
        return 2
    t0 = time.time()

    def run(families, env):
        left = args.budget - (time.time() - t0)
        if left < 10:  # not enough for a CUDA start-up: left as they are, not switched off
            return [], NOT_PROBED, ""
        return run_child(families, env, min(args.timeout, left))
    results, _ = triage(run, os.environ)
    failed = [f for f in FAMILIES if not passed(results[f])]
    for family in FAMILIES:
        print(f"probe {family}: {results[family]}")
    print(f"probe: {time.time() - t0:.1f} s")
    if args.env_out:
        with open(args.env_out, "w") as f:
            f.write(exports(results))
    if args.deselect_out:
        with open(args.deselect_out, "w") as f:
            f.write(deselection(results))
    return 1 if failed else 0


def exports(results) -> str:
    """Shell lines switching the failed families off."""
    return "".join(f"export {FAMILIES[f][0]}=0\n" for f in FAMILIES
                   if not passed(results[f]) and FAMILIES[f][0])


def deselection(results) -> str:
    """A pytest -k expression leaving out the tests that require a failed family ('' if none)."""
    return " and ".join(f"not {FAMILIES[f][2]}" for f in FAMILIES
                        if not passed(results[f]) and FAMILIES[f][2])


if __name__ == "__main__":
    sys.exit(main())
