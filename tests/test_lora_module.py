"""LoRALinear: a drop-in for nn.Linear, PEFT's parameter names, merge and unmerge."""
import pytest
import torch
from torch import nn

import lora_ops
from tests.helpers import assert_rounded_once, backend_params


def test_from_linear_shares_weight_freezes_base_and_starts_equal():
    base = nn.Linear(20, 12)
    layer = lora_ops.LoRALinear.from_linear(base, r=4, lora_alpha=16)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_A.weight.requires_grad and layer.lora_B.weight.requires_grad
    assert layer.scaling == 4.0
    x = torch.randn(3, 7, 20)
    torch.testing.assert_close(layer(x), base(x))
    assert layer.lora_A.weight.abs().sum() > 0 and layer.lora_B.weight.abs().sum() == 0


def test_state_dict_names_match_peft():
    layer = lora_ops.LoRALinear(10, 6, r=2)
    sd = layer.state_dict()
    assert set(sd) == {"weight", "bias", "lora_A.weight", "lora_B.weight"}
    assert sd["lora_A.weight"].shape == (2, 10) and sd["lora_B.weight"].shape == (6, 2)


def test_rslora_scaling():
    assert lora_ops.LoRALinear(8, 8, r=16, lora_alpha=8, use_rslora=True).scaling == 2.0


@pytest.mark.parametrize("use_rslora, scaling", [(False, 1.0), (True, 4.0)])
def test_lora_alpha_defaults_to_r(use_rslora, scaling):
    """lora_alpha=None means r (as inject documents): scaling 1, or sqrt(r) with rsLoRA."""
    layer = lora_ops.LoRALinear(8, 8, r=16, use_rslora=use_rslora)
    assert layer.lora_alpha == 16 and layer.scaling == scaling
    layer = lora_ops.LoRALinear.from_linear(nn.Linear(8, 8), r=16, use_rslora=use_rslora)
    assert layer.lora_alpha == 16 and layer.scaling == scaling


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=str)
def test_merge_unmerge_round_trip(dtype, tol):
    layer = lora_ops.LoRALinear(32, 24, r=4, lora_alpha=8, dtype=dtype)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(5, 32, dtype=dtype)
    w0 = layer.weight.detach().clone()
    y = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), y, rtol=tol, atol=tol)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, w0, rtol=tol, atol=tol)
    torch.testing.assert_close(layer(x), y, rtol=tol, atol=tol)


def test_merge_and_unmerge_twice_change_the_weight_once():
    """merge on a merged layer and unmerge on an unmerged one do nothing: the adapter is never
    folded in twice, nor taken out of a weight that does not hold it."""
    layer = lora_ops.LoRALinear(32, 24, r=4, lora_alpha=8)
    nn.init.normal_(layer.lora_B.weight)
    w0 = layer.weight.detach().clone()
    x = torch.randn(5, 32)
    y = layer(x)
    layer.unmerge()
    assert not layer.merged and torch.equal(layer.weight, w0)
    layer.merge()
    merged = layer.weight.detach().clone()
    layer.merge()
    assert layer.merged and torch.equal(layer.weight, merged)
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.weight, w0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_delta_weight_is_computed_in_fp32_and_rounded_once(dtype):
    """scaling * B A in the base weight's dtype, from an fp32 product: one rounding, not one
    for B A and another for the scaling (alpha / r = 0.75 is not a power of two)."""
    layer = lora_ops.LoRALinear(64, 48, r=4, lora_alpha=3, dtype=dtype)
    nn.init.normal_(layer.lora_B.weight)
    delta = layer.delta_weight()
    assert delta.dtype == dtype
    exact = 0.75 * (layer.lora_B.weight.double() @ layer.lora_A.weight.double())
    assert_rounded_once(delta, exact, "delta_weight")


def test_to_linear_is_plain_linear_with_adapter_folded_in():
    layer = lora_ops.LoRALinear(16, 8, r=2)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(4, 16)
    y = layer(x)
    linear = layer.to_linear()
    assert type(linear) is nn.Linear
    torch.testing.assert_close(linear(x), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device,backend", backend_params())
def test_training_reduces_loss_and_only_adapter_changes(device, backend):
    torch.manual_seed(0)
    layer = lora_ops.LoRALinear(16, 8, r=4, lora_dropout=0.1, device=device, backend=backend)
    w0 = layer.weight.detach().clone()
    target = nn.Linear(16, 8, device=device)
    x = torch.randn(64, 16, device=device)
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    losses = []
    for _ in range(30):
        loss = (layer(x) - target(x).detach()).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    assert torch.equal(layer.weight, w0)


def test_low_precision_base_with_fp32_adapter():
    base = nn.Linear(16, 8).to(torch.bfloat16)
    layer = lora_ops.LoRALinear.from_linear(base, r=2)
    layer.lora_A.float()
    layer.lora_B.float()
    nn.init.normal_(layer.lora_B.weight)
    y = layer(torch.randn(3, 16, dtype=torch.bfloat16))
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and layer.lora_B.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("fp32", ["lora_A", "lora_B"])
def test_one_adapter_matrix_in_another_dtype_than_the_base(fp32):
    """Each adapter matrix is cast to the base's dtype on its own: one kept in fp32 next to a
    bf16 one on a bf16 base works as both in fp32 do, its gradient in its own dtype."""
    torch.manual_seed(0)
    base = nn.Linear(16, 8).to(torch.bfloat16)
    layer = lora_ops.LoRALinear.from_linear(base, r=2, lora_alpha=4)
    nn.init.normal_(layer.lora_B.weight)
    getattr(layer, fp32).float()
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    y = layer(x)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16
    assert getattr(layer, fp32).weight.grad.dtype == torch.float32
    a, b = layer.lora_A.weight.double(), layer.lora_B.weight.double()
    want = x.double() @ base.weight.double().t() + base.bias.double() + 2.0 * (x.double() @ a.t()) @ b.t()
    torch.testing.assert_close(y.double(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("kwargs, message", [
    ({"r": 0}, "r must be a positive int"),
    ({"r": 2.0}, "r must be a positive int"),
    ({"r": 2, "lora_alpha": float("nan")}, "lora_alpha must be a positive number"),
    ({"r": 2, "lora_alpha": float("inf")}, "lora_alpha must be a positive number"),
    ({"r": 2, "lora_alpha": "16"}, "lora_alpha must be a positive number"),
    ({"r": 2, "lora_dropout": 1.0}, "lora_dropout must be a number in"),
    ({"r": True}, "r must be a positive int"),
    ({"r": 2, "lora_alpha": 0}, "lora_alpha must be a positive number"),
    ({"r": 2, "lora_alpha": True}, "lora_alpha must be a positive number"),
    ({"r": 2, "lora_dropout": -0.1}, "lora_dropout must be a number in"),
], ids=["r0", "r-float", "alpha-nan", "alpha-inf", "alpha-str", "dropout-1", "r-bool", "alpha-0",
        "alpha-bool", "dropout-negative"])
def test_bad_hyper_parameters_name_the_module_and_argument(kwargs, message):
    with pytest.raises(ValueError, match=f"LoRALinear: {message}"):
        lora_ops.LoRALinear.from_linear(nn.Linear(8, 4), **kwargs)


def test_parametrized_or_replaced_weights_are_the_ones_used():
    """forward reads parameters from the modules' parameter dicts for speed; a parametrization
    (which moves one out of the dict) or a tensor put in a parameter's place must still be what
    the layer computes with."""
    torch.manual_seed(0)
    layer = lora_ops.LoRALinear(16, 12, r=4, lora_alpha=8)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(5, 16)

    class Doubled(nn.Module):
        def forward(self, w):
            return 2 * w

    nn.utils.parametrize.register_parametrization(layer.lora_A, "weight", Doubled())
    a = 2 * layer.lora_A.parametrizations.weight.original
    want = x @ layer.weight.t() + layer.bias + layer.scaling * (x @ a.t()) @ layer.lora_B.weight.t()
    torch.testing.assert_close(layer(x), want)
    frozen_b = torch.randn(12, 4)
    del layer.lora_B.weight
    layer.lora_B.weight = frozen_b  # a plain tensor, no longer a parameter
    want = x @ layer.weight.t() + layer.bias + layer.scaling * (x @ a.t()) @ frozen_b.t()
    torch.testing.assert_close(layer(x), want)
