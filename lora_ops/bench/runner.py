"""Runs jobs: builds the inputs of a case, checks every provider against the float64 oracle,
times them side by side, probes saved activation memory, and turns it all into rows."""
import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from lora_ops.bench import cost_model, linear_providers, multi_providers
from lora_ops.bench.cases import SINGLE_OP, Job, LinearCase
from lora_ops.bench.ceilings import Ceilings
from lora_ops.bench.provider import CHECK_TOLERANCE, Bound, Provider, relative_error
from lora_ops.bench.saved_memory import saved_activation_bytes
from lora_ops.bench.timing import Timing, time_cpu_interleaved, time_cuda, time_cuda_graph

MEMORY_PROBE_DROPOUT = 0.1      # T5 is probed in training with dropout, where PEFT keeps more
ROTATION_CACHE_MULTIPLE = 3     # rotated input sets together exceed the last-level cache 3x
MAX_ROTATION_SETS = 32
CPU_ROTATION_MEMORY = 2 << 30
EAGER_REFERENCE = {"lora_linear": ("eager",), "multi_lora_linear": ("peft", "gather_bmm"),
                   "shrink": ("gather_bmm",), "expand": ("gather_bmm",)}


@dataclass(frozen=True)
class RunConfig:
    device: torch.device
    peers: Tuple[str, ...]
    backends: Tuple[str, ...]
    dropout: float = 0.0
    time_budget_s: Optional[float] = None
    cpu_budget_s: float = 1.0       # wall-clock sampling per (job, mode), all providers together
    warmup_ms: float = 25.0         # do_bench arguments (milliseconds)
    rep_ms: float = 100.0
    graph: bool = True              # CUDA-graph timing of forward at decode sizes
    graph_max_tokens: int = 64
    check: bool = True


def _cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            text = f.read().strip()
        return int(text[:-1]) * {"K": 1 << 10, "M": 1 << 20}[text[-1]]
    except (OSError, ValueError, KeyError):
        return 32 << 20


def rotation_count(set_bytes: int, device: torch.device) -> int:
    """How many input sets to rotate through so the rotation does not fit in the cache."""
    wanted = math.ceil(ROTATION_CACHE_MULTIPLE * _cache_bytes(device) / max(set_bytes, 1))
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = free // 4
    else:
        budget = CPU_ROTATION_MEMORY
    return max(1, min(wanted, MAX_ROTATION_SETS, budget // max(set_bytes, 1)))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _is_device_fault(err: BaseException) -> bool:
    text = str(err)
    return any(s in text for s in ("illegal memory access", "misaligned address",
                                   "unspecified launch failure", "device-side assert"))


def oracle_error(op: str, bound: Bound, inputs) -> float:
    """Relative error of one forward of `bound` against the float64 oracle of `op` (expand's
    in-place output is put back as it was)."""
    with torch.no_grad():
        if op == SINGLE_OP:
            out = bound.forward()[:linear_providers.ORACLE_ROWS]
            return relative_error(out, linear_providers.oracle(inputs))
        if op == "expand":
            y_before = inputs.y.clone()
            out = bound.forward()
            err = relative_error(out, multi_providers.oracle("expand", inputs, y_before))
            inputs.y.copy_(y_before)
            return err
        return relative_error(bound.forward(), multi_providers.oracle(op, inputs))


class _Workload:
    """The input sets of one job and what depends on them only (oracle, costs)."""

    def __init__(self, job: Job, device: torch.device):
        self.job, self.case, self.op = job, job.case, job.op
        if isinstance(self.case, LinearCase):
            count = rotation_count(linear_providers.set_bytes(self.case), device)
            self.sets = linear_providers.make_inputs(self.case, device, count)
            self.use = None
            self.tokens = self.case.M
        else:
            token_adapter = multi_providers.batch_token_adapter(self.case)
            self.use = cost_model.adapter_use(self.case, token_adapter)
            count = rotation_count(multi_providers.set_bytes(self.case), device)
            self.sets = multi_providers.make_inputs(self.case, token_adapter, device, count)
            self.tokens = self.case.T

    def providers(self, cfg: RunConfig) -> List[Provider]:
        if self.op == SINGLE_OP:
            return linear_providers.providers(cfg.peers, cfg.backends)
        return multi_providers.providers(self.op, cfg.peers, cfg.backends)

    def cost(self, provider: Provider, mode: str) -> cost_model.Cost:
        k, n = self.case.K, self.case.N
        if provider.role == "base":
            return cost_model.base_linear_cost(self.tokens, k, n, self.case.dtype, mode)
        if self.op == SINGLE_OP:
            return cost_model.linear_cost(self.case, mode)
        return cost_model.multi_cost(self.op, self.case, self.use, mode)

    def expected_saved_bytes(self) -> int:
        """T5: what the fused op may keep beyond x: S [M, r] in x's dtype (linear) or t
        [1, T, r_max] fp32 (multi-adapter)."""
        if self.op == SINGLE_OP:
            return self.case.M * self.case.r * cost_model.element_bytes(self.case.dtype)
        return self.case.T * self.case.r_max * cost_model.FP32_BYTES

    def alive(self, inputs, bound: Bound) -> List[torch.Tensor]:
        """The tensors a caller holds anyway: inputs, parameters, adapter tables and indices."""
        held = [inputs.x, inputs.weight, inputs.bias, inputs.lora_a, inputs.lora_b, *bound.wrt]
        if self.op != SINGLE_OP:
            held += [inputs.scalings, inputs.ranks, inputs.token_adapter, *inputs.index.values()]
        return held


def make_call(bound: Bound, mode: str, dy: torch.Tensor) -> Callable[[], object]:
    """The timed call: forward under no_grad, or forward + autograd.grad of `wrt` for dy."""
    if mode == "fwd":
        def forward_only():
            with torch.no_grad():
                return bound.forward()
        return forward_only

    def forward_backward():
        out = bound.forward()
        return torch.autograd.grad(out, bound.wrt, dy)
    return forward_backward


class Runner:
    def __init__(self, cfg: RunConfig, ceilings: Ceilings, env: Dict[str, object],
                 log: Callable[[str], None] = print):
        self.cfg, self.ceilings, self.env, self.log = cfg, ceilings, env, log
        self.row_env = {k: env[k] for k in ("device_name", "torch", "triton", "commit", "date")}
        self.aborted: Optional[str] = None

    def run(self, jobs: Sequence[Job], on_job_done: Callable[[List[dict], List[str]], None]
            ) -> Tuple[List[dict], List[str]]:
        """Rows of every job run, and the jobs skipped; on_job_done(rows, skipped) after each."""
        rows: List[dict] = []
        skipped: List[str] = []
        start = time.perf_counter()
        for i, job in enumerate(jobs):
            over_budget = (self.cfg.time_budget_s is not None
                           and time.perf_counter() - start > self.cfg.time_budget_s)
            if over_budget or self.aborted:
                skipped += [f"{j.op} {j.case.label()}" for j in jobs[i:]]
                why = self.aborted or f"time budget of {self.cfg.time_budget_s:.0f} s spent"
                self.log(f"[bench] {len(jobs) - i} jobs skipped: {why}")
                break
            self.log(f"[bench] ({i + 1}/{len(jobs)}, {time.perf_counter() - start:.0f} s) "
                     f"{job.op} {job.case.label()}")
            rows += self._run_job(job)
            on_job_done(rows, skipped)
        return rows, skipped

    def _run_job(self, job: Job) -> List[dict]:
        try:
            work = _Workload(job, self.cfg.device)
        except Exception as err:  # a case that cannot be built is a row, not a crash
            self._note_fault(err)
            return [self._row(job, None, mode, None, error=f"inputs: {err}") for mode in job.modes]
        rows = []
        try:
            for mode in job.modes:
                rows += self._run_mode(work, mode)
        finally:
            del work
            if self.cfg.device.type == "cuda" and not self.aborted:
                torch.cuda.empty_cache()
        return rows

    def _run_mode(self, work: _Workload, mode: str) -> List[dict]:
        cfg = self.cfg
        training = mode == "fwd+bwd"
        providers = [p for p in work.providers(cfg) if mode in p.modes]
        calls: Dict[str, List[Callable[[], object]]] = {}
        info: Dict[str, dict] = {}
        for p in providers:
            info[p.name] = {}
            try:
                bounds = [p.bind(s, training, cfg.dropout) for s in work.sets]
                if cfg.check and mode == "fwd" and p.role != "base":  # base is not LoRA
                    err = oracle_error(work.op, bounds[0], work.sets[0])
                    info[p.name]["check_rel_err"] = err
                    info[p.name]["check_ok"] = err <= CHECK_TOLERANCE[work.case.dtype]
                calls[p.name] = [make_call(b, mode, s.dy) for b, s in zip(bounds, work.sets)]
                t0 = time.perf_counter()
                calls[p.name][0]()  # first call: compiles, autotunes, loads kernels
                _sync(cfg.device)
                info[p.name]["first_call_s"] = time.perf_counter() - t0
                if training and p.memory_probe:
                    info[p.name].update(self._probe_memory(work, p))
            except Exception as err:
                self._note_fault(err)
                calls.pop(p.name, None)
                info[p.name]["error"] = f"{type(err).__name__}: {err}"[:500]
        timings, graph_timings = self._time(work, mode, providers, calls, info)
        rows = [self._row(work.job, p, mode, timings.get(p.name), graph=graph_timings.get(p.name),
                          cost=work.cost(p, mode), use=work.use, extra=info[p.name])
                for p in providers]
        _add_ratios(rows, work.op)
        for row in rows:
            self.log("  " + _progress_line(row))
        return rows

    def _probe_memory(self, work: _Workload, p: Provider) -> dict:
        inputs = work.sets[0]
        bound = p.bind(inputs, True, MEMORY_PROBE_DROPOUT)
        saved = saved_activation_bytes(bound.forward, work.alive(inputs, bound))
        return {"saved_bytes": saved, "saved_expected_bytes": work.expected_saved_bytes(),
                "saved_probe_dropout": MEMORY_PROBE_DROPOUT}

    def _time(self, work, mode, providers, calls, info):
        cfg = self.cfg
        timings: Dict[str, Timing] = {}
        graph_timings: Dict[str, Timing] = {}
        if not calls or self.aborted:
            return timings, graph_timings
        if cfg.device.type != "cuda":
            try:
                timings = time_cpu_interleaved(calls, cfg.cpu_budget_s)
            except Exception as err:
                for name in calls:
                    info[name]["error"] = f"timing: {type(err).__name__}: {err}"[:500]
            return timings, graph_timings
        for p in providers:
            if p.name not in calls or self.aborted:
                continue
            try:
                timings[p.name] = time_cuda(calls[p.name], cfg.warmup_ms, cfg.rep_ms)
            except Exception as err:
                self._note_fault(err)
                info[p.name]["error"] = f"timing: {type(err).__name__}: {err}"[:500]
                continue
            if (cfg.graph and mode == "fwd" and p.graph_safe and work.tokens <= cfg.graph_max_tokens
                    and not self.aborted):
                try:
                    graph_timings[p.name] = time_cuda_graph(calls[p.name])
                except Exception as err:
                    self._note_fault(err)
                    info[p.name]["graph_error"] = f"{type(err).__name__}: {err}"[:300]
        return timings, graph_timings

    def _note_fault(self, err: BaseException) -> None:
        if self.cfg.device.type == "cuda":
            try:
                torch.cuda.synchronize()
            except Exception as sync_err:  # the error surfaced late: the context is gone
                err = sync_err
            if _is_device_fault(err):
                self.aborted = f"device fault, run stopped: {err}"[:500]
                self.log(f"[bench] {self.aborted}")

    def _row(self, job: Job, p: Optional[Provider], mode: str, timing: Optional[Timing],
             graph: Optional[Timing] = None, cost: Optional[cost_model.Cost] = None,
             use=None, extra: Optional[dict] = None, error: Optional[str] = None) -> dict:
        case = job.case
        row = {"op": job.op, "mode": mode, "case": case.label(), "dtype": case.dtype,
               "shape": case.as_dict(), "provider": p.name if p else None,
               "role": p.role if p else None}
        if use is not None:
            row["shape"].update(active_tokens=use.active_tokens, used_adapters=use.used_adapters)
        row.update(extra or {})
        if error:
            row["error"] = error
        if timing is not None:
            row.update(timing.as_dict())
        if graph is not None:
            row.update(graph_median_us=graph.median_us, graph_q20_us=graph.q20_us,
                       graph_q80_us=graph.q80_us)
        if cost is not None:
            row.update(bytes=cost.bytes, flops=cost.flops)
            floor_s, bound = cost_model.floor_seconds(
                cost, self.ceilings.copy_gbps * 1e9,
                self.ceilings.matmul_tflops.get(case.dtype, 0.0) * 1e12)
            row.update(floor_us=floor_s * 1e6, floor_bound=bound)
            if timing is not None and timing.median_us > 0:
                seconds = timing.median_us * 1e-6
                row.update(gbps=cost.bytes / seconds / 1e9,
                           copy_frac=cost.bytes / seconds / 1e9 / self.ceilings.copy_gbps,
                           tflops=cost.flops / seconds / 1e12,
                           floor_frac=floor_s / seconds)
        row["status"] = "ok" if timing is not None and "error" not in row else (
            "error" if "error" in row else "not timed")
        row.update(self.row_env)
        return row


def _add_ratios(rows: List[dict], op: str) -> None:
    by_name = {r["provider"]: r for r in rows if r.get("median_us")}
    base = by_name.get("base")
    eager = next((by_name[n] for n in EAGER_REFERENCE[op] if n in by_name), None)
    for row in rows:
        if not row.get("median_us"):
            continue
        if base:
            row["ratio_to_base"] = row["median_us"] / base["median_us"]
            if row.get("graph_median_us") and base.get("graph_median_us"):
                row["graph_ratio_to_base"] = row["graph_median_us"] / base["graph_median_us"]
        if eager:
            row["eager_ref"] = eager["provider"]
            row["ratio_to_eager"] = row["median_us"] / eager["median_us"]
            if row.get("graph_median_us") and eager.get("graph_median_us"):
                row["graph_ratio_to_eager"] = row["graph_median_us"] / eager["graph_median_us"]


def _progress_line(row: dict) -> str:
    name = f"{row['mode']:<8} {row['provider']:<18}"
    if row["status"] != "ok":
        return f"{name} {row['status']}: {row.get('error', '')[:160]}"
    text = f"{name} {row['median_us']:>11.1f} us [{row['q20_us']:.1f}, {row['q80_us']:.1f}]"
    if "ratio_to_base" in row:
        text += f"  x{row['ratio_to_base']:.3f} base"
    if "ratio_to_eager" in row:
        text += f"  x{row['ratio_to_eager']:.3f} {row['eager_ref']}"
    text += f"  {row.get('gbps', 0):.1f} GB/s"
    if "graph_median_us" in row:
        text += f"  graph {row['graph_median_us']:.1f} us"
    if row.get("check_ok") is False:
        text += f"  CHECK FAILED (rel err {row['check_rel_err']:.2e})"
    return text


def default_backends(device: torch.device) -> List[str]:
    """The lora_ops backends usable on `device`, leaving out Triton's CPU interpreter (a
    correctness tool, far too slow to time; name it in --backends to time it anyway)."""
    from lora_ops import available_backends

    usable = available_backends().get(device.type, [])
    return [b for b in usable if not (device.type == "cpu" and b == "triton")]
