"""The fused MoE kernels (triton_moe) against the routed experts' PyTorch path
(Experts.torch_forward), and inside a CUDA graph."""

from __future__ import annotations

import pytest
import torch

from cluster.engine.moe import Experts

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SMALL, V2_LITE = (256, 128), (2048, 1408)  # (hidden, moe intermediate)


def make(tokens: int, experts: int, k: int, hidden: int, inter: int, dtype: torch.dtype,
         seed: int, unpicked: slice | None = None):
    """Experts with random weights, and inputs routed by random scores (experts in `unpicked`
    get no tokens)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    mod = Experts(experts, hidden, inter).to("cuda", dtype)
    with torch.no_grad():
        mod.gate_up_proj.copy_(torch.randn(experts, 2 * inter, hidden, device="cuda",
                                           generator=g) / hidden**0.5)
        mod.down_proj.copy_(torch.randn(experts, hidden, inter, device="cuda",
                                        generator=g) / inter**0.5)
    x = torch.randn(tokens, hidden, device="cuda", generator=g).to(dtype)
    return mod, x, *route(tokens, experts, k, g, unpicked)


def route(tokens: int, experts: int, k: int, g: torch.Generator, unpicked: slice | None = None):
    scores = torch.rand(tokens, experts, device="cuda", generator=g)
    if unpicked is not None:
        scores[:, unpicked] = -1.0
    weights, ids = scores.topk(k, dim=-1)
    return weights + 0.1, ids


def poison_allocator() -> None:
    """Leave NaNs in the caching allocator's free blocks, so a row the kernels should write
    and don't comes out NaN rather than stale but plausible."""
    torch.empty(64 << 20, dtype=torch.uint8, device="cuda").fill_(0xFF)


def check(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    assert torch.isfinite(got).all()
    got, want = got.float(), want.float()
    if dtype == torch.float32:  # the kernels' fp32 dots are IEEE, not tf32
        assert torch.allclose(got, want, rtol=1e-3, atol=1e-3 * want.abs().max().item())
    else:
        assert ((got - want).norm() / want.norm()).item() < 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden,inter", [SMALL, V2_LITE])
@pytest.mark.parametrize("experts,k", [(8, 2), (8, 6), (64, 2), (64, 6)])
@pytest.mark.parametrize("tokens", [1, 7, 64, 300])
def test_fused_experts_match_torch(tokens, experts, k, hidden, inter, dtype):
    from cluster.engine import triton_moe

    mod, x, weights, ids = make(tokens, experts, k, hidden, inter, dtype,
                                seed=tokens * 1000 + experts * 10 + k)
    poison_allocator()
    got = triton_moe.fused_experts(x, mod.gate_up_proj, mod.down_proj, weights, ids)
    with torch.no_grad():
        check(got, mod.torch_forward(x, weights, ids), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_without_tokens(dtype):
    """Half the experts (every other one, and the whole last quarter) get no tokens."""
    from cluster.engine import triton_moe

    for unpicked in (slice(0, None, 2), slice(48, None)):
        mod, x, weights, ids = make(40, 64, 6, *SMALL, dtype, seed=3, unpicked=unpicked)
        assert not (ids[..., None] == torch.arange(64, device="cuda")[unpicked]).any()
        poison_allocator()
        got = triton_moe.fused_experts(x, mod.gate_up_proj, mod.down_proj, weights, ids)
        with torch.no_grad():
            check(got, mod.torch_forward(x, weights, ids), dtype)


@pytest.mark.parametrize("tokens,experts,k,block_m", [(1, 64, 6, 16), (300, 8, 6, 64),
                                                      (64, 64, 6, 32), (5, 3, 1, 16)])
def test_align(tokens, experts, k, block_m):
    """Every assignment once, each row block one expert's (in stable order), padding after."""
    from cluster.engine import triton_moe

    g = torch.Generator(device="cuda").manual_seed(tokens)
    ids = torch.randint(0, experts, (tokens, k), device="cuda", generator=g)
    sorted_ids, block_expert = (t.cpu() for t in triton_moe.align(ids, experts, block_m))
    n, flat = tokens * k, ids.flatten().cpu()
    assert sorted_ids.numel() == block_expert.numel() * block_m
    assert sorted(sorted_ids[sorted_ids < n].tolist()) == list(range(n))
    used = int((block_expert >= 0).sum())
    assert (block_expert[used:] == -1).all() and (sorted_ids[used * block_m:] == n).all()
    assert (block_expert[1:used] >= block_expert[: used - 1]).all()
    for b in range(used):
        rows = sorted_ids[b * block_m:(b + 1) * block_m]
        live = rows[rows < n]
        assert live.numel() and (flat[live.long()] == block_expert[b]).all()
        assert (live[1:] > live[:-1]).all() and (rows[live.numel():] == n).all()


def test_forward_takes_the_fused_path():
    from cluster.engine import triton_moe

    mod, x, weights, ids = make(9, 8, 2, *SMALL, torch.bfloat16, seed=5)
    mod.fused = triton_moe.fused_experts  # as the model runner sets it
    with torch.no_grad():
        got = mod(x, weights, ids)
        assert torch.equal(got, triton_moe.fused_experts(x, mod.gate_up_proj, mod.down_proj,
                                                         weights, ids))
        check(got, mod.torch_forward(x, weights, ids), torch.bfloat16)


@pytest.mark.parametrize("tokens", [1, 48])
def test_cuda_graph_capture_and_replay(tokens):
    """Captured once, replayed with new tokens, weights and routings (some experts unpicked)."""
    from cluster.engine import triton_moe

    experts, k = 64, 6
    mod, x, weights, ids = make(tokens, experts, k, *SMALL, torch.bfloat16, seed=11)
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compiles the kernels outside the capture
            triton_moe.fused_experts(x, mod.gate_up_proj, mod.down_proj, weights, ids)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = triton_moe.fused_experts(x, mod.gate_up_proj, mod.down_proj, weights, ids)
        g = torch.Generator(device="cuda").manual_seed(12)
        for unpicked in (None, slice(0, None, 2), slice(8, None)):
            x.copy_(torch.randn(x.shape, device="cuda", generator=g))
            new_weights, new_ids = route(tokens, experts, k, g, unpicked)
            weights.copy_(new_weights)
            ids.copy_(new_ids)
            out.fill_(float("nan"))
            graph.replay()
            check(out, mod.torch_forward(x, weights, ids), torch.bfloat16)
