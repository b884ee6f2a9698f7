"""inject / merge / unmerge / merge_and_unload on real transformers models, checked against PEFT."""
import pytest
import torch
from torch import nn

import lora_ops.model as lm
from lora_ops.modules import LoRALinear
from tests.tiny_models import (assert_unchanged, logits, randomize_adapters, snapshot, tiny_bert, tiny_llama,
                               token_batch)

peft = pytest.importorskip("peft")


def peft_layers(model, **config):
    """{name: (r, alpha)} of the layers PEFT puts LoRA on for the same arguments."""
    peft_model = peft.get_peft_model(model, peft.LoraConfig(**config))
    found = {}
    for name, module in peft_model.base_model.model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            found[name] = (module.r["default"], module.lora_alpha["default"])
    return found


def lora_layers(model):
    return {name: (m.r, m.lora_alpha) for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@pytest.mark.parametrize("build, targets, extra", [
    (tiny_llama, ["q_proj", "v_proj"], {}),
    (tiny_llama, "all-linear", {}),
    (tiny_llama, "all-linear", {"exclude_modules": ["down_proj", "model.layers.0.self_attn.k_proj"]}),
    (tiny_llama, r".*\.mlp\..*_proj", {"rank_pattern": {"up_proj": 2, r"layers\.1\.mlp\.down_proj": 6},
                                      "alpha_pattern": {"gate_proj": 3}}),
    (tiny_llama, ["model.layers.1.self_attn.o_proj", "gate_proj"], {"exclude_modules": r".*layers\.0.*"}),
    (tiny_bert, "all-linear", {}),
    (tiny_bert, ["query", "value", "dense"], {"rank_pattern": {"attention.output.dense": 8}}),
    # The first matching key wins; a key matches at a dot boundary only ("proj" names no layer).
    (tiny_llama, ["q_proj", "up_proj", "down_proj"],
     {"rank_pattern": {"down_proj": 2, r"layers\.1\.mlp\.down_proj": 6, "proj": 3},
      "alpha_pattern": {"_proj": 5, r"layers\.1\.mlp\.up_proj": 7, "up_proj": 9}}),
], ids=["llama-list", "llama-all-linear", "llama-exclude", "llama-regex-patterns", "llama-full-name",
        "bert-all-linear", "bert-suffix-patterns", "llama-overlapping-patterns"])
def test_targets_ranks_and_alphas_match_peft(build, targets, extra):
    model = lm.inject(build(), targets, 4, 8, **extra)
    expected = peft_layers(build(), target_modules=targets, r=4, lora_alpha=8, **extra)
    assert lora_layers(model) == expected
    summary = lm.lora_summary(model)
    assert sorted(summary.lora_layers) == sorted(expected)
    assert summary.ranks == {name: r for name, (r, _) in expected.items()}


def test_all_linear_leaves_the_output_head_alone():
    model = lm.inject(tiny_llama(), "all-linear", 4)
    assert type(model.lm_head) is nn.Linear
    assert isinstance(model.model.layers[0].mlp.down_proj, LoRALinear)


def test_all_linear_on_a_model_with_adapters_leaves_their_internals_alone():
    """The lora_A / lora_B Linears inside an adapter layer are never targets: no adapter on an adapter."""
    model = lm.inject(tiny_llama(), ["q_proj"], 4)
    q_proj = model.model.layers[0].self_attn.q_proj
    lm.inject(model, "all-linear", 2)
    assert model.model.layers[0].self_attn.q_proj is q_proj
    nested = [name for name, m in model.named_modules()
              if isinstance(m, LoRALinear) and any(isinstance(c, LoRALinear) for c in m.children())]
    assert nested == []
    ranks = lm.lora_summary(model).ranks
    assert ranks == {name: 4 if name.endswith("q_proj") else 2 for name in lora_layers(
        lm.inject(tiny_llama(), "all-linear", 2))}


def test_lora_alpha_none_means_each_layers_own_rank():
    model = lm.inject(tiny_llama(), ["q_proj", "down_proj"], 4, rank_pattern={"down_proj": 2},
                      alpha_pattern={r"layers\.1\.self_attn\.q_proj": 8})
    for name, layer in model.named_modules():
        if isinstance(layer, LoRALinear):
            expected_alpha = 8 if name == "model.layers.1.self_attn.q_proj" else layer.r
            assert (layer.r, layer.lora_alpha) == (2 if "down_proj" in name else 4, expected_alpha), name


def test_summary_counts_tied_weights_once_as_peft_does():
    model = lm.inject(tiny_llama(tie_word_embeddings=True), ["q_proj"], 4, 8)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    peft_model = peft.get_peft_model(tiny_llama(tie_word_embeddings=True),
                                     peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    summary = lm.lora_summary(model)
    assert (summary.trainable_params, summary.total_params) == peft_model.get_nb_trainable_parameters()


def test_inject_freezes_all_but_adapters_and_reports_the_share():
    base = tiny_llama()
    total = sum(p.numel() for p in base.parameters())
    model = lm.inject(base, ["q_proj", "v_proj"], 4, 8)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    layer = model.model.layers[0].self_attn.q_proj
    expected_trainable = 2 * 4 * (32 + 32) + 2 * 4 * (32 + 16)  # 2 layers x r=4 x (q: 32->32, v: 32->16)
    summary = lm.lora_summary(model)
    assert summary.trainable_params == expected_trainable
    assert summary.total_params == total + expected_trainable
    assert summary.trainable_share == pytest.approx(expected_trainable / (total + expected_trainable))
    assert "trainable" in str(summary)
    assert layer.scaling == 2.0 and not layer.weight.requires_grad


def test_inject_keeps_outputs_until_trained_and_the_train_eval_mode():
    model = tiny_llama()
    ids = token_batch()
    before = logits(model, ids)
    lm.inject(model, "all-linear", 4, 8, lora_dropout=0.1)
    assert all(not m.training for m in model.modules()), "inject must keep the model's eval mode"
    torch.testing.assert_close(logits(model, ids), before, rtol=0, atol=0)


def test_injected_model_matches_the_base_with_folded_weights_in_fp64():
    """The LoRA model equals the base with W + scaling * B A written into its weights."""
    model = lm.inject(tiny_llama(), "all-linear", 4, 8, use_rslora=True, rank_pattern={"o_proj": 2})
    randomize_adapters(model)
    folded = tiny_llama().double()
    with torch.no_grad():
        for name in lm.lora_summary(model).lora_layers:
            lora = model.get_submodule(name)
            scaling = lora.lora_alpha / lora.r ** 0.5
            folded.get_submodule(name).weight.add_(scaling * lora.lora_B.weight.double() @ lora.lora_A.weight.double())
    ids = token_batch()
    oracle = logits(folded, ids)
    assert (logits(model, ids).double() - oracle).abs().max() <= 1e-5 * oracle.abs().max()


def test_merge_unmerge_and_merge_and_unload_round_trip():
    model = lm.inject(tiny_llama(), "all-linear", 4, 8)
    randomize_adapters(model)
    ids = token_batch()
    adapted = logits(model, ids)
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}

    lm.merge(model)
    assert all(m.merged for m in model.modules() if isinstance(m, LoRALinear))
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight,
                           base_weights["model.layers.0.self_attn.q_proj.weight"])
    torch.testing.assert_close(logits(model, ids), adapted, rtol=1e-5, atol=1e-5)

    lm.unmerge(model)
    for name, param in model.named_parameters():
        if name in base_weights:
            torch.testing.assert_close(param, base_weights[name], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits(model, ids), adapted, rtol=1e-5, atol=1e-5)

    lm.merge_and_unload(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert type(model.model.layers[1].mlp.up_proj) is nn.Linear
    assert not any(m.training for m in model.modules()), "merge_and_unload must keep the eval mode"
    assert set(model.state_dict()) == set(tiny_llama().state_dict())
    torch.testing.assert_close(logits(model, ids), adapted, rtol=1e-5, atol=1e-5)


def test_training_steps_only_the_adapters():
    model = lm.inject(tiny_llama(), ["q_proj", "down_proj"], 4, 8, lora_dropout=0.1).train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = token_batch()
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), f"{name} moved"


def test_inject_into_a_plain_torch_module():
    def build():
        return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 3)))

    model = lm.inject(build(), ["2.1"], 2)
    assert [type(m) for m in (model[0], model[2][0], model[2][1])] == [nn.Linear, nn.Linear, LoRALinear]
    assert model[2][1].lora_alpha == 2
    model = lm.inject(build(), ["0"], 2)  # a suffix: "0" and "2.0", as in PEFT
    assert [type(m) for m in (model[0], model[2][0], model[2][1])] == [LoRALinear, LoRALinear, nn.Linear]


@pytest.mark.parametrize("call, error, message", [
    (lambda m: lm.inject(m, ["no_such_layer"], 4), ValueError, "matches no module"),
    (lambda m: lm.inject(m, ["embed_tokens"], 4), TypeError, "has type Embedding"),
    (lambda m: lm.inject(m, ["q_proj"], 0), ValueError, "r must be a positive int"),
    (lambda m: lm.inject(m, ["q_proj"], 4, -1.0), ValueError, "lora_alpha must be a positive number"),
    (lambda m: lm.inject(m, ["q_proj"], 4, lora_dropout=1.0), ValueError, "lora_dropout"),
    (lambda m: lm.inject(m, ["q_proj", "v_proj"], 4, rank_pattern={"v_proj": 0}), ValueError,
     r"rank_pattern\['v_proj'\]"),
    (lambda m: lm.inject(m, "(unclosed", 4), ValueError, "not a valid regular expression"),
    (lambda m: lm.inject(m, 5, 4), TypeError, "target_modules must be"),
    (lambda m: lm.inject(m, ["q_proj"], 4, alpha_pattern={"q_proj": -2.0}), ValueError,
     r"alpha_pattern\['q_proj'\]"),
    (lambda m: lm.inject(m, ["q_proj"], 4, exclude_modules="(unclosed"), ValueError,
     "exclude_modules=.* is not a valid regular expression"),
    # As in PEFT: a regex must match the whole name, a list entry a whole name or a dotted suffix.
    (lambda m: lm.inject(m, r".*\.(q|v)", 4), ValueError, "matches no module"),
    (lambda m: lm.inject(m, ["proj"], 4), ValueError, "matches no module"),
], ids=["no-match", "embedding", "bad-r", "bad-alpha", "bad-dropout", "bad-rank-pattern", "bad-regex",
        "bad-spec", "bad-alpha-pattern", "bad-exclude-regex", "regex-matches-a-prefix-only",
        "suffix-inside-a-segment"])
def test_bad_arguments_raise_and_leave_the_model_unchanged(call, error, message):
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(error, match=message):
        call(model)
    assert_unchanged(model, before)


def test_injecting_twice_into_a_layer_is_refused():
    model = lm.inject(tiny_llama(), ["q_proj"], 4)
    before = snapshot(model)
    with pytest.raises(ValueError, match="already holds a LoRA adapter"):
        lm.inject(model, ["q_proj", "v_proj"], 4)
    assert_unchanged(model, before)
