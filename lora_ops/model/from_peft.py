"""from_peft: swap a PEFT model's LoRA Linear layers for lora_ops' fused LoRALinear, in place.

The new layers share the PEFT layers' Parameter objects (base weight and bias, lora_A, lora_B),
so an optimizer built on the PEFT model keeps stepping the same tensors with the same state.
"""
from typing import Dict, Optional, Tuple

from torch import nn

from lora_ops.modules import LoRALinear, lora_scaling


def _dropout_p(op: str, name: str, dropout: nn.Module) -> float:
    if isinstance(dropout, nn.Identity):
        return 0.0
    if type(dropout) is nn.Dropout:
        return float(dropout.p)
    raise ValueError(f"{op}: '{name}' uses {type(dropout).__name__} as LoRA dropout; lora_ops "
                     f"supports nn.Dropout only")


def _check_layer(op: str, name: str, layer) -> Tuple[str, float]:
    """(adapter name, dropout p) of one PEFT LoRA Linear, or a clear refusal of what it cannot take."""
    from peft.tuners.lora.layer import Linear as PeftLoraLinear

    if type(layer) is not PeftLoraLinear:
        raise ValueError(f"{op}: '{name}' is a PEFT {type(layer).__module__}.{type(layer).__name__}; "
                         f"lora_ops takes LoRA on plain nn.Linear layers only (no Conv, Embedding, "
                         f"quantized or non-LoRA tuner layers)")
    loaded = sorted(layer.lora_A.keys())
    active = list(layer.active_adapters)
    if len(active) != 1:
        raise ValueError(f"{op}: '{name}' has {len(active)} active adapters {active}; lora_ops layers "
                         f"hold one (choose one with peft_model.set_adapter)")
    adapter = active[0]
    if loaded != [adapter]:
        raise ValueError(f"{op}: '{name}' holds adapters {loaded} (active: {adapter!r}); the inactive "
                         f"ones would be lost: remove them with peft_model.delete_adapter first")
    if layer.disable_adapters:
        raise ValueError(f"{op}: '{name}' has its adapters disabled; enable them first")
    if layer.merged:
        raise ValueError(f"{op}: '{name}' has its adapter merged into the base weight; "
                         f"call peft_model.unmerge_adapter() first")
    if layer.use_dora.get(adapter) or adapter in layer.lora_magnitude_vector:
        raise ValueError(f"{op}: '{name}' uses DoRA, which lora_ops does not implement")
    if layer.lora_variant.get(adapter) is not None:
        raise ValueError(f"{op}: '{name}' uses the LoRA variant "
                         f"{type(layer.lora_variant[adapter]).__name__}, which lora_ops does not implement")
    if layer.lora_bias.get(adapter) or layer.lora_B[adapter].bias is not None:
        raise ValueError(f"{op}: '{name}' has a bias on lora_B (lora_bias=True), which lora_ops does "
                         f"not implement")
    if layer.fan_in_fan_out:
        raise ValueError(f"{op}: '{name}' stores its weight transposed (fan_in_fan_out=True, GPT-2 "
                         f"Conv1D); lora_ops takes nn.Linear layout only")
    base = layer.get_base_layer()
    if type(base) is not nn.Linear:
        raise ValueError(f"{op}: the base layer of '{name}' is a {type(base).__name__}; lora_ops takes "
                         f"plain nn.Linear bases only")
    for label, param in (("weight", base.weight), ("bias", base.bias)):
        if param is not None and param.requires_grad:
            raise ValueError(f"{op}: the base {label} of '{name}' is trainable; lora_ops layers keep "
                             f"the base frozen (PEFT's bias='all'/'lora_only' or a manual unfreeze)")
    r, alpha = layer.r[adapter], layer.lora_alpha[adapter]
    use_rslora = layer.use_rslora.get(adapter, False)
    expected = lora_scaling(r, alpha, use_rslora)
    if abs(layer.scaling[adapter] - expected) > 1e-12 * abs(expected):
        raise ValueError(f"{op}: '{name}' has scaling {layer.scaling[adapter]} but r={r}, "
                         f"lora_alpha={alpha} give {expected} (was it rescaled with scale_layer?)")
    return adapter, _dropout_p(op, name, layer.lora_dropout[adapter])


def from_peft(peft_model: nn.Module, *, backend: Optional[str] = None) -> nn.Module:
    """Replace every PEFT LoRA Linear of `peft_model` with a LoRALinear, in place; returns it.

    Outputs, gradients and optimizer steps stay the same (within floating-point tolerance;
    with dropout the masks differ, their distribution does not). Everything is checked first:
    DoRA, LoRA on Conv/Embedding/quantized layers, several adapters, merged or disabled
    adapters are refused with an error naming the layer, and the model is left as it was.
    """
    op = "from_peft"
    from peft.tuners.tuners_utils import BaseTunerLayer

    if not isinstance(peft_model, nn.Module):
        raise TypeError(f"{op}: expected a PEFT model (an nn.Module), got {type(peft_model).__name__}")
    found: Dict[str, Tuple[nn.Module, str, float]] = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, BaseTunerLayer):
            adapter, p = _check_layer(op, name, module)
            found[name] = (module, adapter, p)
    if not found:
        raise ValueError(f"{op}: {type(peft_model).__name__} has no PEFT LoRA layers to swap")

    for name, (layer, adapter, p) in found.items():
        new = LoRALinear.from_linear(layer.get_base_layer(), layer.r[adapter], layer.lora_alpha[adapter],
                                     lora_dropout=p, use_rslora=layer.use_rslora.get(adapter, False),
                                     backend=backend)
        new.lora_A.weight = layer.lora_A[adapter].weight
        new.lora_B.weight = layer.lora_B[adapter].weight
        new.train(layer.training)
        peft_model.set_submodule(name, new)
    return peft_model
