"""LoRALinear: a drop-in for nn.Linear, PEFT's parameter names, merge and unmerge."""
import pytest
import torch
from torch import nn

import lora_ops
from tests.helpers import backend_params


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


@pytest.mark.parametrize("kwargs, message", [
    ({"r": 0}, "r must be a positive int"),
    ({"r": 2.0}, "r must be a positive int"),
    ({"r": 2, "lora_alpha": float("nan")}, "lora_alpha must be a positive number"),
    ({"r": 2, "lora_alpha": float("inf")}, "lora_alpha must be a positive number"),
    ({"r": 2, "lora_alpha": "16"}, "lora_alpha must be a positive number"),
    ({"r": 2, "lora_dropout": 1.0}, "lora_dropout must be a number in"),
], ids=["r0", "r-float", "alpha-nan", "alpha-inf", "alpha-str", "dropout-1"])
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
