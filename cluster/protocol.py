"""The OpenAI API surface: request models, error bodies, and the messages between stages."""

from __future__ import annotations

import json
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


MAX_N = 16  # choices per prompt
MAX_LOGPROBS = 20  # top logprobs per token


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    continuous_usage_stats: bool = False  # usage on every chunk


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
    n: int = Field(1, ge=1, le=MAX_N)
    best_of: int | None = Field(None, description="only best_of = n (or unset) is served")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    min_tokens: int = Field(0, ge=0)
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(
        None, max_length=1024)
    # structured outputs (cluster.structured): OpenAI's, and vLLM's extensions
    response_format: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: dict[str, Any] | None = None
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

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v, info):
        if v is not None and v != info.data.get("n", 1):
            raise ValueError("best_of other than n is not supported")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v):
        for k in v or {}:
            if not k.isdigit():
                raise ValueError(f"logit_bias keys are token ids; got {k!r}")
        return v

    def bias_list(self) -> list[tuple[int, float]]:
        return [(int(k), float(b)) for k, b in (self.logit_bias or {}).items()]

    def grammar_fields(self) -> dict:
        return {k: getattr(self, k) for k in (
            "response_format", "guided_json", "guided_regex", "guided_choice",
            "guided_grammar", "structured_outputs") if getattr(self, k) is not None}

    def check(self) -> None:
        """Constraints between fields, checked after validation."""

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


MAX_PROMPTS = 64  # prompts in one /v1/completions request


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]] = Field(...)
    max_tokens: int | None = Field(16, ge=0, description="0 only with echo: the prompt "
                                   "scored, nothing generated")
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    # vLLM's extension: each choice carries its prompt's token ids and the generated ones,
    # so a client can extend a conversation token-exact (no retokenized text)
    return_token_ids: bool = False

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("the prompt must not be empty")
            if len(v) > MAX_PROMPTS and not isinstance(v[0], int):
                raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
        return v

    def check(self) -> None:
        """Constraints between fields (pydantic's errors would not name the parameter)."""
        if self.max_tokens == 0 and not self.echo:
            raise APIError("max_tokens must be at least 1 (0 only with echo)",
                           param="max_tokens")

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")  # fields we do not read are refused
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool's answer to one
    reasoning_content: str | None = None  # an earlier answer's reasoning: not re-sent

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""

    def for_template(self) -> dict:
        """What the chat template sees: HF's message shape (arguments as objects, as HF
        templates expect them)."""
        m: dict = {"role": self.role, "content": self.text()}
        if self.name:
            m["name"] = self.name
        if self.tool_call_id:
            m["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            m["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": _json_or_text(c.function.arguments)}}
                for c in self.tool_calls]
        return m


def _json_or_text(s: str):
    try:
        return json.loads(s)
    except ValueError:
        return s


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDef


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool = True

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, v, info):
        if v and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return v

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


@dataclass
class GenerateRequest:
    """Ingress -> generations: a validated request, not yet tokenized."""

    request_id: str
    kind: Literal["completion", "chat"]
    prompts: list[str | list[int]] | None  # completions: one or more
    messages: list[dict] | None
    params: SamplingParams
    max_tokens: int | None  # None: up to the context length
    stop: list[str] = field(default_factory=list)
    cache_salt: str = ""  # the tenant's (API key) and the request's, combined
    n: int = 1  # choices per prompt
    echo: bool = False  # completions: the prompt is scored (with logprobs) and returned
    tools: list[dict] | None = None  # for the chat template
    slo_ttft_ms: float | None = None  # the client's TTFT target (hybrid routing)


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
    after: str | None = None  # n > 1: the sibling choice whose prefill it waits for


@dataclass
class TextDelta:
    """Generations -> ingress: one streamed piece of one choice."""

    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    error: dict | None = None  # an APIError body
    status: int = 200
    index: int = 0  # the choice: prompt index x n + choice of that prompt
    token_ids: list[int] = field(default_factory=list)  # the tokens this piece came from
    logprobs: list | None = None  # per token of token_ids: [logprob, top ids, top logprobs]
    prompt_ids: list[int] | None = None  # echo: with a choice's first piece
    prompt_logprobs: list | None = None  # echo with logprobs: per prompt token (first None)
    pool: str | None = None  # the header delta: the model's pool that serves it (gpu, cpu)
    route: str | None = None  # ... and the hybrid policy's reason for it


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a prompt, or chat messages through the template."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    tools: list[Tool] | None = None
    return_token_strs: bool = False

    def check(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise APIError("give exactly one of prompt and messages", param="prompt")


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]] = Field(..., max_length=1 << 20)

    def check(self) -> None:
        pass
