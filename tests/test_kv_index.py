"""The cluster index (cluster/kv_index.py) on real pool stores of the session's Ray cluster:
it holds what the stores hold, under the digests the router computes from a prompt (the
model key and the tenant's salt included), follows a store's LRU and a store's loss, and
turns the router's pick (cluster/router.py) to a less loaded replica, which fetches."""

from __future__ import annotations

import asyncio
import time
import uuid
from types import SimpleNamespace

import pytest
import ray
from ray.serve._private.common import DeploymentHandleSource

from cluster.kv_index import PoolIndex
from cluster.kv_pool import PoolClient
from cluster.kv_store import POOL_NAMESPACE, PoolActor, start_pool
from cluster.prefix_hash import prompt_digests
from cluster.router import LoadAwareRouter
from tests.test_hardening_units import DEP, replica
from tests.test_kv_tier import A_BLOCKS, BLOCK_BYTES, BS, A, make, push_out, run, settle

SALT = "tenant-a"


@pytest.fixture
def prefix():
    return f"test-kvi-{uuid.uuid4().hex[:6]}-"


@pytest.fixture
def spilled(ray_cluster, model_dir, prefix):
    """The pool's two stores holding A's blocks (salted), spilled by an engine whose cache
    no longer has them; (model key, stores)."""
    actors = start_pool(64 << 20, {"cpu-arch": "kunpeng"}, prefix=prefix, detached=False)
    client = PoolClient(actors)
    writer = make(model_dir, client, kv_host_tier_bytes=64 * BLOCK_BYTES)
    run(writer, [A], SALT)
    push_out(writer, SALT)
    settle(client)
    yield writer.blocks.tier.key, actors
    for a in actors:
        ray.kill(a)


def refreshed(index: PoolIndex) -> PoolIndex:
    asyncio.run(index.refresh())
    return index


def test_index_holds_the_routers_digests_of_the_pools_blocks(spilled, prefix):
    key, actors = spilled
    index = refreshed(PoolIndex(prefix=prefix))
    assert len(index.stores) == 2
    held = index.held(key.hex())
    ours = prompt_digests(A, BS, SALT)[:A_BLOCKS]  # what the router hashes of the prompt
    assert set(ours) <= held, "the router's digests are not the pool's keys"
    assert not set(prompt_digests(A, BS)) & held  # without the tenant's salt: none of them
    assert index.held(bytes(16).hex()) == frozenset()  # another model's key: nothing
    # the stores answer None while unchanged: the index keeps what it has
    versions = [s[1] for s in index.stores.values()]
    asyncio.run(index.refresh())
    assert [s[1] for s in index.stores.values()] == versions and index.held(key.hex()) == held


def test_index_follows_a_stores_lru_and_its_loss(ray_cluster, prefix):
    store = PoolActor.options(name=prefix + "lru", namespace=POOL_NAMESPACE).remote(4096)
    model = b"m" * 16

    def key(i: int) -> bytes:
        return model + i.to_bytes(8, "little") + bytes(24)

    ray.get(store.put.remote([(key(i), b"x" * 1024) for i in range(4)]))  # full: 4 KiB
    index = refreshed(PoolIndex(period_s=0.2, prefix=prefix))
    assert index.held(model.hex()) == {0, 1, 2, 3}
    ray.get(store.get.remote([key(0)]))  # 0 read: now the newest
    ray.get(store.put.remote([(key(4), b"x" * 1024), (key(5), b"x" * 1024)]))
    assert refreshed(index).held(model.hex()) == {0, 3, 4, 5}  # 1 and 2 went out
    assert refreshed(PoolIndex(blocks=2, prefix=prefix)).held(model.hex()) == {4, 5}
    ray.kill(store)  # a lost store: its blocks stop counting after 5 periods
    asyncio.run(index.refresh())
    time.sleep(1.1)
    assert refreshed(index).held(model.hex()) == frozenset()


def test_the_router_sends_a_pool_held_prefix_to_the_less_loaded_replica(spilled, prefix):
    """The holder has A's prefix in its cache and is busier than the other replica by 0.75
    (within the margin, 1.0): without the index the router picks the holder; with it, the
    other replica gets the request (it fetches the prefix from the pool)."""
    key, _ = spilled
    ours = prompt_digests(A, BS, SALT)
    base = {"waiting": 0, "kv_used": 0, "kv_total": 100, "max_num_seqs": 32,
            "kv_key": key.hex()}
    holder = replica("holder", {**base, "running": 24, "prefix": ours})
    idle = replica("idle", {**base, "running": 0, "prefix": []})
    pending = SimpleNamespace(args=[SimpleNamespace(prompt_token_ids=A, cache_salt=SALT)])

    async def picks(router: LoadAwareRouter) -> tuple[str, str]:
        first = await router.choose_replicas([idle, holder], pending)
        for _ in range(100):  # the index's first refresh, in the background
            if router.index is None or router.index.held(key.hex()):
                break
            await asyncio.sleep(0.05)
        then = await router.choose_replicas([idle, holder], pending)
        return first[0][0].replica_id.unique_id, then[0][0].replica_id.unique_id

    kw = dict(policy="prefix_aware", block_size=BS, prefix_margin=1.0)
    blind = LoadAwareRouter(DEP, DeploymentHandleSource.UNKNOWN)
    blind.initialize_state(**kw)
    assert asyncio.run(picks(blind)) == ("holder", "holder")
    router = LoadAwareRouter(DEP, DeploymentHandleSource.UNKNOWN)
    router.initialize_state(**kw, pool_index={"period_s": 0.2, "prefix": prefix})
    # first pick before any refresh: local caches only (no call on the routing path)
    assert asyncio.run(picks(router)) == ("holder", "idle")
    assert router.policy.pool_effect == "changed"


def test_the_config_gives_the_router_its_index():
    """`kv_pool:` turns the index on in every model pool's router, refreshed once per stats
    period, with the configured weight; no pool or `index_blocks: 0`: none."""
    from cluster.config import AppConfig
    from deployments.app import routing

    def kwargs(**args):
        cfg = AppConfig.model_validate(args)
        return routing(cfg, BS, "M")["request_router_config"].request_router_kwargs

    on = kwargs(kv_pool={"index_blocks": 4096},
                router={"stats_period_s": 0.5, "pool_block_weight": 0.25})
    assert on["pool_index"] == {"period_s": 0.5, "blocks": 4096}
    assert on["pool_block_weight"] == 0.25
    assert kwargs()["pool_index"] is None
    assert kwargs(kv_pool={"index_blocks": 0})["pool_index"] is None
    with pytest.raises(ValueError, match="less than or equal to 1"):
        AppConfig.model_validate({"router": {"pool_block_weight": 1.5}})
