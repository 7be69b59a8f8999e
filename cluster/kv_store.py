"""The cluster KV pool's stores: one actor per CPU node (label `cpu-arch: kunpeng` by
default) holding KV blocks in a bounded LRU, keyed by the model's key + the block's chained
SHA-256 (cluster/prefix_hash.py: the tenant's salt is the chain's start, so tenants never
share a key). Engines reach them through cluster/kv_pool.py. No torch here: the stores run
on CPU nodes.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from itertools import islice

import numpy as np
import ray

from cluster import kv_transfer
from cluster.kv_transfer import SEAL_BYTES, SlotArena, Transfer

log = logging.getLogger(__name__)

POOL_NAMESPACE = "tandem"
NAME_PREFIX = "tandem-kv-pool-"
KEY_BYTES = 48  # model key (16) + block digest (32)

# Ray returns an object of up to 100 KiB inside the call's reply, and puts a larger one in
# the object store, from which the caller's node pulls it. For a fetch that second path is
# the slow one: 16 blocks (1.5 MB) from a store on another node of this machine took 8.4 ms
# and 11 ms of CPU over all processes, inline 3.6 ms and 4.5 ms. So the store actors answer
# inline up to this size (one gRPC reply; larger answers still go through the object store).
# Puts stay as they are: sent inline, their bytes went through the engine core's own
# process, and on the served path (2 cores) that cost the engine's step more than it saved
# (bench.kv_tier --served: output 227 -> 166 tok/s). Up to 4 MiB: above it the object
# stores win again (8 blocks of 2 MiB, the 8B shape's: 34 ms through them, 35-61 inline,
# `python -m cluster.bench.kv_link --blocks 8 32 --block-bytes 2097152`).
INLINE_ENV = {"RAY_max_direct_call_object_size": str(4 << 20)}


def block_items(keys: list[bytes], views: list) -> list[tuple[bytes, bytes]]:
    """(key, key + bytes) per block given as its key and a buffer of its bytes."""
    return [(k, b"".join((k, memoryview(v)))) for k, v in zip(keys, views, strict=True)]



class KVPoolStore:
    """One node's share of the pool (a Ray actor): blocks by key, least recently used out
    first, never more than `capacity_bytes` of block payload.

    Blocks live in slots of one arena (cluster/kv_transfer.py), sized by the first block
    put (every block of a model has one size; one of another size is kept on its own).
    With the transfer engine (`transport="auto"` where it loads) the arena is registered
    with it, and `push` writes blocks straight into an engine's memory.
    """

    def __init__(self, capacity_bytes: int, name: str = "", transport: str = "ray"):
        self.capacity = capacity_bytes
        # each block: its slot in the arena, or its own array (a size the arena is not for)
        self.blocks: OrderedDict[bytes, int | np.ndarray] = OrderedDict()
        self.arena: SlotArena | None = None
        self.bytes = 0
        self.hits = self.misses = self.puts = self.evicted = self.refused = 0
        self.fault: tuple[str, int] | None = None
        self.name = name
        self.transfer: Transfer | None = None
        self._probe: np.ndarray | None = None  # what connect writes from
        if transport in ("auto", "tcp"):
            self.transfer, why = kv_transfer.start(ray.util.get_node_ip_address(),
                                                   force_tcp=transport == "tcp")
            if self.transfer is None:
                log.warning("KV pool store %s: fetches go by Ray: %s", name, why)
        # bumped whenever what a summary shows may change (a block in or out, an LRU move):
        # a router whose summary is of this version is answered None, not the same bytes.
        # Starts at the clock, so a restarted store never repeats a version a router holds
        self.version = time.time_ns()
        self._summary: tuple[int, int, dict[bytes, bytes]] | None = None  # (version, n, it)
        self._metrics = None
        try:
            from ray.util import metrics

            tags = ("pool",)
            self._metrics = (
                metrics.Gauge("tandem_kv_pool_bytes", "KV block bytes held by a pool store",
                              tags),
                metrics.Gauge("tandem_kv_pool_blocks", "KV blocks held by a pool store", tags),
                metrics.Counter("tandem_kv_pool_hits", "Blocks a pool store served", tags),
                metrics.Counter("tandem_kv_pool_misses", "Blocks asked of a pool store that "
                                "it did not hold", tags))
        except Exception:  # noqa: BLE001 - outside a Ray worker: no metrics, same store
            self._metrics = None

    # ---- storage
    def _size(self, entry: int | np.ndarray) -> int:
        return self.arena.stride if isinstance(entry, int) else len(entry)

    def _view(self, entry: int | np.ndarray) -> np.ndarray:
        return self.arena.view(entry) if isinstance(entry, int) else entry

    def _free(self, entry: int | np.ndarray) -> None:
        self.bytes -= self._size(entry)
        if isinstance(entry, int):
            self.arena.free.append(entry)

    def _make_room(self, size: int) -> None:
        while self.bytes + size > self.capacity:
            _, entry = self.blocks.popitem(last=False)
            self.evicted += 1
            self._free(entry)

    def _store(self, key: bytes, size: int, fill: Callable[[np.ndarray], None]) -> bool:
        if key in self.blocks:
            self.blocks.move_to_end(key)
            return False
        if size > self.capacity:
            self.refused += 1
            return False
        if self.arena is None:  # with a transfer engine each slot has room for a seal
            tail = SEAL_BYTES if self.transfer is not None else 0
            self.arena = SlotArena(size, self.capacity // (size + tail), self.transfer, tail)
        in_arena = size == self.arena.slot_bytes
        self._make_room(self.arena.stride if in_arena else size)
        # room for a slot's bytes is room for a slot: every slot in use counts in
        # self.bytes, so fewer than max_slots are
        slot = self.arena.alloc() if in_arena else None
        entry: int | np.ndarray = np.empty(size, np.uint8) if slot is None else slot
        fill(self._view(entry))
        self.blocks[key] = entry
        self.bytes += self._size(entry)
        return True

    def _stored(self, new: int) -> int:
        self.puts += new
        self.version += 1
        self._gauges()
        return new

    def put(self, items: list[tuple[bytes, bytes]]) -> int:
        """Stores blocks given as (key, key + bytes); returns how many are new. A block
        larger than the whole bound is refused; others push out the least recently used
        until they fit."""
        def fill(blob):
            def write(v):
                v[:] = np.frombuffer(blob, np.uint8)
            return write

        return self._stored(sum(self._store(key, len(blob), fill(blob)) for key, blob in items))

    def put_blocks(self, keys: list[bytes], views: list[np.ndarray]) -> int:
        """Stores blocks sent as keys and arrays of their bytes (an engine's spills: Ray
        moves the arrays without pickling them; they are copied once, into their slots)."""
        def fill(key, data):
            def write(v):
                v[:KEY_BYTES] = np.frombuffer(key, np.uint8)
                v[KEY_BYTES:] = np.frombuffer(data, np.uint8)
            return write

        return self._stored(sum(self._store(k, KEY_BYTES + memoryview(d).nbytes, fill(k, d))
                                for k, d in zip(keys, views, strict=True)))

    def touch(self, keys: list[bytes]) -> list[bool]:
        """Whether each key is held; those held become most recent (an engine asks this
        before it sends a block again: about half of the spills in `bench.kv_tier` were
        blocks sent before, evicted from the engine's host tier and computed again)."""
        held = [key in self.blocks for key in keys]
        for key, h in zip(keys, held, strict=True):
            if h:
                self.blocks.move_to_end(key)
        if any(held):
            self.version += 1
        return held

    # ---- fetches
    def _lookup(self, keys: list[bytes]) -> list[int | np.ndarray | None]:
        """The entries of these keys (None: not held), each found made most recent, counted
        as hits and misses; a fault injected by a test applies here."""
        out = [self.blocks.get(key) for key in keys]
        for key, e in zip(keys, out, strict=True):
            if e is not None:
                self.blocks.move_to_end(key)
        found = sum(e is not None for e in out)
        if found:
            self.version += 1  # found ones moved to the newest end
        self.hits += found
        self.misses += len(out) - found
        if self._metrics is not None:
            tags = {"pool": self.name}
            if found:
                self._metrics[2].inc(found, tags)
            if len(out) - found:
                self._metrics[3].inc(len(out) - found, tags)
        if self.fault is not None and self.fault[0] == "slow":
            time.sleep(self.fault[1])
            self.fault = None
        return out

    def _torn_after(self) -> int | None:
        """Tests: the position from which this answer's blocks come cut in half."""
        if self.fault is None or self.fault[0] != "torn":
            return None
        n, self.fault = self.fault[1], None
        return n

    def get(self, keys: list[bytes]) -> list[bytes | None]:
        """The blocks of these keys as bytes (None: not held), each found made most recent
        (stores of older releases answered this; engines call get_arrays or push)."""
        return [None if b is None else bytes(b) for b in self._views(keys)]

    def get_arrays(self, keys: list[bytes]) -> list[np.ndarray | None]:
        """get's answer as uint8 arrays over the held bytes: Ray moves arrays out of band
        (no pickling, its copies multi-threaded, the engine reading them where they landed),
        bytes in band. `python -m cluster.bench.kv_link --blocks 8 32 --block-bytes
        2097152`: 32 blocks of 2 MiB across two nodes of this machine 274-303 -> 149-195 ms.
        Ray copies the answer before this actor runs its next call, so a slot reused by a
        later put never shows through."""
        return self._views(keys)

    def _views(self, keys: list[bytes]) -> list[np.ndarray | None]:
        out = [None if e is None else self._view(e) for e in self._lookup(keys)]
        torn = self._torn_after()
        if torn is not None:
            out = [b if i < torn or b is None else b[: len(b) // 2] for i, b in enumerate(out)]
        return out

    def connect(self, session: str, addr: int) -> bool:
        """Writes 64 bytes to `addr` in engine `session`'s registered memory, which connects
        this store's transfer engine to that one (the first write took ~60 ms, later ones
        ~2): engines ask this when they start, not on a request's fetch. False: no
        transfer engine here, or the write failed."""
        return self.transfer is not None and self.transfer.write(
            session, [addr], [self._probe_buffer().ctypes.data], [64])

    def _probe_buffer(self) -> np.ndarray:
        if self._probe is None:
            self._probe = np.zeros(64, np.uint8)
            if not self.transfer.register(self._probe):
                log.warning("KV pool store %s: the probe was not registered", self.name)
        return self._probe

    def push(self, keys: list[bytes], session: str, addrs: list[int], nbytes: int,
             seal: int | None = None) -> list[int] | None:
        """Writes each held key's block (key + bytes, `nbytes` of them) to addrs[j] in engine
        `session`'s registered memory with the transfer engine, and answers how many bytes
        went there per key (0: not held here, or of another size). With a seal, a whole
        block is followed by it, in the same transfer: the engine reads a block only once
        its seal has landed (kv_transfer.SEAL_BYTES says why). None: no transfer engine
        here, or a write failed (whatever landed is not to be read). Ray carries only this
        call and its answer; this actor runs no put meanwhile, so no slot changes under a
        write."""
        if self.transfer is None:
            return None
        entries = self._lookup(keys)
        torn = self._torn_after()
        sealing = seal is not None and self.arena is not None and self.arena.tail > 0
        sent, dsts, srcs, lens = [], [], [], []
        for j, e in enumerate(entries):
            n = 0
            if isinstance(e, int) and self.arena.slot_bytes == nbytes:
                n = nbytes // 2 if torn is not None and j >= torn else nbytes
                dsts.append(addrs[j])
                srcs.append(self.arena.addr(e))
                whole = sealing and n == nbytes
                if whole:
                    self.arena.seal(e, seal)
                lens.append(n + SEAL_BYTES if whole else n)
            sent.append(n)
        if lens and not self.transfer.write(session, dsts, srcs, lens):
            return None
        return sent

    def stats(self) -> dict:
        return {"bytes": self.bytes, "blocks": len(self.blocks), "capacity": self.capacity,
                "hits": self.hits, "misses": self.misses, "puts": self.puts,
                "evicted": self.evicted, "refused": self.refused,
                "transport": f"mooncake/{self.transfer.protocol}" if self.transfer is not None
                else "ray"}

    def summary(self, since: int = -1, limit: int = 16384) -> tuple[int, dict] | None:
        """What the cluster index (cluster/kv_index.py) reads: the newest `limit` blocks'
        short digests (the 8 bytes after the model key: prefix_hash.short_digest of the
        chained digest, what routers compute from a prompt), packed little-endian per model
        key. None when nothing changed since version `since`. One summary per version,
        whichever router asks: the routers of every frontend share the work."""
        if since == self.version:
            return None
        if self._summary is None or self._summary[:2] != (self.version, limit):
            by_model: dict[bytes, list[bytes]] = {}
            for key in islice(reversed(self.blocks), limit):  # newest first
                by_model.setdefault(key[:16], []).append(key[16:24])
            self._summary = (self.version, limit,
                             {m: b"".join(ds) for m, ds in by_model.items()})
        return self.version, self._summary[2]

    def inject_fault(self, after_blocks: int) -> None:
        """Tests only: the next get answers its blocks from `after_blocks` on cut in half (a
        transfer torn mid-way)."""
        self.fault = ("torn", after_blocks)

    def inject_delay(self, seconds: float) -> None:
        """Tests only: the next get answers `seconds` late (a slow link or a busy store)."""
        self.fault = ("slow", seconds)

    def _gauges(self) -> None:
        if self._metrics is not None:
            tags = {"pool": self.name}
            self._metrics[0].set(self.bytes, tags)
            self._metrics[1].set(len(self.blocks), tags)


PoolActor = ray.remote(num_cpus=0, max_restarts=-1)(KVPoolStore)


def _matches(labels: dict, selector: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def start_pool(capacity_bytes: int, label_selector: dict[str, str], prefix: str = NAME_PREFIX,
               detached: bool = True, transport: str = "auto") -> list:
    """One store actor per live node carrying `label_selector`'s labels, named
    prefix + the node's id (an existing one is reused, as it was started); their handles,
    in node order. transport: "auto" (the transfer engine where it loads: RDMA where it
    finds a device, TCP otherwise), "tcp" (the transfer engine over TCP only) or "ray"."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = sorted((n for n in ray.nodes() if n["Alive"]
                    and _matches(n.get("Labels", {}), label_selector)),
                   key=lambda n: n["NodeID"])
    actors = []
    for node in nodes:
        name = prefix + node["NodeID"][:12]
        opts = dict(name=name, namespace=POOL_NAMESPACE, get_if_exists=True,
                    runtime_env={"env_vars": INLINE_ENV},  # its answers inline
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"],
                                                                       soft=False))
        if detached:  # the pool outlives the replica that started it
            opts["lifetime"] = "detached"
        actors.append(PoolActor.options(**opts).remote(capacity_bytes, name, transport))
    if not actors:
        log.warning("no live node carries %s: the KV pool has no store", label_selector)
    return actors
