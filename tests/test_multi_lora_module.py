"""MultiLoRALinear: the adapter pool (add, replace, remove), mixed-batch forward over rows and
sequences against a per-row fp64 loop, training several adapters in one batch, mixed_batch()."""
import pytest
import torch
from torch import nn

from lora_ops.multi_lora_module import MultiLoRALinear, mixed_batch
from tests.helpers import DTYPES, assert_close_scaled, backend_params

BACKENDS = backend_params(("cuda", "cpu", "reference"), devices=("cpu",)) + \
    backend_params(("cuda", "triton", "reference"), devices=("cuda",))
K, N = 24, 20


def make_adapters(ranks, seed=0):
    """name -> (lora_A [r, K], lora_B [N, r], scaling), in fp64."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i, r in enumerate(ranks):
        a = torch.randn(r, K, generator=gen, dtype=torch.float64) / K ** 0.5
        b = torch.randn(N, r, generator=gen, dtype=torch.float64) / r ** 0.5
        out[f"adapter{i}"] = (a, b, 0.5 + i)
    return out


def per_row_oracle(x, linear, adapters, names):
    """fp64: the base plus, row by row, the named adapter (PEFT's formula, no batching)."""
    x64 = x.double()
    y = x64 @ linear.weight.double().t() + linear.bias.double()
    for i, name in enumerate(names):
        if name is not None and name != "__base__":
            a, b, s = adapters[name]
            y[i] = y[i] + s * (x64[i] @ a.t()) @ b.t()
    return y


def build(device, dtype, backend, adapters, max_adapters=4, max_rank=8):
    linear = nn.Linear(K, N, device=device, dtype=dtype)
    layer = MultiLoRALinear.from_linear(linear, max_adapters, max_rank, backend=backend)
    for name, (a, b, s) in adapters.items():
        layer.add_adapter(name, a.to(device), b.to(device), s)
    return layer


ROW_NAMES = ["adapter0", None, "adapter2", "adapter1", "__base__", "adapter2", "adapter0",
             "adapter1", "adapter1", None, "adapter2", "adapter0", "adapter2"]


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@torch.no_grad()
def test_rows_match_a_per_row_loop(device, backend, dtype):
    adapters = make_adapters([2, 8, 5])
    layer = build(device, dtype, backend, adapters)
    x = torch.randn(len(ROW_NAMES), K, device=device, dtype=dtype)
    y = layer(x, ROW_NAMES)
    want = per_row_oracle(x, layer.base_layer, adapters, ROW_NAMES)
    lowp = build(device, dtype, "reference", adapters)(x, ROW_NAMES)
    assert_close_scaled(y, want, lowp, dtype, "rows")


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_sequences_and_slot_tensors(device, backend):
    adapters = make_adapters([3, 8])
    layer = build(device, torch.float32, backend, adapters)
    x = torch.randn(3, 5, K, device=device)
    names = ["adapter1", None, "adapter0"]
    y = layer(x, names)
    rows = [n for n in names for _ in range(5)]
    want = per_row_oracle(x.reshape(15, K), layer.base_layer, adapters, rows).reshape(3, 5, N)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    slots = torch.tensor([layer.adapter_slot("adapter1"), -1, layer.adapter_slot("adapter0")],
                         dtype=torch.int32, device=device)
    torch.testing.assert_close(layer(x, slots), y, rtol=0, atol=0)
    torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=0)
    decode = torch.randn(3, 1, K, device=device)  # one token per sequence, as a decode step has
    want = per_row_oracle(decode.reshape(3, K), layer.base_layer, adapters, names).reshape(3, 1, N)
    torch.testing.assert_close(layer(decode, names).double(), want, rtol=1e-5, atol=1e-5)


def test_from_linear_shares_and_freezes_the_base():
    linear = nn.Linear(K, N)
    layer = MultiLoRALinear.from_linear(linear, max_adapters=2, max_rank=4)
    assert layer.base_layer.weight is linear.weight and not linear.weight.requires_grad
    assert not linear.bias.requires_grad
    assert layer.lora_A.shape == (2, 4, K) and layer.lora_B.shape == (2, N, 4)
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad


def test_replace_remove_and_reuse_slots():
    adapters = make_adapters([2, 4, 3])
    layer = build("cpu", torch.float32, None, {})
    a0, a1, a2 = adapters.values()
    layer.add_adapter("x", a0[0], a0[1], a0[2])
    layer.add_adapter("y", a1[0], a1[1], a1[2])
    slot_x = layer.adapter_slot("x")
    inputs = torch.randn(2, K)
    layer.add_adapter("x", a2[0], a2[1], a2[2])  # replaced in place, with another rank
    assert layer.adapter_slot("x") == slot_x and int(layer.ranks[slot_x]) == 3
    want = per_row_oracle(inputs, layer.base_layer, {"x": a2}, ["x", "x"])
    torch.testing.assert_close(layer(inputs, ["x", "x"]).double(), want, rtol=1e-5, atol=1e-5)
    stale = torch.tensor([slot_x, slot_x], dtype=torch.int32)
    layer.remove_adapter("x")
    assert layer.adapter_names == ["y"] and int(layer.ranks[slot_x]) == 0
    # A stale slot has rank 0 now: base output only (within fp32 rounding, since at decode
    # sizes the fused op's base GEMM is lora_ops' own streaming pass rather than F.linear's BLAS).
    torch.testing.assert_close(layer(inputs, stale), layer.base_layer(inputs))
    with pytest.raises(KeyError, match="no adapter named 'x'"):
        layer(inputs, ["x", None])
    layer.add_adapter("z", a0[0], a0[1], a0[2])
    assert layer.adapter_slot("z") == slot_x


def test_state_dict_round_trip():
    adapters = make_adapters([2, 8])
    layer = build("cpu", torch.float32, None, adapters)
    copy = build("cpu", torch.float32, None, {})
    copy.base_layer.load_state_dict(layer.base_layer.state_dict())
    copy.load_state_dict(layer.state_dict())
    x = torch.randn(4, K)
    names = ["adapter1", "adapter0", None, "adapter1"]
    torch.testing.assert_close(copy(x, names), layer(x, names), rtol=0, atol=0)


def test_errors_name_what_was_seen():
    layer = build("cpu", torch.float32, None, make_adapters([2]), max_adapters=2, max_rank=4)
    a, b = torch.randn(3, K), torch.randn(N, 3)
    with pytest.raises(ValueError, match=r"has rank 6 .*ranks 1..max_rank=4"):
        layer.add_adapter("big", torch.randn(6, K), torch.randn(N, 6), 1.0)
    with pytest.raises(ValueError, match=f"lora_A has 5 columns but the layer has {K} input features"):
        layer.add_adapter("bad", torch.randn(3, 5), b, 1.0)
    with pytest.raises(ValueError, match=rf"lora_B must have shape \({N}, 3\)"):
        layer.add_adapter("bad", a, torch.randn(N, 2), 1.0)
    with pytest.raises(ValueError, match="name must be a non-empty string other than '__base__'"):
        layer.add_adapter("__base__", a, b, 1.0)
    with pytest.raises(ValueError, match="scaling must be a Python number"):
        layer.add_adapter("s", a, b, torch.tensor(1.0))
    for bad in (float("nan"), float("inf"), 1e300):  # the last is inf as a float32
        with pytest.raises(ValueError, match="scaling must be finite"):
            layer.add_adapter("s", a, b, bad)
    layer.add_adapter("second", a, b, 1.0)
    with pytest.raises(RuntimeError, match=r"all 2 adapter slots are taken"):
        layer.add_adapter("third", a, b, 1.0)
    with pytest.raises(ValueError, match=r"one entry per row \(3\), got shape \(2,\)"):
        layer(torch.randn(3, K), ["second", None])
    with pytest.raises(ValueError, match=r"one entry per sequence \(2\), got shape \(3,\)"):
        layer(torch.randn(2, 4, K), ["second", None, None])
    with pytest.raises(ValueError, match=r"x must be \[tokens, features\] or \[batch, seq, features\]"):
        layer(torch.randn(K), ["second"])
    with pytest.raises(TypeError, match="expected an nn.Linear, got Conv1d"):
        MultiLoRALinear.from_linear(nn.Conv1d(2, 2, 1), 2, 2)
    with pytest.raises(ValueError, match="max_rank must be a positive int"):
        MultiLoRALinear.from_linear(nn.Linear(2, 2), 2, 0)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_training_several_adapters_in_one_batch(device, backend):
    """Each slot's gradient is its adapter's gradient trained alone on its own rows; the base
    gets none; an optimizer step moves only the adapters that had rows."""
    adapters = make_adapters([2, 8, 5])
    layer = build(device, torch.float32, backend, adapters)
    x = torch.randn(len(ROW_NAMES), K, device=device)
    dy = torch.randn(len(ROW_NAMES), N, device=device)
    layer(x, ROW_NAMES).backward(dy)
    assert layer.base_layer.weight.grad is None
    for name, (a64, b64, s) in adapters.items():
        rows = [i for i, n in enumerate(ROW_NAMES) if n == name]
        slot, r = layer.adapter_slot(name), a64.shape[0]
        a = a64.float().to(device).requires_grad_()
        b = b64.float().to(device).requires_grad_()
        (s * (x[rows] @ a.t()) @ b.t()).backward(dy[rows])
        torch.testing.assert_close(layer.lora_A.grad[slot, :r], a.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer.lora_B.grad[slot, :, :r], b.grad, rtol=1e-4, atol=1e-5)
        assert (layer.lora_A.grad[slot, r:] == 0).all() and (layer.lora_B.grad[slot, :, r:] == 0).all()
    free = sorted(set(range(layer.max_adapters)) - {layer.adapter_slot(n) for n in adapters})
    assert (layer.lora_A.grad[free] == 0).all()
    before = layer.lora_A.detach().clone()
    torch.optim.SGD(layer.parameters(), lr=0.1).step()
    trained = layer.adapter_slot("adapter1")
    assert not torch.equal(layer.lora_A[trained], before[trained])
    assert torch.equal(layer.lora_A[free], before[free])


def test_mixed_batch_routes_a_whole_model():
    """Inside mixed_batch every layer uses the batch's names; a layer without a named adapter
    runs the base for those rows (as PEFT does when an adapter targets other layers)."""
    adapters = make_adapters([2, 4])
    first = build("cpu", torch.float32, None, adapters)
    second = MultiLoRALinear.from_linear(nn.Linear(N, N), 2, 4)  # holds adapter1 only
    second.add_adapter("adapter1", torch.randn(4, N), torch.randn(N, 4), 2.0)
    model = nn.Sequential(first, nn.ReLU(), second)
    x = torch.randn(3, K)
    names = ["adapter0", "adapter1", None]
    with mixed_batch(model, names):
        y = model(x)
    want = second(torch.relu(first(x, names)), [None, "adapter1", None])
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    torch.testing.assert_close(model(x), second(torch.relu(first(x))), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"no MultiLoRALinear in the model holds adapter\(s\) \['nope'\]"):
        with mixed_batch(model, ["nope", None, None]):
            pass


@pytest.mark.parametrize("device,backend", backend_params(("cuda", "cpu", "triton", "reference")))
def test_compile_fullgraph_training_step(device, backend):
    """forward + backward traced whole by torch.compile (dynamo + AOT autograd; aot_eager spares
    the code generation, which is not what is tested), adapters chosen by a slot tensor. The
    C++ autograd kernel (cpu) and the Python formula (cuda, triton) are both traced."""
    torch._dynamo.reset()
    layer = build(device, torch.float32, backend, make_adapters([2, 8, 5]))
    x = torch.randn(2, 7, K, device=device)
    slots = torch.tensor([layer.adapter_slot("adapter2"), -1], dtype=torch.int32, device=device)

    def step(module):
        module.lora_A.grad = module.lora_B.grad = None
        out = module(x, slots)
        out.square().mean().backward()
        return out.detach(), module.lora_A.grad.clone(), module.lora_B.grad.clone()

    eager = step(layer)
    compiled = step(torch.compile(layer, fullgraph=True, backend="aot_eager"))
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)
