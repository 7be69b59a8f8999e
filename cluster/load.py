"""A model replica's load as the router sees it, and when a replica counts as hot.

Both the router (in every caller) and the replica itself (deciding to hand queued requests
back) judge load by these rules, so they agree on which replica is hot.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# what of an engine core's load report (cluster/engine/core.py) a replica passes to routers
REPORT_KEYS = ("running", "waiting", "waiting_tokens", "kv_used", "kv_total", "max_num_seqs",
               "step_s", "step_a_s", "step_b_s", "pace_age_s")
# an idle replica whose pace line saw no step for this long is taken at the fleet's best
# pace (see LeastLoad.costs in cluster/router.py)
PACE_PROBE_AFTER_S = 2.0
PREFIX_SUMMARY_BLOCKS = 4096  # newest cached block digests a replica reports to routers

# replica id -> streams this process (a frontend) has open there, which the router adds to
# the replica's last report: between reports a burst must not pile onto the idlest-looking
IN_FLIGHT: dict[str, int] = {}
# deployment name -> the router (cluster.router) of this process's handle to it, where the
# hybrid policy reads a pool's loads (none yet: that handle has not started its router)
ROUTERS: dict = {}


def pool_loads(deployment: str) -> list[ReplicaLoad]:
    """The loads of a deployment's fresh replicas, as this process's router sees them."""
    router = ROUTERS.get(deployment)
    return [] if router is None else router.fresh_loads()


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
    step_s: float = 0.0  # the replica's recent engine step time; 0: not known yet
    gpu_busy: float = 0.0  # the share of time its GPU was busy (NVML, 0-1); 0: no GPU
    # digests of the blocks the cluster KV pool holds for this replica's model (its model
    # key: cluster/kv_index.py), which it would fetch rather than compute
    pool: frozenset = field(default_factory=frozenset)
    # its decode step time at batch n ~ pace_a + pace_b n (0, 0: not known yet), fitted to
    # its recent decode steps (cluster/engine/step_pace.py): routers compare replicas by the
    # step a new request would join, not by step_s (prefill steps in it, and the batch it
    # last ran, which an idle replica would keep reporting)
    pace_a: float = 0.0
    pace_b: float = 0.0
    pace_age_s: float = 0.0  # since its line saw a decode step (its host's clock)

    @classmethod
    def of(cls, stats: dict, in_flight: float = 0.0, prefix: frozenset = frozenset(),
           age_s: float = 0.0, pool: frozenset = frozenset()) -> ReplicaLoad:
        """age_s: how long ago the receiver got this report, by its own clock (the
        replica's clock may be skewed against the router's host)."""
        if not stats:
            return cls(in_flight=in_flight, pool=pool)
        return cls(stats.get("running", 0.0), stats.get("waiting", 0.0),
                   stats.get("waiting_tokens", 0.0),
                   stats.get("kv_used", 0.0) / max(1.0, stats.get("kv_total", 1.0)),
                   max(1.0, stats.get("max_num_seqs", 1.0)), in_flight, prefix,
                   age_s, stats.get("step_s", 0.0), stats.get("gpu_util_perc", 0.0) / 100,
                   pool, stats.get("step_a_s", 0.0), stats.get("step_b_s", 0.0),
                   stats.get("pace_age_s", 0.0) + age_s)

    def score(self) -> float:
        """Roughly 'how many batches of work are ahead of a new request' here."""
        queued = max(self.running + self.waiting, self.in_flight)
        return queued / self.max_num_seqs + self.waiting_tokens / 8192 + 2.0 * self.kv_usage ** 2

    @property
    def pace_s(self) -> float:
        """Its decode step time with one more request in its batch (0: not known yet)."""
        batch = min(self.max_num_seqs, max(self.running, self.in_flight) + 1)
        return self.pace_a + self.pace_b * batch

    def pace_unproven(self) -> bool:
        """Idle, with a pace line older than PACE_PROBE_AFTER_S: a guess from its past that
        only a request sent to it can correct."""
        idle = not (self.running or self.waiting or self.in_flight)
        return idle and self.pace_age_s >= PACE_PROBE_AFTER_S

    def wait_s(self, pace_s: float | None = None) -> float:
        """Seconds until a new request's first token here, roughly: the batches ahead of it
        and its own, at this replica's decode pace (or the pace given). A replica half as
        fast waits twice as long for the same queue, which queue length alone does not see."""
        return (self.score() + 1.0) * (self.pace_s if pace_s is None else pace_s)

    def is_hot(self, kv_hot: float, score_hot: float) -> bool:
        return self.kv_usage >= kv_hot or self.score() >= score_hot

    def cached_blocks(self, hashes: list[int]) -> int:
        n = 0
        for h in hashes:
            if h not in self.prefix:
                break
            n += 1
        return n

    def prefix_blocks(self, hashes: list[int], run: int | None = None) -> tuple[int, int]:
        """(blocks of the prompt's prefix this replica holds, blocks after those it would
        fetch from the pool), walked as its engine matches a prefix: its own cache first,
        then each block from its cache or the pool, until one is in neither. run: the
        cached_blocks of these hashes, where known."""
        local = self.cached_blocks(hashes) if run is None else run
        pooled = 0
        for h in hashes[local:]:
            if h in self.prefix:
                local += 1
            elif h in self.pool:
                pooled += 1
            else:
                break
        return local, pooled
