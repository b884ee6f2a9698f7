"""Fold adapters into the base weights and back, or for good (plain nn.Linear layers again)."""
from typing import Dict

from torch import nn

from lora_ops.modules import LoRALinear
from lora_ops.multi_lora_module import MultiLoRALinear


def _lora_layers(op: str, model: nn.Module) -> Dict[str, LoRALinear]:
    """The model's LoRALinear layers; multi-adapter pools cannot be folded into one weight."""
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, MultiLoRALinear):
            raise ValueError(f"{op}: '{name}' is a MultiLoRALinear pool of several adapters, which "
                             f"cannot be folded into one base weight")
        if isinstance(module, LoRALinear):
            layers[name] = module
    return layers


def merge(model: nn.Module) -> nn.Module:
    """Add scaling * B A into each LoRALinear's base weight; forward becomes a plain linear."""
    for layer in _lora_layers("merge", model).values():
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Subtract the adapters back out of the base weights (exact up to rounding)."""
    for layer in _lora_layers("unmerge", model).values():
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by a plain nn.Linear with its adapter folded in, in place."""
    for name, layer in _lora_layers("merge_and_unload", model).items():
        linear = layer.to_linear()
        linear.train(layer.training)
        model.set_submodule(name, linear)
    return model
