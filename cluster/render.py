"""OpenAI response shapes: one choice's text, logprobs, tool calls and reasoning, as a final
body or as stream chunks. Fed the generation's pieces (protocol.TextDelta) in order.

Logprobs are reported as the engine computed them (cluster/engine/sampler.py: the
log-softmax after biases, penalties and temperature, before top-k/top-p/min-p); -inf
(a masked token) is written as -9999.0, as JSON has no infinity.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from cluster.protocol import TextDelta

FLOOR = -9999.0


def _lp(x: float | None) -> float | None:
    return None if x is None else max(FLOOR, x)


@dataclass
class ChoiceSpec:
    """How a request's choices are rendered (the same for all its choices)."""

    kind: str  # completion | chat
    token_text: Callable[[int], str]
    logprobs: int | None = None  # None: no logprobs; k: the top k with each
    echo: bool = False
    discard_output: bool = False  # echo with max_tokens 0: the prompt only
    prompt_texts: list[str] = field(default_factory=list)  # echo: per prompt
    n: int = 1
    tool_stream: Callable[[], object] | None = None  # a tool-call parser per choice
    reasoning_stream: Callable[[], object] | None = None
    forced_tools: bool = False  # tool_choice required / named: the output is calls
    token_ids: bool = False  # return_token_ids: prompt_token_ids and token_ids per choice


class Choice:
    def __init__(self, spec: ChoiceSpec, index: int):
        self.spec, self.index = spec, index
        self.text = ""
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        self.cached = 0
        self.offset = 0  # completions' text_offset of the next token
        self.lp_completion = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                              "text_offset": []}
        self.lp_chat: list[dict] = []
        self.tools = spec.tool_stream() if spec.tool_stream else None
        self.reasoning = spec.reasoning_stream() if spec.reasoning_stream else None
        self.deltas: list[dict] = []  # chat: what the parsers made of the text
        self.called = False
        self.prompt_ids: list[int] | None = None
        self.ids: list[int] = []  # token_ids: the generated tokens' ids

    # ---- pieces in

    def add(self, d: TextDelta) -> dict | None:
        """Takes a piece; returns the stream chunk's choice for it (None: nothing to send)."""
        spec = self.spec
        if spec.discard_output:
            d.text, d.token_ids, d.logprobs, d.completion_tokens = "", [], None, 0
            d.finish_reason = d.finish_reason and "length"
        self.completion_tokens = d.completion_tokens or self.completion_tokens
        self.cached = d.cached_tokens or self.cached
        lp_before = (len(self.lp_completion["tokens"]), len(self.lp_chat))
        echo = ""
        if d.prompt_ids is not None and spec.echo:
            echo = spec.prompt_texts[self.index // spec.n]
            if spec.logprobs is not None and d.prompt_logprobs is not None:
                self._add_logprobs(d.prompt_ids, d.prompt_logprobs)
            else:
                self.offset += len(echo)
        if spec.logprobs is not None and d.logprobs:
            self._add_logprobs(d.token_ids[-len(d.logprobs):], d.logprobs)
        if spec.token_ids:
            self.ids += d.token_ids
            if d.prompt_ids is not None:
                self.prompt_ids = d.prompt_ids
        text = echo + d.text
        self.text += text
        if d.finish_reason:
            self.finish_reason = d.finish_reason
        if spec.kind == "chat":
            return self._chat_piece(d.text, d.finish_reason is not None, lp_before[1])
        choice = {"index": self.index, "text": text, "finish_reason": d.finish_reason,
                  "logprobs": None}
        if spec.logprobs is not None:
            choice["logprobs"] = {k: v[lp_before[0]:] for k, v in self.lp_completion.items()}
        if spec.token_ids:  # the prompt's ids with a choice's first chunk only
            choice["prompt_token_ids"] = d.prompt_ids
            choice["token_ids"] = d.token_ids
        return choice

    def _add_logprobs(self, ids: list[int], entries: list) -> None:
        tt = self.spec.token_text
        for tok, e in zip(ids, entries, strict=False):
            s = tt(tok)
            if self.spec.kind == "completion":
                lc = self.lp_completion
                lc["tokens"].append(s)
                lc["text_offset"].append(self.offset)
                if e is None:  # the first prompt token: nothing before it to predict it
                    lc["token_logprobs"].append(None)
                    lc["top_logprobs"].append(None)
                else:
                    lc["token_logprobs"].append(_lp(e[0]))
                    top = {tt(i): _lp(v) for i, v in zip(e[1], e[2], strict=True)}
                    lc["top_logprobs"].append(top)
            else:
                self.lp_chat.append({
                    "token": s, "logprob": _lp(e[0]), "bytes": list(s.encode()),
                    "top_logprobs": [{"token": tt(i), "logprob": _lp(v),
                                      "bytes": list(tt(i).encode())}
                                     for i, v in zip(e[1], e[2], strict=True)]})
            self.offset += len(s)

    def _chat_piece(self, text: str, done: bool, lp_from: int) -> dict | None:
        deltas = self._parse(text, done)
        self.deltas += deltas
        delta: dict = {}
        for x in deltas:  # one chunk per piece: merge what the parsers made of it
            for k, v in x.items():
                if k == "tool_calls":
                    delta.setdefault(k, []).extend(v)
                else:
                    delta[k] = delta.get(k, "") + v
        lps = self.lp_chat[lp_from:]
        if not delta and not done and not lps:
            return None
        return {"index": self.index, "delta": delta,
                "finish_reason": self._chat_finish() if done else None,
                "logprobs": {"content": lps} if self.spec.logprobs is not None else None}

    def _parse(self, text: str, done: bool) -> list[dict]:
        out = []
        pieces = self.reasoning.feed(text) if self.reasoning else [{"content": text}]
        if done and self.reasoning:
            pieces += self.reasoning.finish()
        for p in pieces:
            if "content" in p and self.tools is not None:
                out += self.tools.feed(p["content"])
            elif p.get("content") or p.get("reasoning_content"):
                out.append(p)
        if done and self.tools is not None:
            out += self.tools.finish()
        if any("tool_calls" in x for x in out):
            self.called = True
        return [x for x in out if x.get("tool_calls") or x.get("content")
                or x.get("reasoning_content")]

    def _chat_finish(self) -> str | None:
        # "length" stays: a call cut by max_tokens has arguments that do not parse (a forced
        # call's grammar ends the generation with "stop" once the call is complete)
        if self.called and self.finish_reason == "stop":
            return "tool_calls"
        return self.finish_reason

    # ---- the whole answer

    def final(self) -> dict:
        if self.spec.kind == "completion":
            out = {"index": self.index, "text": self.text, "finish_reason": self.finish_reason,
                   "logprobs": self.lp_completion if self.spec.logprobs is not None else None}
            if self.spec.token_ids:
                out |= {"prompt_token_ids": self.prompt_ids, "token_ids": self.ids}
            return out
        msg: dict = {"role": "assistant", "content": None}
        content = "".join(x.get("content", "") for x in self.deltas)
        reasoning = "".join(x.get("reasoning_content", "") for x in self.deltas)
        calls = _merge_calls(self.deltas)
        msg["content"] = content if content or not calls else None
        if reasoning:
            msg["reasoning_content"] = reasoning
        if calls:
            msg["tool_calls"] = calls
        return {"index": self.index, "message": msg, "finish_reason": self._chat_finish(),
                "logprobs": {"content": self.lp_chat} if self.spec.logprobs is not None
                else None}


def _merge_calls(deltas: list[dict]) -> list[dict]:
    """Whole tool calls from their stream deltas (the first names it, the rest add
    argument text)."""
    calls: dict[int, dict] = {}
    for x in deltas:
        for c in x.get("tool_calls", []):
            call = calls.setdefault(c["index"], {"id": None, "type": "function",
                                                 "function": {"name": "", "arguments": ""}})
            call["id"] = c.get("id") or call["id"]
            fn = c.get("function", {})
            call["function"]["name"] += fn.get("name") or ""
            call["function"]["arguments"] += fn.get("arguments") or ""
    return [calls[i] for i in sorted(calls)]


class Usage:
    """Usage of a request: its prompts once, all choices' completion tokens."""

    def __init__(self, prompt_tokens: int):
        self.prompt_tokens = prompt_tokens

    def body(self, choices: dict[int, Choice], n: int) -> dict:
        done = sum(c.completion_tokens for c in choices.values())
        cached = sum(c.cached for i, c in choices.items() if i % n == 0)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": done,
                "total_tokens": self.prompt_tokens + done,
                "prompt_tokens_details": {"cached_tokens": cached}}
