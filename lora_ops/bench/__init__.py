"""The benchmark engine of lora_ops (`lora-ops bench`, `python -m lora_ops.bench`).

It times, side by side in one run on the device present, base F.linear, PEFT-style eager LoRA
(eager and under torch.compile), PEFT's own LoRA layer, a gather+bmm multi-adapter peer and
every lora_ops backend; checks each against a float64 oracle; reports times, ratios, achieved
bandwidth against DESIGN.md's byte model and the copy bandwidth measured in the same run,
activation memory kept for backward, and the verdict on each target of DESIGN.md.
"""
from lora_ops.bench.cli import main

__all__ = ["main"]
