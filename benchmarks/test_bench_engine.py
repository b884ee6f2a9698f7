"""Tests of the benchmark engine itself (lora_ops/bench): the batches it draws, the byte model,
the memory probe, the verdicts, and one end-to-end run. Nothing here asserts on time."""
import json

import pytest
import torch

from lora_ops.bench import main
from lora_ops.bench.adapter_mix import token_adapter
from lora_ops.bench.cases import LinearCase, MultiCase, parse_shape
from lora_ops.bench.cost_model import AdapterUse, linear_cost, multi_cost
from lora_ops.bench.verdicts import C2_SHAPE, DECODE_MAX_TOKENS, SAVED_SLACK_BYTES, judge


@pytest.mark.parametrize("dist", ["distinct", "uniform", "zipf:1.5", "identical", "skewed"])
def test_token_adapter_draws_valid_reproducible_batches(dist):
    tokens, adapters = 133, 200 if dist == "distinct" else 16
    idx = token_adapter(tokens, adapters, dist, 0.1, seed=3)
    assert idx.dtype == torch.int32 and idx.shape == (tokens,)
    assert int((idx == -1).sum()) == round(0.1 * tokens)
    assert int(idx.min()) >= -1 and int(idx.max()) < adapters
    assert torch.equal(idx, token_adapter(tokens, adapters, dist, 0.1, seed=3))
    used = idx[idx >= 0]
    if dist == "distinct":
        assert used.unique().numel() == used.numel()
    if dist == "identical":
        assert bool((used == 0).all())
    if dist in ("zipf:1.5", "skewed"):
        assert int(torch.bincount(used.long()).argmax()) == 0  # the most popular adapter is 0


def test_multi_byte_model_is_design_formula():
    """DESIGN.md: shrink + expand in bf16 move 2*U*r*(K+N) + 2*T*K + 4*T*N bytes plus the fp32
    intermediate (written by shrink, read by expand), when every token has an adapter."""
    t, u, k, n, r = 64, 16, 2048, 1024, 16
    case = MultiCase(t, u, k, n, (r,), "uniform", "token", 0.0, "bf16")
    use = AdapterUse(active_tokens=t, token_rank_sum=t * r, used_rank_sum=u * r, used_adapters=u)
    total = multi_cost("shrink", case, use, "fwd").bytes + multi_cost("expand", case, use, "fwd").bytes
    assert total == 2 * u * r * (k + n) + 2 * t * k + 4 * t * n + 2 * 4 * t * r


def test_linear_flop_model_is_design_formula():
    m, k, n, r = 16, 4096, 1024, 8
    case = LinearCase(m, k, n, r, "bf16")
    assert linear_cost(case, "fwd+bwd").flops == 4 * m * n * k + 6 * m * r * (k + n)
    base = linear_cost(case, "fwd", with_adapter=False)
    assert base.bytes == 2 * (m * k + n * k + n + m * n)


def test_parse_shape():
    assert parse_shape("M=16,K=4096,N=1024,r=8", "bf16") == LinearCase(16, 4096, 1024, 8, "bf16")
    case = parse_shape("T=7,U=3,K=64,N=32,r=8/4,dist=zipf:1.5,index=segment,none=0,dtype=fp16", "bf16")
    assert case == MultiCase(7, 3, 64, 32, (8, 4), "zipf:1.5", "segment", 0.0, "fp16")
    assert case.r_max == 8 and case.adapter_rank(1) == 4
    for bad in ("M=16,K=4096", "M=1,K=2,N=3,r=1,x=1", "T=4,U=2,K=8,N=8,dist=distinct", "Q=1"):
        with pytest.raises(ValueError, match="bench"):
            parse_shape(bad, "bf16")


def _row(provider, op="lora_linear", mode="fwd", ratio=1.0, **extra):
    row = {"provider": provider, "role": "lora_ops" if ":" in provider else "eager", "op": op,
           "mode": mode, "case": "c", "dtype": "bf16", "shape": {}, "status": "ok",
           "median_us": 10.0 * ratio, "q20_us": 9.0 * ratio, "q80_us": 11.0 * ratio,
           "ratio_to_base": ratio, "ratio_to_eager": ratio}
    row.update(extra)
    return row


def test_verdicts_judge_only_what_was_measured_where():
    rows = [_row("lora_ops:cuda", ratio=1.02), _row("lora_ops:cuda", mode="fwd+bwd", ratio=1.3)]
    by_id = {v["id"]: v for v in judge(rows, "cuda") if v["provider"] in ("lora_ops:cuda", None)}
    assert by_id["T1"]["verdict"] == "met"
    assert by_id["T2"]["verdict"] == "not met"
    assert by_id["T3"]["verdict"] == "not measured"
    assert by_id["C1"]["verdict"] == "not measured"
    cpu = {v["id"]: v for v in judge([_row("lora_ops:cpu", ratio=0.5, dtype="fp32"),
                                      _row("lora_ops:cpu", ratio=1.01, dtype="fp32")], "cpu")}
    assert cpu["T1"]["verdict"] == "not measured"
    assert cpu["C1"]["verdict"] == "not met"  # one row not faster is enough
    wrong = judge([_row("lora_ops:cpu", ratio=0.5, check_ok=False)], "cpu")
    assert {v["id"]: v for v in wrong}["C1"]["verdict"] == "not met"


def _by_id(rows, device_type, provider):
    return {v["id"]: v for v in judge(rows, device_type) if v["provider"] == provider}


def test_ratio_targets_take_the_geomean_with_inclusive_bounds():
    # geomean 1.049 <= 1.05, though the arithmetic mean is 1.35
    spread = [_row("lora_ops:cuda", ratio=0.5), _row("lora_ops:cuda", ratio=2.2)]
    assert _by_id(spread, "cuda", "lora_ops:cuda")["T1"]["verdict"] == "met"
    at_bounds = [_row("lora_ops:cuda", ratio=1.05), _row("lora_ops:cuda", mode="fwd+bwd", ratio=1.10)]
    by_id = _by_id(at_bounds, "cuda", "lora_ops:cuda")
    assert by_id["T1"]["verdict"] == "met" and by_id["T2"]["verdict"] == "met"
    wrong = [_row("lora_ops:cuda", ratio=0.5, check_ok=False)]
    assert _by_id(wrong, "cuda", "lora_ops:cuda")["T1"]["verdict"] == "not met"


def test_t4_judges_decode_rows_on_cuda_graph_time():
    decode = _row("lora_ops:cuda", op="multi_lora_linear", shape={"T": DECODE_MAX_TOKENS}, floor_us=9.0,
                  graph_median_us=10.0, median_us=20.0)
    prefill = _row("lora_ops:cuda", op="multi_lora_linear", shape={"T": DECODE_MAX_TOKENS + 1}, floor_us=1.0)
    t4 = _by_id([decode, prefill], "cuda", "lora_ops:cuda")["T4"]
    assert t4["verdict"] == "met" and "over 1 rows" in t4["measured"]


@pytest.mark.parametrize("extra, verdict", [(SAVED_SLACK_BYTES, "met"), (SAVED_SLACK_BYTES + 1, "not met")])
def test_t5_allows_the_slack_and_no_byte_more(extra, verdict):
    row = _row("lora_ops:cpu", mode="fwd+bwd", saved_expected_bytes=4096, saved_bytes=4096 + extra)
    assert _by_id([row], "cpu", "lora_ops:cpu")["T5"]["verdict"] == verdict


def test_c1_needs_every_row_strictly_faster_and_the_oracle_is_not_judged():
    rows = [_row("lora_ops:cpu", ratio=0.5), _row("lora_ops:cpu", ratio=1.0),
            _row("lora_ops:reference", ratio=3.0, saved_expected_bytes=0, saved_bytes=10**6)]
    assert _by_id(rows, "cpu", "lora_ops:cpu")["C1"]["verdict"] == "not met"
    assert not any(v["provider"] == "lora_ops:reference" for v in judge(rows, "cpu"))


def _c2_row(ratio, dist="uniform", **extra):
    shape = {**C2_SHAPE, "dist": dist, "index": "token"}
    return _row("lora_ops:cpu", op="multi_lora_linear", ratio=ratio, dtype="fp32", eager_ref="peft",
                shape=shape, **extra)


@pytest.mark.parametrize("rows, verdict", [
    ([_c2_row(0.5), _c2_row(2 / 3, dist="zipf:1.5")], "met"),  # 2x and exactly 1.5x faster
    ([_c2_row(0.5), _c2_row(0.8, dist="zipf:1.5")], "not met"),  # one shape only 1.25x
    ([_c2_row(0.5, check_ok=False)], "not met"),
    ([{**_c2_row(0.5), "shape": {**C2_SHAPE, "K": 1024, "dist": "uniform", "index": "token"}}], "not measured"),
], ids=["met", "one-slow", "wrong-output", "other-shape"])
def test_c2_is_the_lowest_speedup_over_peft_at_its_shape(rows, verdict):
    assert _by_id(rows, "cpu", "lora_ops:cpu")["C2"]["verdict"] == verdict


def test_quick_suite_end_to_end(tmp_path):
    out = tmp_path / "run.json"
    rc = main(["--suite", "quick", "--device", "cpu", "--cpu-budget", "0.02",
               "--peers", "eager,peft,gather_bmm", "--json", str(out),
               "--summary", str(tmp_path / "run.md"), "--plot", str(tmp_path / "run.png")])
    assert rc == 0
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    assert doc["environment"]["date"] and doc["environment"]["torch"] == torch.__version__
    assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
    assert all(r["check_ok"] for r in rows if "check_ok" in r)
    assert {r["op"] for r in rows} == {"lora_linear", "shrink", "expand", "multi_lora_linear"}
    assert {r["provider"] for r in rows if r["op"] == "lora_linear"} >= {"base", "eager", "peft"}
    # The memory probe: F.linear keeps only x and W (alive anyway); PEFT-style eager with
    # dropout keeps dropout(x) [M, K], S [M, r] (fp32 here) and a mask of dropout(x)'s shape
    # (bool on CUDA, the fp32 scaled noise on CPU).
    for r in rows:
        if r["op"] == "lora_linear" and "saved_bytes" in r:
            m, k, rank = r["shape"]["M"], r["shape"]["K"], r["shape"]["r"]
            if r["provider"] == "base":
                assert r["saved_bytes"] == 0
            if r["provider"] == "eager":
                assert r["saved_bytes"] in (m * k * (4 + 1) + m * rank * 4, m * k * (4 + 4) + m * rank * 4)
    assert (tmp_path / "run.md").read_text().startswith("# lora_ops benchmark")
    assert (tmp_path / "run.png").stat().st_size > 0
