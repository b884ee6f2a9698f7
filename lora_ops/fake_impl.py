"""Registration of the fake (meta) implementations of lora_ops' custom ops."""
import functools
import inspect

import torch
from torch import Tensor


def _tensors(values):
    for v in values:
        if isinstance(v, Tensor):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from _tensors(v)


def register_fake(qualname: str, fake, host_args=()) -> None:
    """torch.library.register_fake(qualname)(fake), the fake first requiring every tensor
    argument on one device, and those named in `host_args` (a dropout seed, read on the host)
    on the CPU.

    The dispatcher picks a call's kernel from all its operands' devices, and a meta operand
    outranks the others: a call with real CPU tensors and one meta tensor runs the fake, whose
    output (new_empty of a real operand) would be returned as the answer, uninitialised. Under
    torch.compile the check runs once, at trace time, on the fake tensors' devices.
    """
    op = qualname.split("::")[-1]
    signature = inspect.signature(fake)

    @functools.wraps(fake)
    def one_device(*args, **kwargs):
        named = signature.bind(*args, **kwargs).arguments
        for name in host_args:
            t = named.get(name)
            torch._check_value(
                not isinstance(t, Tensor) or t.device.type == "cpu",
                lambda: f"{op}: {name} must be a CPU tensor (its launcher reads it on the host), "
                        f"got one on {t.device}")
        tensors = list(_tensors(v for k, v in named.items() if k not in host_args))
        for t in tensors[1:]:
            torch._check_value(
                t.device == tensors[0].device,
                lambda: f"{op}: operands are on several devices ({tensors[0].device} and "
                        f"{t.device}); all must be on one")
        return fake(*args, **kwargs)

    torch.library.register_fake(qualname)(one_device)
