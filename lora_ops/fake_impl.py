"""Registration of the fake (meta) implementations of lora_ops' custom ops."""
import functools
import inspect

from typing import Callable, Mapping, Optional

import torch
from torch import Tensor

# check(op, tensor, operands' device): raises for a bad argument that may live on the host
HostCheck = Callable[[str, Tensor, torch.device], None]


def _tensors(named):
    """(name, tensor) of every tensor among named arguments, list elements as name[i]."""
    for name, v in named:
        if isinstance(v, Tensor):
            yield name, v
        elif isinstance(v, (list, tuple)):
            yield from _tensors((f"{name}[{i}]", item) for i, item in enumerate(v))


def register_fake(qualname: str, fake,
                  host_args: Optional[Mapping[str, HostCheck]] = None) -> None:
    """torch.library.register_fake(qualname)(fake), the fake first requiring every tensor
    argument on one device, but those named in `host_args` (a dropout seed, which may also be on
    the host), which their own check(op, tensor, device of the others) vets instead.

    The dispatcher picks a call's kernel from all its operands' devices, and a meta operand
    outranks the others: a call with real CPU tensors and one meta tensor runs the fake, whose
    output (new_empty of a real operand) would be returned as the answer, uninitialised. Under
    torch.compile the checks run once, at trace time, on the fake tensors.
    """
    op = qualname.split("::")[-1]
    signature = inspect.signature(fake)
    host_args = dict(host_args or {})

    @functools.wraps(fake)
    def one_device(*args, **kwargs):
        named = signature.bind(*args, **kwargs).arguments
        tensors = list(_tensors((k, v) for k, v in named.items() if k not in host_args))
        first, device = tensors[0][0], tensors[0][1].device
        for name, t in tensors[1:]:
            torch._check_value(
                t.device == device,
                lambda: f"{op}: operands are on several devices: {name} is on {t.device} but "
                        f"{first} is on {device}; all must be on one")
        for name, check in host_args.items():
            if isinstance(named.get(name), Tensor):
                check(op, named[name], device)
        return fake(*args, **kwargs)

    torch.library.register_fake(qualname)(one_device)
