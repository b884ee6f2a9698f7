"""What LoRA did to a model: which layers carry adapters and how much of the model trains.

Computed from the model each time it is asked for, so it stays true after inject, load_adapter,
from_peft, merge_and_unload or a manual change of requires_grad.
"""
from dataclasses import dataclass
from typing import Dict, List

from torch import nn

from lora_ops.model.targets import ADAPTER_LAYERS
from lora_ops.modules import LoRALinear


@dataclass(frozen=True)
class LoRASummary:
    lora_layers: List[str]          # names of the LoRALinear / MultiLoRALinear layers
    ranks: Dict[str, int]           # LoRALinear name -> r
    trainable_params: int
    total_params: int

    @property
    def trainable_share(self) -> float:
        """Trainable parameters as a fraction of all parameters (0 for an empty model)."""
        return self.trainable_params / self.total_params if self.total_params else 0.0

    def __str__(self) -> str:
        return (f"LoRA layers: {len(self.lora_layers)} || trainable params: {self.trainable_params:,} "
                f"|| all params: {self.total_params:,} || trainable: {100 * self.trainable_share:.4f}%")


def lora_summary(model: nn.Module) -> LoRASummary:
    """The LoRA layers of `model` and its trainable-parameter count and share."""
    layers = [name for name, module in model.named_modules() if isinstance(module, ADAPTER_LAYERS)]
    ranks = {name: module.r for name, module in model.named_modules() if isinstance(module, LoRALinear)}
    params = list(model.parameters())  # shared parameters (tied embeddings, wrapped bases) once
    return LoRASummary(lora_layers=layers, ranks=ranks,
                       trainable_params=sum(p.numel() for p in params if p.requires_grad),
                       total_params=sum(p.numel() for p in params))
