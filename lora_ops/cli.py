"""The `lora-ops` command: `demo` (the main job), `bench` (kernel benchmarks), `info`."""
import argparse
import importlib
import importlib.metadata
import json
import os
import platform
import sys
from typing import Dict, List, Optional

DESCRIPTION = "Fused LoRA kernels for PyTorch: fine-tune and serve LoRA adapters fast."


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-ops", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser(
        "demo", help="fine-tune a small transformer with LoRA, compare with PEFT, save and serve adapters",
        description="Builds a small Llama-style model (nothing downloaded), fine-tunes LoRA adapters on "
                    "synthetic tasks, compares speed and memory with PEFT's eager layers, saves the "
                    "adapters in PEFT's format and serves a mixed batch through MultiLoRALinear. "
                    "Exits non-zero if a check fails.")
    demo.add_argument("--steps", type=_positive_int, default=None,
                      help="training steps of the first adapter (default: 300, or 24 with --quick)")
    demo.add_argument("--quick", action="store_true", help="a tiny model and few steps: seconds, for smoke tests")
    demo.add_argument("--output-dir", default=None,
                      help="where the adapters are saved (default: a new temporary directory)")
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    demo.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                      help="dtype of the model's weights (default: float32)")
    demo.add_argument("--no-compare", action="store_true", help="skip the PEFT comparison run")
    demo.add_argument("--seed", type=int, default=0, help="seed of the model, adapters and data")

    # Parsed by lora_ops.bench itself (see main); listed here for `lora-ops --help`.
    commands.add_parser("bench", add_help=False,
                        help="kernel benchmarks: ops, shapes, backends, dtype; table, JSON, plot "
                             "(`lora-ops bench --help` for its options)")

    info = commands.add_parser("info", help="versions, device, usable backends and build settings")
    info.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the `lora-ops` console script and of `python -m lora_ops`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return importlib.import_module("lora_ops.bench").main(argv[1:])
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        from lora_ops.demo import DemoOptions, run_demo
        return run_demo(DemoOptions(steps=args.steps, quick=args.quick, output_dir=args.output_dir,
                                    device=args.device, dtype=args.dtype, compare=not args.no_compare,
                                    seed=args.seed))
    if args.command == "info":
        return _print_info(as_json=args.json)
    parser.print_help()
    return 0


_PACKAGES = ("lora_ops", "torch", "triton", "transformers", "peft", "safetensors")
# The environment switches that change what a call runs (README, Backends), besides
# $LORA_OPS_BACKEND.
_SWITCHES = ("TRITON_INTERPRET", "LORA_OPS_CPU_GEMM", "LORA_OPS_CUDA_CLUSTERS", "LORA_OPS_CUDA_MMA",
             "LORA_OPS_CUDA_ADAPTER_GEMM")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _info() -> Dict[str, object]:
    import torch

    from lora_ops import _backend

    cuda = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        paths = _backend.cuda_paths(index)
        cuda.append({"name": props.name, "capability": f"{props.major}.{props.minor}",
                     "memory_gib": round(props.total_memory / 2**30, 1),
                     "fast paths": " ".join(p for p, on in paths.items() if on) or "none"})
    return {
        "versions": {"python": platform.python_version(), **{p: _version(p) for p in _PACKAGES},
                     "torch cuda": torch.version.cuda or "none"},
        "device": {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                   "torch_threads": torch.get_num_threads(), "cuda": cuda or "none"},
        "backends": _backend.available_backends(),
        "backend_override": {name: os.environ.get(name) for name in (_backend.ENV_VAR,) + _SWITCHES},
        "build": _backend.build_info(),
    }


def _print_info(as_json: bool) -> int:
    report = _info()
    if as_json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    for section, values in report.items():
        print(f"{section}:")
        for key, value in values.items():
            if isinstance(value, list) and value and isinstance(value[0], dict):
                value = "; ".join(", ".join(f"{k}={v}" for k, v in item.items()) for item in value)
            elif isinstance(value, list):
                value = ", ".join(value) or "none"
            print(f"  {key:<18} {value}")
    return 0
