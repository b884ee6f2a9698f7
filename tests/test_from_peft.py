"""from_peft: PEFT LoRA layers swapped for LoRALinear keep outputs, gradients and optimizer steps."""
import copy

import pytest
import torch
from torch import nn

import lora_ops.model as lm
from lora_ops.modules import LoRALinear
from tests.tiny_models import assert_unchanged, logits, snapshot, tiny_bert, tiny_llama, token_batch

peft = pytest.importorskip("peft")


def peft_model_of(base, **config):
    torch.manual_seed(4)
    config = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "init_lora_weights": False, **config}
    return peft.get_peft_model(base, peft.LoraConfig(**config))


def train_step(model, ids, optimizer):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer.step()
    optimizer.zero_grad()
    return loss.item(), grads


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_swap_keeps_outputs_gradients_and_an_optimizer_step():
    original = peft_model_of(tiny_llama(), rank_pattern={"o_proj": 2}, alpha_pattern={"up_proj": 3},
                             use_rslora=True).train()
    swapped = lm.from_peft(copy.deepcopy(original))
    assert isinstance(swapped.base_model.model.model.layers[0].self_attn.o_proj, LoRALinear)
    assert not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in swapped.modules())
    assert swapped.base_model.model.model.layers[0].self_attn.o_proj.r == 2
    ids = token_batch()
    torch.testing.assert_close(logits(swapped, ids), logits(original, ids), rtol=1e-5, atol=1e-5)

    # Same parameter names (PEFT's "lora_A.default.weight" becomes "lora_A.weight").
    names = {n.replace(".default", ""): n for n in trainable(original)}
    assert set(names) == set(trainable(swapped))
    opt_original = torch.optim.AdamW([p for p in original.parameters() if p.requires_grad], lr=1e-2)
    opt_swapped = torch.optim.AdamW([p for p in swapped.parameters() if p.requires_grad], lr=1e-2)
    loss_original, grads_original = train_step(original, ids, opt_original)
    loss_swapped, grads_swapped = train_step(swapped, ids, opt_swapped)
    assert loss_swapped == pytest.approx(loss_original, rel=1e-5)
    for ours, theirs in names.items():
        torch.testing.assert_close(grads_swapped[ours], grads_original[theirs], rtol=1e-4, atol=1e-6)
    after_original, after_swapped = trainable(original), trainable(swapped)
    for ours, theirs in names.items():
        torch.testing.assert_close(after_swapped[ours], after_original[theirs], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits(swapped, ids), logits(original, ids), rtol=1e-5, atol=1e-5)


def test_an_optimizer_built_before_the_swap_keeps_training_the_same_tensors():
    model = peft_model_of(tiny_llama(), target_modules=["q_proj", "v_proj"]).train()
    reference = copy.deepcopy(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    opt_reference = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=1e-2)
    ids = token_batch()
    train_step(model, ids, optimizer)
    train_step(reference, ids, opt_reference)
    lm.from_peft(model)
    for _ in range(2):
        train_step(model, ids, optimizer)
        train_step(reference, ids, opt_reference)
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), rtol=1e-5, atol=1e-5)


def test_bert_dropout_and_modes_carry_over():
    model = peft_model_of(tiny_bert(), target_modules=["query", "value"], lora_dropout=0.25).eval()
    before = logits(model, token_batch())
    lm.from_peft(model)
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(layers) == 4
    assert all(m.lora_dropout == 0.25 and not m.training for m in layers)
    torch.testing.assert_close(logits(model, token_batch()), before, rtol=1e-5, atol=1e-5)
    assert lm.lora_summary(model).trainable_params == sum(
        p.numel() for n, p in model.named_parameters() if "lora_" in n)


def two_adapters(active_both: bool):
    model = peft_model_of(tiny_llama(), target_modules=["q_proj"])
    model.add_adapter("second", peft.LoraConfig(r=2, target_modules=["q_proj"]))
    if active_both:
        model.base_model.set_adapter(["default", "second"])
    return model


def merged():
    model = peft_model_of(tiny_llama(), target_modules=["q_proj"])
    model.merge_adapter()
    return model


def disabled():
    model = peft_model_of(tiny_llama(), target_modules=["q_proj"])
    model.base_model.disable_adapter_layers()
    return model


def rescaled():
    """scale_layer changes the scaling PEFT applies but not r or lora_alpha."""
    model = peft_model_of(tiny_llama(), target_modules=["q_proj"])
    for module in model.modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            module.scale_layer(0.5)
    return model


def gpt2_with_lora():
    """GPT-2's Conv1D keeps its weight transposed; PEFT wraps it with fan_in_fan_out=True."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=2)).eval()
    return peft_model_of(base, target_modules=["c_attn"], fan_in_fan_out=True)


class WithConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 4, 1)
        self.proj = nn.Linear(4, 4)


@pytest.mark.parametrize("make, message", [
    (lambda: peft_model_of(tiny_llama(), use_dora=True), "uses DoRA"),
    (lambda: peft_model_of(tiny_llama(), target_modules=["embed_tokens", "q_proj"]), "Embedding"),
    (lambda: peft.get_peft_model(WithConv(), peft.LoraConfig(target_modules=["conv", "proj"])), "Conv1d"),
    (lambda: two_adapters(active_both=False), r"holds adapters \['default', 'second'\]"),
    (lambda: two_adapters(active_both=True), "2 active adapters"),
    (merged, "merged into the base weight"),
    (lambda: peft_model_of(tiny_bert(), target_modules=["query"], bias="all"), "base bias .* is trainable"),
    (lambda: peft_model_of(tiny_llama(), target_modules=["q_proj"], lora_bias=True), "bias on lora_B"),
    (lambda: peft.get_peft_model(tiny_llama(), peft.IA3Config(target_modules=["q_proj"], feedforward_modules=[])),
     "lora_ops takes LoRA on plain nn.Linear"),
    (lambda: tiny_llama(), "has no PEFT LoRA layers"),
    (disabled, "has its adapters disabled"),
    (rescaled, "was it rescaled with scale_layer"),
    (gpt2_with_lora, r"stores its weight transposed \(fan_in_fan_out=True"),
], ids=["dora", "embedding", "conv", "inactive-adapter", "two-active", "merged", "bias-all", "lora-bias", "ia3",
        "plain-model", "disabled", "rescaled", "gpt2-conv1d"])
def test_what_lora_ops_cannot_take_is_refused_and_left_unchanged(make, message):
    model = make()
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        lm.from_peft(model)
    assert_unchanged(model, before)
