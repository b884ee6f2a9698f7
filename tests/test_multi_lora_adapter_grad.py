"""lora_ops::multi_lora_adapter_grad, the per-adapter weight gradients of the multi-adapter layer
(dA = dT^T x, dB = dY^T T per adapter): against a float64 loop over the tokens, in every dtype,
both index forms, odd sizes, ranks below r_max, idle and out-of-range tokens, pools larger than
the batch; its errors; opcheck. End to end it is covered by the layer's gradient tests in
test_multi_lora_ops.py, which run through it on CPU."""
import pytest
import torch

from lora_ops import multi_lora
from tests.helpers import DTYPES, backend_params
from tests.test_multi_lora_ops import runs_as_segments

COMPILED = backend_params(("cpu",), devices=("cpu", "cuda"))
op = getattr(torch.ops.lora_ops, "multi_lora_adapter_grad", None)  # None without the compiled library
needs_op = pytest.mark.skipif(op is None, reason="the compiled library is not built")


def loop_grad(u, v, adapter, ranks, rank_dim):
    """float64 [L, P, Q]: for each adapter a, sum over its tokens of u_i^T v_i, zero past its rank."""
    L = ranks.shape[0]
    out = torch.zeros(L, u.shape[1], v.shape[1], dtype=torch.float64)
    u64, v64 = u.double().cpu(), v.double().cpu()
    for i, a in enumerate(adapter.tolist()):
        if 0 <= a < L:
            out[a] += u64[i][:, None] * v64[i][None, :]
    for a, r in enumerate(ranks.tolist()):
        if rank_dim == 1:
            out[a, r:] = 0
        else:
            out[a, :, r:] = 0
    return out


def problem(M, L, P, Q, rank_dim, dtype, device, seed=0):
    """u, v (one of them fp32, the other `dtype`; the rank side fp32 as dT and T are) and an
    adapter per token with idle (-1) and out-of-range (L) tokens; NaN past each rank on the rank
    side, which must never be read."""
    gen = torch.Generator().manual_seed(seed)
    r_max = P if rank_dim == 1 else Q
    ranks = torch.randint(0, r_max + 1, (L,), generator=gen, dtype=torch.int32)
    if L:
        ranks[0] = r_max
    adapter = torch.randint(-1, L + 1, (M,), generator=gen, dtype=torch.int32)
    rank_side = torch.randn(M, r_max, generator=gen)
    wide = torch.randn(M, (Q if rank_dim == 1 else P) + 3, generator=gen).to(dtype)[:, 2:-1]
    assert not wide.is_contiguous() or M <= 1  # a column slice, as dY_s is
    adapter_of = adapter.clamp(-1, L)  # L (out of range) is idle: no rank
    for i, a in enumerate(adapter_of.tolist()):
        if 0 <= a < L:
            rank_side[i, ranks[a]:] = float("nan")
    rank_side = torch.nan_to_num(rank_side, nan=0.0) if device == "cuda" else rank_side
    u, v = (rank_side, wide) if rank_dim == 1 else (wide, rank_side)
    return u.to(device), v.to(device), ranks.to(device), adapter.to(device)


def index_args(adapter, L, form):
    if form == "token":
        return adapter, None, None
    indptr, seg_adapter = runs_as_segments(adapter.cpu())
    return None, indptr.to(adapter.device), seg_adapter.to(adapter.device)


@pytest.mark.parametrize("device,backend", COMPILED)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rank_dim", [1, 2])
@pytest.mark.parametrize("M,L,form", [(0, 3, "token"), (1, 3, "token"), (37, 5, "token"),
                                      (37, 5, "segment"), (9, 40, "token"), (300, 2, "segment")])
def test_matches_a_loop_over_tokens(device, backend, dtype, rank_dim, M, L, form):
    P, Q = (13, 21) if rank_dim == 1 else (21, 13)
    u, v, ranks, adapter = problem(M, L, P, Q, rank_dim, dtype, device, seed=M + L)
    got = op(u, v, ranks, rank_dim, *index_args(adapter, L, form))
    assert got.dtype == torch.float32 and got.shape == (L, P, Q) and got.device == u.device
    u_q, v_q = torch.nan_to_num(u.double()), torch.nan_to_num(v.double())  # rounded as given
    want = loop_grad(u_q, v_q, adapter.cpu(), ranks.cpu(), rank_dim)
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-5)
    # In the parameters' dtype: the same fp32 sums, rounded once.
    in_dtype = op(u, v, ranks, rank_dim, *index_args(adapter, L, form), dtype=dtype)
    assert in_dtype.dtype == dtype
    torch.testing.assert_close(in_dtype, got.to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", COMPILED)
def test_ranks_equal_r_max_and_sorted_tokens_read_in_place(device, backend):
    """Tokens sorted by adapter (each adapter's rows consecutive, read in place) and unsorted
    (gathered) give the same sums, and a rank of r_max computes every row."""
    gen = torch.Generator().manual_seed(1)
    M, L, r = 64, 4, 16
    adapter = torch.randint(0, L, (M,), generator=gen, dtype=torch.int32)
    dt = torch.randn(M, r, generator=gen)
    x = torch.randn(M, 40, generator=gen)
    ranks = torch.full((L,), r, dtype=torch.int32)
    order = torch.argsort(adapter, stable=True)
    args = [t.to(device) for t in (dt, x, ranks, adapter)]
    sorted_args = [t.to(device) for t in (dt[order], x[order], ranks, adapter[order])]
    unsorted = op(*args[:3], 1, args[3])
    in_place = op(*sorted_args[:3], 1, sorted_args[3])
    torch.testing.assert_close(unsorted, in_place, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(unsorted.double().cpu(), loop_grad(dt, x, adapter, ranks, 1),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device,backend", COMPILED)
@pytest.mark.parametrize("rank_dim", [1, 2])
def test_transposed_operands_give_what_their_copies_give(device, backend, rank_dim):
    """u and v as transposed views (column stride M, as an x saved by the layer can be): the op
    reads them as the contiguous tensors they equal."""
    P, Q = (13, 21) if rank_dim == 1 else (21, 13)
    u, v, ranks, adapter = problem(37, 5, P, Q, rank_dim, torch.float32, device, seed=3)
    u_t, v_t = (w.t().contiguous().t() for w in (u, v))
    assert u_t.stride(1) != 1 and v_t.stride(1) != 1
    got = op(u_t, v_t, ranks, rank_dim, adapter)
    torch.testing.assert_close(got, op(u.contiguous(), v.contiguous(), ranks, rank_dim, adapter),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device,backend", backend_params(("cpu",), devices=("cpu",)))
def test_errors_name_the_op_argument_and_what_was_seen(device, backend):
    u, v, ranks, adapter = problem(6, 3, 4, 5, 1, torch.float32, device)
    u = torch.nan_to_num(u)
    name = "multi_lora_adapter_grad"
    cases = [
        ((u.half(), v.half(), ranks, 1, adapter), r"one of u and v must be float32, got u Half and v Half"),
        ((u, v, ranks, 3, adapter), r"rank_dim must be 1 .* or 2 .*, got 3"),
        ((u, v[:5], ranks, 1, adapter), r"v has size 5 in dim 0 but u's row count is 6"),
        ((u, v, ranks + 4, 1, adapter), r"ranks must lie in \[0, r_max=4\]"),
        ((u[0], v, ranks, 1, adapter), r"u must be 2-D"),
        ((u, v.double(), ranks, 1, adapter), r"v"),
        ((u, v, ranks, 1, adapter[:5]), r"token_adapter must have shape \[6\]"),
        ((u, v, ranks, 1), r"give exactly one index form"),
    ]
    with pytest.raises(ValueError, match=f"{name}: dtype must be float32 or the dtype of u or v, got BFloat16"):
        op(u, v, ranks, 1, adapter, dtype=torch.bfloat16)
    for args, pattern in cases:
        with pytest.raises(ValueError, match=f"{name}: {pattern}"):
            op(*args)


@pytest.mark.parametrize("device,backend", COMPILED)
@pytest.mark.parametrize("form", ["token", "segment"])
def test_opcheck(device, backend, form):
    u, v, ranks, adapter = problem(7, 3, 4, 6, 2, torch.float32, device)
    v = torch.nan_to_num(v)
    torch.library.opcheck(op, (u, v, ranks, 2, *index_args(adapter, 3, form)))
    torch.library.opcheck(op, (u, v.half(), ranks, 2, *index_args(adapter, 3, form)),
                          {"dtype": torch.float16})


@needs_op
@pytest.mark.parametrize("rank_dim", [1, 2])
def test_the_cuda_composition_on_cpu_matches_the_kernel(rank_dim):
    """The op's CUDA kernel is plain torch (gram_plan): run on CPU tensors, NaN past each rank
    included, it gives the C++ kernel's result."""
    P, Q = (13, 21) if rank_dim == 1 else (21, 13)
    u, v, ranks, adapter = problem(37, 5, P, Q, rank_dim, torch.bfloat16, "cpu", seed=3)
    want = op(u, v, ranks, rank_dim, adapter)
    got = multi_lora._composed_adapter_grad(u, v, ranks, rank_dim, adapter)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    composed = multi_lora._composed_adapter_grad(u, v, ranks, rank_dim, adapter, dtype=torch.bfloat16)
    torch.testing.assert_close(composed, op(u, v, ranks, rank_dim, adapter, dtype=torch.bfloat16))


@pytest.mark.parametrize("device,backend", backend_params(("cpu",), devices=("cuda",)))
def test_cuda_composition_matches_the_cpu_kernel(device, backend):
    """On CUDA the op is composed of ATen ops (gram_plan); the CPU kernel is the C++ GEMM."""
    u, v, ranks, adapter = problem(50, 6, 16, 33, 1, torch.bfloat16, "cpu")
    u = torch.nan_to_num(u)
    want = op(u, v, ranks, 1, adapter)
    got = op(u.cuda(), v.cuda(), ranks.cuda(), 1, adapter.cuda())
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)


@needs_op
def test_the_planned_gradients_of_the_python_backward_match_the_op():
    """The Python backward (CUDA, Triton) computes every slice's dA and dB from one shared gram
    plan; the C++ backward for CPU tensors calls the op once per slice and factor."""
    gen = torch.Generator().manual_seed(2)
    M, L, K, widths, r = 23, 4, 11, (5, 7), 3
    adapter = torch.randint(-1, L, (M,), generator=gen, dtype=torch.int32)
    ranks = torch.tensor([3, 1, 0, 2], dtype=torch.int32)
    x = torch.randn(M, K, generator=gen)
    dy = torch.randn(M, sum(widths), generator=gen)
    dy_slices = [dy[:, :widths[0]], dy[:, widths[0]:]]
    within = torch.arange(r)[None, :] < ranks[adapter.clamp(min=0).long()][:, None]
    dts = [torch.randn(M, r, generator=gen) * within for _ in widths]
    t = torch.stack([torch.randn(M, r, generator=gen) * within for _ in widths])
    need = [True, True]
    d_a, d_b = multi_lora._planned_adapter_grads(x, dy_slices, dts, t, ranks, (adapter, None, None),
                                                 need, need)
    for s in range(len(widths)):
        torch.testing.assert_close(d_a[s], op(dts[s], x, ranks, 1, adapter), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(d_b[s], op(dy_slices[s], t[s], ranks, 2, adapter),
                                   rtol=1e-5, atol=1e-5)
