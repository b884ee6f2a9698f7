"""The Triton launchers of lora_ops.triton against the fp64 reference: odd shapes, strided rows,
dropout mask bit for bit, every output_mask, both index forms, -1 and out-of-range tokens, mixed
ranks with NaN past each rank, packed slices of different widths, transposed adapter stacks.

Without a GPU they run in Triton's interpreter on CPU tensors (small shapes, a few cases per
dtype); with one, the same tests run on CUDA tensors.
"""
import pytest
import torch

from tests.helpers import DTYPES, assert_close_scaled, import_triton_or_skip, nan_past_rank, rel_err

triton = import_triton_or_skip()

from lora_ops import reference as ref  # noqa: E402
from lora_ops.reference import multi_lora as multi_ref  # noqa: E402
from lora_ops.reference.dropout import dropout_keep_mask  # noqa: E402
from triton.runtime.errors import OutOfResources  # noqa: E402

from lora_ops.triton import _launch  # noqa: E402
from lora_ops.triton import lora_linear as triton_single  # noqa: E402
from lora_ops.triton.lora_linear import lora_linear_bwd, lora_linear_fwd  # noqa: E402
from lora_ops.triton.multi_lora import multi_lora_expand, multi_lora_shrink  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F64 = torch.float64
SCALING = 0.75

# (M, K, N, r, dropout_p, bias). Under the interpreter a single row tile (M <= 16) splits the
# forward shrink over K when K > 32 (fp32 partials summed by the GEMM) and the backward's
# dS pass over N when N > 32 (atomics); the other cases take the unsplit paths.
SINGLE_CASES = [
    (1, 40, 13, 1, 0.0, True),
    (7, 13, 40, 64, 0.1, False),
    (33, 40, 13, 8, 0.3, True),
    (33, 13, 40, 8, 0.0, True),
    (5, 70, 13, 8, 0.2, True),  # split K with dropout: the mask keyed by x's column, not the split's
]


def _case_id(case):
    M, K, N, r, p, bias = case
    return f"M{M}-K{K}-N{N}-r{r}-p{p}" + ("-bias" if bias else "")


def _single_inputs(M, K, N, r, dtype, bias, x_row_pad=0):
    """x with row stride K + x_row_pad, weights scaled so every term of y is O(1)."""
    x = torch.randn(M, K + x_row_pad, device=DEVICE).to(dtype)[:, :K]
    w = (torch.randn(N, K, device=DEVICE) / K ** 0.5).to(dtype)
    b = torch.randn(N, device=DEVICE).to(dtype) if bias else None
    a = (torch.randn(r, K, device=DEVICE) / K ** 0.5).to(dtype)
    lora_b = (torch.randn(N, r, device=DEVICE) / r ** 0.5).to(dtype)
    return x, w, b, a, lora_b


def _f64(*tensors):
    return [None if t is None else t.to(F64) for t in tensors]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SINGLE_CASES, ids=_case_id)
def test_lora_linear_fwd_matches_reference(case, dtype):
    M, K, N, r, p, bias = case
    seed = 2 ** 40 + 17
    x, w, b, a, lora_b = _single_inputs(M, K, N, r, dtype, bias, x_row_pad=3)
    assert x.stride(0) == K + 3
    y, s = lora_linear_fwd(x, w, b, a, lora_b, SCALING, p, seed)
    y64, s64 = ref.lora_linear_fwd(*_f64(x, w, b, a, lora_b), SCALING, p, seed)
    y_low, s_low = ref.lora_linear_fwd(x, w, b, a, lora_b, SCALING, p, seed)
    assert y.dtype == s.dtype == dtype
    assert_close_scaled(s, s64, s_low, dtype, "S")
    assert_close_scaled(y, y64, y_low, dtype, "y")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SINGLE_CASES, ids=_case_id)
def test_lora_linear_bwd_matches_reference(case, dtype):
    M, K, N, r, p, _ = case
    seed = 12345
    x, w, _, a, lora_b = _single_inputs(M, K, N, r, dtype, False, x_row_pad=5)
    _, s = ref.lora_linear_fwd(x, w, None, a, lora_b, SCALING, p, seed)
    dy = torch.randn(M, N, device=DEVICE).to(dtype)
    grads = lora_linear_bwd(dy, x, w, a, lora_b, s, SCALING, p, seed, (True, True, True))
    oracle = ref.lora_linear_bwd(*_f64(dy, x, w, a, lora_b, s), SCALING, p, seed)
    low = ref.lora_linear_bwd(dy, x, w, a, lora_b, s, SCALING, p, seed)
    for name, got, want, lowp in zip(("dx", "d_lora_a", "d_lora_b"), grads, oracle, low):
        assert got.dtype == dtype, name
        assert_close_scaled(got, want, lowp, dtype, name)


def test_lora_linear_rank_past_every_rank_block():
    """r = 200 spans several rank blocks in every kernel, the last one partly masked."""
    M, K, N, r, p = 7, 13, 40, 200, 0.1
    x, w, b, a, lora_b = _single_inputs(M, K, N, r, torch.float32, True)
    y, s = lora_linear_fwd(x, w, b, a, lora_b, SCALING, p, 1)
    y64, s64 = ref.lora_linear_fwd(*_f64(x, w, b, a, lora_b), SCALING, p, 1)
    assert rel_err(s, s64) <= 1e-5 and rel_err(y, y64) <= 1e-5
    dy = torch.randn(M, N, device=DEVICE)
    grads = lora_linear_bwd(dy, x, w, a, lora_b, s, SCALING, p, 1, (True, True, True))
    for got, want in zip(grads, ref.lora_linear_bwd(*_f64(dy, x, w, a, lora_b, s), SCALING, p, 1)):
        assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("output_mask", [(True, False, True), (False, True, False), (False, False, True),
                                         (False, False, False)], ids=str)
def test_lora_linear_bwd_output_mask(output_mask):
    M, K, N, r, p = 7, 40, 13, 8, 0.2
    x, w, _, a, lora_b = _single_inputs(M, K, N, r, torch.float16, False)
    _, s = ref.lora_linear_fwd(x, w, None, a, lora_b, SCALING, p, 3)
    dy = torch.randn(M, N, device=DEVICE).to(torch.float16)
    grads = lora_linear_bwd(dy, x, w, a, lora_b, s, SCALING, p, 3, output_mask)
    full = lora_linear_bwd(dy, x, w, a, lora_b, s, SCALING, p, 3, (True, True, True))
    for wanted, got, want in zip(output_mask, grads, full):
        if wanted:
            torch.testing.assert_close(got, want)  # not bitwise: dB sums by atomics on a GPU
        else:
            assert got.shape == (0,)


def test_lora_linear_empty_batch():
    x, w, b, a, lora_b = _single_inputs(0, 13, 40, 8, torch.float32, True)
    y, s = lora_linear_fwd(x, w, b, a, lora_b, SCALING, 0.1, 0)
    assert y.shape == (0, 40) and s.shape == (0, 8)
    dx, da, db = lora_linear_bwd(x.new_zeros(0, 40), x, w, a, lora_b, s, SCALING, 0.1, 0, (True, True, True))
    assert dx.shape == (0, 13)
    assert torch.equal(da, torch.zeros_like(a)) and torch.equal(db, torch.zeros_like(lora_b))


@pytest.mark.parametrize("K", [24, 100], ids=lambda k: f"K{k}")
def test_y_takes_the_returned_s_rounded_once(K):
    """y's adapter term is scaling times the S that is returned (rounded to x's dtype), on the
    unsplit path (K <= 32) and the split-K one, where the GEMM sums the fp32 partials: with W = 0
    and B = I, y is (scaling S) rounded, bit for bit, never the fp32 sum scaled and rounded once.
    float16 only: Triton's interpreter rounds fp32 to bfloat16 toward zero, not to nearest."""
    M, r, scaling, dtype = 16, 64, 0.3, torch.float16
    x = torch.randn(M, K, device=DEVICE).to(dtype)
    a = (torch.randn(r, K, device=DEVICE) / K ** 0.5).to(dtype)
    eye = torch.eye(r, device=DEVICE).to(dtype)
    w = torch.zeros(r, K, device=DEVICE, dtype=dtype)
    y, s = lora_linear_fwd(x, w, None, a, eye, scaling, 0.0, 0)
    assert_close_scaled(s, ref.lora_linear_fwd(*_f64(x, w, None, a, eye), scaling, 0.0, 0)[1],
                        ref.lora_linear_fwd(x, w, None, a, eye, scaling, 0.0, 0)[1], dtype, "S")
    assert torch.equal(y, (s.float() * scaling).to(dtype))


@pytest.mark.parametrize("case", [(7, 40, 13, 8, 0.3), (5, 13, 70, 12, 0.0)], ids=str)
def test_lora_linear_bwd_strided_dy_and_s(case):
    """dY and S as column slices of wider tensors (row strides N + 3 and r + 5), the latter read
    by the dS / dB pass with its own stride; the N > 32 case takes the split-N (atomic) dS path."""
    M, K, N, r, p = case
    dtype = torch.float32
    x, w, _, a, lora_b = _single_inputs(M, K, N, r, dtype, False)
    _, s_full = ref.lora_linear_fwd(x, w, None, a, lora_b, SCALING, p, 4)
    s = torch.randn(M, r + 5, device=DEVICE)[:, :r].copy_(s_full)
    dy = torch.randn(M, N + 3, device=DEVICE)[:, :N]
    assert s.stride(0) == r + 5 and dy.stride(0) == N + 3
    grads = lora_linear_bwd(dy, x, w, a, lora_b, s, SCALING, p, 4, (True, True, True))
    oracle = ref.lora_linear_bwd(*_f64(dy, x, w, a, lora_b, s), SCALING, p, 4)
    for name, got, want in zip(("dx", "d_lora_a", "d_lora_b"), grads, oracle):
        assert rel_err(got, want) <= 1e-5, name


@pytest.mark.parametrize("case", [(7, 40, 13, 8, 0.3), (33, 13, 40, 12, 0.0)], ids=str)
def test_lora_linear_transposed_weights(case):
    """weight, lora_a and lora_b as transposed views (column-major, e.g. an adapter stored as its
    transpose): every kernel that reads one takes both of its strides."""
    M, K, N, r, p = case
    x, w, b, a, lora_b = _single_inputs(M, K, N, r, torch.float32, True)
    wt, at, bt = (t.t().contiguous().t() for t in (w, a, lora_b))
    assert wt.stride() == (1, N) and at.stride() == (1, r) and bt.stride() == (1, N)
    y, s = lora_linear_fwd(x, wt, b, at, bt, SCALING, p, 6)
    y64, s64 = ref.lora_linear_fwd(*_f64(x, w, b, a, lora_b), SCALING, p, 6)
    assert rel_err(s, s64) <= 1e-5 and rel_err(y, y64) <= 1e-5
    dy = torch.randn(M, N, device=DEVICE)
    grads = lora_linear_bwd(dy, x, wt, at, bt, s, SCALING, p, 6, (True, True, True))
    oracle = ref.lora_linear_bwd(*_f64(dy, x, w, a, lora_b, s), SCALING, p, 6)
    for name, got, want in zip(("dx", "d_lora_a", "d_lora_b"), grads, oracle):
        assert rel_err(got, want) <= 1e-5, name


@pytest.mark.parametrize("seed", [0, 7, 2 ** 32 + 5, 2 ** 63 - 1])
def test_dropout_mask_is_the_reference_mask_bit_for_bit(seed):
    """With x = 1 and A = I, S is the scaled keep-mask itself; with W = 0 and A = I, dX is
    nonzero exactly where the mask keeps."""
    M, K, p = 33, 40, 0.3
    keep = dropout_keep_mask(seed, M, K, p, DEVICE)
    x = torch.ones(M, K, device=DEVICE)
    eye = torch.eye(K, device=DEVICE)
    zeros_w = torch.zeros(8, K, device=DEVICE)
    _, s = lora_linear_fwd(x, zeros_w, None, eye, torch.zeros(8, K, device=DEVICE), SCALING, p, seed)
    assert torch.equal(s != 0, keep)
    torch.testing.assert_close(s[keep], torch.full_like(s[keep], 1 / (1 - p)))

    dy = torch.randn(M, 8, device=DEVICE)
    dx, _, _ = lora_linear_bwd(dy, x, zeros_w, eye, torch.randn(8, K, device=DEVICE), s, SCALING, p, seed,
                               (True, False, False))
    assert torch.equal(dx != 0, keep)


# ---------------------------------------------------------------------------------------------
# Autotuned kernels: the tuner, the default configurations, and every configuration on its own
# ---------------------------------------------------------------------------------------------

TUNED = ("_fwd_gemm_kernel", "_dx_gemm_kernel", "_da_kernel")


def _fwd_and_bwd_match_reference(M, K, N, r, dtype, p=0.1):
    x, w, b, a, lora_b = _single_inputs(M, K, N, r, dtype, True, x_row_pad=1)
    y, s = lora_linear_fwd(x, w, b, a, lora_b, SCALING, p, 99)
    assert_close_scaled(y, ref.lora_linear_fwd(*_f64(x, w, b, a, lora_b), SCALING, p, 99)[0],
                        ref.lora_linear_fwd(x, w, b, a, lora_b, SCALING, p, 99)[0], dtype, "y")
    dy = torch.randn(M, N, device=DEVICE).to(dtype)
    grads = lora_linear_bwd(dy, x, w, a, lora_b, s, SCALING, p, 99, (True, True, True))
    oracle = ref.lora_linear_bwd(*_f64(dy, x, w, a, lora_b, s), SCALING, p, 99)
    low = ref.lora_linear_bwd(dy, x, w, a, lora_b, s, SCALING, p, 99)
    for name, got, want, lowp in zip(("dx", "d_lora_a", "d_lora_b"), grads, oracle, low):
        assert_close_scaled(got, want, lowp, dtype, name)


@pytest.fixture
def launches(monkeypatch):
    """kernel name -> one entry per launch: "tuner" where the autotuner took it, else the BLOCK_M
    the launcher passed to the bare JIT function."""
    seen, in_tuner = {name: [] for name in TUNED}, []
    for name in TUNED:
        tuner = getattr(triton_single, name)

        def tuned(*args, _name=name, _run=tuner.run, **kwargs):
            seen[_name].append("tuner")
            in_tuner.append(_name)
            try:
                return _run(*args, **kwargs)
            finally:
                in_tuner.pop()

        def direct(*args, _name=name, _run=tuner.fn.run, **kwargs):
            if not in_tuner:
                seen[_name].append(kwargs.get("BLOCK_M"))
            return _run(*args, **kwargs)
        monkeypatch.setattr(tuner, "run", tuned)
        monkeypatch.setattr(tuner.fn, "run", direct)
    return seen


def test_tuning_off_launches_the_default_configurations(monkeypatch, launches):
    monkeypatch.setenv(_launch.AUTOTUNE_ENV, "0")
    M = 5
    _fwd_and_bwd_match_reference(M, 40, 13, 8, torch.float32)
    gemm = triton_single._default_gemm_config(_launch.m_bucket(M), 4).kwargs["BLOCK_M"]
    assert launches == {"_fwd_gemm_kernel": [gemm], "_dx_gemm_kernel": [gemm],
                        "_da_kernel": [triton_single._DA_DEFAULT.kwargs["BLOCK_M"]]}


def test_tuning_on_launches_through_the_tuner(monkeypatch, launches):
    monkeypatch.setenv(_launch.AUTOTUNE_ENV, "1")
    _fwd_and_bwd_match_reference(33, 13, 40, 8, torch.float16)
    assert launches == {name: ["tuner"] for name in TUNED}


def test_a_forced_configuration_is_the_one_launched(monkeypatch, launches):
    # Under the interpreter this is also the one test of the kernels at a second set of tiles.
    monkeypatch.setenv(_launch.AUTOTUNE_ENV, "1")
    gemm = triton.Config({"BLOCK_M": 16, "BLOCK_COL": 16, "BLOCK_RED": 16, "GROUP_M": 2}, num_warps=4,
                         num_stages=2)
    da = triton.Config({"BLOCK_M": 16, "BLOCK_K": 16}, num_warps=4, num_stages=2)
    with _launch.forced_config("_fwd_gemm_kernel", gemm), _launch.forced_config("_dx_gemm_kernel", gemm), \
            _launch.forced_config("_da_kernel", da):
        _fwd_and_bwd_match_reference(40, 33, 21, 24, torch.float32)
    assert launches == {name: [16] for name in TUNED}
    assert not _launch._FORCED


def test_default_gpu_tiles_are_tuned_ones_the_pruning_keeps():
    gpu_configs = [triton_single._gemm_config(*t) for t in triton_single._DECODE_TILES + triton_single._TILED_TILES]
    for bucket in (1, 2, 4, 8, 16, 32, 64, 128, 4096):
        kept = [c.all_kwargs() for c in triton_single._prune_gemm_configs(gpu_configs, {"M_BUCKET": bucket})]
        for element_size in (2, 4):
            tile = triton_single._default_gemm_tile(bucket, element_size)
            assert triton_single._gemm_config(*tile).all_kwargs() in kept, (bucket, element_size, tile)
    assert triton_single._DA_DEFAULT_TILE in triton_single._DA_TILES


def _rows_for(kernel, config):
    """An M the tuner would offer `config` at: a decode tile's own row count (its bucket) less
    a few rows, or 200 rows (two ragged row tiles and more) for the tiled GEMM and dA ones."""
    if kernel != "_da_kernel" and config.kwargs["BLOCK_RED"] >= 128:
        return max(1, config.kwargs["BLOCK_M"] - 3)
    return 200


@pytest.mark.skipif(DEVICE != "cuda", reason="the interpreter has one configuration per kernel; on a GPU "
                    "each configuration is compiled and checked here")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("kernel", TUNED)
def test_every_tuned_configuration_matches_reference(kernel, dtype, monkeypatch):
    # The other tests run with tuning off (tests/conftest.py): this is where the configurations
    # the tuner may pick are each run. One that needs more shared memory than the GPU has is
    # skipped by the tuner, and counted here, not failed; every row count must keep one.
    monkeypatch.setenv(_launch.AUTOTUNE_ENV, "0")
    ran, refused = {}, []
    for config in getattr(triton_single, kernel).configs:
        M = _rows_for(kernel, config)
        try:
            with _launch.forced_config(kernel, config):
                _fwd_and_bwd_match_reference(M, 264, 136, 24, dtype)
        except OutOfResources:
            refused.append(config)
            continue
        ran.setdefault(M, []).append(config)
    wanted = {_rows_for(kernel, c) for c in getattr(triton_single, kernel).configs}
    assert set(ran) == wanted, f"no configuration ran at M in {wanted - set(ran)}; refused: {refused}"


# ---------------------------------------------------------------------------------------------
# Multi-adapter shrink / expand
# ---------------------------------------------------------------------------------------------

L, R_MAX = 4, 64
RANKS = [8, 64, 1, 16]


def _poisoned_a(K, dtype, transposed):
    """[L, R_MAX, K] with NaN in every row past the adapter's rank; transposed=True gives the
    same values as a [L, K, R_MAX] tensor viewed through transpose(1, 2)."""
    a = nan_past_rank(torch.randn(L, R_MAX, K, device=DEVICE) / K ** 0.5, RANKS, 1).to(dtype)
    return a.transpose(1, 2).contiguous().transpose(1, 2) if transposed else a


def _poisoned_b(N, dtype, transposed):
    """[L, N, R_MAX] with NaN in every column past the adapter's rank."""
    b = nan_past_rank(torch.randn(L, N, R_MAX, device=DEVICE) / 4, RANKS, 2).to(dtype)
    return b.transpose(1, 2).contiguous().transpose(1, 2) if transposed else b


def _index(form, M, index_dtype):
    """Adapter-index kwargs. Per token: random adapters with -1 and out-of-range (L) tokens, as a
    strided view. Segments: an empty one, one longer than a row tile, a -1 one and an
    out-of-range one."""
    if form == "token":
        return {"token_adapter": torch.randint(-1, L + 1, (2 * M,), device=DEVICE, dtype=index_dtype)[::2]}
    bounds = [0, 0, M * 3 // 5, M * 2 // 3, M * 4 // 5, M - 1, M]
    adapters = [2, 1, -1, 0, 3, L]
    return {"seg_indptr": torch.tensor(bounds, device=DEVICE, dtype=index_dtype),
            "seg_adapter": torch.tensor(adapters, device=DEVICE, dtype=index_dtype)}


def _adapters(M, index):
    return multi_ref.adapter_of_token(M, L, **{k: v.cpu() for k, v in index.items()}).to(DEVICE)


# (M, K, slice widths, form, index dtype, transposed stacks)
MULTI_CASES = [
    (1, 40, (13,), "token", torch.int32, False),
    (7, 13, (40, 13, 8), "token", torch.int64, True),
    (33, 40, (13, 40), "segment", torch.int32, False),
    (33, 13, (8, 40, 13), "segment", torch.int64, True),
]


def _multi_id(case):
    M, K, widths, form, index_dtype, transposed = case
    strided = "-strided" if transposed else ""
    return f"M{M}-K{K}-w{'_'.join(map(str, widths))}-{form}-{str(index_dtype)[6:]}{strided}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", MULTI_CASES, ids=_multi_id)
def test_multi_lora_shrink_matches_reference(case, dtype):
    M, K, widths, form, index_dtype, transposed = case
    x = torch.randn(M, K + 3, device=DEVICE).to(dtype)[:, :K]
    lora_a = [_poisoned_a(K, dtype, transposed) for _ in widths]
    scalings = torch.tensor([0.5, 2.0, 1.0, 0.25], device=DEVICE)
    ranks = torch.tensor(RANKS, device=DEVICE, dtype=index_dtype)
    index = _index(form, M, index_dtype)
    t = multi_lora_shrink(x, lora_a, scalings, ranks, **index)
    want = multi_ref.multi_lora_shrink(x.to(F64), [a.to(F64) for a in lora_a], scalings, ranks, **index)
    assert t.dtype == torch.float32 and t.shape == (len(widths), M, R_MAX)
    # Products of dtype values are exact in fp32; only the fp32 sum is rounded.
    assert rel_err(t, want) <= 1e-5
    no_adapter = _adapters(M, index) < 0
    assert torch.all(t[:, no_adapter] == 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", MULTI_CASES, ids=_multi_id)
def test_multi_lora_expand_matches_reference(case, dtype):
    M, _, widths, form, index_dtype, transposed = case
    gap = 5  # columns of y outside every slice stay untouched
    offsets = [sum(widths[:s]) + gap * s for s in range(len(widths))]
    y = torch.randn(M, offsets[-1] + widths[-1] + gap, device=DEVICE).to(dtype)
    t = torch.randn(len(widths), M, R_MAX, device=DEVICE)
    lora_b = [_poisoned_b(n, dtype, transposed) for n in widths]
    ranks = torch.tensor(RANKS, device=DEVICE, dtype=index_dtype)
    index = _index(form, M, index_dtype)
    want = multi_ref.multi_lora_expand(y.to(F64), t.to(F64), [b.to(F64) for b in lora_b], offsets, ranks,
                                       **index)
    lowp = multi_ref.multi_lora_expand(y.clone(), t, lora_b, offsets, ranks, **index)
    before = y.clone()
    multi_lora_expand(y, t, lora_b, offsets, ranks, **index)
    assert_close_scaled(y, want, lowp, dtype, "y")
    untouched = torch.ones_like(y, dtype=torch.bool)
    for off, n in zip(offsets, widths):
        untouched[:, off:off + n] = False
    untouched[_adapters(M, index) < 0] = True
    assert torch.equal(y[untouched], before[untouched])


def test_multi_lora_split_k_shrink_and_empty_batch():
    """A single token spreads K over several programs (fp32 atomics); M = 0 launches nothing."""
    K = 200
    x = torch.randn(1, K, device=DEVICE)
    lora_a = [_poisoned_a(K, torch.float32, False)]
    scalings = torch.ones(L, device=DEVICE)
    ranks = torch.tensor(RANKS, device=DEVICE)
    index = {"token_adapter": torch.tensor([1], device=DEVICE)}
    t = multi_lora_shrink(x, lora_a, scalings, ranks, **index)
    want = multi_ref.multi_lora_shrink(x.to(F64), [a.to(F64) for a in lora_a], scalings, ranks, **index)
    assert rel_err(t, want) <= 1e-5

    empty = {"token_adapter": torch.zeros(0, device=DEVICE, dtype=torch.int32)}
    t0 = multi_lora_shrink(x[:0], lora_a, scalings, ranks, **empty)
    assert t0.shape == (1, 0, R_MAX)
    multi_lora_expand(x.new_zeros(0, 13), t0, [_poisoned_b(13, torch.float32, False)], [0], ranks, **empty)


def test_multi_lora_segments_not_covering_every_row():
    """Rows before seg_indptr[0] get no adapter; a last bound past M is clamped to M."""
    M, K, N = 33, 13, 40
    index = {"seg_indptr": torch.tensor([2, 10, 50], device=DEVICE),
             "seg_adapter": torch.tensor([1, 3], device=DEVICE)}
    x = torch.randn(M, K, device=DEVICE)
    lora_a, lora_b = [_poisoned_a(K, torch.float32, False)], [_poisoned_b(N, torch.float32, False)]
    scalings, ranks = torch.ones(L, device=DEVICE), torch.tensor(RANKS, device=DEVICE)
    t = multi_lora_shrink(x, lora_a, scalings, ranks, **index)
    want = multi_ref.multi_lora_shrink(x.to(F64), [lora_a[0].to(F64)], scalings, ranks, **index)
    assert rel_err(t, want) <= 1e-5
    y = torch.randn(M, N, device=DEVICE)
    want_y = multi_ref.multi_lora_expand(y.to(F64), t.to(F64), [lora_b[0].to(F64)], [0], ranks, **index)
    multi_lora_expand(y, t, lora_b, [0], ranks, **index)
    assert rel_err(y, want_y) <= 1e-5


def test_multi_lora_rejects_bad_arguments():
    x = torch.randn(3, 13, device=DEVICE)
    lora_a = [_poisoned_a(13, torch.float32, False)]
    scalings, ranks = torch.ones(L, device=DEVICE), torch.tensor(RANKS, device=DEVICE)
    with pytest.raises(ValueError, match="multi_lora_shrink: needs token_adapter"):
        multi_lora_shrink(x, lora_a, scalings, ranks)
    with pytest.raises(ValueError, match=r"multi_lora_shrink: lora_a must hold 1 to 8 slices, got 9"):
        multi_lora_shrink(x, lora_a * 9, scalings, ranks,
                          token_adapter=torch.zeros(3, device=DEVICE, dtype=torch.int32))
    with pytest.raises(ValueError, match="multi_lora_expand: slice 0 spans columns 10..23 but y has 20"):
        multi_lora_expand(torch.zeros(3, 20, device=DEVICE), torch.zeros(1, 3, R_MAX, device=DEVICE),
                          [_poisoned_b(13, torch.float32, False)], [10], ranks,
                          token_adapter=torch.zeros(3, device=DEVICE, dtype=torch.int32))
