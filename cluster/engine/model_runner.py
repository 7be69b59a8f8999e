"""Turns a scheduled batch into tensors, runs the model and samples the next tokens."""

from __future__ import annotations

import logging

import torch

from cluster.engine.attention import AttentionMetadata
from cluster.engine.loader import load_weights
from cluster.engine.model import CausalLM, ModelArch
from cluster.engine.sampler import sample
from cluster.engine.scheduler import ScheduledBatch

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelRunner:
    def __init__(self, model_dir: str, arch: ModelArch, device: torch.device, dtype: torch.dtype,
                 max_model_len: int, block_size: int, random_weights: bool = False):
        self.arch, self.device, self.dtype = arch, device, dtype
        self.block_size = block_size
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                self.model = CausalLM(arch, max_model_len)
        finally:
            torch.set_default_dtype(torch.float32)
        if random_weights:  # benchmarks of a model shape need no checkpoint
            for p in self.model.parameters():
                torch.nn.init.normal_(p, std=0.02)
        else:
            load_weights(self.model, model_dir)
        self.model.eval()
        self.k_caches: list[torch.Tensor] = []
        self.v_caches: list[torch.Tensor] = []

    def kv_bytes_per_block(self) -> int:
        a = self.arch
        return 2 * a.num_layers * self.block_size * a.num_kv_heads * a.head_dim * \
            torch.tensor([], dtype=self.dtype).element_size()

    def allocate_kv_cache(self, num_blocks: int) -> None:
        a = self.arch
        shape = (a.num_layers, num_blocks, self.block_size, a.num_kv_heads, a.head_dim)
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
        input_ids, positions, meta = self.prepare(batch)
        hidden = self.model(input_ids, positions, meta)
        last = torch.tensor(meta.cu_seqlens_q_host[1:], device=self.device) - 1
        emits = [s.num_computed_tokens + n == s.num_tokens
                 for s, n in zip(batch.seqs, batch.num_new_tokens, strict=True)]
        rows = [i for i, e in enumerate(emits) if e]
        out: list[int | None] = [None] * len(batch.seqs)
        if rows:
            logits = self.model.compute_logits(hidden[last[rows]])
            tokens = sample(logits, [batch.seqs[i] for i in rows])
            for i, tok in zip(rows, tokens, strict=True):
                out[i] = tok
        return out
