"""Multi-head latent attention (DeepSeek MLA) over a compressed paged cache, in plain PyTorch
(the CPU engine, and the reference); on the GPU, given the kernel (triton_mla.py, chosen per
model by the model runner), the decode rows go to it instead.

Cache layout, one tensor per layer:
    kv_cache: [num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]
A token's entry is its latent c (kv_a_layernorm'd, kv_lora_rank values) followed by its
rotated key part k_pe, once for all heads; slots, block tables and AttentionMetadata are those
of the dense cache (attention.py), so paging, prefix caching, chunked prefill and preemption
are unchanged.

Per head h, keys and values are linear in the latent:
    k_h = [W_UK[h] c, k_pe],  v_h = W_UV[h] c   (W_UK, W_UV: the rows of kv_b_proj)
Decode uses the absorbed form: q_h . k_h = (W_UK[h]^T q_nope_h) . c + q_pe_h . k_pe, so the
query is folded into latent space once and every head attends over the cached entries as
they are (one "KV head" of kv_lora_rank + rope dims); W_UV is applied to the attended latent
afterwards. Reading the cache costs cache_dim values per token instead of per-head K and V.
Prefill chunks expand K/V from the latents instead: with many queries, one kv_b_proj matmul
over the context is cheaper than attending in latent space (the per-token work there is
kv_lora_rank + rope wide per head, against nope + rope).
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F

from cluster.engine.attention import AttentionMetadata


def store_latents(entries: torch.Tensor, kv_cache: torch.Tensor,
                  slot_mapping: torch.Tensor) -> None:
    """Writes this step's [num_tokens, cache_dim] entries into their cache slots."""
    kv_cache.view(-1, kv_cache.shape[-1]).index_copy_(0, slot_mapping, entries)


def mla_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor,
                  kv_b_weight: torch.Tensor, meta: AttentionMetadata, scale: float,
                  kernel: ModuleType | None = None) -> torch.Tensor:
    """q_nope [T, heads, nope], q_pe [T, heads, rope] (rotated); kv_b_weight
    [heads * (nope + v), kv_lora_rank]. Returns [T, heads, v]. The step's decode rows (first,
    one query each) attend in latent space together; prefill chunks one expanded SDPA each."""
    tokens, heads, nope = q_nope.shape
    rank = kv_cache.shape[-1] - q_pe.shape[-1]
    w = kv_b_weight.view(heads, -1, rank)
    w_uk, w_uv = w[:, :nope], w[:, nope:]  # [heads, nope, rank], [heads, v, rank]
    out = q_nope.new_empty(tokens, heads, w_uv.shape[1])
    # a decode CUDA graph's metadata counts no decodes on the host: every row is one
    nd = tokens if meta.is_decode else meta.num_decodes
    if nd:
        q_latent = torch.einsum("thn,hnr->thr", q_nope[:nd], w_uk)
        q_cat = torch.cat([q_latent, q_pe[:nd]], dim=-1)
        if kernel is not None and kv_cache.is_cuda and kernel.supports(rank, q_pe.shape[-1]):
            # reads the paged cache in place and no context length from the host
            o_latent = kernel.mla_decode(q_cat, kv_cache, meta.block_tables[:nd],
                                         meta.context_lens[:nd], scale, rank)
        else:
            o_latent = latent_decode(q_cat, kv_cache, meta.block_tables[:nd],
                                     meta.context_lens[:nd], meta.context_lens_host[:nd],
                                     scale, rank)
        out[:nd] = torch.einsum("thr,hvr->thv", o_latent, w_uv)
    cu = meta.cu_seqlens_q_host
    for b in range(nd, len(meta.context_lens_host)):
        out[cu[b] : cu[b + 1]] = expanded_prefill(
            q_nope[cu[b] : cu[b + 1]], q_pe[cu[b] : cu[b + 1]], kv_cache, meta.block_tables[b],
            meta.context_lens_host[b], kv_b_weight, scale)
    return out


def latent_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                  context_lens: torch.Tensor, ctx: list[int], scale: float, rank: int
                  ) -> torch.Tensor:
    """q [batch, heads, cache_dim] (latent query + q_pe) against each row's cached entries, up
    to the longest context; returns the attended latents [batch, heads, rank]."""
    batch = q.shape[0]
    num_blocks, block_size, dim = kv_cache.shape
    blocks = block_tables[:, : -(-max(ctx) // block_size)].flatten()
    keys = blocks.numel() // batch * block_size
    # whole blocks as rows of a 2-D view: index_select copies each block in one piece
    kv = kv_cache.view(num_blocks, -1).index_select(0, blocks).view(batch, keys, dim)
    scores = torch.bmm(q, kv.transpose(1, 2)).float() * scale  # [batch, heads, keys]
    dead = torch.arange(keys, device=q.device)[None, :] >= context_lens[:, None]
    probs = scores.masked_fill_(dead[:, None, :], float("-inf")).softmax(-1)
    return torch.bmm(probs.to(kv.dtype), kv[..., :rank])


def expanded_prefill(q_nope: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor,
                     block_table: torch.Tensor, ctx: int, kv_b_weight: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """One sequence's chunk of q_len queries (the last q_len of its ctx positions), causal,
    with per-head K/V made from its cached latents."""
    q_len, heads, nope = q_nope.shape
    rope = q_pe.shape[-1]
    block_size, dim = kv_cache.shape[1], kv_cache.shape[2]
    entries = kv_cache[block_table[: -(-ctx // block_size)]].reshape(-1, dim)[:ctx]
    kv = F.linear(entries[:, : dim - rope], kv_b_weight).view(ctx, heads, -1)
    k_nope, v = kv[..., :nope], kv[..., nope:]
    k = torch.cat([k_nope, entries[:, None, dim - rope :].expand(ctx, heads, rope)], dim=-1)
    q = torch.cat([q_nope, q_pe], dim=-1)
    mask = None
    if q_len > 1:
        q_pos = torch.arange(ctx - q_len, ctx, device=q.device)
        mask = torch.arange(ctx, device=q.device)[None, :] <= q_pos[:, None]
    o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                       attn_mask=mask, scale=scale)
    return o.transpose(0, 1)
