"""What every lora_ops Triton launcher decides the same way: operand dtype, dot precision, how
many programs fill the device, block sizes for the adapter rank, and whether an autotuned kernel
times its configurations or takes the launcher's default one."""
import contextlib
import functools
import os
from typing import Dict, Iterator

import torch
import triton
import triton.language as tl
import triton.testing

from lora_ops._backend import triton_interpreted

INTERPRETED = triton_interpreted()

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def operand_dtype(dtype: torch.dtype):
    """The dtype tiles are converted to right after tl.load and fed to tl.dot.

    The interpreter computes bf16 wrong (triton issue 4972), so under it every tile is fp32.
    """
    if dtype not in _TL_DTYPES:
        raise TypeError(f"lora_ops triton: unsupported dtype {dtype}; expected float32, float16 or bfloat16")
    return tl.float32 if INTERPRETED else _TL_DTYPES[dtype]


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 dots follow torch's own matmul setting, so fp32 results match F.linear's accuracy."""
    if dtype == torch.float32 and not INTERPRETED and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _device_programs(device: torch.device) -> int:
    """Programs that keep every SM busy; small under the interpreter so the tests reach the
    split paths with small shapes."""
    if device.type != "cuda":
        return 4
    return 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def rank_block(r: int, cap: int) -> int:
    """Power-of-two block over the rank: >= 16 so tl.dot takes it, <= cap to bound registers."""
    return min(max(16, triton.next_power_of_2(max(r, 1))), cap)


def row_block(m: int) -> int:
    """Rows per tile for kernels not autotuned over M: 16 to 64, 16 under the interpreter so
    that small test shapes span several tiles."""
    return 16 if INTERPRETED else min(64, max(16, triton.next_power_of_2(m)))


def m_bucket(m: int) -> int:
    """Coarse M for autotune keys: training changes M every step, a new bucket is rare."""
    return min(triton.next_power_of_2(max(m, 1)), 4096)


def split_reduction(programs: int, length: int, block: int, min_chunk: int, device: torch.device):
    """(splits, length per split) for a reduction of `length` that only `programs` programs
    would otherwise share: enough splits to fill the device, each a whole number of `block`s
    and at least `min_chunk` long (one block under the interpreter, so that small test shapes
    reach the split paths)."""
    want = max(1, _device_programs(device) // max(programs, 1))
    splits = max(1, min(want, triton.cdiv(length, block if INTERPRETED else min_chunk)))
    per_split = max(1, triton.cdiv(triton.cdiv(length, splits), block)) * block
    return max(1, triton.cdiv(length, per_split)), per_split


AUTOTUNE_ENV = "LORA_OPS_TRITON_AUTOTUNE"
# Timing a configuration: Triton's default (25 ms warm-up, 100 ms of repeats) adds up to ~3.5 s
# of timing alone for a new shape of lora_linear's three tuned kernels (28 configurations at most
# after pruning; an estimate, not measured on a GPU); about a tenth of it still ranks
# configurations whose times differ by more than a few per cent, which is all the choice needs.
TUNING_BENCH = functools.partial(triton.testing.do_bench, warmup=5, rep=10)
_FORCED: Dict[str, triton.Config] = {}


def autotuning() -> bool:
    """Whether an autotuned kernel times its configurations on a new shape (the default) or takes
    the launcher's default configuration (LORA_OPS_TRITON_AUTOTUNE=0, read on every call): no
    tuning time on a shape's first call, and the same configuration, hence the same result bits,
    in every process. The tests run with it off (tests/conftest.py) and check every
    configuration on its own (test_triton_kernels)."""
    return os.environ.get(AUTOTUNE_ENV, "1") != "0"


@contextlib.contextmanager
def forced_config(kernel_name: str, config: triton.Config) -> Iterator[None]:
    """Every launch of the autotuned kernel `kernel_name` takes `config` (tests)."""
    saved = _FORCED.get(kernel_name)
    _FORCED[kernel_name] = config
    try:
        yield
    finally:
        if saved is None:
            _FORCED.pop(kernel_name, None)
        else:
            _FORCED[kernel_name] = saved


def launch_tuned(kernel, grid, default: triton.Config, *args, **kwargs) -> None:
    """Launches the autotuned `kernel` (a triton.autotune over a JIT function) by its tuner, or,
    with tuning off or a configuration forced, as the bare JIT function with that configuration's
    block sizes, warps and stages."""
    config = _FORCED.get(kernel.fn.__name__)
    if config is None and autotuning():
        kernel[grid](*args, **kwargs)
        return
    options = {k: v for k, v in (config or default).all_kwargs().items() if v is not None}
    kernel.fn[grid](*args, **kwargs, **options)
