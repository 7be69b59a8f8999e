"""Two replicas sharing the KV pool, the load-aware router choosing between them: what the
cluster index (cluster/kv_index.py) changes.

    python -m cluster.bench.kv_tier --replicas 2 [--quick] [--json]

The served path less Serve's machinery: each replica is a real engine core process
(cluster/engine/core_process.py, as a model replica starts it; it joins this Ray cluster
and starts or finds the pool's store by name, as served), and the router is
cluster.router.LoadAwareRouter on an event loop of its own thread (as in a frontend's
handle), given each replica's report (load, prefix digests, the model key of its pool
blocks) once a stats period and this process's own counts in flight. Two runs on kv_tier's
multi-turn workload, both with the host tier and the pool (fresh stores each): `prefix_aware`
counting local caches only (`router.pool_block_weight: 0`, as before the index), and
counting the pool's blocks through the index (the default weight).
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import msgpack
import zmq
from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID

from cluster import load

DEP = DeploymentID(name="ModelReplica", app_name="kv-routing")
STATS_PERIOD_S = 0.5  # how often the router gets new reports (Serve's routing stats period)


def write_checkpoint(model_dir: str) -> None:
    """Seeded random weights for the bench's config: a core loads a checkpoint."""
    import json

    from safetensors.torch import save_file

    from cluster.model_init import random_weights

    d = Path(model_dir)
    if not (d / "model.safetensors").exists():
        cfg = json.loads((d / "config.json").read_text())
        save_file(random_weights(cfg), str(d / "model.safetensors"), metadata={"format": "pt"})


def kill_stores() -> None:
    """The pool's stores of the last run (the cores start them detached, by name)."""
    import ray

    from cluster.kv_store import NAME_PREFIX, POOL_NAMESPACE

    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["namespace"] == POOL_NAMESPACE and a["name"].startswith(NAME_PREFIX):
            ray.kill(ray.get_actor(a["name"], namespace=POOL_NAMESPACE))


class Replicas:
    """The engine cores, a DEALER socket to each, and what the router reads of them."""

    def __init__(self, args, model_dir: str, host_bytes: int):
        import ray

        from cluster.config import AppConfig, EngineConfig, KVPoolConfig, ModelConfig
        from cluster.engine.core_process import CoreProcess

        engine = EngineConfig(device="cpu", dtype="float32", block_size=args.block_size,
                              num_kv_blocks=args.kv_blocks, max_model_len=args.max_len,
                              max_num_seqs=args.concurrency,
                              max_num_batched_tokens=args.batched_tokens,
                              torch_threads=args.threads, kv_host_tier_bytes=host_bytes)
        pool = KVPoolConfig(label_selector={}, capacity_bytes=args.pool_bytes,
                            write_through_hits=args.write_through_hits)
        cfg = AppConfig(model=ModelConfig(path=model_dir), engine=engine, kv_pool=pool)
        self.cores = [CoreProcess(cfg, "127.0.0.1") for _ in range(args.replicas)]
        self.socks = []
        for core in self.cores:
            s = zmq.Context.instance().socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(core.addr)
            self.socks.append(s)
        self.views = [SimpleNamespace(replica_id=ReplicaID(f"r{i}", DEP), routing_stats={},
                                      actor_id=ray.ActorID.from_random())
                      for i in range(len(self.cores))]
        self.reported_at = 0.0

    def report(self) -> None:
        """Each replica's routing stats as its record_routing_stats gives them (a new dict:
        the router sees a new report)."""
        for core, view in zip(self.cores, self.views, strict=True):
            s = core.stats
            view.routing_stats = {**{k: s[k] for k in load.REPORT_KEYS if k in s},
                                  "prefix": s.get("prefix", []), "kv_key": s.get("kv_key", "")}
        self.reported_at = time.monotonic()

    def stop(self) -> None:
        for s in self.socks:
            s.close(0)
        for core in self.cores:
            core.stop()


def routed(args, model_dir: str, system, users, host_bytes: int, weight: float,
           reference=None) -> dict:
    from cluster.bench.kv_tier import Chat
    from cluster.router import LoadAwareRouter

    reps = Replicas(args, model_dir, host_bytes)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, name="router-loop", daemon=True).start()
    router = LoadAwareRouter(DEP, DeploymentHandleSource.UNKNOWN)
    router.initialize_state(policy="prefix_aware", block_size=args.block_size,
                            prefix_margin=args.prefix_margin, pool_block_weight=weight,
                            pool_index={"period_s": STATS_PERIOD_S} if weight else None)
    params = {"temperature": 0.0, "max_tokens": args.output_len, "ignore_eos": True}
    poller = zmq.Poller()
    for s in reps.socks:
        poller.register(s, zmq.POLLIN)
    chat = Chat(system, users, args.block_size, args.seed, reference)
    where: dict[str, int] = {}  # request id -> its replica
    effects, per_replica = {"changed": 0, "same": 0}, [0] * len(reps.cores)
    try:
        while any(not c.stats for c in reps.cores):  # the first reports
            time.sleep(0.05)
        reps.report()
        t0 = time.perf_counter()
        while chat.ready or chat.active:
            if time.monotonic() - reps.reported_at >= STATS_PERIOD_S:
                reps.report()
            while chat.ready and len(chat.active) < args.in_flight:
                rid, prompt = chat.send()
                req = SimpleNamespace(prompt_token_ids=prompt, cache_salt="")
                ranks = asyncio.run_coroutine_threadsafe(router.choose_replicas(
                    reps.views, SimpleNamespace(args=[req])), loop).result()
                i = where[rid] = reps.views.index(ranks[0][0])
                if router.policy.pool_effect:
                    effects[router.policy.pool_effect] += 1
                per_replica[i] += 1
                uid = reps.views[i].replica_id.unique_id
                load.IN_FLIGHT[uid] = load.IN_FLIGHT.get(uid, 0) + 1
                reps.socks[i].send(msgpack.packb(["add", rid, prompt, params, 0.0, False, ""],
                                                 use_bin_type=True))
            for sock, _ in poller.poll(5):
                msg = msgpack.unpackb(sock.recv(), raw=False)
                if msg[0] != "out":
                    continue
                now = time.perf_counter()
                for rid, ids, reason, err, _, n_cached, *_ in msg[1]:
                    chat.tokens(rid, ids, now)
                    if reason is not None:
                        load.IN_FLIGHT[reps.views[where[rid]].replica_id.unique_id] -= 1
                        chat.finish(rid, n_cached, bool(err) or reason not in ("length", "stop"))
        wall = time.perf_counter() - t0
        time.sleep(1.0)  # the cores' last reports (twice a second)
        tiers = [c.stats.get("kv_tier") or {} for c in reps.cores]
    finally:
        if router.index is not None:
            asyncio.run_coroutine_threadsafe(router.index.stop(), loop).result(timeout=5)
        loop.call_soon_threadsafe(loop.stop)
        reps.stop()
        load.IN_FLIGHT.clear()
        kill_stores()
    return {
        **chat.result(wall),
        "requests_per_replica": per_replica,
        "pool_decisions": effects,
        "host_hit_blocks": sum(t.get("host_hits", 0) for t in tiers),
        "pool_hit_blocks": sum(t.get("pool_hits", 0) for t in tiers),
        "fetch_decisions": sum(t.get("fetch_decisions", 0) for t in tiers),
        "recompute_decisions": sum(t.get("recompute_decisions", 0) for t in tiers),
        "_outputs": chat.outputs,
    }


def compare(args, model_dir: str, system, users, host_bytes: int) -> dict:
    """The two runs: the router blind to the pool, then counting it."""
    write_checkpoint(model_dir)
    blind = routed(args, model_dir, system, users, host_bytes, 0.0)
    indexed = routed(args, model_dir, system, users, host_bytes, args.pool_block_weight,
                     blind["_outputs"])
    return {"router_local_caches": blind, "router_with_pool_index": indexed}
