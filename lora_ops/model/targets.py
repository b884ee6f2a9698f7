"""Which modules of a model an adapter targets, by PEFT's rules, so a config means the same here.

`target_modules` is a list of exact module names or name suffixes (`"q_proj"` matches
`model.layers.0.self_attn.q_proj`), a regex string that must match the whole name, or
`"all-linear"`: every nn.Linear except the output head. `exclude_modules` takes the same
list/regex forms and wins over `target_modules`. rank_pattern / alpha_pattern keys are regexes
matched against the end of a name at a dot boundary, first key wins.
"""
import re
from typing import Dict, List, Mapping, Optional, Sequence, Union

from torch import nn

from lora_ops.modules import LoRALinear
from lora_ops.multi_lora_module import MultiLoRALinear

ALL_LINEAR = "all-linear"
ADAPTER_LAYERS = (LoRALinear, MultiLoRALinear)
TargetSpec = Union[str, Sequence[str]]


def name_matches(spec: TargetSpec, key: str) -> bool:
    """PEFT's test of one module name against a target/exclude spec: a string is a regex that
    must match the whole name; a list holds exact names and name suffixes (at a dot)."""
    if isinstance(spec, str):
        return re.fullmatch(spec, key) is not None
    return any(key == name or key.endswith(f".{name}") for name in spec)


def _inside_adapter_layers(model: nn.Module) -> set:
    """Names of the sub-modules of adapter layers (their lora_A/lora_B Linears): never targets."""
    inside = set()
    for prefix, module in model.named_modules():
        if isinstance(module, ADAPTER_LAYERS):
            inside.update(f"{prefix}.{suffix}" for suffix, _ in module.named_modules() if suffix)
    return inside


def output_head_name(model: nn.Module) -> Optional[str]:
    """The name of the model's output embedding (LM head), which "all-linear" leaves alone."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        return None
    return next((name for name, module in model.named_modules() if module is head), None)


def check_spec(op: str, argument: str, spec: Optional[TargetSpec]) -> None:
    """Fail early, naming the argument, on a spec that is neither a string nor a list of strings."""
    if spec is None:
        return
    if isinstance(spec, str):
        try:
            re.compile(spec)
        except re.error as err:
            raise ValueError(f"{op}: {argument}={spec!r} is not a valid regular expression ({err})") from None
        return
    if isinstance(spec, (list, tuple, set, frozenset)) and all(isinstance(s, str) for s in spec):
        return
    raise TypeError(f"{op}: {argument} must be a string (regex or 'all-linear') or a list of module "
                    f"names, got {spec!r}")


def find_targets(model: nn.Module, target_modules: TargetSpec,
                 exclude_modules: Optional[TargetSpec] = None,
                 layers_to_transform: Optional[Union[int, Sequence[int]]] = None,
                 layers_pattern: Optional[Union[str, Sequence[str]]] = None) -> Dict[str, nn.Module]:
    """{name: module} of every module the spec names, in model order, adapter internals left out.

    The modules are not checked for type here: the caller says what it can take.
    """
    is_all_linear = isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR
    skip = _inside_adapter_layers(model)
    if is_all_linear:
        head = output_head_name(model)
        if head is not None:
            skip.add(head)
    found = {}
    for name, module in model.named_modules():
        if not name or name in skip:
            continue
        if exclude_modules and name_matches(exclude_modules, name):
            continue
        if is_all_linear:
            hit = isinstance(module, nn.Linear)
        else:
            hit = name_matches(target_modules, name)
            # As in PEFT, a name listed in full is taken whatever its layer index.
            if (hit and not isinstance(target_modules, str) and name not in target_modules
                    and layers_to_transform is not None):
                hit = _layer_index(name, layers_pattern) in _as_list(layers_to_transform)
        if hit:
            found[name] = module
    return found


def _as_list(value: Union[int, Sequence[int]]) -> List[int]:
    return [value] if isinstance(value, int) else list(value)


def _layer_index(name: str, layers_pattern: Optional[Union[str, Sequence[str]]]) -> Optional[int]:
    """The first numbered path segment after a layer-list name, as PEFT's layers_to_transform reads it."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def pattern_value(patterns: Optional[Mapping[str, float]], name: str, default):
    """The value of the first pattern key matching the end of `name` (PEFT's get_pattern_key)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default
