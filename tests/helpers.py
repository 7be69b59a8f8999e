"""Reads Serve replicas straight from Ray's state (not from what the app says of itself)."""

from __future__ import annotations

import time

import ray
from ray.util.state import list_actors

from cluster.local_cluster import LocalClusterSpec

# the session's cluster: two Kunpeng nodes (a node can be lost), a model node with two
# declared GPUs (the replicas run the CPU engine)
CLUSTER = LocalClusterSpec(kunpeng_nodes=2, kunpeng_cpus=2, model_gpus=2, model_cpus=8)


def replica_actors(deployment: str, app: str = "tandem") -> list:
    # this cluster's own address: with two clusters on a machine, the default would follow
    # whichever started last
    address = ray.get_runtime_context().gcs_address
    return list_actors(address=address, filters=[
        ("class_name", "=", f"ServeReplica:{app}:{deployment}"), ("state", "=", "ALIVE")],
        detail=True)


def node_labels() -> dict[str, dict]:
    return {n["NodeID"]: n.get("Labels", {}) for n in ray.nodes() if n["Alive"]}


def model_replica_stats() -> list[dict]:
    """The routing stats every live model replica reports (KV blocks in use, queues)."""
    handles = [ray.get_actor(a.name, namespace="serve") for a in replica_actors("ModelReplica")]
    return ray.get([h.record_routing_stats.remote() for h in handles])


def wait_kv_free(timeout_s: float = 20) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        stats = model_replica_stats()
        if all(s["kv_used"] == 0 and s["running"] == 0 for s in stats) \
                or time.monotonic() > deadline:
            return stats
        time.sleep(0.25)
