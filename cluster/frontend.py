"""A frontend's generations: tokenize, route, stream text back, move streams off lost cores.

This runs in the HTTP frontend (the ingress replica, on a Kunpeng node): the prompt is
tokenized here, the load-aware router picks a model replica (Serve's `choose_replica`,
pick-only: the request itself goes straight to that replica's engine core over ZMQ), and
each engine step's tokens for all of this frontend's streams arrive in one message and are
detokenized in one batch. So a token crosses one process boundary between the engine and
the process that writes it to the client's connection (Serve's proxy forwards bytes).

When a core is lost mid-stream, the stream resumes on another replica from its prompt plus
the tokens already sent (up to `migration_limit` times): the client sees neither an error
nor a gap, and a greedy stream continues exactly as an unbroken run would.

No torch here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import replace

from jinja2.exceptions import TemplateError

from cluster.arch import ModelArch, context_length
from cluster.config import AppConfig
from cluster.engine_client import EngineClient, Stream
from cluster.load import IN_FLIGHT
from cluster.protocol import APIError, EngineRequest, GenerateRequest, TextDelta
from cluster.tokenizer import TextStream, Tokenizer, decode_step

log = logging.getLogger("ray.serve")



class Generation(Stream):
    """One request's stream, as text: filled by the receive task once per engine step."""

    def __init__(self, request_id: str, texts: TextStream, on_rows):
        super().__init__(request_id, on_rows)
        self.texts = texts
        self.text = ""
        self.finish: str | None = None
        self.control: list | None = None  # a row that ends it here: dead, moved, error
        self.generated: list[int] = []
        self.cached = 0
        self.overflow = False


class Generations:
    def __init__(self, cfg: AppConfig, model_handle):
        self.cfg = cfg
        self.tokenizer = Tokenizer(cfg.model.path)
        arch = ModelArch.from_hf(cfg.model.path)
        self.vocab_size = arch.vocab_size
        self.max_model_len = context_length(arch, cfg.engine.max_model_len)
        self.handle = model_handle
        self.client = EngineClient()
        self.migration_limit = cfg.ingress.migration_limit
        self.buffer_chars = cfg.ingress.stream_buffer_chars
        self.migrations = 0
        self.metrics = None  # TokenizerMetrics, set by the deployment (Ray's metrics agent)

    # ---- text in

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

    # ---- tokens back, once per step for all streams of a core

    def _on_rows(self, items: list[tuple[Generation, list]]) -> None:
        plain = []
        for g, row in items:
            if row[2] in ("dead", "moved", "error"):
                g.control = row
                g.event.set()
            else:
                plain.append((g, row))
        if not plain:
            return
        texts = decode_step(self.tokenizer, [g.texts for g, _ in plain],
                            [row[1] for _, row in plain], [row[2] for _, row in plain])
        for (g, row), (text, reason) in zip(plain, texts, strict=True):
            g.generated += row[1]
            g.text += text
            g.cached = row[5] or g.cached
            if reason and not g.finish:
                g.finish = reason
                if row[2] is None:  # a stop string: the engine would go on
                    self.client.abort(g)
            if len(g.text) > self.buffer_chars and not g.finish:
                # its client stopped reading: bound what it holds, free its KV
                g.overflow = True
                self.client.abort(g)
            g.event.set()

    # ---- one request

    async def _route(self, req: EngineRequest) -> tuple[str, str]:
        async with self.handle.choose_replica(req, _reserve=False) as sel:
            return sel.replica_id, sel.replica_metadata["engine_addr"]

    async def generate(self, req: GenerateRequest) -> AsyncIterator[TextDelta]:
        """First a header delta (prompt_tokens, or an error), then the text."""
        t0 = time.perf_counter()
        try:
            ids = self.tokenize(req)
            if self.metrics is not None:
                self.metrics.tokenized(len(ids), time.perf_counter() - t0)
        except APIError as err:
            yield TextDelta(error=err.body(), status=err.status)
            return
        max_tokens = req.max_tokens or self.max_model_len - len(ids)
        yield TextDelta(prompt_tokens=len(ids))
        base = EngineRequest(req.request_id, ids, replace(req.params, max_tokens=max_tokens),
                             cache_salt=req.cache_salt)
        g = Generation(req.request_id, TextStream(self.tokenizer, req.stop), self._on_rows)
        sent = 0  # completion tokens the client has
        moves = migrations = 0
        engine_req = base
        replica = None
        try:
            while True:
                replica, addr = await self._route(engine_req)
                IN_FLIGHT[replica] = IN_FLIGHT.get(replica, 0) + 1
                try:
                    g.control = None
                    self.client.submit(addr, engine_req, g)
                    while True:
                        await g.event.wait()
                        g.event.clear()
                        if g.text or g.finish:
                            # taken together: more may arrive while we are suspended below
                            text, g.text, finish = g.text, "", g.finish
                            sent = len(g.generated)
                            if g.overflow:
                                yield self._error(TextDelta(text, "error", len(ids), sent),
                                                  "the client is not reading its stream",
                                                  500, "stream_buffer_full")
                                return
                            yield TextDelta(text, finish, len(ids), sent, g.cached)
                            if finish:
                                return
                        if g.control is not None:
                            break
                finally:
                    IN_FLIGHT[replica] -= 1
                    if not IN_FLIGHT[replica]:
                        del IN_FLIGHT[replica]
                rid, _, reason, error, *_ = g.control
                if reason == "moved" and moves == 0 and not g.generated:
                    moves += 1  # a hot replica handed it back unstarted: once, elsewhere
                    engine_req = replace(engine_req, movable=False, avoid=(*engine_req.avoid,
                                                                            replica))
                    continue
                if reason == "dead" and migrations < self.migration_limit:
                    migrations += 1
                    self.migrations += 1
                    log.warning("request %s: %s; resuming on another replica after %d tokens "
                                "(migration %d)", rid, error, len(g.generated), migrations)
                    engine_req = self._resumed(base, g, engine_req.avoid + (replica,))
                    continue
                status = 500 if reason == "error" else 503
                yield self._error(TextDelta("", "error", len(ids), sent),
                                  f"generation failed: {error}", status,
                                  "server_error" if status == 500 else "replica_failed")
                return
        except Exception as err:  # routing or transport failed: a clear error, never a hang
            log.exception("request %s failed in the frontend", req.request_id)
            yield self._error(TextDelta("", "error", len(ids), sent),
                              f"generation failed: {type(err).__name__}: {err}", 503,
                              "replica_failed")
        finally:
            self.client.abort(g)  # the client left, a stop string, a deadline: free KV now

    @staticmethod
    def _resumed(base: EngineRequest, g: Generation, avoid: tuple[str, ...]) -> EngineRequest:
        """The request as another replica continues it: prompt + the tokens already made."""
        left = base.params.max_tokens - len(g.generated)  # >= 1: it had not ended
        return replace(base, prompt_token_ids=base.prompt_token_ids + g.generated,
                       params=replace(base.params, max_tokens=left), movable=False,
                       avoid=avoid, queued_s=0.0)

    @staticmethod
    def _error(d: TextDelta, message: str, status: int, code: str) -> TextDelta:
        kind = "server_error" if status >= 500 else "invalid_request_error"
        d.error = APIError(message, status, kind, code=code).body()
        d.status = status
        return d
