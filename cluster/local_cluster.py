"""A Ray cluster of several nodes on one machine, labelled like a real one.

Head (ingress, Serve controller), a Kunpeng CPU node (tokenizer pool) and a model node
(declared GPUs, or the CPU engine). `make serve` runs it under a supervisor process and
`make stop` ends that process, which stops exactly these nodes (never a machine-wide
`ray stop`). Tests start the same cluster in-process.
"""

from __future__ import annotations

import os
import secrets
import socket
from contextlib import contextmanager
from dataclasses import dataclass, field

HEAD_LABELS = {"node-role": "head"}
KUNPENG_LABELS = {"cpu-arch": "kunpeng", "node-role": "preprocess"}
MODEL_LABELS = {"node-role": "model"}


@dataclass
class LocalClusterSpec:
    head_cpus: float = 2
    kunpeng_nodes: int = 1
    kunpeng_cpus: float = 4
    model_nodes: int = 1
    model_cpus: float = 4
    model_gpus: int = 0
    model_labels: dict = field(default_factory=lambda: dict(MODEL_LABELS))
    dashboard: bool = True
    dashboard_port: int = 8265


def use_token_auth() -> str:
    """One auth mode everywhere: token, with a token for this cluster unless one is set."""
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    # ray caches both at import: make this process see them too
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
    return os.environ["RAY_AUTH_TOKEN"]


def free_port(port: int = 0) -> int:
    """`port` if nothing listens on it, else one the kernel picks (another cluster on this
    machine may hold the usual dashboard port)."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(spec: LocalClusterSpec | None = None):
    from ray.cluster_utils import Cluster

    spec = spec or LocalClusterSpec()
    use_token_auth()
    # autoscaling signals reach the controller every second instead of every ten
    for var in ("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S",
                "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S"):
        os.environ.setdefault(var, "1")
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": spec.head_cpus, "labels": dict(HEAD_LABELS),
        "include_dashboard": spec.dashboard, "dashboard_port": free_port(spec.dashboard_port)})
    for _ in range(spec.kunpeng_nodes):
        cluster.add_node(num_cpus=spec.kunpeng_cpus, labels=dict(KUNPENG_LABELS))
    for _ in range(spec.model_nodes):
        cluster.add_node(num_cpus=spec.model_cpus, num_gpus=spec.model_gpus,
                         labels=dict(spec.model_labels))
    cluster.wait_for_nodes()
    return cluster


def deploy(serve_doc: dict, cfg, http_port: int | None = None, blocking_timeout_s: float = 300):
    """Starts Serve as the Serve config file says and runs the tandem app on it."""
    from ray import serve

    from deployments.app import build

    http = dict(serve_doc.get("http_options") or {})
    if http_port is not None:
        http["port"] = http_port
    serve.start(proxy_location=serve_doc.get("proxy_location", "HeadOnly"), http_options=http)
    app_doc = serve_doc["applications"][0]
    serve.run(build(cfg), name=app_doc.get("name", "tandem"),
              route_prefix=app_doc.get("route_prefix", "/"))
    host = http.get("host", "127.0.0.1")
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{http.get('port', 8000)}"


@contextmanager
def serving(serve_doc: dict, cfg, spec: LocalClusterSpec | None = None):
    """A benchmark's whole run: the default model, a local cluster with the app deployed on
    it (yields its URL), and everything stopped afterwards whatever happened."""
    import ray
    from ray import serve

    from cluster.config import DEFAULT_MODEL_DIR
    from cluster.model_init import build

    build(DEFAULT_MODEL_DIR)
    cluster = start(spec)
    ray.init(address=cluster.address, log_to_driver=False)  # stdout may carry JSON
    try:
        yield deploy(serve_doc, cfg)
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


def replica_actors(deployment: str, app: str = "tandem") -> list:
    """A deployment's live replicas, from Ray's state (not from what the app says of itself).
    This cluster's own address: with two clusters on a machine, the default would follow
    whichever started last."""
    import ray
    from ray.util.state import list_actors

    return list_actors(address=ray.get_runtime_context().gcs_address, filters=[
        ("class_name", "=", f"ServeReplica:{app}:{deployment}"), ("state", "=", "ALIVE")],
        detail=True)


def model_replica_stats(app: str = "tandem") -> list[dict]:
    """What every live model replica reports to the router (KV blocks, queues, memory)."""
    import ray

    handles = [ray.get_actor(a.name, namespace="serve")
               for a in replica_actors("ModelReplica", app)]
    return ray.get([h.record_routing_stats.remote() for h in handles])
