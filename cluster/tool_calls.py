"""OpenAI tool calling, text side: reading a model's own tool-call format out of its output
(whole or streamed), grammars that force calls, and request checks. No torch here.

Formats, by the name a config picks (`PARSERS`):
  hermes       Hermes / Qwen2.5 (and the built-in model's template): one or more
               `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`
  llama3_json  Llama 3.x: the whole message is `{"name": ..., "parameters": {...}}`,
               optionally after `<|python_tag|>`, several separated by `;`
  deepseek_v3  DeepSeek V3 / R1: `<｜tool▁calls▁begin｜>` then calls
               `<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\n{...}\\n```<｜tool▁call▁end｜>`
               separated by newlines, then `<｜tool▁calls▁end｜>`

A call's `arguments` is the model's own text of the arguments object (validated as JSON),
as OpenAI returns it. Text that is not a valid call stays content; whitespace next to a call
is dropped. One state machine per format reads both whole and streamed text: a whole text is
a stream whose calls are only reported once complete and valid, so both agree on valid
output. Streamed, a call is announced once its name is known and its arguments object has
begun; if its text breaks after that, the call stays as streamed and the rest of its text is
dropped (a whole-text parse would keep that text as content instead).
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Collection, Generator
from dataclasses import dataclass, field

from cluster.reasoning import partial_tail

HERMES_BEGIN, HERMES_END = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
DS_CALLS_BEGIN, DS_CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
DS_CALL_BEGIN, DS_CALL_END = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>"
DS_SEP = "<｜tool▁sep｜>"
ARG_KEYS = ("arguments", "parameters")
MAX_NAME = 256  # a DeepSeek function name longer than this is not one (stop buffering)
_WS = re.compile(r"\s*")
SCALAR = frozenset("-+.0123456789eEtrufalsn")  # characters of numbers, true, false, null


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object's text
    id: str = field(default_factory=new_call_id)

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


class _Fail(Exception):
    """The text being read is not a call (the reader turns it back into content)."""


class _Value:
    """Where one JSON value ends in a stream of characters. Only the structure is tracked
    (strings, nesting); json.loads validates the value's text once it is complete."""

    def __init__(self) -> None:
        self.first = ""
        self.depth = 0
        self.in_str = self.esc = self.done = False

    def push(self, c: str) -> bool:
        """Takes c if it belongs to the value; False when the value ended before c."""
        if not self.first:
            if c not in '{["' and c not in SCALAR:
                raise _Fail
            self.first, self.in_str, self.depth = c, c == '"', int(c in "{[")
        elif self.in_str:
            if self.esc:
                self.esc = False
            elif c == "\\":
                self.esc = True
            elif c == '"':
                self.in_str = False
                self.done = self.depth == 0
        elif self.first in SCALAR:
            if c not in SCALAR:
                self.done = True
                return False
        elif c == '"':
            self.in_str = True
        elif c in "{[":
            self.depth += 1
        elif c in "}]":
            self.depth -= 1
            self.done = self.depth == 0
        elif c not in ",: \t\r\n" and c not in SCALAR:
            raise _Fail
        return True


@dataclass
class _Call:
    index: int = -1  # set when announced
    name: str | None = None
    args: str | None = None  # the arguments' text so far; None until they begin
    sent: int = 0  # how much of args has been streamed
    announced: bool = False


Steps = Generator[None, None, object]  # a reader step: yields while it needs more text


def _fragment_of(last: dict, delta: dict) -> bool:
    """Both are argument fragments (not a call's first delta) of the same call."""
    a, b = last["tool_calls"][0], delta["tool_calls"][0]
    return "id" not in a and "id" not in b and a["index"] == b["index"]


class _Reader:
    """The text a format reads, the deltas it produces, and the steps formats are made of.
    A step is a generator that yields when it needs more text; once the text is final it
    never yields."""

    def __init__(self, early: bool):
        self.early = early  # announce calls before they are complete (streaming)
        self.buf, self.pos, self.final = "", 0, False
        self.region = ""  # text read since the last content or call: content if it fails
        self.out: list[dict] = []
        self.calls = 0  # calls announced so far
        self.call: _Call | None = None
        self.after_call = False  # whitespace right after a call is dropped
        self.held_ws = ""  # content's trailing whitespace: dropped if a call follows

    # ---- deltas

    def _emit(self, delta: dict) -> None:
        last = self.out[-1] if self.out else None
        if last and "content" in delta and "content" in last:
            last["content"] += delta["content"]
        elif last and "tool_calls" in delta and "tool_calls" in last and _fragment_of(
                last, delta):
            last["tool_calls"][0]["function"]["arguments"] += (
                delta["tool_calls"][0]["function"]["arguments"])
        else:
            self.out.append(delta)

    def content(self, text: str) -> None:
        if self.after_call:
            text = text.lstrip()
            self.after_call = not text
        text = self.held_ws + text
        body = text.rstrip()
        self.held_ws = text[len(body) :]
        if body:
            self._emit({"content": body})

    def flush_call(self, complete: bool = False) -> None:
        """Streams what is new of the call being read (all of it, once complete)."""
        c = self.call
        if c is None or c.name is None or c.args is None or not (self.early or complete):
            return
        if not c.announced:
            c.announced, c.index, self.calls = True, self.calls, self.calls + 1
            self.held_ws, self.after_call = "", True
            self._emit({"tool_calls": [{"index": c.index, "id": new_call_id(),
                                        "type": "function",
                                        "function": {"name": c.name, "arguments": ""}}]})
        if len(c.args) > c.sent:
            self._emit({"tool_calls": [{"index": c.index,
                                        "function": {"arguments": c.args[c.sent :]}}]})
            c.sent = len(c.args)

    def commit(self) -> None:
        """The call being read is complete and valid."""
        self.flush_call(complete=True)
        self.call, self.region = None, ""
        self.after_call = True

    def fail(self) -> bool:
        """What was read since the last content or call is no call: it becomes content,
        unless it was already streamed as a call (True: the caller drops the call's rest)."""
        streamed = self.call is not None and self.call.announced
        if not streamed:
            self.content(self.region)
        self.call, self.region = None, ""
        return streamed

    # ---- steps

    def _take(self, n: int) -> str:
        s = self.buf[self.pos : self.pos + n]
        self.pos += n
        self.region += s
        return s

    def _find(self, marker: str | None) -> tuple[int, int]:
        """(where `marker` starts in the unread text or -1, how much unread text surely
        precedes it: all but a tail that may start it, unless the text is final)."""
        if marker is None:
            return -1, len(self.buf) - self.pos
        i = self.buf.find(marker, self.pos)
        if i >= 0:
            return i - self.pos, i - self.pos
        tail = self.buf[max(self.pos, len(self.buf) - len(marker) + 1) :]
        return -1, len(self.buf) - self.pos - (0 if self.final else partial_tail(tail, marker))

    def content_until(self, marker: str | None) -> Steps:
        """Passes content through until `marker` (read, returning True) or the end (False);
        None: everything left is content."""
        while True:
            i, sure = self._find(marker)
            self.content(self.buf[self.pos : self.pos + sure])
            self.pos += sure
            if i >= 0:
                self.region = ""
                self._take(len(marker))
                return True
            if self.final:
                return False
            yield

    def skip_past(self, marker: str | None) -> Steps:
        """Drops text up to and including `marker`, or to the end (None, or no marker)."""
        while True:
            i, sure = self._find(marker)
            self.pos += sure
            if i >= 0:
                self.pos += len(marker)
                return
            if self.final:
                return
            yield

    def ws(self) -> Steps:
        while True:
            self._take(_WS.match(self.buf, self.pos).end() - self.pos)
            if self.pos < len(self.buf) or self.final:
                return
            yield

    def literal(self, text: str, required: bool = True, lenient_end: bool = False) -> Steps:
        """Reads `text` if it comes next (True). Otherwise fails if required, else reads
        nothing (False). lenient_end: at the very end, a missing or cut-off `text` is
        accepted (an output that stopped just short of a closing marker)."""
        while True:
            if self.buf.startswith(text, self.pos):
                self._take(len(text))
                return True
            rest = self.buf[self.pos : self.pos + len(text)]
            if text.startswith(rest):
                if not self.final:
                    yield
                    continue
                if lenient_end:
                    self._take(len(rest))
                    return True
            if required:
                raise _Fail
            return False

    def until(self, marker: str, limit: int) -> Steps:
        """The text up to `marker` (both read): a single line of at most `limit` characters."""
        while True:
            rest = self.buf[self.pos : self.pos + limit + len(marker)]
            i = rest.find(marker)
            if i >= 0 and "\n" not in rest[:i]:
                text = self._take(i)
                self._take(len(marker))
                return text
            if i >= 0 or "\n" in rest or len(rest) == limit + len(marker) or self.final:
                raise _Fail
            yield

    def value(self, is_args: bool = False) -> Steps:
        """One JSON value (validated); is_args: it is the call's arguments, an object,
        streamed as it is read."""
        if is_args and self.call.args is not None:  # a second arguments key
            raise _Fail
        scan, text = _Value(), ""
        while True:
            begin = self.pos
            try:
                while self.pos < len(self.buf) and not scan.done and scan.push(
                        self.buf[self.pos]):
                    self.pos += 1
            finally:  # what was read is the region's, even when it fails
                chunk = self.buf[begin : self.pos]
                self.region += chunk
            text += chunk
            if is_args and chunk:
                if scan.first != "{":
                    raise _Fail
                self.call.args = (self.call.args or "") + chunk
            if scan.done or (self.final and scan.first in SCALAR):
                break
            if self.final:
                raise _Fail
            yield
        try:
            value = json.loads(text)
        except ValueError:
            raise _Fail from None
        if is_args and not isinstance(value, dict):
            raise _Fail
        return value

    def call_object(self) -> Steps:
        """A call as one JSON object, {"name": ..., "arguments"|"parameters": {...}}."""
        self.call = _Call()
        yield from self.literal("{")
        while True:
            yield from self.ws()
            key = yield from self.value()
            if not isinstance(key, str):
                raise _Fail
            yield from self.ws()
            yield from self.literal(":")
            yield from self.ws()
            if key in ARG_KEYS:
                yield from self.value(is_args=True)
            elif key == "name":
                name = yield from self.value()
                if not isinstance(name, str) or not name:
                    raise _Fail
                self.call.name = name
            else:
                yield from self.value()
            yield from self.ws()
            if not (yield from self.literal(",", required=False)):
                break
        yield from self.literal("}")
        if self.call.name is None or self.call.args is None:
            raise _Fail


def _hermes(r: _Reader) -> Steps:
    while (yield from r.content_until(HERMES_BEGIN)):
        try:
            yield from r.ws()
            yield from r.call_object()
            yield from r.ws()
            yield from r.literal(HERMES_END, lenient_end=True)
            r.commit()
        except _Fail:
            if r.fail():
                yield from r.skip_past(HERMES_END)


def _llama3_json(r: _Reader) -> Steps:
    try:
        yield from r.ws()
        yield from r.literal(PYTHON_TAG, required=False)
        while True:
            yield from r.ws()
            yield from r.call_object()
            r.commit()
            yield from r.ws()
            if not (yield from r.literal(";", required=False)):
                break
            r.region = ""  # the separator is no content, even if no call follows
    except _Fail:
        if r.fail():
            yield from r.skip_past(None)
    yield from r.content_until(None)  # whatever does not read as calls is content


def _deepseek_v3(r: _Reader) -> Steps:
    while (yield from r.content_until(DS_CALLS_BEGIN)):
        try:
            yield from r.ws()
            while (yield from r.literal(DS_CALL_BEGIN, required=False)):
                r.call = _Call()
                yield from r.until(DS_SEP, MAX_NAME)  # the call's type, "function"
                r.call.name = (yield from r.until("\n", MAX_NAME)).strip()
                if not r.call.name:
                    raise _Fail
                yield from r.literal("```json")
                yield from r.ws()
                yield from r.value(is_args=True)
                yield from r.ws()
                yield from r.literal("```")
                yield from r.ws()
                yield from r.literal(DS_CALL_END, lenient_end=True)
                r.commit()
                yield from r.ws()
            yield from r.literal(DS_CALLS_END, lenient_end=True)
            r.region = ""  # the section's closing marker is no content
        except _Fail:
            if r.fail():
                yield from r.skip_past(DS_CALLS_END)


PARSERS: dict[str, Callable[[_Reader], Steps]] = {
    "hermes": _hermes, "llama3_json": _llama3_json, "deepseek_v3": _deepseek_v3}


class ToolCallStream:
    """Reads streamed output in one of the `PARSERS` formats: `feed(delta)` and `finish()`
    return OpenAI chat-stream deltas: `{"content": ...}`, a call's first delta
    `{"tool_calls": [{"index", "id", "type", "function": {"name", "arguments": ""}}]}`, then
    its `{"tool_calls": [{"index", "function": {"arguments": fragment}}]}`.
    early=False: a call is reported only once complete and valid (what `parse` does)."""

    def __init__(self, parser: str, *, early: bool = True):
        if parser not in PARSERS:
            raise ValueError(f"unknown tool call parser {parser!r}; known: {sorted(PARSERS)}")
        self._r = _Reader(early)
        self._steps = PARSERS[parser](self._r)
        next(self._steps)  # to its first wait for text

    def feed(self, delta: str) -> list[dict]:
        r = self._r
        r.buf, r.pos = r.buf[r.pos :] + delta, 0
        next(self._steps, None)
        r.flush_call()
        return self._take()

    def finish(self) -> list[dict]:
        r = self._r
        r.final = True
        next(self._steps, None)
        r.flush_call()
        if r.held_ws:
            r._emit({"content": r.held_ws})
        return self._take()

    def _take(self) -> list[dict]:
        out, self._r.out = self._r.out, []
        return out


def parse(text: str, parser: str) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a whole output; content is None when empty."""
    stream = ToolCallStream(parser, early=False)
    content, calls = "", []
    for d in stream.feed(text) + stream.finish():
        content += d.get("content", "")
        for t in d.get("tool_calls", []):
            if "id" in t:
                calls.append(ToolCall(t["function"]["name"], "", t["id"]))
            calls[t["index"]].arguments += t["function"]["arguments"]
    return content or None, calls


# ---- requests


def check_tools(tools: list[dict] | None, tool_choice: str | dict | None) -> None:
    """Raises ValueError, saying what is wrong, for tools or a tool_choice this can't serve."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise ValueError("tool_choice is only allowed when tools are given")
        return
    names: set[str] = set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise ValueError(f"{where}: only tools of type 'function' are supported")
        fn = tool.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}.function.name is required")
        if len(name) > 64 or any(c.isspace() for c in name):
            raise ValueError(f"{where}.function.name must be 1-64 characters without whitespace")
        if name in names:
            raise ValueError(f"{where}: a second function named {name!r}")
        names.add(name)
        params = fn.get("parameters")
        if params not in (None, {}) and not (isinstance(params, dict)
                                             and params.get("type") == "object"):
            raise ValueError(f"{where}.function.parameters must be a JSON schema of "
                             "type 'object'")
    if tool_choice in (None, "none", "auto", "required"):
        return
    if (isinstance(tool_choice, dict) and tool_choice.get("type") == "function"
            and isinstance(tool_choice.get("function"), dict)):
        name = tool_choice["function"].get("name")
        if name not in names:
            raise ValueError(f"tool_choice names function {name!r}, which is not in tools")
        return
    raise ValueError("tool_choice must be 'none', 'auto', 'required' or "
                     "{'type': 'function', 'function': {'name': ...}}")


# ---- forcing calls

# the arguments as the templates render them (json.dumps' separators), not llguidance's
# default of any whitespace anywhere, which a random or weak model can fill without end
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}
# per format: (before the calls, between calls, after them)
CALL_LISTS = {"hermes": ("", "\n", ""), "llama3_json": ("", "; ", ""),
              "deepseek_v3": (DS_CALLS_BEGIN, "\n", DS_CALLS_END)}


def _call_text(parser: str, name: str) -> tuple[str, str]:
    """A call's text before and after its arguments object, as the format's template has it."""
    if parser == "hermes":
        return (f'{HERMES_BEGIN}\n{{"name": {json.dumps(name, ensure_ascii=False)}, '
                '"arguments": ', f"}}\n{HERMES_END}")
    if parser == "llama3_json":
        return f'{{"name": {json.dumps(name, ensure_ascii=False)}, "parameters": ', "}"
    return f"{DS_CALL_BEGIN}function{DS_SEP}{name}\n```json\n", f"\n```{DS_CALL_END}"


def _lark(text: str, special_tokens: Collection[str]) -> str:
    """A Lark expression for exactly `text`; the parts of it that are special tokens are
    token references (llguidance keeps special tokens out of string literals)."""
    special = sorted((t for t in special_tokens if t and t in text), key=len, reverse=True)
    parts = re.split("(" + "|".join(map(re.escape, special)) + ")", text) if special else [text]
    # JSON string syntax is Lark's (ASCII-escaped: no raw control or DEL characters)
    return " ".join(p if p in special else json.dumps(p) for p in parts if p)


def forced_call_grammar(tools: list[dict], tool_choice: str | dict | None, parser: str,
                        special_tokens: Collection[str] = ()) -> str | None:
    """A Lark grammar (llguidance's dialect) admitting only text that `parse(text, parser)`
    reads as calls whose arguments match their tool's parameters schema: one or more calls
    of any tool for tool_choice "required", exactly one call of the named function for
    {"type": "function", ...}; None for choices that force nothing ("auto", "none").
    special_tokens: the tokenizer's special tokens (a format's markers may be ones).
    Expects tools and tool_choice that passed check_tools."""
    if parser not in CALL_LISTS:
        raise ValueError(f"unknown tool call parser {parser!r}; known: {sorted(CALL_LISTS)}")
    if isinstance(tool_choice, dict):
        chosen = [tool_choice["function"]["name"]]
    elif tool_choice == "required":
        chosen = [t["function"]["name"] for t in tools]
    else:
        return None
    by_name = {t["function"]["name"]: t["function"] for t in tools}
    before, between, after = (_lark(t, special_tokens) for t in CALL_LISTS[parser])
    calls = f"call ({between} call)*" if tool_choice == "required" else "call"
    lines = [" ".join(p for p in ("start:", before, calls, after) if p),
             "call: " + " | ".join(f"fn_{i}" for i in range(len(chosen)))]
    for i, name in enumerate(chosen):
        params = by_name[name].get("parameters") or NO_PARAMETERS
        schema = {**params, "x-guidance": {**JSON_STYLE, **params.get("x-guidance", {})}}
        head, tail = (_lark(t, special_tokens) for t in _call_text(parser, name))
        lines += [f"fn_{i}: {head} args_{i} {tail}", f"args_{i}: %json {json.dumps(schema)}"]
    return "\n".join(lines) + "\n"
