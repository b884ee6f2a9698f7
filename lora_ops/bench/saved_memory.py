"""T5: activation memory a layer keeps for its backward pass beyond the tensors that are alive
anyway (its input x and its parameters), counted by autograd's saved-tensor hooks.

Every tensor autograd saves (ctx.save_for_backward of custom ops included) passes the pack
hook; storages are counted once, and storages of x and of the parameters are not counted.
"""
from typing import Callable, Iterable

import torch
from torch import Tensor


def saved_activation_bytes(forward: Callable[[], Tensor], alive: Iterable[Tensor]) -> int:
    alive_storages = {t.untyped_storage().data_ptr() for t in alive if t is not None}
    extra = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in alive_storages and ptr not in extra:
            extra[ptr] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(extra.values())
