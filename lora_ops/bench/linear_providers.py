"""Single-adapter inputs, providers and oracle: base F.linear, PEFT-style eager LoRA, the same
under torch.compile, PEFT's own LoRA Linear layer, and each lora_ops backend."""
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lora_ops.bench.cases import DTYPES, LinearCase
from lora_ops.bench.provider import Bound, Provider

LORA_ALPHA_PER_RANK = 2  # lora_alpha = 2 r, so scaling = 2 (PEFT computes alpha / r)
ORACLE_ROWS = 256        # rows checked against the float64 oracle (the kernels treat rows alike)


@dataclass
class LinearInputs:
    x: Tensor        # [M, K], requires grad
    weight: Tensor   # [N, K], frozen
    bias: Tensor     # [N], frozen
    lora_a: Tensor   # [r, K], requires grad
    lora_b: Tensor   # [N, r], requires grad
    dy: Tensor       # [M, N]
    scaling: float
    seed: int        # the lora_ops dropout seed of this set


def set_bytes(case: LinearCase) -> int:
    e = torch.empty((), dtype=DTYPES[case.dtype]).element_size()
    m, k, n, r = case.M, case.K, case.N, case.r
    return e * (m * k + n * k + n + r * (k + n) + m * n)


def make_inputs(case: LinearCase, device: torch.device, count: int, seed: int = 0) -> List[LinearInputs]:
    """`count` independent input sets (random, never zeros: zeros hide wrong indexing and can
    run faster than real data)."""
    dtype = DTYPES[case.dtype]
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, scale=1.0, grad=False):
        t = torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * scale
        return t.to(dtype).requires_grad_(grad)

    sets = []
    for i in range(count):
        sets.append(LinearInputs(
            x=randn(case.M, case.K, grad=True),
            weight=randn(case.N, case.K, scale=case.K ** -0.5),
            bias=randn(case.N, scale=0.1),
            lora_a=randn(case.r, case.K, scale=case.K ** -0.5, grad=True),
            lora_b=randn(case.N, case.r, scale=case.r ** -0.5, grad=True),
            dy=randn(case.M, case.N),
            scaling=float(LORA_ALPHA_PER_RANK),
            seed=1234 + i))
    return sets


def oracle(inputs: LinearInputs) -> Tensor:
    """Float64 y for the first ORACLE_ROWS rows, no dropout."""
    x = inputs.x.detach()[:ORACLE_ROWS].double()
    a, b = inputs.lora_a.detach().double(), inputs.lora_b.detach().double()
    return (x @ inputs.weight.double().t() + inputs.bias.double()
            + inputs.scaling * ((x @ a.t()) @ b.t()))


def eager_lora(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
               scaling: float, dropout_p: float) -> Tensor:
    """PEFT's LoRA Linear forward written out: base layer, then lora_B(lora_A(dropout(x))) * s
    as nn.Linear calls (F.linear), dropout only on the adapter path."""
    dropped = F.dropout(x, dropout_p, training=True) if dropout_p > 0.0 else x
    return F.linear(x, weight, bias) + F.linear(F.linear(dropped, lora_a), lora_b) * scaling


_compiled_eager = None


def compiled_eager_lora():
    """One torch.compile of eager_lora for the whole run, with dynamic shapes: a suite costs a
    compile per dtype, grad mode and M == 1 (which torch specializes), not one per shape."""
    global _compiled_eager
    if _compiled_eager is None:
        _compiled_eager = torch.compile(eager_lora, dynamic=True)
    return _compiled_eager


def _bind_base(inp: LinearInputs, training: bool, dropout_p: float) -> Bound:
    return Bound(lambda: F.linear(inp.x, inp.weight, inp.bias), (inp.x,))


def _bind_eager(inp: LinearInputs, training: bool, dropout_p: float) -> Bound:
    p = dropout_p if training else 0.0
    return Bound(lambda: eager_lora(inp.x, inp.weight, inp.bias, inp.lora_a, inp.lora_b,
                                    inp.scaling, p), (inp.x, inp.lora_a, inp.lora_b))


def _bind_compiled(inp: LinearInputs, training: bool, dropout_p: float) -> Bound:
    fn = compiled_eager_lora()
    p = dropout_p if training else 0.0
    return Bound(lambda: fn(inp.x, inp.weight, inp.bias, inp.lora_a, inp.lora_b, inp.scaling, p),
                 (inp.x, inp.lora_a, inp.lora_b))


def peft_lora_linear(weight: Tensor, bias: Optional[Tensor], adapters: Sequence[tuple],
                     dropout_p: float) -> nn.Module:
    """PEFT's LoRA Linear layer around the given base weight, holding `adapters`: tuples of
    (name, lora_a [r, K], lora_b [N, r], lora_alpha). The tensors are shared, not copied."""
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLoraLinear

    n, k = weight.shape
    base = nn.Linear(k, n, bias=bias is not None, device="meta")
    base.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if bias is not None:
        base.bias = nn.Parameter(bias.detach(), requires_grad=False)
    layer = None
    for name, lora_a, lora_b, alpha in adapters:
        r = lora_a.shape[0]
        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout_p)
        if layer is None:
            layer = PeftLoraLinear(base, name, config=config, r=r, lora_alpha=alpha)
        else:
            layer.update_layer(name, r, lora_alpha=alpha, config=config)
        layer.lora_A[name].weight = nn.Parameter(lora_a.detach(), requires_grad=lora_a.requires_grad)
        layer.lora_B[name].weight = nn.Parameter(lora_b.detach(), requires_grad=lora_b.requires_grad)
    return layer


def _bind_peft(inp: LinearInputs, training: bool, dropout_p: float) -> Bound:
    r = inp.lora_a.shape[0]
    layer = peft_lora_linear(inp.weight, inp.bias,
                             [("default", inp.lora_a, inp.lora_b, LORA_ALPHA_PER_RANK * r)],
                             dropout_p if training else 0.0)
    layer.train(training)
    return Bound(lambda: layer(inp.x),
                 (inp.x, layer.lora_A["default"].weight, layer.lora_B["default"].weight))


def _lora_ops_binder(backend: str):
    from lora_ops.lora_linear import lora_linear

    def bind(inp: LinearInputs, training: bool, dropout_p: float) -> Bound:
        return Bound(lambda: lora_linear(inp.x, inp.weight, inp.bias, inp.lora_a, inp.lora_b,
                                         inp.scaling, dropout_p=dropout_p, training=training,
                                         seed=inp.seed, backend=backend),
                     (inp.x, inp.lora_a, inp.lora_b))
    return bind


def providers(peers: Sequence[str], backends: Sequence[str]) -> List[Provider]:
    """base always; the peers asked for among eager, eager_compiled, peft; then lora_ops:<b>."""
    out = [Provider("base", "base", _bind_base)]
    table = {
        "eager": Provider("eager", "eager", _bind_eager),
        "eager_compiled": Provider("eager_compiled", "peer", _bind_compiled, memory_probe=False),
        "peft": Provider("peft", "peer", _bind_peft),
    }
    out += [table[name] for name in peers if name in table]
    out += [Provider(f"lora_ops:{b}", "lora_ops", _lora_ops_binder(b)) for b in backends]
    return out
