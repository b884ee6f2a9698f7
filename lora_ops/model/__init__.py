"""Model-level LoRA: inject into any PyTorch model, merge, PEFT's file format both ways, from_peft."""
from lora_ops.model.from_peft import from_peft
from lora_ops.model.inject import inject
from lora_ops.model.merge import merge, merge_and_unload, unmerge
from lora_ops.model.peft_format import load_adapter, load_adapters, save_adapter
from lora_ops.model.summary import LoRASummary, lora_summary

__all__ = ["inject", "merge", "unmerge", "merge_and_unload", "save_adapter", "load_adapter",
           "load_adapters", "from_peft", "lora_summary", "LoRASummary"]
