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
from collections.abc import Callable
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

    def submit(self, session: str, dsts: list[int], srcs: list[int],
               lens: list[int]) -> tuple[list[int], bool]:
        """Starts copying lens[i] bytes at srcs[i] in the peer's registered memory to dsts[i]
        here: (the transfers in flight, whether every part was submitted). One transfer per
        block: the engine's status call for a transfer reads only its batch's first part."""
        ids = [self.engine.batch_transfer_async_read(session, [d], [s], [n])
               for d, s, n in zip(dsts, srcs, lens, strict=True)]
        return [i for i in ids if i not in FAILED_IDS], all(i not in FAILED_IDS for i in ids)

    def check(self, ids: list[int]) -> tuple[list[int], bool]:
        """(those of ids still in flight, whether none of the others failed or timed out)."""
        left, ok = [], True
        for i in ids:
            status = self.engine.transfer_check_status(i)
            if status == 0:
                left.append(i)
            elif status != 1:  # failed (-1), timed out (-2)
                ok = False
        return left, ok

    def read(self, session: str, dsts: list[int], srcs: list[int], lens: list[int]) -> bool:
        """submit, then waits until nothing is in flight; False if any part failed (the peer
        gone, an address it never registered)."""
        ids, ok = self.submit(session, dsts, srcs, lens)
        while ids:
            time.sleep(POLL_S)
            ids, ok_now = self.check(ids)
            ok = ok and ok_now
        return ok


class Poller:
    """Waits for reads in flight on one thread, with sleeps between looks, and calls each
    one's `done(ok)` when its last part landed. Not the engine's batch_transfer_sync_read:
    its status loop spins a core until the last byte lands (no sleep), and on this 2-core
    host that thread, the engine's and the transfer engine's workers fought for the cores
    (64 MiB read in 580 ms with another thread busy, 88 ms polled like this). Nor a thread
    per read: fetches would queue behind each other while the engine waits for them."""

    def __init__(self, transfer: Transfer):
        self.transfer = transfer
        self.pending: list[tuple[list[int], bool, Callable[[bool], None]]] = []
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None

    def add(self, ids: list[int], ok: bool, done: Callable[[bool], None]) -> None:
        with self._cv:
            self.pending.append((ids, ok, done))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, daemon=True,
                                                name="kv-pool-reads")
                self._thread.start()
            self._cv.notify()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self.pending:
                    self._cv.wait()
                reads, self.pending = self.pending, []
            left, finished = [], []
            for ids, ok, done in reads:
                ids, ok_now = self.transfer.check(ids)
                if ids:
                    left.append((ids, ok and ok_now, done))
                else:
                    finished.append((done, ok and ok_now))
            if left:
                with self._cv:
                    self.pending[:0] = left
            for done, ok in finished:
                try:
                    done(ok)
                except Exception:  # noqa: BLE001 - one read's bookkeeping, not the loop's
                    log.exception("KV pool: a finished read's callback failed")
            if left:
                time.sleep(POLL_S)


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

    def discard(self, buf: np.ndarray) -> None:
        """Never reuses buf (a read into it failed or timed out: a late part may still
        land there)."""
        with self._lock:
            self.buffers = [b for b in self.buffers if b is not buf]
