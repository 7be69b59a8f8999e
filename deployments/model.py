"""Model replicas: the engine behind a Serve deployment, pinned to GPU (model) nodes."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

import ray
from ray import serve

from cluster.config import AppConfig
from cluster.engine.async_engine import AsyncEngine
from cluster.engine.engine import LLMEngine
from cluster.protocol import EngineRequest
from cluster.router import PREFIX_SUMMARY_BLOCKS

log = logging.getLogger("ray.serve")


@serve.deployment(name="ModelReplica")
class ModelReplica:
    def __init__(self, config: dict):
        cfg = AppConfig.model_validate(config)
        self.node_labels = ray.get_runtime_context().get_node_labels()
        engine = LLMEngine(cfg.model.path, cfg.engine)
        rank = serve.get_replica_context().rank
        rank = getattr(rank, "rank", rank)
        if rank in cfg.engine.slow_replica_ranks:  # benchmarks of uneven replicas only
            engine.step_delay_s = cfg.engine.slow_step_delay_s
            log.warning("replica rank %s throttled: +%.3f s per step", rank,
                        engine.step_delay_s)
        self.engine = AsyncEngine(engine)
        self.requests = 0
        log.info("model replica on node %s (labels %s), device %s",
                 ray.get_runtime_context().get_node_id()[:8], self.node_labels,
                 self.engine.engine.device)

    async def generate(self, req: EngineRequest) -> AsyncIterator[dict]:
        self.requests += 1
        async for out in self.engine.generate(req.request_id, req.prompt_token_ids, req.params):
            yield {"token_ids": out.new_token_ids, "finish_reason": out.finish_reason,
                   "prompt_tokens": out.num_prompt_tokens, "cached_tokens": out.num_cached_tokens}

    def record_routing_stats(self) -> dict:
        eng = self.engine.engine
        s = eng.stats()
        # the newest cached block hashes: the router matches prompt prefixes against them
        hashes = eng.blocks.cached_hashes()[-PREFIX_SUMMARY_BLOCKS:]
        return {"running": s.running, "waiting": s.waiting, "waiting_tokens": s.waiting_tokens,
                "kv_used": s.kv_blocks_used, "kv_total": s.kv_blocks_total,
                "max_num_seqs": eng.cfg.max_num_seqs, "ts": time.time(), "prefix": hashes,
                "requests": self.requests}

    def stats(self) -> dict:
        s = self.engine.engine.stats()
        return {**s.__dict__, "device": str(self.engine.engine.device),
                "node_id": ray.get_runtime_context().get_node_id(),
                "node_labels": self.node_labels}
