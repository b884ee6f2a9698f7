"""The dropout seed argument (lora_ops/dropout_seed.py): a Python int and the ops' seed tensor,
on the CPU or on the operands' device, pick the same mask; seed=None draws on the operands'
device; a seed tensor changed in place before backward never yields gradients of another mask;
and a bad seed is refused, naming the op and the argument."""
import numpy as np
import pytest
import torch

import lora_ops
from lora_ops.lora_linear import bwd_op, fwd_op
from tests.helpers import KERNEL_BACKENDS, backend_params

P = 0.5


def operands(device, M=8, K=24, N=16, r=4):
    gen = torch.Generator().manual_seed(3)
    t = lambda *s: torch.randn(*s, generator=gen).to(device)
    return t(M, K), t(N, K) / K ** 0.5, t(N), t(r, K) / K ** 0.5, t(N, r)


def train_step(device, backend, seed):
    """(y, dx, dA, dB) of one training call of lora_linear with dropout and this seed."""
    x, w, bias, a, b = operands(device)
    for t in (x, a, b):
        t.requires_grad_()
    y = lora_ops.lora_linear(x, w, bias, a, b, 1.5, dropout_p=P, training=True, seed=seed,
                             backend=backend)
    y.square().sum().backward()
    return y.detach(), x.grad, a.grad, b.grad


@pytest.mark.parametrize("device,backend", backend_params())
def test_int_and_tensor_seeds_pick_the_same_mask(device, backend):
    """On the CPU the launchers read a seed tensor on the host; on the operands' device the
    kernels load it (the Triton kernels in the interpreter here too, where that device is the
    CPU). Either way, and for any int64 (a negative one sets the bits the fold mixes in), the
    mask is the int's."""
    for value in (1234, -0x61C8864680B583EB):
        want = train_step(device, backend, value)
        for seed in (torch.tensor(value), torch.tensor([value]), np.int64(value),
                     torch.tensor(value, device=device), torch.tensor([value], device=device)):
            for got, expected in zip(train_step(device, backend, seed), want):
                assert torch.equal(got, expected), f"seed {seed!r}"
        for seed in (torch.tensor(value + 1), torch.tensor(value + 1, device=device)):
            assert not torch.equal(train_step(device, backend, seed)[0], want[0])


@pytest.mark.parametrize("device,backend", backend_params())
def test_seed_none_draws_from_the_generator_of_the_operands_device(device, backend):
    """seed=None draws the seed where the operands are (on a GPU then with no synchronisation,
    and inside a captured CUDA graph anew on every replay): seeding that device's generator
    repeats the mask, and a GPU call leaves the CPU generator alone."""
    torch.manual_seed(11)  # every device's generator
    first = train_step(device, backend, None)
    cpu_state = torch.get_rng_state()
    second = train_step(device, backend, None)
    assert not torch.equal(first[0], second[0]), "two calls drew the same mask"
    assert torch.equal(torch.get_rng_state(), cpu_state) == (device != "cpu")
    torch.manual_seed(11)
    for got, expected in zip(train_step(device, backend, None), first):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("device,backend", backend_params())
def test_seed_changed_in_place_before_backward_is_never_silently_used(device, backend):
    """A caller that reuses one seed tensor and advances it in place (as a training loop might)
    before the backward of the step that used it: the kernels' autograd saved it, and says it
    was modified; the reference keeps the forward's mask itself. Either way no gradient of the
    new seed's mask comes back."""
    x, w, bias, a, b = operands(device)
    a.requires_grad_()
    seed = torch.tensor(7)
    y = lora_ops.lora_linear(x, w, bias, a, b, 1.5, dropout_p=P, training=True, seed=seed,
                             backend=backend)
    seed.add_(1)
    try:
        y.square().sum().backward()
    except RuntimeError as error:
        assert "modified by an inplace operation" in str(error)
        assert backend != "reference"
        return
    torch.testing.assert_close(a.grad, train_step(device, backend, 7)[2], rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("seed,error,match", [
    (torch.tensor(3.0), ValueError, "lora_linear: seed must have dtype int64, got torch.float32"),
    (torch.tensor([3, 4]), ValueError, r"lora_linear: seed must hold one value, got shape \[2\]"),
    (torch.tensor(3, device="meta"), ValueError,
     r"lora_linear: seed must be a CPU tensor or on x's device \((cpu|cuda:0)\), got one on meta"),
    (3.5, TypeError, "lora_linear: seed must be an int, a one-element int64 tensor or None, "
                     "got float"),
], ids=["float", "two-values", "meta", "python-float"])
def test_bad_seed_is_refused_by_lora_linear(device, backend, seed, error, match):
    x, w, bias, a, b = operands(device)
    with pytest.raises(error, match=match):
        lora_ops.lora_linear(x, w, bias, a, b, 1.0, dropout_p=P, training=True, seed=seed,
                             backend=backend)


@pytest.mark.parametrize("device,backend", backend_params(KERNEL_BACKENDS))
def test_bad_seed_is_refused_by_the_ops(device, backend):
    """Other frameworks calling the ops directly: the same checks, in the op (the C++ ops in
    csrc/torch_common.cpp; the Triton ones in Python), and in their fake kernels for a seed that
    would send the call there."""
    x, w, bias, a, b = operands(device)
    fwd = lambda seed, p=P: fwd_op(backend)(x, w, bias, a, b, 1.0, p, seed)
    name = fwd_op(backend).__name__.split(".")[0]
    with pytest.raises(ValueError, match=f"{name}: dropout_p is 0.5 but seed is None; dropout "
                                         f"needs a seed"):
        fwd(None)
    with pytest.raises(ValueError, match=f"{name}: seed must have dtype int64, got"):
        fwd(torch.tensor(3, dtype=torch.int32))
    with pytest.raises(ValueError, match=f"{name}: seed must hold one value, got shape"):
        fwd(torch.tensor([3, 4]))
    with pytest.raises(ValueError, match=f"{name}: seed must be a CPU tensor or on x's device "
                                         r"\((cpu|cuda:0)\), got one on meta"):
        fwd(torch.tensor(3, device="meta"))
    fwd(None, p=0.0)  # no dropout, no seed needed
    _, s = fwd(torch.tensor(5))
    assert torch.equal(fwd(torch.tensor(5, device=device))[1], s)
    bwd_name = bwd_op(backend).__name__.split(".")[0]
    with pytest.raises(ValueError, match=f"{bwd_name}: dropout_p is 0.5 but seed is None"):
        bwd_op(backend)(torch.randn_like(x @ w.t()), x, w, a, b, s, 1.0, P, None,
                        [True, True, True])


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_seed_on_a_gpu_with_operands_on_the_cpu_is_refused(backend):
    """The one seed device the rule refuses besides meta: a GPU while x is on the CPU. The
    dispatcher sends such a call to the CUDA kernels, whose checks must name the seed before
    anything touches x as if it were on the GPU."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    x, w, bias, a, b = operands("cpu")
    with pytest.raises(ValueError, match=r"seed must be a CPU tensor or on x's device \(cpu\), "
                                         r"got one on cuda:0"):
        fwd_op(backend)(x, w, bias, a, b, 1.0, P, torch.tensor(3, device="cuda"))
    with pytest.raises(ValueError, match=r"lora_linear: seed must be a CPU tensor or on x's "
                                         r"device \(cpu\), got one on cuda:0"):
        lora_ops.lora_linear(x, w, bias, a, b, 1.0, dropout_p=P, training=True,
                             seed=torch.tensor(3, device="cuda"), backend="cpu")
