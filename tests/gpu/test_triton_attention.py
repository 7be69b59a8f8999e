"""Triton paged attention against the gather + SDPA reference (fp32), on a GPU."""

from __future__ import annotations

import pytest
import torch

from cluster.engine.attention import paged_attention_ref

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
PAGE = 16


def make(heads, kv_heads, dim, ctxs, q_lens, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    blocks = sum(-(-c // PAGE) for c in ctxs) + 8
    kc = torch.randn(blocks, PAGE, kv_heads, dim, device="cuda", generator=g).to(dtype)
    vc = torch.randn(blocks, PAGE, kv_heads, dim, device="cuda", generator=g).to(dtype)
    perm = torch.randperm(blocks, device="cuda", generator=g).tolist()  # scattered blocks
    width = max(-(-c // PAGE) for c in ctxs)
    tables = []
    for c in ctxs:
        n = -(-c // PAGE)
        tables.append([perm.pop() for _ in range(n)] + [0] * (width - n))
    cu = [0]
    for n in q_lens:
        cu.append(cu[-1] + n)
    q = torch.randn(cu[-1], heads, dim, device="cuda", generator=g).to(dtype)
    bt = torch.tensor(tables, dtype=torch.int32, device="cuda")
    ref = paged_attention_ref(q.float(), kc.float(), vc.float(), bt, cu, ctxs, dim ** -0.5)
    return q, kc, vc, bt, cu, ref


def rel_err(out, ref) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 7, 8])
def test_decode_matches_reference(dim, group):
    from cluster.engine.triton_attention import paged_decode_attention

    ctxs = [1, 17, 300, 1024, 4096, 2049]
    q, kc, vc, bt, cu, ref = make(2 * group, 2, dim, ctxs, [1] * len(ctxs))
    ctx = torch.tensor(ctxs, dtype=torch.int32, device="cuda")
    out = paged_decode_attention(q, kc, vc, bt, ctx, dim ** -0.5)
    assert rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 7, 8])
def test_prefill_with_cached_prefix_matches_reference(dim, group):
    from cluster.engine.triton_attention import paged_prefill_attention

    ctxs, q_lens = [70, 1000, 4096, 5, 300], [70, 100, 257, 5, 1]  # fresh, chunked, decode
    q, kc, vc, bt, cu, ref = make(2 * group, 2, dim, ctxs, q_lens)
    out = paged_prefill_attention(
        q, kc, vc, bt, torch.tensor(cu, dtype=torch.int32, device="cuda"),
        torch.tensor(ctxs, dtype=torch.int32, device="cuda"), dim ** -0.5, cu_seqlens_q_host=cu)
    assert rel_err(out, ref) < 1e-2


def test_store_kv_skips_negative_slots():
    from cluster.engine.triton_attention import store_kv

    k = torch.randn(4, 2, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(4, 2, 64, device="cuda", dtype=torch.bfloat16)
    kc = torch.zeros(2, PAGE, 2, 64, device="cuda", dtype=torch.bfloat16)
    vc = torch.zeros_like(kc)
    store_kv(k, v, kc, vc, torch.tensor([3, -1, 17, 0], device="cuda"))
    flat_k, flat_v = kc.view(-1, 2, 64), vc.view(-1, 2, 64)
    assert torch.equal(flat_k[[3, 17, 0]], k[[0, 2, 3]])
    assert torch.equal(flat_v[[3, 17, 0]], v[[0, 2, 3]])
    assert flat_k.abs().sum(dim=(1, 2)).count_nonzero() == 3


def test_decode_in_cuda_graph_follows_new_inputs():
    from cluster.engine.triton_attention import paged_decode_attention

    q, kc, vc, bt, cu, _ = make(8, 2, 128, [100, 3000, 1], [1, 1, 1])
    ctx = torch.tensor([100, 3000, 1], dtype=torch.int32, device="cuda")
    paged_decode_attention(q, kc, vc, bt, ctx, 128 ** -0.5)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_decode_attention(q, kc, vc, bt, ctx, 128 ** -0.5)
    for ctxs in ([2000, 5, 1], [16, 1, 2990], [0, 1, 7]):
        ctx.copy_(torch.tensor(ctxs))
        bt.copy_(bt.flip(0))
        graph.replay()
        ref = paged_attention_ref(q.float(), kc.float(), vc.float(), bt, [0, 1, 2, 3], ctxs,
                                  128 ** -0.5)
        live = [i for i, c in enumerate(ctxs) if c > 0]
        assert rel_err(out[live], ref[live]) < 1e-2
        assert out[[i for i, c in enumerate(ctxs) if c == 0]].abs().sum() == 0
