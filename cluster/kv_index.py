"""The cluster index: which KV blocks the pool's stores hold, as each router sees it.

The stores (cluster/kv_store.py) are the index's source: the replicas' block events (the
blocks their host tiers spill) land there, and a store's LRU decides what stays, so what
a store holds is what a fetch would find. Each router (one per frontend's handle, see
cluster/router.py) refreshes its copy in the background, about once a stats period: one
call per store, answered None while the store has not changed, else the newest
`kv_pool.index_blocks` blocks' short digests grouped by model key. A routing decision only
reads the copy: never a remote call on the routing path.

What it gets wrong is bounded: a block the store evicted since the last refresh (the
replica then fetches a miss and computes the block, as without an index), and blocks older
than the newest `index_blocks` (the router does not count them; a fetch still finds them).
A store that stops answering drops out of the index after MAX_AGE_PERIODS periods.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import sys
import time
from array import array

import ray

from cluster.kv_store import NAME_PREFIX, POOL_NAMESPACE

log = logging.getLogger(__name__)

MAX_AGE_PERIODS = 5  # a store silent this many periods: its blocks are no longer counted
FIND_EVERY_S = 10.0  # how often the store actors are listed again (a GCS call)


def unpack(packed: bytes) -> frozenset[int]:
    """A store's packed digests (8 bytes each, little-endian) as prefix_hash.short_digest
    ints, the router's own prompt_digests values."""
    a = array("Q", packed)
    if sys.byteorder == "big":
        a.byteswap()
    return frozenset(a)


_SHARED: dict[tuple, PoolIndex] = {}  # this process's indexes, by their arguments


class PoolIndex:
    @classmethod
    def shared(cls, **kw) -> PoolIndex:
        """The one index of this process with these arguments: a frontend's routers to
        several deployments (a model's GPU and CPU pools, a canary) refresh one copy."""
        key = tuple(sorted(kw.items()))
        if key not in _SHARED:
            _SHARED[key] = cls(**kw)
        return _SHARED[key]

    def __init__(self, period_s: float = 1.0, blocks: int = 16384, prefix: str = NAME_PREFIX,
                 namespace: str = POOL_NAMESPACE):
        self.period_s, self.blocks = period_s, blocks
        self.prefix, self.namespace = prefix, namespace
        self.max_age_s = MAX_AGE_PERIODS * period_s
        # a store busy with large gets may answer late; later than this, this round skips it
        self.timeout_s = max(1.0, period_s)
        # store name -> [handle, version seen, {model key hex: digests}, answered at]
        self.stores: dict[str, list] = {}
        self.by_model: dict[str, frozenset[int]] = {}  # the union over stores
        self.refreshed_at = -math.inf
        self._found_at = -math.inf
        self._merged_of: frozenset[str] = frozenset()  # the stores by_model was merged from
        self._task: asyncio.Task | None = None

    def held(self, model_key: str) -> frozenset[int]:
        """Short digests of the pool's blocks of this model (hex of kv_tier.model_key, as a
        replica reports it); nothing while the index is stale (its refresh loop stopped)."""
        if not model_key or time.monotonic() - self.refreshed_at > self.max_age_s:
            return frozenset()
        return self.by_model.get(model_key, frozenset())

    def start(self) -> None:
        """Starts the refresh loop on the running event loop (the router's), once."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Ends the refresh loop (on its event loop)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:  # noqa: BLE001 - no index is routing on local caches only
                log.exception("KV pool index refresh failed")
            await asyncio.sleep(self.period_s)

    def _find(self) -> None:
        """The stores that exist now, by name (engine cores start them on demand)."""
        names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["namespace"] == self.namespace and a["name"].startswith(self.prefix)}
        for name in names - self.stores.keys():
            try:
                self.stores[name] = [ray.get_actor(name, self.namespace), -1, {}, -math.inf]
            except ValueError:  # gone between the listing and now
                continue
        for name in self.stores.keys() - names:
            del self.stores[name]

    async def _ask(self, store: list) -> bool:
        """One store's summary into `store`; True when its contents changed."""
        ref = store[0].summary.remote(store[1], self.blocks)
        got = await asyncio.wait_for(asyncio.wrap_future(ref.future()), self.timeout_s)
        store[3] = time.monotonic()
        if got is None:
            return False
        store[1], packed = got
        store[2] = {m.hex(): unpack(p) for m, p in packed.items()}
        return True

    async def refresh(self) -> None:
        now = time.monotonic()
        if now - self._found_at > FIND_EVERY_S:
            await asyncio.to_thread(self._find)
            self._found_at = now
        names, stores = frozenset(self.stores), list(self.stores.values())
        answers = await asyncio.gather(*(self._ask(s) for s in stores), return_exceptions=True)
        changed = any(a is True for a in answers) or names != self._merged_of
        now = time.monotonic()
        for s in stores:  # a store that is gone or slow: its blocks stop counting, in time
            if s[2] and now - s[3] > self.max_age_s:
                s[2], s[1], changed = {}, -1, True
        if changed:
            merged: dict[str, set[int]] = {}
            for s in stores:
                for m, ds in s[2].items():
                    merged.setdefault(m, set()).update(ds)
            self.by_model = {m: frozenset(ds) for m, ds in merged.items()}
        self._merged_of = names
        self.refreshed_at = now
