"""Triton MLA decode (triton_mla.py) against the PyTorch latent_decode reference (in fp32),
on a GPU: paged caches with scattered blocks, mixed context lengths, empty rows, CUDA graphs,
and the mla_attention wiring."""

from __future__ import annotations

import pytest
import torch

from cluster.engine.mla_attention import latent_decode

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
DEV = "cuda"
PAGE = 16
CTXS = [1000, 1, 15, 16, 17, 300]  # around a block's edges, one split and several
# rank, rope, nope; "odd": widths padded to powers of two in the kernel (the tests' own model)
SHAPES = {"v2-lite": (512, 64, 128), "v3-tiny": (128, 16, 32), "odd": (40, 8, 16)}
TOL = {torch.bfloat16: 1e-2, torch.float32: 1e-4}


def make(heads, rank, rope, ctxs, dtype=torch.bfloat16, seed=0, page=PAGE, width=None):
    """q, a paged cache, block tables (each row's blocks scattered over the cache, padded
    with a real block index) and context lengths on the device; every value random."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    width = width or max(1, max(-(-c // page) for c in ctxs))
    blocks = len(ctxs) * width + 4
    kv = torch.randn(blocks, page, rank + rope, device=DEV, generator=g).to(dtype)
    perm = torch.randperm(blocks, device=DEV, generator=g).tolist()
    tables = []
    for c in ctxs:
        n = -(-c // page)
        tables.append([perm.pop() for _ in range(n)] + [perm[0]] * (width - n))
    q = torch.randn(len(ctxs), heads, rank + rope, device=DEV, generator=g).to(dtype)
    bt = torch.tensor(tables, dtype=torch.int32, device=DEV)
    return q, kv, bt, torch.tensor(ctxs, dtype=torch.int32, device=DEV)


def reference(q, kv, bt, ctx, scale, rank):
    """latent_decode in fp32 on the rows of nonzero context; zeros on the others."""
    ctxs = ctx.tolist()
    live = [i for i, c in enumerate(ctxs) if c > 0]
    ref = torch.zeros(q.shape[0], q.shape[1], rank, device=q.device)
    ref[live] = latent_decode(q[live].float(), kv.float(), bt[live], ctx[live],
                              [ctxs[i] for i in live], scale, rank)
    return ref, live


def rel_err(out, ref) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("heads", [8, 16, 24, 128])
@pytest.mark.parametrize("batch", [1, 5, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_matches_reference(shape, heads, batch, dtype):
    from cluster.engine.triton_mla import mla_decode

    rank, rope, nope = SHAPES[shape]
    ctxs = [CTXS[i % len(CTXS)] for i in range(batch)]
    q, kv, bt, ctx = make(heads, rank, rope, ctxs, dtype, seed=batch * heads)
    scale = (nope + rope) ** -0.5
    out = mla_decode(q, kv, bt, ctx, scale, rank)
    assert out.shape == (batch, heads, rank) and out.dtype == dtype
    ref, _ = reference(q, kv, bt, ctx, scale, rank)
    assert rel_err(out, ref) < TOL[dtype]
    for b in range(batch):  # each row on its own: a short row cannot hide behind a long one
        assert rel_err(out[b], ref[b]) < TOL[dtype], (b, ctxs[b])


@pytest.mark.parametrize("splits", [1, 3, 32])
@pytest.mark.parametrize("page,block_n", [(16, None), (16, 64), (64, 32), (32, 16)])
def test_split_counts_and_page_sizes(splits, page, block_n):
    """Forced split counts (more splits than a short row has tiles: empty splits) and pages
    smaller, equal to and larger than the kernel's token tile."""
    from cluster.engine.triton_mla import mla_decode

    rank, rope, nope = SHAPES["v2-lite"]
    q, kv, bt, ctx = make(16, rank, rope, [5, 1000, 64, 129], page=page, seed=splits)
    out = mla_decode(q, kv, bt, ctx, 0.1, rank, num_splits=splits, block_n=block_n)
    ref, _ = reference(q, kv, bt, ctx, 0.1, rank)
    for b in range(4):
        assert rel_err(out[b], ref[b]) < 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("splits", [None, 1, 4])
def test_rows_of_context_zero_give_zeros_and_no_nan(dtype, splits):
    """A batch's rows of context 0 (padding rows of a graph, say) write zeros; every other
    row is right and nothing anywhere is NaN, whatever `out` held before."""
    from cluster.engine.triton_mla import mla_decode

    rank, rope, nope = SHAPES["v2-lite"]
    ctxs = [300, 0, 17, 0, 1000, 0]
    q, kv, bt, ctx = make(16, rank, rope, ctxs, dtype, seed=7)
    out = torch.full((len(ctxs), 16, rank), float("nan"), device=DEV, dtype=dtype)
    mla_decode(q, kv, bt, ctx, 0.1, rank, out=out, num_splits=splits)
    ref, live = reference(q, kv, bt, ctx, 0.1, rank)
    assert torch.isfinite(out).all()
    for b in live:
        assert rel_err(out[b], ref[b]) < TOL[dtype]
    assert out[[b for b, c in enumerate(ctxs) if c == 0]].abs().sum() == 0


def test_strided_query_and_output_views():
    """q and out as views into wider buffers (last dim contiguous), an fp32 query over a
    bf16 cache, an fp32 output."""
    from cluster.engine.triton_mla import mla_decode

    rank, rope, nope = SHAPES["v2-lite"]
    q, kv, bt, ctx = make(16, rank, rope, [40, 700, 3], seed=3)
    wide_q = torch.randn(3, 16, 1024, device=DEV)
    wide_q[..., 100:100 + rank + rope] = q.float()
    wide_out = torch.full((3, 16, 600), float("nan"), device=DEV)
    out = mla_decode(wide_q[..., 100:100 + rank + rope], kv, bt, ctx, 0.1, rank,
                     out=wide_out[..., 50:50 + rank])
    ref, _ = reference(q, kv, bt, ctx, 0.1, rank)
    assert rel_err(out, ref) < 1e-2
    assert wide_out[..., :50].isnan().all() and wide_out[..., 50 + rank:].isnan().all()


def test_decode_in_cuda_graph_follows_new_inputs():
    """Captured once; replays with other context lengths (0 among them) and tables written
    into the same tensors match the reference."""
    from cluster.engine.triton_mla import mla_decode

    rank, rope, nope = SHAPES["v2-lite"]
    scale = (nope + rope) ** -0.5
    q, kv, bt, ctx = make(16, rank, rope, [100, 3000, 1, 17], seed=11)
    mla_decode(q, kv, bt, ctx, scale, rank)  # compiled before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mla_decode(q, kv, bt, ctx, scale, rank)
    g = torch.Generator(device=DEV).manual_seed(12)
    for ctxs in ([2000, 5, 1, 3000], [16, 0, 2990, 1], [0, 1, 7, 0]):
        ctx.copy_(torch.tensor(ctxs))
        bt.copy_(bt[torch.randperm(4, device=DEV, generator=g)])
        q.copy_(torch.randn(q.shape, device=DEV, generator=g))
        graph.replay()
        ref, live = reference(q, kv, bt, ctx, scale, rank)
        assert torch.isfinite(out).all()
        for b in live:
            assert rel_err(out[b], ref[b]) < 1e-2
        assert out[[b for b, c in enumerate(ctxs) if c == 0]].abs().sum() == 0


@pytest.mark.parametrize("graph_meta", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mla_attention_uses_the_kernel_for_decode_rows(dtype, graph_meta):
    """A mixed step (decode rows, then a prefill chunk) through mla_attention given the
    kernel equals the PyTorch path on every row, the kernel called once for the decode rows;
    graph_meta: a decode-only step with a CUDA graph's metadata (is_decode, no decode count
    or context lengths on the host), every row through the kernel."""
    from cluster.engine import mla_attention as mla
    from cluster.engine import triton_mla
    from cluster.engine.attention import AttentionMetadata

    rank, rope, nope = SHAPES["v2-lite"]
    heads, v_dim = 16, 128
    ctxs, q_lens = [300, 1, 1000, 17, 80], [1, 1, 1, 1, 1 if graph_meta else 40]
    _, kv, bt, ctx = make(heads, rank, rope, ctxs, dtype, seed=5)
    g = torch.Generator(device=DEV).manual_seed(6)
    tokens = sum(q_lens)
    q_nope = torch.randn(tokens, heads, nope, device=DEV, generator=g).to(dtype)
    q_pe = torch.randn(tokens, heads, rope, device=DEV, generator=g).to(dtype)
    w = (torch.randn(heads * (nope + v_dim), rank, device=DEV, generator=g)
         * rank ** -0.5).to(dtype)
    cu = [0]
    for n in q_lens:
        cu.append(cu[-1] + n)

    def meta(graph: bool) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=torch.empty(0, dtype=torch.int64, device=DEV), block_tables=bt,
            context_lens=ctx, cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=DEV),
            context_lens_host=[] if graph else ctxs, cu_seqlens_q_host=[] if graph else cu,
            is_decode=graph, num_decodes=0 if graph else (5 if graph_meta else 4))

    calls = []

    class Counting:  # triton_mla, counting its decode calls
        supports = staticmethod(triton_mla.supports)

        @staticmethod
        def mla_decode(q, *args, **kw):
            calls.append(len(q))
            return triton_mla.mla_decode(q, *args, **kw)

    scale = (nope + rope) ** -0.5
    want = mla.mla_attention(q_nope, q_pe, kv, w, meta(False), scale)
    got = mla.mla_attention(q_nope, q_pe, kv, w, meta(graph_meta), scale, kernel=Counting)
    assert calls == [5 if graph_meta else 4]
    for b in range(len(ctxs)):
        rows = slice(cu[b], cu[b + 1])
        assert rel_err(got[rows], want[rows].float()) < TOL[dtype] * 2, b
