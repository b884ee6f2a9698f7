"""Multi-adapter inputs, providers and oracle for shrink, expand and the fused layer.

Peers: a gather + bmm implementation in plain torch (each token fetches its adapter's padded
[r_max, K] block and does a batched matrix-vector product: the usual way to write this without
custom kernels), PEFT's mixed-batch forward (`adapter_names`, inference only), and each
lora_ops backend. Stacks hold zeros past each adapter's rank so the padded peers compute the
right answer; lora_ops never reads there.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lora_ops.bench.adapter_mix import token_adapter as draw_token_adapter
from lora_ops.bench.cases import DTYPES, MultiCase
from lora_ops.bench.linear_providers import peft_lora_linear
from lora_ops.bench.provider import Bound, Provider

LORA_ALPHA = 16.0  # every adapter: scaling = 16 / its rank (PEFT's alpha / r)
BASE_ONLY = "__base__"  # PEFT's adapter name for "no adapter" in a mixed batch


@dataclass
class MultiInputs:
    x: Tensor                 # [T, K], requires grad
    weight: Tensor            # [N, K]
    bias: Tensor              # [N]
    lora_a: Tensor            # [U, r_max, K], zero past each rank, requires grad
    lora_b: Tensor            # [U, N, r_max], zero past each rank, requires grad
    scalings: Tensor          # float32 [U]
    ranks: Tensor             # int32 [U]
    token_adapter: Tensor     # int32 [T] (tokens grouped by adapter for the segment form)
    index: Dict[str, Tensor]  # the index form the lora_ops ops receive
    adapter_names: List[str]  # PEFT's per-token names
    t: Tensor                 # float32 [1, T, r_max]: the input of expand
    y: Tensor                 # [T, N]: the output expand accumulates into
    dy: Tensor                # [T, N]


def batch_token_adapter(case: MultiCase, seed: int = 0) -> torch.Tensor:
    """The batch's adapter per token on the CPU; for the segment form grouped by adapter with
    lora_ops' own helper, as an engine would lay a prefill batch out."""
    idx = draw_token_adapter(case.T, case.U, case.dist, case.none_frac, seed)
    if case.index == "segment":
        from lora_ops.multi_lora import segments_from_token_adapter
        perm, _, _ = segments_from_token_adapter(idx, case.U)
        idx = idx[perm]
    return idx


def set_bytes(case: MultiCase) -> int:
    e = torch.empty((), dtype=DTYPES[case.dtype]).element_size()
    t, k, n, u, r = case.T, case.K, case.N, case.U, case.r_max
    return e * (t * k + n * k + n + u * r * (k + n) + 3 * t * n) + 4 * t * r


def make_inputs(case: MultiCase, token_adapter_cpu: Tensor, device: torch.device, count: int,
                seed: int = 0) -> List[MultiInputs]:
    dtype = DTYPES[case.dtype]
    gen = torch.Generator(device=device).manual_seed(seed)
    ranks_list = [case.adapter_rank(a) for a in range(case.U)]
    ranks = torch.tensor(ranks_list, dtype=torch.int32, device=device)
    within = torch.arange(case.r_max, device=device)[None, :] < ranks.long()[:, None]  # [U, r_max]
    scalings = torch.tensor([LORA_ALPHA / r for r in ranks_list], dtype=torch.float32, device=device)
    token_adapter = token_adapter_cpu.to(device)
    index = _index_form(case, token_adapter)
    names = [BASE_ONLY if a < 0 else f"adapter{a}" for a in token_adapter_cpu.tolist()]

    def randn(*shape, scale=1.0, grad=False):
        t = torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * scale
        return t.to(dtype).requires_grad_(grad)

    sets = []
    for _ in range(count):
        lora_a = randn(case.U, case.r_max, case.K, scale=case.K ** -0.5)
        lora_b = randn(case.U, case.N, case.r_max, scale=case.r_max ** -0.5)
        sets.append(MultiInputs(
            x=randn(case.T, case.K, grad=True),
            weight=randn(case.N, case.K, scale=case.K ** -0.5),
            bias=randn(case.N, scale=0.1),
            lora_a=(lora_a * within[:, :, None]).requires_grad_(True),
            lora_b=(lora_b * within[:, None, :]).requires_grad_(True),
            scalings=scalings, ranks=ranks, token_adapter=token_adapter, index=index,
            adapter_names=names,
            t=torch.randn(1, case.T, case.r_max, generator=gen, device=device),
            y=randn(case.T, case.N),
            dy=randn(case.T, case.N)))
    return sets


def _index_form(case: MultiCase, token_adapter: Tensor) -> Dict[str, Tensor]:
    if case.index == "token":
        return {"token_adapter": token_adapter}
    from lora_ops.multi_lora import segments_from_token_adapter
    _, seg_indptr, seg_adapter = segments_from_token_adapter(token_adapter, case.U)
    return {"seg_indptr": seg_indptr, "seg_adapter": seg_adapter}


def oracle(op: str, inputs: MultiInputs, y_before: Optional[Tensor] = None) -> Tensor:
    """Float64 result of `op` by lora_ops' reference (the project's oracle); for expand,
    `y_before` is y as it was before the call being checked."""
    from lora_ops.reference import multi_lora as ref

    x, a, b = inputs.x.detach().double(), inputs.lora_a.detach().double(), inputs.lora_b.detach().double()
    idx = {"token_adapter": inputs.token_adapter}
    if op == "shrink":
        return ref.multi_lora_shrink(x, [a], inputs.scalings, inputs.ranks, **idx)
    if op == "expand":
        return ref.multi_lora_expand(y_before.double(), inputs.t.double(), [b], [0], inputs.ranks, **idx)
    return ref.multi_lora_linear(x, inputs.weight.double(), inputs.bias.double(), [a], [b], [0],
                                 inputs.scalings, inputs.ranks, **idx)


def gather_shrink(x: Tensor, lora_a: Tensor, scalings: Tensor, token_adapter: Tensor) -> Tensor:
    """t [1, T, r_max] fp32 by gathering each token's padded A block and one bmm."""
    adapter = token_adapter.long()
    slot = adapter.clamp(min=0)
    scale = torch.where(adapter >= 0, scalings[slot], 0.0)
    t = torch.bmm(lora_a[slot], x.unsqueeze(2)).squeeze(2).float() * scale[:, None]
    return t.unsqueeze(0)


def gather_expand_delta(t: Tensor, lora_b: Tensor, token_adapter: Tensor) -> Tensor:
    """[T, N]: each token's t times its padded B block (zero rows for -1 tokens, whose t is 0)."""
    slot = token_adapter.long().clamp(min=0)
    return torch.bmm(lora_b[slot], t[0].to(lora_b.dtype).unsqueeze(2)).squeeze(2)


def _mask_base_only(t: Tensor, token_adapter: Tensor) -> Tensor:
    return t * (token_adapter >= 0)[None, :, None]


def _bind_base(inp: MultiInputs, training: bool, dropout_p: float) -> Bound:
    return Bound(lambda: F.linear(inp.x, inp.weight, inp.bias), (inp.x,))


def _gather_binder(op: str):
    def bind(inp: MultiInputs, training: bool, dropout_p: float) -> Bound:
        ta = inp.token_adapter
        if op == "shrink":
            return Bound(lambda: gather_shrink(inp.x, inp.lora_a, inp.scalings, ta))
        if op == "expand":
            return Bound(lambda: inp.y.add_(gather_expand_delta(_mask_base_only(inp.t, ta), inp.lora_b, ta)))

        def layer():
            t = gather_shrink(inp.x, inp.lora_a, inp.scalings, ta)
            return F.linear(inp.x, inp.weight, inp.bias) + gather_expand_delta(t, inp.lora_b, ta)
        return Bound(layer, (inp.x, inp.lora_a, inp.lora_b))
    return bind


def _bind_peft(inp: MultiInputs, training: bool, dropout_p: float) -> Bound:
    adapters = []
    for a in range(inp.lora_a.shape[0]):
        r = int(inp.ranks[a])
        # PEFT keeps each adapter as its own contiguous [r, K] and [N, r] weights
        adapters.append((f"adapter{a}", inp.lora_a.detach()[a, :r].contiguous(),
                         inp.lora_b.detach()[a, :, :r].contiguous(), LORA_ALPHA))
    layer = peft_lora_linear(inp.weight, inp.bias, adapters, 0.0)
    layer.eval()
    return Bound(lambda: layer(inp.x, adapter_names=inp.adapter_names))


def _lora_ops_binder(op: str, backend: str):
    from lora_ops.multi_lora import lora_expand, lora_shrink, multi_lora_linear

    def bind(inp: MultiInputs, training: bool, dropout_p: float) -> Bound:
        if op == "shrink":
            return Bound(lambda: lora_shrink(inp.x, inp.lora_a, inp.scalings, inp.ranks,
                                             backend=backend, **inp.index))
        if op == "expand":
            return Bound(lambda: lora_expand(inp.y, inp.t, inp.lora_b, inp.ranks, backend=backend,
                                             **inp.index))
        return Bound(lambda: multi_lora_linear(inp.x, inp.weight, inp.bias, inp.lora_a, inp.lora_b,
                                               inp.scalings, inp.ranks, backend=backend, **inp.index),
                     (inp.x, inp.lora_a, inp.lora_b))
    return bind


def providers(op: str, peers: Sequence[str], backends: Sequence[str]) -> List[Provider]:
    """base (F.linear of the same layer, the scale every ratio is taken against), gather_bmm and
    (for the fused layer's forward) peft when asked for, then lora_ops:<backend>."""
    layer_modes = ("fwd", "fwd+bwd") if op == "multi_lora_linear" else ("fwd",)
    out = [Provider("base", "base", _bind_base, modes=layer_modes)]
    if "gather_bmm" in peers:
        out.append(Provider("gather_bmm", "peer", _gather_binder(op), modes=layer_modes))
    if "peft" in peers and op == "multi_lora_linear":
        # PEFT refuses adapter_names in training mode, and builds index lists on the host
        out.append(Provider("peft", "eager", _bind_peft, modes=("fwd",), graph_safe=False))
    out += [Provider(f"lora_ops:{b}", "lora_ops", _lora_ops_binder(op, b), modes=layer_modes,
                     graph_safe=b != "reference")
            for b in backends]
    return out
