"""PEFT's adapter files both ways, with real PEFT on small transformers models, and their errors."""
import json

import pytest
import torch
from torch import nn

import lora_ops.model as lm
from lora_ops.modules import LoRALinear
from lora_ops.multi_lora_module import MultiLoRALinear, mixed_batch
from tests.tiny_models import (assert_unchanged, logits, randomize_adapters, snapshot, tiny_bert, tiny_llama,
                               token_batch)

peft = pytest.importorskip("peft")
pytest.importorskip("safetensors")

LLAMA_ADAPTER = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                     rank_pattern={"down_proj": 2}, alpha_pattern={r"layers\.1\.self_attn\.q_proj": 3})


def save_with_peft(model, directory, safe=True, **config):
    """A PEFT adapter with random (non-zero) B, saved by PEFT itself."""
    torch.manual_seed(3)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **config))
    peft_model.save_pretrained(str(directory), safe_serialization=safe)
    return peft_model.eval()


@pytest.mark.parametrize("build, config", [
    (tiny_llama, LLAMA_ADAPTER),
    (tiny_llama, dict(r=8, lora_alpha=4, target_modules="all-linear", use_rslora=True)),
    (tiny_llama, dict(r=4, lora_alpha=8, target_modules=["o_proj", "up_proj"], layers_to_transform=[1],
                      exclude_modules=["model.layers.1.mlp.up_proj"])),
    (tiny_bert, dict(r=4, lora_alpha=16, target_modules=r".*attention\.self\.(query|value)", lora_dropout=0.1)),
    # layers_to_transform as one int (0 included); a name listed in full is taken whatever its layer.
    (tiny_llama, dict(r=4, lora_alpha=8, target_modules=["model.layers.1.self_attn.q_proj", "v_proj"],
                      layers_to_transform=0)),
], ids=["llama-patterns", "llama-all-linear-rslora", "llama-layers-exclude", "bert-regex", "llama-layer-int"])
def test_peft_save_then_lora_ops_load_gives_peft_logits(tmp_path, build, config):
    peft_model = save_with_peft(build(), tmp_path, **config)
    ids = token_batch()
    model = lm.load_adapter(build(), tmp_path)
    torch.testing.assert_close(logits(model, ids), logits(peft_model, ids), rtol=1e-5, atol=1e-5)
    peft_layers = {name.removeprefix("base_model.model."): (m.r["default"], m.scaling["default"])
                   for name, m in peft_model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    ours = {name: (m.r, m.scaling) for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert ours == peft_layers
    assert {m.lora_dropout for m in model.modules() if isinstance(m, LoRALinear)} == \
        {config.get("lora_dropout", 0.0)}


class Nested(nn.Module):
    """Two numbered levels under a prefix: model.sublayers.<i>.layers.<j>.proj."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.model = nn.Module()
        self.model.sublayers = nn.ModuleList(nn.Module() for _ in range(2))
        for block in self.model.sublayers:
            block.layers = nn.ModuleList(nn.Module() for _ in range(2))
            for leaf in block.layers:
                leaf.proj = nn.Linear(8, 8)

    def forward(self, x):
        for block in self.model.sublayers:
            for leaf in block.layers:
                x = torch.tanh(leaf.proj(x))
        return x


@pytest.mark.parametrize("config", [
    dict(layers_to_transform=[1]),  # the first numbered segment: sublayers.1
    dict(layers_to_transform=[1], layers_pattern="layers"),  # the segment named exactly "layers"
], ids=["first-index", "layers-pattern"])
def test_layers_to_transform_reads_the_layer_index_as_peft_does(tmp_path, config):
    peft_model = save_with_peft(Nested(), tmp_path, r=2, lora_alpha=4, target_modules=["proj"], **config)
    model = lm.load_adapter(Nested(), tmp_path)
    peft_layers = {name.removeprefix("base_model.model.") for name, m in peft_model.named_modules()
                   if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert set(lm.lora_summary(model).lora_layers) == peft_layers and len(peft_layers) == 2
    x = torch.randn(5, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), peft_model(x), rtol=1e-5, atol=1e-6)


def test_lora_ops_save_then_peft_load_gives_the_same_logits(tmp_path):
    model = lm.inject(tiny_llama(), "all-linear", 4, 8, rank_pattern={"k_proj": 2, "model.layers.1.mlp.up_proj": 6},
                      alpha_pattern={"o_proj": 5, "gate_proj": 2.5})
    randomize_adapters(model)
    ids = token_batch()
    lm.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    peft_model = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    torch.testing.assert_close(logits(peft_model, ids), logits(model, ids), rtol=1e-5, atol=1e-5)
    peft_ranks = {name.removeprefix("base_model.model."): m.r["default"]
                  for name, m in peft_model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert peft_ranks == lm.lora_summary(model).ranks


def test_lora_ops_save_then_load_round_trip_with_rslora(tmp_path):
    model = lm.inject(tiny_bert(), ["query", "key", "output.dense"], 3, 6, use_rslora=True, lora_dropout=0.05)
    randomize_adapters(model)
    lm.save_adapter(model, tmp_path / "nested" / "dir")
    loaded = lm.load_adapter(tiny_bert(), tmp_path / "nested" / "dir")
    ids = token_batch()
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), rtol=0, atol=0)
    assert lm.lora_summary(loaded).ranks == lm.lora_summary(model).ranks
    assert all(m.use_rslora and m.lora_dropout == 0.05 for m in loaded.modules() if isinstance(m, LoRALinear))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_save_and_load_keep_the_adapters_dtype(tmp_path, dtype):
    from safetensors.torch import load_file
    model = lm.inject(tiny_llama().to(dtype), ["q_proj", "down_proj"], 4, 8)
    randomize_adapters(model)
    lm.save_adapter(model, tmp_path)
    assert {t.dtype for t in load_file(str(tmp_path / "adapter_model.safetensors")).values()} == {dtype}
    loaded = lm.load_adapter(tiny_llama().to(dtype), tmp_path)
    saved = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for name, param in loaded.named_parameters():
        if param.requires_grad:
            assert param.dtype == dtype and torch.equal(param, saved[name]), name


def test_a_config_without_lora_alpha_means_peft_default(tmp_path):
    directory = write_adapter(tmp_path)
    config = json.loads((directory / "adapter_config.json").read_text())
    del config["lora_alpha"]
    (directory / "adapter_config.json").write_text(json.dumps(config))
    peft_model = peft.PeftModel.from_pretrained(tiny_llama(), str(directory)).eval()
    model = lm.load_adapter(tiny_llama(), directory)
    ids = token_batch()
    torch.testing.assert_close(logits(model, ids), logits(peft_model, ids), rtol=1e-5, atol=1e-5)


def test_save_refuses_patterns_that_peft_would_read_for_another_layer(tmp_path):
    """Full-name pattern keys match at name ends: the key 'proj' (r=3) would give 'block.proj' r=3 too."""
    model = nn.Module()
    model.proj, model.other, model.block = nn.Linear(6, 6), nn.Linear(6, 6), nn.Module()
    model.block.proj = nn.Linear(6, 6)
    lm.inject(model, ["proj", "other"], 2, rank_pattern={"^proj": 3})
    assert lm.lora_summary(model).ranks == {"proj": 3, "other": 2, "block.proj": 2}
    with pytest.raises(ValueError, match="cannot be written unambiguously for 'block.proj'"):
        lm.save_adapter(model, tmp_path)


@pytest.mark.parametrize("field, first, second", [
    ("use_rslora", dict(use_rslora=True), dict(use_rslora=False)),
    ("lora_dropout", dict(lora_dropout=0.1), dict(lora_dropout=0.0)),
])
def test_save_refuses_layers_that_disagree_on_a_config_wide_field(tmp_path, field, first, second):
    model = lm.inject(tiny_llama(), ["q_proj"], 4, 8, **first)
    lm.inject(model, ["v_proj"], 4, 8, **second)
    with pytest.raises(ValueError, match=f"the layers disagree on {field}"):
        lm.save_adapter(model, tmp_path)
    assert not any(tmp_path.iterdir())


def test_keys_without_the_peft_prefix_load_the_same(tmp_path):
    model = lm.inject(tiny_llama(), ["q_proj", "up_proj"], 4, 8)
    randomize_adapters(model)
    lm.save_adapter(model, tmp_path)
    replace_tensors(tmp_path, lambda t: t.update({k.removeprefix("base_model.model."): t.pop(k) for k in list(t)}))
    ids = token_batch()
    torch.testing.assert_close(logits(lm.load_adapter(tiny_llama(), tmp_path), ids), logits(model, ids),
                               rtol=0, atol=0)


def test_legacy_bin_adapter_loads(tmp_path):
    peft_model = save_with_peft(tiny_llama(), tmp_path, r=2, lora_alpha=4, target_modules=["q_proj"], safe=False)
    assert (tmp_path / "adapter_model.bin").is_file()
    ids = token_batch()
    torch.testing.assert_close(logits(lm.load_adapter(tiny_llama(), tmp_path), ids), logits(peft_model, ids),
                               rtol=1e-5, atol=1e-5)


def test_load_adapters_serves_a_mixed_batch_like_each_single_adapter(tmp_path):
    configs = {"qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
               "mlp": dict(r=2, lora_alpha=2, target_modules=["up_proj", "down_proj", "q_proj"], use_rslora=True),
               "wide": dict(r=8, lora_alpha=4, target_modules="all-linear", rank_pattern={"o_proj": 3})}
    for index, (name, config) in enumerate(configs.items()):
        save_with_peft(tiny_llama(), tmp_path / name, **config)
    served = lm.load_adapters(tiny_llama(), {name: tmp_path / name for name in configs})
    assert isinstance(served.model.layers[0].self_attn.q_proj, MultiLoRALinear)
    assert isinstance(served.model.layers[0].mlp.gate_proj, MultiLoRALinear)  # only "wide" targets it
    pools = [name for name, m in served.named_modules() if isinstance(m, MultiLoRALinear)]
    assert lm.lora_summary(served).lora_layers == pools and len(pools) == 14
    ids = token_batch(batch=6, length=5)
    names = ["qv", "wide", None, "mlp", "qv", "wide"]
    with mixed_batch(served, names):
        mixed = logits(served, ids)
    for row, name in enumerate(names):
        single = tiny_llama() if name is None else lm.load_adapter(tiny_llama(), tmp_path / name)
        torch.testing.assert_close(mixed[row], logits(single, ids[row:row + 1])[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fold", [lm.merge, lm.unmerge, lm.merge_and_unload])
def test_multi_adapter_pools_cannot_be_folded(tmp_path, fold):
    save_with_peft(tiny_llama(), tmp_path / "a", r=2, lora_alpha=4, target_modules=["q_proj"])
    save_with_peft(tiny_llama(), tmp_path / "b", r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    served = lm.load_adapters(tiny_llama(), {"a": tmp_path / "a", "b": tmp_path / "b"})
    before = snapshot(served)
    with pytest.raises(ValueError, match="MultiLoRALinear pool of several adapters"):
        fold(served)
    assert_unchanged(served, before)


def write_adapter(tmp_path, **config_changes):
    """A valid lora_ops-saved adapter of tiny_llama, with fields of its config changed."""
    model = lm.inject(tiny_llama(), ["q_proj", "v_proj"], 4, 8)
    randomize_adapters(model)
    lm.save_adapter(model, tmp_path)
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(config_changes)
    path.write_text(json.dumps(config))
    return tmp_path


def replace_tensors(directory, change):
    from safetensors.torch import load_file, save_file
    path = directory / "adapter_model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


def corrupt(kind):
    def apply(tmp_path):
        directory = write_adapter(tmp_path)
        if kind == "no-config":
            (directory / "adapter_config.json").unlink()
        elif kind == "no-weights":
            (directory / "adapter_model.safetensors").unlink()
        elif kind == "bad-json":
            (directory / "adapter_config.json").write_text("{'r': 4,")
        elif kind == "json-list":
            (directory / "adapter_config.json").write_text("[1, 2]")
        elif kind == "truncated-weights":
            path = directory / "adapter_model.safetensors"
            path.write_bytes(path.read_bytes()[:100])
        elif kind == "wrong-shape":
            replace_tensors(directory, lambda t: t.update({
                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 31)}))
        elif kind == "wrong-shape-b":  # (1, r) would broadcast into (out_features, r)
            replace_tensors(directory, lambda t: t.update({
                "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight": torch.ones(1, 4)}))
        elif kind == "missing-half":
            replace_tensors(directory, lambda t: t.pop(
                "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"))
        elif kind == "foreign-tensor":
            replace_tensors(directory, lambda t: t.update({
                "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(32)}))
        elif kind == "integer-tensor":
            replace_tensors(directory, lambda t: t.update({
                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32, dtype=torch.int32)}))
        return directory
    return apply


@pytest.mark.parametrize("make, error, message", [
    (lambda p: p / "does-not-exist", FileNotFoundError, "no adapter directory"),
    (corrupt("no-config"), FileNotFoundError, "has no adapter_config.json"),
    (corrupt("no-weights"), FileNotFoundError, "has no adapter_model.safetensors"),
    (corrupt("bad-json"), ValueError, "is not valid JSON"),
    (corrupt("json-list"), ValueError, "must hold a JSON object"),
    (corrupt("truncated-weights"), ValueError, "not a valid safetensors file"),
    (corrupt("wrong-shape"), ValueError, r"q_proj.lora_A.weight has shape \(4, 31\).*need \(4, 32\)"),
    (corrupt("missing-half"), ValueError, "has no lora_B.weight for module 'model.layers.1.self_attn.v_proj'"),
    (corrupt("foreign-tensor"), ValueError, "lora_magnitude_vector"),
    (corrupt("integer-tensor"), ValueError, "must be floating point"),
    (lambda p: write_adapter(p, peft_type="IA3"), ValueError, "peft_type is 'IA3'"),
    (lambda p: write_adapter(p, use_dora=True), ValueError, "use_dora=True is a PEFT feature"),
    (lambda p: write_adapter(p, r=0), ValueError, "r must be a positive int"),
    (lambda p: write_adapter(p, r=2), ValueError, r"has shape \(4, 32\) but r=2"),
    (lambda p: write_adapter(p, target_modules=["q_proj"]), ValueError, "has weights for '.*v_proj'"),
    (lambda p: write_adapter(p, target_modules=["q_proj", "v_proj", "k_proj"]), ValueError,
     "targets '.*k_proj' but the weights file has no tensors"),
    (lambda p: write_adapter(p, target_modules=["attention"]), ValueError, "matches no module"),
    (lambda p: write_adapter(p, target_modules=["embed_tokens"]), TypeError, "has type Embedding"),
    (lambda p: write_adapter(p, rank_pattern={"q_proj": "big"}), ValueError, "rank_pattern"),
    (corrupt("wrong-shape-b"), ValueError, r"v_proj.lora_B.weight has shape \(1, 4\).*need \(16, 4\)"),
    (lambda p: write_adapter(p, fan_in_fan_out=True), ValueError, "fan_in_fan_out=True is a PEFT feature"),
    (lambda p: write_adapter(p, bias="all"), ValueError, "bias='all' is a PEFT feature"),
    (lambda p: write_adapter(p, lora_alpha=0), ValueError, "lora_alpha must be a positive number"),
    (lambda p: write_adapter(p, use_rslora="yes"), ValueError, "use_rslora must be true or false"),
    (lambda p: write_adapter(p, layers_to_transform="1"), ValueError, "layers_to_transform must be an int"),
    (lambda p: write_adapter(p, target_modules=None), ValueError, "target_modules is null"),
], ids=["no-dir", "no-config", "no-weights", "bad-json", "json-list", "truncated", "wrong-shape", "missing-half",
        "foreign-tensor", "integer-tensor", "not-lora", "dora", "bad-r", "r-mismatch", "untargeted-weights",
        "target-without-weights", "target-matches-nothing", "target-not-linear", "bad-rank-pattern",
        "wrong-shape-b", "fan-in-fan-out", "bias", "bad-alpha", "rslora-not-bool", "bad-layers", "null-targets"])
def test_bad_adapter_files_raise_clearly_and_leave_the_model_unchanged(tmp_path, make, error, message):
    directory = make(tmp_path)
    for load in (lambda m: lm.load_adapter(m, directory), lambda m: lm.load_adapters(m, {"a": directory})):
        model = tiny_llama()
        before = snapshot(model)
        with pytest.raises(error, match=message):
            load(model)
        assert_unchanged(model, before)


def test_adapter_for_another_model_is_refused(tmp_path):
    save_with_peft(tiny_llama(hidden_size=48), tmp_path, r=4, lora_alpha=8, target_modules=["q_proj"])
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"has shape \(4, 48\)"):
        lm.load_adapter(model, tmp_path)
    assert_unchanged(model, before)


def test_loading_onto_layers_that_hold_adapters_is_refused(tmp_path):
    directory = write_adapter(tmp_path)
    model = lm.inject(tiny_llama(), ["q_proj"], 4)
    before = snapshot(model)
    with pytest.raises(ValueError, match="already holds a LoRA adapter"):
        lm.load_adapter(model, directory)
    assert_unchanged(model, before)


def test_save_adapter_without_lora_layers_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="has no LoRALinear layers"):
        lm.save_adapter(tiny_llama(), tmp_path)
    assert not any(tmp_path.iterdir())
