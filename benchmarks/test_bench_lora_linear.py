"""pytest-benchmark entries for the single-adapter layer: every provider of the benchmark engine
(base F.linear, PEFT-style eager, PEFT's LoRA layer, each lora_ops backend) on small shapes, on
the CPU in well under a minute (CUDA when present). Each provider's output is first checked
against the float64 oracle; nothing asserts on time. The suites and targets are measured by
`lora-ops bench` (benchmarks/README.md).

    pytest benchmarks/ --benchmark-group-by=group
"""
import pytest
import torch

from lora_ops._backend import BACKENDS
from lora_ops.bench import linear_providers
from lora_ops.bench.cases import MODES, LinearCase
from lora_ops.bench.provider import CHECK_TOLERANCE, Bound
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


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(PROVIDERS))
def test_lora_linear_under_autocast(measure, device, name, mode):
    """Mixed-precision training as it is usually run: fp32 parameters and x, each provider inside
    torch.autocast(bfloat16) (the casts are part of the time, as they are in training)."""
    provider, case = PROVIDERS[name], CASES[-1]
    if provider.role == "lora_ops" and name.split(":", 1)[1] not in default_backends(device):
        pytest.skip(f"{name} is not available for {device.type} here")
    inputs = linear_providers.make_inputs(case, device, 1)[0]
    bound = provider.bind(inputs, mode == "fwd+bwd", 0.0)

    def forward():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return bound.forward()
    under = Bound(forward, bound.wrt)
    with torch.no_grad():
        assert forward().dtype == torch.bfloat16, name
    if provider.role != "base":
        err = oracle_error("lora_linear", under, inputs)
        assert err <= CHECK_TOLERANCE["bf16"], f"{name}: relative error {err:.2e} against the oracle"
    measure(f"lora_linear autocast-bf16 {mode} {case.label()}",
            make_call(under, mode, inputs.dy.to(torch.bfloat16)))
