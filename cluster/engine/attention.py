"""Paged attention: the plain PyTorch path (CPU engine, and the reference for the GPU kernels).

KV cache layout, shared with the Triton kernels in `triton_attention.py`:
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
A token at position p of a sequence lives in slot block_table[p // block_size] * block_size
+ p % block_size. Queries of one step are flattened over sequences ([num_tokens, heads, dim]);
`cu_seqlens_q` marks where each sequence's queries start, `context_lens` is each sequence's
KV length after this step's tokens were written. Query i of a sequence with q_len queries sits
at position context_len - q_len + i and attends causally to positions <= it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32, padded with 0
    context_lens: torch.Tensor  # [num_seqs] int32
    cu_seqlens_q: torch.Tensor  # [num_seqs + 1] int32
    # host copies, so the CPU path never syncs on device tensors
    context_lens_host: list[int]
    cu_seqlens_q_host: list[int]
    max_query_len: int = 1
    max_context_len: int = 1
    is_decode: bool = False  # every sequence has exactly one query token
    # leading sequences with one query token (the scheduler puts them first)
    num_decodes: int = 0
    prefill_tiles: tuple | None = None  # built by the Triton backend at its first layer
    # a mixed-step CUDA graph's (cuda_graphs.py): the context lengths of its first `cap`
    # rows, 0 past the step's decode rows, for the decode kernel over all `cap` of them
    decode_context_lens: torch.Tensor | None = None


# query rows per program of the GPU prefill kernel (triton_attention.py); the mixed-step
# CUDA graphs size their tile grids by it (cuda_graphs.py)
PREFILL_BLOCK_M = 64


def prefill_tile_lists(cu_seqlens_q: list[int], first_seq: int = 0
                       ) -> tuple[list[int], list[int]]:
    """(sequence, first query row) of every PREFILL_BLOCK_M query tile of the sequences
    from first_seq on, as host lists."""
    seqs, starts = [], []
    for b in range(first_seq, len(cu_seqlens_q) - 1):
        for s in range(0, cu_seqlens_q[b + 1] - cu_seqlens_q[b], PREFILL_BLOCK_M):
            seqs.append(b)
            starts.append(s)
    return seqs, starts


# `engine.kv_cache_dtype: fp8`: e4m3 caches holding K and V unscaled (a scale of 1.0, as
# vLLM's default without calibrated scales), saturating at +-448; readers convert to the
# query's dtype after the gather (the Triton kernels in registers).
FP8_KV = torch.float8_e4m3fn
FP8_KV_MAX = torch.finfo(FP8_KV).max


def to_cache(x: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    if cache.dtype != FP8_KV:
        return x
    return x.clamp(-FP8_KV_MAX, FP8_KV_MAX).to(FP8_KV)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Writes this step's K/V ([num_tokens, kv_heads, dim]) into their cache slots."""
    _, _, kv_heads, dim = k_cache.shape
    k, v = to_cache(k, k_cache), to_cache(v, v_cache)
    if k_cache.dtype == FP8_KV:  # as bytes: index_copy_ has no fp8 kernel on the CPU
        k, v, k_cache, v_cache = (t.view(torch.uint8) for t in (k, v, k_cache, v_cache))
    k_cache.view(-1, kv_heads, dim).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, kv_heads, dim).index_copy_(0, slot_mapping, v)


class UncachedBackend:
    """Attention over the pass's own tokens, one causal sequence, no KV cache: for passes at
    load (kv_scales' calibration, cpu_linear's timing) before the cache exists."""

    def forward(self, q, k, v, positions, rotary, k_cache, v_cache, meta, scale: float):
        q, k = rotary(positions, q, k)
        self.seen(k, v)
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True,
            scale=scale, enable_gqa=q.shape[1] != k.shape[1])
        return o.transpose(0, 1)

    def seen(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Each layer's rotated K and V, in layer order."""


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_tables: torch.Tensor, cu_seqlens_q: list[int],
                        context_lens: list[int], scale: float) -> torch.Tensor:
    """Gathers each sequence's K/V through its block table and runs SDPA on it."""
    block_size = k_cache.shape[1]
    kv_heads, dim = k_cache.shape[2], k_cache.shape[3]
    out = torch.empty_like(q)
    for b, ctx in enumerate(context_lens):
        qs, qe = cu_seqlens_q[b], cu_seqlens_q[b + 1]
        q_len = qe - qs
        blocks = block_tables[b, : (ctx + block_size - 1) // block_size]
        k = k_cache[blocks].reshape(-1, kv_heads, dim)[:ctx].to(q.dtype)
        v = v_cache[blocks].reshape(-1, kv_heads, dim)[:ctx].to(q.dtype)
        qb = q[qs:qe].transpose(0, 1)  # [heads, q_len, dim]
        if q_len == 1:
            mask = None
        else:
            q_pos = torch.arange(ctx - q_len, ctx, device=q.device)
            mask = torch.arange(ctx, device=q.device)[None, :] <= q_pos[:, None]
        o = F.scaled_dot_product_attention(
            qb, k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale,
            enable_gqa=q.shape[1] != kv_heads)
        out[qs:qe] = o.transpose(0, 1)
    return out


def paged_attention_cpu(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_tables: torch.Tensor, meta: AttentionMetadata,
                        scale: float, kernel=None) -> torch.Tensor:
    """The CPU path: the step's decode rows (first, one query each) in one batched
    attention over their gathered blocks, up to the longest context only; prefill chunks
    one SDPA each. A per-sequence loop over decode rows costs a gather and an SDPA call per
    sequence per layer, which at batch 64 was 70% of a step."""
    nd = meta.num_decodes
    if nd < 2 and (kernel is None or not nd):
        return paged_attention_ref(q, k_cache, v_cache, block_tables, meta.cu_seqlens_q_host,
                                   meta.context_lens_host, scale)
    out = torch.empty_like(q)
    if kernel is not None:  # cpu_kernels.paged_decode: K/V read in place
        out[:nd] = kernel(q[:nd], k_cache, v_cache, block_tables[:nd],
                          meta.context_lens[:nd], scale)
    else:
        _batched_decode(q[:nd], k_cache, v_cache, block_tables[:nd],
                        meta.context_lens_host[:nd], scale, out[:nd])
    if nd < len(meta.context_lens_host):  # the prefill chunks after the decode rows
        cu = meta.cu_seqlens_q_host
        out[nd:] = paged_attention_ref(q[nd:], k_cache, v_cache, block_tables[nd:],
                                       [c - cu[nd] for c in cu[nd:]],
                                       meta.context_lens_host[nd:], scale)
    return out


def _batched_decode(q, k_cache, v_cache, block_tables, ctx: list[int], scale: float, out):
    batch, heads, dim = q.shape
    num_blocks, block_size, kv_heads, _ = k_cache.shape
    blocks = block_tables[:, : -(-max(ctx) // block_size)].flatten()
    keys = blocks.numel() // batch * block_size
    # whole blocks as rows of a 2-D view: index_select copies each block in one piece
    # (advanced indexing on the 4-D cache was 3x slower)
    k = k_cache.view(num_blocks, -1).index_select(0, blocks).view(batch, keys, kv_heads,
                                                                   dim).to(q.dtype)
    v = v_cache.view(num_blocks, -1).index_select(0, blocks).view(batch, keys, kv_heads,
                                                                   dim).to(q.dtype)
    live = torch.arange(keys)[None, :] < torch.tensor(ctx)[:, None]
    o = F.scaled_dot_product_attention(q[:, :, None, :], k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=live[:, None, None, :], scale=scale,
                                       enable_gqa=heads != kv_heads)
    out.copy_(o.view(batch, heads, dim))


def paged_decode_gather(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_tables: torch.Tensor, context_lens: torch.Tensor,
                        scale: float) -> torch.Tensor:
    """Decode attention without host syncs (CUDA-graph safe) in plain PyTorch: gathers every
    block of the padded block table and masks past each context length. The fallback where
    the Triton kernels are unavailable; it reads the whole padded table, so it is slower."""
    batch, heads, dim = q.shape
    kv_heads = k_cache.shape[2]
    k = k_cache[block_tables].flatten(1, 2)  # [batch, blocks * block_size, kv_heads, dim]
    v = v_cache[block_tables].flatten(1, 2)
    group = heads // kv_heads
    qg = q.view(batch, kv_heads, group, dim).float()
    scores = torch.einsum("bhgd,blhd->bhgl", qg, k.float()) * scale
    pos = torch.arange(k.shape[1], device=q.device)
    scores.masked_fill_((pos[None, :] >= context_lens[:, None])[:, None, None, :], float("-inf"))
    probs = scores.softmax(-1).nan_to_num_(0.0)  # padding rows have no keys at all
    out = torch.einsum("bhgl,blhd->bhgd", probs, v.float())
    return out.reshape(batch, heads, dim).to(q.dtype)
