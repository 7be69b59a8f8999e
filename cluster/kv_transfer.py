"""The pool's fast path for fetches: Mooncake's transfer engine (`mooncake-transfer-engine`,
its build without CUDA: the stores run on CPU nodes), over TCP.

A store keeps its blocks in slots of memory registered with its transfer engine
(`SlotArena`). A fetch asks the store where its blocks are (`locate`: a Ray call of a few
hundred bytes, which also holds the slots), reads them with the engine's own transfer engine
straight out of the store's memory, and lets the store reuse the slots (`release`). Ray
moves only the small messages; its object transfer, the default, carried 32 blocks of 2 MiB
between two nodes of one machine in 149-195 ms, this in ~40 (`python -m
cluster.bench.kv_link`).

Where the package or its system libraries (libibverbs, libnuma) are missing, `start` says
why and the pool keeps Ray's transfer. RDMA is the transfer engine's other protocol; it is
not used here: no host of ours has an RDMA NIC to test it on, and its landing buffers would
have to be registered too.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

PROTOCOL = "tcp"
POLL_S = 100e-6  # between looks at a read's transfers (a sleep: the GIL and the core go)
# what batch_transfer_async_read answers when it submitted nothing (0; -1 as unsigned: no
# connection to the peer)
FAILED_IDS = (0, -1, (1 << 64) - 1)
CHUNK_BYTES = 64 << 20  # an arena grows by chunks this size (one registration each)


class Transfer:
    """One process's transfer engine: its session name (what peers read from) and reads."""

    def __init__(self, engine, host: str):
        self.engine = engine
        self.session = f"{host}:{engine.get_rpc_port()}"

    def register(self, array: np.ndarray) -> bool:
        return self.engine.register_memory(array.ctypes.data, array.nbytes) == 0

    def read(self, session: str, dsts: list[int], srcs: list[int], lens: list[int]) -> bool:
        """Copies lens[i] bytes at srcs[i] in the peer's registered memory to dsts[i] here;
        False if any part failed (the peer gone, an address it never registered). Returns
        once no part is in flight, except one that timed out (see Landing.discard).

        One transfer per block, polled with sleeps: the engine's own batch_transfer_sync_read
        spins a core until the last byte lands (its status loop does not sleep), and on
        this 2-core host that thread, the engine's and the transfer engine's workers
        fought for the cores. Its per-transfer status reads only a batch's first part, so
        each block is a batch of one."""
        ids = [self.engine.batch_transfer_async_read(session, [d], [s], [n])
               for d, s, n in zip(dsts, srcs, lens, strict=True)]
        ok = all(i not in FAILED_IDS for i in ids)
        pending = [i for i in ids if i not in FAILED_IDS]
        while pending:
            time.sleep(POLL_S)
            left = []
            for i in pending:
                status = self.engine.transfer_check_status(i)
                if status == 0:
                    left.append(i)
                elif status != 1:  # failed (-1), timed out (-2)
                    ok = False
            pending = left
        return ok


def start(host: str) -> tuple[Transfer | None, str]:
    """This process's transfer engine, or None and why not. Peers find each other by
    session name alone (P2P handshake: no metadata server to run)."""
    # the transfer engine logs through glog: its start-up prints an error it recovers from
    # ("Local segment descriptor not found"); failures reach us as return codes
    os.environ.setdefault("MC_LOG_LEVEL", "ERROR")
    try:
        from mooncake.engine import TransferEngine
    except ImportError as err:  # the package, or libibverbs / libnuma, missing
        return None, f"mooncake-transfer-engine does not load ({err})"
    engine = TransferEngine()
    if engine.initialize(host, "P2PHANDSHAKE", PROTOCOL, "") != 0:
        return None, f"the transfer engine did not start on {host} ({PROTOCOL})"
    return Transfer(engine, host), ""


@dataclass
class SlotArena:
    """Fixed-size slots in chunks of memory allocated as needed (a store's capacity is
    virtual until blocks fill it), each chunk registered with the transfer engine if any."""

    slot_bytes: int
    max_slots: int
    transfer: Transfer | None = None
    chunks: list[np.ndarray] = field(default_factory=list)
    free: list[int] = field(default_factory=list)
    made: int = 0  # slots carved from the chunks so far

    @property
    def per_chunk(self) -> int:
        return max(1, min(self.max_slots, CHUNK_BYTES // self.slot_bytes))

    def alloc(self) -> int | None:
        if self.free:
            return self.free.pop()
        if self.made >= self.max_slots:
            return None
        if self.made == len(self.chunks) * self.per_chunk:
            chunk = np.empty(self.per_chunk * self.slot_bytes, np.uint8)
            if self.transfer is not None and not self.transfer.register(chunk):
                log.warning("KV pool: a chunk was not registered; its blocks go by Ray")
            self.chunks.append(chunk)
        self.made += 1
        return self.made - 1

    def view(self, slot: int) -> np.ndarray:
        c, i = divmod(slot, self.per_chunk)
        return self.chunks[c][i * self.slot_bytes:(i + 1) * self.slot_bytes]

    def addr(self, slot: int) -> int:
        c, i = divmod(slot, self.per_chunk)
        return self.chunks[c].ctypes.data + i * self.slot_bytes


class Landing:
    """Where reads land: buffers kept and reused once nothing points into them (a buffer
    the pool alone holds has a reference count of 2 as sys.getrefcount reads it; the
    blocks handed out are views of it, which hold it while the engine still reads them).
    Fresh memory is what made reads slow: 32 blocks of 2 MiB took 183 ms into a new array
    (the transfer engine's threads faulting its pages in), 31 ms into one written before."""

    KEEP_BYTES = 256 << 20  # buffers kept at most (beyond: a fresh array, not kept)
    MIN_BYTES = 16 << 20

    def __init__(self):
        self.buffers: list[np.ndarray] = []
        self._lock = threading.Lock()

    def take(self, n: int) -> np.ndarray:
        """A buffer of at least n bytes, its pages already mapped; the caller's reference
        marks it taken until the views it hands out are gone."""
        with self._lock:
            free = [b for b in self.buffers if len(b) >= n and sys.getrefcount(b) == 3]
            if free:  # 3: the list, the comprehension's name, getrefcount's argument
                return min(free, key=len)
            size = max(n, self.MIN_BYTES)
            keep = sum(map(len, self.buffers)) + size <= self.KEEP_BYTES
            buf = np.zeros(size, np.uint8)
            buf.fill(0)  # calloc's pages are mapped on first write: map them here
            if keep:
                self.buffers.append(buf)
            return buf
