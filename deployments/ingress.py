"""The OpenAI-compatible HTTP ingress (FastAPI on Serve): validates, then streams.

No `from __future__ import annotations` here: FastAPI must see the real `Request` type.
"""


import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

from cluster.config import AppConfig
from cluster.engine.sequence import SamplingParams
from cluster.metrics import IngressMetrics
from cluster.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    SamplingFields,
    TextDelta,
    validation_error,
)

api = FastAPI(title="tandem", description="OpenAI-compatible LLM serving")


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


@api.exception_handler(APIError)
async def _api_error(_: Request, err: APIError) -> JSONResponse:
    return error_response(err)


def sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    def __init__(self, config: dict, tokenizer: DeploymentHandle):
        self.cfg = AppConfig.model_validate(config)
        self.model_name = self.cfg.model.name
        self.tokenizer = tokenizer.options(stream=True)
        self.metrics = IngressMetrics(self.model_name)

    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @api.get("/metrics")
    async def metrics(self) -> Response:
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")

    @api.get("/v1/models")
    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model",
                                            "created": 0, "owned_by": "tandem"}]}

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._serve(request, CompletionRequest, "completion")

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request) -> Response:
        return await self._serve(request, ChatCompletionRequest, "chat")

    async def _parse(self, request: Request, model: type[SamplingFields]) -> SamplingFields:
        body = await request.body()
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise APIError("the request body is not valid JSON") from None
        if not isinstance(doc, dict):
            raise APIError("the request body must be a JSON object")
        try:
            req = model.model_validate(doc, strict=True)
        except ValidationError as err:
            raise validation_error(err) from None
        if req.model != self.model_name:
            raise APIError(f"the model '{req.model}' does not exist; this server serves "
                           f"'{self.model_name}'", 404, param="model", code="model_not_found")
        return req

    async def _serve(self, request: Request, model: type[SamplingFields], kind: str) -> Response:
        endpoint = request.url.path
        try:
            req = await self._parse(request, model)
        except APIError as err:
            self.metrics.request(endpoint, err.status)
            return error_response(err)
        gen = self._to_engine(req, kind)
        stream = self.tokenizer.generate.remote(gen)
        start = time.monotonic()
        head: TextDelta = await stream.__anext__()
        if head.error:
            self.metrics.request(endpoint, head.status)
            return JSONResponse(head.error, status_code=head.status)
        self.metrics.request(endpoint, 200)
        meta = {"id": gen.request_id, "created": int(time.time()), "model": self.model_name}
        if req.stream:
            return StreamingResponse(self._sse(stream, meta, kind, req.include_usage(), start),
                                     media_type="text/event-stream")
        return await self._collect(stream, meta, kind, head, start)

    def _to_engine(self, req: SamplingFields, kind: str) -> GenerateRequest:
        params = SamplingParams(
            temperature=req.temperature, top_p=req.top_p, top_k=max(0, req.top_k),
            seed=req.seed, stop_token_ids=list(req.stop_token_ids or []),
            ignore_eos=req.ignore_eos)
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        rid = f"{prefix}-{uuid.uuid4().hex}"
        if isinstance(req, ChatCompletionRequest):
            messages = [{"role": m.role, "content": m.text()} for m in req.messages]
            return GenerateRequest(rid, "chat", None, messages, params, req.max_new_tokens(),
                                   req.stop_list())
        return GenerateRequest(rid, "completion", req.prompt, None, params, req.max_tokens,
                               req.stop_list())

    @staticmethod
    def _usage(d: TextDelta) -> dict:
        return {"prompt_tokens": d.prompt_tokens, "completion_tokens": d.completion_tokens,
                "total_tokens": d.prompt_tokens + d.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": d.cached_tokens}}

    async def _collect(self, stream, meta: dict, kind: str, head: TextDelta,
                       start: float) -> Response:
        parts: list[str] = []
        last, ttft = head, None
        async for d in stream:
            ttft = ttft or time.monotonic() - start
            parts.append(d.text)
            last = d
            if d.error:
                return JSONResponse(d.error, status_code=d.status)
        self.metrics.finished(last.prompt_tokens, last.completion_tokens, ttft,
                              time.monotonic() - start)
        text = "".join(parts)
        if kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "finish_reason": last.finish_reason, "logprobs": None}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": last.finish_reason,
                      "logprobs": None}
            obj = "text_completion"
        return JSONResponse({**meta, "object": obj, "choices": [choice],
                             "usage": self._usage(last)})

    async def _sse(self, stream, meta: dict, kind: str, include_usage: bool,
                   start: float) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(text: str | None, reason: str | None, first: bool = False) -> dict:
            if kind == "chat":
                delta = {"role": "assistant", "content": ""} if first else \
                    ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": reason,
                          "logprobs": None}
            return {**meta, "object": obj, "choices": [choice]}

        last, ttft = None, None
        try:
            if kind == "chat":
                yield sse(chunk(None, None, first=True))
            async for d in stream:
                ttft = ttft or time.monotonic() - start
                last = d
                if d.error:
                    yield sse(d.error)
                    break
                yield sse(chunk(d.text, d.finish_reason))
            if last is not None and not last.error:
                self.metrics.finished(last.prompt_tokens, last.completion_tokens, ttft,
                                      time.monotonic() - start)
                if include_usage:
                    yield sse({**meta, "object": obj, "choices": [],
                               "usage": self._usage(last)})
            yield sse("[DONE]")
        finally:
            stream.cancel()  # a client that went away frees its request all the way down
