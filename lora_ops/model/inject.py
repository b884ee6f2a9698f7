"""inject: put LoRALinear layers into any PyTorch model in place, choosing layers as PEFT does."""
from dataclasses import dataclass
from typing import Dict, Mapping, Optional

from torch import nn

from lora_ops.adapter_args import check_alpha, check_dropout, check_rank
from lora_ops.model.targets import ADAPTER_LAYERS, TargetSpec, check_spec, find_targets, pattern_value
from lora_ops.modules import LoRALinear


@dataclass(frozen=True)
class LayerSpec:
    """The adapter one layer gets."""
    r: int
    lora_alpha: float
    lora_dropout: float
    use_rslora: bool


def check_patterns(op: str, rank_pattern: Optional[Mapping], alpha_pattern: Optional[Mapping]) -> None:
    for argument, patterns, check in (("rank_pattern", rank_pattern, check_rank),
                                      ("alpha_pattern", alpha_pattern, check_alpha)):
        if patterns is None:
            continue
        if not isinstance(patterns, Mapping):
            raise TypeError(f"{op}: {argument} must be a dict of name pattern -> value, got {patterns!r}")
        for key, value in patterns.items():
            if not isinstance(key, str):
                raise TypeError(f"{op}: {argument} keys must be strings, got {key!r}")
            check_spec(op, f"{argument} key", key)
            check(op, f"{argument}[{key!r}]", value)


def check_targets_are_linear(op: str, targets: Mapping[str, nn.Module]) -> None:
    """Every target must be a plain nn.Linear: no nested adapters, no Conv/Embedding/Conv1D."""
    for name, module in targets.items():
        if isinstance(module, ADAPTER_LAYERS):
            raise ValueError(f"{op}: '{name}' already holds a LoRA adapter ({type(module).__name__}); "
                             f"call lora_ops.merge_and_unload(model) first or use a fresh model")
        if not isinstance(module, nn.Linear):
            raise TypeError(f"{op}: '{name}' has type {type(module).__name__}; lora_ops puts adapters on "
                            f"nn.Linear layers only (narrow target_modules or add it to exclude_modules)")


def linear_names(model: nn.Module, limit: int = 8) -> str:
    """A few Linear layer names of `model`, for error messages that say what could match."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    shown = ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")
    return shown or "none"


def apply_layer_specs(model: nn.Module, specs: Mapping[str, LayerSpec],
                      backend: Optional[str] = None) -> Dict[str, LoRALinear]:
    """Swap each named nn.Linear for a LoRALinear sharing its weights, then freeze all but adapters.

    The caller has checked the names and specs; nothing here is expected to fail halfway.
    """
    layers = {}
    for name, spec in specs.items():
        linear = model.get_submodule(name)
        layer = LoRALinear.from_linear(linear, spec.r, spec.lora_alpha, lora_dropout=spec.lora_dropout,
                                       use_rslora=spec.use_rslora, backend=backend)
        layer.train(linear.training)
        layers[name] = layer
    for name, layer in layers.items():
        model.set_submodule(name, layer)
    for param in model.parameters():
        param.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.lora_A.weight.requires_grad_(True)
            module.lora_B.weight.requires_grad_(True)
    return layers


def inject(model: nn.Module, target_modules: TargetSpec, r: int, lora_alpha: Optional[float] = None, *,
           lora_dropout: float = 0.0, use_rslora: bool = False,
           exclude_modules: Optional[TargetSpec] = None,
           rank_pattern: Optional[Mapping[str, int]] = None,
           alpha_pattern: Optional[Mapping[str, float]] = None,
           backend: Optional[str] = None) -> nn.Module:
    """Replace the nn.Linear layers that `target_modules` names with LoRALinear, in place.

    target_modules: a list of module names or name suffixes, a regex matching whole names, or
    "all-linear" (every nn.Linear but the output head). rank_pattern / alpha_pattern map name
    patterns to a layer's own r / lora_alpha (lora_alpha None means r). Every parameter but the
    adapters' is frozen. Returns `model`; `lora_ops.lora_summary(model)` describes the result.
    Everything is checked before the model is touched: an error leaves it as it was.
    """
    op = "inject"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{op}: model must be an nn.Module, got {type(model).__name__}")
    check_spec(op, "target_modules", target_modules)
    if target_modules is None:
        raise ValueError(f"{op}: target_modules is required (module names, a regex, or 'all-linear')")
    check_spec(op, "exclude_modules", exclude_modules)
    check_rank(op, "r", r)
    if lora_alpha is not None:
        check_alpha(op, "lora_alpha", lora_alpha)
    check_dropout(op, lora_dropout)
    check_patterns(op, rank_pattern, alpha_pattern)

    targets = find_targets(model, target_modules, exclude_modules)
    if not targets:
        raise ValueError(f"{op}: target_modules={target_modules!r} matches no module of "
                         f"{type(model).__name__} (its Linear layers: {linear_names(model)})")
    check_targets_are_linear(op, targets)
    specs = {}
    for name in targets:
        layer_r = pattern_value(rank_pattern, name, r)
        layer_alpha = pattern_value(alpha_pattern, name, layer_r if lora_alpha is None else lora_alpha)
        specs[name] = LayerSpec(layer_r, layer_alpha, float(lora_dropout), bool(use_rslora))
    apply_layer_specs(model, specs, backend)
    return model
