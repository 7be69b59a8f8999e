"""Tier 2 of the KV cache: a cluster pool of KV blocks in the CPU nodes' memory.

One store actor per CPU node (label `cpu-arch: kunpeng` by default) holds blocks in a bounded
LRU, keyed by the model's key + the block's chained SHA-256 (cluster/prefix_hash.py: the
tenant's salt is the chain's start, so tenants never share a key). Engines spill blocks there
from their host tier (cluster/engine/kv_tier.py) and fetch them on a miss. Spills go by Ray's
object transfer; fetches by Mooncake's transfer engine where both ends load it (reading the
store's memory: cluster/kv_transfer.py), else by Ray too. A key lives on one actor (its first
bytes pick it), so the blocks of one prompt are striped over all the actors and one fetch
asks them all at once.

Nothing here can fail a request: an actor that is gone, slow or answers a torn block is a
miss, and the engine computes the block instead. No torch here: the store runs on CPU nodes.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from itertools import islice

import numpy as np
import ray

from cluster import kv_transfer
from cluster.kv_transfer import SlotArena, Transfer

log = logging.getLogger(__name__)

POOL_NAMESPACE = "tandem"
NAME_PREFIX = "tandem-kv-pool-"
KEY_BYTES = 48  # model key (16) + block digest (32)
DOWN_FOR_S = 5.0  # an actor that failed a call is skipped this long (misses, no waiting)

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


@dataclass
class Blocks:
    """Spilled blocks handed to the sender without a copy: their keys and views of their
    bytes (rows of the engine's host slab), which stay unchanged until `release()`; the
    sender calls it once Ray has copied them into the object store (an actor call's large
    arguments are put there before `.remote()` returns). Copying them out on the engine's
    thread instead took 44 ms a step of 128 blocks of 2 MiB (the 8B shape) on this host."""

    keys: list[bytes]
    views: list[np.ndarray]
    release: Callable[[], None] = lambda: None

    def __len__(self) -> int:
        return len(self.keys)


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
        if transport == "auto":
            self.transfer, why = kv_transfer.start(ray.util.get_node_ip_address())
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
        return self.arena.slot_bytes if isinstance(entry, int) else len(entry)

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
        self._make_room(size)
        if self.arena is None:
            self.arena = SlotArena(size, self.capacity // size, self.transfer)
        slot = self.arena.alloc() if size == self.arena.slot_bytes else None
        if slot is None:
            entry: int | np.ndarray = np.empty(size, np.uint8)
        else:  # room for its bytes is room for a slot: every slot counts in self.bytes
            entry = slot
        fill(self._view(entry))
        self.blocks[key] = entry
        self.bytes += size
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
            session, [addr], [self.arena_probe().ctypes.data], [64])

    def arena_probe(self) -> np.ndarray:
        if self._probe is None:
            self._probe = np.zeros(64, np.uint8)
            if not self.transfer.register(self._probe):
                log.warning("KV pool store %s: the probe was not registered", self.name)
        return self._probe

    def push(self, keys: list[bytes], session: str, addrs: list[int],
             nbytes: int) -> list[int] | None:
        """Writes each held key's block (key + bytes, `nbytes` of them) to addrs[j] in engine
        `session`'s registered memory with the transfer engine, and answers how many bytes
        went there per key (0: not held here, or of another size). None: no transfer engine
        here, or a write failed (whatever landed is not to be read). Ray carries only this
        call and its answer; the call returns once every byte landed, and this actor runs
        no put meanwhile, so no slot changes under a write."""
        if self.transfer is None:
            return None
        entries = self._lookup(keys)
        torn = self._torn_after()
        sent, dsts, srcs = [], [], []
        for j, e in enumerate(entries):
            n = 0
            if isinstance(e, int) and self.arena.slot_bytes == nbytes:
                n = nbytes // 2 if torn is not None and j >= torn else nbytes
                dsts.append(addrs[j])
                srcs.append(self.arena.addr(e))
            sent.append(n)
        lens = [n for n in sent if n]
        if lens and not self.transfer.write(session, dsts, srcs, lens):
            return None
        return sent

    def stats(self) -> dict:
        return {"bytes": self.bytes, "blocks": len(self.blocks), "capacity": self.capacity,
                "hits": self.hits, "misses": self.misses, "puts": self.puts,
                "evicted": self.evicted, "refused": self.refused,
                "transport": "mooncake" if self.transfer is not None else "ray"}

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
    in node order. transport: "auto" (the transfer engine where it loads) or "ray"."""
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


@dataclass
class Fetch:
    """A get in flight: one call per store actor, each for the keys that live there. Each
    answer is read (deserialized) by Ray's own thread as it arrives, which stamps its time:
    the bandwidth the fetch rule uses is not rounded up to the engine's step, and a fetch
    the engine stopped waiting for still measures the link once it lands."""

    keys: list[bytes]
    calls: list[tuple[int, list[int], Future]]  # (actor, positions in keys, its answer)
    issued: float = field(default_factory=time.monotonic)
    answered: list[float] = field(default_factory=list)  # when each call's answer came

    @property
    def ready_at(self) -> float | None:
        return max(self.answered) if len(self.answered) == len(self.calls) else None


class PoolClient:
    """An engine's view of the pool: puts without waiting, gets as futures; any failure of
    an actor is a miss (and that actor is skipped for DOWN_FOR_S).

    Puts leave from a thread of their own: handing a batch of blocks to Ray (serializing a
    megabyte into the object store, ~1.8 ms for ten blocks here) would otherwise sit in the
    engine's step, once a step that spills."""

    MAX_PUTS_IN_FLIGHT = 16  # per actor: beyond, spills are dropped (later misses)
    # batches handed over and not yet sent: beyond, spills are dropped (later misses), and
    # the engine does not copy them out at all (accepting()). Blocks evicted faster than the
    # link carries them would queue without bound: on an H100 at the 8B shape (2 MiB a
    # block, evicted at GB/s, Ray's transfer ~0.5 GB/s) 64 queued batches held seconds of
    # spills, and copying them stalled the engine's loop
    MAX_QUEUED = 4
    # keys this client sent or fetched lately (newest last): one spilled again is first
    # asked about (touch: 48 bytes a key) and sent only if its store no longer holds it
    HELD_KEEP = 1 << 16

    RETRY_S = 60.0  # a store found without a transfer engine is tried again after this
    # a call for fewer bytes goes by Ray (its answer inline: one round trip, where the
    # transfer engine takes two). `python -m cluster.bench.kv_link`, p50, inline by Ray and
    # by the transfer engine: 4 blocks of 64 KiB 1.6 and 1.7 ms, 16 (1 MiB) 3.6 and 2.5, 32
    # 6.3 and 3.3; one block of 2 MiB 5.6 and 3.3, 32 of them 66 and 30
    TRANSFER_MIN_BYTES = 512 << 10

    def __init__(self, actors: list, timeout_s: float = 1.0,
                 write_through_hits: int | None = None, transport: str = "auto"):
        """write_through_hits: kv_pool.write_through_hits (the engine's tiers read it);
        transport: "auto" (fetches by the transfer engine from stores that have one) or
        "ray"."""
        self.actors = list(actors)
        self.transfer: Transfer | None = None
        if transport == "auto" and self.actors:
            self.transfer, why = kv_transfer.start(ray.util.get_node_ip_address())
            if self.transfer is None:
                log.warning("KV pool: fetches go by Ray: %s", why)
        # stores whose transfer engine this one has read from (the others: fetches by Ray)
        self.connected = [False] * len(self.actors)
        self._connects: dict[int, threading.Thread] = {}  # connections being made
        self._retry_at = [0.0] * len(self.actors)
        self._landing = kv_transfer.Landing(self.transfer) if self.transfer else None
        self._probe = np.zeros(64, np.uint8)  # what stores write to first (connect)
        if self.transfer is not None and not self.transfer.register(self._probe):
            log.warning("KV pool: no memory registered with the transfer engine: Ray's way")
            self.transfer = None
        self.block_bytes = 0  # key + bytes of a block, as the last fetch found (0: unknown)
        self.transfer_blocks = 0  # blocks fetched by the transfer engine (the rest: Ray)
        self.timeout_s = timeout_s
        self.write_through_hits = write_through_hits
        self.down_until = [0.0] * len(self.actors)
        self.puts: list[list] = [[] for _ in self.actors]
        self.errors = 0
        # (bytes, seconds) of the latest whole fetches, from issue to the last answer: the
        # fetch rule's measurements (appended by Ray's thread, read by the engine's)
        self.samples: deque[tuple[int, float]] = deque(maxlen=32)
        self._dropped = [0, 0]  # (not handed over: outbox full, not sent: actor busy or down)
        self.held: OrderedDict[bytes, None] = OrderedDict()  # see HELD_KEEP
        self.resends_skipped = 0  # spills not sent: their store still held them
        self._lock = threading.Lock()  # errors and down_until: both threads fail actors
        self._outbox: list[list[tuple[bytes, bytes]] | Blocks] = []
        self._cv = threading.Condition()
        self._sending = False  # the sender thread holds a batch
        self._sender: threading.Thread | None = None
        for i in range(len(self.actors)):  # in the background: fetches go by Ray until then
            self._connect(i, time.monotonic())

    def _shard(self, key: bytes) -> int:
        # the digest's bytes after the model key: uniform, and the same on every engine
        return int.from_bytes(key[16:20], "little") % len(self.actors)

    def _up(self, i: int, now: float) -> bool:
        return now >= self.down_until[i]

    @property
    def dropped(self) -> int:
        """Spilled blocks that never reached a store (later misses)."""
        return sum(self._dropped)

    def _failed(self, i: int, err: BaseException) -> None:
        with self._lock:
            self.errors += 1
            self.down_until[i] = time.monotonic() + DOWN_FOR_S
        log.warning("KV pool store %d failed (%s): its blocks are misses for %.0f s", i,
                    type(err).__name__, DOWN_FOR_S)

    def accepting(self) -> bool:
        """Whether a batch handed over now would be queued (else it would be dropped)."""
        return len(self._outbox) < self.MAX_QUEUED

    def drop(self, n: int) -> None:
        """Counts n spills the engine let go because the link was full (not accepting)."""
        with self._cv:
            self._dropped[0] += n

    def put(self, items: list[tuple[bytes, bytes]] | Blocks) -> None:
        """Hands blocks to the sender thread (never waits for Ray): (key, key + bytes)
        pairs, or Blocks (released once sent, or here when dropped)."""
        if not self.actors or not len(items):
            if isinstance(items, Blocks):
                items.release()
            return
        with self._cv:
            if len(self._outbox) >= self.MAX_QUEUED:
                self._dropped[0] += len(items)
                if isinstance(items, Blocks):
                    items.release()
                return
            self._outbox.append(items)
            self._cv.notify()
            if self._sender is None:
                self._sender = threading.Thread(target=self._send_loop, daemon=True,
                                                name="kv-pool-puts")
                self._sender.start()

    def _send_loop(self) -> None:
        while True:
            with self._cv:
                while not self._outbox:
                    self._sending = False
                    self._cv.notify_all()
                    self._cv.wait()
                items = self._outbox.pop(0)
                self._sending = True
            try:
                self._send(items)
            except Exception:  # noqa: BLE001 - a spill that cannot leave is a later miss
                log.exception("KV pool: a batch of spills was not sent")
                self._dropped[1] += len(items)
            finally:
                if isinstance(items, Blocks):
                    items.release()

    def sent(self, timeout_s: float = 30.0) -> bool:
        """Waits until every block handed over has been sent and answered (tests,
        benchmarks); False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while self._outbox or self._sending:
                if not self._cv.wait(max(0.0, deadline - time.monotonic())):
                    return False
        refs = [ref for refs in self.puts for ref in refs]
        done, _ = ray.wait(refs, num_returns=len(refs),
                           timeout=max(0.0, deadline - time.monotonic()))
        return len(done) == len(refs)

    def _remember(self, keys) -> None:
        with self._lock:
            for key in keys:
                self.held[key] = None
                self.held.move_to_end(key)
            while len(self.held) > self.HELD_KEEP:
                self.held.popitem(last=False)

    def _still_held(self, by_actor: dict[int, list[int]], keys: list[bytes],
                    now: float) -> set[int]:
        """Positions of the keys sent or fetched lately that their store still holds (it
        is asked, and they become its most recent); any failure: none."""
        with self._lock:
            asks = {i: [j for j in js if keys[j] in self.held] for i, js in by_actor.items()
                    if self._up(i, now)}
        refs = {i: self.actors[i].touch.remote([keys[j] for j in js])
                for i, js in asks.items() if js and hasattr(self.actors[i], "touch")}
        held: set[int] = set()
        for i, ref in refs.items():
            try:
                answer = ray.get(ref, timeout=self.timeout_s)
            except ray.exceptions.GetTimeoutError:  # behind on puts: held, most likely,
                held.update(asks[i])  # and more bytes would only slow it further
                continue
            except Exception as err:  # noqa: BLE001 - a lost store: sent to nobody
                self._failed(i, err)
                continue
            held.update(j for j, h in zip(asks[i], answer, strict=True) if h)
        return held

    def _send(self, items: list[tuple[bytes, bytes]] | Blocks) -> None:
        now = time.monotonic()
        blocks = isinstance(items, Blocks)
        keys = items.keys if blocks else [k for k, _ in items]
        by_actor: dict[int, list] = {}
        for j, key in enumerate(keys):
            by_actor.setdefault(self._shard(key), []).append(j)
        held = self._still_held(by_actor, keys, now)
        self.resends_skipped += len(held)
        for i, batch in by_actor.items():
            batch = [j for j in batch if j not in held]
            if not batch:
                continue
            self._reap(i)
            if not self._up(i, now) or len(self.puts[i]) >= self.MAX_PUTS_IN_FLIGHT:
                self._dropped[1] += len(batch)
                continue
            sent = [keys[j] for j in batch]
            if blocks:  # numpy views: Ray copies them into the object store unpickled
                views = [items.views[j] for j in batch]
                put_blocks = getattr(self.actors[i], "put_blocks", None)
                if put_blocks is None:  # a store started by an older release (detached)
                    self.puts[i].append(self.actors[i].put.remote(block_items(sent, views)))
                else:
                    self.puts[i].append(put_blocks.remote(sent, views))
            else:
                self.puts[i].append(self.actors[i].put.remote([items[j] for j in batch]))
            self._remember(sent)

    def _reap(self, i: int) -> None:
        """Takes the answered puts of actor i (an error there: the actor is down)."""
        refs = self.puts[i]
        if not refs:
            return
        done, self.puts[i] = ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref in done:
            try:
                ray.get(ref)
            except Exception as err:  # noqa: BLE001 - a lost store: misses later, no error
                self._failed(i, err)

    def get(self, keys: list[bytes]) -> Fetch | None:
        if not self.actors or not keys:
            return None
        now = time.monotonic()
        pos: dict[int, list[int]] = {}
        for j, key in enumerate(keys):
            i = self._shard(key)
            if self._up(i, now):
                pos.setdefault(i, []).append(j)
        if not pos:
            return None
        fetch = Fetch(keys, [])
        for i, js in pos.items():
            a, asked = self.actors[i], [keys[j] for j in js]
            if not self.connected[i]:
                self._connect(i, now)
            # (the block size not known yet: a small fetch, most likely; Ray's way)
            bb = self.block_bytes
            land = self._landing.take(len(asked) * bb) if self.connected[i] \
                and len(asked) * bb >= max(1, self.TRANSFER_MIN_BYTES) else None
            if land is not None:
                fut: Future = Future()
                addrs = [land.ctypes.data + j * bb for j in range(len(asked))]
                a.push.remote(asked, self.transfer.session, addrs, bb).future() \
                    .add_done_callback(lambda pushed, land=land, bb=bb, out=fut:
                                       self._landed(pushed, land, bb, out))
            else:
                get = a.get_arrays if hasattr(a, "get_arrays") else a.get  # older: bytes
                fut = get.remote(asked).future()
            fetch.calls.append((i, js, fut))
        # once every call is in the list the callbacks read; by a weak reference, as the
        # fetch holds its futures: a cycle would keep its blocks (and their landing buffer,
        # kv_transfer.Landing) alive until the garbage collector ran
        ref = weakref.ref(fetch)
        for _, _, fut in fetch.calls:
            fut.add_done_callback(lambda _, f=ref: f() is not None and self._answered(f()))
        return fetch

    def _connect(self, i: int, now: float) -> None:
        """Starts connecting store i's transfer engine to this one (its first write, from a
        thread: ~60 ms, the writes after it ~2), unless there is none here, it is under way,
        or it failed less than RETRY_S ago (an older store, one without a transfer engine, a
        lost one)."""
        under_way = self._connects.get(i)
        if self.transfer is None or now < self._retry_at[i] or (
                under_way is not None and under_way.is_alive()):
            return
        self._retry_at[i] = now + self.RETRY_S

        def connect() -> None:
            try:
                self.connected[i] = bool(ray.get(self.actors[i].connect.remote(
                    self.transfer.session, self._probe.ctypes.data), timeout=30.0))
            except Exception as err:  # noqa: BLE001 - fetches from it go by Ray meanwhile
                log.info("KV pool store %d: no transfer engine (%s)", i, type(err).__name__)

        self._connects[i] = threading.Thread(target=connect, daemon=True,
                                             name="kv-pool-connect")
        self._connects[i].start()

    def wait_connected(self, timeout_s: float = 30.0) -> bool:
        """Waits for the connections under way (tests, benchmarks); whether every store is
        connected."""
        for thread in list(self._connects.values()):
            thread.join(timeout_s)
        return all(self.connected)

    def _landed(self, pushed: Future, land: np.ndarray, bb: int, out: Future) -> None:
        """A store's push answered (Ray's thread): out gets the blocks it wrote, as views of
        the landing buffer (as get_arrays would answer); a failed push is a miss."""
        try:
            sizes = pushed.result()
        except BaseException as err:  # noqa: BLE001 - collect makes it a miss
            out.set_exception(err)
            return
        if sizes is None:  # a write failed mid-way (or the store lost its transfer engine)
            self._landing.discard(land)
            out.set_exception(ConnectionError("a push of the KV pool failed"))
            return
        self.transfer_blocks += sum(1 for n in sizes if n)
        out.set_result([land[j * bb: j * bb + n] if n else None for j, n in enumerate(sizes)])

    def _answered(self, fetch: Fetch) -> None:
        """A call of the fetch answered (Ray's thread); the last one times the whole."""
        fetch.answered.append(time.monotonic())
        if fetch.ready_at is None:
            return
        size = found = 0
        for _, _, fut in fetch.calls:
            if fut.exception() is not None:
                return  # a failed call measures no transfer
            blobs = [b for b in fut.result() or () if b is not None]
            size += sum(map(len, blobs))
            found += len(blobs)
        if found:
            self.block_bytes = size // found
        self.samples.append((size, max(1e-6, fetch.ready_at - fetch.issued)))

    def poll(self, fetch: Fetch) -> bool:
        """True once every call of the fetch has answered."""
        return fetch.ready_at is not None

    def collect(self, fetch: Fetch, timeout_s: float) -> list[np.ndarray | bytes | None]:
        """The fetch's blocks (key + bytes, as uint8 arrays or from older stores bytes) in
        key order; None for each one that is missing, late (past timeout_s) or whose actor
        failed."""
        out: list[np.ndarray | bytes | None] = [None] * len(fetch.keys)
        deadline = time.monotonic() + max(0.0, min(timeout_s, self.timeout_s))
        for i, js, fut in fetch.calls:
            try:
                blobs = fut.result(timeout=max(0.0, deadline - time.monotonic()))
            except FutureTimeout:
                continue  # late: recomputing is faster than waiting (the rule in kv_tier)
            except Exception as err:  # noqa: BLE001 - a lost store: misses, never an error
                self._failed(i, err)
                continue
            if not isinstance(blobs, list) or len(blobs) != len(js):
                continue  # not an answer of ours: misses
            for j, blob in zip(js, blobs, strict=True):
                out[j] = blob
        self._remember(k for k, b in zip(fetch.keys, out, strict=True) if b is not None)
        return out


def connect(address: str | None, capacity_bytes: int, label_selector: dict[str, str],
            timeout_s: float, write_through_hits: int | None = None,
            transport: str = "auto") -> PoolClient | None:
    """The pool client of an engine core (its own process): joins the Ray cluster at
    `address` as a driver and starts or finds the store actors. None where that fails: the
    engine then runs without the pool (its misses are computed), never refusing requests."""
    if address is None and not ray.is_initialized():
        log.warning("no Ray cluster address: the engine runs without the KV pool")
        return None
    try:
        if not ray.is_initialized():
            ray.init(address=address, namespace=POOL_NAMESPACE, log_to_driver=False,
                     logging_level=logging.WARNING)
        actors = start_pool(capacity_bytes, label_selector, transport=transport)
    except Exception:  # noqa: BLE001 - no pool is misses, not a failed replica
        log.exception("KV pool unavailable: the engine runs without it")
        return None
    return PoolClient(actors, timeout_s, write_through_hits, transport) if actors else None
