"""The OpenAI API surface: request models, error bodies, and the messages between stages."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cluster.engine.sequence import SamplingParams


class APIError(Exception):
    """An error the client caused (or may retry); rendered as OpenAI's error body."""

    def __init__(self, message: str, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = (
            message, status, type, param, code)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    @classmethod
    def from_body(cls, body: dict, status: int) -> APIError:
        e = body["error"]
        return cls(e["message"], status, e["type"], e.get("param"), e.get("code"))


def _problem(e: dict) -> str:
    where = ".".join(str(p) for p in e["loc"]) or "body"
    if e["type"] == "extra_forbidden":  # a parameter we do not implement: say so, never ignore
        return f"{where}: this parameter is not supported by this server"
    return f"{where}: {e['msg']}"


def validation_error(err: ValidationError) -> APIError:
    first = err.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    code = "unsupported_parameter" if first["type"] == "extra_forbidden" else None
    return APIError("; ".join(_problem(e) for e in err.errors()[:5]), 400, param=param,
                    code=code)


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    # a field not declared here is refused with 400 (it would change the answer, and we do
    # not implement it); the few that change nothing are declared and then left unused
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, le=2**31 - 1)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # what a torch.Generator takes
    stop: str | list[str] | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0, lt=2**63)]] | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="only n=1 is served")
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0, description="not supported")
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0, description="not supported")
    logprobs: Any = None
    cache_salt: str | None = Field(None, min_length=1, max_length=256, description=(
        "prefix-cache salt: requests with different salts never share cached KV"))
    # accepted and unused: they change nothing in the answer
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4096 or any(len(s) > 1024 for s in stops):
            raise ValueError("at most 4096 stop strings of at most 1024 characters")
        return v

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, v):
        if v not in (None, False, 0):
            raise ValueError("logprobs are not supported")
        return v

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] = Field(...)
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = Field(False, description="not supported")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("the prompt must not be empty")
            if isinstance(v[0], str):
                if len(v) != 1:
                    raise ValueError("one prompt per request is served")
                return v[0]
        return v

    @field_validator("echo")
    @classmethod
    def _echo(cls, v):
        if v:
            raise ValueError("echo is not supported")
        return v


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")  # tool_calls & co. are refused, never dropped
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


@dataclass
class GenerateRequest:
    """Ingress -> tokenizer pool: a validated request, not yet tokenized."""

    request_id: str
    kind: Literal["completion", "chat"]
    prompt: str | list[int] | None
    messages: list[dict] | None
    params: SamplingParams
    max_tokens: int | None  # None: up to the context length
    stop: list[str] = field(default_factory=list)
    cache_salt: str = ""  # the tenant's (API key) and the request's, combined


@dataclass
class EngineRequest:
    """Tokenizer pool -> model replica: token ids only."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    movable: bool = True  # a hot replica may hand it back before its prefill (once)
    queued_s: float = 0.0  # time already spent in other replicas' queues
    # replicas (Serve replica ids or actor ids) that handed it back or failed it: elsewhere
    avoid: tuple[str, ...] = ()
    cache_salt: str = ""


@dataclass
class TextDelta:
    """Tokenizer pool -> ingress: one streamed piece of a completion."""

    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    error: dict | None = None  # an APIError body
    status: int = 200
