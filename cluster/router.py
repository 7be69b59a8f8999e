"""Load-aware replica choice for Serve handles to the model deployment.

This is a Serve custom request router: it runs inside every caller's handle (the tokenizer
replicas), so routing adds no network hop, and Serve keeps the replica set and health. Each
model replica reports its engine load through `record_routing_stats` once per period; between
reports the handle's own count of requests in flight per replica keeps a burst from piling
onto the replica that looked idlest at the last report.
"""

from __future__ import annotations

import random

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica


def load_score(stats: dict, in_flight: int, max_ongoing: int) -> float:
    """Roughly 'how many batches of work are ahead of a new request' on a replica."""
    if not stats:
        return in_flight / max(1, max_ongoing)
    seqs = max(1.0, stats.get("max_num_seqs", 1.0))
    kv = stats.get("kv_used", 0.0) / max(1.0, stats.get("kv_total", 1.0))
    queued = stats.get("waiting", 0.0) + stats.get("running", 0.0)
    return max(queued, in_flight) / seqs + 2.0 * kv * kv


class LoadAwareRouter(FIFOMixin, RequestRouter):
    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None
                              ) -> list[list[RunningReplica]]:
        def score(r: RunningReplica) -> tuple[float, float]:
            in_flight = self.replica_queue_len_cache.get(r.replica_id) or 0
            return load_score(r.routing_stats, in_flight, r.max_ongoing_requests), random.random()

        ranked = sorted(candidate_replicas, key=score)
        return [[r] for r in ranked]
