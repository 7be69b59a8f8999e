"""Replica choice for Serve handles to the model deployment: every policy in one place.

This is a Serve custom request router: it runs inside every caller's handle (the tokenizer
replicas), so routing adds no network hop, and Serve keeps the replica set and health. Each
model replica reports its engine load and a summary of its prefix cache through
`record_routing_stats` once per period; between reports the handle's own count of requests
in flight per replica keeps a burst from piling onto the replica that looked idlest.

Every policy ranks the same candidates; replicas that are hot (KV cache or queue above a
threshold) get no new work while a cool one exists, and replicas whose report is stale rank
last (a replica that stopped reporting is as good as gone). A report's age is judged by this
router's own clock, from when it first saw that report: the replica's host clock may be
skewed against this one.
"""

from __future__ import annotations

import itertools
import random
import time

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from cluster import load
from cluster.kv_index import PoolIndex
from cluster.load import ReplicaLoad
from cluster.prefix_hash import prompt_digests

# Serve pickles this module by value into every handle (RequestRouterConfig), globals and
# all: process-wide state (streams in flight, the routers of this process) lives in
# cluster.load, which travels by reference, so that the frontend and the router share it.


class Policy:
    name = ""

    def rank(self, loads: list[ReplicaLoad], hashes: list[int]) -> list[int]:
        raise NotImplementedError


class RoundRobin(Policy):
    name = "round_robin"

    def __init__(self):
        self.counter = itertools.count()

    def rank(self, loads, hashes):
        k = next(self.counter) % len(loads)
        return list(range(k, len(loads))) + list(range(k))


class PowerOfTwo(Policy):
    """Two random replicas, the shorter queue first (then everyone else)."""

    name = "power_of_two"

    def rank(self, loads, hashes):
        order = random.sample(range(len(loads)), len(loads))
        a, b = order[:2] if len(order) > 1 else (order[0], order[0])
        qa = loads[a].running + loads[a].waiting + loads[a].in_flight
        qb = loads[b].running + loads[b].waiting + loads[b].in_flight
        first = [a, b] if qa <= qb else [b, a]
        return list(dict.fromkeys(first + order))


class LeastLoad(Policy):
    """The shortest expected wait where every replica reports its decode pace (uneven
    replicas: the faster one takes more), else the lowest load score."""

    name = "least_load"

    def rank(self, loads, hashes):
        return self.order(self.costs(loads))

    @staticmethod
    def order(cost: list[float]) -> list[int]:
        """Cheapest first, ties in random order."""
        return sorted(range(len(cost)), key=lambda i: (cost[i], random.random()))

    @staticmethod
    def costs(loads: list[ReplicaLoad]) -> list[float]:
        """Each replica's load in batches of work ahead of a new request, at the fastest
        replica's pace where every one reports its decode step time (a replica at half
        speed counts its queue twice), else its load score.

        An idle replica whose pace line is old (`ReplicaLoad.pace_unproven`) counts at the
        best pace of the others: its line is a guess from its last batches, and a guess
        that made it look slower would never be corrected, since no request would go there
        to run a step (one such guess sent 149 of 150 requests to one of two equal
        replicas). A replica that is slow in fact gets one request, and its line again."""
        if not loads or not all(ld.pace_s > 0 for ld in loads):
            return [ld.score() for ld in loads]
        paces = [ld.pace_s for ld in loads]
        proven = [p for ld, p in zip(loads, paces, strict=True) if not ld.pace_unproven()]
        best = min(proven or paces)
        paces = [min(p, best) if ld.pace_unproven() else p
                 for ld, p in zip(loads, paces, strict=True)]
        return [ld.wait_s(p) / best for ld, p in zip(loads, paces, strict=True)]


class PrefixAware(Policy):
    """The replica whose cached prefix saves the most prefill, unless its load (as
    least_load weighs it: at the fastest replica's pace where step times are known) exceeds
    the least loaded replica's by more than `margin` times the share of that saving the
    least loaded one would not get too; then least load. (Where the least loaded replica holds
    none of the prompt, that share is 1: the plain margin.)

    Blocks the cluster KV pool holds (cluster/kv_index.py) count for every replica of the
    model, each `pool_weight` of a block in the replica's own cache: a replica fetches
    them, where its own are free, and the fetch moves the block's bytes over the network
    (over 25 Gbps about as slow as a GPU recomputes them: the engine may then recompute),
    while the index is up to a stats period old (the store may have evicted the block). So
    a prompt whose prefix sits in the pool gives its holder a smaller lead: load decides
    sooner, and the replica chosen fetches the prefix."""

    name = "prefix_aware"

    def __init__(self, margin: float, pool_weight: float = 0.5):
        self.margin, self.pool_weight = margin, pool_weight
        # what the pool did to the last ranking: "" (held none of the prompt's blocks that a
        # replica lacks), "same" (the pick local caches alone give) or "changed"
        self.pool_effect = ""

    def rank(self, loads, hashes):
        cost = LeastLoad.costs(loads)
        by_load = LeastLoad.order(cost)
        self.pool_effect = ""
        if not hashes:
            return by_load
        runs = [ld.cached_blocks(hashes) for ld in loads]
        if not self.pool_weight or not any(ld.pool for ld in loads):
            return self._ranked(by_load, self._pick(cost, by_load, runs))
        blocks = [ld.prefix_blocks(hashes, r) for ld, r in zip(loads, runs, strict=True)]
        first = self._pick(cost, by_load, [lo + self.pool_weight * po for lo, po in blocks])
        if any(po for _, po in blocks):
            blind = self._pick(cost, by_load, runs)
            self.pool_effect = "changed" if blind != first else "same"
        return self._ranked(by_load, first)

    @staticmethod
    def _ranked(by_load: list[int], first: int) -> list[int]:
        return [first] + [i for i in by_load if i != first]

    def _pick(self, cost: list[float], by_load: list[int], saved: list[float]) -> int:
        """cost: LeastLoad.costs of the replicas, so that a slow holder of the prefix is
        as much busier as its queue takes longer to clear."""
        best, least = max(by_load, key=lambda i: saved[i]), by_load[0]  # ties: less loaded
        lead = saved[best] - saved[least]
        if lead <= 0 or cost[best] - cost[least] > self.margin * lead / saved[best]:
            return least
        return best


def make_policy(name: str, margin: float, pool_weight: float = 0.5) -> Policy:
    policies = {"round_robin": RoundRobin, "power_of_two": PowerOfTwo, "least_load": LeastLoad}
    return PrefixAware(margin, pool_weight) if name == "prefix_aware" else policies[name]()


def order_replicas(policy: Policy, loads: list[ReplicaLoad], hashes: list[int],
                   kv_hot: float, score_hot: float, stale_s: float) -> tuple[list[int], bool]:
    """The policy's ranking with hot replicas after cool ones and stale ones last.
    Returns (order, whether hot replicas were passed over)."""
    fresh = [i for i, ld in enumerate(loads) if ld.age_s <= stale_s]
    stale = [i for i in range(len(loads)) if i not in fresh]
    hot = {i for i in fresh if loads[i].is_hot(kv_hot, score_hot)}
    cool = [i for i in fresh if i not in hot]
    pool = cool or fresh or stale
    ranked = policy.rank([loads[i] for i in pool], hashes)
    order = [pool[i] for i in ranked]
    rest = [i for i in fresh if i not in order] + [i for i in stale if i not in order]
    return order + rest, bool(cool and hot)


def _ids(r: RunningReplica) -> set[str]:
    """The names a caller may know a replica by: its Serve replica id or its actor id (what
    a Ray actor error carries)."""
    return {r.replica_id.unique_id, r.actor_id.hex()}


class LoadAwareRouter(FIFOMixin, RequestRouter):
    def initialize_state(self, policy: str = "prefix_aware", block_size: int = 16,
                         prefix_margin: float = 1.0, kv_hot: float = 0.95,
                         score_hot: float = 4.0, stale_after_s: float = 5.0,
                         deployment: str = "", pool_block_weight: float = 0.5,
                         pool_index: dict | None = None, **_):
        """pool_index: PoolIndex's arguments where the cluster KV pool is on (None: off)."""
        self.policy = make_policy(policy, prefix_margin, pool_block_weight)
        # the pool's contents count only for prefix_aware, and a weight of 0 ignores them
        self.index = PoolIndex.shared(**pool_index) if pool_index and pool_block_weight \
            and policy == "prefix_aware" else None
        self.block_size = block_size
        self.kv_hot, self.score_hot, self.stale_s = kv_hot, score_hot, stale_after_s
        # replica id -> (the report last seen, when first seen by our clock, its prefix set)
        self._reports: dict = {}
        self.metrics = None
        if deployment:
            load.ROUTERS[deployment] = self

    def fresh_loads(self) -> list[ReplicaLoad]:
        now = time.monotonic()
        loads = [self.load_of(r, now) for r in self.curr_replicas.values()]
        return [ld for ld in loads if ld.age_s <= self.stale_s]

    def _report(self, r: RunningReplica, now: float) -> tuple[dict, float, frozenset]:
        stats = r.routing_stats or {}
        seen = self._reports.get(r.replica_id)
        if seen is None or seen[0] is not stats:  # a new report (each one is a new dict)
            seen = (stats, now, frozenset(stats.get("prefix", ())))
            self._reports[r.replica_id] = seen
        return seen

    def _forget_gone(self, candidates: list[RunningReplica]) -> None:
        """Drops what we keep of replicas that left (autoscaling churn, restarts)."""
        if len(self._reports) > len(candidates):
            live = {r.replica_id for r in candidates}
            self._reports = {k: v for k, v in self._reports.items() if k in live}

    def load_of(self, r: RunningReplica, now: float) -> ReplicaLoad:
        stats, first_seen, prefix = self._report(r, now)
        # a replica with no report yet is not stale: it has only just started
        age = now - first_seen if stats else 0.0
        queued = max(self.replica_queue_len_cache.get(r.replica_id) or 0,
                     load.IN_FLIGHT.get(r.replica_id.unique_id, 0))
        pool = self.index.held(stats.get("kv_key", "")) if self.index and stats else frozenset()
        return ReplicaLoad.of(stats, queued, prefix, age, pool)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None
                              ) -> list[list[RunningReplica]]:
        now = time.monotonic()
        if self.index is not None:
            self.index.start()  # its refresh loop, on this (the router's) event loop
        self._forget_gone(candidate_replicas)
        loads = [self.load_of(r, now) for r in candidate_replicas]
        req = pending_request.args[0] if pending_request and pending_request.args else None
        hashes = []
        if self.policy.name == "prefix_aware" and getattr(req, "prompt_token_ids", None):
            hashes = prompt_digests(req.prompt_token_ids, self.block_size,
                                    getattr(req, "cache_salt", ""))
        order, rebalanced = order_replicas(self.policy, loads, hashes, self.kv_hot,
                                           self.score_hot, self.stale_s)
        avoid = set(getattr(req, "avoid", ()))
        if avoid and len(order) > 1:  # handed back or failed by those: anywhere else first
            away = [i for i in order if not avoid & _ids(candidate_replicas[i])]
            order = away + [i for i in order if i not in away]
        self._record(candidate_replicas[order[0]], loads[order[0]], rebalanced,
                     getattr(self.policy, "pool_effect", ""))
        return [[candidate_replicas[i]] for i in order]

    def _record(self, replica: RunningReplica, load: ReplicaLoad, rebalanced: bool,
                pool_effect: str = "") -> None:
        from ray.util import metrics

        if self.metrics is None:
            self.metrics = (
                metrics.Counter("tandem_router_decisions", "Routing decisions",
                                tag_keys=("policy", "replica")),
                metrics.Counter("tandem_router_reroutes",
                                "Decisions that passed over a hot replica", tag_keys=("policy",)),
                metrics.Gauge("tandem_router_load_score", "Load score of the chosen replica",
                              tag_keys=("replica",)),
                metrics.Counter("tandem_router_pool_decisions",
                                "Decisions where the KV pool held blocks of the prompt that a "
                                "replica lacks; effect: changed (another pick than local "
                                "caches alone give) or same", tag_keys=("policy", "effect")))
        decisions, reroutes, score, pooled = self.metrics
        rid = replica.replica_id.unique_id
        decisions.inc(tags={"policy": self.policy.name, "replica": rid})
        score.set(load.score(), tags={"replica": rid})
        if rebalanced:
            reroutes.inc(tags={"policy": self.policy.name})
        if pool_effect:
            pooled.inc(tags={"policy": self.policy.name, "effect": pool_effect})
