"""The Serve application: HTTP frontends (Kunpeng) -> model replicas (GPU).

A frontend tokenizes, asks the load-aware router for a model replica and streams from that
replica's engine core directly (one message per engine step); the model replicas are the
cores' control plane. `import_path: deployments.app:app` in a Serve config; the tandem
settings are its `args`.
"""

from __future__ import annotations

from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from cluster.config import AppConfig, PoolConfig, parse_app_config
from deployments.ingress import Ingress
from deployments.model import ModelReplica


def actor_options(pool: PoolConfig) -> dict:
    opts: dict = {"num_cpus": pool.num_cpus}
    if pool.num_gpus:
        opts["num_gpus"] = pool.num_gpus
    if pool.label_selector:
        opts["label_selector"] = dict(pool.label_selector)
    return opts


def spread(pool: PoolConfig) -> dict:
    return {} if pool.max_replicas_per_node is None else {
        "max_replicas_per_node": pool.max_replicas_per_node}


def model_placement(cfg: AppConfig) -> dict:
    """A tensor-parallel replica reserves one bundle per rank, packed on one node: the
    replica itself (rank 0) takes bundle 0, its peer ranks the others."""
    pool, tp = cfg.model_pool, cfg.engine.tensor_parallel_size
    opts = actor_options(pool)
    if tp == 1:
        return {"ray_actor_options": opts}
    selector = opts.pop("label_selector", None)
    rank0 = {"CPU": pool.num_cpus, **({"GPU": pool.num_gpus} if pool.num_gpus else {})}
    peer = {"CPU": 0.01, **({"GPU": pool.num_gpus} if pool.num_gpus else {})}
    placement = {"ray_actor_options": opts, "placement_group_bundles": [rank0] + [peer] * (tp - 1),
                 "placement_group_strategy": "STRICT_PACK"}
    if selector:
        placement["placement_group_bundle_label_selector"] = [selector] * tp
    return placement


QUIET = {"enable_access_log": False}  # access logs cost 10-20% of request throughput
# a replica whose engine stopped fails every request routed to it until Serve replaces it:
# check often (Serve's default is every 10 s)
MODEL_HEALTH_CHECK_PERIOD_S = 2.0


def sizing(pool: PoolConfig, drain_s: float) -> dict:
    """A fixed replica count, or our autoscaling policy; replicas leaving drain for drain_s."""
    if pool.autoscaling is None:
        return {"num_replicas": pool.num_replicas}
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


def build(cfg: AppConfig) -> Application:
    conf = cfg.model_dump()
    routing = {} if cfg.router.policy == "serve_default" else {
        "request_router_config": RequestRouterConfig(
            request_router_class="cluster.router:LoadAwareRouter",
            request_router_kwargs={
                "policy": cfg.router.policy, "block_size": cfg.engine.block_size,
                "prefix_margin": cfg.router.prefix_margin, "kv_hot": cfg.router.kv_hot,
                "score_hot": cfg.router.score_hot,
                "stale_after_s": cfg.router.stale_after_s},
            request_routing_stats_period_s=cfg.router.stats_period_s)}
    model = ModelReplica.options(
        **sizing(cfg.model_pool, drain_s=60.0),
        max_ongoing_requests=cfg.model_pool.max_ongoing_requests,
        health_check_period_s=MODEL_HEALTH_CHECK_PERIOD_S,
        logging_config=QUIET,
        **model_placement(cfg),
        **spread(cfg.model_pool),
        **routing,
    ).bind(conf)
    return Ingress.options(
        **sizing(cfg.frontend_pool, drain_s=30.0),
        max_ongoing_requests=cfg.frontend_pool.max_ongoing_requests,
        logging_config=QUIET,
        ray_actor_options=actor_options(cfg.frontend_pool),
        **spread(cfg.frontend_pool),
    ).bind(conf, model)


def app(args: dict) -> Application:
    return build(parse_app_config(args))
