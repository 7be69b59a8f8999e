"""Per-request state inside the engine."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the frontends build SamplingParams and run without torch
    import torch


@dataclass
class SamplingParams:
    """What shapes one request's tokens; plain data (msgpack-able: lists, not dicts with int
    keys), sent as-is from the frontend to the engine core."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # drop tokens below min_p x the top token's probability
    max_tokens: int = 16
    min_tokens: int = 0  # EOS and stop_token_ids are masked until this many are out
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    presence_penalty: float = 0.0  # OpenAI's: on output tokens
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # HF's: on prompt and output tokens
    logit_bias: list[tuple[int, float]] = field(default_factory=list)  # (token id, bias)
    logprobs: int | None = None  # None: none; k: the sampled token's and the top k
    prompt_logprobs: int | None = None  # the same for every prompt token (echo)
    grammar: dict | None = None  # a structured-output constraint (cluster.structured)
    # a stream resumed on another replica: the prompt's last `resumed` tokens are output an
    # earlier replica made (penalties, min_tokens and the grammar count them as output)
    resumed: int = 0

    # cached: the engine asks per sequence per step, and requests' params never change
    # (dataclasses.replace makes a new object)
    @cached_property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @cached_property
    def plain(self) -> bool:
        """Nothing but temperature/top-k/top-p: the fast paths (steps launched ahead, the
        greedy pick inside the CUDA graph) serve it."""
        return (self.min_p == 0.0 and self.min_tokens == 0 and not self.logit_bias
                and self.presence_penalty == 0.0 and self.frequency_penalty == 0.0
                and self.repetition_penalty == 1.0 and self.logprobs is None
                and self.prompt_logprobs is None and self.grammar is None)

    @cached_property
    def graph_drawn(self) -> bool:
        """Plain and sampled with nothing but a temperature, from the shared generator: the
        decode CUDA graph's draw serves it (cuda_graphs.py)."""
        return self.plain and self.top_k <= 0 and self.top_p >= 1.0 and self.seed is None

    @property
    def penalized(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)


PENDING = -2  # a token chosen by a step still on the GPU (its place in token_ids)


class SeqStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


# eq=False: a sequence is itself only (identity). The generated __eq__ compared every
# field, token lists included, and `running.remove(seq)` ran it against each sequence ahead
# of it: ~0.3 ms a finished request at 1,000 running (9% of a served engine core's time).
@dataclass(eq=False)
class Sequence:
    request_id: str
    token_ids: list[int]
    params: SamplingParams
    num_prompt_tokens: int = 0
    status: SeqStatus = SeqStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    table_row: int = -1  # its row in the block manager's TableRows (-1: holds no block)
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
    # prompt logprobs (echo): entries made so far, one per prompt token from the first;
    # handed out with the first output token
    prompt_logprobs: list | None = None
    grammar: object | None = None  # its structured-output state (cluster.structured)
    # n > 1: a sibling choice waits for this one's prefill, then shares its prompt blocks
    held: list[Sequence] = field(default_factory=list)
    waiting_for: Sequence | None = None  # the sibling it is held for
    # penalties: output token counts and the prompt's tokens, on the device, updated as
    # tokens come (sampler._count); pen_upto: the tokens counted so far
    pen_counts: torch.Tensor | None = None
    pen_seen: torch.Tensor | None = None
    pen_upto: int = 0

    def __post_init__(self) -> None:
        self.num_prompt_tokens = self.num_prompt_tokens or len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_ids(self) -> list[int]:
        """Its output so far, with what a replica it was resumed from made."""
        return self.token_ids[self.num_prompt_tokens - self.params.resumed:]

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED
