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
    """The shortest expected wait where every replica reports its step time (uneven
    replicas: the faster one takes more), else the lowest load score."""

    name = "least_load"

    def rank(self, loads, hashes):
        timed = all(ld.step_s > 0 for ld in loads)
        return sorted(range(len(loads)), key=lambda i: (
            loads[i].wait_s() if timed else loads[i].score(), random.random()))


class PrefixAware(Policy):
    """The replica holding the longest cached prefix, unless its load exceeds the least
    loaded replica's by more than `margin`; then least load."""

    name = "prefix_aware"

    def __init__(self, margin: float):
        self.margin = margin

    def rank(self, loads, hashes):
        by_load = LeastLoad().rank(loads, hashes)
        if not hashes:
            return by_load
        hits = [ld.cached_blocks(hashes) for ld in loads]
        best = max(by_load, key=lambda i: hits[i])  # ties: the less loaded one
        if hits[best] == 0 or loads[best].score() - loads[by_load[0]].score() > self.margin:
            return by_load
        return [best] + [i for i in by_load if i != best]


def make_policy(name: str, margin: float) -> Policy:
    policies = {"round_robin": RoundRobin, "power_of_two": PowerOfTwo, "least_load": LeastLoad}
    return PrefixAware(margin) if name == "prefix_aware" else policies[name]()


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
                         deployment: str = "", **_):
        self.policy = make_policy(policy, prefix_margin)
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
        return ReplicaLoad.of(stats, queued, prefix, age)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None
                              ) -> list[list[RunningReplica]]:
        now = time.monotonic()
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
        self._record(candidate_replicas[order[0]], loads[order[0]], rebalanced)
        return [[candidate_replicas[i]] for i in order]

    def _record(self, replica: RunningReplica, load: ReplicaLoad, rebalanced: bool) -> None:
        from ray.util import metrics

        if self.metrics is None:
            self.metrics = (
                metrics.Counter("tandem_router_decisions", "Routing decisions",
                                tag_keys=("policy", "replica")),
                metrics.Counter("tandem_router_reroutes",
                                "Decisions that passed over a hot replica", tag_keys=("policy",)),
                metrics.Gauge("tandem_router_load_score", "Load score of the chosen replica",
                              tag_keys=("replica",)))
        decisions, reroutes, score = self.metrics
        rid = replica.replica_id.unique_id
        decisions.inc(tags={"policy": self.policy.name, "replica": rid})
        score.set(load.score(), tags={"replica": rid})
        if rebalanced:
            reroutes.inc(tags={"policy": self.policy.name})
