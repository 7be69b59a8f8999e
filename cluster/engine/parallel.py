"""Tensor parallelism (Megatron style): which slice of each weight a rank holds, and the two
collectives the model needs. Ranks form a torch.distributed group (NCCL on GPUs, gloo on CPUs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class TP:
    rank: int = 0
    size: int = 1
    group: Any = None  # the tensors' group: NCCL on GPUs, gloo on CPUs
    control: Any = None  # a gloo group for step inputs from rank 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def split(self, n: int, what: str) -> int:
        if n % self.size:
            raise ValueError(f"{what}={n} is not divisible by tensor_parallel_size={self.size}")
        return n // self.size


@dataclass(frozen=True)
class Layout:
    """Per-rank sizes of a model under TP: heads, KV heads, MLP width, vocab rows."""

    heads: int
    kv_heads: int
    kv_head_start: int
    intermediate: int
    vocab: int

    @classmethod
    def of(cls, arch, tp: TP) -> Layout:
        heads = tp.split(arch.num_heads, "num_attention_heads")
        if arch.num_kv_heads >= tp.size:
            kv = tp.split(arch.num_kv_heads, "num_key_value_heads")
            kv_start = tp.rank * kv
        else:  # fewer KV heads than ranks: each rank keeps a copy of the one its heads use
            kv, kv_start = 1, tp.rank * arch.num_kv_heads // tp.size
        return cls(heads, kv, kv_start, tp.split(arch.intermediate_size, "intermediate_size"),
                   -(-arch.vocab_size // tp.size))

    def shard(self, target: str, part: int | None, arch, tp: TP) -> tuple[int, int, int] | None:
        """(dim, start, length) of this rank's slice of a checkpoint tensor; None: whole."""
        d, r = arch.head_dim, tp.rank
        if tp.size == 1:
            return None
        if ".qkv_proj." in target:
            if part == 0:
                return 0, r * self.heads * d, self.heads * d
            return 0, self.kv_head_start * d, self.kv_heads * d
        if ".gate_up_proj." in target:
            return 0, r * self.intermediate, self.intermediate
        if target.endswith("o_proj.weight"):
            return 1, r * self.heads * d, self.heads * d
        if target.endswith("down_proj.weight"):
            return 1, r * self.intermediate, self.intermediate
        if target in ("embed_tokens.weight", "lm_head.weight"):
            return 0, r * self.vocab, self.vocab
        return None
