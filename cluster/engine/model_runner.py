"""Turns a scheduled batch into tensors, runs the model and samples the next tokens."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from cluster.engine.attention import (
    AttentionMetadata,
    paged_attention_ref,
    paged_decode_gather,
    store_kv,
)
from cluster.engine.loader import iter_checkpoint, load_weights
from cluster.engine.model import CausalLM, ModelArch, Ops
from cluster.engine.sampler import sample
from cluster.engine.scheduler import ScheduledBatch

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class GatherBackend:
    """GPU attention without Triton: PyTorch gather for decode, per-sequence SDPA otherwise."""

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float):
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

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float):
        self.ops.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.is_decode:
            return self.ops.paged_decode_attention(q, k_cache, v_cache, meta.block_tables,
                                                   meta.context_lens, scale)
        return self.ops.paged_prefill_attention(q, k_cache, v_cache, meta.block_tables,
                                                meta.cu_seqlens_q, meta.context_lens, scale,
                                                meta.max_query_len)


@dataclass
class DecodeGraph:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor


class ModelRunner:
    def __init__(self, model_dir: str, arch: ModelArch, device: torch.device, dtype: torch.dtype,
                 max_model_len: int, block_size: int, weights=None):
        self.arch, self.device, self.dtype = arch, device, dtype
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.graphs: dict[int, DecodeGraph] = {}
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                self.model = CausalLM(arch, max_model_len)
        finally:
            torch.set_default_dtype(torch.float32)
        if weights == "random":  # benchmarks of a model shape need no checkpoint
            for p in self.model.parameters():
                torch.nn.init.normal_(p, std=0.02)
        else:
            load_weights(self.model, weights or iter_checkpoint(model_dir), model_dir)
        self.model.eval()
        if device.type == "cuda":
            Ops.compile()
            try:
                self.model.backend = TritonBackend()
            except ImportError as err:
                log.warning("Triton attention unavailable (%s): using the gather fallback", err)
                self.model.backend = GatherBackend()
        self.k_caches: list[torch.Tensor] = []
        self.v_caches: list[torch.Tensor] = []

    def kv_bytes_per_block(self) -> int:
        a = self.arch
        return 2 * a.num_layers * self.block_size * a.num_kv_heads * a.head_dim * \
            torch.tensor([], dtype=self.dtype).element_size()

    def allocate_kv_cache(self, num_blocks: int) -> None:
        a = self.arch
        # one extra block that no sequence owns: padded rows of a CUDA graph write there
        self.pad_slot = num_blocks * self.block_size
        shape = (a.num_layers, num_blocks + 1, self.block_size, a.num_kv_heads, a.head_dim)
        k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        for i, layer in enumerate(self.model.layers):
            layer.self_attn.k_cache, layer.self_attn.v_cache = k[i], v[i]
        self.k_caches, self.v_caches = list(k), list(v)

    def prepare(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor,
                                                        AttentionMetadata]:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        cu_q = [0]
        ctx_lens: list[int] = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            start = seq.num_computed_tokens
            input_ids.extend(seq.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            cu_q.append(cu_q[-1] + n)
            ctx_lens.append(start + n)
        max_blocks = max(len(s.block_table) for s in batch.seqs)
        tables = [s.block_table + [0] * (max_blocks - len(s.block_table)) for s in batch.seqs]

        def t(x, dtype):
            return torch.tensor(x, dtype=dtype, device=self.device)

        meta = AttentionMetadata(
            slot_mapping=t(slots, torch.int64), block_tables=t(tables, torch.int32),
            context_lens=t(ctx_lens, torch.int32), cu_seqlens_q=t(cu_q, torch.int32),
            context_lens_host=ctx_lens, cu_seqlens_q_host=cu_q,
            max_query_len=max(batch.num_new_tokens), max_context_len=max(ctx_lens),
            is_decode=batch.is_decode)
        return t(input_ids, torch.int64), t(positions, torch.int64), meta

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> list[int | None]:
        """Returns the sampled token per sequence, None where a prefill chunk is unfinished."""
        n = len(batch.seqs)
        if batch.is_decode and self.graphs and n <= max(self.graphs):
            logits = self._replay(batch)
            return list(sample(logits, batch.seqs))
        input_ids, positions, meta = self.prepare(batch)
        hidden = self.model(input_ids, positions, meta)
        emits = [s.num_computed_tokens + k == s.num_tokens
                 for s, k in zip(batch.seqs, batch.num_new_tokens, strict=True)]
        rows = [i for i, e in enumerate(emits) if e]
        out: list[int | None] = [None] * n
        if rows:
            last = [meta.cu_seqlens_q_host[i + 1] - 1 for i in rows]
            logits = self.model.compute_logits(hidden[last])
            tokens = sample(logits, [batch.seqs[i] for i in rows])
            for i, tok in zip(rows, tokens, strict=True):
                out[i] = tok
        return out

    # CUDA graphs for decode: a small model's eager decode step is bound by kernel launches
    # (~10 us each, hundreds per step), so each batch size bucket is captured once at start
    # and replayed with its inputs copied into static buffers.

    def graph_sizes(self, max_num_seqs: int) -> list[int]:
        sizes = [1, 2, 4, 8] + list(range(16, 513, 16))
        return [b for b in sizes if b < max_num_seqs] + [min(max_num_seqs, 512)]

    @torch.inference_mode()
    def capture_decode_graphs(self, max_num_seqs: int) -> None:
        sizes = sorted(set(self.graph_sizes(max_num_seqs)))
        max_bs = sizes[-1]
        max_blocks = -(-self.max_model_len // self.block_size)
        dev = self.device
        self.g_ids = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.g_pos = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.g_slots = torch.full((max_bs,), self.pad_slot, dtype=torch.int64, device=dev)
        self.g_tables = torch.zeros(max_bs, max_blocks, dtype=torch.int32, device=dev)
        self.g_ctx = torch.zeros(max_bs, dtype=torch.int32, device=dev)
        self.g_cu = torch.arange(max_bs + 1, dtype=torch.int32, device=dev)
        # host staging buffers: pinned, so the copies to the GPU are asynchronous
        self.h_ids = torch.zeros(max_bs, dtype=torch.int64, pin_memory=True)
        self.h_pos = torch.zeros(max_bs, dtype=torch.int64, pin_memory=True)
        self.h_slots = torch.full((max_bs,), self.pad_slot, dtype=torch.int64, pin_memory=True)
        self.h_tables = torch.zeros(max_bs, max_blocks, dtype=torch.int32, pin_memory=True)
        self.h_ctx = torch.zeros(max_bs, dtype=torch.int32, pin_memory=True)
        pool = None
        for bs in reversed(sizes):
            meta = AttentionMetadata(
                slot_mapping=self.g_slots[:bs], block_tables=self.g_tables[:bs],
                context_lens=self.g_ctx[:bs], cu_seqlens_q=self.g_cu[: bs + 1],
                context_lens_host=[], cu_seqlens_q_host=[], is_decode=True)

            def step(bs=bs, meta=meta):
                hidden = self.model(self.g_ids[:bs], self.g_pos[:bs], meta)
                return self.model.compute_logits(hidden)

            step()  # warm up (Triton autotuning, allocator) outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = step()
            pool = graph.pool() if pool is None else pool
            self.graphs[bs] = DecodeGraph(graph, logits)
        torch.cuda.synchronize()
        log.info("captured decode CUDA graphs for batch sizes %s", sizes)

    def _replay(self, batch: ScheduledBatch) -> torch.Tensor:
        n = len(batch.seqs)
        bs = min(b for b in self.graphs if b >= n)
        block = self.block_size
        ids, pos, slots, ctx, tables = [], [], [], [], []
        for seq in batch.seqs:
            p = seq.num_computed_tokens
            ids.append(seq.token_ids[p])
            pos.append(p)
            slots.append(seq.block_table[p // block] * block + p % block)
            ctx.append(p + 1)
            tables.append(seq.block_table)
        width = max(map(len, tables))
        # one tensor per field, not one write per element: this runs every decode step
        self.h_ids[:n] = torch.tensor(ids)
        self.h_pos[:n] = torch.tensor(pos)
        self.h_slots[:n] = torch.tensor(slots)
        self.h_slots[n:bs].fill_(self.pad_slot)
        self.h_ctx[:n] = torch.tensor(ctx, dtype=torch.int32)
        self.h_ctx[n:bs].zero_()
        self.h_tables[:n, :width] = torch.tensor([t + [0] * (width - len(t)) for t in tables],
                                                 dtype=torch.int32)
        for dst, src in ((self.g_ids, self.h_ids), (self.g_pos, self.h_pos),
                         (self.g_slots, self.h_slots), (self.g_ctx, self.h_ctx),
                         (self.g_tables, self.h_tables)):
            dst[:bs].copy_(src[:bs], non_blocking=True)
        g = self.graphs[bs]
        g.graph.replay()
        return g.logits[:n]
