"""Equivalence with real PEFT: a model holding several PEFT LoRA adapters, run on a mixed batch
with `adapter_names=[...]`, against the same model whose layers are MultiLoRALinear fed the very
same adapter tensors (run under mixed_batch). Both per-row (2-D) and per-sequence (3-D) batches."""
import copy

import pytest
import torch
from torch import nn

from lora_ops.multi_lora_module import MultiLoRALinear, mixed_batch
from tests.helpers import backend_params

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora.layer import Linear as PeftLoraLinear  # noqa: E402

BACKENDS = backend_params(("cuda", "cpu", "reference"), devices=("cpu",)) + \
    backend_params(("cuda", "triton"), devices=("cuda",))


def to_multi_lora(peft_model: nn.Module, base: nn.Module, max_rank: int, backend) -> nn.Module:
    """`base` (an untouched copy of the model PEFT wrapped) with every PEFT LoRA layer replaced
    by a MultiLoRALinear holding that layer's adapters, tensors passed as PEFT keeps them."""
    for name, module in peft_model.named_modules():
        if not isinstance(module, PeftLoraLinear):
            continue
        parent_name, _, child = name.removeprefix("base_model.model.").rpartition(".")
        parent = base.get_submodule(parent_name)
        layer = MultiLoRALinear.from_linear(getattr(parent, child), max_adapters=4,
                                            max_rank=max_rank, backend=backend)
        for adapter in module.lora_A:
            layer.add_adapter(adapter, module.lora_A[adapter].weight, module.lora_B[adapter].weight,
                              module.scaling[adapter])
        setattr(parent, child, layer)
    return base


def add_adapters(model: nn.Module, configs: dict) -> nn.Module:
    names = list(configs)
    peft_model = get_peft_model(model, configs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, configs[name])
    return peft_model.eval()


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 12)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def lora(r, alpha, targets, **kw):
    # init_lora_weights=False: random B too, so every adapter changes the output.
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, **kw)


@pytest.mark.parametrize("device,backend", BACKENDS)
@torch.no_grad()
def test_mixed_rows_match_peft(device, backend):
    torch.manual_seed(0)
    base = MLP().to(device)
    peft_model = add_adapters(copy.deepcopy(base), {
        "both": lora(4, 8, ["fc1", "fc2"]),
        "fc1_only": lora(8, 4, ["fc1"], use_rslora=True),  # fc2 runs the base for its rows
        "fc2_only": lora(2, 2, ["fc2"]),
    })
    ours = to_multi_lora(peft_model, copy.deepcopy(base), max_rank=8, backend=backend)
    x = torch.randn(9, 16, device=device)
    names = ["both", "fc1_only", "__base__", "fc2_only", "both", "fc1_only", "fc2_only", "__base__", "both"]
    want = peft_model(x, adapter_names=names)
    with mixed_batch(ours, names):
        got = ours(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours(x), base(x), rtol=1e-5, atol=1e-5)


def tiny_llama(device):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config).to(device).eval()


@pytest.mark.parametrize("device,backend", BACKENDS)
@torch.no_grad()
def test_mixed_sequences_match_peft_on_a_llama(device, backend):
    torch.manual_seed(0)
    base = tiny_llama(device)
    peft_model = add_adapters(copy.deepcopy(base), {
        "attn": lora(4, 8, ["q_proj", "k_proj", "v_proj", "o_proj"]),
        "mlp": lora(8, 16, ["gate_proj", "up_proj", "down_proj"], use_rslora=True),
        "v_only": lora(2, 4, ["v_proj"]),
    })
    ours = to_multi_lora(peft_model, copy.deepcopy(base), max_rank=8, backend=backend)
    input_ids = torch.randint(0, 64, (4, 7), device=device)
    names = ["mlp", "__base__", "attn", "v_only"]
    want = peft_model(input_ids=input_ids, adapter_names=names).logits
    with mixed_batch(ours, names):
        got = ours(input_ids=input_ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got[2], base(input_ids=input_ids).logits[2], atol=1e-3), "adapters did nothing"
