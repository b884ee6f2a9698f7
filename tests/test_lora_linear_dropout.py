"""Dropout on the adapter path: seeded, the same mask on every backend, unbiased, exact in backward."""
import importlib

import pytest
import torch

import lora_ops
from lora_ops import reference
from tests.helpers import backend_params


def operands(device, M=8, K=24, N=16, r=4):
    x = torch.randn(M, K, device=device)
    w = torch.randn(N, K, device=device) / K ** 0.5
    a = torch.randn(r, K, device=device) / K ** 0.5
    b = torch.randn(N, r, device=device)
    return x, w, torch.randn(N, device=device), a, b


@pytest.mark.parametrize("device,backend", backend_params())
def test_same_seed_same_result_other_seed_other_result(device, backend):
    x, w, bias, a, b = operands(device)
    run = lambda seed: lora_ops.lora_linear(x, w, bias, a, b, 1.0, dropout_p=0.5, training=True,
                                            seed=seed, backend=backend)
    assert torch.equal(run(11), run(11))
    assert not torch.allclose(run(11), run(12))


@pytest.mark.parametrize("device,backend", backend_params())
def test_eval_mode_has_no_dropout(device, backend):
    x, w, bias, a, b = operands(device)
    y_eval = lora_ops.lora_linear(x, w, bias, a, b, 1.0, dropout_p=0.5, training=False, backend=backend)
    y_nodrop = lora_ops.lora_linear(x, w, bias, a, b, 1.0, backend=backend)
    torch.testing.assert_close(y_eval, y_nodrop)


@pytest.mark.parametrize("device,backend", backend_params())
def test_mask_is_the_reference_mask(device, backend):
    """With W = 0, b = 0 and B = I the output is drop(x) A^T: it equals the reference's mask
    applied to x, which it could not if the backend drew another mask."""
    M, K, r = 16, 40, 40
    x = torch.randn(M, K, device=device)
    a = torch.eye(K, device=device)
    out = lora_ops.lora_linear(x, torch.zeros(r, K, device=device), None, a, torch.eye(r, device=device),
                               1.0, dropout_p=0.25, training=True, seed=2024, backend=backend)
    keep = reference.dropout_keep_mask(2024, M, K, 0.25).to(device)
    torch.testing.assert_close(out, torch.where(keep, x / 0.75, 0.0), rtol=1e-5, atol=1e-5)
    frac = 1 - keep.float().mean().item()
    assert 0.1 < frac < 0.4


def test_mean_over_seeds_matches_no_dropout():
    x, w, bias, a, b = operands("cpu", M=4, K=32, N=8, r=4)
    w, bias = torch.zeros_like(w), None
    n = 800
    ys = torch.stack([lora_ops.lora_linear(x, w, bias, a, b, 1.0, dropout_p=0.3, training=True, seed=s)
                      for s in range(n)])
    exact = lora_ops.lora_linear(x, w, bias, a, b, 1.0)
    # The standard error of the mean over n masks bounds the deviation of a fair dropout.
    sem = ys.std(0) / n ** 0.5
    assert ((ys.mean(0) - exact).abs() <= 5 * sem + 1e-6).all()
    assert (ys.std(0) > 0).all()


@pytest.mark.parametrize("device,backend", backend_params())
def test_backward_matches_explicit_mask(device, backend):
    M, K, N, r, p, seed = 6, 20, 12, 3, 0.4, 99
    x, w, bias, a, b = operands(device, M, K, N, r)
    keep = reference.dropout_keep_mask(seed, M, K, p).to(device)

    def explicit(x, a, b):
        dropped = torch.where(keep, x / (1 - p), 0.0)
        return x @ w.t() + bias + 0.5 * (dropped @ a.t()) @ b.t()

    dy = torch.randn(M, N, device=device)
    grads = []
    for fn in (lambda x, a, b: lora_ops.lora_linear(x, w, bias, a, b, 0.5, dropout_p=p, training=True,
                                                     seed=seed, backend=backend), explicit):
        leaves = [t.clone().requires_grad_(True) for t in (x, a, b)]
        fn(*leaves).backward(dy)
        grads.append([t.grad for t in leaves])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device,backend", backend_params())
def test_element_on_the_threshold_is_kept_on_every_backend(device, backend):
    """An element is dropped where the top 24 bits of its hash fall *below* the threshold
    round(p * 2**24) (lora_ops/reference/dropout.py; dropout_hash.h for the kernels). With p
    chosen so that the threshold equals one element's hash bits, that element is kept, and
    every backend's mask is still the reference's, boundary included."""
    from lora_ops.reference.dropout import _MASK32, _mix32
    M, K, seed = 16, 40, 2024
    r = torch.arange(M, dtype=torch.int64).unsqueeze(1)
    c = torch.arange(K, dtype=torch.int64).unsqueeze(0)
    top = _mix32((_mix32(r ^ reference.seed32(seed)) + c) & _MASK32) >> 8
    on_edge = ((top >= 2**22) & (top <= 2**23)).nonzero()[0].tolist()  # p in [0.25, 0.5]
    threshold = int(top[on_edge[0], on_edge[1]])
    p = threshold / 2**24  # exact: reference.dropout_threshold(p) == threshold
    assert reference.dropout_threshold(p) == threshold
    keep = reference.dropout_keep_mask(seed, M, K, p)
    assert keep[on_edge[0], on_edge[1]], "an element whose hash bits equal the threshold was dropped"
    assert torch.equal(keep, top >= threshold)
    x = torch.randn(M, K, device=device)
    out = lora_ops.lora_linear(x, torch.zeros(K, K, device=device), None, torch.eye(K, device=device),
                               torch.eye(K, device=device), 1.0, dropout_p=p, training=True, seed=seed,
                               backend=backend)
    torch.testing.assert_close(out, torch.where(keep.to(device), x / (1 - p), 0.0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device,backend", backend_params())
def test_any_python_int_seed_picks_the_mask_by_its_low_64_bits(device, backend):
    """Seeds beyond int64 (a hash, say) work on every backend: the ops take int64 seeds, and
    lora_linear passes the low 64 bits, which are all the mask depends on."""
    x, w, bias, a, b = operands(device)
    run = lambda seed: lora_ops.lora_linear(x, w, bias, a, b, 1.0, dropout_p=0.5, training=True,
                                            seed=seed, backend=backend)
    for seed, same in ((2**64 + 5, 5), (2**64 - 1, -1), (-2**70 + 3, 3),
                       (2**63, -2**63), (-2**63 - 1, 2**63 - 1)):  # either side of int64
        assert torch.equal(run(seed), run(same))
        want = reference.lora_linear(x.double(), w.double(), bias.double(), a.double(), b.double(),
                                     1.0, dropout_p=0.5, seed=seed)
        torch.testing.assert_close(run(seed).double(), want, rtol=1e-4, atol=1e-4)


def test_cpu_seed_tensor_is_refused_under_cuda_graph_capture(monkeypatch):
    """The refusal's wiring, with capture simulated (tests/test_lora_linear_cuda.py captures for
    real on a GPU): a CPU seed tensor with dropout under capture raises, since it is read on the
    host as the graph is captured, not as it is replayed; seed=None (drawn on the operands'
    device, in the graph), an int seed, eval mode or p = 0 do not."""
    module = importlib.import_module("lora_ops.lora_linear")  # the package's name is the function
    x, w, bias, a, b = operands("cpu")
    monkeypatch.setattr(module, "_capturing_cuda_graph", lambda x: True)
    with pytest.raises(RuntimeError, match=r"^lora_linear: dropout \(p=0.5\) with a CPU seed tensor under"):
        lora_ops.lora_linear(x, w, bias, a, b, 1.0, dropout_p=0.5, training=True, seed=torch.tensor(3))
    for kwargs in (dict(seed=None, training=True), dict(seed=3, training=True), dict(training=False),
                   dict(dropout_p=0.0, training=True)):
        lora_ops.lora_linear(x, w, bias, a, b, 1.0, **{"dropout_p": 0.5, **kwargs})
