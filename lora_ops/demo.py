"""`lora-ops demo`: fine-tune, compare, save and serve LoRA adapters on a small built-in model.

Nothing is downloaded: the model is a Llama-style transformer with random weights, and each
task is synthetic ("add k": every token is followed by token + k, mod the vocabulary), so an
adapter has something definite to learn and its accuracy shows it learned it. The first
adapter trains in lockstep with the same model under PEFT's eager LoRA layers (same start,
same batches), which gives a fair comparison of step time and memory on this machine.
"""
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from lora_ops import _backend
from lora_ops.model import inject, load_adapter, load_adapters, lora_summary, save_adapter
from lora_ops.modules import LoRALinear
from lora_ops.multi_lora_module import MultiLoRALinear, mixed_batch


@dataclass(frozen=True)
class DemoSize:
    vocab: int
    hidden: int
    layers: int
    heads: int
    seq_len: int
    batch: int
    rank: int
    steps: int          # of the first adapter (the one compared with PEFT)
    extra_steps: int    # of each further adapter
    lr: float = 1e-2


FULL = DemoSize(vocab=64, hidden=128, layers=2, heads=4, seq_len=32, batch=32, rank=8, steps=300, extra_steps=150,
                lr=2e-3)
QUICK = DemoSize(vocab=32, hidden=32, layers=1, heads=2, seq_len=12, batch=8, rank=4, steps=24, extra_steps=12)

# Adapter name -> k of its "add k" task. The first one is compared with PEFT.
TASKS = {"add1": 1, "add3": 3, "add5": 5}
TARGETS = "all-linear"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Largest error of the mixed batch against the single-adapter models, relative to max |logit|.
SERVE_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


@dataclass
class DemoOptions:
    steps: Optional[int] = None
    quick: bool = False
    output_dir: Optional[str] = None
    device: Optional[str] = None
    dtype: str = "float32"
    compare: bool = True
    seed: int = 0


@dataclass
class RunStats:
    """One model's fine-tuning run."""
    losses: List[float] = field(default_factory=list)
    step_seconds: List[float] = field(default_factory=list)
    peak_step_bytes: Optional[int] = None   # CUDA only: allocator peak during a step
    saved_bytes: int = 0                    # activations kept for backward by one forward

    def median_step_ms(self) -> float:
        timed = self.step_seconds[min(3, len(self.step_seconds) - 1):]  # first steps warm up
        return 1e3 * statistics.median(timed)


class Checks:
    """Named pass/fail results; the demo's exit status is whether all passed."""

    def __init__(self):
        self.results: List[Tuple[str, bool, str]] = []

    def add(self, name: str, passed: bool, detail: str) -> None:
        self.results.append((name, passed, detail))
        print(f"  [{'ok' if passed else 'FAILED'}] {name}: {detail}")

    def all_passed(self) -> bool:
        return all(passed for _, passed, _ in self.results)


def build_base(size: DemoSize, seed: int, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The same random Llama-style model for a given seed, every time it is built."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    # A wider init than Llama's 0.02 gives the frozen output head logits large enough for the
    # loss to approach zero once a task is learned (RMSNorm caps the hidden state's size).
    config = LlamaConfig(vocab_size=size.vocab, hidden_size=size.hidden, intermediate_size=2 * size.hidden,
                         num_hidden_layers=size.layers, num_attention_heads=size.heads,
                         num_key_value_heads=size.heads, max_position_embeddings=size.seq_len,
                         initializer_range=0.1)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def task_batch(k: int, size: DemoSize, rows: int, generator: torch.Generator,
               device: torch.device) -> torch.Tensor:
    """Sequences start, start + k, start + 2k, ... (mod vocab)."""
    start = torch.randint(0, size.vocab, (rows, 1), generator=generator)
    return ((start + k * torch.arange(size.seq_len)) % size.vocab).to(device)


def accuracy(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Share of next tokens predicted right (every next token is determined by the task)."""
    return (logits[:, :-1].argmax(-1) == ids[:, 1:]).float().mean().item()


def saved_activation_bytes(model: nn.Module, ids: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for backward after one forward (parameters excluded)."""
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: Dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in param_storages:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor,
               stats: RunStats) -> None:
    device = ids.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start_bytes = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    value = loss.item()  # synchronizes
    stats.step_seconds.append(time.perf_counter() - start)
    stats.losses.append(value)
    if device.type == "cuda":
        step_peak = torch.cuda.max_memory_allocated(device) - start_bytes
        stats.peak_step_bytes = max(stats.peak_step_bytes or 0, step_peak)


def fine_tune(models: Dict[str, nn.Module], k: int, steps: int, size: DemoSize, seed: int,
              label: str) -> Dict[str, RunStats]:
    """Train each model (same batches, in lockstep so machine noise hits all alike)."""
    from tqdm import tqdm

    generator = torch.Generator().manual_seed(seed)
    device = next(next(iter(models.values())).parameters()).device
    optimizers = {name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=size.lr)
                  for name, m in models.items()}
    stats = {name: RunStats() for name in models}
    probe = task_batch(k, size, size.batch, generator, device)
    for name, model in models.items():
        model.train()
        stats[name].saved_bytes = saved_activation_bytes(model, probe)
    bar = tqdm(range(steps), desc=f"fine-tuning {label}", unit="step", mininterval=0.5)
    for _ in bar:
        ids = task_batch(k, size, size.batch, generator, device)
        for name, model in models.items():
            train_step(model, optimizers[name], ids, stats[name])
        bar.set_postfix({f"loss[{name}]": f"{s.losses[-1]:.3f}" for name, s in stats.items()})
    for model in models.values():
        model.eval()
    return stats


def peft_twin(lora_model: nn.Module, size: DemoSize, seed: int, device, dtype) -> nn.Module:
    """The same base model under PEFT's LoRA layers, starting from the very same adapter weights."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=size.rank, lora_alpha=2 * size.rank, target_modules=TARGETS, lora_dropout=0.0)
    twin = get_peft_model(build_base(size, seed, device, dtype), config, autocast_adapter_dtype=False)
    ours = {name: m for name, m in lora_model.named_modules() if isinstance(m, LoRALinear)}
    with torch.no_grad():
        for name, module in twin.base_model.model.named_modules():
            if name in ours:
                module.lora_A["default"].weight.copy_(ours[name].lora_A.weight)
                module.lora_B["default"].weight.copy_(ours[name].lora_B.weight)
    return twin


def print_loss_table(stats: Dict[str, RunStats], points: int = 7) -> None:
    steps = len(next(iter(stats.values())).losses)
    marks = sorted({round(i * (steps - 1) / (points - 1)) for i in range(points)})
    print("  step  " + "".join(f"{name:>12}" for name in stats))
    for step in marks:
        print(f"  {step + 1:>4}  " + "".join(f"{s.losses[step]:>12.4f}" for s in stats.values()))


def print_speed_table(stats: Dict[str, RunStats]) -> None:
    def mib(n: Optional[int]) -> str:
        return "n/a (CPU)" if n is None else f"{n / 2**20:.2f} MiB"

    rows = [("median step time", lambda s: f"{s.median_step_ms():.1f} ms"),
            ("activations saved for backward", lambda s: mib(s.saved_bytes)),
            ("peak extra memory in a step", lambda s: mib(s.peak_step_bytes))]
    print("  " + " " * 32 + "".join(f"{name:>16}" for name in stats))
    for label, cell in rows:
        print(f"  {label:<32}" + "".join(f"{cell(s):>16}" for s in stats.values()))


def max_rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def serve_mixed_batch(size: DemoSize, seed: int, device, dtype, adapter_dirs: Dict[str, Path],
                      checks: Checks) -> None:
    """Load every adapter into MultiLoRALinear pools and run one batch mixing them (and rows
    with no adapter) against each adapter's own single-adapter model."""
    names = list(adapter_dirs)
    row_adapters: List[Optional[str]] = [names[i % len(names)] for i in range(2 * len(names))] + [None]
    generator = torch.Generator().manual_seed(seed + 7)
    ids = torch.cat([task_batch(TASKS[name] if name else 1, size, 1, generator, device) for name in row_adapters])

    served = load_adapters(build_base(size, seed, device, dtype), adapter_dirs)
    with torch.no_grad(), mixed_batch(served, row_adapters):
        mixed = served(input_ids=ids).logits
    reference = torch.empty_like(mixed)
    with torch.no_grad():
        for name in [None] + names:
            rows = [i for i, a in enumerate(row_adapters) if a == name]
            model = build_base(size, seed, device, dtype)
            if name is not None:
                load_adapter(model, adapter_dirs[name])
            reference[rows] = model(input_ids=ids[rows]).logits
    pools = sum(1 for m in served.modules() if isinstance(m, MultiLoRALinear))
    print(f"\nServing one batch of {len(row_adapters)} sequences mixing {len(names)} adapters "
          f"through {pools} MultiLoRALinear layers:")
    print(f"  {'adapter':<10}{'sequences':>10}{'accuracy on its task':>24}")
    for name in names + [None]:
        rows = [i for i, a in enumerate(row_adapters) if a == name]
        print(f"  {name or '(base)':<10}{len(rows):>10}{accuracy(mixed[rows], ids[rows]):>24.1%}")
    error = max_rel_error(mixed, reference)
    tolerance = SERVE_TOLERANCE[dtype]
    checks.add("mixed batch = each adapter's own model", error <= tolerance,
               f"max error {error:.2e} of max |logit| (tolerance {tolerance:.0e})")


def resolve_device(requested: Optional[str]) -> torch.device:
    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"demo: --device {requested!r} is not supported (cpu or cuda)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("demo: --device cuda was asked for but no CUDA device is available")
    return device


def run_demo(options: DemoOptions) -> int:
    """The whole demo; returns the exit status (0 when every check passed)."""
    try:
        device = resolve_device(options.device)
        backend = _backend.resolve_backend("lora_linear", None, device)
    except (ValueError, RuntimeError) as err:  # a bad --device, or a bad $LORA_OPS_BACKEND
        print(err)
        return 2
    size = QUICK if options.quick else FULL
    steps = options.steps or size.steps
    extra_steps = max(1, steps // 2) if options.steps else size.extra_steps
    dtype = DTYPES[options.dtype]
    out_dir = Path(options.output_dir or tempfile.mkdtemp(prefix="lora-ops-demo-"))
    compare = options.compare and _peft_available()
    checks = Checks()
    torch.manual_seed(options.seed)

    print(f"lora-ops demo on {device} ({options.dtype}), lora_ops backend '{backend}'")
    first = next(iter(TASKS))
    model = inject(build_base(size, options.seed, device, dtype), TARGETS, size.rank, 2 * size.rank)
    summary = lora_summary(model)
    print(f"Model: Llama-style, {size.layers} layers, hidden {size.hidden}, vocab {size.vocab}; LoRA r={size.rank} "
          f"on {TARGETS} ({len(summary.lora_layers)} layers)")
    print(f"Trainable parameters: {summary.trainable_params:,} of {summary.total_params:,} "
          f"({100 * summary.trainable_share:.2f}%)")
    print(f"\nTask '{first}': every token is followed by token + {TASKS[first]} (mod {size.vocab}). "
          f"{steps} steps, batch {size.batch} x {size.seq_len} tokens" + (", in lockstep with PEFT" if compare else ""))

    models = {"lora_ops": model}
    if compare:
        models["peft"] = peft_twin(model, size, options.seed, device, dtype)
    stats = fine_tune(models, TASKS[first], steps, size, options.seed, first)
    print_loss_table(stats)
    print()
    print_speed_table(stats)
    if compare:
        ratio = stats["peft"].median_step_ms() / stats["lora_ops"].median_step_ms()
        print(f"  lora_ops step time: {ratio:.2f}x faster than PEFT's eager layers" if ratio >= 1 else
              f"  lora_ops step time: {1 / ratio:.2f}x slower than PEFT's eager layers")

    print("\nChecks:")
    losses = stats["lora_ops"].losses
    tail = losses[-max(1, len(losses) // 10):]
    checks.add("loss went down", statistics.mean(tail) < 0.8 * losses[0],
               f"{losses[0]:.3f} at step 1 -> {statistics.mean(tail):.3f} over the last {len(tail)} steps")
    if compare:
        first_losses = (stats["lora_ops"].losses[0], stats["peft"].losses[0])
        gap = abs(first_losses[0] - first_losses[1]) / abs(first_losses[1])
        checks.add("first step matches PEFT", gap <= SERVE_TOLERANCE[dtype] * 10,
                   f"loss {first_losses[0]:.5f} vs PEFT {first_losses[1]:.5f}")

    adapter_dirs = {first: save_adapter(model, out_dir / first)}
    print(f"  saved '{first}' in PEFT's format to {adapter_dirs[first]}")
    if compare:
        _check_peft_loads(model, adapter_dirs[first], size, options.seed, device, dtype, checks)
    for name, k in list(TASKS.items())[1:]:
        extra = inject(build_base(size, options.seed, device, dtype), TARGETS, size.rank, 2 * size.rank)
        extra_stats = fine_tune({"lora_ops": extra}, k, extra_steps, size, options.seed + k, name)
        print(f"  '{name}': loss {extra_stats['lora_ops'].losses[0]:.3f} -> {extra_stats['lora_ops'].losses[-1]:.3f}")
        adapter_dirs[name] = save_adapter(extra, out_dir / name)

    serve_mixed_batch(size, options.seed, device, dtype, adapter_dirs, checks)
    print(f"\nAdapters saved in {out_dir}")
    passed = checks.all_passed()
    print("All checks passed." if passed else "Some checks FAILED.")
    return 0 if passed else 1


def _peft_available() -> bool:
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        print("(peft is not installed: the comparison with PEFT is skipped)")
        return False
    return True


def _check_peft_loads(model: nn.Module, directory: Path, size: DemoSize, seed: int, device, dtype,
                      checks: Checks) -> None:
    """PEFT itself loads the saved adapter and computes the same logits."""
    from peft import PeftModel

    generator = torch.Generator().manual_seed(seed + 1)
    ids = task_batch(1, size, 4, generator, device)
    loaded = PeftModel.from_pretrained(build_base(size, seed, device, dtype), str(directory)).eval()
    with torch.no_grad():
        error = max_rel_error(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    tolerance = SERVE_TOLERANCE[dtype]
    checks.add("PEFT loads the saved adapter", error <= tolerance,
               f"max error {error:.2e} of max |logit| (tolerance {tolerance:.0e})")
