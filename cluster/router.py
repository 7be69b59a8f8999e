"""Replica choice for Serve handles to the model deployment: every policy in one place.

This is a Serve custom request router: it runs inside every caller's handle (the tokenizer
replicas), so routing adds no network hop, and Serve keeps the replica set and health. Each
model replica reports its engine load and a summary of its prefix cache through
`record_routing_stats` once per period; between reports the handle's own count of requests
in flight per replica keeps a burst from piling onto the replica that looked idlest.

Every policy ranks the same candidates; replicas that are hot (KV cache or queue above a
threshold) get no new work while a cool one exists, and replicas whose report is stale rank
last (a replica that stopped reporting is as good as gone).
"""

from __future__ import annotations

import itertools
import random
import time
from dataclasses import dataclass, field

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from cluster.engine.block_manager import block_hash

PREFIX_SUMMARY_BLOCKS = 4096  # newest cached block hashes a replica reports


@dataclass
class ReplicaLoad:
    running: float = 0.0
    waiting: float = 0.0
    waiting_tokens: float = 0.0
    kv_usage: float = 0.0
    max_num_seqs: float = 1.0
    in_flight: float = 0.0
    prefix: frozenset = field(default_factory=frozenset)
    age_s: float = 0.0

    @classmethod
    def of(cls, stats: dict, in_flight: float, prefix: frozenset, now: float) -> ReplicaLoad:
        if not stats:
            return cls(in_flight=in_flight)
        return cls(stats.get("running", 0.0), stats.get("waiting", 0.0),
                   stats.get("waiting_tokens", 0.0),
                   stats.get("kv_used", 0.0) / max(1.0, stats.get("kv_total", 1.0)),
                   max(1.0, stats.get("max_num_seqs", 1.0)), in_flight, prefix,
                   now - stats.get("ts", now))

    def score(self) -> float:
        """Roughly 'how many batches of work are ahead of a new request' here."""
        queued = max(self.running + self.waiting, self.in_flight)
        return queued / self.max_num_seqs + self.waiting_tokens / 8192 + 2.0 * self.kv_usage ** 2

    def cached_blocks(self, hashes: list[int]) -> int:
        n = 0
        for h in hashes:
            if h not in self.prefix:
                break
            n += 1
        return n


def prompt_hashes(token_ids: list[int], block_size: int) -> list[int]:
    """The chained block hashes a replica's prefix cache would hold for this prompt."""
    out, h = [], 0
    for i in range(len(token_ids) // block_size):
        h = block_hash(h, token_ids[i * block_size : (i + 1) * block_size])
        out.append(h)
    return out


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
    name = "least_load"

    def rank(self, loads, hashes):
        return sorted(range(len(loads)), key=lambda i: (loads[i].score(), random.random()))


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
    hot = {i for i in fresh if loads[i].kv_usage >= kv_hot or loads[i].score() >= score_hot}
    cool = [i for i in fresh if i not in hot]
    pool = cool or fresh or stale
    ranked = policy.rank([loads[i] for i in pool], hashes)
    order = [pool[i] for i in ranked]
    rest = [i for i in fresh if i not in order] + [i for i in stale if i not in order]
    return order + rest, bool(cool and hot)


class LoadAwareRouter(FIFOMixin, RequestRouter):
    def initialize_state(self, policy: str = "prefix_aware", block_size: int = 16,
                         prefix_margin: float = 1.0, kv_hot: float = 0.95,
                         score_hot: float = 4.0, stale_after_s: float = 5.0, **_):
        self.policy = make_policy(policy, prefix_margin)
        self.block_size = block_size
        self.kv_hot, self.score_hot, self.stale_s = kv_hot, score_hot, stale_after_s
        self._prefix_sets: dict = {}  # replica id -> (the stats dict it came from, set)
        self.metrics = None

    def _prefix(self, r: RunningReplica) -> frozenset:
        stats = r.routing_stats or {}
        cached = self._prefix_sets.get(r.replica_id)
        if cached is None or cached[0] is not stats:
            cached = (stats, frozenset(stats.get("prefix", ())))
            self._prefix_sets[r.replica_id] = cached
        return cached[1]

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None
                              ) -> list[list[RunningReplica]]:
        now = time.time()
        loads = [ReplicaLoad.of(r.routing_stats, self.replica_queue_len_cache.get(r.replica_id)
                                or 0, self._prefix(r), now) for r in candidate_replicas]
        hashes = []
        if self.policy.name == "prefix_aware" and pending_request is not None:
            req = pending_request.args[0] if pending_request.args else None
            ids = getattr(req, "prompt_token_ids", None)
            if ids:
                hashes = prompt_hashes(ids, self.block_size)
        order, rebalanced = order_replicas(self.policy, loads, hashes, self.kv_hot,
                                           self.score_hot, self.stale_s)
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
