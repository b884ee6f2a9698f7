"""Reading a PEFT LoRA adapter directory into checked, plain Python values.

A directory holds adapter_config.json and adapter_model.safetensors (or the older
adapter_model.bin), with tensors named `base_model.model.<module>.lora_A.weight` /
`.lora_B.weight`. Everything that lora_ops cannot reproduce exactly is refused here, by name,
before any model is touched.
"""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from lora_ops.adapter_args import check_alpha, check_dropout, check_rank
from lora_ops.model.inject import LayerSpec, check_patterns, check_targets_are_linear, linear_names
from lora_ops.model.targets import check_spec, find_targets, pattern_value

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")

# Config fields of PEFT features that change what a layer computes or which tensors the file
# holds; any of them set to something other than its neutral value is refused.
_UNSUPPORTED = {
    "use_dora": (False, None),
    "lora_bias": (False, None),
    "fan_in_fan_out": (False, None),
    "bias": ("none", None),
    "modules_to_save": (None, []),
    "target_parameters": (None, []),
    "layer_replication": (None, []),
    "trainable_token_indices": (None, [], {}),
    "use_qalora": (False, None),
    "use_bdlora": (False, None),
    "alora_invocation_tokens": (None, []),
    "megatron_config": (None, {}),
}


@dataclass(frozen=True)
class LoRAConfig:
    """The fields of a PEFT LoraConfig that decide which layers get which adapter."""
    r: int
    lora_alpha: float
    lora_dropout: float
    use_rslora: bool
    target_modules: Union[str, List[str]]
    exclude_modules: Optional[Union[str, List[str]]]
    rank_pattern: Dict[str, int]
    alpha_pattern: Dict[str, float]
    layers_to_transform: Optional[Union[int, List[int]]]
    layers_pattern: Optional[Union[str, List[str]]]

    def layer_spec(self, name: str) -> LayerSpec:
        return LayerSpec(r=pattern_value(self.rank_pattern, name, self.r),
                         lora_alpha=pattern_value(self.alpha_pattern, name, self.lora_alpha),
                         lora_dropout=self.lora_dropout, use_rslora=self.use_rslora)


@dataclass(frozen=True)
class AdapterFile:
    directory: Path
    config: LoRAConfig
    tensors: Dict[str, Tuple[torch.Tensor, torch.Tensor]]   # module name -> (lora_A, lora_B)


def read_adapter(op: str, directory: Union[str, Path]) -> AdapterFile:
    """Read and check one adapter directory; errors name the file and what is wrong with it."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{op}: no adapter directory at '{directory}'")
    config = parse_config(op, directory / CONFIG_NAME, read_json(op, directory / CONFIG_NAME))
    return AdapterFile(directory, config, group_tensors(op, directory, read_tensors(op, directory)))


def read_json(op: str, path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{op}: '{path.parent}' has no {path.name} (a PEFT adapter directory holds "
                                f"{CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{op}: {path} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{op}: {path} must hold a JSON object, found {type(data).__name__}")
    return data


def parse_config(op: str, path: Path, data: dict) -> LoRAConfig:
    where = f"{op}: {path}"
    peft_type = data.get("peft_type")
    if peft_type != "LORA":
        raise ValueError(f"{where}: peft_type is {peft_type!r}; lora_ops reads LoRA adapters only ('LORA')")
    for field, neutral in _UNSUPPORTED.items():
        if field in data and data[field] not in neutral:
            raise ValueError(f"{where}: {field}={data[field]!r} is a PEFT feature lora_ops does not support "
                             f"(supported: {field}={neutral[0]!r})")
    for field in ("r", "target_modules"):
        if field not in data:
            raise ValueError(f"{where}: the config has no '{field}' field")
    try:
        check_rank(where, "r", data["r"])
        check_alpha(where, "lora_alpha", data.get("lora_alpha", 8))
        check_dropout(where, data.get("lora_dropout", 0.0))
        check_spec(where, "target_modules", data["target_modules"])
        check_spec(where, "exclude_modules", data.get("exclude_modules"))
        check_patterns(where, data.get("rank_pattern") or {}, data.get("alpha_pattern") or {})
    except TypeError as err:
        raise ValueError(str(err)) from None
    if data["target_modules"] is None:
        raise ValueError(f"{where}: target_modules is null; lora_ops needs the modules the adapter is on")
    if not isinstance(data.get("use_rslora", False), bool):
        raise ValueError(f"{where}: use_rslora must be true or false, got {data['use_rslora']!r}")
    layers = data.get("layers_to_transform")
    if layers is not None and not (isinstance(layers, int) or (
            isinstance(layers, list) and all(isinstance(i, int) for i in layers))):
        raise ValueError(f"{where}: layers_to_transform must be an int or a list of ints, got {layers!r}")
    return LoRAConfig(r=data["r"], lora_alpha=data.get("lora_alpha", 8),
                      lora_dropout=float(data.get("lora_dropout", 0.0)),
                      use_rslora=data.get("use_rslora", False),
                      target_modules=_as_spec(data["target_modules"]),
                      exclude_modules=_as_spec(data.get("exclude_modules")),
                      rank_pattern=dict(data.get("rank_pattern") or {}),
                      alpha_pattern=dict(data.get("alpha_pattern") or {}),
                      layers_to_transform=layers if layers != [] else None,
                      layers_pattern=data.get("layers_pattern") or None)


def _as_spec(spec):
    return spec if spec is None or isinstance(spec, str) else list(spec)


def read_tensors(op: str, directory: Path) -> Dict[str, torch.Tensor]:
    path = directory / WEIGHTS_NAME
    legacy = directory / LEGACY_WEIGHTS_NAME
    if path.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"{op}: cannot read {path}: not a valid safetensors file ({err})") from None
    if legacy.is_file():
        try:
            tensors = torch.load(str(legacy), map_location="cpu", weights_only=True)
        except Exception as err:  # torch.load raises many types for a damaged or foreign pickle
            raise ValueError(f"{op}: cannot read {legacy}: {type(err).__name__}: {err}") from None
        if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
            raise ValueError(f"{op}: {legacy} does not hold a dict of tensors")
        return tensors
    raise FileNotFoundError(f"{op}: '{directory}' has no {WEIGHTS_NAME} (nor {LEGACY_WEIGHTS_NAME})")


def group_tensors(op: str, directory: Path,
                  tensors: Dict[str, torch.Tensor]) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """{module name: (lora_A, lora_B)} from the file's flat keys, with or without PEFT's prefix."""
    halves: Dict[str, Dict[str, torch.Tensor]] = {}
    foreign = []
    for key, tensor in tensors.items():
        name = key[len(KEY_PREFIX):] if key.startswith(KEY_PREFIX) else key
        suffix = next((s for s in LORA_SUFFIXES if name.endswith(s)), None)
        if suffix is None:
            foreign.append(key)
            continue
        if not tensor.is_floating_point():
            raise ValueError(f"{op}: {directory / WEIGHTS_NAME}: '{key}' has dtype {tensor.dtype}; "
                             f"LoRA weights must be floating point")
        halves.setdefault(name[:-len(suffix)], {})[suffix] = tensor
    if foreign:
        shown = ", ".join(sorted(foreign)[:4]) + (", ..." if len(foreign) > 4 else "")
        raise ValueError(f"{op}: '{directory}' holds tensors lora_ops cannot place ({shown}); "
                         f"only <module>.lora_A.weight and <module>.lora_B.weight are supported")
    if not halves:
        raise ValueError(f"{op}: '{directory}' holds no LoRA tensors")
    grouped = {}
    for name, pair in halves.items():
        missing = [s.lstrip(".") for s in LORA_SUFFIXES if s not in pair]
        if missing:
            raise ValueError(f"{op}: '{directory}' has no {missing[0]} for module '{name}'")
        grouped[name] = (pair[LORA_SUFFIXES[0]], pair[LORA_SUFFIXES[1]])
    return grouped


def check_fits_model(op: str, adapter: AdapterFile, model: nn.Module) -> Dict[str, LayerSpec]:
    """The layer specs of `adapter` on `model`, after checking names, types and tensor shapes."""
    config = adapter.config
    targets = find_targets(model, config.target_modules, config.exclude_modules,
                           config.layers_to_transform, config.layers_pattern)
    if not targets:
        raise ValueError(f"{op}: the config in '{adapter.directory}' targets {config.target_modules!r}, "
                         f"which matches no module of {type(model).__name__} "
                         f"(its Linear layers: {linear_names(model)})")
    check_targets_are_linear(op, targets)
    without_weights = [name for name in targets if name not in adapter.tensors]
    if without_weights:
        raise ValueError(f"{op}: the config in '{adapter.directory}' targets '{without_weights[0]}' "
                         f"but the weights file has no tensors for it "
                         f"({len(without_weights)} such module(s)); the adapter was made for another model")
    unplaced = [name for name in adapter.tensors if name not in targets]
    if unplaced:
        raise ValueError(f"{op}: '{adapter.directory}' has weights for '{unplaced[0]}', which "
                         f"{type(model).__name__} lacks or the config does not target "
                         f"({len(unplaced)} such module(s)); the adapter was made for another model")
    specs = {}
    for name, linear in targets.items():
        spec = config.layer_spec(name)
        lora_a, lora_b = adapter.tensors[name]
        for label, tensor, expected in (("lora_A", lora_a, (spec.r, linear.in_features)),
                                        ("lora_B", lora_b, (linear.out_features, spec.r))):
            if tuple(tensor.shape) != expected:
                raise ValueError(f"{op}: '{adapter.directory}': {name}.{label}.weight has shape "
                                 f"{tuple(tensor.shape)} but r={spec.r} and the model's layer "
                                 f"({linear.in_features} -> {linear.out_features}) need {expected}")
        specs[name] = spec
    return specs
