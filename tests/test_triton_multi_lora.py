"""The Triton multi-adapter launchers (lora_ops.triton.multi_lora) called directly, on what the
public functions never hand them: operands with any strides (x, y and t included, with NaN in x's
storage past K), a later packed slice wider than the first, ranks past r_max in the segment form,
int64 indices past int32, a segment form that splits K, a seg_indptr that runs backwards, the
launchers' own argument checks, and split_reduction's contract.

Without a GPU they run in Triton's interpreter on CPU tensors (small shapes).
"""
import pytest
import torch

from tests.helpers import import_triton_or_skip, nan_past_rank, rel_err

triton = import_triton_or_skip()

from lora_ops.reference import multi_lora as ref  # noqa: E402
from lora_ops.triton import _launch  # noqa: E402
from lora_ops.triton.multi_lora import multi_lora_expand, multi_lora_shrink  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F64 = torch.float64
L, R_MAX = 4, 16
RANKS = (16, 1, 5, 9)  # r_max, r = 1, and ranks that are not a power of two
M = 37  # three row tiles under the interpreter, the last one ragged
K = 19  # not a multiple of 8
WIDTHS, OFFSETS, N = (8, 45), (3, 14), 61  # the second slice is the wider one, past one column tile


def poisoned_a(K, ranks=RANKS, num_slices=1):
    """Stacks [L, R_MAX, K] with NaN in every row past the adapter's rank."""
    return [nan_past_rank(torch.randn(L, R_MAX, K, device=DEVICE) / K ** 0.5, ranks, 1)
            for _ in range(num_slices)]


def poisoned_b(widths, ranks=RANKS):
    """Stacks [L, N_s, R_MAX] with NaN in every column past the adapter's rank."""
    return [nan_past_rank(torch.randn(L, width, R_MAX, device=DEVICE) / 4, ranks, 2) for width in widths]


def index_of(form, M):
    """Per token: -1 and out-of-range (L) tokens among the adapters. Segments: an empty one, one
    longer than a row tile, an out-of-range one, one of r = 1 and a trailing -1 one."""
    if form == "token":
        adapters = torch.tensor([0, 1, 2, 3, -1, L], dtype=torch.int32).repeat(M // 6 + 1)[:M]
        return {"token_adapter": adapters[torch.randperm(M)].to(DEVICE)}
    bounds = [0, 0, 3, 20, 24, M - 2, M]
    return {"seg_indptr": torch.tensor(bounds, dtype=torch.int32, device=DEVICE),
            "seg_adapter": torch.tensor([2, 1, 0, L, 3, -1], dtype=torch.int32, device=DEVICE)}


def has_no_adapter(M, index):
    return ref.adapter_of_token(M, L, **{k: v.cpu() for k, v in index.items()}).to(DEVICE) < 0


def oracle_shrink(x, lora_a, scalings, ranks, index):
    return ref.multi_lora_shrink(x.to(F64), [a.to(F64) for a in lora_a], scalings.to(F64), ranks, **index)


def oracle_expand(y, t, lora_b, offsets, ranks, index):
    return ref.multi_lora_expand(y.to(F64), t.to(F64), [b.to(F64) for b in lora_b], offsets, ranks, **index)


@pytest.mark.parametrize("form", ["token", "segment"])
def test_operands_with_any_strides(form):
    """x, y and t as transposed views (no unit stride anywhere along K, N or the rank), x's
    storage past column K holding NaN that no load may touch, and two packed slices with a gap
    before each and a tail, the second wider than the first and than one column tile."""
    index = index_of(form, M)
    ranks = torch.tensor(RANKS, dtype=torch.int32, device=DEVICE)
    scalings = torch.tensor([0.5, 2.0, 1.25, 0.75], device=DEVICE)
    x_storage = torch.randn(K + 3, M, device=DEVICE)
    x_storage[K:] = float("nan")
    x = x_storage.t()[:, :K]
    assert x.stride() == (1, M)
    lora_a = poisoned_a(K, num_slices=len(WIDTHS))
    t = multi_lora_shrink(x, lora_a, scalings, ranks, **index)
    assert t.shape == (len(WIDTHS), M, R_MAX) and t.dtype == torch.float32
    assert rel_err(t, oracle_shrink(x, lora_a, scalings, ranks, index)) <= 1e-5
    assert torch.all(t[:, has_no_adapter(M, index)] == 0)

    t_in = torch.randn(len(WIDTHS), R_MAX, M, device=DEVICE).transpose(1, 2)
    y = torch.randn(N, M, device=DEVICE).t()
    assert t_in.stride(2) == M and y.stride() == (1, M)
    lora_b = poisoned_b(WIDTHS)
    before = y.clone()
    want = oracle_expand(y, t_in, lora_b, OFFSETS, ranks, index)
    multi_lora_expand(y, t_in, lora_b, OFFSETS, ranks, **index)
    assert rel_err(y, want) <= 1e-5
    untouched = torch.ones_like(y, dtype=torch.bool)
    for offset, width in zip(OFFSETS, WIDTHS):
        untouched[:, offset:offset + width] = False
    untouched[has_no_adapter(M, index)] = True
    assert torch.equal(y[untouched], before[untouched])


def test_segment_form_splits_k():
    """Few row tiles and a long K: the segment shrink splits K over programs that add their fp32
    partials, as the per-token one does (M not a multiple of the tile, an empty segment, a -1 one)."""
    M, K = 11, 75 if _launch.INTERPRETED else 4100
    splits, _ = _launch.split_reduction(triton.cdiv(M, _launch.row_block(M)), K,
                                        32 if _launch.INTERPRETED else 64, 1024, torch.device(DEVICE))
    assert splits > 1, "the shape no longer reaches the split path"
    index = {"seg_indptr": torch.tensor([0, 0, 4, 4, 9, M], dtype=torch.int32, device=DEVICE),
             "seg_adapter": torch.tensor([0, 1, 2, -1, 3], dtype=torch.int32, device=DEVICE)}
    x = torch.randn(M, K, device=DEVICE)
    ranks = torch.tensor(RANKS, dtype=torch.int32, device=DEVICE)
    scalings = torch.tensor([0.5, 2.0, 1.25, 0.75], device=DEVICE)
    lora_a = poisoned_a(K)
    t = multi_lora_shrink(x, lora_a, scalings, ranks, **index)
    assert rel_err(t, oracle_shrink(x, lora_a, scalings, ranks, index)) <= 1e-5
    assert torch.all(t[:, has_no_adapter(M, index)] == 0)


@pytest.mark.parametrize("form", ["token", "segment"])
def test_ranks_outside_0_r_max_are_clamped(form):
    """The launchers read ranks without checking them: one past r_max is r_max (never rows of the
    next adapter, nor columns of t past r_max), a negative one is 0. Adapter 1 holds NaN past its
    rank 1, which adapter 0 read past r_max would reach."""
    M = 21
    index = index_of(form, M)
    ranks = torch.tensor([R_MAX + 7, 1, -3, 5], dtype=torch.int32, device=DEVICE)
    clamped = ranks.clamp(0, R_MAX)
    scalings = torch.tensor([0.5, 2.0, 1.25, 0.75], device=DEVICE)
    x = torch.randn(M, K, device=DEVICE)
    lora_a = poisoned_a(K, clamped.tolist())
    t = multi_lora_shrink(x, lora_a, scalings, ranks, **index)
    assert rel_err(t, oracle_shrink(x, lora_a, scalings, clamped, index)) <= 1e-5

    t_in = torch.randn(1, M, R_MAX, device=DEVICE)
    lora_b = poisoned_b((23,), clamped.tolist())
    y = torch.randn(M, 23, device=DEVICE)
    want = oracle_expand(y, t_in, lora_b, [0], clamped, index)
    multi_lora_expand(y, t_in, lora_b, [0], ranks, **index)
    assert rel_err(y, want) <= 1e-5


def test_int64_indices_past_int32_name_no_adapter():
    """An int64 index past int32 is outside [0, L): no adapter, not the one its low 32 bits name
    (2**32 + 1 would be adapter 1), in both index forms."""
    M = 6
    ranks = torch.tensor(RANKS, dtype=torch.int64, device=DEVICE)
    scalings = torch.ones(L, device=DEVICE)
    x = torch.randn(M, K, device=DEVICE)
    lora_a, lora_b = poisoned_a(K), poisoned_b((13,))
    y0 = torch.randn(M, 13, device=DEVICE)
    token = lambda v: {"token_adapter": torch.tensor(v, dtype=torch.int64, device=DEVICE)}
    segments = lambda v: {"seg_indptr": torch.tensor([0, 2, 4, M], dtype=torch.int64, device=DEVICE),
                          "seg_adapter": torch.tensor(v, dtype=torch.int64, device=DEVICE)}
    for wild, none in ((token([2**32 + 1, 0, -(2**32) + 2, 1, 2**40 + 3, 2**33 + 2]),
                        token([-1, 0, -1, 1, -1, -1])),
                       (segments([2**32 + 1, 2, 2**34 + 3]), segments([-1, 2, -1]))):
        t = multi_lora_shrink(x, lora_a, scalings, ranks, **wild)
        assert torch.equal(t, multi_lora_shrink(x, lora_a, scalings, ranks, **none))
        y, y_none = y0.clone(), y0.clone()
        multi_lora_expand(y, t, lora_b, [0], ranks, **wild)
        multi_lora_expand(y_none, t, lora_b, [0], ranks, **none)
        assert torch.equal(y, y_none)


def test_a_backwards_segment_takes_no_rows():
    """seg_indptr is clamped, not trusted: a segment whose end lies before its start covers no
    rows, and the tiles of the segments around it are still all found (M = 40 spans 2.5 tiles,
    the backwards segment 40 rows)."""
    M = 40
    index = {"seg_indptr": torch.tensor([0, M, 0, 0], dtype=torch.int32, device=DEVICE),
             "seg_adapter": torch.tensor([1, 2, 0], dtype=torch.int32, device=DEVICE)}
    same = {"token_adapter": torch.ones(M, dtype=torch.int32, device=DEVICE)}
    ranks = torch.tensor(RANKS, dtype=torch.int32, device=DEVICE)
    scalings = torch.tensor([0.5, 2.0, 1.25, 0.75], device=DEVICE)
    x = torch.randn(M, K, device=DEVICE)
    lora_a, lora_b = poisoned_a(K), poisoned_b((9,))
    t = multi_lora_shrink(x, lora_a, scalings, ranks, **index)
    assert rel_err(t, oracle_shrink(x, lora_a, scalings, ranks, same)) <= 1e-5
    y = torch.randn(M, 9, device=DEVICE)
    want = oracle_expand(y, t, lora_b, [0], ranks, same)
    multi_lora_expand(y, t, lora_b, [0], ranks, **index)
    assert rel_err(y, want) <= 1e-5


def test_launchers_check_their_arguments():
    """Each refusal names the launcher and the argument, before any kernel runs."""
    M = 5
    x = torch.randn(M, K, device=DEVICE)
    lora_a = poisoned_a(K, num_slices=2)
    scalings = torch.ones(L, device=DEVICE)
    ranks = torch.tensor(RANKS, dtype=torch.int32, device=DEVICE)
    token = torch.zeros(M, dtype=torch.int32, device=DEVICE)
    shrink_cases = [
        (dict(token_adapter=token.new_zeros(M + 1)), r"token_adapter must be \[5\], got \(6,\)"),
        (dict(ranks=ranks.new_ones(L + 1)), r"ranks must be \[4\] \(one per adapter\), got \(5,\)"),
        (dict(lora_a=[lora_a[0], lora_a[1][:L - 1]]), r"lora_a\[1\] must be \[4, 16, 19\] like lora_a\[0\] and x"),
        (dict(lora_a=[lora_a[0], lora_a[1][:, :R_MAX - 1]]), r"lora_a\[1\] must be \[4, 16, 19\]"),
    ]
    for override, message in shrink_cases:
        args = dict(x=x, lora_a=lora_a, scalings=scalings, ranks=ranks, token_adapter=token) | override
        with pytest.raises(ValueError, match="^multi_lora_shrink: " + message):
            multi_lora_shrink(args.pop("x"), args.pop("lora_a"), args.pop("scalings"), args.pop("ranks"), **args)

    lora_b = poisoned_b((6,))
    y = torch.zeros(M, 10, device=DEVICE)
    t = torch.zeros(1, M, R_MAX, device=DEVICE)
    expand_cases = [
        (dict(t=t.new_zeros(1, M + 1, R_MAX)), r"t must be \[1, 5, 16\] on .*, got \(1, 6, 16\)"),
        (dict(t=t.new_zeros(1, M, R_MAX + 1)), r"t must be \[1, 5, 16\]"),
        (dict(slice_offsets=[-2]), r"slice 0 spans columns -2..4 but y has 10"),
        (dict(slice_offsets=[5]), r"slice 0 spans columns 5..11 but y has 10"),
    ]
    for override, message in expand_cases:
        args = dict(y=y, t=t, lora_b=lora_b, slice_offsets=[0], ranks=ranks, token_adapter=token) | override
        with pytest.raises(ValueError, match="^multi_lora_expand: " + message):
            multi_lora_expand(args.pop("y"), args.pop("t"), args.pop("lora_b"), args.pop("slice_offsets"),
                              args.pop("ranks"), **args)
    assert not y.any()


def test_split_reduction_contract():
    """(splits, per_split): per_split a whole number of blocks, the splits covering the whole
    length with none of them empty, and never more splits than fill the device."""
    device = torch.device(DEVICE)
    fill = _launch._device_programs(device)
    for programs in (1, 2, 3, 5, 64):
        for length in (1, 31, 32, 33, 100, 130, 200, 1000, 5000):
            for block in (16, 32, 64):
                splits, per_split = _launch.split_reduction(programs, length, block, 1024, device)
                what = f"programs={programs} length={length} block={block}: {splits} x {per_split}"
                assert splits >= 1 and per_split % block == 0, what
                assert (splits - 1) * per_split < length <= splits * per_split, what
                assert splits <= max(1, fill // programs), what
