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

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import TYPE_CHECKING

from jinja2.exceptions import TemplateError

from cluster import hybrid
from cluster.arch import ModelArch, context_length
from cluster.config import CPU, GPU, AppConfig
from cluster.engine_client import EngineClient, Stream
from cluster.load import IN_FLIGHT, ReplicaLoad, pool_loads
from cluster.protocol import APIError, EngineRequest, GenerateRequest, TextDelta
from cluster.tokenizer import TextStream, Tokenizer

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle

log = logging.getLogger("ray.serve")

# a canary's request that finds no replica in this long (or finds its deployment gone) goes
# to the stable version: a rollback deletes the canary's apps while a late frontend may still
# route there, and Serve's routing would wait for replicas that never come
FALLBACK_ROUTE_S = 2.0


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
        self.new_ids: list[int] = []  # since the reader last took them, with their logprobs
        self.logprobs: list = []
        self.prompt_logprobs: list | None = None


class Group:
    """The choices of one prompt (n > 1): where the first was routed, its prompt scores."""

    def __init__(self):
        self.leader: str | None = None  # the first choice's request id
        loop = asyncio.get_running_loop()
        self.route: asyncio.Future = loop.create_future()
        self.scores: asyncio.Future = loop.create_future()


class Generations:
    """One model's generations. `cfg` is its one-model config; `pools` its deployments'
    handles by pool (gpu, cpu): with both, the hybrid policy picks one per request."""

    def __init__(self, cfg: AppConfig, pools: dict[str, DeploymentHandle]):
        self.cfg = cfg
        self.tokenizer = Tokenizer(cfg.model.path)
        arch = ModelArch.from_hf(cfg.model.path)
        self.vocab_size = arch.vocab_size
        self.eos = frozenset(arch.eos_token_ids)
        self.max_model_len = context_length(arch, cfg.engine.max_model_len)
        self.flops_per_token = arch.flops_per_token()
        self.pools = pools
        self.hybrid = cfg.router.hybrid if len(pools) == 2 else None
        entry = cfg.served()[0]
        self.batch_tokens = {p: entry.engine_of(p).max_num_batched_tokens for p in pools}
        self.client = EngineClient()
        self.migration_limit = cfg.ingress.migration_limit
        self.buffer_chars = cfg.ingress.stream_buffer_chars
        self.migrations = 0
        self._token_texts: dict[int, str] = {}
        self.metrics = None  # TokenizerMetrics, set by the deployment (Ray's metrics agent)
        # a canary's: the stable version's generations of the same model and vocabulary
        self.fallback: Generations | None = None
        self.fallbacks = 0

    # ---- text in

    def tokenize(self, req: GenerateRequest) -> list[list[int]]:
        """Token ids of each prompt (a chat: one)."""
        if req.kind == "chat":
            return [self._tokenize_one(req, None)]
        return [self._tokenize_one(req, p) for p in req.prompts]

    def _tokenize_one(self, req: GenerateRequest, prompt: str | list[int] | None) -> list[int]:
        param = "messages" if req.kind == "chat" else "prompt"
        try:
            if req.kind == "chat":
                kw = {"tools": req.tools} if req.tools else {}
                ids = self.tokenizer.encode_chat(req.messages, **kw)
            elif isinstance(prompt, str):
                ids = self.tokenizer.encode(prompt)
            else:
                ids = list(prompt)
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

    def token_text(self, token_id: int) -> str:
        """One token's text (logprobs), special tokens included."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id], False)
        return text

    # ---- tokens back, once per step for all streams of a core

    def _on_rows(self, items: list[tuple[Generation, list]]) -> None:
        for g, row in items:
            if row[2] in ("dead", "moved", "error"):
                g.control = row
                g.event.set()
                continue
            text, reason = g.texts.push(row[1], row[2])
            g.generated += row[1]
            g.new_ids += row[1]
            g.text += text
            g.cached = row[5] or g.cached
            if len(row) > 6:
                if row[6]:
                    g.logprobs += row[6]
                if row[7] is not None:
                    g.prompt_logprobs = row[7]
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

    def loads(self, pool: str) -> list[ReplicaLoad]:
        """The live replicas of one of this model's pools, as this process's router sees
        them (none until that router started and heard of them)."""
        handle = self.pools[pool]
        if not handle.is_initialized:
            handle.options()  # starts its router, which registers itself (cluster.router)
        return pool_loads(handle.deployment_name)

    def pick_pool(self, req: GenerateRequest, prompts: list[list[int]]) -> tuple[str, str | None]:
        """The pool that serves a request, and the hybrid policy's reason (None: the model
        has one pool)."""
        if self.hybrid is None:
            return next(iter(self.pools)), None
        cost = req.n * sum(hybrid.request_cost(len(ids), req.max_tokens or
                                               self.max_model_len - len(ids),
                                               self.flops_per_token) for ids in prompts)
        n_prompt = sum(map(len, prompts))
        slo_s = (req.slo_ttft_ms or self.hybrid.slo_ttft_ms) / 1000
        gpu, cpu = (hybrid.pool_state(self.loads(p), n_prompt, self.batch_tokens[p])
                    for p in (GPU, CPU))
        return hybrid.decide(cost, slo_s, gpu, cpu, self.hybrid)

    async def _route(self, req: EngineRequest, pool: str) -> tuple[str, str]:
        if self.fallback is None:
            return await self._choose(req, pool)
        from ray.serve.exceptions import DeploymentUnavailableError

        try:
            return await asyncio.wait_for(self._choose(req, pool), FALLBACK_ROUTE_S)
        except (TimeoutError, DeploymentUnavailableError) as err:
            self.fallbacks += 1
            log.warning("request %s: no replica of the canary's %s pool (%r): routed to the "
                        "stable version", req.request_id, pool, err)
            stable = self.fallback
            return await stable._route(req, pool if pool in stable.pools else
                                       next(iter(stable.pools)))

    async def _choose(self, req: EngineRequest, pool: str) -> tuple[str, str]:
        async with self.pools[pool].choose_replica(req, _reserve=False) as sel:
            return sel.replica_id, sel.replica_metadata["engine_addr"]

    def same_vocabulary(self, other: Generations) -> bool:
        """Whether token ids mean the same text here and in `other` (a stream may then
        continue there)."""
        return self.tokenizer.tok.get_vocab() == other.tokenizer.tok.get_vocab()

    async def generate(self, req: GenerateRequest) -> AsyncIterator[TextDelta]:
        """First a header delta (prompt_tokens of all prompts, or an error), then the
        choices' pieces as they come (each with its index: prompt x n + choice)."""
        t0 = time.perf_counter()
        try:
            prompts = self.tokenize(req)
            if self.metrics is not None:
                self.metrics.tokenized(sum(map(len, prompts)), time.perf_counter() - t0)
        except APIError as err:
            yield TextDelta(error=err.body(), status=err.status)
            return
        pool, reason = self.pick_pool(req, prompts)
        yield TextDelta(prompt_tokens=sum(map(len, prompts)), pool=pool, route=reason)
        if len(prompts) == 1 and req.n == 1:
            async for d in self._choice(req, prompts[0], 0, None, pool):
                yield d
            return
        # several choices: each its own stream; siblings of a prompt go to the replica its
        # first choice was routed to and wait there for its prefill, then share its blocks
        queue: asyncio.Queue = asyncio.Queue()
        seed = req.params.seed if req.params.seed is not None else random.getrandbits(63)

        async def pump(ids: list[int], index: int, group: Group) -> None:
            try:
                async for d in self._choice(req, ids, index, group, pool,
                                            seed + index % req.n):
                    await queue.put(d)
            except Exception as err:  # noqa: BLE001 - it becomes that choice's error piece
                log.exception("choice %d of %s failed", index, req.request_id)
                await queue.put(self._error(TextDelta("", "error", len(ids), index=index),
                                            f"generation failed: {err}", 503,
                                            "replica_failed"))
            finally:
                await queue.put(None)

        tasks = [asyncio.create_task(pump(ids, p * req.n + j, group))
                 for p, ids in enumerate(prompts) for group in [Group()]
                 for j in range(req.n)]
        try:
            left = len(tasks)
            while left:
                d = await queue.get()
                if d is None:
                    left -= 1
                else:
                    yield d
        finally:
            for t in tasks:
                t.cancel()

    async def _choice(self, req: GenerateRequest, ids: list[int], index: int,
                      group: Group | None, pool: str, seed: int | None = None
                      ) -> AsyncIterator[TextDelta]:
        """One choice: routes (in `pool`), streams its pieces, moves it off a lost core."""
        max_tokens = req.max_tokens or self.max_model_len - len(ids)
        first = group is None or group.leader is None
        if group is not None and first:
            group.leader = f"{req.request_id}-{index}"
        rid = req.request_id if group is None else f"{req.request_id}-{index}"
        params = replace(req.params, max_tokens=max(1, max_tokens),
                         seed=req.params.seed if seed is None else seed)
        if not first:
            params = replace(params, prompt_logprobs=None)  # the first choice scores it
        base = EngineRequest(rid, ids, params, cache_salt=req.cache_salt,
                             after=None if first else group.leader)
        # with tools, special tokens are decoded too (a model's call markers may be ones)
        keep = self.eos if req.tools else None
        g = Generation(rid, TextStream(self.tokenizer, req.stop, keep), self._on_rows)
        sent = 0  # completion tokens the client has
        moves = migrations = 0
        engine_req = base
        replica = None
        prompt_sent = False
        try:
            while True:
                pinned = await group.route if group is not None and not first \
                    and engine_req is base else None  # the first choice's replica
                if pinned is not None:
                    replica, addr = pinned
                else:
                    if engine_req is base and not first:  # no first choice to wait for
                        engine_req = replace(base, after=None)
                    replica, addr = await self._route(engine_req, pool)
                    if group is not None and first and not group.route.done():
                        group.route.set_result((replica, addr))
                IN_FLIGHT[replica] = IN_FLIGHT.get(replica, 0) + 1
                try:
                    g.control = None
                    self.client.submit(addr, engine_req, g)
                    while True:
                        await g.event.wait()
                        g.event.clear()
                        # tokens whose text is held back (a stop string may start there)
                        # still go out when they carry logprobs
                        if g.text or g.finish or g.logprobs:
                            # taken together: more may arrive while we are suspended below
                            text, g.text, finish = g.text, "", g.finish
                            new, g.new_ids = g.new_ids, []
                            lps, g.logprobs = g.logprobs or None, []
                            sent = len(g.generated)
                            if g.overflow:
                                yield self._error(TextDelta(text, "error", len(ids), sent,
                                                            index=index),
                                                  "the client is not reading its stream",
                                                  500, "stream_buffer_full")
                                return
                            d = TextDelta(text, finish, len(ids), sent, g.cached,
                                          index=index, token_ids=new, logprobs=lps)
                            if not prompt_sent:
                                prompt_sent = True
                                d.prompt_ids = ids
                                d.prompt_logprobs = await self._prompt_scores(g, group,
                                                                              first, req)
                            yield d
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
                    engine_req = replace(engine_req, movable=False, after=None,
                                         avoid=(*engine_req.avoid, replica))
                    continue
                if reason == "dead" and migrations < self.migration_limit:
                    migrations += 1
                    self.migrations += 1
                    log.warning("request %s: %s; resuming on another replica after %d tokens "
                                "(migration %d)", rid, error, len(g.generated), migrations)
                    engine_req = self._resumed(base, g, engine_req.avoid + (replica,),
                                               prompt_sent)
                    continue
                status = 500 if reason == "error" else 503
                yield self._error(TextDelta("", "error", len(ids), sent, index=index),
                                  f"generation failed: {error}", status,
                                  "server_error" if status == 500 else "replica_failed")
                return
        except Exception as err:  # routing or transport failed: a clear error, never a hang
            log.exception("request %s failed in the frontend", rid)
            yield self._error(TextDelta("", "error", len(ids), sent, index=index),
                              f"generation failed: {type(err).__name__}: {err}", 503,
                              "replica_failed")
        finally:
            self.client.abort(g)  # the client left, a stop string, a deadline: free KV now
            if group is not None:
                if not group.route.done():  # it never got routed: siblings route themselves
                    group.route.set_result(None)
                if first and not group.scores.done():
                    group.scores.set_result(None)

    @staticmethod
    async def _prompt_scores(g: Generation, group: Group | None, first: bool,
                             req: GenerateRequest) -> list | None:
        """The prompt's logprobs for a choice's first piece: the first choice's own, which
        its siblings wait for (they did not compute their prompt)."""
        if req.params.prompt_logprobs is None:
            return None
        if group is None:
            return g.prompt_logprobs
        if first:
            group.scores.set_result(g.prompt_logprobs)
            return g.prompt_logprobs
        return await group.scores

    @staticmethod
    def _resumed(base: EngineRequest, g: Generation, avoid: tuple[str, ...],
                 scored: bool) -> EngineRequest:
        """The request as another replica continues it: prompt + the tokens already made
        (which penalties, min_tokens and a grammar count as output)."""
        left = base.params.max_tokens - len(g.generated)  # >= 1: it had not ended
        params = replace(base.params, max_tokens=left, resumed=len(g.generated))
        if scored:
            params = replace(params, prompt_logprobs=None)
        return replace(base, prompt_token_ids=base.prompt_token_ids + g.generated,
                       params=params, movable=False, avoid=avoid, queued_s=0.0, after=None)

    @staticmethod
    def _error(d: TextDelta, message: str, status: int, code: str) -> TextDelta:
        kind = "server_error" if status >= 500 else "invalid_request_error"
        d.error = APIError(message, status, kind, code=code).body()
        d.status = status
        return d
