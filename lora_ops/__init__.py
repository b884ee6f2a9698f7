"""lora_ops: fused LoRA kernels for PyTorch (CUDA, Triton, CPU, and a pure-PyTorch reference)."""
from lora_ops._backend import available_backends, build_info
from lora_ops.lora_linear import lora_linear
from lora_ops.modules import LoRALinear, lora_scaling

__version__ = "0.1.0"

__all__ = ["available_backends", "build_info", "lora_linear", "LoRALinear", "lora_scaling",
           "__version__"]
