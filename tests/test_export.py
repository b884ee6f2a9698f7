"""torch.export of the layers, the path to AOTInductor and to other frameworks' graph runtimes:
the exported program holds the lora_ops ops, takes a dynamic token count, and computes what the
eager layer computes; in training the dropout seed is an input or a draw inside the graph."""
import pytest
import torch
from torch import nn
from torch.export import Dim

import lora_ops
from lora_ops.multi_lora_module import MultiLoRALinear
from tests.helpers import backend_params

K, N = 24, 20
BACKENDS = backend_params(("cpu", "reference"), devices=("cpu",))


def lora_layer(backend, dropout=0.0):
    torch.manual_seed(0)
    layer = lora_ops.LoRALinear.from_linear(nn.Linear(K, N), r=4, lora_alpha=8,
                                            lora_dropout=dropout, backend=backend)
    nn.init.normal_(layer.lora_B.weight)
    return layer


def called_ops(program):
    return {str(node.target) for node in program.graph.nodes if node.op == "call_function"}


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_lora_linear_exports_with_a_dynamic_token_count(device, backend):
    layer = lora_layer(backend).eval()
    tokens = Dim("tokens", min=1, max=4096)
    program = torch.export.export(layer, (torch.randn(3, 7, K),),
                                  dynamic_shapes={"x": {1: tokens}})
    if backend == "cpu":
        assert "lora_ops.lora_linear_fwd.default" in called_ops(program)
    for length in (1, 7, 33):
        x = torch.randn(3, length, K)
        torch.testing.assert_close(program.module()(x), layer(x), rtol=1e-6, atol=1e-6)


class SeededLayer(nn.Module):
    """A training forward whose dropout seed the caller passes, as a tensor."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x, seed):
        return self.layer(x, seed=seed)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_training_export_takes_the_seed_or_draws_it_in_the_graph(device, backend):
    layer = lora_layer(backend, dropout=0.5).train()
    x = torch.randn(6, K)
    seeded = torch.export.export(SeededLayer(layer), (x, torch.tensor(11))).module()
    for seed in (11, 12):
        torch.testing.assert_close(seeded(x, torch.tensor(seed)), layer(x, seed=seed),
                                   rtol=1e-6, atol=1e-6)
    drawn = torch.export.export(layer, (x,))
    assert "aten.randint.low" in called_ops(drawn)
    first, second = drawn.module()(x), drawn.module()(x)
    assert not torch.equal(first, second), "two calls of the exported layer drew one mask"


@pytest.mark.parametrize("device,backend", BACKENDS)
@torch.no_grad()
def test_multi_lora_linear_exports_with_a_slot_tensor(device, backend):
    torch.manual_seed(0)
    pool = MultiLoRALinear.from_linear(nn.Linear(K, N), max_adapters=3, max_rank=8,
                                       backend=backend)
    for i, r in enumerate((2, 8)):
        pool.add_adapter(f"a{i}", torch.randn(r, K), torch.randn(N, r), 1.0 + i)
    slots = torch.tensor([pool.adapter_slot("a1"), -1, pool.adapter_slot("a0")], dtype=torch.int32)
    rows = Dim("rows", min=2, max=4096)
    program = torch.export.export(pool, (torch.randn(3, K), slots),
                                  dynamic_shapes={"x": {0: rows}, "adapter_names": {0: rows}})
    for count in (2, 3, 17):
        x = torch.randn(count, K)
        index = torch.randint(-1, 2, (count,), dtype=torch.int32)
        torch.testing.assert_close(program.module()(x, index), pool(x, index), rtol=1e-6,
                                   atol=1e-6)
