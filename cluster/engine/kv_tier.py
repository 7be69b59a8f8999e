"""Tiers of KV cache below the engine's device cache: host memory (tier 1) and the cluster
pool on the CPU nodes (tier 2, cluster/kv_pool.py).

Tier 1 is written back on eviction (SGLang HiCache's `write_back`, vLLM's offloading
connector's LRU CPU store): when the prefix cache hands out a cached-but-free block for new
KV, that block's contents, all layers' K and V, are first copied into one contiguous buffer
of a host slab (HiCache's "page first" layout: one transfer per block, not one per layer),
keyed by the block's chained hash. The slab is sized by `engine.kv_host_tier_bytes` and
recycled least recently used first, so it never holds more. On a GPU the copy runs on a side
stream into pinned memory; the side stream waits for the work already queued (the step that
wrote the block) and the compute stream waits for the copy before anything after it (the
next step, which may overwrite the block), so no step waits on the host. On the CPU the
"device" cache is itself host memory and the copy is a plain one; the tier is still its own
bounded store.

A prefix-cache miss on a block whose hash a tier holds takes a fresh device block and copies
the contents back instead of computing them. Every block put in tier 1 is also spilled to
the pool (batched once a step, never waited for); a request whose prompt continues past what
this engine holds asks the pool for the rest when it arrives, so the transfer overlaps its
time in the queue. When it could be admitted and its blocks are still on their way, it is
admitted now and waited for if the fetch rule expects them within a step of now (the
others' step would cost it more than the wait costs them); otherwise a step later, the
others' steps going on meanwhile. An idle engine, with nothing else to run, waits for them.

Write-through (`kv_pool.write_through_hits`; SGLang HiCache's `write_through_selective`):
a block the device cache still holds is also copied down as above once N later prompts
reused it (0: as soon as it is full), so that a hot prefix sits in the pool while its
holder caches it and a less loaded replica can fetch it instead of the holder taking
every request for it; its eviction later sends it no second time. Default: write-back only
(every block over the network at prefill speed is more than a 25 Gbps link carries).

Fetch or recompute (per request, at arrival): fetch the n missing blocks iff the predicted
fetch time, latency + n x block bytes / bandwidth (fitted over recent fetches, end to end),
is below the time this engine would take to compute them, n x block tokens / its prefill
speed (tokens per second of its last SPEED_STEPS prefill steps, each timed by the engine);
it fetches at least every PROBE_EVERY_S all the same, to keep measuring the link. From
the moment it could be admitted it waits for the fetch at most that recompute time (and
`kv_pool.max_fetch_wait_s`); what has not arrived by then, a block that is torn (wrong size,
or not the key asked for) and everything after it in the chain are computed. Until both
speeds are measured it fetches.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
import warnings
from collections import OrderedDict, deque
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from cluster.engine import kv_scales
from cluster.prefix_hash import block_hash, salt_digest, short_digest

if TYPE_CHECKING:
    from cluster.engine.block_manager import BlockManager
    from cluster.engine.sequence import Sequence
    from cluster.kv_pool import Fetch, PoolClient

log = logging.getLogger(__name__)

KEY_BYTES = 48  # a pool key: the model's (16 bytes) + the block's chained digest (32)
FETCH_TTL_S = 60.0  # a fetch whose request never got admitted (aborted) is dropped then
THROUGH_KEEP = 1 << 16  # write-through bookkeeping: reuse counts and blocks sent, newest
SPEED_STEPS = 16  # the prefill speed is measured over this many recent steps
PROBE_EVERY_S = 2.0  # the longest the fetch rule goes without a fetch (measuring the link)
Blob = np.ndarray | bytes  # a block from the pool: key + bytes (arrays; older stores bytes)


def model_key(model_dir: str, weights, dtype: torch.dtype, block_size: int,
              scales: bytes = b"") -> bytes:
    """What makes two engines' blocks interchangeable in the shared pool: the checkpoint (its
    folder name, config.json and weight file sizes; or the synthetic weights' name), the
    cache's dtype, block size and an fp8 cache's scales (kv_scales.digest). Engines of
    different models never read each other's blocks."""
    d = Path(model_dir)
    named = weights if isinstance(weights, str) else ""
    h = hashlib.sha256(f"{d.name}|{dtype}|{block_size}|{named}".encode())
    h.update(scales)
    cfg = d / "config.json"
    if cfg.exists():
        h.update(cfg.read_bytes())
    for f in sorted(d.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.digest()[:16]


def _line(samples: list[tuple[int, float]]) -> tuple[float, float] | None:
    """Least squares of time on bytes: (intercept s, slope s/B); None where it has none."""
    n = len(samples)
    mb = sum(b for b, _ in samples) / n
    mt = sum(t for _, t in samples) / n
    var = sum((b - mb) ** 2 for b, _ in samples)
    if var <= 0:
        return None
    slope = sum((b - mb) * (t - mt) for b, t in samples) / var
    return (mt - slope * mb, slope) if slope > 0 else None


def fit_link(samples: list[tuple[int, float]]) -> tuple[float, float | None]:
    """(latency s, bandwidth B/s) of fetches given as (bytes, seconds); bandwidth None:
    not measured (every fetch then costs the latency). A line through all of them, then
    again without those more than 3 median deviations above it: a fetch answered behind a
    burst of puts at a busy store took 50x the others, and a line through it said
    recompute for every request after it. Without a line (one size seen, or no rise with
    size), answers of no bytes (every block missed) are latency, and the rest is bandwidth
    after it: taking the whole time as bandwidth made a latency-only sample a link of a
    few MB/s."""
    if not samples:
        return 0.0, None
    line = _line(samples)
    if line is not None:
        a, k = line
        dev = sorted(abs(t - a - k * b) for b, t in samples)[len(samples) // 2]
        kept = [(b, t) for b, t in samples if t - a - k * b <= 3 * dev + 1e-4]
        line = _line(kept) or line
        return max(0.0, line[0]), 1.0 / line[1]
    empty = [t for b, t in samples if b == 0]
    lat = sum(empty) / len(empty) if empty else 0.0
    sent = [(b, t) for b, t in samples if b > 0]
    if not sent:
        return lat, None
    return lat, sum(b for b, _ in sent) / sum(max(1e-6, t - lat) for _, t in sent)


class HostPool:
    """Tier 1's store: `capacity` block buffers in one slab, by chained hash, LRU."""

    def __init__(self, capacity: int, shape: tuple[int, ...], dtype: torch.dtype, pin: bool):
        self.capacity = capacity
        self.slab = torch.empty((capacity, *shape), dtype=dtype, pin_memory=pin) \
            if capacity else None
        self.slots: OrderedDict[bytes, int] = OrderedDict()
        self.free = list(range(capacity - 1, -1, -1))
        self.evicted = 0
        # the entry a restore is about to read: the block taken for it may push one out
        self.protected: bytes | None = None
        # slots the pool's sender thread is reading (their spill not yet copied by Ray):
        # not reused until it releases them (set operations are atomic under the GIL)
        self.sending: set[int] = set()

    def __contains__(self, h: bytes) -> bool:
        return h in self.slots

    def get(self, h: bytes) -> int | None:
        slot = self.slots.get(h)
        if slot is not None:
            self.slots.move_to_end(h)
        return slot

    def take(self, h: bytes) -> int | None:
        """A slot for a new entry h, the least recently used one when full; None: no slab."""
        if not self.capacity:
            return None
        if self.free:
            slot = self.free.pop()
        else:  # the least recently used entry that no one reads now
            victim = next((k for k, s in self.slots.items()
                           if k != self.protected and s not in self.sending), None)
            if victim is None:
                return None
            slot = self.slots.pop(victim)
            self.evicted += 1
        self.slots[h] = slot
        return slot


@dataclass
class SeqFetch:
    """A request's fetches from the pool: the chain of blocks it asked for, in order (one
    part at its arrival, maybe one more for blocks that left this engine while it queued)."""

    hashes: list[bytes]
    parts: list[tuple[list[bytes], Fetch]]
    wait_s: float  # from admission on, wait at most this (what computing them would take)
    expected_at: float  # when the fetch rule expects the last part to have arrived
    # once collected: the unbroken prefix that came (key + bytes, uint8 arrays or bytes)
    blobs: dict[bytes, Blob] | None = None
    deadline: float | None = None  # set when the request could first have been admitted


class KVTier:
    def __init__(self, runner, host_bytes: int, pool: PoolClient | None = None,
                 key: bytes = b"\0" * 16, max_fetch_wait_s: float = 1.0):
        self.tensors: list[torch.Tensor] = runner.kv_tensors  # each [layer, block, ...]
        self.block_size = runner.block_size
        self.device = runner.device
        self.cuda = self.device.type == "cuda"
        t0 = self.tensors[0]
        self.dtype = t0.dtype
        self.shape = (len(self.tensors), t0.shape[0], *t0.shape[2:])
        self.block_bytes = math.prod(self.shape) * t0.element_size()
        capacity = host_bytes // self.block_bytes
        if self.cuda and pool is not None and not capacity:
            raise ValueError("the KV pool needs engine.kv_host_tier_bytes of at least one "
                             "block on a GPU engine: its blocks move through pinned host "
                             "memory")
        self.host = HostPool(capacity, self.shape, self.dtype, pin=self.cuda)
        # the slab's slots as flat byte arrays: what a spill hands the pool's sender
        self._slab_bytes = (self.host.slab.view(torch.uint8).reshape(capacity, -1).numpy()
                            if capacity else None)
        self.pool, self.key, self.max_fetch_wait_s = pool, key, max_fetch_wait_s
        # write-through (kv_pool.write_through_hits): None is write-back only
        self.through_after = pool.write_through_hits if pool is not None else None
        self.reuses: OrderedDict[bytes, int] = OrderedDict()  # hash -> device-cache reuses
        self.through: OrderedDict[bytes, None] = OrderedDict()  # written through, newest last
        self.written_through = 0
        self.side = torch.cuda.Stream(self.device) if self.cuda else None
        self.events: dict[int, torch.cuda.Event] = {}  # host slot -> its last device copy
        self.spills: list[tuple[bytes, int]] = []  # (hash, host slot) not sent yet
        self.direct: list[tuple[bytes, bytes]] = []  # pool-only (CPU): blocks to send
        self.fetches: dict[str, SeqFetch] = {}
        self.recomputed: dict[str, int] = {}  # requests not fetched at arrival: how many
        self.hits = {"host": 0, "pool": 0}
        self.decisions = {"fetch": 0, "recompute": 0}
        self.saved = self.torn = self.fetched_bytes = 0
        self.prefill_tok_s: float | None = None
        self.step_s: float | None = None  # the engine's recent step time (a moving mean)
        self.last_fetch_at = -math.inf
        self._last_at: float | None = None
        # (tokens, seconds) of recent steps that computed prefill: prefill_tok_s is their
        # tokens over their time (one slow step moves it little, and nothing locks it in)
        self.spans: deque[tuple[int, float]] = deque(maxlen=SPEED_STEPS)

    # ---- tier 1: out of the device cache and back

    def save(self, block: int, h: bytes) -> bool:
        """Keeps the contents of a cached block the device cache is about to reuse; whether
        it was copied now."""
        if self.host.get(h) is not None:
            return False  # still held from before (it was restored from here)
        if not self.host.capacity and h in self.through:
            return False  # no slab, and the pool has it: written through while it was cached
        slot = self.host.take(h)
        if slot is None and self.host.capacity:
            return False  # every slot is being restored from or sent: this one is not kept
        self.saved += 1
        if slot is None:  # no host slab (a CPU engine with the pool only): straight out
            if self.pool is not None:
                blob = torch.stack([t[:, block] for t in self.tensors])
                self.direct.append((self.key + h, self._blob(self.key + h, blob)))
            return True
        dst = self.host.slab[slot]
        if self.cuda:
            main = torch.cuda.current_stream(self.device)
            self.side.wait_stream(main)  # after the step that wrote the block
            with torch.cuda.stream(self.side):
                for j, t in enumerate(self.tensors):
                    dst[j].copy_(t[:, block], non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(self.side)
            main.wait_stream(self.side)  # before anything that overwrites it
            self.events[slot] = ev
        else:
            for j, t in enumerate(self.tensors):
                dst[j].copy_(t[:, block])
        if self.pool is not None:
            self.spills.append((h, slot))
        return True

    # ---- write-through: hot blocks into the pool while the device cache still holds them

    def published(self, block: int, h: bytes) -> None:
        """A block became full and findable in the device cache."""
        if self.through_after == 0:
            self._write_through(block, h)

    def reused(self, block: int, h: bytes) -> None:
        """A prompt found h's block in the device cache."""
        if not self.through_after or h in self.through:
            return  # write-back only, written when published, or written already
        n = self.reuses.pop(h, 0) + 1
        if n >= self.through_after:
            self._write_through(block, h)
            return
        self.reuses[h] = n
        if len(self.reuses) > THROUGH_KEEP:
            self.reuses.popitem(last=False)

    def _write_through(self, block: int, h: bytes) -> None:
        """Copies the block as an eviction would (into tier 1, then the pool once a step);
        the device cache keeps it. Its eviction later sends nothing again."""
        if h in self.host:
            return  # tier 1 holds it: it reached the pool when it was put there
        if not self.save(block, h):
            return  # not copied (no slot free of readers): later reuses may try again
        self.written_through += 1
        self.through[h] = None
        if len(self.through) > THROUGH_KEEP:
            self.through.popitem(last=False)

    def find(self, seq: Sequence, h: bytes) -> tuple[int | None, Blob | None] | None:
        """Where a tier holds h's block: (host slot, None) or (None, pool blob); None: no."""
        slot = self.host.get(h)
        if slot is not None:
            self.host.protected = h
            return slot, None
        f = self.fetches.get(seq.request_id)
        if f is None:
            return None
        if f.blobs is None:
            self._collect(f)
        blob = f.blobs.get(h)
        return None if blob is None else (None, blob)

    def load(self, block: int, h: bytes, src: tuple[int | None, Blob | None]) -> None:
        """Copies a tier's block into device block `block`."""
        slot, blob = src
        self.host.protected = None
        if blob is not None:
            self.hits["pool"] += 1
            with warnings.catch_warnings():  # read only: torch warns of the bytes' immutability
                warnings.simplefilter("ignore", UserWarning)
                raw = torch.frombuffer(blob, dtype=torch.uint8, offset=KEY_BYTES)
            slot = self.host.take(h)  # kept here too: the next miss is a host hit
            if slot is None:
                for j, t in enumerate(self.tensors):
                    t[:, block].copy_(raw.view(self.dtype).view(self.shape)[j])
                return
            self._host_ready(slot)
            self.host.slab[slot].view(torch.uint8).view(-1).copy_(raw)
        else:
            self.hits["host"] += 1
        src_t = self.host.slab[slot]
        for j, t in enumerate(self.tensors):
            t[:, block].copy_(src_t[j], non_blocking=self.cuda)
        if self.cuda:  # the slot may be rewritten on the host only after this copy
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
            self.events[slot] = ev

    def _host_ready(self, slot: int) -> None:
        ev = self.events.pop(slot, None)
        if ev is not None:
            ev.synchronize()

    def host_digests(self, n: int) -> list[int]:
        """Short digests of the n blocks tier 1 holds that were used most recently (for the
        routers' prefix summary; call on the engine's thread)."""
        return [short_digest(h) for h in islice(reversed(self.host.slots), n)]

    # ---- tier 2: spill, prefetch, collect

    def _missing(self, seq: Sequence, blocks: BlockManager) -> list[bytes]:
        """The chain of seq's prompt blocks after the longest prefix this engine holds (in
        its cache or its host tier), as match_prefix walks it (one token left to compute)."""
        bs, h, missing = self.block_size, salt_digest(seq.cache_salt), []
        for i in range((seq.num_tokens - 1) // bs):
            h = block_hash(h, seq.token_ids[i * bs : (i + 1) * bs])
            if missing or (h not in blocks.hash_to_block and h not in self.host):
                missing.append(h)
        return missing

    def prefetch(self, seq: Sequence, blocks: BlockManager) -> None:
        """At arrival: asks the pool for the blocks of seq's prompt that follow what this
        engine holds, if fetching them beats computing them."""
        if self.pool is not None and seq.prompt_logprobs is None:
            self._ask(seq, self._missing(seq, blocks))

    def _ask(self, seq: Sequence, hashes: list[bytes]) -> None:
        """Fetches these blocks (which come before any asked for already) if that is faster
        than computing them."""
        if not hashes:
            return
        fetch_s, compute_s = self.predict(len(hashes))
        now = time.monotonic()
        # a rule that only recomputes would never see the link get better: a fetch at least
        # every PROBE_EVERY_S keeps its measurements current (it waits no longer than
        # computing would take, so a slow link costs that request little)
        if fetch_s >= compute_s and now - self.last_fetch_at < PROBE_EVERY_S:
            self.decisions["recompute"] += 1
            # the first look at admission asks only about blocks that left meanwhile
            self.recomputed[seq.request_id] = \
                self.recomputed.get(seq.request_id, 0) + len(hashes)
            return
        fetch = self.pool.get([self.key + x for x in hashes])
        if fetch is None:  # no store up
            return
        self.last_fetch_at = now
        self.decisions["fetch"] += 1
        wait = min(compute_s, self.max_fetch_wait_s)
        expected = fetch.issued + fetch_s
        f = self.fetches.get(seq.request_id)
        if f is None:
            self.fetches[seq.request_id] = SeqFetch(list(hashes), [(hashes, fetch)], wait,
                                                    expected)
        else:
            f.hashes[:0] = hashes
            f.parts.append((hashes, fetch))
            f.wait_s = max(f.wait_s, wait)
            f.expected_at = max(f.expected_at, expected)

    def fetch_pending(self, seq: Sequence, blocks: BlockManager, idle: bool) -> bool:
        """True while seq's fetch is in flight and within its wait: the scheduler admits it
        later rather than block the engine's loop on it (an idle engine blocks instead).
        First called when seq could be admitted: blocks this engine held at its arrival
        may have left meanwhile (other requests ran while it queued): those are asked too."""
        if self.pool is None or seq.prompt_logprobs is not None:
            return False
        f = self.fetches.get(seq.request_id)
        if f is None or f.deadline is None:  # the first look at it since it arrived
            missing = self._missing(seq, blocks)
            known = len(f.hashes) if f else self.recomputed.get(seq.request_id, 0)
            self._ask(seq, missing[: max(0, len(missing) - known)])
            f = self.fetches.get(seq.request_id)
            if f is None:
                return False
            f.deadline = time.monotonic() + f.wait_s
        if f.blobs is not None or idle or all(self.pool.poll(p) for _, p in f.parts):
            return False
        now = time.monotonic()
        if now >= f.deadline:
            return False
        # due within a step of now (before the others' next step would end, or late by
        # less than one): waiting for it here costs them less than that step costs this
        # request (on a 2-core host a decode step is ~4.5 ms and a fetch of ten blocks
        # answers in ~3.5: skipping a step put ~8 ms on its first token). One late by more
        # than a step is not expected soon: the others step meanwhile
        if self.step_s is not None and abs(f.expected_at - now) < self.step_s:
            f.deadline = min(f.deadline, max(now, f.expected_at) + self.step_s / 2)
            return False
        return True

    def predict(self, n_blocks: int) -> tuple[float, float]:
        """(fetch seconds, compute seconds) of n blocks; 0 and inf while unmeasured."""
        compute = (n_blocks * self.block_size / self.prefill_tok_s if self.prefill_tok_s
                   else math.inf)
        lat, bw = self.fetch_model()
        fetch = lat + (n_blocks * self.block_bytes / bw if bw else 0.0)
        return fetch, compute

    def fetch_model(self) -> tuple[float, float | None]:
        """(latency s, bandwidth B/s) of the link to the pool, from the recent fetches."""
        return fit_link(list(self.pool.samples) if self.pool is not None else [])

    def _collect(self, f: SeqFetch) -> None:
        end = time.monotonic() + f.wait_s if f.deadline is None else f.deadline
        got: dict[bytes, bytes | None] = {}
        for hashes, fetch in f.parts:  # all parts within the one wait
            got.update(zip(hashes, self.pool.collect(fetch, end - time.monotonic()),
                           strict=True))
        f.blobs = {}
        for h in f.hashes:  # in chain order
            blob = got.get(h)
            if blob is None:
                break  # the chain ends here: the rest is computed
            if len(blob) != KEY_BYTES + self.block_bytes or \
                    bytes(blob[:KEY_BYTES]) != self.key + h:
                self.torn += 1  # a torn or foreign answer is a miss, as is all after it
                break
            f.blobs[h] = blob
            self.fetched_bytes += len(blob)

    def done_matching(self, seq: Sequence) -> None:
        """seq was admitted, or closed before it was (aborted, moved): its fetch and its
        blocks (views of a landing buffer, which they keep taken) go."""
        self.fetches.pop(seq.request_id, None)
        self.recomputed.pop(seq.request_id, None)

    def on_schedule(self) -> None:
        """Once a step (from the scheduler): the step time, stale fetches, the spills."""
        now = time.perf_counter()
        if self._last_at is not None and now - self._last_at < 1.0:  # not an idle gap
            dt = now - self._last_at
            self.step_s = dt if self.step_s is None else 0.8 * self.step_s + 0.2 * dt
        self._last_at = now
        if self.pool is None:
            return
        stale = time.monotonic() - FETCH_TTL_S
        for rid, f in list(self.fetches.items()):
            if f.parts[0][1].issued < stale:
                del self.fetches[rid]
        self.flush()

    def observe_step(self, num_tokens: int, seconds: float) -> None:
        """A step that computed prefill: its tokens and its time in the engine's loop,
        from the engine once they are read (a step launched ahead is timed from where the
        one before it ended: the interval between two schedule calls there is the previous
        step's, and credited to this one's tokens it read a decode step's 10 ms as 2,048
        prompt tokens': 800 k tokens/s on an H100 at the 8B shape, which then only ever
        recomputed). Host stalls inside the step (a fetch waited for, say) count:
        they are the engine's speed as it runs."""
        if num_tokens >= 2 * self.block_size and seconds > 0:
            self.spans.append((num_tokens, seconds))
            self.prefill_tok_s = sum(n for n, _ in self.spans) / \
                sum(t for _, t in self.spans)

    def flush(self) -> None:
        """Sends the blocks put in tier 1 since the last call to the pool (not waited for):
        views of their slots in the slab go to the pool's sender thread, whose Ray call
        copies them into the object store (no copy on the engine's thread, which held
        it 0.34 ms per 2 MiB block); their slots are not reused until then."""
        if self.direct:  # pool-only CPU engine: its blocks, already bytes
            self.pool.put(self.direct)
            self.direct = []
        ready, keep = [], []
        for h, slot in self.spills:
            if self.host.slots.get(h) != slot:
                continue  # left tier 1 before it was sent: it is gone
            ev = self.events.get(slot)
            if ev is not None and not ev.query():
                keep.append((h, slot))  # its copy out of the device is still running
                continue
            ready.append((h, slot))
        self.spills = keep
        if not ready:
            return
        if not self.pool.accepting():  # the link is behind: no copy for a batch it drops
            self.pool.drop(len(ready))
            for h, _ in ready:  # a block written through and dropped may be sent again
                self.through.pop(h, None)
            return
        from cluster.kv_pool import Blocks  # here: the engine imports Ray only for a pool

        slots = [slot for _, slot in ready]
        self.host.sending.update(slots)
        self.pool.put(Blocks([self.key + h for h, _ in ready],
                             [self._slab_bytes[slot] for slot in slots],
                             lambda: self.host.sending.difference_update(slots)))

    def _blob(self, key: bytes, t: torch.Tensor) -> bytes:
        """key + the block's bytes: the key lets a fetch tell its block from another."""
        return b"".join((key, memoryview(t.contiguous().view(torch.uint8).reshape(-1)
                                         .numpy())))

    def stats(self) -> dict:
        lat, bw = self.fetch_model()
        return {"host_blocks": len(self.host.slots),
                "host_bytes": len(self.host.slots) * self.block_bytes,
                "host_capacity_bytes": self.host.capacity * self.block_bytes,
                "host_hits": self.hits["host"], "pool_hits": self.hits["pool"],
                "saved": self.saved, "written_through": self.written_through,
                "torn": self.torn, "fetched_bytes": self.fetched_bytes,
                "fetch_decisions": self.decisions["fetch"],
                "recompute_decisions": self.decisions["recompute"],
                "fetch_bw_bytes_s": bw or 0.0, "fetch_latency_s": lat,
                "prefill_tok_s": self.prefill_tok_s or 0.0,
                "pool_errors": self.pool.errors if self.pool else 0,
                "spills_dropped": self.pool.dropped if self.pool else 0,
                "resends_skipped": self.pool.resends_skipped if self.pool else 0,
                "transfer_blocks": self.pool.transfer_blocks if self.pool else 0,
                "unsealed": self.pool.unsealed if self.pool else 0}


def build(runner, cfg, model_dir: str, weights=None, pool: PoolClient | None = None,
          max_fetch_wait_s: float = 1.0) -> KVTier | None:
    """The engine's tiers from its config (None: off)."""
    if not cfg.kv_host_tier_bytes and pool is None:
        return None
    if not cfg.enable_prefix_caching:
        raise ValueError("KV tiers need engine.enable_prefix_caching (blocks are found by "
                         "their prefix hash)")
    if cfg.tensor_parallel_size > 1:
        raise ValueError("KV tiers do not support tensor_parallel_size > 1 yet (each rank "
                         "holds a shard of every block)")
    # the cache's own element type (an fp8 KV cache's blocks are not a bf16 one's)
    key = model_key(model_dir, weights, runner.kv_tensors[0].dtype, runner.block_size,
                    kv_scales.digest(runner.kv_scales))
    tier = KVTier(runner, cfg.kv_host_tier_bytes, pool, key, max_fetch_wait_s)
    log.info("KV tiers: host %d blocks (%.1f MiB)%s", tier.host.capacity,
             tier.host.capacity * tier.block_bytes / 2**20,
             f", pool of {len(pool.actors)} stores" if pool else "")
    return tier
