"""The targets of DESIGN.md, judged on the rows of one run: met, not met, or not measured.

A GPU target is judged only on rows measured on a CUDA device and a CPU target only on CPU
rows; nothing is carried over from another run. A backend whose output failed the oracle
check does not meet a target, whatever its time.
"""
import math
from typing import Callable, List, Optional

DECODE_MAX_TOKENS = 64
SAVED_SLACK_BYTES = 64  # allocator rounding of a tiny tensor, and the 8-byte dropout seed
C2_SHAPE = {"T": 64, "U": 16, "K": 2048, "N": 2048, "ranks": [16]}

TARGETS = {
    "T1": ("fused forward / base F.linear alone, bf16, geomean over the shape suite", "<= 1.05"),
    "T2": ("fused fwd+bwd / frozen base fwd+dgrad, bf16, geomean", "<= 1.10"),
    "T3": ("shrink/expand achieved bandwidth / measured copy bandwidth, geomean", ">= 0.85"),
    "T4": (f"fused base + multi-adapter layer at decode (T <= {DECODE_MAX_TOKENS}): byte floor / "
           f"time (CUDA-graph time where measured), geomean", ">= 0.85"),
    "T5": ("activation memory kept for backward per layer beyond x and parameters "
           "(training, dropout 0.1)", "<= M*r elements (+ seed)"),
    "C1": ("cpu backend vs PEFT-style eager, forward and training step", "faster at every shape"),
    "C2": ("cpu multi_lora_linear vs PEFT adapter_names forward, T=64 U=16 K=N=2048 r=16 fp32",
           ">= 1.5x faster"),
}


def _geomean(values: List[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _lora_backends(rows: List[dict]) -> List[str]:
    names = sorted({r["provider"] for r in rows if r.get("role") == "lora_ops"})
    return [n for n in names if n != "lora_ops:reference"]  # the oracle, not a fused kernel


def _verdict(target: str, provider: Optional[str], verdict: str, measured: str) -> dict:
    what, goal = TARGETS[target]
    return {"id": target, "provider": provider, "what": what, "target": goal,
            "measured": measured, "verdict": verdict}


def _judge_ratio(target: str, provider: str, rows: List[dict], value: Callable[[dict], Optional[float]],
                 goal: float, lower_is_better: bool) -> dict:
    picked = [(r, value(r)) for r in rows]
    picked = [(r, v) for r, v in picked if v]
    if not picked:
        return _verdict(target, provider, "not measured", "no timed rows")
    geo = _geomean([v for _, v in picked])
    worst_row, worst = (max if lower_is_better else min)(picked, key=lambda rv: rv[1])
    wrong = [r for r, _ in picked if r.get("check_ok") is False]
    met = geo <= goal if lower_is_better else geo >= goal
    measured = (f"{geo:.3f} geomean over {len(picked)} rows; worst {worst:.3f} at "
                f"{worst_row['mode']} {worst_row['case']}")
    if wrong:
        return _verdict(target, provider, "not met",
                        measured + f"; {len(wrong)} rows failed the oracle check")
    return _verdict(target, provider, "met" if met else "not met", measured)


def _select(rows, provider, **where):
    return [r for r in rows if r["provider"] == provider and r.get("status") == "ok"
            and all(r.get(k) == v for k, v in where.items())]


def _t4_value(row: dict) -> Optional[float]:
    if row["shape"].get("T", 0) > DECODE_MAX_TOKENS:
        return None
    time_us = row.get("graph_median_us") or row.get("median_us")
    return row["floor_us"] / time_us if time_us else None


def _t5(rows: List[dict], provider: str) -> dict:
    probed = [r for r in rows if r["provider"] == provider and "saved_bytes" in r]
    if not probed:
        return _verdict("T5", provider, "not measured", "no training rows probed")
    over = [r for r in probed if r["saved_bytes"] > r["saved_expected_bytes"] + SAVED_SLACK_BYTES]
    eager = {(r["op"], r["case"]): r["saved_bytes"] for r in rows
             if r["provider"] in ("eager", "peft") and "saved_bytes" in r}
    biggest = max(probed, key=lambda r: r["saved_expected_bytes"])
    measured = (f"{biggest['saved_bytes']} B kept at {biggest['case']} (M*r*elt or T*r_max*4 = "
                f"{biggest['saved_expected_bytes']} B)")
    if (biggest["op"], biggest["case"]) in eager:
        measured += f"; PEFT-style eager keeps {eager[(biggest['op'], biggest['case'])]} B there"
    if over:
        worst = max(over, key=lambda r: r["saved_bytes"] - r["saved_expected_bytes"])
        measured += f"; {len(over)} rows over, worst {worst['saved_bytes']} B at {worst['case']}"
    return _verdict("T5", provider, "not met" if over else "met", measured)


def _c1(rows: List[dict]) -> dict:
    picked = [r for r in _select(rows, "lora_ops:cpu", op="lora_linear") if "ratio_to_eager" in r]
    if not picked:
        return _verdict("C1", "lora_ops:cpu", "not measured", "no cpu-backend lora_linear rows")
    slower = [r for r in picked if r["ratio_to_eager"] >= 1.0]
    eager_q80 = {(r["mode"], r["case"]): r["q80_us"] for r in rows
                 if r["provider"] == "eager" and r.get("status") == "ok"}
    # slower beyond noise: even its 20% quantile is above eager's 80% quantile
    clearly = [r for r in slower if r["q20_us"] > eager_q80.get((r["mode"], r["case"]), float("inf"))]
    worst = max(picked, key=lambda r: r["ratio_to_eager"])
    wrong = [r for r in picked if r.get("check_ok") is False]
    measured = (f"time / eager: geomean {_geomean([r['ratio_to_eager'] for r in picked]):.3f}, "
                f"worst {worst['ratio_to_eager']:.3f} at {worst['mode']} {worst['case']}, "
                f"over {len(picked)} rows; {len(slower)} not faster, {len(clearly)} of them "
                f"beyond the 20-80% spread")
    if wrong:
        measured += f"; {len(wrong)} rows failed the oracle check"
    return _verdict("C1", "lora_ops:cpu", "met" if not slower and not wrong else "not met", measured)


def _c2(rows: List[dict]) -> dict:
    picked = [r for r in _select(rows, "lora_ops:cpu", op="multi_lora_linear", mode="fwd", dtype="fp32")
              if r.get("eager_ref") == "peft"
              and all(r["shape"].get(k) == v for k, v in C2_SHAPE.items())]
    if not picked:
        return _verdict("C2", "lora_ops:cpu", "not measured",
                        "no cpu-backend rows at the C2 shape with PEFT beside them")
    speedups = [(r, 1.0 / r["ratio_to_eager"]) for r in picked]
    low_row, low = min(speedups, key=lambda rv: rv[1])
    wrong = [r for r in picked if r.get("check_ok") is False]
    measured = (f"PEFT time / cpu time: lowest {low:.2f}x ({low_row['shape']['dist']}, "
                f"{low_row['shape']['index']} index) over {len(picked)} rows: "
                + ", ".join(f"{r['shape']['dist']}/{r['shape']['index']} {s:.2f}x" for r, s in speedups))
    met = low >= 1.5 and not wrong
    return _verdict("C2", "lora_ops:cpu", "met" if met else "not met", measured)


def judge(rows: List[dict], device_type: str) -> List[dict]:
    out: List[dict] = []
    backends = _lora_backends(rows)
    if device_type == "cuda":
        for b in backends:
            out.append(_judge_ratio("T1", b, _select(rows, b, op="lora_linear", mode="fwd", dtype="bf16"),
                                    lambda r: r.get("ratio_to_base"), 1.05, True))
            out.append(_judge_ratio("T2", b, _select(rows, b, op="lora_linear", mode="fwd+bwd", dtype="bf16"),
                                    lambda r: r.get("ratio_to_base"), 1.10, True))
            out.append(_judge_ratio("T3", b, [r for r in _select(rows, b, mode="fwd")
                                              if r["op"] in ("shrink", "expand")],
                                    lambda r: r.get("copy_frac"), 0.85, False))
            out.append(_judge_ratio("T4", b, _select(rows, b, op="multi_lora_linear", mode="fwd"),
                                    _t4_value, 0.85, False))
            out.append(_t5(rows, b))
        if not backends:
            out += [_verdict(t, None, "not measured", "no fused lora_ops backend was timed")
                    for t in ("T1", "T2", "T3", "T4", "T5")]
        out += [_verdict(t, None, "not measured", "CPU target; this run was on a GPU") for t in ("C1", "C2")]
    else:
        out += [_verdict(t, None, "not measured", "needs a GPU; this run was on the CPU")
                for t in ("T1", "T2", "T3", "T4")]
        out += [_t5(rows, b) for b in backends] or [
            _verdict("T5", None, "not measured", "no fused lora_ops backend was timed")]
        out += [_c1(rows), _c2(rows)]
    return out

