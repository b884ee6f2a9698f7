"""Autocast on the Python paths: the rule csrc/torch_autocast.cpp gives the compiled ops, for the
reference and Triton backends.

Inside a torch.autocast region on the operands' device type, the layer functions (lora_linear,
multi_lora_linear, lora_shrink) cast their matmul operands (x, weight, bias, the adapter weights;
not the fp32 scalings, not the integer ranks and indices) to the region's dtype and run with
autocast off, as F.linear does. Autograd records the casts, so fp32 parameters get fp32
gradients.
"""
from typing import Optional

import torch
from torch import Tensor

# The device types the ops run on; autocast elsewhere (xpu, mps) has nothing to cast for them.
_DEVICE_TYPES = ("cpu", "cuda")


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The dtype an autocast region on this device computes matmuls in; None outside one."""
    kind = device.type
    if kind in _DEVICE_TYPES and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return None


def cast_operand(t, dtype: torch.dtype):
    """A floating tensor (or list of them: adapter stacks) in `dtype`; anything else as it is,
    for the op's checks to accept or refuse."""
    if isinstance(t, Tensor):
        return t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t
    if isinstance(t, (list, tuple)):
        return type(t)(cast_operand(s, dtype) for s in t)
    return t


def autocast_operands(*operands):
    """The operands as an autocast region on the first one's device casts them (cast_operand);
    as they are outside one, or where the first is no tensor (for the checks to refuse)."""
    first = operands[0]
    dtype = autocast_dtype(first.device) if isinstance(first, Tensor) else None
    return operands if dtype is None else tuple(cast_operand(t, dtype) for t in operands)


def call_cast(fn, operands, *args, **kwargs):
    """fn(*operands, *args, **kwargs) with the operands cast as the autocast region on their device
    casts them, and autocast off inside: a public function's call of itself on the reference and
    Triton backends, which have no autocast kernel."""
    cast = autocast_operands(*operands)  # before the region is left: it reads the region's dtype
    with torch.autocast(operands[0].device.type, enabled=False):
        return fn(*cast, *args, **kwargs)
