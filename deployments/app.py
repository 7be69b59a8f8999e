"""The Serve application: HTTP frontends (Kunpeng) -> model replicas (GPU, or Kunpeng CPUs).

A frontend tokenizes, asks the load-aware router for a model replica and streams from that
replica's engine core directly (one message per engine step); the model replicas are the
cores' control plane. Each model served has up to two pools, each its own deployment of
ModelReplica: `model_pool` (GPU nodes) and `cpu_pool` (the engine on Kunpeng CPUs).
`import_path: deployments.app:app` in a Serve config; the tandem settings are its `args`.
"""

from __future__ import annotations

from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from cluster.config import (
    GPU,
    AppConfig,
    ConfigError,
    ModelEntry,
    Pool,
    PoolConfig,
    parse_app_config,
)
from deployments.ingress import Ingress
from deployments.model import DRAIN_S, ModelReplica, PoolRoot


def gpus(pool: Pool) -> float:
    return pool.num_gpus if isinstance(pool, PoolConfig) else 0.0


def actor_options(pool: Pool) -> dict:
    opts: dict = {"num_cpus": pool.num_cpus}
    if gpus(pool):
        opts["num_gpus"] = gpus(pool)
    if pool.label_selector:
        opts["label_selector"] = dict(pool.label_selector)
    return opts


def spread(pool: Pool) -> dict:
    return {} if pool.max_replicas_per_node is None else {
        "max_replicas_per_node": pool.max_replicas_per_node}


def model_placement(pool: Pool, tp: int) -> dict:
    """A tensor-parallel replica reserves one bundle per rank, packed on one node: the
    replica itself (rank 0) takes bundle 0, its peer ranks the others."""
    opts = actor_options(pool)
    if tp == 1:
        return {"ray_actor_options": opts}
    selector = opts.pop("label_selector", None)
    gpu = {"GPU": gpus(pool)} if gpus(pool) else {}
    rank0, peer = {"CPU": pool.num_cpus, **gpu}, {"CPU": 0.01, **gpu}
    placement = {"ray_actor_options": opts, "placement_group_bundles": [rank0] + [peer] * (tp - 1),
                 "placement_group_strategy": "STRICT_PACK"}
    if selector:
        placement["placement_group_bundle_label_selector"] = [selector] * tp
    return placement


QUIET = {"enable_access_log": False}  # access logs cost 10-20% of request throughput
# a replica whose engine stopped fails every request routed to it until Serve replaces it:
# check often (Serve's default is every 10 s)
MODEL_HEALTH_CHECK_PERIOD_S = 2.0


def sizing(pool: Pool, drain_s: float) -> dict:
    """A fixed replica count, or our autoscaling policy; replicas leaving drain for drain_s."""
    if pool.autoscaling is None:
        return {"num_replicas": pool.num_replicas, "graceful_shutdown_timeout_s": drain_s}
    a = pool.autoscaling
    return {"num_replicas": "auto", "graceful_shutdown_timeout_s": drain_s,
            "autoscaling_config": {
                "min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                "initial_replicas": max(a.min_replicas, 1), "metrics_interval_s": 1.0,
                "look_back_period_s": 10.0,
                # Serve wraps a custom policy in its own delay logic (30 s up, 600 s down by
                # default); our policy owns its delays, so Serve's must pass decisions through
                "upscale_delay_s": 0.0, "downscale_delay_s": 0.0,
                "policy": {"policy_function": "cluster.autoscaling:Policy",
                           "policy_kwargs": a.model_dump()}}}


def pool_index(cfg: AppConfig) -> dict | None:
    """The routers' cluster index of the KV pool (cluster/kv_index.py); None: no pool."""
    if cfg.kv_pool is None or not cfg.kv_pool.index_blocks:
        return None
    return {"period_s": cfg.router.stats_period_s, "blocks": cfg.kv_pool.index_blocks}


def routing(cfg: AppConfig, block_size: int, deployment: str) -> dict:
    """The load-aware router of one pool's handles (none: Serve's own)."""
    r = cfg.router
    if r.policy == "serve_default":
        return {}
    return {"request_router_config": RequestRouterConfig(
        request_router_class="cluster.router:LoadAwareRouter",
        request_router_kwargs={
            "policy": r.hybrid.replica_policy if r.policy == "hybrid" else r.policy,
            "block_size": block_size, "prefix_margin": r.prefix_margin,
            "kv_hot": r.kv_hot, "score_hot": r.score_hot, "stale_after_s": r.stale_after_s,
            "deployment": deployment, "pool_block_weight": r.pool_block_weight,
            "pool_index": pool_index(cfg)},
        request_routing_stats_period_s=r.stats_period_s)}


def canary_name(cfg: AppConfig, pool: str) -> str:
    return cfg.deployment(cfg.canary, pool) + "-canary"


def model_pool(cfg: AppConfig, entry: ModelEntry, pool: str, name: str | None = None
               ) -> Application:
    """One pool of one model: a ModelReplica deployment given that model's config (without
    the canary's: adding or removing one leaves the running replicas as they are)."""
    spec = entry.model_pool if pool == GPU else entry.cpu_pool
    name, engine = name or cfg.deployment(entry, pool), entry.engine_of(pool)
    return ModelReplica.options(
        name=name,
        **sizing(spec, drain_s=DRAIN_S + 5),
        max_ongoing_requests=spec.max_ongoing_requests,
        health_check_period_s=MODEL_HEALTH_CHECK_PERIOD_S,
        logging_config=QUIET,
        **model_placement(spec, engine.tensor_parallel_size),
        **spread(spec),
        **routing(cfg, engine.block_size, name),
    ).bind(cfg.of_model(entry).model_copy(update={"canary": None}).model_dump(), pool)


def build(cfg: AppConfig) -> Application:
    pools = {e.model.name: {p: model_pool(cfg, e, p) for p in e.pools()} for e in cfg.served()}
    canary, canary_pools = cfg.canary, None
    if canary is not None:
        if canary.model.name not in pools:
            raise ConfigError(f"canary.model.name: {canary.model.name!r} is not a served model "
                              f"({', '.join(pools)})")
        canary_pools = {p: model_pool(cfg, canary, p, canary_name(cfg, p))
                        for p in canary.pools()}
    return Ingress.options(
        **sizing(cfg.frontend_pool, drain_s=30.0),
        max_ongoing_requests=cfg.frontend_pool.max_ongoing_requests,
        logging_config=QUIET,
        ray_actor_options=actor_options(cfg.frontend_pool),
        **spread(cfg.frontend_pool),
    ).bind(cfg.model_dump(), pools, canary_pools)


def app(args: dict) -> Application:
    return build(parse_app_config(args))


def canary_pool(args: dict) -> Application:
    """One pool of a rollout's canary as an app of its own (`import_path:
    deployments.app:canary_pool`, args `{"tandem": <the app's args with its canary>, "pool":
    gpu|cpu}`, no route): deploying or deleting it leaves the stable app, whose args are in
    every one of its deployments' versions, running as it is."""
    cfg = parse_app_config(args["tandem"])
    if cfg.canary is None:
        raise ConfigError("canary_pool: the args have no canary")
    pool = model_pool(cfg, cfg.canary, args["pool"], canary_name(cfg, args["pool"]))
    # Serve's HAProxy ingress refuses a custom request router on an app's root deployment
    # (HAProxy, not Serve's router, would pick its replicas), so the pool sits under a root
    # that takes no traffic: the frontends route to the pool's deployment by name
    return PoolRoot.options(name=canary_name(cfg, args["pool"]) + "-root").bind(pool)
