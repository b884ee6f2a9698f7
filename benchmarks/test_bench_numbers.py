"""Tests of the numbers the benchmark engine reports (lora_ops/bench): ratios, derived rates
and floors of a row, the timers' statistics and units (on a fake clock), the byte and FLOP
model counted by hand, the suites' shapes, the drawn batches, the markdown report, and the
providers computing the function they claim. Nothing here asserts on a measured time."""
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from lora_ops.bench import ceilings, linear_providers, report, runner, timing
from lora_ops.bench.adapter_mix import token_adapter
from lora_ops.bench.cases import (LLAMA_LAYERS, MIXED_RANKS, SINGLE_OP, Job, LinearCase, MultiCase,
                                  cpu_suite, explicit_jobs, full_suite, quick_suite, select_jobs)
from lora_ops.bench.ceilings import Ceilings
from lora_ops.bench.cost_model import (FP32_BYTES, AdapterUse, Cost, adapter_use, base_linear_cost,
                                       floor_seconds, linear_cost, multi_cost)
from lora_ops.bench.provider import CHECK_TOLERANCE, Bound, Provider, relative_error
from lora_ops.bench.timing import Timing
from lora_ops.bench.verdicts import C2_SHAPE

CPU = torch.device("cpu")


# --- ratios and derived rates of a row ------------------------------------------------------

def _timed(provider, median, graph=None):
    row = {"provider": provider, "median_us": median}
    if graph is not None:
        row["graph_median_us"] = graph
    return row


def test_ratios_are_time_over_base_and_over_the_first_eager_reference_present():
    rows = [_timed("base", 10.0, graph=4.0), _timed("gather_bmm", 30.0, graph=12.0),
            _timed("peft", 50.0), _timed("lora_ops:cpu", 15.0, graph=5.0),
            {"provider": "lora_ops:reference", "median_us": None}]
    runner._add_ratios(rows, "multi_lora_linear")
    by = {r["provider"]: r for r in rows}
    for name, median in (("base", 10.0), ("gather_bmm", 30.0), ("peft", 50.0), ("lora_ops:cpu", 15.0)):
        assert by[name]["ratio_to_base"] == pytest.approx(median / 10.0)
        assert by[name]["eager_ref"] == "peft"  # peft first, gather_bmm only without it
        assert by[name]["ratio_to_eager"] == pytest.approx(median / 50.0)
    assert by["lora_ops:cpu"]["graph_ratio_to_base"] == pytest.approx(5.0 / 4.0)
    assert by["gather_bmm"]["graph_ratio_to_base"] == pytest.approx(12.0 / 4.0)
    assert "graph_ratio_to_base" not in by["peft"]
    assert "graph_ratio_to_eager" not in by["lora_ops:cpu"]  # peft has no graph time
    assert "ratio_to_base" not in by["lora_ops:reference"]
    without_peft = [_timed("base", 10.0), _timed("gather_bmm", 40.0, graph=8.0),
                    _timed("lora_ops:cpu", 20.0, graph=2.0)]
    runner._add_ratios(without_peft, "multi_lora_linear")
    assert without_peft[2]["eager_ref"] == "gather_bmm"
    assert without_peft[2]["ratio_to_eager"] == pytest.approx(0.5)
    assert without_peft[2]["graph_ratio_to_eager"] == pytest.approx(0.25)


def _runner(copy_gbps=100.0, tflops=2.0, **cfg):
    env = {"device_name": "cpu", "torch": "t", "triton": None, "commit": "c", "date": "d"}
    config = runner.RunConfig(device=CPU, peers=cfg.pop("peers", ()), backends=cfg.pop("backends", ()),
                              **cfg)
    return runner.Runner(config, Ceilings(copy_gbps, {"fp32": tflops}), env, log=lambda s: None)


def test_row_rates_and_floor_follow_from_bytes_flops_and_the_median():
    job = Job(SINGLE_OP, LinearCase(4, 8, 8, 2, "fp32"), ("fwd",))
    p = Provider("eager", "eager", None)
    cost = Cost(bytes=6_000_000, flops=50_000_000)  # 60 us at 100 GB/s, 25 us at 2 TFLOP/s
    row = _runner()._row(job, p, "fwd", Timing(200.0, 150.0, 300.0, 7, "wall_clock"), cost=cost,
                         graph=Timing(80.0, 70.0, 90.0, 25, "cuda_graph"))
    assert (row["median_us"], row["q20_us"], row["q80_us"], row["samples"]) == (200.0, 150.0, 300.0, 7)
    assert (row["graph_median_us"], row["graph_q20_us"], row["graph_q80_us"]) == (80.0, 70.0, 90.0)
    assert (row["bytes"], row["flops"]) == (6_000_000, 50_000_000)
    assert row["floor_us"] == pytest.approx(60.0) and row["floor_bound"] == "memory"
    assert row["gbps"] == pytest.approx(6e6 / 200e-6 / 1e9)  # 30 GB/s
    assert row["copy_frac"] == pytest.approx(0.3)
    assert row["tflops"] == pytest.approx(5e7 / 200e-6 / 1e12)
    assert row["floor_frac"] == pytest.approx(60.0 / 200.0)
    assert row["status"] == "ok" and row["commit"] == "c"
    compute = _runner(tflops=0.5)._row(job, p, "fwd", None, cost=cost)
    assert compute["floor_us"] == pytest.approx(100.0) and compute["floor_bound"] == "compute"
    assert compute["status"] == "not timed" and "gbps" not in compute


# --- a small run through the runner, with a provider that computes the wrong function -------

def _wrong_eager(inp, training, dropout_p):
    return Bound(lambda: F.linear(inp.x, inp.weight, inp.bias) * 1.5, (inp.x,))


def test_runner_checks_every_non_base_provider_and_costs_each_by_its_role(monkeypatch):
    bound_with = []
    real = linear_providers.providers

    def providers(peers, backends):
        out = real(peers, backends)
        eager = next(p for p in out if p.name == "eager")

        def recording(inp, training, dropout_p):
            bound_with.append(training)
            return eager.bind(inp, training, dropout_p)
        return [*(p if p.name != "eager" else Provider("eager", "eager", recording) for p in out),
                Provider("wrong", "peer", _wrong_eager)]
    monkeypatch.setattr(linear_providers, "providers", providers)
    case = LinearCase(3, 16, 12, 4, "fp32")
    work = runner._Workload(Job(SINGLE_OP, case, ("fwd", "fwd+bwd")), CPU)
    assert work.sets[0].x.shape == (3, 16) and work.sets[0].weight.shape == (12, 16)
    run = _runner(peers=("eager",), backends=("reference",), cpu_budget_s=0.0)
    rows = run._run_mode(work, "fwd")
    by = {r["provider"]: r for r in rows}
    assert "check_ok" not in by["base"]
    assert by["eager"]["check_ok"] and by["lora_ops:reference"]["check_ok"]
    assert by["wrong"]["check_ok"] is False and by["wrong"]["check_rel_err"] > 0.1
    assert by["base"]["bytes"] == base_linear_cost(3, 16, 12, "fp32", "fwd").bytes
    for name in ("eager", "wrong", "lora_ops:reference"):
        assert by[name]["bytes"] == linear_cost(case, "fwd").bytes
        assert by[name]["flops"] == linear_cost(case, "fwd").flops
    assert bound_with and not any(bound_with)
    bound_with.clear()
    training_rows = {r["provider"]: r for r in run._run_mode(work, "fwd+bwd")}
    assert bound_with[0] is True  # the timed fwd+bwd call is bound in training mode
    assert training_rows["base"]["bytes"] == base_linear_cost(3, 16, 12, "fp32", "fwd+bwd").bytes


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_saved_memory_budget_is_s_in_x_dtype_or_t_in_fp32(dtype):
    linear = runner._Workload(Job(SINGLE_OP, LinearCase(5, 16, 8, 4, dtype), ("fwd+bwd",)), CPU)
    assert linear.expected_saved_bytes() == 5 * 4 * (2 if dtype == "bf16" else 4)
    multi_case = MultiCase(6, 3, 16, 8, (4, 8), "uniform", "token", 0.0, dtype)
    multi = runner._Workload(Job("multi_lora_linear", multi_case, ("fwd+bwd",)), CPU)
    assert multi.expected_saved_bytes() == 6 * 8 * FP32_BYTES


# --- timers, on a fake clock ----------------------------------------------------------------

def test_samples_give_median_and_20_80_quantiles_in_microseconds():
    t = timing._from_samples([1e-6, 2e-6, 3e-6, 4e-6, 100e-6], "wall_clock")
    assert t.median_us == pytest.approx(3.0)   # the median, not the mean (22)
    assert t.q20_us == pytest.approx(1.8) and t.q80_us == pytest.approx(23.2)
    assert t.samples == 5 and t.method == "wall_clock"


class _Clock:
    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


def test_cpu_timer_averages_each_sample_per_call_rotates_and_leaves_warmup_out(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(timing, "time", clock)
    seen = []

    def call(i, seconds):
        def run():
            seen.append(i)
            clock.now += seconds
        return run
    # "a": 1 ms a call, so a 2 ms sample averages 2 calls; "b": 5 ms, one call a sample
    calls = {"a": [call(0, 1e-3), call(1, 1e-3)], "b": [call(2, 5e-3)]}
    out = timing.time_cpu_interleaved(calls, budget_s=0.0, min_rounds=4, warmup_s=0.0)
    assert out["a"].samples == 4 and out["b"].samples == 4  # min_rounds, warm-up not counted
    assert out["a"].median_us == pytest.approx(1000.0) and out["a"].q80_us == pytest.approx(1000.0)
    assert out["b"].median_us == pytest.approx(5000.0)
    # the rotation: each input set in turn (one warm-up call, then 4 samples of 2 calls)
    assert [i for i in seen if i != 2] == [0, 1] * 4 + [0]


def test_cuda_timer_reports_do_bench_milliseconds_as_microseconds(monkeypatch):
    made = []

    def do_bench(fn, warmup, rep, quantiles):
        assert quantiles == [0.5, 0.2, 0.8]
        for _ in range(3):
            fn()
        return [2.0, 1.5, 2.5]
    fake = types.ModuleType("triton.testing")
    fake.do_bench = do_bench
    monkeypatch.setitem(sys.modules, "triton", types.ModuleType("triton"))
    monkeypatch.setitem(sys.modules, "triton.testing", fake)
    t = timing.time_cuda([lambda: made.append(0), lambda: made.append(1)], 1.0, 2.0)
    assert (t.median_us, t.q20_us, t.q80_us) == (2000.0, 1500.0, 2500.0)
    assert made == [0, 1, 0]


def test_cuda_graph_timer_divides_each_replay_by_the_calls_it_holds(monkeypatch):
    """CUDA itself faked: each call captured costs 0.5 ms of event time when replayed."""
    captured = []
    state = {"capturing": False}

    class Graph:
        def replay(self):
            pass

    class Capture:
        def __init__(self, graph):
            pass

        def __enter__(self):
            state["capturing"] = True

        def __exit__(self, *exc):
            state["capturing"] = False

    class Event:
        def __init__(self, enable_timing=False):
            pass

        def record(self):
            pass

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return 0.5 * len(captured)

    class Stream:
        def wait_stream(self, other):
            pass

    class StreamContext:
        def __init__(self, stream):
            pass

        def __enter__(self):
            pass

        def __exit__(self, *exc):
            pass
    for name, value in (("Stream", Stream), ("current_stream", Stream), ("stream", StreamContext),
                        ("synchronize", lambda *a: None), ("CUDAGraph", Graph),
                        ("graph", Capture), ("Event", Event)):
        monkeypatch.setattr(torch.cuda, name, value)

    def call():
        if state["capturing"]:
            captured.append(1)
    t = timing.time_cuda_graph([call, call, call], samples=5, min_calls=32)
    assert len(captured) == 33  # ceil(32 / 3) = 11 rounds of the 3-set rotation
    assert t.median_us == pytest.approx(500.0) and t.samples == 5 and t.method == "cuda_graph"


def test_ceilings_count_copy_bytes_twice_and_matmul_flops_as_2n3(monkeypatch):
    monkeypatch.setattr(ceilings, "CPU_COPY_BYTES", 1 << 12)
    monkeypatch.setattr(ceilings, "CPU_MATMUL_SIZE", {"fp32": 8})
    monkeypatch.setattr(ceilings, "time_cpu_interleaved", lambda calls, budget_s, **kw: {
        name: Timing(10.0, 9.0, 11.0, 5, "wall_clock") for name in calls})
    measured = ceilings.measure(CPU, ["fp32", "fp32"])
    assert measured.copy_gbps == pytest.approx(2 * 4096 / 10e-6 / 1e9)
    assert measured.matmul_tflops == pytest.approx({"fp32": 2 * 8 ** 3 / 10e-6 / 1e12})


# --- the byte and FLOP model, counted by hand ----------------------------------------------

def test_linear_bytes_counted_by_hand():
    m, k, n, r = 3, 5, 7, 2
    e = 4
    case = LinearCase(m, k, n, r, "fp32")
    x, w, bias, a, b, y, s = m * k, n * k, n, r * k, n * r, m * n, m * r
    fwd = e * (x + w + bias + a + b + y)
    assert linear_cost(case, "fwd").bytes == fwd
    # backward: read dy, W, S, x, A, B; write dx, dA, dB; and S written by forward
    bwd = e * (y + w + x) + e * (2 * s + x + 2 * (a + b))
    assert linear_cost(case, "fwd+bwd").bytes == fwd + bwd
    assert base_linear_cost(m, k, n, "bf16", "fwd").bytes == 2 * (x + w + bias + y)
    assert base_linear_cost(m, k, n, "bf16", "fwd+bwd").flops == 4 * m * n * k


def test_multi_layer_bytes_count_each_used_adapter_at_its_own_rank():
    t, u, k, n = 5, 4, 6, 10
    case = MultiCase(t, u, k, n, (2, 8), "uniform", "token", 0.0, "fp16")
    ta = torch.tensor([0, 0, 1, -1, 2], dtype=torch.int32)  # adapter 3 unused, one token on -1
    use = adapter_use(case, ta)
    assert use == AdapterUse(active_tokens=4, token_rank_sum=2 + 2 + 8 + 2, used_rank_sum=2 + 8 + 2,
                             used_adapters=3)
    e = 2
    adapters = 12 * (k + n)
    fwd = e * (t * k + n * k + n + adapters + t * n)
    assert multi_cost("multi_lora_linear", case, use, "fwd") == Cost(
        fwd, 2 * t * n * k + 2 * 14 * (k + n))
    bwd = 2 * FP32_BYTES * 14 + e * (t * n + n * k + 2 * t * k + 2 * adapters)
    assert multi_cost("multi_lora_linear", case, use, "fwd+bwd").bytes == fwd + bwd
    assert multi_cost("shrink", case, use, "fwd") == Cost(
        e * (4 * k + 12 * k) + FP32_BYTES * t * 8, 2 * 14 * k)


def test_floor_is_the_larger_of_memory_and_arithmetic_time():
    assert floor_seconds(Cost(100, 10), 10.0, 10.0) == (10.0, "memory")
    assert floor_seconds(Cost(10, 100), 10.0, 10.0) == (10.0, "compute")
    assert floor_seconds(Cost(10, 100), 10.0, 0.0) == (1.0, "memory")


# --- suites and shapes -----------------------------------------------------------------------

def test_suites_take_the_llama_layers_as_k_by_n():
    layers = {(j.case.K, j.case.N) for j in full_suite() if j.op == SINGLE_OP}
    assert layers == set(LLAMA_LAYERS)


def test_r_max_is_the_largest_rank_in_the_pool():
    assert MultiCase(4, 1, 8, 8, MIXED_RANKS, "uniform", "token", 0.0, "fp32").r_max == 16
    assert MultiCase(4, 2, 8, 8, MIXED_RANKS, "uniform", "token", 0.0, "fp32").r_max == 64


def test_cpu_suite_measures_c2_in_both_modes():
    c2 = [j for j in cpu_suite() if j.op == "multi_lora_linear" and j.case.dist == "uniform"
          and j.case.index == "token"
          and all(j.case.as_dict()[key] == value for key, value in C2_SHAPE.items())]
    assert c2 and any(j.modes == ("fwd", "fwd+bwd") for j in c2)


def test_explicit_and_selected_jobs_keep_every_op_and_layer_mode():
    jobs = explicit_jobs(["T=8,U=2,K=16,N=8,r=4"], ["shrink", "expand", "multi_lora_linear"], "fp32")
    assert {j.op: j.modes for j in jobs} == {"shrink": ("fwd",), "expand": ("fwd",),
                                             "multi_lora_linear": ("fwd", "fwd+bwd")}
    picked = select_jobs(quick_suite(), ["shrink", "expand", "multi_lora_linear"], ["fwd"], "bf16")
    assert [j.op for j in picked] == ["shrink", "expand", "multi_lora_linear"] * 2
    assert all(j.case.dtype == "bf16" for j in picked)


# --- drawn batches ---------------------------------------------------------------------------

@pytest.mark.parametrize("adapters", [2, 16])
def test_skewed_puts_its_share_on_adapter_0_and_the_rest_elsewhere(adapters):
    """adapter_mix's docstring: 70% of the tokens on adapter 0, the rest over the other U-1."""
    idx = token_adapter(4000, adapters, "skewed", 0.0, seed=5)
    assert abs(float((idx == 0).float().mean()) - 0.7) < 0.03


def test_none_tokens_are_the_rounded_share_even_for_small_batches():
    assert int((token_adapter(7, 3, "uniform", 0.1) == -1).sum()) == 1  # round(0.7)
    assert int((token_adapter(15, 3, "uniform", 0.1) == -1).sum()) == 2  # round(1.5)


# --- the markdown report ---------------------------------------------------------------------

def _doc(rows):
    env = {"device_name": "cpu", "date": "d", "commit": "c", "torch": "t", "triton": None,
           "peft": None, "python": "3", "threads": 2, "device_detail": {}}
    return {"environment": env, "ceilings": {"copy_gbps": 10.0, "matmul_tflops": {"fp32": 1.0}},
            "config": {"suite": "quick", "timing": "wall clock"}, "jobs_run": 1, "skipped": [],
            "verdicts": [], "rows": rows}


def _table_after(text, title):
    lines = text.splitlines()
    at = lines.index(title) + 2
    header = [c.strip() for c in lines[at].strip("|").split("|")]
    out = []
    for line in lines[at + 2:]:
        if not line.startswith("|"):
            break
        out.append(dict(zip(header, (c.strip() for c in line.strip("|").split("|")))))
    return out


def test_summary_tables_put_each_number_under_its_column():
    def row(op, provider, **extra):
        return {"op": op, "mode": "fwd", "case": "c", "provider": provider, "status": "ok",
                "median_us": 20.0, "q20_us": 18.0, "q80_us": 25.0, "ratio_to_base": 2.0,
                "ratio_to_eager": 0.5, "gbps": 3.0, "copy_frac": 0.3, "floor_frac": 0.1, **extra}
    rows = [row("lora_linear", "lora_ops:cpu", check_ok=False, check_rel_err=0.25,
                saved_bytes=111, saved_expected_bytes=222),
            row("expand", "lora_ops:cpu", check_ok=True)]
    text = report.summary_markdown(_doc(rows))
    (cells,) = _table_after(text, "## lora_linear, fwd")
    assert cells["×base"] == "2.000" and cells["×eager"] == "0.500"
    assert cells["copy"] == "0.300" and cells["floor"] == "0.100"
    assert cells["q20–q80 µs"] == "18.0–25.0" and cells["check"] == "FAIL 2.5e-01"
    (expand,) = _table_after(text, "## expand, fwd")
    assert expand["check"] == "ok"
    (saved,) = _table_after(text, "## Activation memory kept for backward (T5; training, dropout 0.1)")
    assert saved["saved bytes"] == "111" and saved["M·r or T·r_max budget"] == "222"


def test_commit_named_in_the_environment_wins(monkeypatch):
    monkeypatch.setenv(report.COMMIT_ENV, "abc123")
    assert report.commit() == {"commit": "abc123", "commit_source": report.COMMIT_ENV, "dirty": None}


# --- providers compute what they claim -------------------------------------------------------

def test_relative_error_is_against_the_reference_norm():
    ref = torch.tensor([3.0, 4.0])
    assert relative_error(2 * ref, ref) == pytest.approx(1.0)
    assert relative_error(torch.tensor([float("nan"), 0.0]), ref) == float("inf")


def test_eager_dropout_touches_only_the_adapter_path():
    case = LinearCase(8, 32, 16, 4, "fp32")
    inp = linear_providers.make_inputs(case, CPU, 1)[0]
    zero_b = torch.zeros_like(inp.lora_b)
    with torch.no_grad():
        out = linear_providers.eager_lora(inp.x, inp.weight, inp.bias, inp.lora_a, zero_b, 2.0, 0.5)
        torch.testing.assert_close(out, F.linear(inp.x, inp.weight, inp.bias))


def test_providers_bound_for_inference_ignore_dropout_and_match_the_oracle():
    case = LinearCase(8, 32, 16, 4, "fp32")
    inp = linear_providers.make_inputs(case, CPU, 1)[0]
    for p in linear_providers.providers(("eager", "peft"), ("reference", "cpu")):
        if p.role == "base":
            continue
        err = runner.oracle_error(SINGLE_OP, p.bind(inp, False, 0.5), inp)
        assert err <= CHECK_TOLERANCE["fp32"], p.name
