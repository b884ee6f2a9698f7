"""pytest-benchmark entries for the multi-adapter ops: shrink, expand and the fused layer against
the gather+bmm peer, PEFT's mixed-batch forward (adapter_names) and each lora_ops backend, on a
small C2-like batch (64 tokens, 16 adapters, 10% base-only), both index forms, on the CPU in
well under a minute (CUDA when present). Outputs are checked against the float64 oracle first;
nothing asserts on time.

    pytest benchmarks/ --benchmark-group-by=group
"""
import pytest

from lora_ops._backend import BACKENDS
from lora_ops.bench import multi_providers
from lora_ops.bench.cases import MULTI_OPS, NONE_FRACTION, MultiCase, allowed_modes
from lora_ops.bench.provider import CHECK_TOLERANCE
from lora_ops.bench.runner import default_backends, make_call, oracle_error

CASES = [MultiCase(64, 16, 512, 768, (16,), "uniform", index, NONE_FRACTION, "fp32")
         for index in ("token", "segment")]
PEERS = ("gather_bmm", "peft")


def params():
    out = []
    for op in MULTI_OPS:
        for p in multi_providers.providers(op, PEERS, BACKENDS):
            for mode in allowed_modes(op):
                if mode in p.modes:
                    out.append(pytest.param(op, p.name, mode, id=f"{op}-{p.name}-{mode}"))
    return out


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.index}_index")
@pytest.mark.parametrize("op,name,mode", params())
def test_multi_lora(measure, device, op, name, mode, case):
    provider = {p.name: p for p in multi_providers.providers(op, PEERS, BACKENDS)}[name]
    if provider.role == "lora_ops" and name.split(":", 1)[1] not in default_backends(device):
        pytest.skip(f"{name} is not available for {device.type} here")
    token_adapter = multi_providers.batch_token_adapter(case)
    inputs = multi_providers.make_inputs(case, token_adapter, device, 1)[0]
    bound = provider.bind(inputs, mode == "fwd+bwd", 0.0)
    if provider.role != "base":
        err = oracle_error(op, bound, inputs)
        assert err <= CHECK_TOLERANCE[case.dtype], f"{name}: relative error {err:.2e} against the oracle"
    measure(f"{op} {mode} {case.label()}", make_call(bound, mode, inputs.dy))
