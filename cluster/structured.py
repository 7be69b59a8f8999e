"""Structured outputs: a request's output constraint, compiled by llguidance into a matcher
that says, token by token, which ids may come next.

No torch here: the frontends (CPU nodes) compile a request's grammar to answer a bad one with
a 400, and the engine process advances one matcher per constrained sequence on its CPU. The
masks this writes are int32 bitmasks (bit i of word i // 32 set = token i allowed);
cluster/engine/structured_mask.py applies them to logits on the GPU.
"""

from __future__ import annotations

import functools
import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import llguidance
import llguidance.numpy
import numpy as np
from tokenizers import Tokenizer

from cluster.arch import ModelArch

Kind = Literal["json_object", "json_schema", "regex", "choice", "grammar"]
KINDS: tuple[str, ...] = get_args(Kind)

# Short errors: the verbose ones dump the parser state and the generated tokens into logs.
_LIMITS = llguidance.LLParserLimits(verbose_errors=False)


# JSON on one line, at most one space between its tokens ({"a":1} and {"a": 1} both pass).
# llguidance's default allows any whitespace there, which a weak model (or this project's
# random-weight one) fills with runs of spaces and newlines until max_tokens. A schema's own
# "x-guidance" options override this, e.g. {"whitespace_pattern": "[ \\n\\t]*"}.
_JSON_OPTIONS = {"whitespace_pattern": " ?"}


@dataclass(frozen=True)
class GrammarSpec:
    """One request's constraint. value: the JSON schema (json_schema), the regex, the list of
    choices, or the grammar text (Lark in llguidance's dialect, or GBNF); None for
    json_object."""

    kind: Kind
    value: Any = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown structured-output kind {self.kind!r}")

    def to_wire(self) -> dict:
        return {"kind": self.kind, "value": self.value}

    @classmethod
    def from_wire(cls, d: dict) -> GrammarSpec:
        return cls(d["kind"], d.get("value"))


def _schema(v: Any, field: str) -> dict:
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except json.JSONDecodeError as e:
            raise ValueError(f"{field} is not valid JSON: {e}") from None
    if not isinstance(v, dict):
        raise ValueError(f"{field} must be a JSON schema object")
    return v


def _text(v: Any, field: str) -> str:
    if not isinstance(v, str):
        raise ValueError(f"{field} must be a string")
    return v


def _choices(v: Any, field: str) -> list[str]:
    if not isinstance(v, list) or not v or not all(isinstance(c, str) for c in v):
        raise ValueError(f"{field} must be a non-empty list of strings")
    return v


def _response_format(rf: Any) -> GrammarSpec | None:
    if not isinstance(rf, dict):
        raise ValueError("response_format must be an object")
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarSpec("json_object")
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict):
            raise ValueError("response_format.json_schema must be an object")
        # the API makes "schema" optional; without one, any JSON object will do.
        # "strict" is not read: the output is always constrained
        if js.get("schema") is None:
            return GrammarSpec("json_object")
        return GrammarSpec("json_schema", _schema(js["schema"], "response_format.json_schema"))
    raise ValueError(f"response_format.type {kind!r} is not supported; "
                     "use 'text', 'json_object' or 'json_schema'")


# vLLM's structured_outputs keys and its older guided_* fields
_PARSERS = {"json": ("json_schema", _schema), "regex": ("regex", _text),
            "choice": ("choice", _choices), "grammar": ("grammar", _text)}
_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
           "guided_grammar": "grammar"}


def spec_from_request(fields: dict) -> GrammarSpec | None:
    """The constraint that an OpenAI/vLLM request body asks for; None when unconstrained.
    ValueError (a 400) for a malformed one or for more than one at once."""
    found: list[tuple[str, GrammarSpec]] = []
    if fields.get("response_format") is not None:
        spec = _response_format(fields["response_format"])
        if spec is not None:
            found.append(("response_format", spec))
    for name, key in _GUIDED.items():
        if fields.get(name) is not None:
            kind, parse = _PARSERS[key]
            found.append((name, GrammarSpec(kind, parse(fields[name], name))))
    so = fields.get("structured_outputs")
    if so is not None:
        if not isinstance(so, dict):
            raise ValueError("structured_outputs must be an object")
        # clients send every field, unset ones as null/false: only set ones count
        for key, v in so.items():
            name = f"structured_outputs.{key}"
            if v is None or v is False:
                continue
            if key == "json_object":
                found.append((name, GrammarSpec("json_object")))
            elif key in _PARSERS:
                kind, parse = _PARSERS[key]
                found.append((name, GrammarSpec(kind, parse(v, name))))
            else:
                raise ValueError(f"{name} is not supported")
    if len(found) > 1:
        raise ValueError(f"only one structured-output constraint per request: got "
                         f"{found[0][0]} and {found[1][0]}")
    return found[0][1] if found else None


def to_llguidance_grammar(spec: GrammarSpec) -> str:
    """The grammar string that llguidance.LLMatcher takes. ValueError for a GBNF grammar that
    cannot be converted; other errors only show when it is compiled (validate())."""
    if spec.kind in ("json_object", "json_schema"):
        schema = {"type": "object"} if spec.kind == "json_object" else spec.value
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
    if spec.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.value)
    if spec.kind == "choice":
        # JSON string literals are Lark string literals: json.dumps escapes quotes, backslashes
        # and control characters
        alts = " | ".join(json.dumps(c, ensure_ascii=False) for c in spec.value)
        return llguidance.LLMatcher.grammar_from_lark(f"start: {alts}")
    # Lark passes through; anything else is taken for GBNF and converted (ValueError if not)
    return llguidance.grammar_from("grammar", spec.value)


def validate(spec: GrammarSpec, tokenizer: llguidance.LLTokenizer | None) -> None:
    """Compiles the grammar (without keeping it); ValueError naming the problem if it does not
    compile. With the tokenizer, token-level references (special tokens) are checked too."""
    try:
        grammar = to_llguidance_grammar(spec)
    except ValueError as e:
        raise ValueError(f"invalid {spec.kind} constraint: {e}") from None
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
        grammar, tokenizer, limits=_LIMITS)
    if is_error:
        raise ValueError(f"invalid {spec.kind} constraint: {messages[0]}")


def tokenizer_info(model_dir: str | Path) -> llguidance.LLTokenizer:
    """llguidance's view of the model's vocabulary, from tokenizer.json (no transformers).

    Its size is the model's embedding rows when they outnumber the tokenizer's ids: masks then
    cover the padding ids too, and never allow them. Its EOS ids are the tokenizer's
    eos_token and every EOS id the engine stops on (config/generation_config), so a finished
    grammar allows exactly those."""
    d = Path(model_dir)
    text = (d / "tokenizer.json").read_text()
    vocab = Tokenizer.from_str(text)
    arch = ModelArch.from_hf(d)
    eos = list(arch.eos_token_ids)
    cfg_path = d / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    eos_token = cfg.get("eos_token")
    if isinstance(eos_token, dict):
        eos_token = eos_token.get("content")
    eos_id = vocab.token_to_id(eos_token) if eos_token else None
    if eos_id is not None and eos_id not in eos:
        eos.insert(0, eos_id)
    n_vocab = max(arch.vocab_size, vocab.get_vocab_size(with_added_tokens=True))
    return llguidance.LLTokenizer(text, n_vocab=n_vocab, eos_token=eos or None)


def allocate_bitmask(batch: int, vocab_size: int) -> np.ndarray:
    """[batch, ceil(vocab_size / 32)] int32, every token allowed (an unconstrained row)."""
    return llguidance.numpy.allocate_token_bitmask(batch, vocab_size)


class _MatcherCache:
    """Compiled matchers, one per (tokenizer, grammar), copied for each new sequence.

    Measured on this project's 4k-token tokenizer (2-core CPU): LLMatcher() takes ~0.3 ms for
    a 3-field schema and 4-7 ms for a 60-field one, whose first mask then takes ~0.3 ms;
    deep_copy() of a compiled matcher takes ~10 us and its first mask ~50 us (the copy shares
    the lexer states built so far). llguidance keeps no cache across LLMatcher() calls, and
    the same schema repeats across requests. A hit still pays for to_llguidance_grammar (it
    serializes the schema: ~0.25 ms for the 60-field one), which makes the key."""

    def __init__(self, size: int = 256):
        self.size = size
        self.entries: OrderedDict[tuple[int, str], tuple[Any, Any]] = OrderedDict()
        self.lock = threading.Lock()

    def matcher(self, tokenizer: llguidance.LLTokenizer, grammar: str) -> llguidance.LLMatcher:
        key = (id(tokenizer), grammar)
        with self.lock:
            hit = self.entries.get(key)
            # the id may be a dead tokenizer's; the entry holds its tokenizer to tell
            if hit is not None and hit[0] is tokenizer:
                self.entries.move_to_end(key)
                return hit[1].deep_copy()
        compiled = llguidance.LLMatcher(tokenizer, grammar, log_level=0, limits=_LIMITS)
        with self.lock:
            self.entries[key] = (tokenizer, compiled)
            self.entries.move_to_end(key)
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)
        return compiled.deep_copy()


_CACHE = _MatcherCache()


class GrammarState:
    """One sequence's matcher. A grammar that fails to compile, or a token it forbids, puts it
    in an error state for good: error() says why, and masks then allow only EOS."""

    def __init__(self, spec: GrammarSpec, tokenizer: llguidance.LLTokenizer):
        self.matcher = _CACHE.matcher(tokenizer, to_llguidance_grammar(spec))

    def fill_mask(self, bitmask: np.ndarray, row: int) -> None:
        """Writes the tokens allowed next into bitmask[row]."""
        llguidance.numpy.fill_next_token_bitmask(self.matcher, bitmask, row)

    def accept(self, token_id: int) -> bool:
        """Advances by one sampled token; False if the grammar did not allow it."""
        return self.matcher.consume_token(token_id)

    def is_finished(self) -> bool:
        """Nothing but EOS can follow (the grammar is complete, or in error)."""
        return self.matcher.is_stopped()

    def is_accepting(self) -> bool:
        """The output so far is complete (EOS is allowed), though more may follow."""
        return self.matcher.is_accepting()

    def rollback(self, n: int) -> bool:
        """Forgets the last n accepted tokens (preemption, rejected draft tokens)."""
        return self.matcher.rollback(n)

    def error(self) -> str | None:
        return self.matcher.get_error() or None


@functools.cache
def _executor() -> llguidance.LLExecutor:
    return llguidance.LLExecutor()  # a thread pool: one per process


def fill_masks(states: Sequence[tuple[GrammarState, int]], bitmask: np.ndarray) -> None:
    """fill_mask for a batch: (state, row) pairs, computed in parallel outside the GIL."""
    llguidance.numpy.fill_next_token_bitmask_par(
        _executor(), [(s.matcher, row) for s, row in states], bitmask)
