"""Paged KV cache bookkeeping: fixed-size blocks, reference counts and a prefix cache.

A full block is identified by a digest chained with its predecessor's (cluster.prefix_hash:
SHA-256 over token ids, salted per tenant), so equal digests mean equal token prefixes.
Blocks whose reference count drops to zero keep their contents and stay findable until they
are reused (least recently freed first). With KV tiers (cluster/engine/kv_tier.py) a reused
block's contents go down a tier first, and a miss on a block a tier holds is copied back.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from itertools import islice

from cluster.engine.block_tables import TableRows
from cluster.engine.sequence import Sequence
from cluster.prefix_hash import block_hash, salt_digest, short_digest


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.block_to_hash: dict[int, bytes] = {}
        self.hash_to_block: dict[bytes, int] = {}
        self.free_blocks: deque[int] = deque(range(num_blocks))  # never held a cached prefix
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; LRU first
        self.prefix_queries = 0  # prompt blocks looked up
        self.prefix_hits = 0  # found in this cache (the tiers count their own)
        self.tier = None  # the KV tiers below this cache (kv_tier.KVTier), set by the engine
        self.rows = TableRows()  # the live tables again, as rows of one array (block_tables.py)

    @property
    def num_free(self) -> int:
        return len(self.free_blocks) + len(self.evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def match_prefix(self, seq: Sequence) -> None:
        """Takes the cached blocks of the longest cached prefix of a new sequence's prompt."""
        assert not seq.block_table
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        h = seq.prefix_hash = salt_digest(seq.cache_salt)
        if seq.prompt_logprobs is not None:
            return  # prompt scoring needs every prompt position's logits: computes them all
        # leave at least one prompt token to compute: its logits give the first output token
        for i in range((seq.num_tokens - 1) // bs):
            nh = block_hash(h, seq.token_ids[i * bs : (i + 1) * bs])
            self.prefix_queries += 1
            block = self.hash_to_block.get(nh)
            if block is not None:
                self.prefix_hits += 1
                if self.ref_count[block] == 0:
                    del self.evictable[block]
                self.ref_count[block] += 1
                if self.tier is not None:
                    self.tier.reused(block, nh)
            else:
                block = self._restore(seq, nh)
                if block is None:
                    break
            h = nh
            self._append(seq, block)
        if self.tier is not None:
            self.tier.done_matching(seq)
        seq.num_hashed_blocks = len(seq.block_table)
        seq.prefix_hash = h
        seq.num_computed_tokens = len(seq.block_table) * bs
        seq.num_cached_prompt_tokens = seq.num_computed_tokens

    def _restore(self, seq: Sequence, h: bytes) -> int | None:
        """A fresh block holding h's contents copied back from a tier (referenced once and
        published, as if computed here); None where no tier holds it or no block is free."""
        if self.tier is None or not self.num_free:
            return None
        src = self.tier.find(seq, h)
        if src is None:
            return None
        block = self._take_block()
        self.tier.load(block, h, src)
        self.hash_to_block[h] = block
        self.block_to_hash[block] = h
        return block

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Grows seq's block table to hold num_tokens; False (and no change) if out of blocks."""
        need = self.blocks_needed(seq, num_tokens)
        if need > self.num_free:
            return False
        for _ in range(need):
            self._append(seq, self._take_block())
        return True

    def _append(self, seq: Sequence, block: int) -> None:
        if seq.table_row < 0:
            seq.table_row = self.rows.take()
        self.rows.put(seq.table_row, len(seq.block_table), block)
        seq.block_table.append(block)

    def _take_block(self) -> int:
        if self.free_blocks:
            block = self.free_blocks.popleft()
        else:
            block, _ = self.evictable.popitem(last=False)
            h = self.block_to_hash.pop(block)
            if self.tier is not None:  # its contents go down a tier before they are reused
                self.tier.save(block, h)
            del self.hash_to_block[h]
        self.ref_count[block] = 1
        return block

    def register_full_blocks(self, seq: Sequence, num_written: int) -> None:
        """Publishes the blocks whose KV is written, so later prompts can share them.
        num_written: the tokens whose KV the steps completed so far hold; with steps launched
        ahead it trails num_computed_tokens (a block whose last slot a step still on the
        device writes must not be found: if that step fails, its KV never exists)."""
        bs = self.block_size
        full = num_written // bs
        if full <= seq.num_hashed_blocks or not self.enable_prefix_caching:
            return  # no block completed since the last call (most decode steps)
        full = min(full, len(seq.block_table))
        h = seq.prefix_hash
        for i in range(seq.num_hashed_blocks, full):
            h = block_hash(h, seq.token_ids[i * bs : (i + 1) * bs])
            block = seq.block_table[i]
            if h not in self.hash_to_block:
                self.hash_to_block[h] = block
                self.block_to_hash[block] = h
                if self.tier is not None:
                    self.tier.published(block, h)
            seq.prefix_hash = h
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, full)

    def free(self, seq: Sequence) -> None:
        # reversed: a sequence's tail blocks are the least likely to be shared, so evict first
        for block in reversed(seq.block_table):
            self.ref_count[block] -= 1
            if self.ref_count[block] == 0:
                if block in self.block_to_hash:
                    self.evictable[block] = None
                else:
                    self.free_blocks.append(block)
        if seq.table_row >= 0:
            self.rows.release(seq.table_row, len(seq.block_table))
            seq.table_row = -1
        seq.block_table = []
        seq.num_hashed_blocks = 0
        seq.prefix_hash = b""

    def cached_digests(self, n: int) -> list[int]:
        """Short digests of the n most recently published blocks (call on the engine's own
        thread: the dict changes with every step)."""
        # from the newest end: listing every key first cost ~30 ms per call with a full cache
        newest = list(islice(reversed(self.hash_to_block), n))
        return [short_digest(h) for h in reversed(newest)]
