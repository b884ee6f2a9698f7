"""Multi-adapter ops (lora_shrink, lora_expand, multi_lora_linear) on every backend against the
fp64 reference: adapter popularity, odd token counts, mixed ranks, -1 tokens, packed slices,
both index forms, gradients; opcheck; errors; what an out-of-range index does on the device."""
import math
from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import List, Optional

import pytest
import torch

from lora_ops import multi_lora
from lora_ops.multi_lora import (lora_expand, lora_shrink, multi_lora_linear,
                                 segments_from_token_adapter)
from lora_ops.reference import multi_lora as ref
from tests.helpers import (DTYPES, KERNEL_BACKENDS, assert_close_scaled, assert_rounded_once,
                           backend_params, nan_past_rank)

# MAIN: the compiled and reference backends on CPU, every backend on a GPU. KERNELS_FULL: the
# dtype x popularity matrix, kernels only (the reference is the oracle there). Triton on CPU
# runs in its interpreter, so it gets the few small tests further down.
MAIN = backend_params(("cuda", "cpu", "reference"), devices=("cpu",)) + \
    backend_params(("cuda", "triton", "reference"), devices=("cuda",))
KERNELS_FULL = backend_params(("cuda", "cpu"), devices=("cpu",)) + \
    backend_params(("cuda", "triton"), devices=("cuda",))
TRITON_CPU = backend_params(("triton",), devices=("cpu",))
KERNELS = backend_params(KERNEL_BACKENDS)

DISTRIBUTIONS = ("distinct", "uniform", "zipf1.5", "identical", "skewed")
MIXED_RANKS = (1, 8, 16, 64, 128)


def adapter_popularity(dist: str, M: int, L: int, gen: torch.Generator) -> torch.Tensor:
    """Adapter of every token (int64 [M]) for punica's popularity distributions."""
    if M == 0:
        return torch.zeros(0, dtype=torch.int64)
    if dist == "distinct":
        return torch.randperm(L, generator=gen)[:M] if M <= L else torch.arange(M) % L
    if dist == "uniform":
        return torch.randint(0, L, (M,), generator=gen)
    if dist == "zipf1.5":
        weights = 1.0 / torch.arange(1, L + 1, dtype=torch.float64) ** 1.5
        return torch.multinomial(weights, M, replacement=True, generator=gen)
    if dist == "identical":
        return torch.full((M,), int(torch.randint(0, L, (1,), generator=gen)))
    if dist == "skewed":  # half the tokens on one adapter, the rest uniform
        idx = torch.randint(0, L, (M,), generator=gen)
        return torch.where(torch.rand(M, generator=gen) < 0.5, 0, idx)
    raise ValueError(dist)


def runs_as_segments(token_adapter: torch.Tensor):
    """The segment form of the same per-token indices without reordering tokens: one segment
    per run of equal indices, after an empty one, which the kernels must accept."""
    values = token_adapter.tolist()
    starts = [i for i in range(len(values)) if i == 0 or values[i] != values[i - 1]]
    indptr = torch.tensor([0] + starts + [len(values)], dtype=torch.int32)
    return indptr, torch.tensor([-1] + [values[s] for s in starts], dtype=torch.int32)


@dataclass
class Problem:
    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    lora_a: List[torch.Tensor]
    lora_b: List[torch.Tensor]
    offsets: List[int]
    scalings: torch.Tensor
    ranks: torch.Tensor
    token_adapter: torch.Tensor

    def to(self, dtype=None, device=None):
        move = lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        return replace(self, x=move(self.x), weight=move(self.weight), bias=move(self.bias),
                       lora_a=[move(a) for a in self.lora_a], lora_b=[move(b) for b in self.lora_b],
                       scalings=self.scalings.to(device), ranks=self.ranks.to(device),
                       token_adapter=self.token_adapter.to(device))

    def index(self, form: str):
        if form == "token":
            return {"token_adapter": self.token_adapter}
        indptr, adapters = runs_as_segments(self.token_adapter.cpu())
        device = self.token_adapter.device
        return {"seg_indptr": indptr.to(device), "seg_adapter": adapters.to(device)}


def make_problem(M: int, dist: str = "uniform", *, K: int = 40, widths=(24,), gaps=None, tail=0,
                 L: Optional[int] = None, rank_choices=MIXED_RANKS, base_only: float = 0.1,
                 seed: int = 0) -> Problem:
    """An fp64 CPU problem; padding past each adapter's rank is NaN (it must never be read).
    `gaps` (columns before each slice) and `tail` (after the last) leave columns no slice
    covers, which expand accepts and the fused layer does not."""
    gen = torch.Generator().manual_seed(seed)
    L = L or (max(M, 1) if dist == "distinct" else 6)
    r_max = max(rank_choices)
    ranks = torch.tensor([rank_choices[i % len(rank_choices)] for i in range(L)], dtype=torch.int32)
    ranks = ranks[torch.randperm(L, generator=gen)]
    randn = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    lora_a, lora_b, offsets, col = [], [], [], 0
    for width, gap in zip(widths, gaps or [0] * len(widths)):
        lora_a.append(nan_past_rank(randn(L, r_max, K) / math.sqrt(K), ranks.tolist(), 1))
        lora_b.append(nan_past_rank(randn(L, width, r_max) / math.sqrt(r_max), ranks.tolist(), 2))
        col += gap
        offsets.append(col)
        col += width
    N = col + tail
    token_adapter = adapter_popularity(dist, M, L, gen)
    token_adapter[torch.rand(M, generator=gen) < base_only] = -1
    return Problem(x=randn(M, K), weight=randn(N, K) / math.sqrt(K), bias=randn(N),
                   lora_a=lora_a, lora_b=lora_b, offsets=offsets,
                   scalings=torch.rand(L, generator=gen, dtype=torch.float64) + 0.5,
                   ranks=ranks, token_adapter=token_adapter.to(torch.int32))


def oracle_shrink(p: Problem) -> torch.Tensor:
    return ref.multi_lora_shrink(p.x, p.lora_a, p.scalings, p.ranks, token_adapter=p.token_adapter)


def oracle_linear(p: Problem) -> torch.Tensor:
    return ref.multi_lora_linear(p.x, p.weight, p.bias, p.lora_a, p.lora_b, p.offsets, p.scalings,
                                 p.ranks, token_adapter=p.token_adapter)


def run_shrink(p: Problem, backend, form="token"):
    return lora_shrink(p.x, p.lora_a, p.scalings, p.ranks, backend=backend, **p.index(form))


def run_expand(p: Problem, y, t, backend, form="token"):
    return lora_expand(y, t, p.lora_b, p.ranks, slice_offsets=p.offsets, backend=backend, **p.index(form))


def run_linear(p: Problem, backend, form="token"):
    return multi_lora_linear(p.x, p.weight, p.bias, p.lora_a, p.lora_b, p.scalings, p.ranks,
                             slice_offsets=p.offsets, backend=backend, **p.index(form))


def check_shrink_expand(p64: Problem, device, backend, dtype, form):
    p = p64.to(dtype, device)
    t = run_shrink(p, backend, form)
    t64 = oracle_shrink(p64)
    assert t.dtype == torch.float32
    assert_close_scaled(t, t64, run_shrink(p, "reference"), dtype, "shrink")
    y0 = torch.randn(p.x.shape[0], p.weight.shape[0], dtype=dtype, device=device)
    # The same t for every path, so expand is judged on its own.
    y = run_expand(p, y0.clone(), t, backend, form)
    y64 = ref.multi_lora_expand(y0.double(), t.double(), p64.lora_b, p64.offsets, p64.ranks,
                                token_adapter=p64.token_adapter)
    y_lowp = ref.multi_lora_expand(y0.clone(), t, p.lora_b, p.offsets, p.ranks,
                                   token_adapter=p.token_adapter)
    assert_close_scaled(y, y64, y_lowp, dtype, "expand")
    base_rows = (p.token_adapter == -1).cpu()
    assert torch.equal(y[base_rows.to(device)], y0[base_rows.to(device)]), "expand touched a -1 row"


@pytest.mark.parametrize("device,backend", KERNELS_FULL)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_shrink_expand_match_reference(device, backend, dtype, dist):
    check_shrink_expand(make_problem(133, dist, widths=(24, 8, 8), tail=3), device, backend, dtype, "token")


@pytest.mark.parametrize("device,backend", MAIN)
@pytest.mark.parametrize("M", [0, 1, 7, 133])
@pytest.mark.parametrize("form", ["token", "segment"])
def test_index_forms_and_odd_token_counts(device, backend, M, form):
    p = make_problem(M, "zipf1.5", widths=(16, 8), gaps=(2, 5))
    check_shrink_expand(p, device, backend, torch.float16, form)


@pytest.mark.parametrize("device,backend", MAIN)
def test_rank_up_to_256(device, backend):
    p = make_problem(19, "uniform", K=24, L=3, rank_choices=(256, 3, 200))
    check_shrink_expand(p, device, backend, torch.float32, "segment")


@pytest.mark.parametrize("device,backend", MAIN)
def test_slices_are_packed_from_column_0_by_default(device, backend):
    """Without slice_offsets slice s starts where slice s - 1 ends (widths 5, 9, 3, none of them
    r_max), for the fused layer and for expand."""
    p64 = make_problem(13, "uniform", widths=(5, 9, 3), rank_choices=(1, 4, 8))
    assert p64.offsets == [0, 5, 14]
    p = p64.to(torch.float32, device)
    y = multi_lora_linear(p.x, p.weight, p.bias, p.lora_a, p.lora_b, p.scalings, p.ranks,
                          token_adapter=p.token_adapter, backend=backend)
    assert_close_scaled(y, oracle_linear(p64), run_linear(p, "reference"), torch.float32, "linear")
    t = run_shrink(p, backend)
    y0 = torch.randn(13, p.weight.shape[0] + 2, device=device)  # two columns no slice covers
    got = lora_expand(y0.clone(), t, p.lora_b, p.ranks, token_adapter=p.token_adapter, backend=backend)
    torch.testing.assert_close(got, run_expand(p, y0.clone(), t, backend), rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", MAIN)
def test_up_to_max_slices(device, backend):
    """MAX_SLICES slices (the kernels' LORA_MAX_SLICES, 8) run; one more is refused, naming the count."""
    S = multi_lora.MAX_SLICES
    p64 = make_problem(11, "uniform", K=8, widths=(3,) * S, L=3, rank_choices=(1, 2, 4))
    check_shrink_expand(p64, device, backend, torch.float32, "token")
    p = p64.to(torch.float32, device)
    assert_close_scaled(run_linear(p, backend), oracle_linear(p64), run_linear(p, "reference"),
                        torch.float32, f"linear, {S} slices")
    one_more = dict(lora_a=p.lora_a + p.lora_a[:1], lora_b=p.lora_b + p.lora_b[:1])
    weight = torch.randn(3 * (S + 1), 8, device=device)
    with pytest.raises(ValueError, match=rf"^multi_lora_linear: lora_a has {S + 1} slices; at most {S}"):
        multi_lora_linear(p.x, weight, None, one_more["lora_a"], one_more["lora_b"], p.scalings,
                          p.ranks, token_adapter=p.token_adapter, backend=backend)
    with pytest.raises(ValueError, match=rf"^lora_shrink: lora_a has {S + 1} slices; at most {S}"):
        lora_shrink(p.x, one_more["lora_a"], p.scalings, p.ranks, token_adapter=p.token_adapter,
                    backend=backend)


@pytest.mark.parametrize("device,backend", MAIN)
@pytest.mark.parametrize("form", ["token", "segment"])
def test_expand_reads_t_only_within_each_tokens_rank(device, backend, form):
    """t past a token's adapter rank, and all of a -1 token's row, is never read: NaN there
    changes nothing (lora_b past the rank being NaN too, 0 * NaN would show it)."""
    p = make_problem(40, "uniform", widths=(16, 8), gaps=(2, 5), tail=1).to(torch.float32, device)
    t = run_shrink(p, backend, form)
    adapter = p.token_adapter.long()
    rank = torch.where(adapter >= 0, p.ranks.long()[adapter.clamp(min=0)], 0)
    within = torch.arange(t.shape[2], device=device)[None, :] < rank[:, None]
    assert not within.all(1).all() and within.any()
    poisoned = torch.where(within, t, float("nan"))
    y0 = torch.randn(40, p.weight.shape[0], device=device)
    want = run_expand(p, y0.clone(), t, backend, form)
    torch.testing.assert_close(run_expand(p, y0.clone(), poisoned, backend, form), want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("form", ["token", "segment"])
def test_reference_rounds_once(dtype, form):
    """The reference backend (every test's low-precision yardstick) computes in fp32 and rounds y
    to x's dtype once, at the end: within half an ulp of the exact result of its rounded inputs."""
    p = replace(make_problem(133, "skewed", widths=(24, 8, 8)), offsets=[16, 0, 8]).to(dtype)
    exact = ref.multi_lora_linear(*(getattr(p.to(torch.float64), k) for k in (
        "x", "weight", "bias", "lora_a", "lora_b", "offsets", "scalings", "ranks")),
        **p.to(torch.float64).index(form))
    y = run_linear(p, "reference", form)
    assert y.dtype == dtype
    assert_rounded_once(y, exact, f"reference {dtype}")


@pytest.mark.parametrize("device,backend", MAIN)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("form", ["token", "segment"])
def test_linear_matches_reference(device, backend, dtype, form):
    # Slices in another order than their columns (v | q | k), tiling the output.
    p64 = replace(make_problem(133, "skewed", widths=(24, 8, 8)), offsets=[16, 0, 8])
    p = p64.to(dtype, device)
    y = run_linear(p, backend, form)
    assert y.dtype == dtype
    assert_close_scaled(y, oracle_linear(p64), run_linear(p, "reference", form), dtype, "linear")


def linear_grads(p: Problem, backend, form, dy):
    """Gradients of x, lora_a[s]..., lora_b[s]...; backend "oracle": the reference's autograd
    on p as it is (fp64)."""
    x = p.x.detach().requires_grad_()
    a = [t.detach().requires_grad_() for t in p.lora_a]
    b = [t.detach().requires_grad_() for t in p.lora_b]
    if backend == "oracle":
        y = ref.multi_lora_linear(x, p.weight, p.bias, a, b, p.offsets, p.scalings, p.ranks,
                                  **p.index(form))
    else:
        y = multi_lora_linear(x, p.weight, p.bias, a, b, p.scalings, p.ranks, slice_offsets=p.offsets,
                              backend=backend, **p.index(form))
    y.backward(dy)
    return [x.grad] + [t.grad for t in a] + [t.grad for t in b]


def without_padding(p: Problem, grads):
    """Gradients restricted to each adapter's rank (past it they must be exactly zero)."""
    S = len(p.lora_a)
    keep = torch.arange(p.lora_a[0].shape[1], device=p.ranks.device)[None, :] < p.ranks.long()[:, None]
    out = [grads[0]]
    for g in grads[1:1 + S]:
        assert (g[~keep] == 0).all(), "gradient past an adapter's rank"
        out.append(torch.where(keep[:, :, None], g, 0))
    for g in grads[1 + S:]:
        assert (g.transpose(1, 2)[~keep] == 0).all(), "gradient past an adapter's rank"
        out.append(torch.where(keep[:, None, :], g, 0))
    return out


@pytest.mark.parametrize("device,backend", MAIN)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("form", ["token", "segment"])
def test_linear_gradients_match_reference(device, backend, dtype, form):
    p64 = make_problem(133, "zipf1.5", widths=(16, 8), rank_choices=(1, 8, 16, 32))
    check_gradients(p64, backend, dtype, device, form)


def check_gradients(p64: Problem, backend, dtype, device, form):
    """Gradients of the problem in `dtype` on `backend` against the fp64 oracle, with PyTorch's own
    low-precision error (the reference in `dtype`) as the yardstick."""
    p = p64.to(dtype, device)
    dy64 = torch.randn(p64.x.shape[0], p64.weight.shape[0], dtype=torch.float64)
    dy = dy64.to(dtype=dtype, device=device)
    got = without_padding(p, linear_grads(p, backend, form, dy))
    want = without_padding(p64, linear_grads(p64, "oracle", "token", dy64))
    lowp = without_padding(p, linear_grads(p, "reference", form, dy))
    for i, (g, w, l) in enumerate(zip(got, want, lowp)):
        assert_close_scaled(g, w, l, dtype, f"gradient {i}")


@pytest.mark.parametrize("device,backend", backend_params(("cpu",), devices=("cpu",)))
@pytest.mark.parametrize("gemm", ["builtin", "aten"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_on_each_cpu_base_gemm(device, backend, gemm, dtype, monkeypatch):
    # LORA_OPS_CPU_GEMM forces the base GEMM the CPU kernels would pick per machine (see
    # test_lora_linear.test_cpu_base_gemm_choices): forward and gradients on each.
    monkeypatch.setenv("LORA_OPS_CPU_GEMM", gemm)
    p64 = make_problem(40, "skewed", widths=(16, 8), rank_choices=(1, 8, 16))
    p = p64.to(dtype, device)
    assert_close_scaled(run_linear(p, backend, "token"), oracle_linear(p64),
                        run_linear(p, "reference", "token"), dtype, "linear")
    check_gradients(p64, backend, dtype, device, "token")


@pytest.mark.parametrize("device,backend", MAIN)
def test_zero_tokens_forward_and_backward(device, backend):
    p = make_problem(0, "uniform", widths=(8, 4)).to(torch.float32, device)
    dx, *d_stacks = linear_grads(p, backend, "segment", torch.zeros(0, 12, device=device))
    assert dx.shape == (0, 40) and all((g == 0).all() for g in d_stacks)


@pytest.mark.parametrize("device,backend", MAIN)
def test_no_features(device, backend):
    """K = 0: y = b on every row, and the gradients of the empty x and A are empty, B's zero."""
    p = make_problem(7, "uniform", K=0, widths=(8, 4)).to(torch.float32, device)
    dy = torch.randn(7, 12, device=device)
    dx, *d_stacks = without_padding(p, linear_grads(p, backend, "token", dy))
    assert dx.shape == (7, 0) and all((g == 0).all() for g in d_stacks)
    torch.testing.assert_close(run_linear(p, backend), p.bias.expand(7, 12))


@pytest.mark.parametrize("device,backend", MAIN)
def test_one_dimensional_x_is_one_token(device, backend):
    """x [K], as nn.Linear takes it: y [N], the result for x [1, K]."""
    p = make_problem(1, "uniform", widths=(8, 4), base_only=0.0).to(torch.float32, device)
    flat = replace(p, x=p.x[0])
    y = run_linear(flat, backend)
    assert y.shape == (12,)
    torch.testing.assert_close(y, run_linear(p, backend)[0])


@pytest.mark.parametrize("device,backend", MAIN)
def test_autograd_is_recorded_exactly_when_needed(device, backend):
    """A call with nothing to differentiate (inference mode, no_grad, or no input requiring
    grad) skips the op's autograd layer; the result is the same, and a call whose stacks require
    grad still records it."""
    p = make_problem(5, "uniform", widths=(8, 4)).to(torch.float32, device)
    p = replace(p, lora_a=[torch.nan_to_num(a) for a in p.lora_a],
                lora_b=[torch.nan_to_num(b) for b in p.lora_b])
    plain = run_linear(p, backend)
    assert plain.grad_fn is None
    with torch.inference_mode():
        assert torch.equal(run_linear(p, backend), plain)
    trained = replace(p, lora_a=[a.clone().requires_grad_() for a in p.lora_a])
    recorded = run_linear(trained, backend)
    assert recorded.grad_fn is not None and torch.equal(recorded.detach(), plain)
    only_b = replace(p, lora_b=[b.clone().requires_grad_() for b in p.lora_b])  # A frozen, as LoRA-FA
    recorded = run_linear(only_b, backend)
    assert recorded.grad_fn is not None and torch.equal(recorded.detach(), plain)
    with torch.no_grad():
        assert run_linear(trained, backend).grad_fn is None


@pytest.mark.parametrize("device,backend", KERNELS)
def test_double_backward_is_refused(device, backend):
    """The backward's ops have no derivatives of their own: create_graph=True is an error, not
    gradients silently missing their second-order terms."""
    p = op_problem(device)
    x = p.x.clone().requires_grad_()
    y = multi_lora_linear(x, p.weight, p.bias, p.lora_a, p.lora_b, p.scalings, p.ranks,
                          token_adapter=p.token_adapter, slice_offsets=p.offsets, backend=backend)
    with pytest.raises(RuntimeError, match="multi_lora_linear: double backward is not supported"):
        torch.autograd.grad(y.sum(), x, create_graph=True)
    (dx,) = torch.autograd.grad(y.sum(), x)  # a plain backward still works
    assert dx.shape == x.shape


@pytest.mark.parametrize("given", [9, 10, 11])
def test_fused_backward_returns_one_gradient_per_input_given(given):
    """The dispatcher drops trailing index arguments left at None (the token form calls the op
    with 9 of its 11), and torch 2.11's custom-op autograd refuses a backward that returns more
    gradients than that (later releases ignore the extra ones): the registered backward (the
    Triton twin's, and the compiled op's on CUDA) returns one per input it was given."""
    p = op_problem("cpu")
    S = len(p.lora_a)

    def shrink(x, lora_a, scalings, ranks, token_adapter, seg_indptr, seg_adapter):
        return ref.multi_lora_shrink(x, lora_a, scalings, ranks, token_adapter=token_adapter,
                                     seg_indptr=seg_indptr, seg_adapter=seg_adapter)

    def dx_op(dy, weight, lora_a, dt, ranks, *index):  # the base term is enough for the shapes
        return dy @ weight

    t = shrink(p.x, p.lora_a, p.scalings, p.ranks, p.token_adapter, None, None)
    needs = (True, False, False, [True] * S, [True] * S) + (False,) * (given - 5)
    ctx = SimpleNamespace(saved_tensors=(p.x, p.weight, p.scalings, p.ranks, p.token_adapter, None,
                                         None, t, *p.lora_a, *p.lora_b),
                          num_slices=S, slice_offsets=p.offsets, needs_input_grad=needs)
    grads = multi_lora._make_linear_backward(shrink, dx_op)(ctx, torch.randn(6, p.weight.shape[0]), None)
    assert len(grads) == given
    assert grads[0].shape == p.x.shape and grads[1] is None and grads[2] is None
    assert [g.shape for g in grads[3]] == [a.shape for a in p.lora_a]
    assert [g.shape for g in grads[4]] == [b.shape for b in p.lora_b]
    assert all(g is None for g in grads[5:])


@pytest.mark.parametrize("device,backend", backend_params(("cpu", "cuda", "reference")))
def test_gradients_equal_training_each_adapter_alone(device, backend):
    """Several adapters trained in one batch get, each, the gradient of training it alone on its
    own tokens with a plain single-adapter LoRA layer."""
    p64 = make_problem(61, "uniform", L=4, rank_choices=(2, 5, 8), widths=(12,))
    p = p64.to(torch.float32, device)
    dy = torch.randn(61, p.weight.shape[0], device=device)
    dx, da, db = linear_grads(p, backend, "token", dy)
    for l in range(4):
        rows = (p.token_adapter == l).nonzero().flatten()
        r, s = int(p.ranks[l]), float(p.scalings[l])
        x = p.x[rows].detach().requires_grad_()
        a = p.lora_a[0][l, :r].detach().requires_grad_()
        b = p.lora_b[0][l, :, :r].detach().requires_grad_()
        y = x @ p.weight.t() + p.bias
        y = torch.cat([y[:, :12] + s * (x @ a.t()) @ b.t(), y[:, 12:]], dim=1)
        y.backward(dy[rows])
        torch.testing.assert_close(dx[rows], x.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(da[l, :r], a.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(db[l, :, :r], b.grad, rtol=1e-4, atol=1e-5)
    base = (p.token_adapter == -1).nonzero().flatten()
    torch.testing.assert_close(dx[base], dy[base] @ p.weight, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device,backend", KERNELS)
def test_out_of_range_indices_mean_base_only_on_the_device(device, backend):
    """The ops check no index values (that would sync a GPU): an adapter index outside [-1, L)
    means base only and is never dereferenced."""
    p = op_problem(device)
    M = p.x.shape[0]
    wild = torch.tensor([3, 0, -2, 1, 2**31 - 1, 2], dtype=torch.int32, device=device)
    y, t = multi_lora.linear_fwd_op(backend)(p.x, p.weight, p.bias, p.lora_a, p.lora_b, p.offsets,
                                             p.scalings, p.ranks, wild)
    want = ref.multi_lora_linear(p.x, p.weight, p.bias, p.lora_a, p.lora_b, p.offsets, p.scalings,
                                 p.ranks, token_adapter=wild)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    assert (t[:, (wild < 0) | (wild >= 3)] == 0).all()
    seg_indptr = torch.tensor([0, 1, 3, 3, M], dtype=torch.int32, device=device)
    seg_adapter = torch.tensor([2, 5, -7, 1], dtype=torch.int32, device=device)
    t = multi_lora.shrink_op(backend)(p.x, p.lora_a, p.scalings, p.ranks, None, seg_indptr, seg_adapter)
    y = p.x.new_zeros(M, p.weight.shape[0])
    multi_lora.expand_op(backend)(y, t, p.lora_b, p.offsets, p.ranks, None, seg_indptr, seg_adapter)
    per_token = ref.adapter_of_token(M, 3, seg_indptr=seg_indptr, seg_adapter=seg_adapter)
    assert per_token.tolist() == [2, -1, -1, 1, 1, 1]
    want = ref.multi_lora_expand(p.x.new_zeros(M, p.weight.shape[0]),
                                 oracle_shrink(replace(p, token_adapter=per_token)),
                                 p.lora_b, p.offsets, p.ranks, token_adapter=per_token)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


def test_rows_outside_every_segment_get_no_adapter():
    """adapter_of_token (the definition the kernels are held to) against its definition row by
    row: row i takes seg_adapter[s] for the s with seg_indptr[s] <= i < seg_indptr[s + 1], and no
    adapter (-1) before the first bound, from the last one on, or for an index outside [0, L)."""
    gen = torch.Generator().manual_seed(3)
    M, L = 30, 4
    for _ in range(20):
        bounds = torch.randint(0, M + 1, (5,), generator=gen).sort().values
        seg_adapter = torch.randint(-1, L + 1, (4,), generator=gen)
        want = [-1] * M
        for s in range(4):
            a = int(seg_adapter[s])
            for i in range(int(bounds[s]), int(bounds[s + 1])):
                want[i] = a if 0 <= a < L else -1
        got = ref.adapter_of_token(M, L, seg_indptr=bounds, seg_adapter=seg_adapter)
        assert got.tolist() == want, (bounds.tolist(), seg_adapter.tolist())


@pytest.mark.parametrize("device,backend", TRITON_CPU + backend_params(("cuda", "triton"), devices=("cuda",)))
def test_rows_past_the_last_segment_are_base_only_on_the_device(device, backend):
    """The GPU ops read segment bounds unchecked (the CPU op refuses ones not ending at M): rows
    from the last bound on get no adapter, as in the reference."""
    p = op_problem(device)
    seg_indptr = torch.tensor([0, 2, 4], dtype=torch.int32, device=device)
    seg_adapter = torch.tensor([1, 2], dtype=torch.int32, device=device)
    index = (None, seg_indptr, seg_adapter)
    t = multi_lora.shrink_op(backend)(p.x, p.lora_a, p.scalings, p.ranks, *index)
    per_token = ref.adapter_of_token(6, 3, seg_indptr=seg_indptr, seg_adapter=seg_adapter)
    torch.testing.assert_close(t, oracle_shrink(replace(p, token_adapter=per_token)), rtol=1e-5, atol=1e-5)
    assert (t[:, 4:] == 0).all()
    y0 = torch.randn(6, p.weight.shape[0], device=device)
    y = y0.clone()
    multi_lora.expand_op(backend)(y, t, p.lora_b, p.offsets, p.ranks, *index)
    assert torch.equal(y[4:], y0[4:]) and not torch.equal(y[:4], y0[:4])


@pytest.mark.parametrize("device,backend", MAIN)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e300], ids=["nan", "inf", "1e300"])
def test_a_non_finite_scaling_reaches_only_its_own_adapters_tokens(device, backend, bad):
    """Scaling values are not checked (on a GPU that would cost a sync). One that is not finite
    in float32 (1e300 given as float64 is inf there) makes its adapter's tokens non-finite where
    the reference's are, and leaves every other token, idle ones included, as with finite ones."""
    p = op_problem(device)
    idx = torch.tensor([0, 1, 2, -1, 1, 0], device=device)
    scalings = p.scalings.double()
    scalings[1] = bad
    y = multi_lora_linear(p.x, p.weight, p.bias, p.lora_a, p.lora_b, scalings, p.ranks,
                          token_adapter=idx, slice_offsets=p.offsets, backend=backend)
    want = ref.multi_lora_linear(p.x, p.weight, p.bias, p.lora_a, p.lora_b, p.offsets,
                                 scalings.float(), p.ranks, token_adapter=idx)
    finite = ref.multi_lora_linear(p.x, p.weight, p.bias, p.lora_a, p.lora_b, p.offsets,
                                   p.scalings, p.ranks, token_adapter=idx)
    own = idx == 1
    assert not torch.isfinite(y[own]).any()
    assert torch.equal(torch.isnan(y), torch.isnan(want))
    torch.testing.assert_close(y[~own], finite[~own], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device,backend", KERNELS)
def test_int64_indices_beyond_int32_saturate_rather_than_wrap(device, backend):
    """The kernels read int32 indices; an int64 one past that range is no adapter (it is outside
    [0, L)), not the adapter its low 32 bits name (2**32 + 1 would be adapter 1), also where the
    op narrows it and no value is checked (a GPU). A rank past int32 is refused on the CPU, not
    read as its low bits (2**32 + 2 would be rank 2)."""
    p = op_problem(device)
    wrapping = [2**32 + 1, 0, -(2**32) + 2, 1, 2**40, 2**33 + 2]
    wild = torch.tensor(wrapping, dtype=torch.int64, device=device)
    none = torch.tensor([-1, 0, -1, 1, -1, -1], dtype=torch.int64, device=device)
    fwd = multi_lora.linear_fwd_op(backend)
    args = (p.x, p.weight, p.bias, p.lora_a, p.lora_b, p.offsets, p.scalings, p.ranks)
    y, t = fwd(*args, wild)
    y_none, t_none = fwd(*args, none)
    assert torch.equal(y, y_none) and torch.equal(t, t_none)
    shrunk = multi_lora.shrink_op(backend)(p.x, p.lora_a, p.scalings, p.ranks, wild)
    assert torch.equal(shrunk, multi_lora.shrink_op(backend)(p.x, p.lora_a, p.scalings, p.ranks, none))
    out, out_none = (torch.zeros(6, p.weight.shape[0], device=device) for _ in range(2))
    multi_lora.expand_op(backend)(out, t, p.lora_b, p.offsets, p.ranks, wild)
    multi_lora.expand_op(backend)(out_none, t, p.lora_b, p.offsets, p.ranks, none)
    assert torch.equal(out, out_none)
    if backend == "cpu":
        ranks = torch.tensor([2**32 + 2, 1, 4], dtype=torch.int64)
        with pytest.raises(ValueError, match=r"ranks must lie in \[0, r_max=4\]"):
            fwd(p.x, p.weight, p.bias, p.lora_a, p.lora_b, p.offsets, p.scalings, ranks, none)


@pytest.mark.parametrize("device,backend", MAIN)
def test_int64_indices_beyond_int32_through_the_python_api(device, backend):
    """multi_lora_linear narrows int64 indices itself before the ops: saturating, as they do,
    where it reads no values (a GPU); on the CPU it reads them first and refuses them as given."""
    p = op_problem(device)
    wild = torch.tensor([2**32 + 1, 0, -(2**32) + 2, 1, 2**40, 2**33 + 2], device=device)
    none = torch.tensor([-1, 0, -1, 1, -1, -1], device=device)
    args = (p.x, p.weight, p.bias, p.lora_a, p.lora_b, p.scalings, p.ranks)
    kw = {"slice_offsets": p.offsets, "backend": backend}
    if device == "cpu":
        message = r"token_adapter values must lie in \[-1, 3\).*from -4294967294 to 1099511627776"
        with pytest.raises(ValueError, match=message):
            multi_lora_linear(*args, token_adapter=wild, **kw)
        return
    y = multi_lora_linear(*args, token_adapter=wild, **kw)
    assert torch.equal(y, multi_lora_linear(*args, token_adapter=none, **kw))
    seg_indptr = torch.tensor([0, 3, 6], device=device)
    y = multi_lora_linear(*args, seg_indptr=seg_indptr,
                          seg_adapter=torch.tensor([2**32 + 1, 2], device=device), **kw)
    want = multi_lora_linear(*args, seg_indptr=seg_indptr,
                             seg_adapter=torch.tensor([-1, 2], device=device), **kw)
    assert torch.equal(y, want)


@pytest.mark.parametrize("device,backend", KERNELS)
def test_ranks_outside_0_r_max(device, backend):
    """The CPU op rejects them (it reads ranks on the host anyway); on a GPU they are clamped
    into [0, r_max], never read past."""
    p = op_problem(device)
    ranks = torch.tensor([4, 99, -5], dtype=torch.int32, device=device)
    fwd = multi_lora.linear_fwd_op(backend)
    args = (p.x, p.weight, p.bias, p.lora_a, p.lora_b, p.offsets, p.scalings, ranks, p.token_adapter)
    if backend == "cpu":
        message = r"multi_lora_linear_fwd: ranks must lie in \[0, r_max=4\], got values from -5 to 99"
        with pytest.raises(ValueError, match=message):
            fwd(*args)
        return
    y, _ = fwd(*args)
    want = ref.multi_lora_linear(p.x, p.weight, p.bias, p.lora_a, p.lora_b, p.offsets, p.scalings,
                                 ranks.clamp(0, 4), token_adapter=p.token_adapter)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


def test_segments_from_token_adapter():
    L = 5
    token_adapter = torch.tensor([3, -1, 0, 3, 9, 1, 3, 0, -4, 1], dtype=torch.int32)
    perm, seg_indptr, seg_adapter = segments_from_token_adapter(token_adapter, L)
    assert perm.dtype == torch.int64 and seg_indptr.dtype == seg_adapter.dtype == torch.int32
    assert seg_indptr.shape == (L + 2,) and seg_adapter.tolist() == [0, 1, 2, 3, 4, -1]
    assert seg_indptr[0] == 0 and seg_indptr[-1] == len(token_adapter)
    sorted_adapters = ref.adapter_of_token(10, L, token_adapter)[perm]
    assert sorted_adapters.tolist() == [0, 0, 1, 1, 3, 3, 3, -1, -1, -1]
    for s, a in enumerate(seg_adapter.tolist()):
        assert (sorted_adapters[seg_indptr[s]:seg_indptr[s + 1]] == a).all()
    assert perm[sorted_adapters == 3].tolist() == [0, 3, 6], "not stable"
    # Stable at sizes where an unstable sort reorders ties too (not only at 10 tokens).
    many = torch.randint(-3, L + 3, (1000,), generator=torch.Generator().manual_seed(0))
    perm, seg_indptr, seg_adapter = segments_from_token_adapter(many, L)
    sorted_adapters = ref.adapter_of_token(1000, L, many)[perm]
    for s, a in enumerate(seg_adapter.tolist()):
        rows = perm[seg_indptr[s]:seg_indptr[s + 1]]
        assert (sorted_adapters[seg_indptr[s]:seg_indptr[s + 1]] == a).all()
        assert (rows.diff() > 0).all(), f"adapter {a}'s tokens reordered: not stable"
    empty = segments_from_token_adapter(torch.zeros(0, dtype=torch.int64), 2)
    assert empty[0].shape == (0,) and empty[1].tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("device,backend", MAIN)
def test_sorted_segments_give_the_token_form_result(device, backend):
    p = make_problem(40, "uniform").to(torch.float32, device)
    perm, seg_indptr, seg_adapter = segments_from_token_adapter(p.token_adapter, len(p.ranks))
    t_sorted = lora_shrink(p.x[perm], p.lora_a, p.scalings, p.ranks, seg_indptr=seg_indptr,
                           seg_adapter=seg_adapter, backend=backend)
    torch.testing.assert_close(t_sorted[:, perm.argsort()], run_shrink(p, backend), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("M,L", [(0, 7), (1, 7), (63, 7), (64, 7), (65, 7), (200, 7), (64, 16),
                                 (300, 1), (5, 300), (64, 1000), (40, 0)])
def test_per_adapter_gram_matches_a_loop(M, L):
    """The fixed-shape tiled formulation of the weight gradients, across tile boundaries, with
    more adapters than tokens (a pool) and with none."""
    gen = torch.Generator().manual_seed(M * 1000 + L)
    adapter = torch.randint(-1, max(L, 1), (M,), generator=gen)
    if L > 2:
        adapter[: M // 2] = 2  # one adapter spanning several tiles
    u = torch.randn(M, 3, dtype=torch.float64, generator=gen)
    v = torch.randn(M, 5, dtype=torch.float64, generator=gen)
    want = torch.zeros(L, 3, 5, dtype=torch.float64)
    for i, a in enumerate(adapter.tolist()):
        if 0 <= a < L:
            want[a] += u[i][:, None] * v[i][None, :]
    plan = multi_lora.gram_plan(adapter, L)
    got = multi_lora.per_adapter_gram(u, v, plan)
    assert got.dtype == torch.float32  # accumulates in fp32 whatever the input
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # The work is bounded by the tokens, not by the adapters in the pool (see gram_plan).
    assert plan.token.numel() <= M + max(M, 4 * min(L, M))


# ---------------------------------------------------------------------------------------------
# Triton in its interpreter on CPU: few, small cases (CUDA runs the full matrix above)

@pytest.mark.parametrize("device,backend", TRITON_CPU)
@pytest.mark.parametrize("dtype,dist,form", [(torch.float32, "uniform", "token"),
                                             (torch.float16, "zipf1.5", "segment"),
                                             (torch.bfloat16, "distinct", "token")], ids=str)
def test_triton_interpreted(device, backend, dtype, dist, form):
    p = make_problem(9, dist, K=32, widths=(16, 8), gaps=(0, 3), tail=2, rank_choices=(1, 8, 16))
    check_shrink_expand(p, device, backend, dtype, form)
    p = make_problem(9, dist, K=32, widths=(16, 8), rank_choices=(1, 8, 16))
    pl = p.to(dtype, device)
    assert_close_scaled(run_linear(pl, backend, form), oracle_linear(p), run_linear(pl, "reference", form),
                        dtype, "linear")


@pytest.mark.parametrize("device,backend", TRITON_CPU)
def test_triton_interpreted_gradients(device, backend):
    p64 = make_problem(7, "uniform", K=16, widths=(8,), L=3, rank_choices=(2, 4))
    dy64 = torch.randn(7, p64.weight.shape[0], dtype=torch.float64)
    p = p64.to(torch.float32, device)
    got = without_padding(p, linear_grads(p, backend, "token", dy64.float()))
    want = without_padding(p64, linear_grads(p64, "oracle", "token", dy64))
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device,backend", MAIN + TRITON_CPU)
@pytest.mark.parametrize("form", ["token", "segment"])
def test_gradients_of_slices_out_of_column_order_and_of_a_trainable_base(device, backend, form):
    """Slices whose columns come in another order (dY cut at each slice's own offset, each slice
    with its own T), and a base made trainable (dW = dY^T x, db = dY's column sums), against the
    fp64 oracle's autograd. Triton on CPU runs the Python backward that CUDA tensors take too."""
    p64 = replace(make_problem(9, "uniform", K=16, widths=(8, 4), L=3, rank_choices=(2, 4)),
                  offsets=[4, 0])
    dy64 = torch.randn(9, p64.weight.shape[0], dtype=torch.float64)
    S = len(p64.lora_a)

    def grads(q, backend, dy):
        x, weight, bias = (t.detach().requires_grad_() for t in (q.x, q.weight, q.bias))
        a = [t.detach().requires_grad_() for t in q.lora_a]
        b = [t.detach().requires_grad_() for t in q.lora_b]
        if backend == "oracle":
            y = ref.multi_lora_linear(x, weight, bias, a, b, q.offsets, q.scalings, q.ranks,
                                      **q.index(form))
        else:
            y = multi_lora_linear(x, weight, bias, a, b, q.scalings, q.ranks, slice_offsets=q.offsets,
                                  backend=backend, **q.index(form))
        y.backward(dy)
        return [weight.grad, bias.grad] + without_padding(q, [x.grad] + [t.grad for t in a + b])

    p = p64.to(torch.float32, device)
    got = grads(p, backend, dy64.to(torch.float32).to(device))
    want = grads(p64, "oracle", dy64)
    names = ["weight", "bias", "x"] + [f"lora_a[{s}]" for s in range(S)] + [f"lora_b[{s}]" for s in range(S)]
    for name, g, w in zip(names, got, want):
        torch.testing.assert_close(g.double().cpu(), w, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------
# The ops: opcheck (schema, fake impl, autograd registration, AOT dispatch) and errors

def op_problem(device):
    p = make_problem(6, "uniform", K=8, widths=(4, 3), L=3, rank_choices=(1, 2, 4)).to(torch.float32, device)
    return replace(p, lora_a=[torch.nan_to_num(a) for a in p.lora_a],
                   lora_b=[torch.nan_to_num(b) for b in p.lora_b], scalings=p.scalings.float())


@pytest.mark.parametrize("device,backend", KERNELS)
@pytest.mark.parametrize("form", ["token", "segment"])
def test_opcheck(device, backend, form):
    if (device, backend, form) == ("cpu", "triton", "segment"):
        pytest.skip("the interpreter makes it slow; the token form covers the Triton ops' schemas "
                    "on CPU, and both forms run on a GPU")
    p = op_problem(device)
    index = p.index(form)
    idx = (index.get("token_adapter"), index.get("seg_indptr"), index.get("seg_adapter"))
    torch.library.opcheck(multi_lora.shrink_op(backend), (p.x, p.lora_a, p.scalings, p.ranks, *idx))
    t = multi_lora.shrink_op(backend)(p.x, p.lora_a, p.scalings, p.ranks, *idx)
    y = torch.randn(6, p.weight.shape[0], device=device)
    torch.library.opcheck(multi_lora.expand_op(backend), (y, t, p.lora_b, p.offsets, p.ranks, *idx))
    # With gradients (the autograd formula traced with dynamic shapes) once; it is the slow one.
    if form == "token":
        for leaf in [p.x, *p.lora_a, *p.lora_b]:
            leaf.requires_grad_()
    torch.library.opcheck(multi_lora.linear_fwd_op(backend),
                          (p.x, p.weight, p.bias if form == "token" else None, p.lora_a, p.lora_b,
                           p.offsets, p.scalings, p.ranks, *idx))


@pytest.mark.parametrize("device,backend", KERNELS)
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_fake_impls_match_the_ops_in_low_precision(device, backend, dtype):
    """t is float32 whatever x's dtype and y is in x's: what torch.compile plans with (the fake
    impls) must say so too, not only for the float32 of test_opcheck."""
    p = op_problem(device).to(dtype, device)
    idx = (p.token_adapter, None, None)
    fake_only = {"test_utils": "test_faketensor"}
    torch.library.opcheck(multi_lora.shrink_op(backend), (p.x, p.lora_a, p.scalings, p.ranks, *idx),
                          **fake_only)
    torch.library.opcheck(multi_lora.linear_fwd_op(backend),
                          (p.x, p.weight, p.bias, p.lora_a, p.lora_b, p.offsets, p.scalings, p.ranks,
                           *idx), **fake_only)


CPU_COMPILED = backend_params(("cpu",), devices=("cpu",))


@pytest.mark.parametrize("device,backend", CPU_COMPILED)
@pytest.mark.parametrize("form", ["token", "segment"])
def test_linear_dx_op_is_the_base_dgrad_plus_each_slice_expand(device, backend, form):
    """multi_lora_linear_dx (the CPU backward's dX) against its definition, dY W plus an expand
    of every slice's dT over A viewed as [L, K, r_max]; idle tokens get dY W alone."""
    p = op_problem(device)
    index = p.index(form)
    idx = (index.get("token_adapter"), index.get("seg_indptr"), index.get("seg_adapter"))
    M, N, S = p.x.shape[0], p.weight.shape[0], len(p.lora_a)
    dy = torch.randn(M, N)
    dt = torch.randn(S, M, p.lora_a[0].shape[1])
    want = dy @ p.weight
    for s in range(S):
        multi_lora.expand_op("reference")(want, dt[s:s + 1], [p.lora_a[s].transpose(1, 2)], [0],
                                          p.ranks, *idx)
    dx_op = torch.ops.lora_ops.multi_lora_linear_dx
    got = dx_op(dy, p.weight, p.lora_a, dt, p.ranks, *idx)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.library.opcheck(dx_op, (dy, p.weight, p.lora_a, dt, p.ranks, *idx))
    with pytest.raises(ValueError, match=r"multi_lora_linear_dx: dt has size 1 in dim 0 but the slice count of lora_a is 2"):
        dx_op(dy, p.weight, p.lora_a, dt[:1], p.ranks, *idx)
    with pytest.raises(ValueError, match=r"multi_lora_linear_dx: dt must be float32"):
        dx_op(dy, p.weight, p.lora_a, dt.double(), p.ranks, *idx)
    with pytest.raises(ValueError, match=r"multi_lora_linear_dx: dy has size 6 in dim 1 but weight.s row count is 7"):
        dx_op(dy[:, 1:], p.weight, p.lora_a, dt, p.ranks, *idx)


@pytest.mark.parametrize("device,backend", CPU_COMPILED)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,form", [(0, "token"), (1, "token"), (37, "token"), (37, "segment")])
def test_linear_dx_op_matches_the_fp64_oracle(device, backend, dtype, M, form):
    """multi_lora_linear_dx in every dtype at odd sizes: K = 13, slices 5 and 3 wide, ranks 1, 2
    and 5 with NaN past each adapter's rank (never to be read), idle tokens, dy and dt
    non-contiguous."""
    p64 = make_problem(M, "uniform", K=13, widths=(5, 3), L=4, rank_choices=(1, 2, 5))
    p = p64.to(dtype, device)
    index = p.index(form)
    idx = tuple(index.get(k) for k in ("token_adapter", "seg_indptr", "seg_adapter"))
    N, S, r_max = p.weight.shape[0], len(p.lora_a), p.lora_a[0].shape[1]
    dy64 = torch.randn(N, M, dtype=torch.float64).t()
    dt = torch.randn(M, S, r_max).transpose(0, 1)

    def definition(dy, q):  # dY W, then + dT_s A_s for each slice, in dy's dtype
        dx = dy @ q.weight
        for s, a in enumerate(q.lora_a):
            dx = ref.multi_lora_expand(dx, dt[s:s + 1].to(torch.promote_types(dx.dtype, dt.dtype)),
                                       [a.transpose(1, 2)], [0], q.ranks,
                                       token_adapter=q.token_adapter)
        return dx

    dy = dy64.to(dtype)
    assert not dy.is_contiguous() or M <= 1
    got = torch.ops.lora_ops.multi_lora_linear_dx(dy, p.weight, p.lora_a, dt, p.ranks, *idx)
    assert got.dtype == dtype and got.shape == (M, p.weight.shape[1])
    assert_close_scaled(got, definition(dy64, p64), definition(dy, p), dtype, "dx")


@pytest.mark.parametrize("device,backend", CPU_COMPILED)
def test_expand_op_writes_a_column_slice_of_y_from_a_strided_t(device, backend):
    """The expand op writes y in place at y's own row stride (y a column slice of a wider
    tensor, whose other columns stay as they were) and reads t in any layout (here [S, M, r] as
    a view of [M, S, r])."""
    p = op_problem(device)
    M, N = p.x.shape[0], p.weight.shape[0]
    t = multi_lora.shrink_op(backend)(p.x, p.lora_a, p.scalings, p.ranks, p.token_adapter)
    t_strided = t.transpose(0, 1).contiguous().transpose(0, 1)
    assert not t_strided.is_contiguous()
    wide = torch.randn(M, N + 5, device=device)
    want = wide.clone()
    want[:, 2:2 + N] = ref.multi_lora_expand(wide[:, 2:2 + N].clone(), t, p.lora_b, p.offsets,
                                             p.ranks, token_adapter=p.token_adapter)
    multi_lora.expand_op(backend)(wide[:, 2:2 + N], t_strided, p.lora_b, p.offsets, p.ranks,
                                  p.token_adapter)
    torch.testing.assert_close(wide, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device,backend", backend_params(("cpu", "reference"), devices=("cpu",)))
def test_errors_name_op_argument_and_what_was_seen(device, backend):
    """On the compiled backend the op refuses first and the Python checks word the error; on the
    reference backend the Python checks alone stand between a bad argument and the result."""
    p = op_problem(device)
    L = len(p.ranks)
    cases = [
        (dict(token_adapter=torch.tensor([0, 1, 2, 3, 0, 0], dtype=torch.int32)),
         r"token_adapter values must lie in \[-1, 3\).*from 0 to 3"),
        (dict(token_adapter=torch.tensor([0, -2, 0, 0, 0, 0])), r"from -2 to 0"),
        (dict(token_adapter=torch.zeros(5, dtype=torch.int32)), r"token_adapter must have shape \(6,\)"),
        (dict(token_adapter=torch.zeros(6)), "token_adapter must be int32 or int64"),
        (dict(token_adapter=None), "give exactly one index form"),
        (dict(seg_indptr=torch.tensor([0, 6]), seg_adapter=torch.tensor([0])), "give exactly one index form"),
        (dict(token_adapter=None, seg_indptr=torch.tensor([0, 6])), "needs both seg_indptr and seg_adapter"),
        (dict(token_adapter=None, seg_indptr=torch.tensor([0, 4, 3, 6]), seg_adapter=torch.tensor([0, 1, 2])),
         "seg_indptr must start at 0, never decrease"),
        (dict(token_adapter=None, seg_indptr=torch.tensor([0, 5]), seg_adapter=torch.tensor([0])),
         "end at the token count 6"),
        (dict(token_adapter=None, seg_indptr=torch.tensor([0, 6]), seg_adapter=torch.tensor([0, 1])),
         r"seg_indptr must have shape \(3,\)"),
        (dict(ranks=torch.tensor([1, 5, 2], dtype=torch.int32)), r"ranks must lie in \[0, r_max=4\].*from 1 to 5"),
        (dict(ranks=torch.tensor([1, -1, 2], dtype=torch.int32)), r"ranks must lie in \[0, r_max=4\].*from -1 to 2"),
        (dict(token_adapter=None, seg_indptr=torch.tensor([1, 6]), seg_adapter=torch.tensor([0])),
         "seg_indptr must start at 0"),
        (dict(token_adapter=None, seg_indptr=torch.tensor([0, 2, 6]), seg_adapter=torch.tensor([0, 3])),
         r"seg_adapter values must lie in \[-1, 3\).*from 0 to 3"),
        (dict(token_adapter=p.token_adapter.to("meta")), "token_adapter is on meta but x is on cpu"),
        (dict(scalings=p.scalings.to("meta")), "scalings is on meta but x is on cpu"),
        (dict(lora_a=[a[:, :, :5] for a in p.lora_a]), r"lora_a\[0\] must have shape \(3, 4, 8\)"),
        (dict(lora_b=[b[:2] for b in p.lora_b]), r"lora_b\[0\] must have shape \(3, N_slice, 4\)"),
        (dict(lora_a=[a[:, :0] for a in p.lora_a], lora_b=[b[:, :, :0] for b in p.lora_b]), "lora_a has r_max 0"),
        (dict(ranks=torch.tensor([1, 2], dtype=torch.int32)), r"ranks must have shape \(3,\)"),
        (dict(ranks=torch.ones(3)), "ranks must be int32 or int64"),
        (dict(scalings=torch.ones(3, dtype=torch.int32)), "scalings must be a floating-point tensor"),
        (dict(lora_a=[p.lora_a[0], p.lora_a[1][:2]]), r"lora_a\[1\] must have shape \(3, 4, 8\)"),
        (dict(lora_a=[p.lora_a[0], p.lora_a[1][:, :3]]), r"lora_a\[1\] must have shape \(3, 4, 8\)"),
        (dict(lora_b=[p.lora_b[0], p.lora_b[1][:, :, :3]]), r"lora_b\[1\] must have shape \(3, N_slice, 4\)"),
        (dict(lora_b=[p.lora_b[0]]), "lora_a has 2 slices but lora_b has 1"),
        (dict(lora_a=[p.lora_a[0].double(), p.lora_a[1]]), r"lora_a\[0\] has dtype torch.float64 but x has torch.float32"),
        (dict(lora_b=[p.lora_b[0], p.lora_b[1].to("meta")]), r"lora_b\[1\] is on meta"),
        (dict(lora_a=[p.lora_a[0][0]]), r"lora_a\[0\] must be 3-D"),
        (dict(lora_a=[p.lora_a[0][:0], p.lora_a[1][:0]]), "lora_a holds no adapters"),
        (dict(lora_a=[]), "lora_a must be a Tensor or a non-empty list"),
        (dict(slice_offsets=[0, 2]), "without overlapping"),
        (dict(slice_offsets=[0, p.weight.shape[0] - 2]), "without overlapping"),
        (dict(slice_offsets=[0]), "slice_offsets has 1 entries but lora_b has 2"),
        (dict(weight=torch.randn(8, 8), bias=None, slice_offsets=[0, 5]), "slices .* must tile the 8 output columns"),
        (dict(weight=torch.randn(9, 8), bias=None), "slices .* must tile the 9 output columns"),
        (dict(x=torch.randn(6, 9)), r"x has 9 features but weight has 8 columns \(weight shape \(7, 8\)\)"),
        (dict(x=torch.randn(6, 8, dtype=torch.float64)), "weight has dtype torch.float32 but x has torch.float64"),
        (dict(bias=torch.randn(3)), rf"bias must be a Tensor of shape \({p.weight.shape[0]},\) "
                                    rf"\(weight has {p.weight.shape[0]} rows\), got \(3,\)"),
        (dict(bias=1.0), r"bias must be a Tensor .* got float"),
        (dict(lora_a=None), "lora_a must be a Tensor or a non-empty list of Tensors, got None"),
        (dict(lora_b=2.0), "lora_b must be a Tensor or a non-empty list of Tensors, got 2.0"),
    ]
    for override, message in cases:
        args = dict(x=p.x, weight=p.weight, bias=p.bias, lora_a=p.lora_a, lora_b=p.lora_b,
                    scalings=p.scalings, ranks=p.ranks, token_adapter=p.token_adapter,
                    slice_offsets=p.offsets) | override
        with pytest.raises(ValueError, match=r"^multi_lora_linear: .*" + message):
            multi_lora_linear(args.pop("x"), args.pop("weight"), args.pop("bias"), args.pop("lora_a"),
                              args.pop("lora_b"), args.pop("scalings"), args.pop("ranks"),
                              backend=backend, **args)
    assert L == 3


@pytest.mark.parametrize("device,backend", backend_params(("cuda", "triton"), devices=("cuda",)))
def test_sync_checks_refuse_bad_values_on_the_gpu(device, backend, monkeypatch):
    """On a GPU the public functions read no index or rank values (a host sync per call): an
    out-of-range adapter index means base only, as the ops take it. LORA_OPS_SYNC_CHECKS=1
    makes them check there as they do on CPU."""
    p = op_problem(device)
    wild = torch.tensor([0, 1, 2, 3, 0, -1], device=device)
    args = (p.x, p.weight, p.bias, p.lora_a, p.lora_b, p.scalings, p.ranks)
    kwargs = dict(slice_offsets=p.offsets, backend=backend)
    monkeypatch.delenv(multi_lora.SYNC_CHECKS_ENV, raising=False)
    y = multi_lora_linear(*args, token_adapter=wild, **kwargs)
    want = ref.multi_lora_linear(p.x, p.weight, p.bias, p.lora_a, p.lora_b, p.offsets, p.scalings,
                                 p.ranks, token_adapter=wild)
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)
    monkeypatch.setenv(multi_lora.SYNC_CHECKS_ENV, "1")
    with pytest.raises(ValueError, match=r"^multi_lora_linear: token_adapter values must lie in \[-1, 3\)"):
        multi_lora_linear(*args, token_adapter=wild, **kwargs)
    with pytest.raises(ValueError, match=r"^lora_shrink: ranks must lie in \[0, r_max=4\]"):
        lora_shrink(p.x, p.lora_a, p.scalings, torch.tensor([1, 5, 2], device=device),
                    token_adapter=p.token_adapter, backend=backend)
    y = multi_lora_linear(*args, token_adapter=p.token_adapter, **kwargs)  # good values still run


@pytest.mark.parametrize("sync_checks", [False, True])
def test_which_values_are_checked_for_a_gpu(sync_checks, monkeypatch):
    """The rule of _check_index_values for a CUDA device, run on host tensors (no GPU needed): with
    LORA_OPS_SYNC_CHECKS=1 adapter indices, ranks and segment bounds are all checked (the GPU ops
    check none of them); without it, none is read."""
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    if sync_checks:
        monkeypatch.setenv(multi_lora.SYNC_CHECKS_ENV, "1")
    else:
        monkeypatch.delenv(multi_lora.SYNC_CHECKS_ENV, raising=False)
    ranks, bad_ranks = torch.tensor([1, 2, 4]), torch.tensor([1, 5, 4])
    segments = (None, torch.tensor([0, 2, 6]), torch.tensor([0, 2]))
    bad = [((torch.tensor([0, 3]), None, None), ranks, 2, r"token_adapter values must lie in \[-1, 3\)"),
           ((None, torch.tensor([0, 2, 6]), torch.tensor([0, 3])), ranks, 6, r"seg_adapter values must lie in \[-1, 3\)"),
           (segments, ranks, 7, "seg_indptr must start at 0, never decrease and end at the token count 7"),
           (segments, bad_ranks, 6, r"ranks must lie in \[0, r_max=4\]")]
    for index, rank_values, M, message in bad:
        if sync_checks:
            with pytest.raises(ValueError, match="^op: " + message):
                multi_lora._check_index_values("op", index, 3, 4, rank_values, M, cuda)
        else:
            multi_lora._check_index_values("op", index, 3, 4, rank_values, M, cuda)
    multi_lora._check_index_values("op", segments, 3, 4, ranks, 6, cuda)


@pytest.mark.parametrize("device,backend", backend_params(("cpu", "reference"), devices=("cpu",)))
def test_shrink_and_expand_errors(device, backend):
    """What lora_shrink and lora_expand check themselves, not only where a compiled op refuses
    first: the reference backend would otherwise compute with the bad argument."""
    p = op_problem(device)
    kw = dict(token_adapter=p.token_adapter, backend=backend)
    with pytest.raises(ValueError, match=r"^lora_shrink: x has dtype torch.int64"):
        lora_shrink(torch.zeros(6, 8, dtype=torch.int64), p.lora_a, p.scalings, p.ranks, **kw)
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available for cpu tensors"):
        lora_shrink(p.x, p.lora_a, p.scalings, p.ranks, token_adapter=p.token_adapter, backend="cuda")
    with pytest.raises(ValueError, match=r"^lora_shrink: scalings must have shape \(3,\), got \(2,\)"):
        lora_shrink(p.x, p.lora_a, p.scalings[:2], p.ranks, **kw)
    wild = torch.tensor([0, 1, 2, 3, -1, 0])
    with pytest.raises(ValueError, match=r"^lora_shrink: token_adapter values must lie in \[-1, 3\).*from -1 to 3"):
        lora_shrink(p.x, p.lora_a, p.scalings, p.ranks, token_adapter=wild, backend=backend)
    t = lora_shrink(p.x, p.lora_a, p.scalings, p.ranks, **kw)
    y = torch.zeros(6, p.weight.shape[0])
    with pytest.raises(ValueError, match=r"^lora_expand: t must be float32 .* got torch.float16"):
        lora_expand(y, t.half(), p.lora_b, p.ranks, **kw)
    with pytest.raises(ValueError, match="^lora_expand: t is on meta but y is on cpu"):
        lora_expand(y, t.to("meta"), p.lora_b, p.ranks, **kw)
    with pytest.raises(ValueError, match=r"^lora_expand: slices \(offsets \[0, 3\], widths \[4, 3\]\) must lie in"):
        lora_expand(y, t, p.lora_b, p.ranks, slice_offsets=[0, 3], **kw)  # one column shared
    with pytest.raises(ValueError, match=r"^lora_expand: token_adapter values must lie in \[-1, 3\)"):
        lora_expand(y, t, p.lora_b, p.ranks, token_adapter=wild, backend=backend)
    with pytest.raises(ValueError, match=r"^lora_expand: t must be float32 of shape \(2, 6, 4\)"):
        lora_expand(y, t[:, :5], p.lora_b, p.ranks, **kw)
    with pytest.raises(ValueError, match=r"^lora_expand: y .* must be viewable"):
        lora_expand(torch.zeros(2, p.weight.shape[0], 3).transpose(1, 2), t, p.lora_b, p.ranks, **kw)
    with pytest.raises(ValueError, match=r"^lora_expand: lora_b\[0\] has dtype torch.float16 but y has torch.float32"):
        lora_expand(y, t, [b.half() for b in p.lora_b], p.ranks, **kw)
    assert not y.any()


@pytest.mark.parametrize("device,backend", backend_params(("cpu",), devices=("cpu",)))
def test_compiled_ops_check_their_input(device, backend):
    """The C++ ops check shapes, dtypes and index forms themselves, naming op and argument."""
    p = op_problem(device)
    shrink = multi_lora.shrink_op(backend)
    with pytest.raises(ValueError, match=r"multi_lora_shrink: lora_a\[1\] stacks 2 adapters but lora_a\[0\] stacks 3"):
        shrink(p.x, [p.lora_a[0], p.lora_a[1][:2]], p.scalings, p.ranks, p.token_adapter)
    with pytest.raises(ValueError, match="multi_lora_shrink: give exactly one index form"):
        shrink(p.x, p.lora_a, p.scalings, p.ranks, p.token_adapter, torch.tensor([0, 6]), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"multi_lora_shrink: ranks must have shape \[3\]"):
        shrink(p.x, p.lora_a, p.scalings, p.ranks[:2], p.token_adapter)
    # The last bound below the one before it, though it ends at the token count.
    with pytest.raises(ValueError, match="multi_lora_shrink: seg_indptr must start at 0, never decrease"):
        shrink(p.x, p.lora_a, p.scalings, p.ranks, None, torch.tensor([0, 4, 7, 6]), torch.tensor([0, 1, 2]))
    t = shrink(p.x, p.lora_a, p.scalings, p.ranks, p.token_adapter)
    y = torch.zeros(6, p.weight.shape[0])
    with pytest.raises(ValueError, match="multi_lora_expand: y must have unit column stride"):
        multi_lora.expand_op(backend)(y[:, ::2], t, p.lora_b, [0, 4], p.ranks, p.token_adapter)
    with pytest.raises(ValueError, match="multi_lora_expand: slices .* without overlapping"):
        multi_lora.expand_op(backend)(y, t, p.lora_b, [0, 3], p.ranks, p.token_adapter)
    with pytest.raises(ValueError, match=r"multi_lora_linear_fwd: lora_b\[0\] has dtype"):
        multi_lora.linear_fwd_op(backend)(p.x, p.weight, p.bias, p.lora_a, [p.lora_b[0].half(), p.lora_b[1]],
                                          p.offsets, p.scalings, p.ranks, p.token_adapter)
    # One meta operand sends the call to the fake kernel, which refuses mixed devices instead of
    # returning its uninitialised output.
    meta_a = [p.lora_a[0], p.lora_a[1].to("meta")]
    with pytest.raises(ValueError, match=r"multi_lora_shrink: operands are on several devices: lora_a\[1\] is on meta but x is on cpu"):
        shrink(p.x, meta_a, p.scalings, p.ranks, p.token_adapter)
    with pytest.raises(ValueError, match=r"multi_lora_shrink: operands are on several devices: lora_a\[0\] is on meta but x is on cpu"):
        shrink(p.x, [p.lora_a[0].to("meta"), p.lora_a[1]], p.scalings, p.ranks, p.token_adapter)
    with pytest.raises(ValueError, match=r"multi_lora_linear_fwd: operands are on several devices: lora_a\[1\] is on meta but x is on cpu"):
        multi_lora.linear_fwd_op(backend)(p.x, p.weight, p.bias, meta_a, p.lora_b, p.offsets,
                                          p.scalings, p.ranks, p.token_adapter)
    with pytest.raises(ValueError, match="multi_lora_expand: operands are on several devices: ranks is on meta but y is on cpu"):
        multi_lora.expand_op(backend)(y, t, p.lora_b, [0, 4], p.ranks.to("meta"), p.token_adapter)


@pytest.mark.parametrize("device,backend", backend_params(("cuda",), devices=("cuda",)))
def test_compiled_ops_name_the_operand_on_another_device(device, backend):
    """An operand on the GPU sends a call to the CUDA kernels even with x (or y) on the CPU: they
    refuse it naming that operand, before a CUDA guard on x's device could fail internally."""
    p = op_problem("cpu")
    gpu_ranks = p.ranks.to(device)
    with pytest.raises(ValueError, match="multi_lora_shrink: ranks is on cuda:0 but x is on cpu"):
        multi_lora.shrink_op(backend)(p.x, p.lora_a, p.scalings, gpu_ranks, p.token_adapter)
    with pytest.raises(ValueError, match="multi_lora_linear_fwd: ranks is on cuda:0 but x is on cpu"):
        multi_lora.linear_fwd_op(backend)(p.x, p.weight, p.bias, p.lora_a, p.lora_b, p.offsets,
                                          p.scalings, gpu_ranks, p.token_adapter)
    t = multi_lora.shrink_op("cpu")(p.x, p.lora_a, p.scalings, p.ranks, p.token_adapter)
    y = torch.zeros(6, p.weight.shape[0])
    with pytest.raises(ValueError, match="multi_lora_expand: ranks is on cuda:0 but y is on cpu"):
        multi_lora.expand_op(backend)(y, t, p.lora_b, p.offsets, gpu_ranks, p.token_adapter)


# ---------------------------------------------------------------------------------------------
# GPU: CUDA graphs (skipped without a GPU)

@pytest.mark.parametrize("device,backend", backend_params(("cuda", "triton"), devices=("cuda",)))
@pytest.mark.parametrize("form", ["token", "segment"])
def test_cuda_graph_replays_with_new_indices(device, backend, form):
    """Captured once, replayed with new adapter indices written into the captured tensors:
    nothing on the hot path syncs with the host or sizes memory from the indices."""
    dtype = torch.bfloat16
    p = make_problem(64, "uniform", K=256, widths=(128, 32, 32), L=8).to(dtype, device)
    p = replace(p, lora_a=[torch.nan_to_num(a) for a in p.lora_a],
                lora_b=[torch.nan_to_num(b) for b in p.lora_b])
    static_x, static_index = p.x.clone(), p.token_adapter.clone()

    def step():
        if form == "token":
            index = {"token_adapter": static_index}
            x = static_x
        else:
            perm, seg_indptr, seg_adapter = segments_from_token_adapter(static_index, len(p.ranks))
            index = {"seg_indptr": seg_indptr, "seg_adapter": seg_adapter}
            x = static_x[perm]
        y = multi_lora_linear(x, p.weight, p.bias, p.lora_a, p.lora_b, p.scalings, p.ranks,
                              slice_offsets=p.offsets, backend=backend, **index)
        return y if form == "token" else y[perm.argsort()]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = step()
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        new_index = torch.randint(-1, len(p.ranks), (64,), generator=gen, dtype=torch.int32)
        static_index.copy_(new_index)
        static_x.copy_(torch.randn(64, 256, generator=gen).to(dtype))
        graph.replay()
        torch.cuda.synchronize()
        q = replace(p, x=static_x.clone(), token_adapter=new_index.to(device))
        assert_close_scaled(static_y, oracle_linear(q.to(torch.float64)), run_linear(q, "reference"),
                            dtype, "graph replay")


@pytest.mark.parametrize("device,backend", MAIN)
def test_slice_offsets_whose_end_passes_int64_are_refused(device, backend):
    """offset + width past int64 wrapped negative in the ops' checks and passed them: the expand
    then wrote outside y. Refused now, by the op and by the public function, for one row too."""
    p = op_problem(device)
    huge = 2**63 - 1
    for rows in (6, 1):
        y = torch.zeros(rows, p.weight.shape[0], device=device)
        t = torch.zeros(2, rows, 4, device=device)
        index = p.token_adapter[:rows]
        with pytest.raises(ValueError, match=r"lora_expand: slices \(offsets \[0, 9223372036854775807\]"):
            lora_expand(y, t, p.lora_b, p.ranks, token_adapter=index, slice_offsets=[0, huge],
                        backend=backend)
        if backend != "reference":
            with pytest.raises(ValueError, match=r"multi_lora_expand: slices .* without overlapping"):
                multi_lora.expand_op(backend)(y, t, p.lora_b, [0, huge], p.ranks, index)
        assert not y.any()


@pytest.mark.parametrize("device,backend", MAIN)
def test_a_non_finite_token_stays_with_its_own_adapter(device, backend):
    """A NaN in one token's features reaches its own adapter's gradients (0 * NaN) and its own
    output row, never another adapter's output or lora_b gradient; on the kernels not another
    adapter's lora_a gradient either (the reference's one GEMM over every adapter does carry it
    there: 0 * NaN in its backward, documented in lora_ops/reference/multi_lora.py)."""
    p = op_problem(device)
    x = p.x.clone()
    x[0, 0] = float("nan")
    index = torch.tensor([0, 1, 2, 1, 2, -1], device=device)
    a = [s.clone().requires_grad_() for s in p.lora_a]
    b = [s.clone().requires_grad_() for s in p.lora_b]
    y = multi_lora_linear(x, p.weight, p.bias, a, b, p.scalings, p.ranks, token_adapter=index,
                          slice_offsets=p.offsets, backend=backend)
    assert torch.isnan(y[0]).any() and torch.isfinite(y[1:]).all()
    y[1:].sum().backward()  # no gradient from token 0's row
    for grads in ([s.grad for s in b], [s.grad for s in a] if backend != "reference" else []):
        for g in grads:
            assert torch.isfinite(g[1:]).all(), "adapters 1 and 2 got token 0's NaN"


@pytest.mark.parametrize("device,backend", MAIN)
def test_stacks_may_come_as_any_sequence(device, backend):
    """A list, a tuple or an nn.ParameterList of stacks: the same layer."""
    p = op_problem(device)
    args = (p.x, p.weight, p.bias)
    rest = (p.scalings, p.ranks)
    kw = dict(token_adapter=p.token_adapter, slice_offsets=p.offsets, backend=backend)
    want = multi_lora_linear(*args, list(p.lora_a), list(p.lora_b), *rest, **kw)
    params = [torch.nn.ParameterList([torch.nn.Parameter(s) for s in stacks])
              for stacks in (p.lora_a, p.lora_b)]
    torch.testing.assert_close(multi_lora_linear(*args, *params, *rest, **kw), want, rtol=0, atol=0)
    torch.testing.assert_close(multi_lora_linear(*args, tuple(p.lora_a), tuple(p.lora_b), *rest, **kw),
                               want, rtol=0, atol=0)
