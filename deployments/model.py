"""Model replicas: the control plane of an engine core, on GPU (model) nodes, or on Kunpeng
nodes for a CPU pool.

The engine itself runs in its own process (cluster/engine/core.py) and talks to the
frontends directly over ZMQ; this Serve actor starts it, publishes its address to the
routers (`record_replica_metadata`), reports its load and cache (`record_routing_stats`,
`record_autoscaling_stats`), exports its metrics and answers Serve's health checks, so that
a core that died, stalled or lost a tensor-parallel peer gets its replica replaced. A CPU
pool's replica runs its engine on the CPU, pinned to cores of its own (cluster/cpu_cores.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import time
from collections import deque
from contextlib import nullcontext

import ray
from ray import serve

from cluster import load
from cluster.config import CPU, GPU, AppConfig, cpu_engine
from cluster.cpu_cores import CoreShare
from cluster.engine.core_process import CoreProcess
from cluster.engine.engine import EngineStats
from cluster.stage_metrics import EngineMetrics, base_tags

log = logging.getLogger("ray.serve")
# a replica leaving (scale-down, a canary removed, a rolling update) finishes the streams its
# engine core holds, for at most this long: the frontends stream from the core directly, so
# Serve's own drain sees none of them (the pool's graceful_shutdown_timeout_s is longer)
DRAIN_S = 55.0


def rss_mb(pid: int | None = None) -> float:
    """A process's resident memory now (this one's peak where /proc is missing)."""
    try:
        with open(f"/proc/{pid or 'self'}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@serve.deployment(name="ModelReplica")
class ModelReplica:
    """`config`: its model's one-model config; `pool`: gpu (model_pool) or cpu (cpu_pool)."""

    def __init__(self, config: dict, pool: str = GPU):
        cfg = AppConfig.model_validate(config)
        self.pool, self.cores = pool, None
        if pool == CPU:
            self.cores = CoreShare.claim(cfg.cpu_pool.num_cpus, cfg.cpu_pool.pin_threads)
            engine = cpu_engine(cfg.engine, cfg.cpu_pool)
            engine.torch_threads = self.cores.threads
            cfg = cfg.model_copy(update={"engine": engine})
        self.cfg = cfg
        self.node_labels = ray.get_runtime_context().get_node_labels()
        rank = serve.get_replica_context().rank
        self.rank = rank = getattr(rank, "rank", rank)
        delay = 0.0
        if rank in cfg.engine.slow_replica_ranks:  # benchmarks of uneven replicas only
            delay = cfg.engine.slow_step_delay_s
            log.warning("replica rank %s throttled: +%.3f s per step", rank, delay)
        with self.cores.applied() if self.cores else nullcontext():
            self.core = CoreProcess(cfg, ray.util.get_node_ip_address(), delay)
        self.fault_injection = cfg.engine.fault_injection
        self.reports = 0  # routing reports made (see record_routing_stats)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        replica = serve.get_replica_context().replica_tag
        self.metrics = EngineMetrics(base_tags(cfg.model.name, replica))
        self.core.on_stats = self._record
        log.info("model replica (%s pool) on node %s (labels %s): engine core pid %d at %s%s",
                 pool, ray.get_runtime_context().get_node_id()[:8], self.node_labels,
                 self.core.pid, self.core.addr,
                 f", {self.cores.threads} threads on cores {self.cores.cpus}"
                 if self.cores else "")

    def record_replica_metadata(self) -> dict:
        """Read by the routers once the replica is ready: where its engine core listens."""
        return {"engine_addr": self.core.addr}

    def _record(self, report: dict) -> None:
        """Metrics from one core report (on the stats reader thread, twice a second)."""
        if "snapshot" not in report:
            return
        m = self.metrics
        m.sample(EngineStats(**report["snapshot"]), deque(report["idle_gaps"]))
        obs = report["obs"]
        for queue_s, prefill_s in zip(obs["queue"], obs["prefill"], strict=True):
            m.first_token(queue_s, prefill_s)
        m.token_gaps(obs["itl"])
        for n_prompt, n_out, reason, ttft, e2e in obs["done"]:
            m.request_done(n_prompt, n_out, reason, ttft, e2e)
        if report.get("kv_tier"):
            m.kv_tier(report["kv_tier"])

    def check_health(self) -> None:
        """Serve's health check: a replica whose engine core stopped, stalled or lost a
        tensor-parallel peer fails it and is replaced."""
        problem = self.core.health(self.cfg.engine.stall_timeout_s)
        core = self.core.core
        if problem is None and core is not None and core.engine.runner.peers is not None \
                and not core.engine.runner.peers.alive():
            problem = "a tensor-parallel peer of this replica died"
        if problem:
            raise RuntimeError(f"model replica unhealthy: {problem}")

    def inject_fault(self) -> str:
        """Breaks the engine loop (tests of the health check; off unless configured).
        Returns this replica's id."""
        if not self.fault_injection:
            raise PermissionError("fault injection is off (engine.fault_injection)")
        self.core.inject_fault()
        return self.replica_id

    def _load_report(self) -> dict:
        s = self.core.stats
        return {k: s[k] for k in load.REPORT_KEYS if k in s}

    def record_routing_stats(self) -> dict:
        # Serve passes a report on to the routers only when it differs from the last one
        # (it compares the replica's info, stats included), and a router takes a replica
        # whose report it has not seen change for router.stale_after_s for gone: an idle
        # replica, whose figures stay the same, would then get no work and stay idle. The
        # count makes every report new.
        self.reports += 1
        s = self.core.stats
        return {**self._load_report(), "report": self.reports, "prefix": s.get("prefix", []),
                "kv_key": s.get("kv_key", ""),  # the model key of its pool blocks, if any
                "requests": s.get("requests", 0), "moved": s.get("moved", 0),
                "rank": self.rank, "core_rss_mb": rss_mb(self.core.pid),
                # this actor and its engine core process together
                "rss_mb": rss_mb() + (rss_mb(self.core.pid) if self.core.proc else 0.0),
                "core_pid": self.core.pid, "messages": s.get("messages", 0),
                "aborted": s.get("aborted", 0),
                "tok_s": s.get("tok_s", 0.0), **self.metrics.gpu_reading()}

    def record_autoscaling_stats(self) -> dict[str, float]:
        s = self.core.stats
        snap = s.get("snapshot", {})
        used = snap.get("kv_blocks_used", 0) / max(1, snap.get("kv_blocks_total", 1))
        return {"kv_usage": used, "waiting": float(s.get("waiting", 0)),
                "ttft_p95_ms": s.get("ttft_p95_ms", 0.0)}

    def stats(self) -> dict:
        return {**self.core.stats.get("snapshot", {}), "device": self.core.stats.get("device"),
                "node_id": ray.get_runtime_context().get_node_id(),
                "node_labels": self.node_labels, "pool": self.pool,
                "torch_threads": self.cfg.engine.torch_threads,
                "cpus": self.cores.cpus if self.cores and self.cores.pinned else None,
                "kv_tier": self.core.stats.get("kv_tier")}  # its counters (None: tiers off)

    async def __del__(self):
        """Serve's shutdown (awaited): drain, then stop the core. Until the core reports
        no running or waiting request (in a report sent after the drain began)."""
        core = getattr(self, "core", None)
        if core is None:
            return
        began = time.monotonic()
        while time.monotonic() - began < DRAIN_S and core.health(DRAIN_S) is None:
            s = core.stats
            if core.stats_at > began and not s.get("running") and not s.get("waiting"):
                break
            await asyncio.sleep(0.1)
        core.stop()


@serve.deployment(name="PoolRoot", num_replicas=1, ray_actor_options={"num_cpus": 0},
                  logging_config={"enable_access_log": False})
class PoolRoot:
    """The root of an app that is only a pool of model replicas (a rollout's canary): it
    holds the pool's handle so that Serve deploys the pool with it, and serves nothing."""

    def __init__(self, pool):
        self.pool = pool
