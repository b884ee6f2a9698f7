"""Pure-PyTorch references of every lora_ops op: the oracle of the tests, and the `reference` backend."""
from lora_ops.reference.dropout import apply_dropout, dropout_keep_mask, dropout_threshold, seed32
from lora_ops.reference.lora_linear import lora_linear, lora_linear_bwd, lora_linear_fwd
from lora_ops.reference.multi_lora import (adapter_of_token, multi_lora_expand, multi_lora_linear,
                                           multi_lora_shrink)

__all__ = ["apply_dropout", "dropout_keep_mask", "dropout_threshold", "seed32",
           "lora_linear", "lora_linear_fwd", "lora_linear_bwd",
           "adapter_of_token", "multi_lora_shrink", "multi_lora_expand", "multi_lora_linear"]
