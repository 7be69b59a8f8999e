"""The OpenAI-compatible HTTP frontend (FastAPI on Serve, on the Kunpeng nodes): validates,
tokenizes, routes, streams text back (cluster/frontend.py does the generation part).

No `from __future__ import annotations` here: FastAPI must see the real `Request` type.
"""


import asyncio
import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster import reasoning, structured, tool_calls
from cluster.admission import ApiKeys, Gate
from cluster.config import AppConfig
from cluster.engine.sequence import SamplingParams
from cluster.frontend import Generations
from cluster.metrics import IngressMetrics
from cluster.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    GenerateRequest,
    SamplingFields,
    TextDelta,
    TokenizeRequest,
    validation_error,
)
from cluster.render import Choice, ChoiceSpec, Usage
from cluster.rollout import CANARY, STABLE, session_key, to_canary
from cluster.stage_metrics import TokenizerMetrics, base_tags
from cluster.structured import GrammarSpec

log = logging.getLogger("ray.serve")
api = FastAPI(title="tandem", description="OpenAI-compatible LLM serving")


SHARE_REFRESH_S = 1.0
# a rollout's canary gets no new request from a frontend whose last word from the controller
# is older than this (under rollout_controller.FRONTENDS_SEE_S)
STALE_SHARE_S = 2.0


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


@api.exception_handler(APIError)
async def _api_error(_: Request, err: APIError) -> JSONResponse:
    return error_response(err)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
    """Unknown paths (404), wrong methods (405): in OpenAI's error shape too."""
    kind = "invalid_request_error" if err.status_code < 500 else "server_error"
    resp = error_response(APIError(str(err.detail), err.status_code, kind))
    resp.headers.update(err.headers or {})
    return resp


def openapi() -> dict:
    """FastAPI's schema, plus the request bodies the endpoints parse themselves (strictly,
    for OpenAI-style errors), so that clients and fuzzers see the real contract."""
    if api.openapi_schema is None:
        schema = get_openapi(title=api.title, version="1", description=api.description,
                             routes=api.routes)
        shared = schema.setdefault("components", {}).setdefault("schemas", {})
        for path, model in (("/v1/completions", CompletionRequest),
                            ("/v1/chat/completions", ChatCompletionRequest)):
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            shared.update(body.pop("$defs", {}))
            shared[model.__name__] = body
            schema["paths"][path]["post"]["requestBody"] = {"required": True, "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
        api.openapi_schema = schema
    return api.openapi_schema


api.openapi = openapi


# a failed stage (500: generation failed; 503: a replica died) is worth one more try
RETRYABLE = {500, 503}


def new_id(kind: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"


def sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


class LocalStream:
    """A generation as the handlers consume it: the next delta, or cancel (free its KV)."""

    def __init__(self, agen):
        self.agen = agen
        self.closed = False

    def __anext__(self):
        return self.agen.__anext__()

    def cancel(self) -> None:
        if not self.closed:
            self.closed = True
            asyncio.ensure_future(self._close())

    async def _close(self) -> None:
        try:
            await self.agen.aclose()
        except RuntimeError:  # still running: its own cancellation runs its cleanup
            pass


class OwnedStream(StreamingResponse):
    """A streamed response that owns its request's admission slot and generation: both are
    released when the response ends, also when its client left before the body started (an
    async generator that never started runs no `finally`, so the body alone cannot)."""

    def __init__(self, content, release, **kw):
        super().__init__(content, **kw)
        self.release = release

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()


def tenant_salt(api_key: str | None, asked: str | None) -> str:
    """Prefix-cache salt: per API key when keys are configured (tenants never share KV),
    and the request's own `cache_salt` on top."""
    tenant = hashlib.sha256(api_key.encode()).hexdigest()[:32] if api_key else ""
    return f"{tenant}:{asked or ''}" if tenant or asked else ""


class ServedModel:
    """One model behind this frontend: its generations (tokenizer, pools) and settings."""

    def __init__(self, cfg: AppConfig, pools: dict[str, DeploymentHandle], replica_tag: str,
                 version: str = STABLE):
        self.cfg = cfg  # its one-model config
        self.name = cfg.model.name
        self.version = version
        self.generations = Generations(cfg, pools)
        self.generations.metrics = TokenizerMetrics(base_tags(self.name, replica_tag))
        self.grammar_tokenizer = None  # llguidance's view of the vocabulary, built on demand
        self.special_tokens = {t.content for t in self.generations.tokenizer.tok
                               .get_added_tokens_decoder().values() if t.special}
        # names this build and model: a client can tell answers of different deployments
        self.fingerprint = "fp_" + hashlib.sha256(
            f"{self.name}:{cfg.model.path}".encode()).hexdigest()[:10]

    def card(self) -> dict:
        return {"id": self.name, "object": "model", "created": 0, "owned_by": "tandem"}

    def pools(self) -> dict[str, int]:
        """Live replicas this frontend's routers see per pool (0: still pending)."""
        return {pool: len(self.generations.loads(pool)) for pool in self.generations.pools}

    def check_grammar(self, spec: GrammarSpec, param: str) -> None:
        if self.grammar_tokenizer is None:
            self.grammar_tokenizer = structured.tokenizer_info(self.cfg.model.path)
        try:
            structured.validate(spec, self.grammar_tokenizer)
        except ValueError as err:
            raise APIError(f"the {param} cannot be compiled: {err}", param=param) from None


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    """`pools`: per model name, its deployments' handles by pool (gpu, cpu); `canary`: the
    canary's (config `canary`), serving that model's name beside it."""

    def __init__(self, config: dict, pools: dict[str, dict[str, DeploymentHandle]],
                 canary: dict[str, DeploymentHandle] | None = None):
        self.cfg = AppConfig.model_validate(config)
        # names the frontend that answered (x-tandem-frontend): logs and fault tests
        self.replica_tag = serve.get_replica_context().replica_tag
        self.models = {e.model.name: ServedModel(self.cfg.of_model(e), pools[e.model.name],
                                                 self.replica_tag)
                       for e in self.cfg.served()}
        self.default = next(iter(self.models.values()))  # a request that names none
        c = self.cfg.canary
        self.canary = None if c is None else self._with_fallback(ServedModel(
            self.cfg.of_model(c).model_copy(update={"canary": None}), canary,
            self.replica_tag, CANARY))
        self.metrics = IngressMetrics(self.default.name)
        self.cpu_mark = (time.process_time(), time.monotonic())
        ing = self.cfg.ingress
        self.keys = ApiKeys(ing.api_keys_file, ing.api_keys_env)
        self.gate = Gate(ing.max_in_flight)
        # the canary's live share, from the app's rollout controller (none: the config's)
        self.app_name = serve.get_replica_context().app_name
        self.live_share: float | None = None
        self.share_at = 0.0
        self.share_task: asyncio.Task | None = None
        self.controller = None
        # a rollout's canary, from its controller (the canary's apps beside this one); the
        # config's `canary` is the one without a controller
        self.rollout_canary: ServedModel | None = None
        self.rollout_route: dict | None = None
        self.reported_at = 0.0  # the controller's last answer

    def _check_key(self, request: Request, open_route: bool = False) -> str | None:
        """The caller's API key (None when no keys are configured)."""
        if open_route and not self.cfg.ingress.protect_health_and_metrics:
            return None
        if not self.keys.enabled:
            return None
        auth = request.headers.get("authorization")
        if not self.keys.allows(auth):
            raise APIError("missing or invalid API key (Authorization: Bearer <key>)", 401,
                           "authentication_error", code="invalid_api_key")
        return auth.partition(" ")[2]

    def record_autoscaling_stats(self) -> dict[str, float]:
        """CPU share of one core this replica used since the last report, and its load."""
        cpu, wall = time.process_time(), time.monotonic()
        used = (cpu - self.cpu_mark[0]) / max(1e-6, wall - self.cpu_mark[1])
        self.cpu_mark = (cpu, wall)
        return {"cpu": min(1.0, used), "queued": float(self.gate.in_flight)}

    def frontend_stats(self) -> dict:
        """What this frontend did (benchmarks): engine messages received, migrations."""
        gens = [m.generations for m in self.models.values()]
        return {"messages": sum(g.client.messages() for g in gens),
                "migrations": sum(g.migrations for g in gens),
                "in_flight": self.gate.in_flight, "pid": os.getpid()}

    @api.get("/health")
    async def health(self, request: Request) -> dict:
        self._check_key(request, open_route=True)
        return {"status": "ok"}

    @api.get("/metrics")
    async def metrics(self, request: Request) -> Response:
        self._check_key(request, open_route=True)
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")

    @api.get("/v1/models")
    async def list_models(self, request: Request) -> dict:
        self._check_key(request)
        return {"object": "list", "data": [m.card() for m in self.models.values()]}

    @api.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str, request: Request) -> dict:
        self._check_key(request)
        m = self._model(model_id)
        body = {**m.card(), "max_model_len": m.generations.max_model_len}
        if self.cfg.router.policy != "serve_default":  # Serve's own router reports no loads
            body["pools"] = m.pools()
        return body

    def _version(self, m: ServedModel, request: Request, user: str | None) -> ServedModel:
        """The version of `m` that serves a new request: the canary for its share. (A
        request keeps the version it got to its end, whatever happens to the share.)"""
        self._follow_rollout()
        c = self.rollout_canary or self.canary
        if c is None or c.name != m.name:
            return m
        if c is self.rollout_canary and time.monotonic() - self.reported_at > STALE_SHARE_S:
            # the controller ends a canary FRONTENDS_SEE_S after its share went to 0: a
            # frontend that has not heard from it since must not start requests there
            return m
        return c if to_canary(session_key(request.headers, user), self._share()) else m

    def _share(self) -> float:
        """The canary's share: the rollout controller's; the config's without one."""
        if self.live_share is not None:
            return self.live_share
        return self.cfg.canary.share if self.cfg.canary else 0.0

    def _follow_rollout(self) -> None:
        """About once a second, in the background: this frontend's metrics to the app's
        rollout controller, its share and canary back."""
        now = time.monotonic()
        if now - self.share_at >= SHARE_REFRESH_S and self.share_task is None:
            self.share_at = now
            self.share_task = asyncio.get_running_loop().create_task(self._refresh_share())

    async def _refresh_share(self) -> None:
        import ray

        from cluster.rollout_controller import NAMESPACE, controller_name

        try:
            if self.controller is None:
                self.controller = await asyncio.to_thread(
                    ray.get_actor, controller_name(self.app_name), namespace=NAMESPACE)
            got = await self.controller.report.remote(self.replica_tag, self.metrics.render())
            self.reported_at = time.monotonic()
            if got["canary"] != self.rollout_route:
                self.rollout_canary = None if got["canary"] is None else \
                    await asyncio.to_thread(self._canary_of, got["canary"])
                self.rollout_route = got["canary"]
            self.live_share = got["share"]
        except Exception:  # noqa: BLE001 - no controller (or it went): the config's canary
            self.controller, self.live_share = None, None
            self.rollout_canary = self.rollout_route = None
        finally:
            self.share_task = None

    def _canary_of(self, route: dict) -> ServedModel:
        """The canary a controller names: its config, its pools' handles in their apps."""
        pools = {pool: serve.get_deployment_handle(dep, app_name=app)
                 for pool, (app, dep) in route["deployments"].items()}
        return self._with_fallback(ServedModel(AppConfig.model_validate(route["config"]),
                                               pools, self.replica_tag, CANARY))

    def _with_fallback(self, canary: ServedModel) -> ServedModel:
        """A canary whose routing finds no replica falls back to the stable version of its
        model, where both read token ids alike (a request never waits on a canary that
        was removed)."""
        stable = self.models.get(canary.name)
        if stable is not None and canary.generations.same_vocabulary(stable.generations):
            canary.generations.fallback = stable.generations
        return canary

    def _model(self, name: str | None) -> ServedModel:
        """The model a request names (none: the first one)."""
        if name is None:
            return self.default
        m = self.models.get(name)
        if m is None:
            raise APIError(f"the model '{name}' does not exist; this server serves "
                           f"{', '.join(repr(n) for n in self.models)}", 404, param="model",
                           code="model_not_found")
        return m

    @api.post("/tokenize")
    async def tokenize(self, request: Request) -> dict:
        req, _ = await self._parse(request, TokenizeRequest)
        req.check()
        gens = self._model(req.model).generations
        tok = gens.tokenizer
        try:
            if req.messages is not None:
                tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
                ids = tok.encode_chat([m.for_template() for m in req.messages],
                                      add_generation_prompt=req.add_generation_prompt,
                                      **({"tools": tools} if tools else {}))
            else:
                ids = tok.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        except (ValueError, TypeError) as err:
            raise APIError(f"could not tokenize: {err}") from None
        return {"count": len(ids), "max_model_len": gens.max_model_len,
                "tokens": ids, "token_strs": [gens.token_text(t) for t in ids]
                if req.return_token_strs else None}

    @api.post("/detokenize")
    async def detokenize(self, request: Request) -> dict:
        req, _ = await self._parse(request, DetokenizeRequest)
        gens = self._model(req.model).generations
        bad = [t for t in req.tokens if t >= gens.vocab_size]
        if bad:
            raise APIError(f"token ids out of vocabulary: {bad[:5]}", param="tokens")
        return {"prompt": gens.tokenizer.decode(req.tokens)}

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._serve(request, CompletionRequest, "completion")

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request) -> Response:
        return await self._serve(request, ChatCompletionRequest, "chat")

    async def _parse(self, request: Request, model: type[SamplingFields]
                     ) -> tuple[SamplingFields, str | None]:
        key = self._check_key(request)
        limit = self.cfg.ingress.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise APIError(f"the request body exceeds {limit} bytes", 413,
                           code="request_too_large")
        body = b""
        async for chunk in request.stream():  # read no more than the limit, whatever it says
            body += chunk
            if len(body) > limit:
                raise APIError(f"the request body exceeds {limit} bytes", 413,
                               code="request_too_large")
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise APIError("the request body is not valid JSON") from None
        if not isinstance(doc, dict):
            raise APIError("the request body must be a JSON object")
        try:
            req = model.model_validate(doc, strict=True)
        except ValidationError as err:
            raise validation_error(err) from None
        self._model(req.model)  # an unknown model: 404 before anything else
        return req, key

    def _deadline(self, request: Request) -> float:
        limit = self.cfg.ingress.request_timeout_s
        asked = request.headers.get("x-request-timeout")
        try:
            limit = min(limit, float(asked)) if asked else limit
        except ValueError:
            raise APIError("X-Request-Timeout must be a number of seconds",
                           param="X-Request-Timeout") from None
        if not limit > 0:
            raise APIError("X-Request-Timeout must be positive", param="X-Request-Timeout")
        return time.monotonic() + limit

    @staticmethod
    def _slo(request: Request) -> float | None:
        """The client's TTFT target for hybrid routing (x-slo-ttft-ms), if it sets one."""
        asked = request.headers.get("x-slo-ttft-ms")
        if asked is None:
            return None
        try:
            slo = float(asked)
        except ValueError:
            slo = 0.0
        if not slo > 0 or slo == float("inf"):
            raise APIError("x-slo-ttft-ms must be a positive number of milliseconds",
                           param="x-slo-ttft-ms")
        return slo

    async def _serve(self, request: Request, model: type[SamplingFields], kind: str) -> Response:
        endpoint = request.url.path
        m = None
        try:
            req, key = await self._parse(request, model)
            m = self._version(self._model(req.model), request, req.user)
            req.check()
            deadline = self._deadline(request)
            gen, spec = self._to_engine(m, req, kind, tenant_salt(key, req.cache_salt))
            gen.slo_ttft_ms = self._slo(request)
            ticket = self.gate.try_enter(deadline)
            if ticket is None:
                raise APIError("the server is at capacity; retry shortly", 429,
                               "rate_limit_error", code="server_busy")
        except APIError as err:
            self.metrics.request(endpoint, err.status, m and m.name,
                                 m.version if m else STABLE)
            resp = error_response(err)
            if err.status == 429:
                resp.headers["Retry-After"] = "1"
            return resp
        try:
            resp = await self._generate(m, req, gen, spec, endpoint, deadline, ticket)
            resp.headers["x-tandem-frontend"] = self.replica_tag
            resp.headers["x-tandem-version"] = m.version
            return resp
        except BaseException:  # includes the cancellation of a client that went away
            self.gate.leave(ticket)
            raise

    async def _generate(self, m: ServedModel, req, gen: GenerateRequest, spec: ChoiceSpec,
                        endpoint: str, deadline: float, ticket: int) -> Response:
        """Owns one gate slot: released when the response (or its stream) is over.

        A stage that fails before anything reached the client (a tokenizer replica died, or a
        model replica failed a whole non-streamed request) is retried once from the start, on
        replicas Serve picks afresh: the client sees one answer, never a duplicate."""
        kind = gen.kind
        start = time.monotonic()
        stream = None
        try:
            for attempt in range(2):
                stream = LocalStream(m.generations.generate(gen))
                head: TextDelta = await self._next(stream, deadline)
                if head.error and head.status in RETRYABLE and attempt == 0:
                    stream.cancel()
                    gen = replace(gen, request_id=new_id(kind))
                    continue
                if head.error:
                    self.gate.leave(ticket)
                    self.metrics.request(endpoint, head.status, m.name, m.version)
                    return JSONResponse(head.error, status_code=head.status)
                if head.route is not None:
                    self.metrics.routed(m.name, head.pool, head.route)
                routed = {"x-tandem-pool": head.pool} | (
                    {"x-tandem-route": head.route} if head.route else {})
                meta = {"id": gen.request_id, "created": int(time.time()), "model": m.name,
                        "system_fingerprint": m.fingerprint}
                if req.stream:
                    self.metrics.request(endpoint, 200, m.name, m.version)

                    def release(stream=stream) -> None:
                        self.gate.leave(ticket)
                        stream.cancel()

                    opts = req.stream_options
                    return OwnedStream(
                        self._sse(stream, meta, spec, head, start, deadline, ticket,
                                  req.include_usage(),
                                  bool(opts and opts.continuous_usage_stats), m.version),
                        release, media_type="text/event-stream", headers=routed)
                status, body = await self._collect(stream, meta, spec, head, start, deadline,
                                                   m.version)
                if status in RETRYABLE and attempt == 0:
                    stream.cancel()
                    gen = replace(gen, request_id=new_id(kind))
                    continue
                self.gate.leave(ticket)
                self.metrics.request(endpoint, status, m.name, m.version)
                return JSONResponse(body, status_code=status, headers=routed)
        except BaseException:  # a client that left mid-request: its generation ends too
            if stream is not None:
                stream.cancel()
            raise
        raise AssertionError("unreachable: the second attempt always returns")

    @staticmethod
    async def _next(stream, deadline: float) -> TextDelta:
        """The next delta, or a timeout error delta once the deadline passes."""
        try:
            # a timeout scope, not wait_for: that wraps every delta of every stream in a
            # task of its own
            async with asyncio.timeout(deadline - time.monotonic()):
                return await stream.__anext__()
        except (asyncio.TimeoutError, TimeoutError):
            stream.cancel()  # aborts the generation and frees its KV blocks
            err = APIError("the request did not finish within its deadline", 504,
                           "timeout_error", code="request_timeout")
            return TextDelta(finish_reason="error", error=err.body(), status=504)
        except StopAsyncIteration:
            raise
        except Exception as exc:  # a stage died under this request (replica or node lost)
            log.warning("request stream failed: %r", exc)
            stream.cancel()
            err = APIError(f"the request failed inside the cluster ({type(exc).__name__}); "
                           "retry it", 503, "server_error", code="replica_failed")
            return TextDelta(finish_reason="error", error=err.body(), status=503)

    def _to_engine(self, m: ServedModel, req: SamplingFields, kind: str, salt: str
                   ) -> tuple[GenerateRequest, ChoiceSpec]:
        """The engine's view of a request and how its answer is rendered; refuses (400)
        what cannot be served: a grammar that does not compile, tools without a parser."""
        chat = isinstance(req, ChatCompletionRequest)
        k = req.logprobs_k() if chat else req.logprobs
        echo = not chat and req.echo
        grammar = self._grammar(m, req)
        tools = None
        forced = False
        if chat and req.tools and req.tool_choice != "none":
            if m.cfg.model.tool_parser is None:
                raise APIError("this model has no tool-call format configured "
                               "(model.tool_parser)", param="tools")
            tools = [t.model_dump(exclude_none=True) for t in req.tools]
            try:
                tool_calls.check_tools(tools, req.tool_choice)
            except ValueError as err:
                raise APIError(str(err), param="tool_choice") from None
            if req.tool_choice not in (None, "auto"):
                if grammar is not None:
                    raise APIError("a forced tool_choice and a response_format or guided "
                                   "decoding together are not supported", param="tool_choice")
                forced = True
                grammar = GrammarSpec("grammar", tool_calls.forced_call_grammar(
                    tools, req.tool_choice, m.cfg.model.tool_parser, m.special_tokens))
                m.check_grammar(grammar, "tool_choice")
        elif chat and req.tool_choice not in (None, "none", "auto"):
            raise APIError("tool_choice needs tools", param="tool_choice")
        params = SamplingParams(
            temperature=req.temperature, top_p=req.top_p, top_k=max(0, req.top_k),
            min_p=req.min_p, seed=req.seed, stop_token_ids=list(req.stop_token_ids or []),
            ignore_eos=req.ignore_eos, presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            repetition_penalty=req.repetition_penalty, min_tokens=req.min_tokens,
            logit_bias=req.bias_list(), logprobs=k,
            prompt_logprobs=k if echo and k is not None else None,
            grammar=grammar.to_wire() if grammar else None)
        bad = [t for t, _ in params.logit_bias if t >= m.generations.vocab_size]
        if bad:
            raise APIError(f"logit_bias token ids out of vocabulary: {bad[:5]}",
                           param="logit_bias")
        rid = new_id(kind)
        mc = m.cfg.model
        spec = ChoiceSpec(
            kind, m.generations.token_text, k, echo, n=req.n,
            discard_output=echo and req.max_tokens == 0, forced_tools=forced,
            token_ids=getattr(req, "return_token_ids", False),
            tool_stream=(lambda: tool_calls.ToolCallStream(mc.tool_parser)) if tools else None,
            reasoning_stream=(lambda: reasoning.ReasoningStream(mc.reasoning_starts_open))
            if chat and mc.reasoning_parser else None)
        if chat:
            messages = [msg.for_template() for msg in req.messages]
            return GenerateRequest(rid, "chat", None, messages, params, req.max_new_tokens(),
                                   req.stop_list(), salt, n=req.n, tools=tools), spec
        prompts = req.prompts()
        if echo:
            spec.prompt_texts = [p if isinstance(p, str) else
                                 m.generations.tokenizer.decode(p, False) for p in prompts]
        return GenerateRequest(rid, "completion", prompts, None, params,
                               1 if spec.discard_output else req.max_tokens, req.stop_list(),
                               salt, n=req.n, echo=echo), spec

    @staticmethod
    def _grammar(m: ServedModel, req: SamplingFields) -> GrammarSpec | None:
        try:
            spec = structured.spec_from_request(req.grammar_fields())
        except ValueError as err:
            raise APIError(str(err), param=next(iter(req.grammar_fields()), None)) from None
        if spec is not None:
            m.check_grammar(spec, next(iter(req.grammar_fields())))
        return spec

    @classmethod
    async def _deltas(cls, stream, deadline: float) -> AsyncIterator[TextDelta]:
        while True:
            try:
                d = await cls._next(stream, deadline)
            except StopAsyncIteration:
                return
            yield d
            if d.error:
                return

    async def _collect(self, stream, meta: dict, spec: ChoiceSpec, head: TextDelta,
                       start: float, deadline: float, version: str) -> tuple[int, dict]:
        choices: dict[int, Choice] = {}
        ttft = None
        async for d in self._deltas(stream, deadline):
            ttft = ttft or time.monotonic() - start
            if d.error:
                return d.status, d.error
            choices.setdefault(d.index, Choice(spec, d.index)).add(d)
        usage = Usage(head.prompt_tokens).body(choices, spec.n)
        self.metrics.finished(meta["model"], usage["prompt_tokens"],
                              usage["completion_tokens"], ttft, time.monotonic() - start,
                              version)
        obj = "chat.completion" if spec.kind == "chat" else "text_completion"
        return 200, {**meta, "object": obj,
                     "choices": [choices[i].final() for i in sorted(choices)],
                     "usage": usage}

    async def _sse(self, stream, meta: dict, spec: ChoiceSpec, head: TextDelta,
                   start: float, deadline: float, ticket: int, include_usage: bool,
                   continuous: bool, version: str) -> AsyncIterator[str]:
        chat = spec.kind == "chat"
        obj = "chat.completion.chunk" if chat else "text_completion"
        base = {**meta, "object": obj}
        choices: dict[int, Choice] = {}
        usage = Usage(head.prompt_tokens)

        def chunk(choice: dict) -> str:
            body = {**base, "choices": [choice]}
            if include_usage:  # as OpenAI does: null on every chunk but the last
                body["usage"] = usage.body(choices, spec.n) if continuous else None
            return sse(body)

        ttft, failed = None, False
        try:
            async for d in self._deltas(stream, deadline):
                ttft = ttft or time.monotonic() - start
                if d.error:
                    failed = True
                    yield sse(d.error)
                    break
                c = choices.get(d.index)
                if c is None:
                    c = choices[d.index] = Choice(spec, d.index)
                    if chat:  # a choice's first chunk names the role
                        yield chunk({"index": d.index, "delta": {"role": "assistant",
                                                                 "content": ""},
                                     "finish_reason": None, "logprobs": None})
                piece = c.add(d)
                if piece is not None:
                    yield chunk(piece)
            if not failed and choices:
                body = usage.body(choices, spec.n)
                self.metrics.finished(meta["model"], body["prompt_tokens"],
                                      body["completion_tokens"], ttft,
                                      time.monotonic() - start, version)
                if include_usage:
                    yield sse({**base, "choices": [], "usage": body})
            yield sse("[DONE]")
        finally:
            self.gate.leave(ticket)
            stream.cancel()  # a client that went away frees its request all the way down
