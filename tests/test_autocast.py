"""torch.autocast: the layer ops cast their matmul operands to the region's dtype as F.linear does
(the compiled ops in C++, the reference and Triton backends in Python), so LoRALinear and
MultiLoRALinear train under mixed precision with fp32 parameters, like nn.Linear and PEFT."""
import copy

import pytest
import torch
from torch import nn

import lora_ops
import lora_ops.model as lm
from lora_ops.multi_lora import lora_shrink, multi_lora_linear
from tests.helpers import assert_close_scaled, backend_params
from tests.tiny_models import tiny_llama, token_batch

LOWP = (torch.bfloat16, torch.float16)
ALL = backend_params()
# Triton on CPU runs in its interpreter: the single-adapter case only.
MULTI = backend_params(("cuda", "cpu", "reference"), devices=("cpu",)) + \
    backend_params(("cuda", "triton", "reference"), devices=("cuda",))


def fp32_leaves(device, *shapes):
    return [torch.randn(*s, device=device, requires_grad=True) for s in shapes]


def cast_all(dtype, tensors):
    """Inside autograd, as autocast's casts are: gradients flow back to the fp32 leaves."""
    return [t if t is None else t.to(dtype) for t in tensors]


def grads_of(out, leaves):
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out)
    return torch.autograd.grad(out, leaves, dy)


@pytest.mark.parametrize("device,backend", ALL)
@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("x_lowp", [False, True], ids=["x_fp32", "x_lowp"])
def test_lora_linear_casts_like_explicit_casts(device, backend, dtype, x_lowp):
    """Under autocast: outputs in the region's dtype, bit for bit the call on operands cast by
    hand, and the same gradients, in fp32 for the fp32 parameters. x may come in fp32 or already
    in the low dtype (the output of an earlier autocast layer); dropout's seed passes through."""
    x, weight, bias, a, b = fp32_leaves(device, (2, 5, 24), (20, 24), (20,), (4, 24), (20, 4))
    x_in = x.to(dtype) if x_lowp else x
    kw = dict(dropout_p=0.25, training=True, seed=11, backend=backend)
    with torch.autocast(device, dtype=dtype):
        y = lora_ops.lora_linear(x_in, weight, bias, a, b, 1.5, **kw)
    assert y.dtype == dtype
    expected = lora_ops.lora_linear(*cast_all(dtype, [x_in, weight, bias, a, b]), 1.5, **kw)
    assert torch.equal(y, expected)
    leaves = [x, weight, bias, a, b]
    got, want = grads_of(y, leaves), grads_of(expected, leaves)
    for name, g, w in zip(("x", "weight", "bias", "lora_a", "lora_b"), got, want):
        assert g.dtype == torch.float32, name
        assert torch.equal(g, w), name


@pytest.mark.parametrize("device,backend", MULTI)
@pytest.mark.parametrize("dtype", LOWP, ids=str)
def test_multi_lora_linear_and_shrink_cast_like_explicit_casts(device, backend, dtype):
    """The stacks and the base are cast; the fp32 scalings and the integer ranks and indices are
    not (the result equals the call on operands cast by hand)."""
    x, weight, bias, a, b = fp32_leaves(device, (6, 24), (20, 24), (20,), (3, 8, 24), (3, 20, 8))
    scalings = torch.tensor([0.5, 2.0, 1.0], device=device)
    ranks = torch.tensor([8, 3, 1], device=device, dtype=torch.int32)
    route = dict(token_adapter=torch.tensor([0, 2, -1, 1, 1, 0], device=device), backend=backend)
    with torch.autocast(device, dtype=dtype):
        y = multi_lora_linear(x, weight, bias, a, b, scalings, ranks, **route)
        t = lora_shrink(x, a, scalings, ranks, **route)
    assert y.dtype == dtype and t.dtype == torch.float32
    cast = cast_all(dtype, [x, weight, bias, a, b])
    expected = multi_lora_linear(*cast, scalings, ranks, **route)
    assert torch.equal(y, expected)
    assert torch.equal(t, lora_shrink(cast[0], cast[3], scalings, ranks, **route))
    got, want = grads_of(y, [x, a, b]), grads_of(expected, [x, a, b])
    for name, g, w in zip(("x", "lora_a", "lora_b"), got, want):
        assert g.dtype == torch.float32 and torch.equal(g, w), name


def test_compiled_op_called_directly_casts_too():
    """Other frameworks calling torch.ops.lora_ops.* get the cast from the op itself."""
    if "cpu" not in lora_ops.available_backends().get("cpu", []):
        pytest.skip("the compiled library is not built")
    x, weight, bias, a, b = (t.detach() for t in fp32_leaves("cpu", (5, 24), (20, 24), (20,), (4, 24), (20, 4)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, s = torch.ops.lora_ops.lora_linear_fwd(x, weight, bias, a, b, 2.0, 0.0, None)
    y_ref, s_ref = torch.ops.lora_ops.lora_linear_fwd(
        *cast_all(torch.bfloat16, [x, weight, bias, a, b]), 2.0, 0.0, None)
    assert y.dtype == s.dtype == torch.bfloat16
    assert torch.equal(y, y_ref) and torch.equal(s, s_ref)


def test_mismatched_dtypes_outside_autocast_are_still_refused():
    x, weight, bias, a, b = (t.detach() for t in fp32_leaves("cpu", (5, 24), (20, 24), (20,), (4, 24), (20, 4)))
    with pytest.raises(ValueError, match="lora_linear: weight has dtype torch.float32 but x has torch.bfloat16"):
        lora_ops.lora_linear(x.bfloat16(), weight, bias, a, b, 1.0)


@pytest.mark.parametrize("backend", lora_ops.available_backends()["cpu"])
def test_refusal_under_autocast_names_the_real_fault_not_a_dtype_autocast_casts_away(backend):
    """Inside autocast, mixed fp32 / bf16 operands are fine: an op that refuses them for another
    reason (lora_b on another device here) is explained with the operands as autocast casts them,
    naming that fault, not a dtype mismatch the region casts away."""
    x, weight, bias, a, b = (t.detach() for t in fp32_leaves("cpu", (5, 24), (20, 24), (20,), (4, 24), (20, 4)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lora_ops.lora_linear(x.bfloat16(), weight, bias, a, b, 1.0, backend=backend)  # accepted
        with pytest.raises(ValueError, match=r"^lora_linear: lora_b is on meta but x is on cpu"):
            lora_ops.lora_linear(x.bfloat16(), weight, bias, a, b.to("meta"), 1.0, backend=backend)


@pytest.mark.parametrize("device,backend", backend_params(("cuda", "cpu")))
def test_compile_fullgraph_training_step_under_autocast(device, backend):
    torch._dynamo.reset()
    layer = lora_ops.LoRALinear.from_linear(nn.Linear(24, 16, device=device), r=4, lora_alpha=8,
                                            backend=backend)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 5, 24, device=device)

    def step(module):
        module.lora_A.weight.grad = module.lora_B.weight.grad = None
        with torch.autocast(device, dtype=torch.bfloat16):
            out = module(x)
        out.float().square().mean().backward()
        return out.detach(), module.lora_A.weight.grad.clone(), module.lora_B.weight.grad.clone()

    eager = step(layer)
    compiled = step(torch.compile(layer, fullgraph=True))
    assert compiled[0].dtype == torch.bfloat16
    assert compiled[1].dtype == compiled[2].dtype == torch.float32
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=1e-2, atol=1e-2)


peft = pytest.importorskip("peft")


def test_swapped_peft_model_trains_under_autocast_like_peft():
    """A real PEFT model in fp32 and its lora_ops swap, one bf16 autocast training step each:
    losses and adapter gradients as close to the fp32 step as PEFT's own (before, the swapped
    layers refused the bf16 activations of the attention in front of them)."""
    torch.manual_seed(4)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    original = peft.get_peft_model(tiny_llama(), config).train()
    swapped = lm.from_peft(copy.deepcopy(original))
    ids = token_batch()

    def step(model, autocast):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = torch.cat([p.grad.flatten() for n, p in model.named_parameters() if p.requires_grad])
        return loss.detach().reshape(1), grads

    exact = step(original, autocast=False)
    theirs = step(original, autocast=True)
    ours = step(swapped, autocast=True)
    for what, o, t, e in zip(("loss", "adapter gradients"), ours, theirs, exact):
        assert_close_scaled(o, e, t, torch.bfloat16, what)
