"""pytest-benchmark entries for the single-adapter layer: every provider of the benchmark engine
(base F.linear, PEFT-style eager, PEFT's LoRA layer, each lora_ops backend) on small shapes, on
the CPU in well under a minute (CUDA when present). Each provider's output is first checked
against the float64 oracle; nothing asserts on time. The suites and targets are measured by
`lora-ops bench` (benchmarks/README.md).

    pytest benchmarks/ --benchmark-group-by=group
"""
import pytest

from lora_ops._backend import BACKENDS
from lora_ops.bench import linear_providers
from lora_ops.bench.cases import MODES, LinearCase
from lora_ops.bench.provider import CHECK_TOLERANCE
from lora_ops.bench.runner import default_backends, make_call, oracle_error

CASES = [LinearCase(1, 512, 512, 16, "fp32"), LinearCase(64, 512, 768, 16, "fp32")]
PEERS = ("eager", "peft")  # eager_compiled costs a compile per run: measured by lora-ops bench
PROVIDERS = {p.name: p for p in linear_providers.providers(PEERS, BACKENDS)}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label().replace(" ", "_"))
@pytest.mark.parametrize("name", list(PROVIDERS))
def test_lora_linear(measure, device, name, case, mode):
    provider = PROVIDERS[name]
    if provider.role == "lora_ops" and name.split(":", 1)[1] not in default_backends(device):
        pytest.skip(f"{name} is not available for {device.type} here")
    inputs = linear_providers.make_inputs(case, device, 1)[0]
    bound = provider.bind(inputs, mode == "fwd+bwd", 0.0)
    if provider.role != "base":
        err = oracle_error("lora_linear", bound, inputs)
        assert err <= CHECK_TOLERANCE[case.dtype], f"{name}: relative error {err:.2e} against the oracle"
    measure(f"lora_linear {mode} {case.label()}", make_call(bound, mode, inputs.dy))
