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


@pytest.mark.parametrize("group", [1, 7])
def test_mixed_step_decode_rows_then_prefill_rows(group):
    """A mixed step's leading one-query rows go to the decode kernel, the rest to the prefill
    kernel, into one output: together they must equal the reference on every row."""
    from cluster.engine.attention import AttentionMetadata
    from cluster.engine.gpu_backends import TritonBackend

    ctxs, q_lens = [300, 1, 2049, 700, 64, 5], [1, 1, 1, 200, 64, 1]
    q, kc, vc, bt, cu, ref = make(2 * group, 2, 128, ctxs, q_lens)
    meta = AttentionMetadata(
        slot_mapping=torch.empty(0, dtype=torch.int64, device="cuda"), block_tables=bt,
        context_lens=torch.tensor(ctxs, dtype=torch.int32, device="cuda"),
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device="cuda"),
        context_lens_host=ctxs, cu_seqlens_q_host=cu, num_decodes=3)
    out = TritonBackend().attend(q, kc, vc, meta, 128 ** -0.5)
    assert rel_err(out, ref) < 1e-2
    for b in range(len(ctxs)):  # each row on its own, so a skipped row cannot hide
        assert rel_err(out[cu[b]:cu[b + 1]], ref[cu[b]:cu[b + 1]]) < 1e-2


def test_mixed_graph_metadata_gives_the_same_rows():
    """A mixed CUDA graph's fixed shapes (cuda_graphs.py): the decode kernel over more rows
    than the step decodes (context 0 past them), the prefill kernel over more tiles than the
    step has (the rest on an empty sequence), padding rows past the step's tokens. Every
    real row must equal the reference."""
    from cluster.engine.attention import AttentionMetadata
    from cluster.engine.gpu_backends import TritonBackend

    ctxs, q_lens = [300, 1, 2049, 700, 64, 5], [1, 1, 1, 200, 64, 1]
    q, kc, vc, bt, cu, ref = make(14, 2, 64, ctxs, q_lens)
    n, nd, pad_rows, cap = len(ctxs), 3, 30, 16
    q = torch.cat([q, torch.randn(pad_rows, *q.shape[1:], device="cuda", dtype=q.dtype)])
    tables = torch.cat([bt, torch.zeros(cap, bt.shape[1], dtype=torch.int32, device="cuda")])
    ctx = ctxs + [0]  # sequence n: the empty one
    seqs, starts = [], []
    for b in range(nd, n):
        for s0 in range(0, q_lens[b], 64):
            seqs.append(b)
            starts.append(s0)
    tiles = torch.tensor([seqs + [n] * 7, starts + [0] * 7], dtype=torch.int32, device="cuda")
    dev = {"dtype": torch.int32, "device": "cuda"}
    meta = AttentionMetadata(
        slot_mapping=torch.empty(0, dtype=torch.int64, device="cuda"), block_tables=tables,
        context_lens=torch.tensor(ctx, **dev), cu_seqlens_q=torch.tensor(cu + [cu[-1]], **dev),
        context_lens_host=[], cu_seqlens_q_host=[],
        decode_context_lens=torch.tensor(ctxs[:nd] + [0] * (cap - nd), **dev),
        prefill_tiles=(tiles[0], tiles[1]))
    out = TritonBackend().attend(q, kc, vc, meta, 64 ** -0.5)
    for b in range(n):
        assert rel_err(out[cu[b]:cu[b + 1]], ref[cu[b]:cu[b + 1]]) < 1e-2


@pytest.mark.parametrize("heads,kv_heads,dim", [(14, 2, 64), (32, 8, 128)])
def test_rope_store_kv_matches_rope_then_store(heads, kv_heads, dim):
    """The fused kernel against the plain path: q rotated in place (a strided view into the
    fused qkv rows, as in the model), k rotated and v copied into their slots, slot -1
    skipped, every other slot untouched."""
    from cluster.engine.model import _rope
    from cluster.engine.triton_attention import rope_store_kv

    tokens, blocks = 9, 4
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    q, k, v = (x.view(tokens, -1, dim) for x in (q, k, v))
    freqs = torch.outer(torch.arange(4096.0, device="cuda"),
                        1e4 ** -(torch.arange(0, dim, 2, device="cuda") / dim))
    cos, sin = freqs.cos(), freqs.sin()
    pos = torch.tensor([0, 5, 4095, 7, 1, 2, 3, 100, 9], device="cuda")
    slots = torch.tensor([3, 17, -1, 0, 60, 61, 62, 63, 20], device="cuda")
    want_q, want_k = _rope(q.clone(), k.clone(), cos, sin, pos)
    kc = torch.zeros(blocks, PAGE, kv_heads, dim, device="cuda", dtype=torch.bfloat16)
    vc = torch.zeros_like(kc)
    v_want = v.clone()
    got_q = rope_store_kv(q, k, v, pos, cos, sin, kc, vc, slots)
    assert torch.allclose(got_q.float(), want_q.float(), atol=1e-2)
    assert got_q.data_ptr() == q.data_ptr()  # in place
    flat_k, flat_v = kc.view(-1, kv_heads, dim), vc.view(-1, kv_heads, dim)
    live = [i for i, s in enumerate(slots.tolist()) if s >= 0]
    assert torch.allclose(flat_k[slots[live]].float(), want_k[live].float(), atol=1e-2)
    assert torch.equal(flat_v[slots[live]], v_want[live])
    untouched = torch.ones(blocks * PAGE, dtype=torch.bool, device="cuda")
    untouched[slots[live]] = False
    assert flat_k[untouched].abs().sum() == 0 and flat_v[untouched].abs().sum() == 0
