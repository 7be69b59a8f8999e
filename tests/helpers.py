"""Reads Serve replicas straight from Ray's state (not from what the app says of itself)."""

from __future__ import annotations

import time

import ray

from cluster.local_cluster import LocalClusterSpec, model_replica_stats, replica_actors

__all__ = ["model_replica_stats", "replica_actors"]  # read from Ray's state, for the tests

# the session's cluster: two Kunpeng nodes (a node can be lost), a model node with two
# declared GPUs (the replicas run the CPU engine)
CLUSTER = LocalClusterSpec(kunpeng_nodes=2, kunpeng_cpus=2, model_gpus=2, model_cpus=8)


def node_labels() -> dict[str, dict]:
    return {n["NodeID"]: n.get("Labels", {}) for n in ray.nodes() if n["Alive"]}


def wait_kv_free(timeout_s: float = 20, app: str = "tandem") -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        stats = model_replica_stats(app)
        if all(s["kv_used"] == 0 and s["running"] == 0 for s in stats) \
                or time.monotonic() > deadline:
            return stats
        time.sleep(0.25)
