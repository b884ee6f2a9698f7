"""MultiLoRALinear: one frozen base linear layer and a pool of LoRA adapters, any mix of which a
batch can use at once (each row or sequence names its own adapter, or none)."""
import contextlib
from typing import Dict, Iterator, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lora_ops.lora_linear import check_scaling
from lora_ops.module_tensors import module_tensor
from lora_ops.multi_lora import multi_lora_linear

# The adapter name PEFT uses for "no adapter" in mixed batches; None means the same here.
BASE_ONLY = "__base__"

AdapterNames = Union[None, Sequence[Optional[str]], Tensor]


class MultiLoRALinear(nn.Module):
    """y = x W^T + b + scaling_a * (x A_a^T) B_a^T, with adapter a chosen per row or sequence.

    The adapters live in stacked parameters `lora_A [max_adapters, max_rank, in_features]` and
    `lora_B [max_adapters, out_features, max_rank]` (an adapter of rank r fills the first r
    rows of its lora_A slot and columns of its lora_B slot), so a batch mixing them is a single
    fused multi_lora_linear op. The base weight and bias are shared with the wrapped nn.Linear
    and frozen; the adapter stacks are trainable, each slot getting the gradient its adapter
    would get trained alone on its own tokens. There is no dropout on the adapter path.
    """

    def __init__(self, linear: nn.Linear, max_adapters: int, max_rank: int,
                 backend: Optional[str] = None):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"MultiLoRALinear: expected an nn.Linear, got {type(linear).__name__}")
        for name, value in (("max_adapters", max_adapters), ("max_rank", max_rank)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MultiLoRALinear: {name} must be a positive int, got {value!r}")
        linear.weight.requires_grad_(False)
        if linear.bias is not None:
            linear.bias.requires_grad_(False)
        self.base_layer = linear
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.max_adapters, self.max_rank = max_adapters, max_rank
        self.backend = backend
        factory = {"device": linear.weight.device, "dtype": linear.weight.dtype}
        self.lora_A = nn.Parameter(torch.zeros(max_adapters, max_rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(max_adapters, self.out_features, max_rank, **factory))
        self.register_buffer("scalings", torch.zeros(max_adapters, dtype=torch.float32,
                                                     device=linear.weight.device))
        self.register_buffer("ranks", torch.zeros(max_adapters, dtype=torch.int32,
                                                  device=linear.weight.device))
        self._slots: Dict[str, int] = {}
        self._mixed_batch_index: Optional[Tensor] = None  # set by mixed_batch()

    @classmethod
    def from_linear(cls, linear: nn.Linear, max_adapters: int, max_rank: int,
                    backend: Optional[str] = None) -> "MultiLoRALinear":
        """Wrap `linear`, sharing (not copying) its weight and bias, which become frozen."""
        return cls(linear, max_adapters, max_rank, backend=backend)

    @property
    def adapter_names(self) -> List[str]:
        return list(self._slots)

    def adapter_slot(self, name: str) -> int:
        """The stack index of adapter `name` (what a token_adapter tensor holds for it)."""
        if name not in self._slots:
            raise KeyError(f"MultiLoRALinear: no adapter named {name!r} (have: {self.adapter_names})")
        return self._slots[name]

    @torch.no_grad()
    def add_adapter(self, name: str, lora_A: Tensor, lora_B: Tensor, scaling: float) -> None:
        """Add adapter `name` (or replace it, in its slot): lora_A [r, in_features],
        lora_B [out_features, r] (PEFT's lora_A/lora_B weights as they are), r <= max_rank."""
        op = "MultiLoRALinear.add_adapter"
        if not isinstance(name, str) or not name or name == BASE_ONLY:
            raise ValueError(f"{op}: name must be a non-empty string other than {BASE_ONLY!r}, got {name!r}")
        for arg, t in (("lora_A", lora_A), ("lora_B", lora_B)):
            if not isinstance(t, Tensor) or t.dim() != 2:
                seen = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"{op}: {arg} must be a 2-D Tensor, got {seen}")
            if not t.dtype.is_floating_point:
                raise ValueError(f"{op}: {arg} must be floating point, got {t.dtype}")
        r = lora_A.shape[0]
        if not 1 <= r <= self.max_rank:
            raise ValueError(f"{op}: adapter {name!r} has rank {r} (lora_A shape {tuple(lora_A.shape)}); "
                             f"this layer holds ranks 1..max_rank={self.max_rank}")
        if lora_A.shape[1] != self.in_features:
            raise ValueError(f"{op}: lora_A has {lora_A.shape[1]} columns but the layer has "
                             f"{self.in_features} input features")
        if tuple(lora_B.shape) != (self.out_features, r):
            raise ValueError(f"{op}: lora_B must have shape ({self.out_features}, {r}) = "
                             f"(out_features, rank), got {tuple(lora_B.shape)}")
        if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
            raise ValueError(f"{op}: scaling must be a Python number, got {scaling!r}")
        # Stored as a float32: NaN, inf or past float32's range would make the adapter's tokens NaN.
        check_scaling(op, scaling)
        slot = self._slots.get(name)
        if slot is None:
            free = sorted(set(range(self.max_adapters)) - set(self._slots.values()))
            if not free:
                raise RuntimeError(f"{op}: all {self.max_adapters} adapter slots are taken "
                                   f"({self.adapter_names}); remove one first")
            slot = free[0]
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        self.lora_A[slot, :r].copy_(lora_A)
        self.lora_B[slot, :, :r].copy_(lora_B)
        self.scalings[slot] = float(scaling)
        self.ranks[slot] = r
        self._slots[name] = slot

    @torch.no_grad()
    def remove_adapter(self, name: str) -> None:
        """Free adapter `name`'s slot; its rank becomes 0, so a stale index to it does nothing."""
        slot = self.adapter_slot(name)
        del self._slots[name]
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        self.scalings[slot] = 0.0
        self.ranks[slot] = 0

    def _slots_of(self, names: Sequence[Optional[str]], missing_is_base: bool) -> List[int]:
        return [-1 if n is None or n == BASE_ONLY or (missing_is_base and n not in self._slots)
                else self.adapter_slot(n) for n in names]

    def forward(self, x: Tensor, adapter_names: AdapterNames = None) -> Tensor:
        """x [M, in_features] with one adapter name per row, or x [batch, seq, in_features] with
        one per sequence; None (or "__base__") for the base model only. `adapter_names` may also
        be an integer tensor of slots (see adapter_slot), which needs no host work: use it for
        CUDA graphs. Without adapter_names the layer runs the base only, or, inside
        `mixed_batch(model, names)`, the names given there."""
        if adapter_names is None:
            if self._mixed_batch_index is None:
                base = self._modules["base_layer"]
                return F.linear(x, module_tensor(base, "weight"), module_tensor(base, "bias"))
            index = self._mixed_batch_index
        elif isinstance(adapter_names, Tensor):
            index = adapter_names
        else:
            index = torch.tensor(self._slots_of(list(adapter_names), missing_is_base=False),
                                 dtype=torch.int32).to(x.device)
        if x.dim() not in (2, 3):
            raise ValueError(f"MultiLoRALinear: x must be [tokens, features] or [batch, seq, "
                             f"features], got shape {tuple(x.shape)}")
        if index.dim() != 1 or index.shape[0] != x.shape[0]:
            what = "row" if x.dim() == 2 else "sequence"
            raise ValueError(f"MultiLoRALinear: x has shape {tuple(x.shape)}, so adapter_names needs "
                             f"one entry per {what} ({x.shape[0]}), got shape {tuple(index.shape)}")
        if x.dim() == 2:
            routing = {"token_adapter": index}
        else:
            seq = x.shape[1]  # sequence i is segment i: tokens [i * seq, (i + 1) * seq)
            routing = {"seg_indptr": torch.arange(0, (x.shape[0] + 1) * seq, seq, device=x.device,
                                                  dtype=torch.int32),
                       "seg_adapter": index}
        base = self._modules["base_layer"]
        return multi_lora_linear(x, module_tensor(base, "weight"), module_tensor(base, "bias"),
                                 module_tensor(self, "lora_A"), module_tensor(self, "lora_B"),
                                 module_tensor(self, "scalings"), module_tensor(self, "ranks"),
                                 backend=self.backend, **routing)

    def get_extra_state(self) -> Dict[str, int]:
        """The adapter name of every slot travels with state_dict() (the stacks, ranks and
        scalings are its tensors)."""
        return dict(self._slots)

    def set_extra_state(self, state: Dict[str, int]) -> None:
        self._slots = dict(state)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"max_adapters={self.max_adapters}, max_rank={self.max_rank}, "
                f"adapters={self.adapter_names}, backend={self.backend}")


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names: Sequence[Optional[str]]) -> Iterator[None]:
    """Run `model` on a batch mixing adapters, as PEFT's `model(..., adapter_names=...)` does.

    Within the block every MultiLoRALinear in `model` called without adapter_names uses these:
    one name per row of a 2-D input or per sequence of a 3-D one, None or "__base__" for the
    base model. A layer that does not hold a named adapter (it targets other layers) runs the
    base for those rows; a name no layer holds is an error.
    """
    layers = [m for m in model.modules() if isinstance(m, MultiLoRALinear)]
    names = list(adapter_names)
    known = set().union(*(layer.adapter_names for layer in layers))
    unknown = sorted({n for n in names if n is not None and n != BASE_ONLY} - known)
    if unknown:
        raise ValueError(f"mixed_batch: no MultiLoRALinear in the model holds adapter(s) {unknown} "
                         f"(known: {sorted(known)})")
    for layer in layers:
        layer._mixed_batch_index = torch.tensor(layer._slots_of(names, missing_is_base=True),
                                                dtype=torch.int32).to(layer.ranks.device)
    try:
        yield
    finally:
        for layer in layers:
            layer._mixed_batch_index = None
