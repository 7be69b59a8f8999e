"""Per-request state inside the engine."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the frontends build SamplingParams and run without torch
    import torch


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    max_tokens: int = 16
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


PENDING = -2  # a token chosen by a step still on the GPU (its place in token_ids)


class SeqStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


@dataclass
class Sequence:
    request_id: str
    token_ids: list[int]
    params: SamplingParams
    num_prompt_tokens: int = 0
    status: SeqStatus = SeqStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V is already in the cache
    num_cached_prompt_tokens: int = 0  # prompt tokens served by the prefix cache
    num_hashed_blocks: int = 0  # leading blocks of block_table registered in the prefix cache
    prefix_hash: bytes = b""  # chained digest of those blocks (cluster.prefix_hash)
    cache_salt: str = ""  # tenants with different salts never share cached KV
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    arrival: float = field(default_factory=time.monotonic)
    first_scheduled: float | None = None  # start of its prefill: the end of its queue time
    movable: bool = False  # may leave this replica's queue for another before its prefill
    closing: bool = False  # the token being computed ends it (by length)

    def __post_init__(self) -> None:
        self.num_prompt_tokens = self.num_prompt_tokens or len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED
