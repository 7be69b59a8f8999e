"""Model replicas: the engine behind a Serve deployment, pinned to GPU (model) nodes."""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import time
from collections import deque
from collections.abc import AsyncIterator

import ray
from ray import serve

from cluster.config import AppConfig
from cluster.engine.async_engine import AsyncEngine, EngineDead
from cluster.engine.engine import LLMEngine
from cluster.load import ReplicaLoad
from cluster.protocol import EngineRequest, ReplicaUnhealthy
from cluster.stage_metrics import EngineMetrics, base_tags

log = logging.getLogger("ray.serve")


def rss_mb() -> float:
    """This process's resident memory now (peak where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@serve.deployment(name="ModelReplica")
class ModelReplica:
    def __init__(self, config: dict):
        cfg = AppConfig.model_validate(config)
        self.node_labels = ray.get_runtime_context().get_node_labels()
        engine = LLMEngine(cfg.model.path, cfg.engine)
        rank = serve.get_replica_context().rank
        self.rank = rank = getattr(rank, "rank", rank)
        if rank in cfg.engine.slow_replica_ranks:  # benchmarks of uneven replicas only
            engine.step_delay_s = cfg.engine.slow_step_delay_s
            log.warning("replica rank %s throttled: +%.3f s per step", rank,
                        engine.step_delay_s)
        r = cfg.router
        move = r.move_after_s if r.policy != "serve_default" else None  # Serve's own: as is
        self.engine = AsyncEngine(engine, move, lambda: ReplicaLoad.of(
            self._load_report()).is_hot(r.kv_hot, r.score_hot), cfg.engine.stall_timeout_s)
        self.fault_injection = cfg.engine.fault_injection
        self.requests = 0
        self.moved = 0
        # (when, tokens generated), sampled each second: the replica's recent tokens/s, the
        # same whoever reads the stats and how often
        self.tok_samples: deque[tuple[float, int]] = deque(maxlen=10)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.ttfts: deque[tuple[float, float]] = deque(maxlen=1024)  # (when, seconds)
        replica = serve.get_replica_context().replica_tag
        self.metrics = EngineMetrics(base_tags(cfg.model.name, replica))
        self._sampler: asyncio.Task | None = None  # started on the replica's own event loop
        log.info("model replica on node %s (labels %s), device %s",
                 ray.get_runtime_context().get_node_id()[:8], self.node_labels,
                 self.engine.engine.device)

    async def _sample_forever(self) -> None:
        while True:
            eng = self.engine.engine
            try:
                self.metrics.sample(eng.snapshot, eng.idle_gaps)
                self.tok_samples.append((time.monotonic(), eng.generated_tokens))
            except Exception:  # one bad reading must not freeze the metrics for good
                log.exception("model replica metrics sample failed")
            await asyncio.sleep(1.0)

    def check_health(self) -> None:
        """Serve's health check: a replica whose engine stopped (or stalled, or lost a
        tensor-parallel peer) fails it and is replaced."""
        problem = self.engine.health()
        if problem:
            raise RuntimeError(f"model replica unhealthy: {problem}")

    def inject_fault(self) -> str:
        """Breaks the engine loop (tests of the health check; off unless configured).
        Returns this replica's id."""
        if not self.fault_injection:
            raise PermissionError("fault injection is off (engine.fault_injection)")
        self.engine.inject_fault()
        return self.replica_id

    async def generate(self, req: EngineRequest) -> AsyncIterator[dict]:
        if self._sampler is None:
            self._sampler = asyncio.create_task(self._sample_forever())
        self.requests += 1
        start, ttft, n_out, reason = time.monotonic(), None, 0, "abort"
        last = start
        try:
            async for out in self.engine.generate(req.request_id, req.prompt_token_ids,
                                                  req.params, req.queued_s, req.movable,
                                                  req.cache_salt):
                now = time.monotonic()
                if out.finish_reason == "moved":  # the caller sends it to another replica
                    self.moved += 1
                    self.metrics.moved_away()
                    reason = "moved"
                    yield {"moved": self.replica_id, "queued_s": req.queued_s + now - start}
                    return
                if ttft is None:
                    ttft = now - start
                    self.ttfts.append((now, ttft))
                    if out.queue_s is not None:
                        self.metrics.first_token(out.queue_s, out.prefill_s)
                elif out.new_token_ids:
                    self.metrics.tokens_after(now - last, len(out.new_token_ids))
                last = now
                n_out += len(out.new_token_ids)
                reason = out.finish_reason or reason
                yield {"token_ids": out.new_token_ids, "finish_reason": out.finish_reason,
                       "prompt_tokens": out.num_prompt_tokens,
                       "cached_tokens": out.num_cached_tokens}
        except EngineDead as err:  # the caller may retry it elsewhere if nothing was sent
            reason = "error"
            raise ReplicaUnhealthy(str(err), self.replica_id) from None
        except Exception:
            reason = "error"
            raise
        finally:
            if reason != "moved":
                self.metrics.request_done(len(req.prompt_token_ids), n_out, reason, ttft,
                                          time.monotonic() - start)

    def _load_report(self) -> dict:
        eng = self.engine.engine
        s = eng.snapshot
        return {"running": s.running, "waiting": s.waiting, "waiting_tokens": s.waiting_tokens,
                "kv_used": s.kv_blocks_used, "kv_total": s.kv_blocks_total,
                "max_num_seqs": eng.cfg.max_num_seqs, "step_s": s.step_s}

    def record_routing_stats(self) -> dict:
        # short digests of the newest cached blocks: routers match prompt prefixes on them
        digests = list(self.engine.engine.prefix_digests)
        return {**self._load_report(), "prefix": digests, "requests": self.requests,
                "moved": self.moved, "rank": self.rank, "rss_mb": rss_mb(),
                "tok_s": self._tok_s(), **self.metrics.gpu_reading()}

    def _tok_s(self) -> float:
        """Tokens per second over the last ~10 s (0 before the first request)."""
        if not self.tok_samples:
            return 0.0
        t0, g0 = self.tok_samples[0]
        now, generated = time.monotonic(), self.engine.engine.generated_tokens
        return (generated - g0) / max(1e-3, now - t0)

    def record_autoscaling_stats(self) -> dict[str, float]:
        s = self.engine.engine.snapshot
        now = time.monotonic()
        recent = sorted(t for when, t in self.ttfts if now - when < 30.0)
        p95 = recent[int(0.95 * (len(recent) - 1))] * 1000 if recent else 0.0
        return {"kv_usage": s.kv_usage, "waiting": float(s.waiting), "ttft_p95_ms": p95}

    def stats(self) -> dict:
        s = self.engine.engine.snapshot
        return {**s.__dict__, "device": str(self.engine.engine.device),
                "node_id": ray.get_runtime_context().get_node_id(),
                "node_labels": self.node_labels}
