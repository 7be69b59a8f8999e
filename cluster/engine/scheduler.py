"""Continuous batching with a per-step token budget (chunked prefill, decode first).

One loop over requests: running sequences take their next tokens first (one for a decode,
a chunk for an unfinished prefill), then waiting ones are admitted while the budget, the
sequence limit and free KV blocks allow. When KV runs out a running sequence is preempted
(its blocks freed, recomputed later from its tokens), newest first.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from cluster.engine.block_manager import BlockManager
from cluster.engine.sequence import SeqStatus, Sequence


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_new_tokens: list[int]  # tokens computed this step, per sequence

    @property
    def is_decode(self) -> bool:
        return all(n == 1 for n in self.num_new_tokens)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def live(self) -> ScheduledBatch:
        """Without the sequences that ended since it was scheduled."""
        keep = [i for i, seq in enumerate(self.seqs) if not seq.is_finished]
        return ScheduledBatch([self.seqs[i] for i in keep],
                              [self.num_new_tokens[i] for i in keep])


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        """Queues by arrival: a request moved here from another replica's queue keeps its
        place in line instead of starting over at the back."""
        i = len(self.waiting)
        while i > 0 and self.waiting[i - 1].arrival > seq.arrival \
                and self.waiting[i - 1].first_scheduled is None:
            i -= 1
        self.waiting.insert(i, seq)

    def release_waiting(self, older_than: float) -> list[Sequence]:
        """Takes out movable requests that arrived before `older_than` and have not started
        prefill (nothing computed, nothing sent): another replica can serve them whole."""
        out, stay = [], deque()
        for seq in self.waiting:
            moves = seq.movable and seq.first_scheduled is None and seq.arrival < older_than
            (out if moves else stay).append(seq)
        self.waiting = stay
        for seq in out:
            self._close(seq, "moved")
        return out

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        # one-token rows first (attention serves them with the decode kernel in a mixed
        # step), kept apart as they come: this loop runs over every running sequence each
        # step, so its common case (a decode row whose block has room) does the least
        ones: list[Sequence] = []
        seqs: list[Sequence] = []
        counts: list[int] = []
        preempted = False
        bs = self.blocks.block_size

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.closing:  # its last token is still on the GPU; it ends when read
                i += 1
                continue
            done = seq.num_computed_tokens
            n = min(len(seq.token_ids) - done, budget)
            if done + n > len(seq.block_table) * bs:  # it needs a new block
                fits, evicted = self._make_room(seq, done + n)
                preempted |= evicted
                if not fits:  # it was the one preempted
                    continue
            if n == 1:
                ones.append(seq)
            else:
                seqs.append(seq)
                counts.append(n)
            budget -= n
            i += 1

        # admitting while preempting would only thrash the cache
        while self.waiting and budget > 0 and not preempted \
                and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not seq.block_table:
                tier = self.blocks.tier
                # its blocks are on their way from the KV pool: the steps of the others go
                # on meanwhile (an idle engine has nothing else to do: it waits for them)
                if tier is not None and tier.fetch_pending(seq, self.blocks,
                                                           idle=not self.running):
                    break
                self.blocks.match_prefix(seq)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.blocks.allocate(seq, seq.num_computed_tokens + n):
                if not self.running:  # nothing will free blocks: drop the cached prefixes
                    for w in self.waiting:  # that queued requests matched and hold
                        if w.block_table:
                            self._reset(w)
                break
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            if seq.first_scheduled is None:
                seq.first_scheduled = time.monotonic()
            self.running.append(seq)
            if n == 1:
                ones.append(seq)
            else:
                seqs.append(seq)
                counts.append(n)
            budget -= n
        if self.blocks.tier is not None:  # once a step: its time, fetches, spills
            self.blocks.tier.on_schedule()
        return ScheduledBatch(ones + seqs, [1] * len(ones) + counts)

    def _make_room(self, seq: Sequence, num_tokens: int) -> tuple[bool, bool]:
        """Grows seq's blocks to hold num_tokens, preempting the newest running sequences
        until they fit: (seq got them, any sequence was preempted). seq itself may be the
        one preempted."""
        evicted = False
        while not self.blocks.allocate(seq, num_tokens):
            victim = self.running.pop()
            self._preempt(victim)
            evicted = True
            if victim is seq:
                return False, True
        return True, evicted

    def _reset(self, seq: Sequence) -> None:
        self.blocks.free(seq)
        seq.num_computed_tokens = 0
        seq.num_cached_prompt_tokens = 0

    def _preempt(self, seq: Sequence) -> None:
        self._reset(seq)
        seq.status = SeqStatus.WAITING
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Ends a sequence (finished, aborted or failed) and frees its blocks."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        self._close(seq, reason)

    def _close(self, seq: Sequence, reason: str) -> None:
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        self.blocks.free(seq)
        if self.blocks.tier is not None:  # closed before admission: its fetch goes now
            self.blocks.tier.done_matching(seq)

    @property
    def num_waiting_tokens(self) -> int:
        return sum(s.num_tokens - s.num_computed_tokens for s in self.waiting)
