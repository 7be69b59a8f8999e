"""Tokenizer pool: runs on Kunpeng (CPU) nodes, between the ingress and the model replicas.

It turns text into token ids, streams the model replica's ids back as text (incremental,
UTF-8 safe), and ends a generation at a stop string by cancelling the model's stream.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import ray
from jinja2.exceptions import TemplateError
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.handle import DeploymentHandle

from cluster.config import AppConfig
from cluster.engine.engine import resolve_max_model_len
from cluster.engine.model import ModelArch
from cluster.protocol import APIError, EngineRequest, GenerateRequest, ReplicaUnhealthy, TextDelta
from cluster.stage_metrics import TokenizerMetrics, base_tags
from cluster.tokenizer import TextStream, Tokenizer

log = logging.getLogger("ray.serve")


def _failed_replica(err: Exception) -> str:
    """The id of the replica a failure came from, for the router to pass over."""
    cause = getattr(err, "cause", None) or err  # Ray wraps a replica's own exception
    if isinstance(cause, ReplicaUnhealthy):
        return cause.replica_id
    return getattr(err, "actor_id", None) or ""


@serve.deployment(name="TokenizerPool")
class TokenizerPool:
    def __init__(self, config: dict, model: DeploymentHandle):
        cfg = AppConfig.model_validate(config)
        self.tokenizer = Tokenizer(cfg.model.path)
        arch = ModelArch.from_hf(cfg.model.path)
        self.vocab_size = arch.vocab_size
        self.max_model_len = resolve_max_model_len(arch, cfg.engine)
        self.model = model.options(stream=True)
        self.node_labels = ray.get_runtime_context().get_node_labels()
        self.in_flight = 0
        self.cpu_mark = (time.process_time(), time.monotonic())
        self.metrics = TokenizerMetrics(base_tags(cfg.model.name,
                                                  serve.get_replica_context().replica_tag))

    def tokenize(self, req: GenerateRequest) -> list[int]:
        param = "messages" if req.kind == "chat" else "prompt"
        try:
            if req.kind == "chat":
                ids = self.tokenizer.encode_chat(req.messages)
            elif isinstance(req.prompt, str):
                ids = self.tokenizer.encode(req.prompt)
            else:
                ids = list(req.prompt)
        except (TemplateError, ValueError, TypeError, UnicodeError) as err:
            raise APIError(f"could not tokenize the {param}: {err}", param=param) from None
        if not ids:
            raise APIError("the prompt is empty", param=param)
        if any(not 0 <= t < self.vocab_size for t in ids):
            raise APIError(f"prompt token ids must be in [0, {self.vocab_size})", param=param)
        if len(ids) >= self.max_model_len:
            raise APIError(f"the prompt has {len(ids)} tokens; this model's context length is "
                           f"{self.max_model_len}", param=param, code="context_length_exceeded")
        room = self.max_model_len - len(ids)
        if req.max_tokens is not None and req.max_tokens > room:
            raise APIError(f"max_tokens={req.max_tokens} plus the prompt's {len(ids)} tokens "
                           f"exceeds the context length {self.max_model_len}",
                           param="max_tokens", code="context_length_exceeded")
        return ids

    async def generate(self, req: GenerateRequest) -> AsyncIterator[TextDelta]:
        """First yields a header delta (prompt_tokens, or an error), then the text."""
        t0 = time.perf_counter()
        try:
            ids = self.tokenize(req)
            self.metrics.tokenized(len(ids), time.perf_counter() - t0)
        except APIError as err:
            yield TextDelta(error=err.body(), status=err.status)
            return
        max_tokens = req.max_tokens or self.max_model_len - len(ids)
        yield TextDelta(prompt_tokens=len(ids))

        params = replace(req.params, max_tokens=max_tokens)
        engine_req = EngineRequest(req.request_id, ids, params, cache_salt=req.cache_salt)
        texts = TextStream(self.tokenizer, req.stop)
        n_out = 0
        outputs = self._retrying(engine_req)
        self.in_flight += 1
        try:
            async for out in outputs:
                n_out += len(out["token_ids"])
                text, reason = texts.push(out["token_ids"], out["finish_reason"])
                if text or reason:
                    yield TextDelta(text, reason, len(ids), n_out, out["cached_tokens"])
                if reason:
                    return
        except Exception as err:  # the replica failed this request; tell the client clearly
            log.warning("request %s failed in the model replica: %s", req.request_id, err)
            yield TextDelta(finish_reason="error", prompt_tokens=len(ids), completion_tokens=n_out,
                            error=APIError(f"generation failed: {err}", 500, "server_error")
                            .body(), status=500)
        finally:
            self.in_flight -= 1
            # a stop string, or our caller went away: end the generation, free its KV blocks
            await outputs.aclose()

    async def _retrying(self, engine_req: EngineRequest):
        """The model's outputs. A replica that fails before its first token (it died, its
        engine stopped, or it was being replaced) is retried once on another: the old stream
        is cancelled (it must not go on holding KV somewhere) and the router passes over the
        failed replica. After the first token a retry could duplicate text, so then the
        error goes to the client. A hot replica may hand the request back unstarted
        ("moved"): it is sent again, once, to a replica the router picks without that one,
        keeping its time in line."""
        first, retried = True, False
        stream = self.model.generate.remote(engine_req)
        try:
            while True:
                try:
                    moved = None
                    async for out in stream:
                        if "moved" in out:  # its last message
                            moved = out
                            continue
                        first = False
                        yield out
                    if moved is None:
                        return
                    engine_req = replace(engine_req, movable=False, queued_s=moved["queued_s"],
                                         avoid=(*engine_req.avoid, moved["moved"]))
                except (RayActorError, ActorUnavailableError, ActorDiedError,
                        ReplicaUnhealthy) as err:
                    if not first or retried:
                        raise
                    retried = True
                    failed = _failed_replica(err)
                    log.warning("request %s: model replica %s failed before its first token "
                                "(%s); retrying on another", engine_req.request_id, failed, err)
                    engine_req = replace(engine_req, avoid=(*engine_req.avoid, failed))
                stream.cancel()
                stream = self.model.generate.remote(engine_req)
        finally:
            stream.cancel()  # no-op once the stream is done; frees KV if we stopped early

    def record_autoscaling_stats(self) -> dict[str, float]:
        """CPU share of one core this replica used since the last report, and its queue."""
        cpu, wall = time.process_time(), time.monotonic()
        used = (cpu - self.cpu_mark[0]) / max(1e-6, wall - self.cpu_mark[1])
        self.cpu_mark = (cpu, wall)
        return {"cpu": min(1.0, used), "queued": float(self.in_flight)}

    def node(self) -> dict:
        return {"node_id": ray.get_runtime_context().get_node_id(), "labels": self.node_labels}
