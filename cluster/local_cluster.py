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
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

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


# HAProxy's ingress (RAY_SERVE_ENABLE_HA_PROXY=1) binds these fixed ports on its node: a
# second local cluster on this machine (a benchmark beside the test cluster) would fail to
# start its HAProxy, so each cluster takes free ones unless the user set them
HAPROXY_PORTS = {"RAY_SERVE_HAPROXY_METRICS_PORT": 9101, "RAY_SERVE_HAPROXY_STATS_PORT": 8404}
# ports a local cluster picked travel in the environment to its children (a benchmark run
# from a test), which must pick their own, not take them for the user's
PICKED = "TANDEM_HAPROXY_PORTS_PICKED"
USER_SET = frozenset(v for v in HAPROXY_PORTS if v in os.environ
                     and v not in os.environ.get(PICKED, "").split(","))


# Serve holds a stopping HTTP frontend open this long (30 s by default) so that a load
# balancer in front deregisters it first; a local cluster's HAProxy runs on the same
# machine and follows the controller's broadcast within a second, and HAProxy retries a
# refused connection elsewhere. The 30 s made every local teardown, redeploy and canary
# step wait: 8 test modules' teardowns took 31 s each. Real clusters keep Serve's default.
LOCAL_ENV = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "3"}


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


def serve_env() -> dict[str, str]:
    """Ray Serve settings every tandem node runs with (cluster/data/serve.env, which
    infra/node.sh sources on real hosts)."""
    lines = (Path(__file__).parent / "data" / "serve.env").read_text().splitlines()
    return dict(ln.split("=", 1) for ln in lines if ln.strip() and not ln.startswith("#"))


def start(spec: LocalClusterSpec | None = None):
    from ray.cluster_utils import Cluster

    spec = spec or LocalClusterSpec()
    use_token_auth()
    for var, value in serve_env().items():  # what every node of a real cluster sets too
        os.environ.setdefault(var, value)
    for var, value in LOCAL_ENV.items():
        os.environ.setdefault(var, value)
    for var, port in HAPROXY_PORTS.items():
        if var not in USER_SET:
            os.environ[var] = str(free_port(port))
    os.environ[PICKED] = ",".join(v for v in HAPROXY_PORTS if v not in USER_SET)
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


def _models_in(annotation) -> list:
    """The pydantic models an annotation admits (`List[X]`, `Optional[X]`, `Dict | X`)."""
    from typing import get_args

    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models_in(arg)]


def _unknown_keys(model, data, loc: str = ""):
    """Keys of `data` that `model` (a Serve schema) has no field for, recursively."""
    if not isinstance(data, dict):
        return
    fields = {**model.model_fields,
              **{f.alias: f for f in model.model_fields.values() if f.alias}}
    for key, value in data.items():
        where = f"{loc}.{key}" if loc else str(key)
        if key not in fields:
            yield f"{where} (not a field of {model.__name__})"
            continue
        for sub in _models_in(fields[key].annotation):
            items = enumerate(value) if isinstance(value, list) else [(None, value)]
            for i, v in items:
                yield from _unknown_keys(sub, v, where if i is None else f"{where}[{i}]")


def serve_config(serve_doc: dict, source: str, http_port: int | None = None):
    """The Serve config file as `serve deploy` reads it: Ray Serve's own schema
    (ServeDeploySchema). Keys the schema lacks are refused: Serve ignores them (forward
    compatibility), so a typo such as `num_replica` would change nothing without a word."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    from cluster.config import ConfigError, describe

    unknown = list(_unknown_keys(ServeDeploySchema, serve_doc))
    if unknown:
        raise ConfigError(f"{source}: keys that Serve's config schema does not have "
                          "(`serve deploy` would ignore them):\n  " + "\n  ".join(unknown))
    if http_port is not None:
        serve_doc = {**serve_doc, "http_options": {**(serve_doc.get("http_options") or {}),
                                                   "port": http_port}}
    try:
        return ServeDeploySchema.model_validate(serve_doc)
    except ValidationError as err:
        raise ConfigError(describe(err, source)) from None


def deploy(serve_doc: dict, cfg, http_port: int | None = None, blocking_timeout_s: float = 300):
    """Applies a Serve config file as `serve deploy` does (the dashboard's handler of
    `PUT /api/serve/applications/`): Serve started from its top-level keys, then the
    controller builds each app from its import path and `args` and applies the file's
    `deployments:` overrides, `runtime_env` and `logging_config`. Waits until the file's apps
    run. `cfg` is the tandem app's validated args (load_serve_config): it must be what the
    doc says, since the doc is what gets built. One difference from `serve deploy`: apps
    deployed earlier from other files stay (tests deploy a second app beside the first)."""
    from ray.serve._private.api import serve_start

    from cluster.config import CPU, parse_app_config

    config = serve_config(serve_doc, "Serve config", http_port)
    optional: dict[str, dict[str, str]] = {app.name: {} for app in config.applications}
    for app in config.applications:
        if app.import_path == "deployments.app:app":
            if parse_app_config(app.args) != cfg:
                raise ValueError(f"cfg differs from the args of app {app.name!r} in the doc")
            # a model's CPU pool beside its GPU pool: the app serves without it (requests
            # go to the GPU pool) while it waits for a node
            optional[app.name] = {
                cfg.deployment(e, CPU): f"each replica needs a node labelled "
                f"{e.cpu_pool.label_selector} with {e.cpu_pool.num_cpus:g} CPUs free"
                for e in cfg.served() if len(e.pools()) == 2}
    client = serve_start(http_options=config.http_options.model_dump(),
                         proxy_location=config.proxy_location,
                         grpc_options=config.grpc_options.model_dump(),
                         global_logging_config=config.logging_config,
                         controller_options=config.controller_options)
    if config.logging_config:
        client.update_global_logging_config(config.logging_config)
    names = [app.name for app in config.applications]
    # a config replaces every app deployed from a config before: send those along unchanged
    # (same code version: Serve leaves them as they are)
    kept = [a.deployed_app_config for name, a in _details(client).applications.items()
            if a.source == "declarative" and name not in names and a.deployed_app_config
            and a.status != "DELETING"]
    client.deploy_apps(config.model_copy(update={"applications": kept + config.applications}))
    _wait_running(client, names, blocking_timeout_s, optional)
    host, port = config.http_options.host, config.http_options.port
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"


def _details(client):
    from ray.serve.schema import ServeInstanceDetails

    return ServeInstanceDetails(**client.get_serve_details())


def _wait_running(client, names: list[str], timeout_s: float,
                  optional: dict[str, dict[str, str]]) -> None:
    """Until every named app is RUNNING, or runs all but some of its `optional` deployments
    (deployment -> what it needs; those are named on stderr); its error when one fails."""
    deadline = time.monotonic() + timeout_s
    while True:
        time.sleep(0.5)  # a control loop first: an app redeployed may still read RUNNING
        apps = _details(client).applications
        states = {n: apps[n].status if n in apps else "NOT_STARTED" for n in names}
        failed = [f"{n}: {apps[n].message}" for n, s in states.items() if s == "DEPLOY_FAILED"]
        if failed:
            raise RuntimeError("Serve could not deploy the config:\n" + "\n".join(failed))
        starting = {n: _not_healthy(apps[n]) for n, s in states.items()
                    if s == "DEPLOYING" and n in apps}
        if all(s == "RUNNING" or (starting.get(n) and starting[n].keys() <= optional[n].keys())
               for n, s in states.items()):
            client.wait_for_proxies_serving(wait_for_applications_running=not starting)
            for n, deployments in starting.items():
                for dep, status in deployments.items():
                    print(f"app {n}: {dep} is not running yet ({status}; "
                          f"{optional[n][dep]}); the app serves without it", file=sys.stderr)
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"apps not running after {timeout_s:g} s: {states}")


def _not_healthy(app) -> dict[str, str]:
    """An app's deployments that are not healthy: Serve's status, replica states, message."""
    out = {}
    for name, d in app.deployments.items():
        if d.status != "HEALTHY":
            replicas: dict[str, int] = {}
            for r in d.replicas:
                replicas[r.state.value] = replicas.get(r.state.value, 0) + 1
            out[name] = f"{d.status.value}, replicas {replicas}" + (f": {d.message}"
                                                                     if d.message else "")
    return out


@contextmanager
def serve_cluster(spec: LocalClusterSpec | None = None):
    """For a benchmark that deploys apps of its own, one after another: the default model
    built, a local cluster with Serve's HTTP proxy on a free port (yields its base URL),
    and everything stopped afterwards whatever happened."""
    import ray
    from ray import serve

    from cluster.config import DEFAULT_MODEL_DIR
    from cluster.model_init import build

    build(DEFAULT_MODEL_DIR)
    cluster = start(spec)
    ray.init(address=cluster.address, log_to_driver=False)  # stdout may carry JSON
    try:
        port = free_port()
        serve.start(proxy_location="HeadOnly",
                    http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


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


def model_replica_stats(app: str = "tandem", deployment: str = "ModelReplica") -> list[dict]:
    """What every live model replica reports to the router (KV blocks, queues, memory)."""
    import ray

    handles = [ray.get_actor(a.name, namespace="serve")
               for a in replica_actors(deployment, app)]
    return ray.get([h.record_routing_stats.remote() for h in handles])
