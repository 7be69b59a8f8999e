"""GPU attention backends: our Triton kernels, or PyTorch gathers where Triton is missing."""

from __future__ import annotations

import torch

from cluster.engine.attention import (
    AttentionMetadata,
    paged_attention_ref,
    paged_decode_gather,
    store_kv,
)


class GatherBackend:
    """GPU attention without Triton: PyTorch gather for decode, per-sequence SDPA otherwise."""

    def forward(self, q, k, v, positions, rotary, k_cache, v_cache, meta: AttentionMetadata,
                scale: float):
        q, k = rotary(positions, q, k)
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.is_decode:
            return paged_decode_gather(q, k_cache, v_cache, meta.block_tables,
                                       meta.context_lens, scale)
        return paged_attention_ref(q, k_cache, v_cache, meta.block_tables,
                                   meta.cu_seqlens_q_host, meta.context_lens_host, scale)


class TritonBackend:
    """GPU attention: our Triton kernels (the decode kernel is CUDA-graph safe)."""

    def __init__(self):
        from cluster.engine import triton_attention

        self.ops = triton_attention

    def forward(self, q, k, v, positions, rotary, k_cache, v_cache, meta: AttentionMetadata,
                scale: float):
        # one kernel rotates q in place and writes rotated k and v to their cache slots:
        # three kernels fewer per layer, which counts in a small model's decode step
        q = self.ops.rope_store_kv(q, k, v, positions, rotary.cos, rotary.sin, k_cache, v_cache,
                                   meta.slot_mapping)
        return self.attend(q, k_cache, v_cache, meta, scale)

    def attend(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float):
        if meta.is_decode:
            return self.ops.paged_decode_attention(q, k_cache, v_cache, meta.block_tables,
                                                   meta.context_lens, scale)
        # a mixed step: its decode rows (first) go to the decode kernel, which reads each
        # KV head once for all the query heads sharing it; the prefill kernel reads it once
        # per query head, 4-7x the traffic for a one-row query
        out = torch.empty_like(q)
        if meta.decode_context_lens is not None:  # a mixed graph: shapes fixed, counts not
            cap = meta.decode_context_lens.shape[0]
            self.ops.paged_decode_attention(q[:cap], k_cache, v_cache, meta.block_tables[:cap],
                                            meta.decode_context_lens, scale, out=out[:cap])
            # rows past the decode rows got zeros there; the prefill kernel writes them
            return self.ops.paged_prefill_attention(q, k_cache, v_cache, meta.block_tables,
                                                    meta.cu_seqlens_q, meta.context_lens,
                                                    scale, out=out, tiles=meta.prefill_tiles)
        nd = meta.num_decodes
        if nd:
            self.ops.paged_decode_attention(q[:nd], k_cache, v_cache, meta.block_tables[:nd],
                                            meta.context_lens[:nd], scale, out=out[:nd])
        if meta.prefill_tiles is None:  # the same for every layer of the step
            meta.prefill_tiles = self.ops.prefill_tiles(meta.cu_seqlens_q_host, q.device, nd)
        return self.ops.paged_prefill_attention(q, k_cache, v_cache, meta.block_tables,
                                                meta.cu_seqlens_q, meta.context_lens, scale,
                                                out=out, tiles=meta.prefill_tiles)
