"""GPU-only checks of lora_linear: the decode and GEMM paths at realistic sizes, and CUDA graphs.
Skipped without a GPU (the parity tests of test_lora_linear.py also cover cuda/triton there)."""
import pytest
import torch

import lora_ops
from tests.helpers import DTYPES, backend_params
from tests.test_lora_linear import check_parity, make_operands

pytestmark = pytest.mark.cuda
GPU_BACKENDS = backend_params(("cuda", "triton"), devices=("cuda",))


@pytest.mark.parametrize("device,backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [1, 4, 16, 17, 130, 1000])
@pytest.mark.parametrize("K,N,r", [(256, 512, 16), (1000, 264, 64), (520, 1032, 128)])
def test_parity_at_size(device, backend, dtype, M, K, N, r):
    x, w, b, a, bb = make_operands((M,), K, N, r, dtype, device)
    check_parity(device, backend, dtype, x, w, b, a, bb, s=0.5, p=0.1, seed=M)


@pytest.mark.parametrize("device,backend", GPU_BACKENDS)
@pytest.mark.parametrize("M", [1, 64])
def test_cuda_graph_capture_and_replay(device, backend, M):
    x, w, b, a, bb = make_operands((M,), 256, 384, 16, torch.bfloat16, device)
    run = lambda inp: lora_ops.lora_linear(inp, w, b, a, bb, 2.0, dropout_p=0.1, training=True,
                                           seed=5, backend=backend)
    static_x = x.clone()
    run(static_x)  # warm up: compile, cuBLAS handles, autotuning
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = run(static_x)
    for _ in range(2):
        fresh = torch.randn_like(x)
        static_x.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(static_y, run(fresh))


@pytest.mark.parametrize("device,backend", GPU_BACKENDS + backend_params(("reference",), devices=("cuda",)))
@pytest.mark.parametrize("M", [1, 64])
def test_cuda_graph_replays_follow_a_seed_on_the_device(device, backend, M):
    """A seed tensor on the GPU is read by the kernels as they run: a captured graph applies on
    each replay the mask of the value the tensor holds then, the mask eager gives that value."""
    x, w, b, a, bb = make_operands((M,), 256, 384, 16, torch.bfloat16, device)
    seed = torch.tensor(0, device=device)
    run = lambda: lora_ops.lora_linear(x, w, b, a, bb, 2.0, dropout_p=0.5, training=True,
                                       seed=seed, backend=backend)
    run()  # warm up: compile, cuBLAS handles, autotuning
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = run()
    replays = []
    for value in (11, -12, 11):
        seed.fill_(value)
        graph.replay()
        torch.cuda.synchronize()
        replays.append(static_y.clone())
        want = lora_ops.lora_linear(x, w, b, a, bb, 2.0, dropout_p=0.5, training=True, seed=value,
                                    backend=backend)
        assert torch.equal(replays[-1], want), f"replay with seed {value}"
    assert not torch.equal(replays[0], replays[1]) and torch.equal(replays[0], replays[2])


@pytest.mark.parametrize("device,backend", GPU_BACKENDS)
def test_cuda_graph_capture_refuses_a_cpu_seed_tensor(device, backend):
    """A seed tensor on the CPU is read on the host once, at capture, however it changes later:
    capture refuses it, naming the ways out. seed=None (drawn on the GPU, in the graph), an int
    seed (a fixed mask, above) and no dropout capture."""
    x, w, b, a, bb = make_operands((8,), 256, 384, 16, torch.bfloat16, device)
    layer = lambda **kw: lora_ops.lora_linear(x, w, b, a, bb, 2.0, backend=backend, **kw)
    for training in (True, False):  # warm up outside capture every variant captured below
        layer(dropout_p=0.1, training=training)
    layer(dropout_p=0.0, training=True)
    torch.cuda.synchronize()
    with pytest.raises(RuntimeError, match=r"^lora_linear: dropout .* a CPU seed tensor under CUDA graph capture"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            layer(dropout_p=0.1, training=True, seed=torch.tensor(3))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fresh = layer(dropout_p=0.5, training=True)
        layer(dropout_p=0.1, training=False)
        layer(dropout_p=0.0, training=True)
    outputs = []
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        outputs.append(fresh.clone())
    assert not torch.equal(*outputs), "seed=None: two replays applied the same mask"


@pytest.mark.parametrize("device,backend", backend_params(("cuda",), devices=("cuda",)))
@pytest.mark.parametrize("clusters", ["1", "0"])
@pytest.mark.parametrize("M", [1, 8, 9, 16, 17, 300])
@pytest.mark.parametrize("r", [64, 100])
def test_cluster_and_fallback_plans_agree_with_oracle(device, backend, clusters, M, r, monkeypatch):
    # On sm_90+ the CUDA forward runs single-launch cluster plans; LORA_OPS_CUDA_CLUSTERS=0
    # (read on every call) switches to the multi-launch plans other GPUs take, and =1 makes a
    # cluster plan that was picked but could not launch an error, not a silent fallback. Both
    # must match the oracle on the same device, dropout included. r = 64: the M > 16 kernel's
    # 32 KB of dynamic shared memory plus its 17 KB of static tiles need the opt-in too.
    monkeypatch.setenv("LORA_OPS_CUDA_CLUSTERS", clusters)
    x, w, b, a, bb = make_operands((M,), 2048, 520, r, torch.bfloat16, device)
    check_parity(device, backend, torch.bfloat16, x, w, b, a, bb, s=0.5, p=0.1, seed=M)


@pytest.mark.parametrize("device,backend", backend_params(("cuda",), devices=("cuda",)))
@pytest.mark.parametrize("mma", ["1", "0"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [17, 300, 8200])
def test_tensor_core_and_simt_tiles_agree_with_oracle(device, backend, mma, dtype, M, monkeypatch):
    # fp16 / bf16 adapter products run on tensor-core tiles (sm_80+); LORA_OPS_CUDA_MMA=0 (read
    # on every call) switches to the SIMT tiles fp32 uses. M = 8200 takes the fused plan where
    # clusters are off, the others the split or cluster plan; r = 72 spans two rank tiles.
    monkeypatch.setenv("LORA_OPS_CUDA_MMA", mma)
    x, w, b, a, bb = make_operands((M,), 264, 136, 72, dtype, device)
    check_parity(device, backend, dtype, x, w, b, a, bb, s=0.5, p=0.1, seed=M)


def _adapter_gemm_runs_here() -> bool:
    return (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
            and bool(lora_ops.build_info().get("cuda_adapter_gemm")))


@pytest.mark.parametrize("device,backend", backend_params(("cuda",), devices=("cuda",)))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,K,N,r", [(1030, 72, 4104, 24), (1100, 136, 4096, 128), (520, 8200, 72, 24)])
@pytest.mark.parametrize("mode", ["1", "0"])
def test_adapter_in_gemm_plan_agrees_with_oracle(device, backend, dtype, M, K, N, r, mode,
                                                 monkeypatch):
    # Hopper: shapes the adapter-in-GEMM plans take (CUTLASS, K + r deep mainloop): the forward
    # of the first two, the backward's dX of the last without dropout. "1" requires them (a call
    # they should take but do not then fails), "0" switches them off (cluster plan + cuBLAS).
    if mode == "1" and not _adapter_gemm_runs_here():
        pytest.skip("the adapter-in-GEMM plan runs on sm_90 builds with CUTLASS only")
    monkeypatch.setenv("LORA_OPS_CUDA_ADAPTER_GEMM", mode)
    x, w, b, a, bb = make_operands((M,), K, N, r, dtype, device)
    check_parity(device, backend, dtype, x, w, b, a, bb, s=0.5, p=0.1, seed=M)
    check_parity(device, backend, dtype, x, w, None, a, bb, s=2.0, p=0.0, seed=M)


def test_cuda_paths_follow_the_device_and_switches(monkeypatch):
    """cuda_paths says which fast paths run: empty without a GPU; on one, what its capability
    allows (a build made for the visible cards has their code), each off with its switch."""
    if not torch.cuda.is_available() or not lora_ops.build_info().get("with_cuda"):
        assert lora_ops.cuda_paths(0) == {}
        return
    major = torch.cuda.get_device_capability(0)[0]
    paths = lora_ops.cuda_paths(0)
    assert paths["mma"] == (major >= 8)
    assert paths["clusters"] == (major >= 9)
    assert paths["adapter_gemm"] == (major == 9 and bool(lora_ops.build_info()["cuda_adapter_gemm"]))
    for switch, path in (("LORA_OPS_CUDA_MMA", "mma"), ("LORA_OPS_CUDA_CLUSTERS", "clusters"),
                         ("LORA_OPS_CUDA_ADAPTER_GEMM", "adapter_gemm")):
        monkeypatch.setenv(switch, "0")
        assert not lora_ops.cuda_paths(0)[path], switch
        monkeypatch.delenv(switch)
