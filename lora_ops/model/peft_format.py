"""PEFT's adapter file format, both ways: save_adapter, load_adapter, and load_adapters for serving.

What save_adapter writes, PEFT loads with `PeftModel.from_pretrained(base_model, directory)`;
what PEFT's `save_pretrained` writes, load_adapter reads into a plain model.
"""
import json
from collections import Counter
from pathlib import Path
from typing import Dict, Mapping, Optional, Union

import torch
from torch import nn

from lora_ops.model.adapter_file import (CONFIG_NAME, KEY_PREFIX, WEIGHTS_NAME, check_fits_model,
                                         read_adapter)
from lora_ops.model.inject import LayerSpec, apply_layer_specs
from lora_ops.model.targets import pattern_value
from lora_ops.modules import LoRALinear, lora_scaling
from lora_ops.multi_lora_module import MultiLoRALinear

PathLike = Union[str, Path]


def save_adapter(model: nn.Module, directory: PathLike) -> Path:
    """Write the model's LoRALinear adapters as a PEFT adapter directory; returns its path.

    Layers with another rank or alpha than the most common one are listed, by full name, in
    rank_pattern / alpha_pattern, so PEFT rebuilds every layer exactly.
    """
    op = "save_adapter"
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    if not layers:
        raise ValueError(f"{op}: {type(model).__name__} has no LoRALinear layers "
                         f"(add some with lora_ops.inject or lora_ops.load_adapter)")
    for field in ("use_rslora", "lora_dropout"):
        values = {getattr(layer, field) for layer in layers.values()}
        if len(values) > 1:
            raise ValueError(f"{op}: the layers disagree on {field} ({sorted(values)}); a PEFT config "
                             f"holds one value for all layers")
    config = _peft_config(op, model, layers)
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{KEY_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.detach().cpu().contiguous()
        tensors[f"{KEY_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.detach().cpu().contiguous()

    from safetensors.torch import save_file
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n",
                                         encoding="utf-8")
    return directory


def _number(value):
    """JSON-friendly: 16.0 -> 16, as PEFT writes alphas."""
    return int(value) if float(value).is_integer() else float(value)


def _exact_patterns(op: str, field: str, values: Dict[str, object], default) -> Dict[str, object]:
    """{full name: value} for the layers whose value is not `default`, checked to resolve back
    to exactly these values under PEFT's pattern rules (keys are regexes matched at name ends)."""
    patterns = {name: value for name, value in values.items() if value != default}
    for name, value in values.items():
        if pattern_value(patterns, name, default) != value:
            raise ValueError(f"{op}: the {field} entries cannot be written unambiguously for '{name}' "
                             f"(a longer layer name ends with it)")
    return patterns


def _peft_config(op: str, model: nn.Module, layers: Mapping[str, LoRALinear]) -> dict:
    ranks = {name: layer.r for name, layer in layers.items()}
    alphas = {name: _number(layer.lora_alpha) for name, layer in layers.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    first = next(iter(layers.values()))
    name_or_path = getattr(getattr(model, "config", None), "name_or_path", None) or None
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": first.lora_dropout,
        "use_rslora": first.use_rslora,
        "target_modules": list(layers),
        "exclude_modules": None,
        "rank_pattern": _exact_patterns(op, "rank_pattern", ranks, r),
        "alpha_pattern": _exact_patterns(op, "alpha_pattern", alphas, alpha),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "lora_bias": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "modules_to_save": None,
    }


def load_adapter(model: nn.Module, directory: PathLike, *, backend: Optional[str] = None) -> nn.Module:
    """Read a PEFT LoRA adapter into `model` in place: the layers its config names become
    LoRALinear holding the saved weights; every other parameter is frozen. Returns `model`.

    Honours rank_pattern, alpha_pattern, use_rslora, exclude_modules, layers_to_transform and
    the `base_model.model.` key prefix. The file and its fit to the model are checked in full
    first: a bad file or a config for another model raises and leaves the model unchanged.
    """
    op = "load_adapter"
    adapter = read_adapter(op, directory)
    specs = check_fits_model(op, adapter, model)
    layers = apply_layer_specs(model, specs, backend)
    with torch.no_grad():
        for name, layer in layers.items():
            lora_a, lora_b = adapter.tensors[name]
            layer.lora_A.weight.copy_(lora_a)
            layer.lora_B.weight.copy_(lora_b)
    return model


def load_adapters(model: nn.Module, adapters: Mapping[str, PathLike], *,
                  backend: Optional[str] = None) -> nn.Module:
    """Load several PEFT LoRA adapters into MultiLoRALinear pools for mixed-batch serving.

    `adapters` maps the name a request will use to an adapter directory. Every nn.Linear that
    any adapter targets becomes one MultiLoRALinear holding each adapter that targets it; a
    request for an adapter that skips a layer gets the base output there. Choose the adapter of
    each sequence (or row) with `lora_ops.multi_lora_module.mixed_batch(model, names)`.
    Checks everything before it changes the model. Returns `model`.
    """
    op = "load_adapters"
    if not isinstance(adapters, Mapping) or not adapters:
        raise ValueError(f"{op}: adapters must be a non-empty dict of name -> adapter directory, "
                         f"got {adapters!r}")
    for name in adapters:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{op}: adapter names must be non-empty strings, got {name!r}")
    read = {name: read_adapter(op, path) for name, path in adapters.items()}
    specs: Dict[str, Dict[str, LayerSpec]] = {name: check_fits_model(op, adapter, model)
                                              for name, adapter in read.items()}
    per_layer: Dict[str, Dict[str, LayerSpec]] = {}
    for adapter_name, layer_specs in specs.items():
        for layer_name, spec in layer_specs.items():
            per_layer.setdefault(layer_name, {})[adapter_name] = spec

    pools = {}
    for layer_name, by_adapter in per_layer.items():
        pool = MultiLoRALinear.from_linear(model.get_submodule(layer_name), max_adapters=len(by_adapter),
                                           max_rank=max(spec.r for spec in by_adapter.values()),
                                           backend=backend)
        for adapter_name, spec in by_adapter.items():
            lora_a, lora_b = read[adapter_name].tensors[layer_name]
            pool.add_adapter(adapter_name, lora_a, lora_b,
                             lora_scaling(spec.r, spec.lora_alpha, spec.use_rslora))
        pools[layer_name] = pool
    for layer_name, pool in pools.items():
        model.set_submodule(layer_name, pool)
    return model
