"""Which backends exist on this install, and which one a call runs on.

The compiled library (`lora_ops._C`) is optional: without it the package still imports and the
`reference` and `triton` backends work. Device dispatch of the compiled ops is the dispatcher's
job; this module only decides among the four implementations of an op.
"""
import functools
import importlib.metadata
import importlib.util
import os
from typing import Dict, List, Optional, Tuple

import torch

BACKENDS = ("cuda", "triton", "cpu", "reference")
ENV_VAR = "LORA_OPS_BACKEND"

try:
    from lora_ops import _C  # noqa: F401  (loading it registers the lora_ops:: ops)

    _COMPILED = True
    _BUILD_INFO: Dict[str, object] = dict(_C.build_info())
    _LOAD_ERROR: Optional[str] = None
except ImportError as err:  # not built, or built against another torch
    _COMPILED = False
    _BUILD_INFO = {"with_cuda": False}
    _LOAD_ERROR = str(err)


def compiled() -> bool:
    """True when the C++ extension is loaded."""
    return _COMPILED


def compiled_with_cuda() -> bool:
    """True when the C++ extension holds the CUDA kernels."""
    return _COMPILED and bool(_BUILD_INFO.get("with_cuda"))


def build_info() -> Dict[str, object]:
    """Build settings of the compiled library, or why it could not be loaded."""
    info = dict(_BUILD_INFO)
    info["compiled"] = _COMPILED
    if _LOAD_ERROR is not None:
        info["load_error"] = _LOAD_ERROR
    return info


def cuda_paths(device: int) -> Dict[str, bool]:
    """Which fast paths of the `cuda` backend run on CUDA device `device`: thread block cluster
    plans, tensor-core adapter tiles, the Hopper adapter-in-GEMM kernel (each needs this build's
    code for the device to be recent enough, and its switch not off). Empty without the compiled
    CUDA kernels or a GPU."""
    if not compiled_with_cuda() or not torch.cuda.is_available():
        return {}
    with torch.cuda.device(device):
        return dict(_C.cuda_paths())


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)  # resolved on every op call: keep the import lookup off that path
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


# Triton 3.6's interpreter (torch 2.11's Triton) cannot take a scalar loaded or computed in a
# kernel as a loop bound, which every lora_ops kernel does; 3.7.1 and 3.8 run them (both tested).
# Compiled for a GPU, 3.6 builds every kernel (lora_ops.triton.compile_check).
MIN_TRITON_INTERPRETER = (3, 7)


@functools.lru_cache(maxsize=None)
def triton_version() -> Optional[Tuple[int, ...]]:
    """The installed Triton's (major, minor, ...) without importing it; None if not installed."""
    try:
        text = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None
    parts = []
    for piece in text.split("+")[0].split("."):
        if not piece.isdigit():
            break
        parts.append(int(piece))
    return tuple(parts)


def _interpreter_runs_kernels() -> bool:
    version = triton_version()
    return version is not None and version[:2] >= MIN_TRITON_INTERPRETER


def available_backends() -> Dict[str, List[str]]:
    """Usable backends per device type, in the order a call prefers them.

    Triton runs on CUDA tensors, and on CPU tensors only under TRITON_INTERPRET=1 (last).
    """
    return {device: list(usable) for device, usable in _usable(triton_interpreted()).items()}


# Resolved on every op call, where torch.cuda.is_available() and the import lookups would cost
# several microseconds (a decode-sized GPU layer takes ~15): computed once per interpreter mode.
@functools.lru_cache(maxsize=None)
def _usable(interpreted: bool) -> Dict[str, Tuple[str, ...]]:
    cpu: List[str] = ["cpu"] if _COMPILED else []
    cpu.append("reference")
    # The interpreter is for testing the Triton kernels, never a default.
    if _triton_importable() and interpreted and _interpreter_runs_kernels():
        cpu.append("triton")
    cuda: List[str] = []
    if torch.cuda.is_available():
        if compiled_with_cuda():
            cuda.append("cuda")
        if _triton_importable():
            cuda.append("triton")
        cuda.append("reference")
    return {"cpu": tuple(cpu), "cuda": tuple(cuda)}


# What torch.compile sees of the lookup: its result, a constant at trace time (tracing into the
# caches instead made Dynamo warn about lru_cache on every compile of a model with LoRA layers).
@torch.compiler.assume_constant_result
def _usable_on(device_type: str) -> Optional[Tuple[str, ...]]:
    return _usable(triton_interpreted()).get(device_type)


# A device's first choice, which never depends on TRITON_INTERPRET (the interpreter comes last):
# the common call (no backend named) skips reading that variable (~0.7 µs).
@torch.compiler.assume_constant_result
def _default_on(device_type: str) -> Optional[str]:
    usable = _usable(False).get(device_type)
    return usable[0] if usable else None


# The backends whose ops are the compiled library's: they check their own arguments, so the
# Python entry points run their checks only when such an op refuses (to word the error for the
# caller's arguments), and OP_REFUSALS is what a refusing op raises (c10's ValueError, IndexError,
# TypeError and Error; NotImplementedError for a device it has no kernel for) or a malformed
# argument makes Python raise on the way (AttributeError).
COMPILED_BACKENDS = ("cpu", "cuda")
OP_REFUSALS = (ValueError, RuntimeError, TypeError, IndexError, AttributeError)


def compiled_backend(op: str, requested: Optional[str], x) -> Optional[str]:
    """The compiled backend a call on tensor x runs on directly, or None where the call takes
    its checked path: another backend, an x that is no tensor, or torch.compile tracing (where
    checks cost nothing at run time)."""
    if not isinstance(x, torch.Tensor) or torch.compiler.is_compiling():
        return None
    chosen = resolve_backend(op, requested, x.device)
    return chosen if chosen in COMPILED_BACKENDS else None


def resolve_backend(op: str, requested: Optional[str], device: torch.device) -> str:
    """The backend `op` runs on for tensors on `device`.

    `requested` (the call's backend= argument) wins, then the LORA_OPS_BACKEND environment
    variable, then the device's first choice. An explicit choice that cannot run on `device`
    is an error, never a silent fallback.

    Under torch.func transforms (grad, vjp, jvp, jacrev, jacfwd, hessian, vmap) every call runs
    on the reference, once the choice is checked: functorch refuses the kernels' autograd (a
    C++ node, or torch.library's for the Triton ops) and has no forward-mode derivative or
    batching rule for them, while the reference is plain PyTorch, differentiable to any order,
    and draws the same dropout masks.
    """
    chosen = _resolve(op, requested, device)
    if chosen != "reference" and torch._C._are_functorch_transforms_active():
        return "reference"
    return chosen


# $LORA_OPS_BACKEND is read on every call that names no backend: a process may set it between
# calls. os.environ.get costs ~2 µs where it is unset (Mapping.get raises and catches KeyError), a
# tenth of a decode-sized call on the machines here, so the mapping's own store is read instead
# where CPython keeps one (os.environ._data: every write to os.environ updates it; keys and
# values encoded as os.environ encodes them), the same answer for ~0.1 µs.
_ENV_STORE = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey(ENV_VAR) if _ENV_STORE is not None else None


def env_backend() -> Optional[str]:
    """$LORA_OPS_BACKEND, or None where it is unset or empty."""
    if _ENV_STORE is None or torch.compiler.is_compiling():  # Dynamo traces os.environ itself
        return os.environ.get(ENV_VAR) or None
    raw = _ENV_STORE.get(_ENV_KEY)
    if raw is None:
        return None
    return os.environ.decodevalue(raw) or None


def _resolve(op: str, requested: Optional[str], device: torch.device) -> str:
    explicit = requested if requested is not None else env_backend()
    if explicit is None:
        default = _default_on(device.type)
        if default is not None:
            return default
    usable = _usable_on(device.type)
    if not usable:
        raise ValueError(f"{op}: tensors on device '{device}' are not supported "
                         f"(lora_ops runs on cpu and cuda)")
    if explicit is None:
        return usable[0]
    if explicit not in BACKENDS:
        source = "backend" if requested is not None else f"${ENV_VAR}"
        raise ValueError(f"{op}: {source}='{explicit}' is not a lora_ops backend; "
                         f"choose one of {', '.join(BACKENDS)}")
    if explicit not in usable:
        raise RuntimeError(f"{op}: backend '{explicit}' is not available for {device.type} tensors "
                           f"here (available: {', '.join(usable)}){_why_missing(explicit, device)}")
    return explicit


def _why_missing(backend: str, device: torch.device) -> str:
    if backend in ("cpu", "cuda") and not _COMPILED:
        return f"; the compiled library did not load: {_LOAD_ERROR}"
    if backend == "cuda" and device.type == "cuda" and not compiled_with_cuda():
        return "; the library was built without CUDA"
    if backend == "cuda" and device.type == "cpu":
        return "; the cuda backend takes CUDA tensors"
    if backend == "cpu" and device.type == "cuda":
        return "; the cpu backend takes CPU tensors"
    if backend == "triton" and device.type == "cpu":
        if triton_interpreted() and _triton_importable() and not _interpreter_runs_kernels():
            found = ".".join(map(str, triton_version()))
            need = ".".join(map(str, MIN_TRITON_INTERPRETER))
            return (f"; Triton {found}'s interpreter cannot run these kernels (a loop bound loaded in "
                    f"the kernel), Triton {need} or later's can")
        return "; triton runs on CPU tensors only with TRITON_INTERPRET=1"
    return ""
