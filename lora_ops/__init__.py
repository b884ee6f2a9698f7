"""lora_ops: fused LoRA kernels for PyTorch (CUDA, Triton, CPU, and a pure-PyTorch reference)."""
from lora_ops._backend import available_backends, build_info, cuda_paths
from lora_ops.lora_linear import lora_linear
from lora_ops.model import (LoRASummary, from_peft, inject, load_adapter, load_adapters, lora_summary,
                            merge, merge_and_unload, save_adapter, unmerge)
from lora_ops.modules import LoRALinear, lora_scaling
from lora_ops.multi_lora import lora_expand, lora_shrink, multi_lora_linear, segments_from_token_adapter
from lora_ops.multi_lora_module import MultiLoRALinear, mixed_batch

__version__ = "0.2.0"

__all__ = [
    "available_backends", "build_info", "cuda_paths", "__version__",
    # single adapter
    "lora_linear", "LoRALinear", "lora_scaling",
    # many adapters in one batch
    "lora_shrink", "lora_expand", "multi_lora_linear", "segments_from_token_adapter",
    "MultiLoRALinear", "mixed_batch",
    # whole models and PEFT's format
    "inject", "merge", "unmerge", "merge_and_unload", "save_adapter", "load_adapter", "load_adapters",
    "from_peft", "lora_summary", "LoRASummary",
]
