"""torch.func transforms (grad, vmap, jvp, hessian) over the public functions and modules.

Under a transform every call runs on the reference (lora_ops/_backend.py says why); these tests
hold what the transforms compute to what the kernels compute eagerly, so they would catch a
transform that ran anything else, and check that calls outside transforms still run the kernels.
"""
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, hessian, jvp, vmap

import lora_ops
from tests.helpers import KERNEL_BACKENDS, backend_params

M, K, N, R, P, SEED = 5, 16, 12, 4, 0.3, 11


def make_layer(device, backend):
    torch.manual_seed(0)
    layer = lora_ops.LoRALinear.from_linear(nn.Linear(K, N, device=device), r=R, lora_alpha=8,
                                            lora_dropout=P, backend=backend)
    nn.init.normal_(layer.lora_B.weight)
    return layer.train()


def adapter_params(layer):
    return {k: v.detach() for k, v in layer.named_parameters() if v.requires_grad}


def loss_of(layer):
    return lambda params, x: functional_call(layer, params, (x,), {"seed": SEED}).square().sum()


@pytest.mark.parametrize("device,backend", backend_params(KERNEL_BACKENDS))
def test_grad_matches_the_kernels_autograd(device, backend):
    layer = make_layer(device, backend)
    x = torch.randn(M, K, device=device)
    got = grad(loss_of(layer))(adapter_params(layer), x)
    layer(x, seed=SEED).square().sum().backward()
    for name, p in layer.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device,backend", backend_params(KERNEL_BACKENDS))
def test_per_sample_gradients(device, backend):
    """vmap(grad): each row's gradient, as the kernels give it for that row alone."""
    layer = make_layer(device, backend)
    x = torch.randn(M, K, device=device)
    per_row = lambda params, row: loss_of(layer)(params, row[None])
    got = vmap(grad(per_row), in_dims=(None, 0))(adapter_params(layer), x)
    for i in range(M):
        layer.zero_grad()
        layer(x[i:i + 1], seed=SEED).square().sum().backward()
        for name, p in layer.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(got[name][i], p.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device,backend", backend_params(KERNEL_BACKENDS))
def test_jvp_is_the_change_of_the_kernels_output(device, backend):
    """y is linear in lora_a and in lora_b (the mask fixed by the seed), so the forward-mode
    derivative along T equals y(B + T) - y(B), both from the kernels."""
    layer = make_layer(device, backend)
    x = torch.randn(M, K, device=device)
    w, bias, a, b = (t.detach() for t in (layer.weight, layer.bias, layer.lora_A.weight, layer.lora_B.weight))
    run = lambda a, b: lora_ops.lora_linear(x, w, bias, a, b, layer.scaling, dropout_p=P,
                                            training=True, seed=SEED, backend=backend)
    ta, tb = torch.randn_like(a), torch.randn_like(b)
    _, along_b = jvp(lambda b: run(a, b), (b,), (tb,))
    _, along_a = jvp(lambda a: run(a, b), (a,), (ta,))
    torch.testing.assert_close(along_b, run(a, b + tb) - run(a, b), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(along_a, run(a + ta, b) - run(a, b), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device,backend", backend_params(KERNEL_BACKENDS))
def test_hessian_is_exact(device, backend):
    """loss = |y|^2 with y = J vec(A) + c (linear in A): the Hessian in A is 2 J^T J, J read off
    the kernels' outputs column by column."""
    layer = make_layer(device, backend)
    x = torch.randn(M, K, device=device)
    w, bias, a, b = (t.detach() for t in (layer.weight, layer.bias, layer.lora_A.weight, layer.lora_B.weight))
    run = lambda a: lora_ops.lora_linear(x, w, bias, a, b, layer.scaling, dropout_p=P,
                                         training=True, seed=SEED, backend=backend)
    got = hessian(lambda a: run(a).square().sum())(a).reshape(a.numel(), a.numel())
    zero = torch.zeros_like(a)
    base = run(zero)
    jac = torch.stack([(run(e.reshape(a.shape)) - base).flatten()
                       for e in torch.eye(a.numel(), device=device)], dim=1)
    torch.testing.assert_close(got, 2 * jac.t() @ jac, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("device,backend", backend_params(KERNEL_BACKENDS))
def test_multi_lora_grad_of_x(device, backend):
    torch.manual_seed(0)
    layer = lora_ops.MultiLoRALinear.from_linear(nn.Linear(K, N, device=device), max_adapters=3,
                                                 max_rank=8, backend=backend)
    layer.add_adapter("a", torch.randn(4, K), torch.randn(N, 4), 2.0)
    layer.add_adapter("b", torch.randn(8, K), torch.randn(N, 8), 0.5)
    x = torch.randn(M, K, device=device)
    names = ["a", "b", None, "b", "a"]
    got = grad(lambda x: layer(x, names).square().sum())(x)
    x.requires_grad_()
    layer(x, names).square().sum().backward()
    torch.testing.assert_close(got, x.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device,backend", backend_params(("cuda", "cpu")))
def test_kernels_run_outside_transforms_and_the_reference_inside(device, backend):
    layer = make_layer(device, backend)
    x = torch.randn(M, K, device=device)

    def ops_called(fn):
        with torch.profiler.profile() as prof:
            fn()
        return {e.name for e in prof.events() if e.name.startswith("lora_ops::")}

    assert "lora_ops::lora_linear_fwd" in ops_called(lambda: layer(x))
    assert not ops_called(lambda: grad(loss_of(layer))(adapter_params(layer), x))
