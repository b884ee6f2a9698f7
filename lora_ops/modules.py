"""LoRALinear: a drop-in for nn.Linear whose forward and backward are the fused lora_linear op."""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lora_ops.adapter_args import check_alpha, check_dropout, check_rank
from lora_ops.dropout_seed import SeedLike
from lora_ops.lora_linear import lora_linear
from lora_ops.module_tensors import module_tensor


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool) -> float:
    """alpha / r, or alpha / sqrt(r) with rsLoRA (PEFT's convention)."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


class LoRALinear(nn.Module):
    """y = x W^T + b + scaling * lora_B(lora_A(dropout(x))), with W and b frozen.

    Parameter names match PEFT's LoRA Linear layer in state_dict(): `weight`, `bias`,
    `lora_A.weight` [r, in_features] and `lora_B.weight` [out_features, r].
    """

    def __init__(self, in_features: int, out_features: int, r: int, lora_alpha: Optional[float] = None,
                 lora_dropout: float = 0.0, use_rslora: bool = False, bias: bool = True,
                 device=None, dtype=None, backend: Optional[str] = None):
        super().__init__()
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._adopt_base(base.weight, base.bias)
        self._init_adapter(r, lora_alpha, lora_dropout, use_rslora, backend)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, lora_alpha: Optional[float] = None,
                    lora_dropout: float = 0.0, use_rslora: bool = False,
                    backend: Optional[str] = None) -> "LoRALinear":
        """Wrap `linear`, sharing (not copying) its weight and bias, which become frozen."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"LoRALinear.from_linear: expected an nn.Linear, got {type(linear).__name__}")
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._adopt_base(linear.weight, linear.bias)
        module._init_adapter(r, lora_alpha, lora_dropout, use_rslora, backend)
        return module

    def _adopt_base(self, weight: nn.Parameter, bias: Optional[nn.Parameter]) -> None:
        weight.requires_grad_(False)
        if bias is not None:
            bias.requires_grad_(False)
        self.weight = weight
        self.bias = bias
        self.out_features, self.in_features = weight.shape

    def _init_adapter(self, r: int, lora_alpha: Optional[float], lora_dropout: float,
                      use_rslora: bool, backend: Optional[str]) -> None:
        check_rank("LoRALinear", "r", r)
        if lora_alpha is not None:
            check_alpha("LoRALinear", "lora_alpha", lora_alpha)
        check_dropout("LoRALinear", lora_dropout)
        self.r = r
        self.lora_alpha = r if lora_alpha is None else lora_alpha
        self.use_rslora = use_rslora
        self.scaling = lora_scaling(r, self.lora_alpha, use_rslora)
        self.lora_dropout = float(lora_dropout)
        self.backend = backend
        self.merged = False
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **factory)
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A kaiming-uniform, B zero (PEFT's default): the layer starts equal to the base."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor, seed: SeedLike = None) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        # Adapters kept in another dtype than the base (fp32 LoRA on a bf16 model) are cast on
        # the way in; autograd brings their gradients back in their own dtype.
        weight = module_tensor(self, "weight")
        a = module_tensor(self._modules["lora_A"], "weight")
        b = module_tensor(self._modules["lora_B"], "weight")
        if a.dtype != weight.dtype or b.dtype != weight.dtype:
            a, b = a.to(weight.dtype), b.to(weight.dtype)
        return lora_linear(x, weight, module_tensor(self, "bias"), a, b, self.scaling,
                           dropout_p=self.lora_dropout, training=self.training, seed=seed,
                           backend=self.backend)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B A in the base weight's dtype, computed in fp32."""
        delta = self.lora_B.weight.float() @ self.lora_A.weight.float()
        return (self.scaling * delta).to(self.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the (shared) base weight; forward becomes a plain linear."""
        if not self.merged:
            self.weight.add_(self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the adapter back out of the base weight (exact up to rounding)."""
        if self.merged:
            self.weight.sub_(self.delta_weight())
            self.merged = False

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear holding the merged weight (shares this layer's parameters)."""
        self.merge()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device="meta")
        linear.weight = self.weight
        linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, "
                f"lora_dropout={self.lora_dropout}, use_rslora={self.use_rslora}, "
                f"merged={self.merged}, backend={self.backend}")
