"""Tier 2 of the KV cache, an engine's side: its client of the cluster pool of KV blocks in
the CPU nodes' memory (the stores: cluster/kv_store.py).

Engines spill blocks there from their host tier (cluster/engine/kv_tier.py) and fetch them
on a miss. Spills go by Ray's object transfer; fetches by Mooncake's transfer engine where
both ends load it (the store writing into the engine's memory: cluster/kv_transfer.py), else
by Ray too. A key lives on one store (its digest picks it), so the blocks of one prompt are
striped over all the stores and one fetch asks them all at once.

Nothing here can fail a request: a store that is gone, slow or answers a torn block is a
miss, and the engine computes the block instead.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

import numpy as np
import ray

from cluster import kv_transfer
from cluster.kv_store import POOL_NAMESPACE, block_items, start_pool
from cluster.kv_transfer import Transfer

log = logging.getLogger(__name__)

DOWN_FOR_S = 5.0  # an actor that failed a call is skipped this long (misses, no waiting)


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
    # a call for fewer bytes goes by Ray (its answer inline, in one round trip; a push adds
    # the transfer engine's own to the write). `python -m cluster.bench.kv_link`, p50, inline by Ray
    # and by the transfer engine: 4 blocks of 64 KiB 1.4 and 1.8 ms; one block of 2 MiB 7.0
    # and 3.7, 32 of them 88 and 35 (with the first design, reads: 16 blocks of 64 KiB, 1
    # MiB, 3.6 and 2.5)
    TRANSFER_MIN_BYTES = 512 << 10

    def __init__(self, actors: list, timeout_s: float = 1.0,
                 write_through_hits: int | None = None, transport: str = "auto"):
        """write_through_hits: kv_pool.write_through_hits (the engine's tiers read it);
        transport: "auto" (fetches by the transfer engine from stores that have one, over
        RDMA where it finds a device), "tcp" (the same, TCP only) or "ray"."""
        self.actors = list(actors)
        self.transfer: Transfer | None = None
        if transport in ("auto", "tcp") and self.actors:
            self.transfer, why = kv_transfer.start(ray.util.get_node_ip_address(),
                                                   force_tcp=transport == "tcp")
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
        self.unsealed = 0  # blocks a store said it wrote whose seal did not land in time
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
            try:
                if blocks:  # numpy views: Ray copies them into the object store unpickled
                    views = [items.views[j] for j in batch]
                    put_blocks = getattr(self.actors[i], "put_blocks", None)
                    if put_blocks is None:  # a store started by an older release (detached)
                        ref = self.actors[i].put.remote(block_items(sent, views))
                    else:
                        ref = put_blocks.remote(sent, views)
                else:
                    ref = self.actors[i].put.remote([items[j] for j in batch])
            except Exception as err:  # noqa: BLE001 - this store's share is dropped, only
                self._failed(i, err)
                self._dropped[1] += len(batch)
                continue
            self.puts[i].append(ref)
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
        """Asks the stores for these keys' blocks (not waited for: `collect`); None when no
        store is up, or asking failed (a miss: never an error in the engine's loop)."""
        try:
            return self._get(keys)
        except Exception:  # noqa: BLE001 - a lost Ray connection, a buffer not registered
            log.exception("KV pool: a fetch could not be asked")
            with self._lock:
                self.errors += 1
            return None

    def _get(self, keys: list[bytes]) -> Fetch | None:
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
            stride = bb + kv_transfer.SEAL_BYTES  # each block followed by the push's seal
            land = self._landing.take(len(asked) * stride) if self.connected[i] \
                and len(asked) * bb >= max(1, self.TRANSFER_MIN_BYTES) else None
            if land is not None:
                fut: Future = Future()
                addrs = [land.ctypes.data + j * stride for j in range(len(asked))]
                seal = secrets.randbits(63)  # not what any earlier push left in the buffer
                a.push.remote(asked, self.transfer.session, addrs, bb, seal).future() \
                    .add_done_callback(lambda pushed, i=i, land=land, bb=bb, seal=seal,
                                       out=fut: self._landed(i, pushed, land, bb, seal, out))
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

    def _landed(self, i: int, pushed: Future, land: np.ndarray, bb: int, seal: int,
                out: Future) -> None:
        """A store's push answered (Ray's thread): out gets the blocks it wrote, as views of
        the landing buffer (as get_arrays would answer), each once its seal has landed
        behind it; a failed push, or a block whose seal did not come, is a miss."""
        try:
            sizes = pushed.result()
        except BaseException as err:  # noqa: BLE001 - collect makes it a miss
            sizes, error = None, err
        else:
            error = ConnectionError("a push of the KV pool failed")
        if sizes is None:  # a write failed mid-way, the call failed (its write may still be
            # under way), or the store lost its transfer engine: the buffer is not reused,
            # and fetches from that store go by Ray until connected again (after RETRY_S)
            self._landing.discard(land)
            self.connected[i] = False
            out.set_exception(error)
            return
        stride = bb + kv_transfer.SEAL_BYTES
        whole = [j for j, n in enumerate(sizes) if n == bb]  # a torn one has no seal
        ok = dict(zip(whole, kv_transfer.wait_sealed(land, [j * stride + bb for j in whole],
                                                     seal), strict=True))
        unsealed = sum(1 for v in ok.values() if not v)
        if unsealed or len(whole) < sum(1 for n in sizes if n):  # bytes not sealed (a torn
            self._landing.discard(land)  # block has no seal) may land later: not reused
            self.unsealed += unsealed
        blocks = [land[j * stride: j * stride + n] if n and ok.get(j, True) else None
                  for j, n in enumerate(sizes)]
        self.transfer_blocks += sum(1 for b in blocks if b is not None)
        out.set_result(blocks)

    def _answered(self, fetch: Fetch) -> None:
        """A call of the fetch answered (Ray's thread); the last one times the whole."""
        fetch.answered.append(time.monotonic())
        if fetch.ready_at is None:
            return
        size = found = longest = 0
        for _, _, fut in fetch.calls:
            if fut.exception() is not None:
                return  # a failed call measures no transfer
            blobs = [b for b in fut.result() or () if b is not None]
            size += sum(map(len, blobs))
            found += len(blobs)
            longest = max([longest, *map(len, blobs)])
        if found:  # the longest: a torn block is shorter, and must not set the size
            self.block_bytes = longest
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
