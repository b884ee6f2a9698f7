"""Dropout where fine-tuning runs it: under torch.compile(fullgraph=True), with the seed drawn in
the graph or passed by the caller, and under activation checkpointing, which recomputes the
forward. In each, the backward must use the mask the forward used.

The layers here have A = I (r = K), so the adapter activation S = drop(x) A^T is drop(x) itself,
and B of full column rank, so S can be read back from the output: y - x W^T - b = s S B^T. The
gradients are then checked against the closed form for that very mask, which they match only
if backward re-drew the forward's mask.
"""
import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

import lora_ops
from tests.helpers import backend_params

M, K, N, P = 6, 8, 12, 0.5


def make_layer(device, backend):
    torch.manual_seed(0)
    layer = lora_ops.LoRALinear.from_linear(nn.Linear(K, N, device=device), r=K, lora_alpha=2 * K,
                                            lora_dropout=P, backend=backend)
    with torch.no_grad():
        layer.lora_A.weight.copy_(torch.eye(K))
        layer.lora_B.weight.normal_()
    return layer.train()


def step(call, layer, x, g, **kwargs):
    """y = call(x), and the gradients of x and of layer's A and B for the loss sum(y * g)."""
    a, b = layer.lora_A.weight, layer.lora_B.weight
    x.grad = a.grad = b.grad = None
    y = call(x, **kwargs)
    (y * g).sum().backward()
    return y.detach(), x.grad.clone(), a.grad.clone(), b.grad.clone()


def assert_backward_used_forward_mask(layer, x, g, result):
    y, dx, da, db = result
    s, w, b = layer.scaling, layer.weight.detach(), layer.lora_B.weight.detach()
    adapter = (y - F.linear(x.detach(), w, layer.bias.detach())) / s  # S B^T
    dropped = torch.linalg.lstsq(b, adapter.t()).solution.t()  # S = drop(x)
    kept = (dropped - x.detach() / (1 - P)).abs() < 1e-3
    zeroed = dropped.abs() < 1e-3
    assert (kept ^ zeroed).all(), "the forward's S is not a dropout of x"
    assert kept.any() and zeroed.any()
    ds = s * (g @ b)
    torch.testing.assert_close(db, s * g.t() @ dropped, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(da, ds.t() @ dropped, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dx, g @ w + torch.where(kept, ds / (1 - P), 0.0), rtol=1e-4, atol=1e-4)
    return kept


def inputs(device):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(M, K, generator=gen).to(device).requires_grad_()
    return x, torch.randn(M, N, generator=gen).to(device)


@pytest.mark.parametrize("device,backend", backend_params())
def test_eager_backward_uses_the_forward_mask(device, backend):
    """The property the other tests rely on, where it holds by construction."""
    layer, (x, g) = make_layer(device, backend), inputs(device)
    assert_backward_used_forward_mask(layer, x, g, step(layer, layer, x, g))


@pytest.mark.parametrize("device,backend", backend_params())
def test_compile_fullgraph_with_dropout(device, backend):
    """Seeds drawn in the graph (a fresh mask per call) and seeds the caller varies (a symbolic
    seed once Dynamo marks it dynamic) both trace, and match eager's masks and gradients."""
    torch._dynamo.reset()
    layer, (x, g) = make_layer(device, backend), inputs(device)
    compiled = torch.compile(layer, fullgraph=True)
    masks = [assert_backward_used_forward_mask(layer, x, g, step(compiled, layer, x, g)) for _ in range(2)]
    assert not torch.equal(*masks), "two training steps drew the same dropout mask"
    for seed in (3, 4, 5):
        got, want = step(compiled, layer, x, g, seed=seed), step(layer, layer, x, g, seed=seed)
        for c, e in zip(got, want):
            torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("device,backend", backend_params())
def test_activation_checkpointing_recomputes_the_same_mask(device, backend, use_reentrant):
    """checkpoint() runs the forward again in backward; the seed it draws there must be the one
    the first forward drew (checkpoint restores torch's RNG state), or S and the output would
    disagree."""
    layer, (x, g) = make_layer(device, backend), inputs(device)
    torch.manual_seed(7)
    result = step(lambda x: checkpoint(layer, x, use_reentrant=use_reentrant), layer, x, g)
    assert_backward_used_forward_mask(layer, x, g, result)
    torch.manual_seed(7)
    for c, e in zip(result, step(layer, layer, x, g)):
        torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("device,backend", backend_params())
def test_compiled_activation_checkpointing_recomputes_the_same_mask(device, backend, use_reentrant):
    """Both together, as a compiled fine-tuning run with gradient checkpointing has them, in one
    graph: the seed drawn per call is a tensor (torch.randint, no .item()), which Dynamo traces
    inside checkpoint's region."""
    torch._dynamo.reset()
    layer, (x, g) = make_layer(device, backend), inputs(device)
    compiled = torch.compile(lambda x: checkpoint(layer, x, use_reentrant=use_reentrant),
                             fullgraph=True)
    masks = [assert_backward_used_forward_mask(layer, x, g, step(compiled, layer, x, g)) for _ in range(2)]
    assert not torch.equal(*masks), "two training steps drew the same dropout mask"


@pytest.mark.parametrize("counter_on", ["cpu", "operands"])
@pytest.mark.parametrize("device,backend", backend_params())
def test_compiled_seed_tensor_computed_in_the_graph(device, backend, counter_on):
    """A seed the graph computes from a tensor the caller passes (a step counter, say, on the
    CPU or on the operands' device, where the kernels read it), as a framework that owns its RNG
    would: one graph for every step, each step's mask that of eager with the same seed."""
    torch._dynamo.reset()
    layer, (x, g) = make_layer(device, backend), inputs(device)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(lambda x, step: layer(x, seed=step * 1000 + 17), backend=counter,
                             fullgraph=True)
    step_device = "cpu" if counter_on == "cpu" else device
    for i in range(3):
        got = step(lambda x: compiled(x, torch.tensor(i, device=step_device)), layer, x, g)
        want = step(layer, layer, x, g, seed=i * 1000 + 17)
        for c, e in zip(got, want):
            torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1


@pytest.mark.parametrize("device,backend", backend_params(devices=("cuda",)))
def test_cuda_graph_of_a_training_step_draws_a_fresh_mask_per_replay(device, backend):
    """A whole training step, forward and backward, captured in one CUDA graph with seed=None:
    the seed is drawn in the graph by torch's generator and read by the kernels, so each replay
    applies a new mask, and its backward that very mask."""
    layer, (x, g) = make_layer(device, backend), inputs(device)
    a, b = layer.lora_A.weight, layer.lora_B.weight

    def train_step():
        y = layer(x)
        (y * g).sum().backward()
        return y

    side = torch.cuda.Stream()  # warm-up on a side stream, as capturing a backward requires
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            x.grad = a.grad = b.grad = None
            train_step()
    torch.cuda.current_stream().wait_stream(side)
    x.grad = a.grad = b.grad = None  # the graph allocates them, and rewrites them per replay
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = train_step()
    masks = []
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        result = static_y.detach().clone(), x.grad.clone(), a.grad.clone(), b.grad.clone()
        masks.append(assert_backward_used_forward_mask(layer, x, g, result))
    assert not torch.equal(*masks), "two replays applied the same dropout mask"


@pytest.mark.parametrize("device,backend", backend_params(devices=("cuda",)))
def test_compile_reduce_overhead_trains_with_dropout_in_cuda_graphs(device, backend):
    """torch.compile(mode="reduce-overhead") with dropout and seed=None: the graph draws the seed
    on the GPU, so no CPU tensor keeps Inductor from running it as CUDA graphs, and every step
    still gets a fresh mask that its backward follows."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    layer, (x, g) = make_layer(device, backend), inputs(device)
    compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
    masks = []
    for _ in range(4):  # the first runs record; the later ones replay
        torch.compiler.cudagraph_mark_step_begin()
        masks.append(assert_backward_used_forward_mask(layer, x, g, step(compiled, layer, x, g)))
    assert not torch.equal(masks[-2], masks[-1]), "two replayed steps drew the same dropout mask"
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
