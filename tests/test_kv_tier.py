"""KV cache tiers (CPU, fp32): blocks evicted from the engine's cache come back from host
memory (tier 1) or the cluster pool's store actors (tier 2) with the same greedy output as
recomputing them; torn fetches and lost stores are misses, never errors; both tiers stay
within their byte bounds; tenants (cache salts) never share a block. The pool is real Ray
actors on the session cluster's Kunpeng nodes."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import time
import uuid

import numpy as np
import pytest
import ray
import torch

from cluster import kv_transfer
from cluster.config import AppConfig, EngineConfig, KVPoolConfig, ModelConfig
from cluster.engine.engine import LLMEngine
from cluster.engine.kv_tier import PROBE_EVERY_S, SPEED_STEPS, fit_link
from cluster.engine.sequence import SamplingParams
from cluster.kv_pool import Blocks, PoolClient
from cluster.kv_store import (
    INLINE_ENV,
    KEY_BYTES,
    NAME_PREFIX,
    POOL_NAMESPACE,
    PoolActor,
    start_pool,
)
from cluster.prefix_hash import block_hash, prompt_digests, salt_digest
from tests.skips import skip_or_fail

BS = 16
BLOCK_BYTES = 2 * 4 * BS * 4 * 32 * 4  # the default model: 4 layers, 4 KV heads of 32, fp32
G = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
_ids = itertools.count()


def tokens(seed: int, n: int = 150) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 4000) for _ in range(n)]


A = tokens(1)  # 9 full blocks before its last token
FILLERS = [tokens(10 + i) for i in range(4)]  # together they push A out of a 24-block cache
A_BLOCKS = (len(A) - 1) // BS


def make(model_dir, pool=None, **kw) -> LLMEngine:
    cfg = dict(max_model_len=256, num_kv_blocks=24, block_size=BS, max_num_batched_tokens=64,
               torch_threads=1, dtype="float32", device="cpu", cpu_attention_kernel=False)
    return LLMEngine(str(model_dir), EngineConfig(**(cfg | kw)), kv_pool=pool)


def run(engine: LLMEngine, prompts: list[list[int]], salt: str = "") -> list[list[int]]:
    rids = [f"r{next(_ids)}" for _ in prompts]
    for rid, p in zip(rids, prompts, strict=True):
        engine.add_request(rid, p, G, cache_salt=salt)
    return drain(engine, rids)


def drain(engine: LLMEngine, rids: list[str], outputs=()) -> list[list[int]]:
    """Steps until the engine is idle; each request's tokens (outputs: those of steps the
    caller ran)."""
    out = {rid: [] for rid in rids}
    outputs = list(outputs)
    while True:
        for o in outputs:
            assert o.finish_reason != "error", o.error
            out[o.request_id] += o.new_token_ids
        if not engine.has_work():
            return [out[r] for r in rids]
        outputs = engine.step()


def chain(prompt: list[int], salt: str = "") -> list[bytes]:
    h, out = salt_digest(salt), []
    for i in range((len(prompt) - 1) // BS):
        h = block_hash(h, prompt[i * BS : (i + 1) * BS])
        out.append(h)
    return out


def push_out(engine: LLMEngine, salt: str = "") -> None:
    """Runs the fillers one by one until none of A's blocks is left in the device cache."""
    for f in FILLERS:
        run(engine, [f], salt)
    assert not set(chain(A, salt)) & engine.blocks.hash_to_block.keys()


def settle(client: PoolClient) -> None:
    """Waits for the spills sent so far to be stored."""
    assert client.sent()


@pytest.fixture(scope="module")
def ref(model_dir) -> dict:
    """Greedy outputs of an engine that computes every block (no cache at all)."""
    engine = make(model_dir, enable_prefix_caching=False)
    a, *fillers = run(engine, [A, *FILLERS])
    return {"A": a, "fillers": fillers}


@pytest.fixture
def pool(ray_cluster):
    """A fresh pool: one store actor per Kunpeng node of the session cluster."""
    actors = start_pool(64 << 20, {"cpu-arch": "kunpeng"},
                        prefix=f"test-kv-{uuid.uuid4().hex[:6]}-", detached=False)
    assert len(actors) == 2  # the session cluster's two Kunpeng nodes
    ray.get([a.stats.remote() for a in actors])
    yield actors
    for a in actors:
        ray.kill(a)


def filled_pool(model_dir, actors) -> PoolClient:
    """A pool holding A's blocks, spilled by another engine (another replica)."""
    writer_pool = PoolClient(actors)
    writer = make(model_dir, writer_pool, kv_host_tier_bytes=64 * BLOCK_BYTES)
    run(writer, [A])
    push_out(writer)
    settle(writer_pool)
    assert writer_pool.dropped == 0
    keys = [writer.blocks.tier.key + h for h in chain(A)]
    held = [b is not None for a in actors for b in ray.get(a.get.remote(keys))]
    assert sum(held) == A_BLOCKS  # each block on exactly one store
    return writer_pool


def test_host_tier_restores_evicted_blocks_with_recomputed_output(model_dir, ref):
    engine = make(model_dir, kv_host_tier_bytes=64 * BLOCK_BYTES)
    tier = engine.blocks.tier
    assert run(engine, [A]) == [ref["A"]]
    push_out(engine)
    assert tier.saved >= A_BLOCKS and tier.hits["host"] == 0
    # out of the device cache, still this replica's: its prefix summary for the routers
    # has them (the router counts them as its own, not as the pool's)
    engine._digests_at = -1.0  # the summary now rather than in 0.5 s
    engine.publish()
    assert set(prompt_digests(A, BS)[:A_BLOCKS]) <= set(engine.prefix_digests)
    hits = engine.blocks.prefix_hits
    assert run(engine, [A]) == [ref["A"]]
    assert tier.hits["host"] == A_BLOCKS and engine.blocks.prefix_hits == hits
    # the output reads what was restored: a zeroed tier gives other tokens
    push_out(engine)
    tier.host.slab.zero_()
    assert run(engine, [A]) != [ref["A"]]


def test_host_tier_carries_fp8_blocks(model_dir):
    """kv_cache_dtype fp8: the tier keeps e4m3 blocks (a quarter of fp32's bytes each) and
    restores them as they were: the same tokens as the fp8 engine's first run."""
    engine = make(model_dir, kv_host_tier_bytes=64 * BLOCK_BYTES, kv_cache_dtype="fp8")
    tier = engine.blocks.tier
    assert tier.host.slab.dtype == torch.float8_e4m3fn
    first = run(engine, [A])
    push_out(engine)
    assert run(engine, [A]) == first and tier.hits["host"] == A_BLOCKS


def client_of(pool, transport: str) -> PoolClient:
    """A pool client fetching by Ray, or by the transfer engine (every fetch, the small
    ones too: cluster/kv_transfer.py)."""
    client = PoolClient(pool, transport={"transfer": "auto"}.get(transport, transport))
    if transport in ("transfer", "tcp"):
        need_transfer_engine(client)
        client.TRANSFER_MIN_BYTES = 0
        client.block_bytes = 48 + BLOCK_BYTES
        assert client.wait_connected()  # every store's transfer engine read from once
    return client


def need_transfer_engine(client: PoolClient) -> None:
    if client.transfer is None:
        why = kv_transfer.start("127.0.0.1")[1]
        skip_or_fail(f"{why}: `pip install -e .[transfer]`, libibverbs1 (.ci/run)")


TRANSPORTS = pytest.mark.parametrize("transport", ["ray", "transfer"])


@TRANSPORTS
def test_pool_restores_blocks_another_engine_spilled(model_dir, ref, pool, transport):
    filled_pool(model_dir, pool)
    client = client_of(pool, transport)
    reader = make(model_dir, client)  # no host tier: straight from the pool
    rid = f"r{next(_ids)}"
    reader.add_request(rid, A, G)
    while reader.has_work():
        for o in reader.step():
            if o.finish_reason:
                assert o.num_cached_tokens == A_BLOCKS * BS  # no prompt block computed
    tier = reader.blocks.tier
    assert tier.hits["pool"] == A_BLOCKS and tier.decisions["fetch"] == 1
    assert client.transfer_blocks == (A_BLOCKS if transport == "transfer" else 0)
    assert run(reader, FILLERS[:1]) == ref["fillers"][:1]  # never pooled: computed


def test_transport_tcp_keeps_the_transfer_engine_on_tcp(model_dir, ref, ray_cluster,
                                                          monkeypatch):
    """kv_pool.transport: tcp: stores and engines start their transfer engines forced onto
    TCP (MC_FORCE_TCP: TCP even on a host with RDMA devices), and fetches go by them."""
    monkeypatch.setenv("MC_FORCE_TCP", "1")  # this process's; put back after the test
    actors = start_pool(64 << 20, {"cpu-arch": "kunpeng"},
                        prefix=f"test-kv-tcp-{uuid.uuid4().hex[:6]}-", detached=False,
                        transport="tcp")
    try:
        client = client_of(actors, "tcp")
        assert client.transfer.protocol == "tcp"
        assert [s["transport"] for s in ray.get([a.stats.remote() for a in actors])] \
            == ["mooncake/tcp"] * 2
        filled_pool(model_dir, actors)
        reader = make(model_dir, client)
        assert run(reader, [A]) == [ref["A"]]
        assert reader.blocks.tier.hits["pool"] == A_BLOCKS == client.transfer_blocks
    finally:
        for a in actors:
            ray.kill(a)


def test_the_transfer_engine_runs_rdma_only_where_it_finds_a_device(tmp_path, monkeypatch):
    """What `protocol` says the transfer engine installs (its own discovery: ibverbs'
    device directory): TCP without a device, RDMA with one, TCP when forced either way."""
    monkeypatch.delenv("MC_FORCE_TCP", raising=False)
    assert kv_transfer.protocol(False, str(tmp_path / "absent")) == "tcp"
    assert kv_transfer.protocol(False, str(tmp_path)) == "tcp"  # empty
    (tmp_path / "mlx5_0").mkdir()
    assert kv_transfer.protocol(False, str(tmp_path)) == "rdma"
    assert kv_transfer.protocol(True, str(tmp_path)) == "tcp"
    monkeypatch.setenv("MC_FORCE_TCP", "")  # the transfer engine tests only that it is set
    assert kv_transfer.protocol(False, str(tmp_path)) == "tcp"


def pooled(actors, key: bytes, hashes: list[bytes]) -> int:
    """How many of these blocks the pool's stores hold."""
    keys = [key + h for h in hashes]
    return sum(b is not None for a in actors for b in ray.get(a.get.remote(keys)))


@pytest.mark.parametrize("host_tier", [True, False], ids=["host-tier", "pool-only"])
def test_write_through_puts_a_reused_prefix_in_the_pool_while_its_holder_caches_it(
        model_dir, ref, pool, host_tier):
    """kv_pool.write_through_hits 1: once a later prompt reused A's blocks from the device
    cache they are written to the pool, with A still cached here; another engine then
    fetches them. Write-back (None) sends nothing while the blocks stay cached."""
    host = {"kv_host_tier_bytes": 64 * BLOCK_BYTES} if host_tier else {}
    back_pool = PoolClient(pool)
    back = make(model_dir, back_pool, **host)
    assert run(back, [A]) == [ref["A"]] and run(back, [A]) == [ref["A"]]
    settle(back_pool)
    assert pooled(pool, back.blocks.tier.key, chain(A)) == 0  # write-back: nothing yet

    client = PoolClient(pool, write_through_hits=1)
    writer = make(model_dir, client, **host)
    tier = writer.blocks.tier
    assert run(writer, [A]) == [ref["A"]]
    writer.blocks.tier.flush()
    settle(client)
    assert tier.written_through == 0  # computed once, reused by nobody yet
    assert run(writer, [A]) == [ref["A"]]  # reuses every prompt block: written through
    tier.flush()
    settle(client)
    assert tier.written_through == A_BLOCKS
    assert set(chain(A)) <= writer.blocks.hash_to_block.keys()  # still cached here
    assert pooled(pool, tier.key, chain(A)) == A_BLOCKS
    sent, put = [], client.put
    client.put = lambda items: (sent.extend(items.keys if isinstance(items, Blocks)
                                            else (k for k, _ in items)), put(items))[1]
    push_out(writer)  # their eviction later sends them no second time
    tier.flush()
    assert sent and not {tier.key + h for h in chain(A)} & set(sent)
    reader = make(model_dir, PoolClient(pool))
    assert run(reader, [A]) == [ref["A"]]
    assert reader.blocks.tier.hits["pool"] == A_BLOCKS


def test_write_through_on_publish_sends_every_full_block(model_dir, ref, pool):
    """write_through_hits 0: every block goes to the pool once it is full."""
    client = PoolClient(pool, write_through_hits=0)
    writer = make(model_dir, client)
    assert run(writer, [A]) == [ref["A"]]
    tier = writer.blocks.tier
    tier.flush()
    settle(client)
    # A's prompt blocks, and its output's full blocks (150 + 8 tokens: none past A's 9)
    assert tier.written_through == (len(A) + G.max_tokens - 1) // BS
    assert pooled(pool, tier.key, chain(A)) == A_BLOCKS


def test_a_block_not_copied_is_not_counted_as_written_through(model_dir, ref, pool):
    """A write-through that finds no host slot it may take (each being restored from or
    sent) copies nothing, and says so: nothing is counted, nothing marked as sent."""
    client = PoolClient(pool, write_through_hits=0)
    writer = make(model_dir, client, kv_host_tier_bytes=64 * BLOCK_BYTES)
    tier = writer.blocks.tier
    tier.host.free.clear()  # no slot free, and none held that another could give up
    assert run(writer, [A]) == [ref["A"]]
    assert tier.written_through == 0 and tier.saved == 0 and not tier.through


@TRANSPORTS
def test_a_fetch_torn_midway_restores_what_came_and_computes_the_rest(model_dir, ref, pool,
                                                                       transport):
    filled_pool(model_dir, pool)
    client = client_of(pool, transport)
    ray.get([a.inject_fault.remote(1) for a in pool])  # each store: its 2nd block on, torn
    reader = make(model_dir, client, kv_host_tier_bytes=64 * BLOCK_BYTES)
    assert run(reader, [A]) == [ref["A"]]
    tier = reader.blocks.tier
    assert tier.torn == 1 and 1 <= tier.hits["pool"] < A_BLOCKS
    assert (client.transfer_blocks > 0) == (transport == "transfer")
    if transport == "transfer":  # a torn write's bytes may still land: never reused
        assert client._landing.quarantined and client.unsealed == 0


def test_a_fetch_due_within_a_step_is_waited_for_and_a_later_one_lets_the_others_step(
        model_dir, ref, pool):
    """A busy engine admits a request whose fetch should land before the others' next step
    would end, in this step, waiting for it (skipping the step would cost the request that
    whole step); one whose fetch is due later waits in the queue while the others step."""
    filled_pool(model_dir, pool)
    busy = [tokens(50, 40), tokens(51, 40)]  # new prompts (none pooled), one step's prefill
    busy_ref = run(make(model_dir, enable_prefix_caching=False), busy)
    reader = make(model_dir, PoolClient(pool), kv_host_tier_bytes=64 * BLOCK_BYTES)
    tier = reader.blocks.tier
    reader.add_request("busy", busy[0], G)
    first = reader.step()
    tier.step_s = 60.0  # steps far longer than any fetch: due within one
    reader.add_request("a", A, G)
    first += reader.step()
    assert [s.request_id for s in reader.scheduler.running] == ["busy", "a"]
    assert tier.hits["pool"] == A_BLOCKS
    assert drain(reader, ["busy", "a"], first) == [busy_ref[0], ref["A"]]

    client = PoolClient(pool)
    later = make(model_dir, client, kv_host_tier_bytes=64 * BLOCK_BYTES)
    tier = later.blocks.tier
    later.add_request("busy", busy[1], G)
    first = later.step()
    client.samples.clear()
    client.samples.append((0, 0.6))  # the link measured slow: a fetch is due in 0.6 s
    # and the engine slower still (computing A would take seconds): the rule fetches
    tier.spans.extend([(2 * BS, 1.0)] * SPEED_STEPS)
    tier.prefill_tok_s = 2 * BS / 1.0
    ray.get([a.inject_delay.remote(0.5) for a in pool])  # and lands in 0.5
    later.add_request("a", A, G)
    first += later.step()
    assert [s.request_id for s in later.scheduler.running] == ["busy"]  # "a" waits
    assert drain(later, ["busy", "a"], first) == [busy_ref[1], ref["A"]]
    assert tier.hits["pool"] == A_BLOCKS  # waited for, within the rule's bound


def test_the_rule_fetches_now_and_then_even_when_recomputing_looks_faster(model_dir, ref,
                                                                        pool):
    """A link measured slower than computing is asked again at least every PROBE_EVERY_S
    (else the rule would never see it get faster); between probes the rule recomputes."""
    filled_pool(model_dir, pool)
    client = PoolClient(pool)
    reader = make(model_dir, client, kv_host_tier_bytes=64 * BLOCK_BYTES)
    tier = reader.blocks.tier
    client.samples.append((0, 0.5))  # the link measured at 0.5 s a fetch
    tier.prefill_tok_s = 1e9  # and computing nearly free
    assert run(reader, [A]) == [ref["A"]]
    assert tier.decisions == {"fetch": 1, "recompute": 0}  # the probe: none made before
    tier.prefill_tok_s = 1e9
    assert run(reader, FILLERS[:1]) == ref["fillers"][:1]
    # within PROBE_EVERY_S of it: decided once, at arrival (at admission only blocks that
    # left while it queued are asked about: none here)
    assert tier.decisions == {"fetch": 1, "recompute": 1}
    tier.last_fetch_at -= PROBE_EVERY_S
    tier.prefill_tok_s = 1e9
    assert run(reader, FILLERS[1:2]) == ref["fillers"][1:2]
    assert tier.decisions["fetch"] == 2


def test_a_request_closed_before_admission_lets_go_of_its_fetch(model_dir, pool):
    """Aborted (or handed to another replica) while it queued: its fetch, and the blocks
    it holds in a landing buffer, go with it, not a minute later."""
    filled_pool(model_dir, pool)
    reader = make(model_dir, client_of(pool, "transfer"))
    tier = reader.blocks.tier
    reader.add_request("gone", A, G)
    assert "gone" in tier.fetches
    assert reader.abort("gone") and "gone" not in tier.fetches and not reader.has_work()


def slowed(engine: LLMEngine, per_token_s: float) -> list[tuple[int, float]]:
    """Makes every step of engine take per_token_s per token more (inside its launch, as a
    slow device would); returns the list the tier's step observations go to."""
    seen: list[tuple[int, float]] = []
    runner, tier = engine.runner, engine.blocks.tier
    launch, observe = runner.launch, tier.observe_step

    def slow_launch(batch, prev=None):
        time.sleep(batch.num_tokens * per_token_s)
        return launch(batch, prev)

    def record(n: int, seconds: float) -> None:
        seen.append((n, seconds))
        observe(n, seconds)

    runner.launch, tier.observe_step = slow_launch, record
    return seen


@pytest.mark.parametrize("overlap", [False, True], ids=["in-step", "launched-ahead"])
def test_the_prefill_speed_is_each_steps_tokens_over_that_steps_time(model_dir, overlap):
    """Prefill chunks between decode steps: the tier's speed credits each step's tokens with
    that step's own time, with steps read at once and launched ahead (the GPU's order of
    calls; a CPU launch computes, so its time is the launch's: the GPU's timing from the
    step before is tested on the GPU, tests/gpu/test_kv_tier_gpu.py). Decode steps do not
    count as prefill."""
    engine = make(model_dir, kv_host_tier_bytes=64 * BLOCK_BYTES, overlap_steps=overlap)
    seen = slowed(engine, 2e-3)  # a 64-token chunk: 128 ms more; a decode step: 2 ms
    engine.add_request("long", tokens(60, 20), SamplingParams(temperature=0.0, max_tokens=40,
                                                              ignore_eos=True))
    engine.step()
    engine.step()
    engine.add_request("a", A, G)  # its prefill chunks between the other's decode steps
    drain(engine, ["long", "a"])
    chunks = [(n, t) for n, t in seen if n >= 2 * BS]
    assert len(chunks) >= 2 and min(n for n, _ in seen) > 2  # no pure decode step counted
    for n, t in chunks:
        assert n * 2e-3 <= t < n * 2e-3 + 0.1, (n, t)
    speed = engine.blocks.tier.prefill_tok_s
    assert 0.3 / 2e-3 < speed <= 1 / 2e-3, speed


def test_spills_the_link_cannot_take_are_dropped_before_they_are_copied(model_dir, ref,
                                                                         pool):
    """With MAX_QUEUED batches waiting for a stalled link, the tier copies no more spills out
    (they are counted dropped, later misses); once the link moves again they flow."""
    import threading

    client = PoolClient(pool)
    engine = make(model_dir, client, kv_host_tier_bytes=64 * BLOCK_BYTES)
    tier = engine.blocks.tier
    stall, send = threading.Event(), client._send
    client._send = lambda items: (stall.wait(30), send(items))[1]
    copied, put = [], client.put
    client.put = lambda items: (copied.append(len(items)), put(items))[1]
    for i in range(client.MAX_QUEUED + 2):  # one batch of spills each, the link stalled
        run(engine, [tokens(70 + i, 60)])
        run(engine, [tokens(90 + i, 200)])  # pushes the other out: a spill each time
        tier.flush()
    assert not client.accepting() and client.dropped > 0
    assert len(copied) <= client.MAX_QUEUED + 1  # one in the sender's hands, the rest queued
    stall.set()
    settle(client)
    assert client.accepting()
    assert run(engine, [A]) == [ref["A"]]
    push_out(engine)
    tier.flush()
    settle(client)
    assert pooled(pool, tier.key, chain(A)) == A_BLOCKS  # and spills reach the pool again


def test_blocks_reach_a_store_of_an_older_release_through_put_and_get(ray_cluster):
    """Stores are detached and outlive an upgrade: one without put_blocks, touch,
    get_arrays and the transfer engine's calls (an older release's) still receives spilled
    blocks, through put (a block sent again is sent again: it cannot be asked about), and
    answers fetches through get; the views are released."""
    from cluster.kv_store import KVPoolStore

    old_cls = ray.remote(num_cpus=0)(type("OldStore", (KVPoolStore,), {
        "put_blocks": None, "touch": None, "get_arrays": None, "connect": None,
        "push": None}))
    store = old_cls.remote(1 << 20)
    client = PoolClient([store])
    keys = [bytes([i + 1]) * KEY_BYTES for i in range(3)]
    data = np.arange(3 * 64, dtype=np.uint8).reshape(3, 64)
    released = []
    client.put(Blocks(keys, list(data), lambda: released.append(1)))
    assert client.sent() and client.dropped == 0 and client.errors == 0 and released
    want = [k + bytes(r) for k, r in zip(keys, data, strict=True)]
    assert ray.get(store.get.remote(keys)) == want
    client.put(Blocks(keys, list(data), lambda: released.append(2)))
    assert client.sent() and released == [1, 2] and client.resends_skipped == 0
    assert client.errors == 0 and client.dropped == 0
    assert not client.wait_connected() and client.errors == 0  # no transfer engine there
    client.TRANSFER_MIN_BYTES = 0  # and fetches of any size ask get
    assert client.collect(client.get(keys), 5.0) == want  # bytes, from get
    ray.kill(store)


def test_a_landing_buffer_is_reused_only_once_its_store_wrote_and_nothing_reads_it(
        ray_cluster):
    """Stores write fetched blocks into the engine's registered buffers: a buffer whose
    blocks the engine still holds, or whose store has not answered yet (a fetch the engine
    stopped waiting for), is not handed to another fetch; once both are over it is."""
    from cluster.kv_store import KVPoolStore

    store = ray.remote(num_cpus=0)(KVPoolStore).remote(1 << 20, "landing", "auto")
    client = PoolClient([store], timeout_s=5.0)
    need_transfer_engine(client)
    assert client.wait_connected()
    client.TRANSFER_MIN_BYTES, client.block_bytes = 0, KEY_BYTES + 4096
    blobs = [bytes([c]) * KEY_BYTES + bytes([c + 1]) * 4096 for c in b"AB"]
    keys = [b[:KEY_BYTES] for b in blobs]
    ray.get(store.put.remote(list(zip(keys, blobs, strict=True))))

    got = client.collect(client.get(keys), 5.0)
    assert [bytes(g) for g in got] == blobs and client.transfer_blocks == 2
    held = id(got[0].base)  # (a reference would keep it taken)
    ray.get(store.inject_delay.remote(1.0))
    late = client.get(keys)
    assert client.collect(late, 0.05) == [None, None]  # given up on: the store still writes
    late_buffer = id(client._landing.buffers[-1])
    assert late_buffer != held
    del got  # the first buffer is free now; the late fetch's is not
    third = client.collect(client.get(keys), 5.0)
    assert id(third[0].base) == held and [bytes(g) for g in third] == blobs
    fourth = client.collect(client.get(keys), 5.0)  # both taken: a third buffer
    assert id(fourth[0].base) not in (held, late_buffer) and len(client._landing.buffers) == 3
    time.sleep(1.2)
    assert [bytes(g) for g in client.collect(late, 5.0)] == blobs  # it landed, whole
    assert client.transfer_blocks == 8 and client.errors == 0

    # a write the engine's transfer engine refuses (into memory it never registered): the
    # store answers None, the fetch is a miss, and fetches go by Ray until connected again
    take, stray = client._landing.take, np.zeros(1 << 20, np.uint8)
    client._landing.take = lambda n: stray
    assert client.collect(client.get(keys), 5.0) == [None, None] and client.errors == 1
    assert client.connected == [False] and client.transfer_blocks == 8
    client._landing.take = take
    client.down_until = [0.0]  # (the failure also skipped the store for DOWN_FOR_S)
    assert [bytes(g) for g in client.collect(client.get(keys), 5.0)] == blobs  # by Ray
    assert client.transfer_blocks == 8
    ray.kill(store)


def test_small_free_landing_buffers_make_room_for_a_larger_fetch():
    """Buffers kept from small fetches, all free, never keep a larger fetch from the
    transfer engine: the smallest go until it fits; taken ones stay."""
    transfer, why = kv_transfer.start("127.0.0.1")
    if transfer is None:
        skip_or_fail(f"{why}: `pip install -e .[transfer]`, libibverbs1 (.ci/run)")
    landing = kv_transfer.Landing(transfer)
    landing.KEEP_BYTES, landing.MIN_BYTES = 4 << 20, 1 << 20
    small = [landing.take(1 << 20) for _ in range(3)]
    assert all(b is not None for b in small) and len(landing.buffers) == 3
    taken = small[2]
    del small
    big = landing.take(2 << 20)  # 3 MiB kept + 2 > 4: the free ones make room
    assert big is not None and len(big) == 2 << 20
    assert any(b is taken for b in landing.buffers)  # still taken: kept
    assert sum(map(len, landing.buffers)) <= landing.KEEP_BYTES
    assert landing.take(2 << 20) is None  # both taken, no room: Ray's way


def test_a_pushed_block_is_read_only_once_its_seal_has_landed(model_dir, pool):
    """Over TCP the transfer engine counts a write done once it is in the sender's socket
    buffer, so a store's answer can come before the block's last bytes landed: a block is
    handed out only once the push's seal, sent after it in the same transfer, is there
    (waited for up to SEAL_WAIT_S); one whose seal never comes is a miss, and its buffer is
    never handed to another fetch."""
    import threading
    from concurrent.futures import Future

    client = client_of(pool, "transfer")
    bb = client.block_bytes
    stride = bb + kv_transfer.SEAL_BYTES
    seal = 12345

    def land(seal_after_s: float | None) -> tuple[list, np.ndarray]:
        buf = client._landing.take(2 * stride)
        buf[:] = 7
        answered: Future = Future()
        answered.set_result([bb, bb])  # the store says both went
        if seal_after_s is not None:  # the seals land a little after the answer
            def later():
                time.sleep(seal_after_s)
                for j in range(2):
                    buf[j * stride + bb: (j + 1) * stride] = np.frombuffer(
                        seal.to_bytes(kv_transfer.SEAL_BYTES, "little"), np.uint8)
            threading.Thread(target=later).start()
        out: Future = Future()
        client._landed(0, answered, buf, bb, seal, out)
        return out.result(), buf

    blocks, buf = land(0.01)
    assert [len(b) for b in blocks] == [bb, bb] and client.unsealed == 0
    assert all(b.base is buf for b in blocks)
    del blocks, buf
    blocks, buf = land(None)  # never sealed
    assert blocks == [None, None] and client.unsealed == 2
    assert not any(b is buf for b in client._landing.buffers)  # not reused,
    assert any(b is buf for _, b in client._landing.quarantined)  # and kept a while
    # an engine's tier reports them (its faults series, kind "unsealed")
    assert make(model_dir, client).blocks.tier.stats()["unsealed"] == 2


def test_a_spill_a_store_cannot_be_asked_to_take_drops_only_its_share(pool):
    """A store whose call cannot even be made (its handle broken) drops its share of a
    batch of spills and is marked failed; the other store's share is stored, and nothing
    is counted twice."""
    from types import SimpleNamespace

    def refuse(*_):
        raise RuntimeError("no connection to the store")

    broken = SimpleNamespace(put_blocks=SimpleNamespace(remote=refuse))
    client = PoolClient([pool[0], broken])
    keys = [bytes(16) + bytes([i]) * 4 + bytes(28) for i in range(8)]  # shards 0, 1, 0, ...
    on_broken = sum(client._shard(k) == 1 for k in keys)
    assert 0 < on_broken < len(keys)
    released = []
    data = [np.full(64, i, np.uint8) for i in range(8)]
    client.put(Blocks(keys, data, lambda: released.append(1)))
    assert client.sent() and released == [1]
    assert client.dropped == on_broken and client.errors == 1
    held = ray.get(pool[0].get.remote([k for k in keys if client._shard(k) == 0]))
    assert all(b is not None for b in held)


def test_a_block_sent_again_is_sent_only_if_its_store_lost_it(ray_cluster):
    """A spill of a key sent (or fetched) lately is first asked about: the store keeps it
    (and makes it most recent) without its bytes crossing again; one the store no longer
    holds is sent."""
    from cluster.kv_store import KVPoolStore

    store = ray.remote(num_cpus=0)(KVPoolStore).remote(1 << 20)
    client = PoolClient([store])
    keys = [bytes([i + 1]) * KEY_BYTES for i in range(4)]
    data = np.arange(4 * 64, dtype=np.uint8).reshape(4, 64)
    client.put(Blocks(keys, list(data)))
    assert client.sent() and ray.get(store.stats.remote())["puts"] == 4
    ray.get(store.put.remote([(b"\xff" * KEY_BYTES, b"x")]))  # newer than all four
    client.put(Blocks(keys, list(data)))
    assert client.sent() and client.resends_skipped == 4
    assert ray.get(store.stats.remote())["puts"] == 5  # no bytes sent again
    assert list(ray.get(store.__ray_call__.remote(lambda s: list(s.blocks)))) == \
        [b"\xff" * KEY_BYTES, *keys]  # and they became the most recent
    ray.get(store.__ray_call__.remote(lambda s: s.blocks.pop(keys[2])))  # lost there
    client.put(Blocks(keys, list(data)))
    assert client.sent() and client.resends_skipped == 7 and client.dropped == 0
    assert ray.get(store.get.remote([keys[2]])) == [keys[2] + bytes(data[2])]
    ray.kill(store)


def test_a_slot_waiting_to_be_sent_is_not_reused_until_ray_has_copied_it(model_dir, ref,
                                                                          pool):
    """Spills leave as views of their slots in the host slab (no copy on the engine's
    thread): while the sender holds them, tier 1 reuses other slots, and what reaches the
    pool is what those slots held when spilled."""
    import threading

    client = PoolClient(pool)
    engine = make(model_dir, client, kv_host_tier_bytes=32 * BLOCK_BYTES)
    tier = engine.blocks.tier
    stall, send = threading.Event(), client._send
    client._send = lambda items: (stall.wait(30), send(items))[1]
    assert run(engine, [A]) == [ref["A"]]
    push_out(engine)  # A's blocks and the fillers' go through the 32 slots, the link stalled
    tier.flush()
    held = {h: s for h, s in tier.host.slots.items() if s in tier.host.sending}
    assert held and len(held) < tier.host.capacity
    before = {h: tier.host.slab[s].clone() for h, s in held.items()}
    evicted = tier.host.evicted
    run(engine, [tokens(60 + i) for i in range(4)])  # more spills: they take other slots
    tier.flush()
    assert tier.host.evicted > evicted
    assert all(tier.host.slots.get(h) == s for h, s in held.items())
    assert all(torch.equal(tier.host.slab[s], before[h]) for h, s in held.items())
    stall.set()
    settle(client)
    assert not tier.host.sending  # every batch released, the dropped ones too
    keys = [tier.key + h for h in held]
    got = [b for a in pool for b in ray.get(a.get.remote(keys)) if b is not None]
    assert len(got) == len(held)
    want = {tier.key + h: tier.key + h + before[h].numpy().tobytes() for h in held}
    assert all(want[b[:KEY_BYTES]] == b for b in got)


def test_the_stores_answer_inline(pool):
    """start_pool's stores return blocks in the call's reply (kv_store.INLINE_ENV: through
    the object stores a fetch took twice as long, `python -m cluster.bench.kv_link`)."""
    for a in pool:
        env = ray.get(a.__ray_call__.remote(lambda self: dict(os.environ)))
        assert INLINE_ENV.items() <= env.items()


def test_the_link_fit_ignores_a_stalled_fetch_and_reads_empty_answers_as_latency():
    """The fetch rule's model of the link: 2 ms + 1 ms per MB, from fetches with noise."""
    rng = random.Random(0)
    fetches = [(b, 0.002 + b / 1e9 + rng.uniform(0, 2e-4))
               for b in (0, 0, 300_000, 700_000, 1_000_000, 1_500_000, 2_000_000) * 3]
    lat, bw = fit_link(fetches)
    assert 0.0018 < lat < 0.0024 and 0.85e9 < bw < 1.15e9
    # one fetch stuck 0.3 s behind a store's puts: a line through it would make a 10-block
    # fetch look slower than computing the blocks; it is left out
    lat, bw = fit_link(fetches + [(1_500_000, 0.3)])
    assert 0.0018 < lat < 0.0024 and 0.85e9 < bw < 1.15e9
    # only empty answers (every block missed) so far: latency, bandwidth not measured yet
    assert fit_link([(0, 0.002), (0, 0.003)]) == (0.0025, None)
    # one size seen besides empty answers: latency from those, the rest is bandwidth
    assert fit_link([(0, 0.002), (1_000_000, 0.003), (1_000_000, 0.003)]) == pytest.approx(
        (0.002, 1e9))
    # no rise with size (jitter): the bytes cost nothing seen, not a link of a few MB/s
    lat, bw = fit_link([(0, 0.004), (1_000_000, 0.003), (0, 0.002)])
    assert lat == pytest.approx(0.003) and bw >= 1e9
    assert fit_link([]) == (0.0, None)


def test_a_fetch_collected_late_still_measures_the_link(model_dir, pool):
    """The fetch rule learns the link from fetches as they land, also from one the engine
    stopped waiting for: timed only when collected in time, a link slower than the wait
    allowed would never be measured again, and every later fetch would be given up."""
    writer_pool = filled_pool(model_dir, pool)
    key = make(model_dir, writer_pool, kv_host_tier_bytes=64 * BLOCK_BYTES).blocks.tier.key
    client = PoolClient(pool)
    ray.get([a.inject_delay.remote(0.3) for a in pool])
    fetch = client.get([key + h for h in chain(A)])
    assert client.collect(fetch, 0.0) == [None] * A_BLOCKS  # not waited for: all misses
    deadline = time.monotonic() + 10
    while not client.samples:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    size, seconds = client.samples[-1]
    assert size == A_BLOCKS * (48 + BLOCK_BYTES) and seconds >= 0.3


@TRANSPORTS
def test_a_pool_store_killed_mid_run_loses_no_request(model_dir, ref, pool, transport):
    filled_pool(model_dir, pool)
    reader_pool = client_of(pool, transport)
    reader = make(model_dir, reader_pool, kv_host_tier_bytes=64 * BLOCK_BYTES)
    reader.add_request("a", A, G)
    first = reader.step()  # A admitted with what the pool sent
    assert reader.blocks.tier.hits["pool"] == A_BLOCKS
    reader.blocks.tier.prefill_tok_s = 1.0  # as on a slow engine: the rule fetches
    reader.add_request("f0", FILLERS[0], G)
    ray.kill(pool[0], no_restart=True)
    reader.add_request("f1", FILLERS[1], G)  # its fetch from the dead store fails
    assert drain(reader, ["a", "f0", "f1"], first) == [ref["A"], *ref["fillers"][:2]]
    assert reader_pool.errors >= 1  # the loss was seen, and was a miss
    assert run(reader, FILLERS[2:3]) == ref["fillers"][2:3]  # and later requests still run


def test_host_tier_and_pool_stores_stay_within_their_bounds(model_dir, ray_cluster):
    engine = make(model_dir, kv_host_tier_bytes=5 * BLOCK_BYTES + 100)
    run(engine, [A])
    push_out(engine)
    tier = engine.blocks.tier
    assert tier.saved > 5 and tier.host.evicted > 0
    assert len(tier.host.slots) == 5 and tier.stats()["host_bytes"] <= 5 * BLOCK_BYTES + 100
    store = PoolActor.options(num_cpus=0).remote(10 * 1000)
    try:
        blob = bytes(1000)
        for i in range(30):
            ray.get(store.put.remote([(b"k%d" % i, blob)]))
            if i >= 1:
                assert ray.get(store.get.remote([b"k0"]))[0] is not None  # kept: in use
            s = ray.get(store.stats.remote())
            assert s["bytes"] <= 10 * 1000 and s["blocks"] <= 10
        s = ray.get(store.stats.remote())
        assert s["blocks"] == 10 and s["evicted"] == 20
        # k0, read after every put, and the nine newest stay
        got = ray.get(store.get.remote([b"k0", b"k1", b"k20", b"k21", b"k29"]))
        assert [g is not None for g in got] == [True, False, False, True, True]
        assert ray.get(store.put.remote([(b"big", bytes(10 * 1000 + 1))])) == 0  # refused
    finally:
        ray.kill(store)


def test_tenants_with_different_salts_never_share_a_block(model_dir, ref, pool):
    client = PoolClient(pool)
    engine = make(model_dir, client, kv_host_tier_bytes=64 * BLOCK_BYTES)
    tier = engine.blocks.tier
    assert run(engine, [A], salt="tenant-1") == [ref["A"]]
    push_out(engine, salt="tenant-1")
    settle(client)
    before = (engine.blocks.prefix_hits, tier.hits["host"], tier.hits["pool"])
    assert run(engine, [A], salt="tenant-2") == [ref["A"]]  # computed, not shared
    assert (engine.blocks.prefix_hits, tier.hits["host"], tier.hits["pool"]) == before
    keys = [tier.key + h for h in chain(A, "tenant-2")]
    assert all(b is None for a in pool for b in ray.get(a.get.remote(keys)))
    push_out(engine, salt="tenant-1")
    host_hits = tier.hits["host"]
    assert run(engine, [A], salt="tenant-1") == [ref["A"]]  # its own tenant's blocks: hits
    assert tier.hits["host"] == host_hits + A_BLOCKS


def test_engine_cores_share_blocks_through_the_pool(model_dir, ref, ray_cluster):
    """The served path: each engine core (its own process) joins the cluster and finds the
    store actors by name; a second core gets the first one's blocks."""
    from cluster.engine.core_process import CoreProcess
    from tests.test_engine_core import Frontend

    engine = EngineConfig(max_model_len=256, num_kv_blocks=24, block_size=BS,
                          max_num_batched_tokens=64, torch_threads=1, dtype="float32",
                          device="cpu", cpu_attention_kernel=False,
                          kv_host_tier_bytes=64 * BLOCK_BYTES)
    cfg = AppConfig(model=ModelConfig(path=str(model_dir)), engine=engine,
                    kv_pool=KVPoolConfig(capacity_bytes=64 << 20))
    cores = []
    try:
        for prompts in ([A, *FILLERS], [A]):
            core = CoreProcess(cfg, "127.0.0.1")
            cores.append(core)
            fe = Frontend(core.addr)
            for p in prompts:  # one at a time: A's blocks leave the first core's cache
                rid = f"r{next(_ids)}"
                fe.add(rid, p, max_tokens=G.max_tokens)
                toks, reason = fe.collect([rid])[rid]
                assert reason == "length"
                expected = ref["A"] if p is A else ref["fillers"][FILLERS.index(p)]
                assert toks == expected
            fe.close()
        deadline = time.monotonic() + 10
        while (cores[1].stats.get("kv_tier") or {}).get("pool_hits", 0) < A_BLOCKS:
            assert time.monotonic() < deadline, cores[1].stats.get("kv_tier")
            time.sleep(0.2)
        # a core's report names the model key of its pool blocks: the routers' index of
        # the pool (cluster/kv_index.py) has the prompt's digests under it
        from cluster.kv_index import PoolIndex

        index = PoolIndex()
        asyncio.run(index.refresh())
        key = cores[0].stats["kv_key"]
        assert key and set(prompt_digests(A, BS)[:A_BLOCKS]) <= index.held(key)
    finally:
        for core in cores:
            core.stop()
        for name in ray.util.list_named_actors(all_namespaces=True):
            if name["name"].startswith(NAME_PREFIX) and name["namespace"] == POOL_NAMESPACE:
                ray.kill(ray.get_actor(name["name"], namespace=POOL_NAMESPACE))
