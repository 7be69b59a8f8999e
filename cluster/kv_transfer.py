"""The pool's fast path for fetches: Mooncake's transfer engine (`mooncake-transfer-engine`,
its build without CUDA: the stores run on CPU nodes), over RDMA or TCP.

A store keeps its blocks in slots of memory registered with its transfer engine
(`SlotArena`); an engine fetching blocks hands the store the addresses of a buffer of its
own, registered with its transfer engine (`Landing`), in a Ray call (`push`), and the store
writes the blocks there, each followed by the push's seal (`SEAL_BYTES`), before it
answers; the engine reads a block once its seal is there. Ray carries only the call and its
answer, and the engine waits on one Ray answer as for Ray's own transfer: no thread of the engine's
process polls the transfer (under a busy engine every look needed the GIL, and a pull
design, the engine reading the store's memory, measured half Ray's bandwidth inside the
engine). `python -m cluster.bench.kv_link`: 32 blocks of 2 MiB between two nodes of one
machine 74-88 ms by Ray, 35 ms this way (2 cores; an H100 host: 34-36 and 24).

Where the package or its system libraries (libibverbs, libnuma) are missing, `start` says
why and the pool keeps Ray's transfer.

RDMA or TCP: the transfer engine decides, not the protocol its Python API is given (that
picks only its buffer allocator): it looks for RDMA devices at start and installs its RDMA
transport where it finds one, TCP where it finds none. `kv_pool.transport: tcp` sets its
MC_FORCE_TCP, TCP even on hosts with RDMA NICs. What each end runs is read from the same
device list (`protocol`). A pair that does not agree should fail its first write, and a
failed write leaves fetches from that store to Ray. Measured over TCP only: no host of ours
has an RDMA NIC.
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

RDMA_DEVICES = "/sys/class/infiniband"  # where the transfer engine's discovery looks (ibverbs)
POLL_S = 100e-6  # between looks at a write's transfers (a sleep: the GIL and the core go)
# what batch_transfer_async_write answers when it submitted nothing (0; -1 as unsigned: no
# connection to the peer)
FAILED_IDS = (0, -1, (1 << 64) - 1)
CHUNK_BYTES = 64 << 20  # an arena grows by chunks this size (one registration each)
# a push's seal, written after each block in the same transfer. Over TCP the transfer
# engine counts a write done once its last byte is in the sender's socket buffer; the
# receiving engine copies it into memory later, on its own thread, and acknowledges
# nothing, so a store's answer (by Ray, another connection) can come first. A transfer's
# bytes are copied in order: a block whose seal is there has landed before it.
SEAL_BYTES = 8
SEAL_WAIT_S = 0.05  # how long a push's answer waits for its seals (then: misses)


class Transfer:
    """One process's transfer engine: its session name (what peers write to) and writes."""

    def __init__(self, engine, host: str, protocol: str):
        self.engine = engine
        self.session = f"{host}:{engine.get_rpc_port()}"
        self.protocol = protocol  # "rdma" or "tcp": what the engine installed, by `protocol`

    def register(self, array: np.ndarray) -> bool:
        return self.engine.register_memory(array.ctypes.data, array.nbytes) == 0

    def unregister(self, array: np.ndarray) -> None:
        self.engine.unregister_memory(array.ctypes.data)

    def write(self, session: str, dsts: list[int], srcs: list[int], lens: list[int]) -> bool:
        """Copies lens[i] bytes at srcs[i] here to dsts[i] in the peer's registered memory;
        False if any part failed (the peer gone, an address it never registered). Returns
        when nothing is in flight (a part that timed out aside).

        One transfer per block, polled with sleeps: the transfer engine's own
        batch_transfer_sync_write spins a core until the last byte lands (its status loop
        does not sleep); a read of 64 MiB took 580 ms that way with another thread of the
        process busy, 88 ms polled like this (on 2 cores). Its status call for a transfer
        reads only the first part of a batch, so each block is a batch of one."""
        ids = [self.engine.batch_transfer_async_write(session, [s], [d], [n])
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


def protocol(force_tcp: bool, devices: str = RDMA_DEVICES) -> str:
    """What the transfer engine installs on this host: RDMA where it finds an RDMA device,
    TCP otherwise or when forced."""
    if force_tcp or "MC_FORCE_TCP" in os.environ:  # set at all: the engine's own test
        return "tcp"
    try:
        return "rdma" if os.listdir(devices) else "tcp"
    except OSError:
        return "tcp"


def start(host: str, force_tcp: bool = False) -> tuple[Transfer | None, str]:
    """This process's transfer engine, or None and why not. Peers find each other by
    session name alone (P2P handshake: no metadata server to run). force_tcp: TCP even
    where RDMA devices are (for this whole process: one transfer engine each)."""
    # the transfer engine logs through glog: its start-up prints an error it recovers from
    # ("Local segment descriptor not found"); failures reach us as return codes
    os.environ.setdefault("MC_LOG_LEVEL", "ERROR")
    if force_tcp:
        os.environ["MC_FORCE_TCP"] = "1"
    proto = protocol(force_tcp)
    try:
        from mooncake.engine import TransferEngine
    except ImportError as err:  # the package, or libibverbs / libnuma, missing
        return None, f"mooncake-transfer-engine does not load ({err})"
    engine = TransferEngine()
    # the protocol argument picks only the engine's allocator for its own buffers (unused)
    if engine.initialize(host, "P2PHANDSHAKE", proto, "") != 0:
        return None, f"the transfer engine did not start on {host} ({proto})"
    return Transfer(engine, host, proto), ""


@dataclass
class SlotArena:
    """Fixed-size slots in chunks of memory allocated as needed (a store's capacity is
    virtual until blocks fill it), each chunk registered with the transfer engine if any.
    Each slot is followed by `tail` bytes of its own (where a push's seal goes)."""

    slot_bytes: int
    max_slots: int
    transfer: Transfer | None = None
    tail: int = 0
    chunks: list[np.ndarray] = field(default_factory=list)
    free: list[int] = field(default_factory=list)
    made: int = 0  # slots carved from the chunks so far

    @property
    def stride(self) -> int:
        return self.slot_bytes + self.tail

    @property
    def per_chunk(self) -> int:
        return max(1, min(self.max_slots, CHUNK_BYTES // self.stride))

    def alloc(self) -> int | None:
        if self.free:
            return self.free.pop()
        if self.made >= self.max_slots:
            return None
        if self.made == len(self.chunks) * self.per_chunk:  # the last chunk: what is left
            n = min(self.per_chunk, self.max_slots - self.made)
            chunk = np.empty(n * self.stride, np.uint8)
            if self.transfer is not None and not self.transfer.register(chunk):
                log.warning("KV pool: a chunk of the arena was not registered")
            self.chunks.append(chunk)
        self.made += 1
        return self.made - 1

    def view(self, slot: int) -> np.ndarray:
        c, i = divmod(slot, self.per_chunk)
        return self.chunks[c][i * self.stride:i * self.stride + self.slot_bytes]

    def addr(self, slot: int) -> int:
        c, i = divmod(slot, self.per_chunk)
        return self.chunks[c].ctypes.data + i * self.stride

    def seal(self, slot: int, seal: int) -> None:
        """Writes the seal into the slot's tail (sent with the slot, after its bytes)."""
        c, i = divmod(slot, self.per_chunk)
        at = i * self.stride + self.slot_bytes
        self.chunks[c][at:at + SEAL_BYTES] = np.frombuffer(
            seal.to_bytes(SEAL_BYTES, "little"), np.uint8)


def sealed(buf: np.ndarray, at: int, seal: int) -> bool:
    return bytes(buf[at:at + SEAL_BYTES]) == seal.to_bytes(SEAL_BYTES, "little")


def wait_sealed(buf: np.ndarray, ats: list[int], seal: int,
                wait_s: float = SEAL_WAIT_S) -> list[bool]:
    """Whether each block's seal (at ats) landed in buf, waiting up to wait_s for the
    last ones (they follow the store's answer by microseconds, as a rule)."""
    deadline = time.monotonic() + wait_s
    while True:
        ok = [sealed(buf, at, seal) for at in ats]
        if all(ok) or time.monotonic() >= deadline:
            return ok
        time.sleep(POLL_S)


class Landing:
    """Where an engine's fetches land: buffers registered with its transfer engine (stores
    write into them), kept and reused once nothing points into them (a buffer the pool
    alone holds has a reference count of 3 as the loop below reads it; the blocks handed
    out are views of it, which hold it while the engine reads them, and a write under way
    holds it until the store answered). Reused, not fresh: 32 blocks of 2 MiB took 183 ms
    to land in a new array (its pages faulted in as they landed), 31 ms in one written
    before."""

    KEEP_BYTES = 512 << 20  # at most this many bytes of buffers (then: fetch by Ray)
    MIN_BYTES = 16 << 20
    # a buffer a write may still land in is kept this long, never reused, before it is
    # freed (the transfer engine's own timeout is 30 s; its TCP receiver writes wherever a
    # transfer says, registered or not)
    QUARANTINE_S = 120.0

    def __init__(self, transfer: Transfer):
        self.transfer = transfer
        self.buffers: list[np.ndarray] = []
        self.quarantined: list[tuple[float, np.ndarray]] = []
        self._lock = threading.Lock()

    def take(self, n: int) -> np.ndarray | None:
        """A free buffer of at least n bytes, its pages mapped and registered, or None
        (all KEEP_BYTES taken); the caller's reference marks it taken."""
        with self._lock:
            free = [b for b in self.buffers if len(b) >= n and sys.getrefcount(b) == 3]
            if free:  # 3: the list, the comprehension's name, getrefcount's argument
                return min(free, key=len)
            now = time.monotonic()
            for _, buf in (q for q in self.quarantined if q[0] <= now):
                self.transfer.unregister(buf)
            self.quarantined = [q for q in self.quarantined if q[0] > now]
            size = max(n, self.MIN_BYTES)
            held = sum(map(len, self.buffers)) + sum(len(b) for _, b in self.quarantined)
            # free buffers too small for this fetch go first (smallest first), so that
            # small ones kept from earlier fetches never shut a larger one out for good
            idle = [b for b in self.buffers if sys.getrefcount(b) == 3]  # as above
            for small in sorted(idle, key=len):
                if held + size <= self.KEEP_BYTES:
                    break
                self.buffers = [b for b in self.buffers if b is not small]
                self.transfer.unregister(small)
                held -= len(small)
            if held + size > self.KEEP_BYTES:
                return None
            buf = np.zeros(size, np.uint8)
            buf.fill(0)  # calloc's pages are mapped on first write: map them here
            if not self.transfer.register(buf):
                return None
            self.buffers.append(buf)
            return buf

    def discard(self, buf: np.ndarray) -> None:
        """Never reuses buf (a write into it failed or is not known to have ended: a late
        part may still land there); kept for QUARANTINE_S, then freed."""
        with self._lock:
            if any(b is buf for b in self.buffers):
                self.buffers = [b for b in self.buffers if b is not buf]
                self.quarantined.append((time.monotonic() + self.QUARANTINE_S, buf))
